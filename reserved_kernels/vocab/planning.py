"""``ReservedVocab``: the plan that maps new terms onto a tokenizer's reserved ``<unusedN>`` slots."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping

import torch

from reserved_kernels._io import atomic_write_many
from reserved_kernels.vocab.backends import RESERVED_PIECE, open_backend

PLAN_FILENAME = "reserved_plan.json"
PLAN_FORMAT_VERSION = 1


class PlanError(ValueError):
    """A plan cannot be made, saved or loaded as asked; nothing was changed."""


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
                               output_sha256=output_sha256,
                               entries=[dataclasses.asdict(e) for e in self.entries]), ensure_ascii=False, indent=2)

    @classmethod
    def from_json(cls, text: str) -> tuple[ReservedPlan, str | None]:
        """The plan and the hash of the tokenizer it wrote; raises :class:`PlanError` on a corrupt file."""
        try:
            raw = json.loads(text)
            if raw.get("format_version") != PLAN_FORMAT_VERSION:
                raise PlanError(f"unsupported plan format_version {raw.get('format_version')!r}; "
                                f"expected {PLAN_FORMAT_VERSION}")
            entries = tuple(PlanEntry(term=str(e["term"]), id=int(e["id"]), piece=str(e["piece"]),
                                      description=e["description"], source_ids=tuple(int(i) for i in e["source_ids"]))
                            for e in raw["entries"])
            return cls(str(raw["tokenizer_sha256"]), entries), raw.get("output_sha256")
        except PlanError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise PlanError(f"corrupt plan file: {exc!r}") from exc


class ReservedVocab:
    """A tokenizer's reserved slots and the plan that gives some of them a new meaning.

    >>> vocab = ReservedVocab.from_file(default_tokenizer_path())
    >>> plan = vocab.assign({"[summary]": "a short summary of the text"})
    >>> vocab.save("out")   # out/tokenizer.model (renamed pieces) + out/reserved_plan.json
    """

    def __init__(self, data: bytes, path: str, plan: ReservedPlan | None = None):
        self._data = data
        self.path = path
        self.backend = open_backend(data, path)
        self.sha256 = hashlib.sha256(data).hexdigest()
        pieces = self.backend.pieces()
        self._pieces = pieces
        found = [(int(m.group(1)), i) for i, p in enumerate(pieces) if (m := RESERVED_PIECE.match(p))]
        self.reserved_ids: list[int] = [i for _, i in sorted(found)]
        self._excluded = self.backend.special_ids() | set(self.reserved_ids)
        self.plan = plan if plan is not None else ReservedPlan(self.sha256)
        if self.plan.tokenizer_sha256 != self.sha256:
            raise PlanError("the plan was made for another tokenizer "
                            f"(sha256 {self.plan.tokenizer_sha256[:12]}…, this one {self.sha256[:12]}…)")

    @classmethod
    def from_file(cls, path: str | os.PathLike, plan: str | os.PathLike | ReservedPlan | None = None) -> ReservedVocab:
        """Read a SentencePiece ``.model`` or a ``tokenizer.json``; optionally re-apply a saved plan.

        ``plan`` may be a ``reserved_plan.json`` path (or the folder holding it) or a plan object;
        it must have been made for this very tokenizer file (its sha256 is checked).
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
        return cls(data, path, plan)

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

    def assign(self, terms: Mapping[str, str | None] | Iterable[str]) -> ReservedPlan:
        """Give each new term the next free slot; returns the updated plan (and keeps it).

        ``terms`` maps each term to an optional description (its initialisation text), or is a
        list of terms. A term already planned keeps its id. All-or-nothing: on any error (too
        few free slots, an empty term, a term the tokenizer cannot make a single token of, a term
        with no initialisation sources) a :class:`PlanError` says why and the plan is unchanged.
        """
        items = list(terms.items()) if isinstance(terms, Mapping) else [(t, None) for t in terms]
        new: dict[str, str | None] = {}
        for term, description in items:
            if not isinstance(term, str) or not term.strip():
                raise PlanError(f"terms must be non-empty strings, got {term!r}")
            if description is not None and not isinstance(description, str):
                raise PlanError(f"the description of {term!r} must be a string or None, got {type(description).__name__}")
            if term not in self.plan and term not in new:
                new[term] = description
        if not new:
            return self.plan
        free = self.free_ids
        if len(new) > len(free):
            raise PlanError(f"{len(new)} new terms asked for but only {len(free)} reserved slots are free")
        existing = {p: i for i, p in enumerate(self._pieces)}
        clashes = {t: existing[t] for t in new if t in existing}
        if clashes:
            raise PlanError(f"already pieces of the vocabulary (need no reserved slot): {clashes}")
        slots = dict(zip(new, free))
        renames = {e.id: e.term for e in self.plan.entries} | {slots[t]: t for t in new}
        data = self.backend.renamed(renames)
        problems = {t: why for t in new if (why := self.backend.check_term(data, t, slots[t]))}
        if problems:
            raise PlanError(f"the tokenizer cannot make these terms single tokens: {problems}")
        entries = [PlanEntry(term=t, id=slots[t], piece=self._pieces[slots[t]], description=d,
                             source_ids=self.source_ids(d if d is not None else t)) for t, d in new.items()]
        empty = [e.term for e in entries if not e.source_ids]
        if empty:
            raise PlanError(f"no initialisation sources for {empty}: every id of their text is reserved, control "
                            "or byte-fallback; give each a description")
        self.plan = dataclasses.replace(self.plan, entries=self.plan.entries + tuple(entries))
        return self.plan

    def renamed_tokenizer(self) -> bytes:
        """The tokenizer file's bytes with every planned slot renamed to its term."""
        return self.backend.renamed({e.id: e.term for e in self.plan.entries})

    def renamed_encoder(self) -> Callable[[str], list[int]]:
        """``text -> ids`` with the renamed tokenizer: each planned term becomes its single id."""
        return self.backend.encoder(self.renamed_tokenizer())

    def save(self, out_dir: str | os.PathLike) -> tuple[str, str]:
        """Write ``out_dir/tokenizer.model`` (or ``tokenizer.json``) and ``out_dir/reserved_plan.json`` atomically.

        Both files are written to temporary names first and renamed only when both are complete,
        so an interrupted save leaves any earlier files intact. Returns the two paths.
        """
        out_dir = os.fspath(out_dir)
        data = self.renamed_tokenizer()
        tok_path = os.path.join(out_dir, self.backend.filename)
        plan_path = os.path.join(out_dir, PLAN_FILENAME)
        plan_text = self.plan.to_json(output_sha256=hashlib.sha256(data).hexdigest())
        atomic_write_many({tok_path: data, plan_path: plan_text.encode("utf-8")})
        return tok_path, plan_path
