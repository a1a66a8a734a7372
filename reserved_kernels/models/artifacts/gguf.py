"""The trained rows and their tokens written into a copy of the user's own GGUF, for llama.cpp and Ollama.

:func:`export_gguf` copies a GGUF file and changes only what the plan changed: the K planned slots'
token texts and types, the K rows of the token table (and of an untied ``output.weight``), and one new
metadata key, ``reserved_kernels.plan``. Every other key, tensor and row is copied byte for byte; the
file is streamed (tensor data goes from file to file through the kernel) and never held in memory.

The format (version 2 and 3; little-endian): ``GGUF``, the version (u32), the tensor and key counts
(u64); each key as a string (u64 length, UTF-8 bytes), a value type (u32) and the value (arrays: item
type u32, count u64, the items); each tensor's name, dimension count (u32), dimensions (u64, innermost
first), GGML type (u32) and offset (u64) from the data section, which starts at the header's end rounded up
to ``general.alignment`` (32 by default). Renaming changes the header's length; the tensors' offsets are
relative to the data section, so they stay as they are.

How llama.cpp treats the renamed slots (``src/llama-vocab.cpp``): tokens of type USER_DEFINED (4) are split out
of raw text before anything else, longest first, ``parse_special`` or not, and printed as their text. So
each planned form is written as its text with a literal space (``" [gpu]"``, never ``"▁[gpu]"``) and typed
USER_DEFINED. The ``<unusedN>`` slots ship as CONTROL (3), which llama.cpp matches only with
``parse_special`` and prints as nothing. A vocabulary with two equal texts fails llama.cpp's load, so one
is refused here. Ollama splits on user-defined tokens in id order: a plan gives a term's spaced form the
lower id (:meth:`~reserved_kernels.ReservedVocab.surface_forms`); an older plan is exported with a warning.

Rows go in in the table's own type: F32, F16, BF16 and the types gguf-py quantises (Q8_0, Q4_0, Q4_1,
Q5_0, Q5_1; its Q8_0 is bit-identical to ggml's reference quantiser). A table in another type (the
K-quants, the IQ types) is refused: gguf-py has no quantiser for them, and re-quantising the rows any
other way would not be ggml's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import mmap
import os
import struct
import tempfile
import threading
import warnings
from array import array
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import nn

from reserved_kernels import pretrained
from reserved_kernels.models.artifacts.adapter import CONFIG_NAME, KEY_SUFFIX, TABLE_KEY, AdapterError, read_config
from reserved_kernels.models.artifacts.rows import ReservedRows
from reserved_kernels.models.layout import input_embedding, output_head
from reserved_kernels.models.state import patch_state
from reserved_kernels.modules.embedding import ReservedEmbedding
from reserved_kernels.modules.lm_head import ReservedLMHead
from reserved_kernels.vocab.planning import PLAN_FILENAME, PlanError, ReservedPlan, pieces_digest

PLAN_KEY = "reserved_kernels.plan"
TABLE, OUTPUT = "token_embd.weight", "output.weight"
TOKENS, TOKEN_TYPES = "tokenizer.ggml.tokens", "tokenizer.ggml.token_type"
USER_DEFINED = 4  # llama.cpp's LLAMA_TOKEN_TYPE_USER_DEFINED

_STRING, _ARRAY = 8, 9
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_INTEGERS = {0, 1, 2, 3, 4, 5, 10, 11}
_DEFAULT_ALIGNMENT = 32


class ExportError(ValueError):
    """A GGUF export that cannot be made as asked; the message names the file and the key. Nothing was written."""


# ------------------------------------------------------------------------------------------------ reading

@dataclasses.dataclass(frozen=True)
class _Key:
    """One metadata key: its value type and where its record and its value lie in the header bytes."""

    name: str
    vtype: int
    start: int  # the key's record (name, type, value)
    value: int  # the value
    end: int


@dataclasses.dataclass(frozen=True)
class _Tensor:
    name: str
    dims: tuple[int, ...]  # innermost first, as GGUF stores them: a V x D table is (D, V)
    ggml_type: int
    offset: int  # from the start of the data section


@dataclasses.dataclass
class _Header:
    """A GGUF file's header, parsed: its bytes are held (megabytes: the token list), its tensor data is not."""

    path: str
    data: bytearray  # the file's first ``tensors_end`` bytes
    keys: dict[str, _Key]
    keys_end: int
    tensors: dict[str, _Tensor]
    tensors_end: int
    alignment: int
    data_start: int  # where the tensor data begins in the file
    size: int  # the file's size
    token_starts: array | None  # where each token's text starts in ``data`` (its length is the 8 bytes before)

    def integer(self, name: str) -> int | None:
        key = self.keys.get(name)
        if key is None or key.vtype not in _INTEGERS:
            return None
        return struct.unpack_from("<" + _SCALARS[key.vtype], self.data, key.value)[0]


