"""The two tokenizer formats planning reads and writes: a SentencePiece ``.model`` and a Hugging Face
``tokenizer.json``.

Each backend answers the same few questions (pieces, which ids are special, encode with the
original, write a copy with some pieces renamed, check that terms encode to their single ids, encode and
decode with a renamed copy), so the planning logic in ``planning.py`` is written once.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import NamedTuple, Protocol

# The never-trained slots each family ships, numbered: Gemma's <unusedN>, Llama 3's reserved special tokens.
RESERVED_PIECES = {"gemma": re.compile(r"^<unused(\d+)>$"),
                   "llama3": re.compile(r"^<\|reserved_special_token_(\d+)\|>$")}
BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


class Codec(NamedTuple):
    """A parsed tokenizer file: ``encode(text) -> ids`` (no BOS) and ``decode(ids) -> text``."""

    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]


class TokenizerBackend(Protocol):
    """What planning asks of a tokenizer file, whatever its format (:func:`open_backend` picks one)."""

    kind: str  # "sentencepiece" or "tokenizer.json"
    filename: str  # the file name a saved plan writes

    def pieces(self) -> list[str]: ...

    def special_ids(self) -> set[int]: ...

    def encode(self, text: str) -> list[int]: ...

    def piece_for(self, term: str) -> str:
        """The piece a renamed slot gets for ``term`` (how the file spells its text)."""
        ...

    def renamed(self, renames: dict[int, str]) -> bytes: ...

    def codec(self, data: bytes) -> Codec: ...


class SentencePieceBackend:
    """A SentencePiece model: renamed pieces become USER_DEFINED symbols, matched wherever they occur."""

    kind = "sentencepiece"
    filename = "tokenizer.model"

    def __init__(self, data: bytes):
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2 as pb

        self._spm, self._pb = spm, pb
        self.proto = pb.ModelProto()
        self.proto.ParseFromString(data)
        self.processor = spm.SentencePieceProcessor(model_proto=data)
        self._escape = self.proto.normalizer_spec.escape_whitespaces

    def pieces(self) -> list[str]:
        return [p.piece for p in self.proto.pieces]

    def special_ids(self) -> set[int]:
        t = self._pb.ModelProto.SentencePiece
        return {i for i, p in enumerate(self.proto.pieces) if p.type in (t.CONTROL, t.UNKNOWN, t.BYTE, t.UNUSED)}

    def encode(self, text: str) -> list[int]:
        return list(self.processor.encode(text))

    def piece_for(self, term: str) -> str:
        # With escape_whitespaces the text's spaces reach the matcher as "▁": the piece must say the same.
        return term.replace(" ", "\u2581") if self._escape else term

    def renamed(self, renames: dict[int, str]) -> bytes:
        proto = self._pb.ModelProto()
        proto.CopyFrom(self.proto)
        for token_id, term in renames.items():
            piece = proto.pieces[token_id]
            piece.piece = self.piece_for(term)
            piece.type = self._pb.ModelProto.SentencePiece.USER_DEFINED
            piece.score = 0.0
        return proto.SerializeToString()

    def codec(self, data: bytes) -> Codec:
        """The model in ``data`` parsed (ValueError if SentencePiece rejects it)."""
        try:
            processor = self._spm.SentencePieceProcessor(model_proto=data)
        except RuntimeError as exc:
            raise ValueError(f"SentencePiece rejects the model: {exc}") from exc
        return Codec(lambda text: list(processor.encode(text)), lambda ids: processor.decode(list(ids)))


class HFTokenizerBackend:
    """A Hugging Face fast tokenizer (``tokenizer.json``): renamed slots become non-special added tokens."""

    kind = "tokenizer.json"
    filename = "tokenizer.json"

    def __init__(self, data: bytes):
        from tokenizers import Tokenizer

        self._tokenizer_cls = Tokenizer
        self.spec = json.loads(data)
        self.tokenizer = Tokenizer.from_str(data.decode("utf-8"))
        size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        vocab = self.tokenizer.get_vocab(with_added_tokens=True)
        self._pieces = [""] * size
        for piece, token_id in vocab.items():
            self._pieces[token_id] = piece

    def pieces(self) -> list[str]:
        return list(self._pieces)

    def special_ids(self) -> set[int]:
        special = {t["id"] for t in self.spec.get("added_tokens", []) if t.get("special")}
        special |= {i for i, p in enumerate(self._pieces) if BYTE_PIECE.match(p)}
        unk = self.spec.get("model", {}).get("unk_token")
        if unk is not None and unk in self.tokenizer.get_vocab():
            special.add(self.tokenizer.token_to_id(unk))
        return special

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def piece_for(self, term: str) -> str:
        # An added token is matched on the raw text, and named by it.
        return term

    def renamed(self, renames: dict[int, str]) -> bytes:
        """The file with each ``id -> term`` renamed; ids past the tokenizer (a model's spare rows) become new
        added tokens, which the tokenizers library numbers in order from the tokenizer's size."""
        # Copies of only what changes (the vocabulary and the added tokens): a deep copy of a 262,144-piece
        # file costs seconds.
        spec = dict(self.spec)
        spec["added_tokens"] = [dict(t) for t in spec.get("added_tokens", [])]
        added = {t["id"]: t for t in spec["added_tokens"]}
        model = spec["model"] = dict(spec.get("model", {}))
        vocab = model.get("vocab")
        if isinstance(vocab, dict):
            vocab = model["vocab"] = dict(vocab)
        elif isinstance(vocab, list):
            vocab = model["vocab"] = list(vocab)
        for token_id, term in sorted(renames.items()):
            old = self._pieces[token_id] if token_id < len(self._pieces) else None
            if isinstance(vocab, dict) and old in vocab:  # BPE / WordPiece: piece -> id
                vocab.pop(old)
                vocab[term] = token_id
            elif isinstance(vocab, list) and token_id < len(vocab):  # Unigram: [piece, score] at position id
                vocab[token_id] = [term, 0.0]
            entry = added.get(token_id)
            if entry is None:
                entry = {"id": token_id}
                spec["added_tokens"].append(entry)
            entry.update(content=term, single_word=False, lstrip=False, rstrip=False, normalized=False,
                         special=False)
        spec["added_tokens"].sort(key=lambda t: t["id"])
        return json.dumps(spec, ensure_ascii=False).encode("utf-8")

    def codec(self, data: bytes) -> Codec:
        """The file in ``data`` parsed (ValueError if the tokenizers library rejects it); a 262,144-piece
        tokenizer.json takes seconds to parse, so planning parses each renamed file once."""
        try:
            tok = self._tokenizer_cls.from_str(data.decode("utf-8"))
        except Exception as exc:  # tokenizers raises a bare Exception subclass from Rust
            raise ValueError(f"the tokenizers library rejects the file: {exc}") from exc
        return Codec(lambda text: tok.encode(text, add_special_tokens=False).ids,
                     lambda ids: tok.decode(list(ids), skip_special_tokens=False))


def open_backend(data: bytes, path: str) -> TokenizerBackend:
    """Pick the backend from the file's content (JSON or a SentencePiece protobuf)."""
    if data.lstrip()[:1] == b"{":
        return HFTokenizerBackend(data)
    try:
        return SentencePieceBackend(data)
    except Exception as exc:  # protobuf's DecodeError, sentencepiece's RuntimeError
        raise ValueError(f"{path} is neither a SentencePiece model nor a tokenizer.json: {exc}") from exc
