"""``ReservedVocab``: the plan that maps new terms onto a tokenizer's reserved ``<unusedN>`` slots."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from collections.abc import Callable, Iterable, Mapping

import torch

from reserved_kernels._io import atomic_write_many
from reserved_kernels.vocab.backends import BYTE_PIECE, RESERVED_PIECES, Codec, TokenizerBackend, open_backend
from reserved_kernels.vocab.hf_files import renamed_config, transformers_files

PLAN_FILENAME = "reserved_plan.json"
PLAN_FORMAT_VERSION = 1


class PlanError(ValueError):
    """A plan cannot be made, saved or loaded as asked; nothing was changed."""


def pieces_digest(pieces: Iterable[str] | bytes) -> str:
    """A tokenizer's vocabulary as one sha256, whatever file format carries it: the pieces in id order joined by NUL,
    SentencePiece's ``▁`` read as the space it stands for (a GGUF spells some pieces with the space itself: Gemma 3's
    runs of spaces). ``pieces`` may be that joined text already, as UTF-8 bytes (the GGUF side, 10⁵ pieces)."""
    data = pieces if isinstance(pieces, bytes) else "\0".join(pieces).encode("utf-8", "surrogatepass")
    return hashlib.sha256(data.replace("\u2581".encode("utf-8"), b" ")).hexdigest()


def default_tokenizer_path() -> str:
    """The embedded SentencePiece model with Gemma 1/2's special-token layout (see scripts/train_tokenizer.py)."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "tokenizer.model")