class _Cursor:
    """Reads a file's header front to back, fetching more of the file as the parse reaches it; a file that
    ends early is an :class:`ExportError` naming what was being read."""

    def __init__(self, f, path: str):
        self.f, self.path, self.buf, self.pos = f, path, bytearray(), 0

    def need(self, n: int, what: str) -> None:
        missing = self.pos + n - len(self.buf)
        if missing > 0:
            chunk = self.f.read(max(missing, 8 << 20))  # a header is megabytes: it usually comes in one read
            self.buf += chunk
            if len(chunk) < missing:
                raise ExportError(f"{self.path}: truncated (the file ends inside {what})")

    def scalar(self, fmt: str, what: str):
        size = struct.calcsize("<" + fmt)
        self.need(size, what)
        value = struct.unpack_from("<" + fmt, self.buf, self.pos)[0]
        self.pos += size
        return value

    def string(self, what: str) -> bytes:
        n = self.scalar("Q", what)
        self.need(n, what)
        self.pos += n
        return bytes(self.buf[self.pos - n:self.pos])

    def strings(self, count: int, what: str) -> array:
        """Skip ``count`` strings; where each one's bytes start. A vocabulary has 10⁵ of them: found in numpy where
        :func:`_proposed_starts` can, else in one tight loop."""
        starts = _proposed_starts(self.buf, self.pos, count) if count >= 4096 else None  # a vocabulary, not a list
        if starts is not None:
            self.pos = _end(self.buf, starts[-1])
            return starts
        starts = array("q")
        append, unpack = starts.append, struct.Struct("<Q").unpack_from
        buf, pos = self.buf, self.pos  # buf grows in place: the same object throughout
        end = len(buf)
        for _ in range(count):
            if pos + 8 > end:
                self.pos = pos
                self.need(8, what)
                end = len(buf)
            start = pos + 8
            pos = start + unpack(buf, start - 8)[0]
            if pos > end:
                self.pos = start
                self.need(pos - start, what)
                end = len(buf)
            append(start)
        self.pos = pos
        return starts

    def skip_value(self, vtype: int, what: str) -> array | None:
        """Skip a value of type ``vtype``; for an array of strings, where its strings start (:meth:`strings`)."""
        if vtype in _SCALARS:
            size = struct.calcsize("<" + _SCALARS[vtype])
            self.need(size, what)
            self.pos += size
        elif vtype == _STRING:
            self.strings(1, what)
        elif vtype == _ARRAY:
            item, count = self.scalar("I", what), self.scalar("Q", what)
            if item in _SCALARS:
                size = struct.calcsize("<" + _SCALARS[item]) * count
                self.need(size, what)
                self.pos += size
            elif item == _STRING:
                return self.strings(count, what)
            else:
                for _ in range(count):
                    self.skip_value(item, what)
        else:
            raise ExportError(f"{self.path}: {what} has the unknown value type {vtype} (not a GGUF file, or a newer "
                              "format)")
        return None


def _proposed_starts(buf: bytearray, pos: int, count: int) -> array | None:
    """Where each of the ``count`` strings from ``pos`` in ``buf`` starts, found in numpy, or None where this cannot
    tell (then the caller walks them one by one: ~0.1 µs a string, a twentieth of a second at 262,144 tokens).

    Each string is a u64 length and its bytes, so the walk is sequential; but token texts are short and have no
    NUL, so a length field ``L < 65536`` is the one place where six zero bytes (its top six) sit before a non-zero
    byte (its text's first). Those places are proposed, and the proposal is accepted only if it *is* the walk: the
    first field at ``pos``, each next one ``8 + L`` after the last, ``count`` of them, all inside ``buf``. Anything
    else (a token of 65,536 bytes, a NUL in a text, a header not yet read) answers None."""
    window = np.frombuffer(buf, dtype=np.uint8, offset=pos)
    if len(window) < 9:
        return None
    zero = window == 0
    field = ~zero[8:]  # its text's first byte
    for k in range(2, 8):
        field &= zero[k:len(zero) - 8 + k]
    offsets = np.flatnonzero(field)[:count]
    if len(offsets) != count or offsets[0] != 0:
        return None
    lengths = window[offsets].astype(np.int64) + (window[offsets + 1].astype(np.int64) << 8)
    if not np.array_equal(offsets[1:], offsets[:-1] + 8 + lengths[:-1]) or offsets[-1] + 8 + lengths[-1] > len(window):
        return None
    return array("q", (offsets + pos + 8).tobytes())


