"""The files ``AutoTokenizer.from_pretrained(folder)`` reads, for a renamed tokenizer.

A folder with only a renamed ``tokenizer.model`` loads as a generic tokenizer without BOS, and the
conversion turns every renamed piece into a special token that matches ``▁``-joined text only. So a
saved plan also gets ``tokenizer.json`` and ``tokenizer_config.json``: transformers' own conversion of
the *original* SentencePiece model (the tokenizer a Gemma checkpoint ships), with BOS added as Gemma's
tokenizer adds it, and each planned slot renamed the way a ``tokenizer.json`` plan renames it — an added
token whose content is the term, matched on the raw text, not special. Written only when transformers
is installed (it makes the conversion).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping

# Keys transformers writes that describe the machine it loaded on, not the tokenizer.
_LOAD_TIME_KEYS = ("vocab_file", "is_local", "local_files_only", "name_or_path")
_SPECIAL_LISTS = ("extra_special_tokens", "additional_special_tokens")


def renamed_config(config: dict, renames: Mapping[int, str], old_pieces: Mapping[int, str]) -> dict:
    """A ``tokenizer_config.json`` for the renamed tokenizer: planned slots are plain tokens named by their terms."""
    config = {k: v for k, v in config.items() if k not in _LOAD_TIME_KEYS}
    old = {old_pieces[i] for i in renames}
    for key in _SPECIAL_LISTS:
        if isinstance(config.get(key), list):
            config[key] = [t for t in config[key] if (t.get("content") if isinstance(t, dict) else t) not in old]
    decoder = config.get("added_tokens_decoder")
    if isinstance(decoder, dict):
        for token_id, term in renames.items():
            entry = decoder.get(str(token_id))
            if isinstance(entry, dict):
                entry.update(content=term, special=False, normalized=False, lstrip=False, rstrip=False)
    return config


def transformers_files(sp_model: bytes, renames: Mapping[int, str], old_pieces: Mapping[int, str],
                       tokenizer_class: str = "GemmaTokenizer") -> dict[str, bytes]:
    """``{"tokenizer.json": …, "tokenizer_config.json": …}`` for ``sp_model`` with ``renames`` applied; {} without
    transformers."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        return {}
    from reserved_kernels.vocab.backends import HFTokenizerBackend

    with tempfile.TemporaryDirectory() as tmp:
        src, out = os.path.join(tmp, "src"), os.path.join(tmp, "out")
        os.makedirs(src)
        with open(os.path.join(src, "tokenizer.model"), "wb") as f:
            f.write(sp_model)
        with open(os.path.join(src, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(dict(tokenizer_class=tokenizer_class, add_bos_token=True, add_eos_token=False), f)
        AutoTokenizer.from_pretrained(src).save_pretrained(out)
        with open(os.path.join(out, "tokenizer.json"), "rb") as f:
            tokenizer_json = f.read()
        with open(os.path.join(out, "tokenizer_config.json"), encoding="utf-8") as f:
            config = json.load(f)
    config = renamed_config(config, renames, old_pieces)
    return {"tokenizer.json": HFTokenizerBackend(tokenizer_json).renamed(dict(renames)),
            "tokenizer_config.json": json.dumps(config, ensure_ascii=False, indent=2).encode("utf-8")}
