"""Keep a patched model's trained rows: :func:`save_reserved` (a PEFT trainable-tokens adapter of K rows),
:func:`save_pretrained` (a plain checkpoint with its planned tokenizer) and :func:`load_reserved` (either, read back
exactly). The adapter format itself is :mod:`.adapter`; the GGUF export, :mod:`.gguf`."""

from __future__ import annotations

import os

import torch
from torch import nn

from reserved_kernels.models.artifacts.adapter import is_adapter_folder, read_adapter, write_adapter
from reserved_kernels.models.artifacts.rows import ReservedRows
from reserved_kernels.models.layout import base_model, input_embedding, output_head
from reserved_kernels.models.patch import patch_model, patched_embedding
from reserved_kernels.models.state import patch_state
from reserved_kernels.modules.embedding import ReservedEmbedding
from reserved_kernels.modules.lm_head import ReservedLMHead
from reserved_kernels.vocab.planning import ReservedPlan, ReservedVocab

ARTIFACT_FORMAT_VERSION = 1  # the .pt files of earlier releases, read by load_reserved


def save_pretrained(model: nn.Module, folder: str | os.PathLike, vocab: ReservedVocab | None = None,
                    **kwargs) -> str:
    """A checkpoint that loads as a plain model *with its tokenizer*, in one call; returns the folder.

    ``model.save_pretrained(folder, **kwargs)`` (the vanilla layout, rows merged, plus the fp32 master rows
    that :func:`load_reserved` reads), then the planned tokenizer beside it (:meth:`ReservedVocab.save`:
    ``tokenizer.json``, ``tokenizer_config.json`` and ``reserved_plan.json``, and ``tokenizer.model`` for a
    SentencePiece plan). Afterwards ``AutoTokenizer.from_pretrained(folder)`` makes each planned term one
    token and ``AutoModelForCausalLM.from_pretrained(folder)`` gives the trained rows. ``vocab`` defaults to
    the :class:`ReservedVocab` the model was patched with; a model patched with bare ids or a plan needs it.
    """
    patched_embedding(model)  # raises unless the model is patched
    vocab = vocab if vocab is not None else patch_state(model).vocab
    if not isinstance(vocab, ReservedVocab):
        raise ValueError("save_pretrained needs the ReservedVocab whose tokenizer to write: the model was patched "
                         "with ids or a plan, so pass vocab=")
    if not hasattr(model, "save_pretrained"):
        raise TypeError(f"{type(model).__name__} has no save_pretrained (a Hugging Face model does); "
                        "use save_reserved for the rows alone")
    folder = os.fspath(folder)
    model.save_pretrained(folder, **kwargs)
    vocab.save(folder)
    return folder


def save_reserved(model: nn.Module, folder: str | os.PathLike,
                  plan: ReservedPlan | ReservedVocab | None = None) -> str:
    """Store only the K×D trained rows as a PEFT trainable-tokens adapter folder; returns the folder.

    ``adapter_config.json`` and ``adapter_model.safetensors`` (:mod:`reserved_kernels.models.artifacts.adapter`):
    ``peft.PeftModel.from_pretrained(base, folder)`` gives the trained model without reserved_kernels, and
    :func:`load_reserved` reads it back exactly (float32 master rows of a 16-bit table are kept, to resume).
    Beside them the plan (``plan``, by default the vocab the model was patched with) and, for a
    :class:`ReservedVocab`, its planned tokenizer. Safetensors and JSON only: no pickle. Written atomically.
    """
    patched_embedding(model)
    folder = os.fspath(folder)
    if folder.endswith(".pt") or os.path.isfile(folder):
        raise ValueError("save_reserved writes a folder (a PEFT adapter in safetensors), "
                         f"got the file path {folder!r}; "
                         "the .pt format is read by load_reserved, no longer written")
    if plan is None:
        plan = patch_state(model).vocab
    vocab = plan if isinstance(plan, ReservedVocab) else None
    write_adapter(model, folder, plan=plan.plan if vocab is not None else plan, vocab=vocab)
    return folder