def _read_header(path: str) -> _Header:
    """Parse ``path``'s header (:class:`ExportError` for anything but a complete GGUF of version 2 or 3)."""
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise ExportError(f"{path}: cannot be read ({exc.strerror})") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        cur = _Cursor(f, path)
        cur.need(4, "the magic number")
        if bytes(cur.buf[:4]) != b"GGUF":
            raise ExportError(f"{path}: not a GGUF file (it starts with {bytes(cur.buf[:4])!r}, not b'GGUF')")
        cur.pos = 4
        version = cur.scalar("I", "the version")
        if version not in (2, 3):
            raise ExportError(f"{path}: GGUF version {version}; versions 2 and 3 are read")
        n_tensors, n_keys = cur.scalar("Q", "the tensor count"), cur.scalar("Q", "the key count")
        keys: dict[str, _Key] = {}
        token_starts = None
        for k in range(n_keys):
            start = cur.pos
            name = cur.string(f"key {k}'s name").decode("utf-8", "replace")
            vtype = cur.scalar("I", f"key {name!r}")
            value = cur.pos
            starts = cur.skip_value(vtype, f"key {name!r}")
            if name == TOKENS:
                token_starts = starts
            keys[name] = _Key(name, vtype, start, value, cur.pos)
        keys_end = cur.pos
        tensors: dict[str, _Tensor] = {}
        for t in range(n_tensors):
            name = cur.string(f"tensor {t}'s name").decode("utf-8", "replace")
            n_dims = cur.scalar("I", f"tensor {name!r}")
            dims = tuple(cur.scalar("Q", f"tensor {name!r}") for _ in range(n_dims))
            ggml_type = cur.scalar("I", f"tensor {name!r}")
            tensors[name] = _Tensor(name, dims, ggml_type, cur.scalar("Q", f"tensor {name!r}"))
        del cur.buf[cur.pos:]  # the header alone, kept without a copy
        header = _Header(path, cur.buf, keys, keys_end, tensors, cur.pos, _DEFAULT_ALIGNMENT, 0, size, token_starts)
    alignment = header.integer("general.alignment")
    if alignment is not None:
        if alignment < 8 or alignment & (alignment - 1):  # as ggml requires
            raise ExportError(f"{path}: key 'general.alignment' is {alignment}, not a power of two of at least 8")
        header.alignment = alignment
    header.data_start = _aligned(header.tensors_end, header.alignment)
    ends = {t.name: header.data_start + t.offset + n for t in tensors.values() if (n := _nbytes(t)) is not None}
    worst = max(ends, key=ends.get, default=None)
    if worst is not None and ends[worst] > size:
        raise ExportError(f"{path}: truncated ({size:,} bytes; tensor {worst!r} ends at byte {ends[worst]:,})")
    return header


def _aligned(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


def _nbytes(tensor: _Tensor) -> int | None:
    """The tensor's size in bytes, or None for a type this gguf package does not know."""
    import gguf

    try:
        block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(tensor.ggml_type)]
    except (ValueError, KeyError):
        return None
    return int(np.prod(tensor.dims, dtype=np.int64)) // block * type_size


def _type_name(ggml_type: int) -> str:
    import gguf

    try:
        return gguf.GGMLQuantizationType(ggml_type).name
    except ValueError:
        return f"type {ggml_type}"


# ------------------------------------------------------------------------------------------------ the rows