@dataclasses.dataclass(frozen=True)
class PlanEntry:
    """One new term: its reserved id, the ``<unusedN>`` piece it replaced, and its initialisation sources."""

    term: str
    id: int
    piece: str
    description: str | None
    source_ids: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class ReservedPlan:
    """The assignments made so far, in assignment order. Immutable: ``assign`` returns a new plan."""

    tokenizer_sha256: str
    entries: tuple[PlanEntry, ...] = ()
    model_vocab_size: int | None = None  # set when the plan uses a model's rows beyond the tokenizer
    # the tokenizer's pieces (pieces_digest): recognises the same vocabulary in another format (a GGUF's tokens)
    pieces_sha256: str | None = None

    @property
    def ids(self) -> list[int]:
        return [e.id for e in self.entries]

    @property
    def terms(self) -> list[str]:
        return [e.term for e in self.entries]

    def __getitem__(self, term: str) -> PlanEntry:
        for entry in self.entries:
            if entry.term == term:
                return entry
        raise KeyError(term)

    def __contains__(self, term: object) -> bool:
        return any(e.term == term for e in self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def sources_csr(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(offsets, ids) int64 CSR of every entry's source ids, for ``ReservedEmbedding.init_reserved_``."""
        lengths = [len(e.source_ids) for e in self.entries]
        offsets = torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0)
        ids = torch.tensor([i for e in self.entries for i in e.source_ids], dtype=torch.int64)
        return offsets, ids

    def to_json(self, output_sha256: str | None = None) -> str:
        return json.dumps(dict(format_version=PLAN_FORMAT_VERSION, tokenizer_sha256=self.tokenizer_sha256,
                               output_sha256=output_sha256, model_vocab_size=self.model_vocab_size,
                               pieces_sha256=self.pieces_sha256,
                               entries=[dataclasses.asdict(e) for e in self.entries]), ensure_ascii=False, indent=2)

    @classmethod
    def from_json(cls, text: str) -> tuple[ReservedPlan, str | None]:
        """The plan and the hash of the tokenizer it wrote; :class:`PlanError` names what is wrong in a bad file."""
        try:
            raw = json.loads(text)
        except ValueError as exc:
            raise PlanError(f"corrupt plan file: not JSON ({exc})") from exc
        if not isinstance(raw, dict):
            raise PlanError("corrupt plan file: the top level must be a JSON object")
        if raw.get("format_version") != PLAN_FORMAT_VERSION:
            raise PlanError(f"unsupported plan format_version {raw.get('format_version')!r}; "
                            f"expected {PLAN_FORMAT_VERSION}")
        for field in ("tokenizer_sha256", "entries"):
            if field not in raw:
                raise PlanError(f"corrupt plan file: field {field!r} is missing")
        if not isinstance(raw["entries"], list):
            raise PlanError("corrupt plan file: field 'entries' must be a list")
        rows = raw.get("model_vocab_size")
        if rows is not None and (not isinstance(rows, int) or isinstance(rows, bool) or rows < 1):
            raise PlanError(f"corrupt plan file: field 'model_vocab_size' must be a positive integer, got {rows!r}")
        pieces = raw.get("pieces_sha256")  # absent from plans written before it existed
        if pieces is not None and not isinstance(pieces, str):
            raise PlanError(f"corrupt plan file: field 'pieces_sha256' must be a string, got {pieces!r}")
        return cls(str(raw["tokenizer_sha256"]), tuple(_entry(k, e) for k, e in enumerate(raw["entries"])),
                   rows, pieces), raw.get("output_sha256")


def _entry(index: int, raw) -> PlanEntry:
    """One plan entry read from JSON, each field's type checked; errors name the entry and the field."""
    if not isinstance(raw, dict):
        raise PlanError(f"plan entry {index}: must be a JSON object, got {type(raw).__name__}")
    where = f"plan entry {index} ({raw.get('term')!r})"

    def field(name, kinds, allow_none=False):
        if name not in raw:
            raise PlanError(f"{where}: field {name!r} is missing")
        value = raw[name]
        if (value is None and allow_none) or (isinstance(value, kinds) and not isinstance(value, bool)):
            return value
        raise PlanError(f"{where}: field {name!r} has the wrong type ({type(value).__name__})")

    term, token_id, piece = field("term", str), field("id", int), field("piece", str)
    description = field("description", str, allow_none=True)
    sources = field("source_ids", list)
    if not term.strip():
        raise PlanError(f"{where}: field 'term' is empty")
    if not sources or not all(isinstance(i, int) and not isinstance(i, bool) for i in sources):
        raise PlanError(f"{where}: field 'source_ids' must be a non-empty list of integer ids")
    return PlanEntry(term=term, id=token_id, piece=piece, description=description, source_ids=tuple(sources))


class ReservedVocab:
    """A tokenizer's reserved slots and the plan that gives some of them a new meaning.

    Reserved slots, in this order: Gemma's ``<unusedN>`` pieces and Llama 3's
    ``<|reserved_special_token_N|>`` tokens, each in N order (never a special token in use), then —
    given ``model_vocab_size`` larger than the tokenizer (Qwen2's embedding has ~270 more rows than its
    tokenizer has tokens) — the model's rows beyond the tokenizer, which a plan turns into new tokens at
    those very ids (``tokenizer.json`` only). ``families`` says which kinds were found.

    >>> vocab = ReservedVocab.from_file(default_tokenizer_path())
    >>> plan = vocab.assign({"[summary]": "a short summary of the text"})
    >>> vocab.save("out")   # out/tokenizer.model (renamed pieces) + out/reserved_plan.json (+ AutoTokenizer files)
    """

    def __init__(self, data: bytes, path: str, plan: ReservedPlan | None = None, model_vocab_size: int | None = None):
        self._data = data
        self.path = path
        self.backend: TokenizerBackend = open_backend(data, path)
        self.sha256 = hashlib.sha256(data).hexdigest()
        pieces = self.backend.pieces()
        self.tokenizer_size = len(pieces)  # tokens the tokenizer has (vocab_size also counts spare model rows)
        if plan is not None and plan.model_vocab_size is not None:
            if model_vocab_size not in (None, plan.model_vocab_size):
                raise PlanError(f"the plan was made for a model of {plan.model_vocab_size} rows, "
                                f"not {model_vocab_size}")
            model_vocab_size = plan.model_vocab_size
        spare = []
        if model_vocab_size is not None and model_vocab_size != len(pieces):
            if model_vocab_size < len(pieces):
                raise PlanError(f"the model has {model_vocab_size} rows but the tokenizer {len(pieces)} tokens")
            if self.backend.kind != "tokenizer.json":
                raise PlanError("rows beyond the tokenizer can only get a token in a tokenizer.json; "
                                f"{path} is a {self.backend.kind} model")
            spare = list(range(len(pieces), model_vocab_size))
            pieces = pieces + [f"<spare row {i}>" for i in spare]
        self._pieces = pieces
        self.reserved_ids: list[int] = []
        self.families: tuple[str, ...] = ()
        for family, pattern in RESERVED_PIECES.items():
            found = sorted((int(m.group(1)), i) for i, p in enumerate(pieces) if (m := pattern.match(p)))
            if found:
                self.reserved_ids += [i for _, i in found]
                self.families += (family,)
        if spare:
            self.reserved_ids += spare
            self.families += ("spare rows",)
        self._excluded = self.backend.special_ids() | set(self.reserved_ids)
        self._renamed: tuple | None = None  # (plan, renamed file, its parse or None): see _renamed_for_plan
        self.plan = plan if plan is not None else ReservedPlan(self.sha256, model_vocab_size=model_vocab_size if spare
                                                               else None)
        if self.plan.tokenizer_sha256 != self.sha256:
            raise PlanError("the plan was made for another tokenizer "
                            f"(sha256 {self.plan.tokenizer_sha256[:12]}…, this one {self.sha256[:12]}…)")
        if self.plan.pieces_sha256 is None:  # a plan of an earlier release learns it from its very tokenizer file
            self.plan = dataclasses.replace(self.plan, pieces_sha256=pieces_digest(self.backend.pieces()))
        self._check_plan(self.plan)

    def _check_plan(self, plan: ReservedPlan) -> None:
        """Every entry consistent with this tokenizer (an edited plan file is caught here, by entry and field)."""
        reserved, seen_terms, seen_ids = set(self.reserved_ids), {}, {}
        for k, e in enumerate(plan.entries):
            where = f"plan entry {k} ({e.term!r})"
            if e.id not in reserved:
                raise PlanError(f"{where}: field 'id' = {e.id} is not a reserved slot of {self.path}")
            if e.piece != self._pieces[e.id]:
                raise PlanError(f"{where}: field 'piece' = {e.piece!r}, but id {e.id} is {self._pieces[e.id]!r} "
                                "in this tokenizer")
            bad = [i for i in e.source_ids if not 0 <= i < len(self._pieces)]
            if bad:
                raise PlanError(f"{where}: field 'source_ids' has ids outside [0, {len(self._pieces)}): {bad[:10]}")
            for field, key, seen in (("term", e.term, seen_terms), ("id", e.id, seen_ids)):
                if key in seen:
                    raise PlanError(f"{where}: field {field!r} repeats entry {seen[key]}")
                seen[key] = k

    @classmethod
    def from_file(cls, path: str | os.PathLike, plan: str | os.PathLike | ReservedPlan | None = None, *,
                  model_vocab_size: int | None = None) -> ReservedVocab:
        """Read a SentencePiece ``.model`` or a ``tokenizer.json``; optionally re-apply a saved plan.

        ``plan`` may be a ``reserved_plan.json`` path (or the folder holding it) or a plan object;
        it must have been made for this very tokenizer file (its sha256 is checked).
        ``model_vocab_size``: the model's embedding rows, when it has more than the tokenizer has tokens.
        """
        path = os.fspath(path)
        with open(path, "rb") as f:
            data = f.read()
        if plan is not None and not isinstance(plan, ReservedPlan):
            plan_path = os.fspath(plan)
            if os.path.isdir(plan_path):
                plan_path = os.path.join(plan_path, PLAN_FILENAME)
            with open(plan_path, encoding="utf-8") as f:
                plan, output_sha = ReservedPlan.from_json(f.read())
            if output_sha is not None and output_sha == hashlib.sha256(data).hexdigest():
                raise PlanError(f"{path} is the renamed tokenizer this plan wrote; load the plan against the "
                                "original tokenizer it was made for")
        return cls(data, path, plan, model_vocab_size)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, *, model_vocab_size: int | None = None) -> ReservedVocab:
        """The tokenizer of a checkpoint folder: its ``tokenizer.model``, else its ``tokenizer.json``.

        ``model_vocab_size`` is the model's embedding rows; where it equals the tokenizer's size it adds nothing.
        """
        folder = os.fspath(folder)
        for name in ("tokenizer.model", "tokenizer.json"):
            if os.path.exists(os.path.join(folder, name)):
                return cls.from_file(os.path.join(folder, name), model_vocab_size=model_vocab_size)
        raise FileNotFoundError(f"{folder} has no tokenizer.model or tokenizer.json")

    @property
    def vocab_size(self) -> int:
        return len(self._pieces)

    @property
    def free_ids(self) -> list[int]:
        """Reserved ids not yet given a meaning, in ``<unusedN>`` order."""
        taken = set(self.plan.ids)
        return [i for i in self.reserved_ids if i not in taken]

    def piece(self, token_id: int) -> str:
        """The original piece of ``token_id``."""
        return self._pieces[token_id]

    def encode(self, text: str) -> list[int]:
        """Ids that the *original* tokenizer gives for ``text``."""
        return self.backend.encode(text)

    def source_ids(self, text: str) -> tuple[int, ...]:
        """Initialisation sources: the original ids of ``text``, minus reserved, control, byte and unknown ids."""
        return tuple(i for i in self.encode(text) if i not in self._excluded)

    def _sources(self, term: str, description: str | None) -> tuple[int, ...]:
        """A term's initialisation sources; text the tokenizer only knows as bytes falls back to its byte pieces.

        That is the multilingual case (a script the tokenizer never saw): the byte pieces' rows are the
        only related rows there are, and a warning says so.
        """
        text = description if description is not None else term
        sources = self.source_ids(text)
        if sources:
            return sources
        byte_ids = tuple(i for i in self.encode(text) if BYTE_PIECE.match(self._pieces[i]))
        if byte_ids:
            pieces = " ".join(dict.fromkeys(self._pieces[i] for i in byte_ids))
            what = "its description" if description is not None else "its text"
            warnings.warn(f"{term!r}: {what} {text!r} encodes to byte-fallback pieces only; its row starts as the "
                          f"mean of those byte pieces' rows ({pieces})", UserWarning, stacklevel=3)
        return byte_ids

    def surface_forms(self, term: str, description: str | None, spaced: bool = True) -> dict[str, str | None]:
        """``{form: its description}``: ``term`` as it stands after a space too, each with the matching description.

        A tokenizer spells a word differently at the start of a text or after punctuation (``keyword``)
        and after a space (``▁keyword``); a term is one token in both places only as two pieces. So a
        term ``T`` planned with ``spaced=True`` takes two slots: ``" T"`` and ``T``, in this order (the space
        is part of the piece, as in the tokenizer's own word pieces). Each form starts from the description in
        the same form: ``"[lr]"`` from the pieces of ``"learning rate"`` (``learning ▁rate``), ``" [lr]"``
        from those of ``" learning rate"`` (``▁learning ▁rate``). Whitespace around the term and the
        description is normalised away first.
        """
        term = term.strip()
        description = description.strip() if description is not None else None
        forms = {}
        if spaced:
            # The spaced form first, so that it gets the lower id: Ollama splits text on user-defined tokens in
            # id order, and a bare form split out first would leave its space to a token of its own.
            forms[" " + term] = " " + description if description is not None else None
        forms[term] = description
        return forms

    def _refuse_existing(self, forms: Iterable[str]) -> None:
        """A form the tokenizer already has (as its piece, or encoded to one existing token) would take that
        token over in ordinary text: refused, naming the piece and its id."""
        existing = {p: i for i, p in enumerate(self._pieces)}
        taken = {}
        for form in forms:
            piece = self.backend.piece_for(form)
            if piece in existing:
                taken[form] = (piece, existing[piece])
                continue
            ids = self.encode(form)
            if len(ids) == 1:
                taken[form] = (self._pieces[ids[0]], ids[0])
        if taken:
            listed = ", ".join(f"{form!r} is the piece {piece!r} (id {i})" for form, (piece, i) in taken.items())
            raise PlanError(f"already in the vocabulary, and a plan would take it over in ordinary text: {listed}")

    def _check_encoding(self, codec: Codec, slots: Mapping[str, int]) -> None:
        """Each planned form is one token, the right one, alone, after the same term and after a space, and
        decodes back to the text as written. (The probes are made of the term alone, so that they hold on any
        vocabulary; the tests probe real text, lines and punctuation.)"""
        def slot_of(form: str) -> int | None:  # a new form's slot, or an already planned one's id
            return slots[form] if form in slots else (self.plan[form].id if form in self.plan else None)

        problems = {}
        for form, slot in slots.items():
            term = form.strip()
            spaced_slot, bare_slot = slot_of(" " + term), slot_of(term)
            probes = {form: [slot], term + term: [bare_slot] * 2}
            if spaced_slot is not None:
                probes[term + " " + term] = [bare_slot, spaced_slot]
            for text, expected in probes.items():
                if None in expected:
                    continue
                ids = codec.encode(text)
                if ids != expected:
                    problems[form] = f"{text!r} encodes to {ids}, not {expected}"
                    break
                decoded = codec.decode(ids)
                if decoded not in (text, text.lstrip(" ")):  # SentencePiece drops a first piece's space
                    problems[form] = f"{text!r} decodes to {decoded!r}"
                    break
        if problems:
            raise PlanError(f"the tokenizer cannot make these terms single tokens: {problems}")

    def assign(self, terms: Mapping[str, str | None] | Iterable[str], *, spaced: bool = True) -> ReservedPlan:
        """Give each new term free slots, one per surface form; returns the updated plan (and keeps it).

        ``terms`` maps each term to an optional description (its initialisation text), or is a list of
        terms. With ``spaced`` (the default) each term takes two slots, ``T`` and ``" T"``, so that it is
        one token wherever it stands (see :meth:`surface_forms`); ``spaced=False`` plans ``T`` alone, for
        a control token that never follows a space. Every text without the terms encodes exactly as
        before. A term already planned keeps its ids. A term whose text is byte-fallback pieces only (a
        script the tokenizer never saw) is initialised from those byte pieces, with a warning.
        All-or-nothing: on any error (too few free slots, an empty term, a form that is already a token
        of the vocabulary, a term the tokenizer cannot make a single token of, a term with no
        initialisation sources) a :class:`PlanError` says why and the plan is unchanged.
        """
        items = list(terms.items()) if isinstance(terms, Mapping) else [(t, None) for t in terms]
        new: dict[str, str | None] = {}
        for term, description in items:
            if not isinstance(term, str) or not term.strip():
                raise PlanError(f"terms must be non-empty strings, got {term!r}")
            if description is not None and not isinstance(description, str):
                raise PlanError(f"the description of {term!r} must be a string or None, "
                                f"got {type(description).__name__}")
            for form, form_description in self.surface_forms(term, description, spaced).items():
                if form not in self.plan and form not in new:
                    new[form] = form_description
        if not new:
            return self.plan
        free = self.free_ids
        if len(new) > len(free):
            raise PlanError(f"{len(new)} new slots asked for ({', '.join(map(repr, new))}) but only {len(free)} "
                            "reserved slots are free")
        self._refuse_existing(new)
        slots = dict(zip(new, free, strict=False))  # free has at least as many slots: checked above
        renames = {e.id: e.term for e in self.plan.entries} | {slots[t]: t for t in new}
        data = self.backend.renamed(renames)
        try:
            codec = self.backend.codec(data)
        except ValueError as exc:
            raise PlanError(f"the renamed tokenizer does not load: {exc}") from exc
        self._check_encoding(codec, slots)
        entries = [PlanEntry(term=t, id=slots[t], piece=self._pieces[slots[t]], description=d,
                             source_ids=self._sources(t, d)) for t, d in new.items()]
        empty = [e.term for e in entries if not e.source_ids]
        if empty:
            raise PlanError(f"no initialisation sources for {empty}: every id of their text is reserved or "
                            "control; give each a description")
        self.plan = dataclasses.replace(self.plan, entries=self.plan.entries + tuple(entries))
        self._renamed = (self.plan, data, codec)
        return self.plan

    def _renamed_for_plan(self) -> tuple[bytes, Codec | None]:
        """The renamed file of the current plan and its parse, made once per plan (seconds each at 262k pieces)."""
        if self._renamed is None or self._renamed[0] is not self.plan:
            self._renamed = (self.plan, self.backend.renamed({e.id: e.term for e in self.plan.entries}), None)
        return self._renamed[1], self._renamed[2]

    def renamed_tokenizer(self) -> bytes:
        """The tokenizer file's bytes with every planned slot renamed to its term."""
        return self._renamed_for_plan()[0]

    def renamed_codec(self) -> Codec:
        """``(encode, decode)`` with the renamed tokenizer: each planned term is its single id, both ways."""
        data, codec = self._renamed_for_plan()
        if codec is None:
            codec = self.backend.codec(data)
            self._renamed = (self.plan, data, codec)
        return codec

    def renamed_encoder(self) -> Callable[[str], list[int]]:
        """``text -> ids`` with the renamed tokenizer: each planned term becomes its single id."""
        return self.renamed_codec().encode

    def save(self, out_dir: str | os.PathLike) -> tuple[str, str]:
        """Write the renamed tokenizer and ``out_dir/reserved_plan.json``, all files atomically; returns those two
        paths.

        The renamed tokenizer is ``tokenizer.model`` (or ``tokenizer.json``, as read). For a SentencePiece
        model, ``tokenizer.json`` and ``tokenizer_config.json`` are written too (when transformers is
        installed), so ``AutoTokenizer.from_pretrained(out_dir)`` behaves like Gemma's tokenizer: BOS
        added, each term one ordinary (not special) token. A ``tokenizer.json`` read from a folder with a
        ``tokenizer_config.json`` gets that config renamed beside it. Every file is written to a
        temporary name first and renamed only when all are complete, so an interrupted save leaves any
        earlier files intact.
        """
        out_dir = os.fspath(out_dir)
        renames = {e.id: e.term for e in self.plan.entries}
        data = self.renamed_tokenizer()
        tok_path = os.path.join(out_dir, self.backend.filename)
        plan_path = os.path.join(out_dir, PLAN_FILENAME)
        plan_text = self.plan.to_json(output_sha256=hashlib.sha256(data).hexdigest())
        files = {tok_path: data, plan_path: plan_text.encode("utf-8")}
        old_pieces = {i: self._pieces[i] for i in renames}
        if self.backend.kind == "sentencepiece":
            extra = transformers_files(self._data, renames, old_pieces)
        else:
            config_path = os.path.join(os.path.dirname(os.path.abspath(self.path)), "tokenizer_config.json")
            extra = {}
            if os.path.exists(config_path):
                with open(config_path, encoding="utf-8") as f:
                    config = renamed_config(json.load(f), renames, old_pieces)
                extra["tokenizer_config.json"] = json.dumps(config, ensure_ascii=False, indent=2).encode("utf-8")
        files.update({os.path.join(out_dir, name): content for name, content in extra.items()})
        atomic_write_many(files)
        return tok_path, plan_path