def _rows_from_checkpoint(folder: str, embedding_name: str, head_name: str | None) -> ReservedRows:
    """The rows a patched model's ``save_pretrained`` (or a Trainer checkpoint) wrote, read alone, exactly."""
    from safetensors import safe_open

    wanted = {f"{embedding_name}.reserved_ids": "ids", f"{embedding_name}.reserved_weight": "rows",
              f"{head_name}.reserved_weight": "head_rows"}
    found: dict = {}
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    for name in files:
        with safe_open(os.path.join(folder, name), framework="pt") as f:
            for key in set(f.keys()) & set(wanted):
                found[wanted[key]] = f.get_tensor(key)
    if "ids" not in found or "rows" not in found:
        raise ValueError(f"{folder} holds no reserved rows under {embedding_name!r} (safetensors files: {files})")
    return ReservedRows(ids=found["ids"].tolist(), rows=found["rows"], head_rows=found.get("head_rows"), plan=None,
                        table_shape=None, source=folder)


def _rows_from_file(path: str) -> ReservedRows:
    """The rows of a ``.pt`` file of earlier releases (tensors and plain values only: ``weights_only``)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format_version") != ARTIFACT_FORMAT_VERSION:
        raise ValueError(f"{path} is not a reserved-rows file of format {ARTIFACT_FORMAT_VERSION}")
    plan = ReservedPlan.from_json(state["plan"])[0] if state.get("plan") is not None else None
    return ReservedRows(ids=state["reserved_ids"].tolist(), rows=state["reserved_weight"],
                        head_rows=state.get("head_reserved_weight"), plan=plan,
                        table_shape=(state["num_embeddings"], state["embedding_dim"]), source=path)


def _read_rows(path: str, model: nn.Module, vocab: ReservedVocab | None) -> ReservedRows:
    if is_adapter_folder(path):
        return read_adapter(path, model, vocab)
    if os.path.isdir(path):
        names = {id(m): n for n, m in base_model(model).named_modules()}
        head = output_head(model)
        return _rows_from_checkpoint(path, names[id(input_embedding(model))],
                                     names.get(id(head)) if head is not None else None)
    return _rows_from_file(path)


@torch.no_grad()
def load_reserved(model: nn.Module, path: str | os.PathLike, *, vocab: ReservedVocab | None = None,
                  **patch_kwargs) -> ReservedPlan | None:
    """Re-apply trained rows, patching ``model`` first if needed; returns the plan (if the file has one).

    ``path`` is a PEFT trainable-tokens adapter folder (written by :func:`save_reserved`, or by PEFT: see
    :func:`reserved_kernels.models.artifacts.adapter.read_adapter` for its checks), a folder written by a patched
    model's ``save_pretrained`` (or a ``Trainer`` checkpoint), or a ``.pt`` file of earlier releases; the rows are read
    exactly as trained. The table must match; a patched model must have the same reserved ids. An adapter is
    checked against ``vocab`` (by default the one the model was patched with): written for another tokenizer, it
    is refused; with ids that are not its reserved slots, it loads with a warning. Nothing is changed when a
    check fails.
    """
    path = os.fspath(path)
    found = _read_rows(path, model, vocab)
    embedding = input_embedding(model)
    shape = (embedding.weight.shape[0], embedding.weight.shape[1])
    if found.table_shape is not None and tuple(found.table_shape) != shape:
        raise ValueError(f"{path} holds rows for a {found.table_shape[0]}x{found.table_shape[1]} table; "
                         f"this model's is {shape[0]}x{shape[1]}")
    if found.rows.shape[1] != shape[1]:
        raise ValueError(f"{path} holds rows of width {found.rows.shape[1]}; this model's table has {shape[1]}")
    if isinstance(embedding, ReservedEmbedding):
        if embedding.reserved_ids.tolist() != found.ids:
            raise ValueError(f"the model is patched for other reserved ids than {path}'s")
    else:
        patch_model(model, found.ids, reserved_dtype=found.rows.dtype, **patch_kwargs)
        embedding = patched_embedding(model)
    embedding.reserved_weight.copy_(found.rows)
    head = output_head(model)
    if found.head_rows is not None and isinstance(head, ReservedLMHead) and head.tied is None:
        head.reserved_weight.copy_(found.head_rows)
    return found.plan