@dataclasses.dataclass(frozen=True)
class ExportRows:
    """What an export writes: the plan, and the trained rows in the plan's id order."""

    plan: ReservedPlan
    rows: np.ndarray  # K x D float32, row k for plan.entries[k]
    head_rows: np.ndarray | None  # an untied head's own K x D rows; None where the head is tied
    table_shape: tuple[int, int] | None  # (V, D) of the table the rows were trained in, where it is known
    source: str  # where they came from, for messages

    @classmethod
    def from_model(cls, model: nn.Module) -> ExportRows:
        """A patched model's rows and the plan it was patched with (:func:`~reserved_kernels.patch_model` given a
        :class:`~reserved_kernels.ReservedVocab`)."""
        embedding, state = input_embedding(model), patch_state(model)
        if not isinstance(embedding, ReservedEmbedding) or state is None:
            raise ExportError(f"{type(model).__name__} is not a patched model (patch_model(model, vocab) first), nor "
                              "a folder of saved rows")
        vocab = state.vocab
        if vocab is None:
            raise ExportError(f"{type(model).__name__} was patched with ids or a bare plan: the export needs the "
                              "ReservedVocab (its tokenizer); patch with it, or save_reserved(model, folder, vocab) "
                              "and export the folder")
        head = output_head(model)
        untied = isinstance(head, ReservedLMHead) and head.tied is None
        return cls.of(ReservedRows(ids=embedding.reserved_ids.tolist(), rows=embedding.reserved_weight.detach(),
                                   head_rows=head.reserved_weight.detach() if untied else None, plan=vocab.plan,
                                   table_shape=tuple(embedding.weight.shape),
                                   source=f"the patched {type(model).__name__}"))

    @classmethod
    def from_folder(cls, folder: str) -> ExportRows:
        """The rows of a folder :func:`~reserved_kernels.save_reserved` (a PEFT trainable-tokens adapter) or
        :func:`~reserved_kernels.save_pretrained` wrote, with the plan beside them; read without a model."""
        from safetensors import safe_open

        plan_path = os.path.join(folder, PLAN_FILENAME)
        if not os.path.isdir(folder):
            raise ExportError(f"{folder}: not a folder of saved rows (save_reserved or save_pretrained writes one)")
        try:
            with open(plan_path, encoding="utf-8") as f:
                plan = ReservedPlan.from_json(f.read())[0]
        except OSError:
            raise ExportError(f"{plan_path}: missing; the export names the tokens by the plan (save_reserved(model, "
                              "folder, vocab) writes it)") from None
        except PlanError as exc:
            raise ExportError(f"{plan_path}: {exc}") from None
        files = sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".safetensors"))
        where: dict[str, str] = {}  # key -> its file; only the few tensors needed are read, below
        metadata: dict[str, str] = {}
        for path in files:
            try:
                with safe_open(path, framework="pt") as f:
                    metadata.update(f.metadata() or {})
                    where.update(dict.fromkeys(f.keys(), path))
            except Exception as exc:  # safetensors raises its own SafetensorError for a damaged file
                raise ExportError(f"{path}: not a readable safetensors file ({exc})") from None
        head_names = ("lm_head", "output", "embed_out")

        def is_head(key: str) -> bool:
            return key.rsplit(".", 2)[-2] in head_names

        def load(key: str):
            with safe_open(where[key], framework="pt") as f:
                return f.get_tensor(key)

        if os.path.exists(os.path.join(folder, CONFIG_NAME)):  # a PEFT trainable-tokens adapter
            try:
                _, ids = read_config(folder)
            except AdapterError as exc:
                raise ExportError(str(exc)) from None
            deltas = [k for k in where if k.endswith(KEY_SUFFIX)]
            embedding = [k for k in deltas if not is_head(k)]
            head = [k for k in deltas if is_head(k)]
            if len(embedding) != 1:
                raise ExportError(f"{files}: expected one key '*.embed_tokens{KEY_SUFFIX}' (the table's rows), found "
                                  f"{embedding}")
            rows = load(embedding[0])
            head_rows = load(head[0]) if head else None
            shape = metadata.get(TABLE_KEY)
            table_shape = tuple(int(x) for x in shape.split("x")) if shape else None
        else:  # a patched model's save_pretrained: the merged table and the master rows under the module names
            masters = [k[:-len(".reserved_weight")] for k in where if k.endswith(".reserved_weight")]
            embedding = [m for m in masters if m.rsplit(".", 1)[-1] not in head_names]
            if len(embedding) != 1 or embedding[0] + ".reserved_ids" not in where:
                raise ExportError(f"{folder}: holds neither an adapter ({CONFIG_NAME}) nor one module's "
                                  "'*.reserved_weight' and '*.reserved_ids' (save_reserved or save_pretrained writes "
                                  "them)")
            name = embedding[0]
            ids = load(name + ".reserved_ids").tolist()
            rows = load(name + ".reserved_weight")
            head = [m for m in masters if m != name]
            head_rows = load(head[0] + ".reserved_weight") if head else None
            table_shape = None
            if name + ".weight" in where:
                with safe_open(where[name + ".weight"], framework="pt") as f:
                    table_shape = tuple(f.get_slice(name + ".weight").get_shape())
        if head_rows is not None and torch.equal(head_rows, rows):
            head_rows = None  # a tied head's copy of the same rows (PEFT writes one)
        return cls.of(ReservedRows(ids=ids, rows=rows, head_rows=head_rows, plan=plan, table_shape=table_shape,
                                   source=folder))

    @classmethod
    def of(cls, found: ReservedRows) -> ExportRows:
        """``found`` (which must carry its plan) as the export writes it: float32, in the plan's id order."""
        plan, ids, source = found.plan, found.ids, found.source
        rows = found.rows.detach().float().cpu().numpy()
        head_rows = None if found.head_rows is None else found.head_rows.detach().float().cpu().numpy()
        table_shape = found.table_shape
        if plan is None:
            raise ExportError(f"{source}: no plan beside the rows; the export names the tokens by the plan")
        if sorted(ids) != sorted(plan.ids):
            raise ExportError(f"{source}: its rows are for the ids {sorted(ids)[:8]}, its plan ({PLAN_FILENAME}) "
                              f"names {sorted(plan.ids)[:8]}: rows and plan must be saved together")
        if rows.ndim != 2 or rows.shape[0] != len(ids) or (head_rows is not None and head_rows.shape != rows.shape):
            raise ExportError(f"{source}: rows of shape {rows.shape} for {len(ids)} ids")
        order = [ids.index(i) for i in plan.ids]
        return cls(plan, np.ascontiguousarray(rows[order], dtype=np.float32),
                   None if head_rows is None else np.ascontiguousarray(head_rows[order], dtype=np.float32),
                   table_shape, source)


