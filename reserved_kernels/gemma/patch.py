"""Swap a Gemma model's embedding and tied head for the reserved-row modules, and back."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from reserved_kernels._io import atomic_write_many
from reserved_kernels.modules.embedding import ReservedEmbedding
from reserved_kernels.modules.lm_head import ReservedLMHead
from reserved_kernels.vocab.planning import ReservedPlan, ReservedVocab

ARTIFACT_FORMAT_VERSION = 1
INIT_CHOICES = (None, "description", "mean", "copy")


def _input_embedding(model: nn.Module) -> nn.Module:
    if hasattr(model, "get_input_embeddings"):  # Hugging Face
        return model.get_input_embeddings()
    if isinstance(getattr(getattr(model, "embedder", None), "weight", None), Tensor):  # gemma_pytorch
        return model.embedder
    raise TypeError(f"{type(model).__name__} has neither get_input_embeddings() (Hugging Face) nor an "
                    "`embedder` with a weight (gemma_pytorch)")


def _set_input_embedding(model: nn.Module, module: nn.Module) -> None:
    if hasattr(model, "set_input_embeddings"):
        model.set_input_embeddings(module)
    else:
        model.embedder = module


def _output_head(model: nn.Module) -> nn.Module | None:
    return model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None


def _reserved_ids(reserved) -> tuple[list[int], ReservedPlan | None]:
    if isinstance(reserved, ReservedVocab):
        reserved = reserved.plan
    if isinstance(reserved, ReservedPlan):
        if not reserved.entries:
            raise ValueError("the plan has no entries: assign terms before patching")
        return reserved.ids, reserved
    return [int(i) for i in torch.as_tensor(reserved).reshape(-1).tolist()], None


def patch_model(model: nn.Module, reserved: Sequence[int] | Tensor | ReservedPlan | ReservedVocab, *,
                init: str | None = None, noise_std: float = 0.0, generator: torch.Generator | None = None,
                copy_from: int | None = None, exclude: Sequence[int] | None = None, train_others: bool = False,
                ) -> nn.Module:
    """Make only the rows ``reserved`` of ``model``'s embedding (and tied output head) trainable.

    Works on Hugging Face ``GemmaForCausalLM`` / ``Gemma2ForCausalLM`` / ``Gemma3ForCausalLM``
    (a scaled-embedding module in newer releases, the √D scale in the model's forward in older
    ones: both are kept exactly) and on gemma_pytorch-style models with an ``embedder`` (int8 with
    ``weight_scaler`` too; the fused gather dequantises only the rows it reads). Untrained, the
    patched model's logits are bit-identical to the original's. No V×D copy is made.

    Args:
        reserved: reserved ids, or a plan (``ReservedPlan`` / ``ReservedVocab``) whose ids are used.
        init: how to initialise the reserved rows, through the batched mean-init op on the raw rows:
            ``None`` (keep them), ``"description"`` (mean of each term's description sub-tokens; needs
            a plan), ``"mean"`` (mean of all rows except ``exclude`` and the reserved ids), ``"copy"``
            (row ``copy_from``). ``noise_std`` / ``generator`` add Gaussian noise.
        train_others: keep other parameters' ``requires_grad`` (e.g. to combine with LoRA); by
            default every other parameter is frozen.

    gemma_pytorch's sampler reads ``embedder.weight`` directly, so there only the input side is
    patched: its output logits use the frozen rows until :func:`merge`.
    """
    if init not in INIT_CHOICES:
        raise ValueError(f"init must be one of {INIT_CHOICES}, got {init!r}")
    ids, plan = _reserved_ids(reserved)
    embedding = _input_embedding(model)
    if isinstance(embedding, ReservedEmbedding):
        raise ValueError("the model is already patched; merge() it first")
    # Newer transformers keep the √D scale in the module (an fp32 buffer rounded to the table
    # dtype in forward); older ones and gemma_pytorch apply it in the model's forward.
    scale = float(embedding.embed_scale) if isinstance(getattr(embedding, "embed_scale", None), Tensor) else None
    head = _output_head(model)
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    new_embedding = ReservedEmbedding.from_embedding(embedding, ids, scale=scale)
    new_head = None
    if isinstance(head, nn.Linear):
        if head.weight is embedding.weight:
            new_head = ReservedLMHead.tied_to(new_embedding)
        else:
            new_head = ReservedLMHead.from_linear(head, ids)
    _initialise(new_embedding, new_head, init, plan, noise_std, generator, copy_from, exclude)
    # Kept outside the module tree (a plain dict), so state_dict and .parameters() do not see them.
    new_embedding._patch_record = dict(embedding=embedding, head=head, requires_grad=requires_grad)
    _set_input_embedding(model, new_embedding)
    if new_head is not None:
        model.set_output_embeddings(new_head)
    if not train_others:
        for p in model.parameters():
            p.requires_grad_(False)
    for module in (new_embedding, new_head):
        if module is not None:
            module.weight.requires_grad_(False)
            module.reserved_weight.requires_grad_(True)
    return model


def _initialise(embedding: ReservedEmbedding, head: ReservedLMHead | None, init, plan, noise_std, generator,
                copy_from, exclude) -> None:
    if init is None:
        return
    if init == "description":
        if plan is None:
            raise ValueError('init="description" needs a plan (ReservedPlan or ReservedVocab), not bare ids')
        sources, targets = plan.sources_csr(), plan.ids
    elif init == "mean":
        skip = set(embedding.reserved_ids.tolist()) | set(exclude or ())
        sources, targets = [[i for i in range(embedding.num_embeddings) if i not in skip]], None
    else:
        if copy_from is None:
            raise ValueError('init="copy" needs copy_from=<row id>')
        sources, targets = [[int(copy_from)]], None
    embedding.init_reserved_(sources, targets=targets, noise_std=noise_std, generator=generator)
    if head is not None and head.reserved_weight is not embedding.reserved_weight:
        # An untied head starts its reserved rows from the same means (drawn without extra noise).
        with torch.no_grad():
            head.reserved_weight.copy_(embedding.reserved_weight.to(head.reserved_weight.dtype))


def _patched_embedding(model: nn.Module) -> ReservedEmbedding:
    embedding = _input_embedding(model)
    if not isinstance(embedding, ReservedEmbedding):
        raise ValueError("the model is not patched (its input embedding is not a ReservedEmbedding)")
    return embedding


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """Write the trained rows into the tables and put the original (vanilla) modules back.

    The result's state dict loads into an unpatched model and gives identical logits. Each
    parameter's ``requires_grad`` is restored to what it was before :func:`patch_model`.
    """
    embedding = _patched_embedding(model)
    record = embedding._patch_record
    head = _output_head(model)
    embedding.merge_()  # in place, into the storage the original module shares
    original = record["embedding"]
    original.weight = nn.Parameter(embedding.weight.detach(), requires_grad=False)
    original.to(embedding.weight.device)
    _set_input_embedding(model, original)
    if isinstance(head, ReservedLMHead):
        original_head = record["head"]
        if head.weight is embedding.weight:
            original_head.weight = original.weight  # tied again
        else:
            head.merge_()
            original_head.weight = nn.Parameter(head.weight.detach(), requires_grad=False)
        original_head.to(embedding.weight.device)
        model.set_output_embeddings(original_head)
    for name, p in model.named_parameters():
        p.requires_grad_(record["requires_grad"].get(name, p.requires_grad))
    return model


def save_reserved(model: nn.Module, path: str | os.PathLike, plan: ReservedPlan | ReservedVocab | None = None) -> None:
    """Store only the K×D trained rows (and the plan): a file of kilobytes, like an adapter. Written atomically."""
    embedding = _patched_embedding(model)
    head = _output_head(model)
    untied = isinstance(head, ReservedLMHead) and head.reserved_weight is not embedding.reserved_weight
    if isinstance(plan, ReservedVocab):
        plan = plan.plan
    state = dict(format_version=ARTIFACT_FORMAT_VERSION, num_embeddings=embedding.num_embeddings,
                 embedding_dim=embedding.embedding_dim, reserved_ids=embedding.reserved_ids.cpu(),
                 reserved_weight=embedding.reserved_weight.detach().cpu(),
                 head_reserved_weight=head.reserved_weight.detach().cpu() if untied else None,
                 plan=plan.to_json() if plan is not None else None)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_many({os.fspath(path): buffer.getvalue()})


@torch.no_grad()
def load_reserved(model: nn.Module, path: str | os.PathLike, **patch_kwargs) -> ReservedPlan | None:
    """Re-apply rows stored by :func:`save_reserved`, patching ``model`` first if needed; returns the plan.

    The stored vocabulary size and width must match the model's; a patched model must have the
    same reserved ids. Nothing is changed when a check fails.
    """
    state = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format_version") != ARTIFACT_FORMAT_VERSION:
        raise ValueError(f"{path} is not a reserved-rows file of format {ARTIFACT_FORMAT_VERSION}")
    embedding = _input_embedding(model)
    shape = (embedding.weight.shape[0], embedding.weight.shape[1])
    if (state["num_embeddings"], state["embedding_dim"]) != shape:
        raise ValueError(f"{path} holds rows for a {state['num_embeddings']}x{state['embedding_dim']} table; "
                         f"this model's is {shape[0]}x{shape[1]}")
    ids = state["reserved_ids"].tolist()
    if isinstance(embedding, ReservedEmbedding):
        if embedding.reserved_ids.tolist() != ids:
            raise ValueError(f"the model is patched for other reserved ids than {path}'s")
    else:
        patch_model(model, ids, **patch_kwargs)
        embedding = _patched_embedding(model)
    embedding.reserved_weight.copy_(state["reserved_weight"])
    head = _output_head(model)
    if state["head_reserved_weight"] is not None and isinstance(head, ReservedLMHead):
        head.reserved_weight.copy_(state["head_reserved_weight"])
    return ReservedPlan.from_json(state["plan"])[0] if state["plan"] is not None else None