# ------------------------------------------------------------------------------------------------ checks

def _quantised(rows: np.ndarray, tensor: _Tensor, path: str) -> np.ndarray:
    """``rows`` in ``tensor``'s own type, as bytes (K x row bytes); :class:`ExportError` for a type gguf-py does not
    write."""
    import gguf

    name = _type_name(tensor.ggml_type)
    try:
        qtype = gguf.GGMLQuantizationType(tensor.ggml_type)
        data = gguf.quants.quantize(rows, qtype)
    except (ValueError, NotImplementedError, gguf.quants.QuantError):
        raise ExportError(f"{path}: tensor {tensor.name!r} is {name}, which gguf-py cannot write (it quantises F32, "
                          "F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1): export into a GGUF whose table is one of "
                          f"those (llama-quantize --token-embedding-type q8_0), or quantise after the export") from None
    return np.ascontiguousarray(data).view(np.uint8).reshape(rows.shape[0], -1)


def _check_table(header: _Header, tensor: _Tensor, rows: ExportRows) -> None:
    if len(tensor.dims) != 2:
        raise ExportError(f"{header.path}: tensor {tensor.name!r} has dimensions {list(tensor.dims)}, not a table's "
                          "two")
    dim, vocab_size = tensor.dims
    trained = tuple(rows.table_shape) if rows.table_shape is not None else (None, rows.rows.shape[1])
    if trained[1] != dim or trained[0] not in (None, vocab_size):
        what = "x".join("?" if n is None else str(n) for n in trained)
        raise ExportError(f"{header.path}: tensor {tensor.name!r} is {vocab_size}x{dim}; the rows of {rows.source} "
                          f"were trained in a {what} table: another model")


def _end(data: bytearray, start: int) -> int:
    """Where the string whose bytes start at ``start`` (its u64 length just before) ends."""
    return start + struct.unpack_from("<Q", data, start - 8)[0]


def _text(data: bytearray, start: int) -> bytes:
    return bytes(data[start:_end(data, start)])


def _joined(data: bytearray, starts: array, end: int) -> bytes:
    """The strings at ``starts`` (a string array ending at ``end``) joined by NUL, as :func:`pieces_digest` reads a
    tokenizer: their length fields cut out in numpy (10⁵ slices in Python would cost a tenth of a second)."""
    if not starts:
        return b""
    first = starts[0] - 8
    region = np.frombuffer(data, dtype=np.uint8, count=end - first, offset=first).copy()
    fields = np.frombuffer(starts, dtype=np.int64) - 8 - first
    keep = np.ones(len(region), dtype=bool)
    for byte in range(1, 8):  # each length field but its first byte goes ...
        keep[fields + byte] = False
    region[fields] = 0  # ... and that byte becomes the separator
    return region[keep][1:].tobytes()


def _check_vocabulary(header: _Header, rows: ExportRows) -> list[bytes]:
    """The new texts, in plan order; :class:`ExportError` where the base's vocabulary is not the plan's."""
    path, plan, data = header.path, rows.plan, header.data
    for name in (TOKENS, TOKEN_TYPES):
        if name not in header.keys:
            raise ExportError(f"{path}: no key {name!r} (a GGUF without its tokenizer)")
    starts = header.token_starts
    if starts is None:
        raise ExportError(f"{path}: key {TOKENS!r} is not an array of strings")
    vocab_size = header.tensors[TABLE].dims[1]
    if len(starts) != vocab_size:
        raise ExportError(f"{path}: key {TOKENS!r} has {len(starts):,} tokens, tensor {TABLE!r} {vocab_size:,} rows")
    types = header.keys[TOKEN_TYPES]
    item, count = struct.unpack_from("<IQ", data, types.value)
    if item not in (4, 5) or count != vocab_size:  # llama.cpp reads the types as 32-bit integers
        raise ExportError(f"{path}: key {TOKEN_TYPES!r} is not {vocab_size:,} 32-bit integers")
    for e in plan.entries:
        if e.id >= vocab_size:
            raise ExportError(f"{path}: key {TOKENS!r} has {vocab_size:,} tokens, and the plan names id {e.id} (a row "
                              "beyond the tokenizer): such rows get no token in a GGUF")
        text = _text(data, starts[e.id]).decode("utf-8", "replace")
        if text != e.piece:
            what = "the term itself: exported already" if text == e.term else repr(text)
            raise ExportError(f"{path}: key {TOKENS!r}: id {e.id} is {what}, not the plan's free slot {e.piece!r}")
    texts = _joined(data, starts, header.keys[TOKENS].end)
    if plan.pieces_sha256 is not None and pieces_digest(texts) != plan.pieces_sha256:
        raise ExportError(f"{path}: key {TOKENS!r} is not the vocabulary of the tokenizer the rows were planned "
                          f"with (sha256 {plan.tokenizer_sha256[:12]}…): another model")
    new = [e.term.encode("utf-8") for e in plan.entries]
    clashes = []
    padded = b"\0" + texts + b"\0"
    for text in new:  # a substring search in C, where 10⁵ comparisons in Python would cost a tenth of a second
        at = padded.find(b"\0" + text + b"\0")
        if at >= 0:
            clashes.append((texts.count(b"\0", 0, at), text.decode("utf-8", "replace")))
    if clashes:
        raise ExportError(f"{path}: key {TOKENS!r} already has {clashes[:5]} (id, text): llama.cpp refuses a "
                          "vocabulary with two equal texts")
    return new


# ------------------------------------------------------------------------------------------------ writing

@contextlib.contextmanager
def _atomic_output(path: str) -> Iterator:
    """A file object for a temporary sibling of ``path``, renamed over it only when the block completes: an
    interrupted process leaves no partial file under either name. Not flushed to the disk first (as ``cp`` does not:
    a GGUF is gigabytes, and the rename is what makes the file appear)."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    mask = os.umask(0o022)
    os.umask(mask)
    os.fchmod(fd, 0o666 & ~mask)
    try:
        with os.fdopen(fd, "w+b") as f:
            yield f
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _copy_range(src: int, dst: int, offset: int, count: int, at: int, stop: threading.Event | None = None) -> None:
    """``count`` bytes of the file ``src`` from ``offset`` into the file ``dst`` at ``at`` (file descriptors), by the
    kernel where it can (``sendfile``, as ``shutil`` copies: no user memory, and a GGUF is gigabytes), else in
    blocks; 64 MiB a step, so that ``stop`` ends it early."""
    done, kernel = 0, hasattr(os, "sendfile")
    os.lseek(dst, at, os.SEEK_SET)
    while done < count and not (stop is not None and stop.is_set()):
        step = min(count - done, 64 << 20)
        n = 0
        if kernel:
            try:
                n = os.sendfile(dst, src, offset + done, step)
            except OSError:
                kernel = False  # a file system without it: copy by hand
        if n == 0:
            block = os.pread(src, min(step, 16 << 20), offset + done)
            if not block:
                raise ExportError(f"the base ended while its tensor data was copied (byte {offset + done:,})")
            n = os.pwrite(dst, block, at + done)
            os.lseek(dst, at + done + n, os.SEEK_SET)
        done += n


class _BackgroundCopy(threading.Thread):
    """:func:`_copy_range` in a thread (``sendfile`` releases the GIL): the base's bytes go to the new file while
    its header is parsed and checked. :meth:`finish` waits, and raises what the copy raised."""

    def __init__(self, src: int, dst: int, count: int, at: int):
        super().__init__(daemon=True)
        self.args_, self.stop, self.error = (src, dst, 0, count, at), threading.Event(), None

    def run(self) -> None:
        try:
            _copy_range(*self.args_, stop=self.stop)
        except BaseException as exc:  # handed to the caller's thread by finish()
            self.error = exc

    def finish(self, cancel: bool = False) -> None:
        if cancel:
            self.stop.set()
        self.join()
        if self.error is not None and not cancel:
            raise self.error


def _plan_record(plan: ReservedPlan) -> bytes:
    """The plan key's value: the terms, ids, replaced pieces and the tokenizer's hashes, as JSON."""
    return json.dumps(dict(format_version=1, tokenizer_sha256=plan.tokenizer_sha256, pieces_sha256=plan.pieces_sha256,
                           entries=[dict(term=e.term, id=e.id, piece=e.piece) for e in plan.entries]),
                      ensure_ascii=False).encode("utf-8")


def _shift(plan: ReservedPlan) -> int:
    """How far the base's bytes move in the new file: a whole number of pages at least as long as the header can
    grow (the renamed texts, the plan key), known before the base is read, so that the copy can start at once and
    run page-aligned on both sides (misaligned by the renaming, the kernel took 1.5x as long)."""
    growth = 8 + len(PLAN_KEY.encode("utf-8")) + 12 + len(_plan_record(plan))
    growth += sum(len(e.term.encode("utf-8")) - len(e.piece.encode("utf-8")) for e in plan.entries)
    return _aligned(max(growth, 1), mmap.PAGESIZE)


def _header_bytes(header: _Header, rows: ExportRows, new: list[bytes], shift: int) -> bytearray:
    """The new header: the counts, every key as it was but the token texts and types (and the plan key), every
    tensor record as it was; exactly ``shift`` bytes longer than the base's header and its padding (the plan's
    JSON ends in as many spaces as that takes), so that the tensor data follows it where the copy put it."""
    data, plan = header.data, rows.plan
    renamed = dict(zip(plan.ids, new, strict=True))
    out = bytearray(data[:16])  # magic, version, tensor count
    keys = [k for k in header.keys.values() if k.name != PLAN_KEY]
    out += struct.pack("<Q", len(keys) + 1)
    for key in keys:
        if key.name == TOKENS:
            tokens = bytearray(data[key.start:key.value + 12])
            pos = key.value + 12
            for token_id in sorted(renamed):
                start = header.token_starts[token_id]
                tokens += data[pos:start - 8] + struct.pack("<Q", len(renamed[token_id])) + renamed[token_id]
                pos = _end(data, start)
            tokens += data[pos:key.end]
            out += tokens
        elif key.name == TOKEN_TYPES:
            record = bytearray(data[key.start:key.end])
            first = key.value + 12 - key.start
            for token_id in plan.ids:
                struct.pack_into("<i", record, first + 4 * token_id, USER_DEFINED)
            out += record
        else:
            out += data[key.start:key.end]
    record = _plan_record(plan)
    name = PLAN_KEY.encode("utf-8")
    length = len(out) + 8 + len(name) + 12 + len(record) + header.tensors_end - header.keys_end
    record += b" " * (header.data_start + shift - length)  # never negative: _shift bounds the growth
    out += struct.pack("<Q", len(name)) + name + struct.pack("<IQ", _STRING, len(record)) + record
    out += data[header.keys_end:header.tensors_end]
    return out


def _warn_ollama_order(plan: ReservedPlan) -> None:
    late = [e.term for e in plan.entries if e.term.startswith(" ") and e.term[1:] in plan
            and plan[e.term[1:]].id < e.id]
    if late:
        warnings.warn(f"the spaced forms {late} have higher ids than their bare forms (a plan of an earlier release): "
                      "llama.cpp matches the longer form first, but Ollama splits on user-defined tokens in id order, "
                      "so there a space before the term becomes a token of its own. Re-plan to give the spaced forms "
                      "the lower ids.", UserWarning, stacklevel=3)


def _resolve_base(base: str | os.PathLike) -> str:
    base = os.fspath(base)
    if pretrained.is_named(base):
        return pretrained.gguf_file(base)
    return base


def _checked(base: str, export: ExportRows) -> tuple[_Header, list[tuple[_Tensor, np.ndarray]], list[bytes]]:
    """(the base's header, the (tensor, rows in its type) to write, the new texts): every check of the base."""
    header = _read_header(base)
    if TABLE not in header.tensors:
        raise ExportError(f"{base}: no tensor {TABLE!r} (not a language model's GGUF)")
    table = header.tensors[TABLE]
    _check_table(header, table, export)
    new = _check_vocabulary(header, export)
    writes = [(table, _quantised(export.rows, table, base))]
    if OUTPUT in header.tensors:  # an untied head: its own rows, or the table's where the rows were trained tied
        output = header.tensors[OUTPUT]
        _check_table(header, output, export)
        writes.append((output, _quantised(export.rows if export.head_rows is None else export.head_rows, output,
                                          base)))
    elif export.head_rows is not None:
        raise ExportError(f"{base}: no tensor {OUTPUT!r} (its head is tied to {TABLE!r}), but {export.source} has an "
                          "untied head's own rows: another model")
    return header, writes, new


def export_gguf(rows: str | os.PathLike | nn.Module | ExportRows, base: str | os.PathLike, out: str | os.PathLike, *,
                force: bool = False, log: Callable[[str], None] | None = None) -> str:
    """Copy the GGUF ``base`` to ``out`` with the trained rows and their tokens written in; returns ``out``.

    Args:
        rows: a folder :func:`~reserved_kernels.save_reserved`, :func:`~reserved_kernels.save_pretrained` or the
            main job wrote (the rows, ``reserved_plan.json``), a model patched with a
            :class:`~reserved_kernels.ReservedVocab`, or an :class:`ExportRows` read from either.
        base: the user's GGUF of the same model, or a named checkpoint (``"gemma-3-270m"``: its package's file).
        out: the new file. Each planned slot's token becomes its term (the spaced form with a literal space),
            typed USER_DEFINED, so llama.cpp and Ollama split it out of plain text and print it back; the K rows
            are written into ``token_embd.weight`` (and an untied ``output.weight``) in the tensor's own type; the
            key ``reserved_kernels.plan`` records the terms, ids and the tokenizer's hash. Everything else is
            byte-identical to ``base``.
        force: replace an existing ``out``.

    Raises :class:`ExportError` (a ``ValueError``) naming the file and the key, and writes nothing, for: rows whose
    table shape or tokenizer is not the base's, slots that are not the plan's free pieces, an ``out`` that exists
    (without ``force``) or is the base, a table type gguf-py cannot write, an unreadable or truncated file. The
    file is written to a temporary sibling and renamed into place when complete.
    """
    export = rows if isinstance(rows, ExportRows) else (
        ExportRows.from_model(rows) if isinstance(rows, nn.Module) else ExportRows.from_folder(os.fspath(rows)))
    base, out = _resolve_base(base), os.fspath(out)
    if os.path.isdir(out):
        raise ExportError(f"{out}: is a folder; give the new GGUF file's path")
    if os.path.exists(out) and os.path.exists(base) and os.path.samefile(out, base):
        raise ExportError(f"{out}: is the base file itself; write the export to a new file")
    if os.path.exists(out) and not force:
        raise ExportError(f"{out}: exists (pass force=True, or --force, to replace it)")
    # The base goes to the new file whole, `shift` bytes on, while its header is read and checked; the new header
    # then overwrites the base's, and the planned rows their rows.
    shift = _shift(export.plan)
    try:
        src = open(base, "rb")
    except OSError as exc:
        raise ExportError(f"{base}: cannot be read ({exc.strerror})") from None
    with src, _atomic_output(out) as dst:
        copy = _BackgroundCopy(src.fileno(), dst.fileno(), os.fstat(src.fileno()).st_size, shift)
        copy.start()
        try:
            header, writes, new = _checked(base, export)
        except BaseException:
            copy.finish(cancel=True)
            raise
        copy.finish()
        if shift % header.alignment:  # an alignment beyond a page: the data must move by a multiple of it
            shift = _aligned(shift, header.alignment)
            _copy_range(src.fileno(), dst.fileno(), 0, header.size, shift)
        _warn_ollama_order(export.plan)
        if log is not None:
            log(f"writing {out}: {len(export.plan)} tokens renamed, {len(export.plan)} rows of "
                f"{' and '.join(f'{t.name} ({_type_name(t.ggml_type)})' for t, _ in writes)}")
        start = header.data_start + shift
        os.pwrite(dst.fileno(), _header_bytes(header, export, new, shift), 0)
        for tensor, data in writes:
            row_bytes = data.shape[1]
            for k, token_id in enumerate(export.plan.ids):
                os.pwrite(dst.fileno(), data[k].tobytes(), start + tensor.offset + token_id * row_bytes)
    return out

