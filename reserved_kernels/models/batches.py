"""What every loss over a causal LM's batch reads the same way: the batch's parts, its next-token targets, and the
soft-cap the model's config asks for."""

from __future__ import annotations

from collections.abc import Mapping

import torch.nn.functional as TF
from torch import Tensor, nn

from reserved_kernels.models.layout import base_model


def batch_parts(batch, index: int) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(input_ids, attention_mask, labels) of batch number ``index``: an ``input_ids`` tensor (B, T), or a dict with
    ``input_ids`` and optionally ``attention_mask`` and ``labels`` (unshifted), as a DataLoader gives them. A
    ``TypeError`` or ``ValueError`` naming the batch for anything else, or for parts of different shapes."""
    if isinstance(batch, Tensor):
        ids, mask, labels = batch, None, None
    elif isinstance(batch, Mapping) and "input_ids" in batch:
        ids, mask, labels = batch["input_ids"], batch.get("attention_mask"), batch.get("labels")
    else:
        raise TypeError(f"batch {index}: expected an input_ids tensor or a dict with 'input_ids', got "
                        f"{type(batch).__name__}")
    if ids.dim() != 2:
        raise ValueError(f"batch {index}: input_ids must be (batch, length), got shape {tuple(ids.shape)}")
    for name, t in (("attention_mask", mask), ("labels", labels)):
        if t is not None and t.shape != ids.shape:
            raise ValueError(f"batch {index}: {name} has shape {tuple(t.shape)}, input_ids {tuple(ids.shape)}")
    return ids, mask, labels


def default_labels(input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
    """The labels transformers' causal LMs take when a batch has none: the ids, -100 where masked."""
    return input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, -100)


def shifted_targets(labels: Tensor, ignore_index: int = -100) -> Tensor:
    """The next-token targets in the batch's (B, T) layout: position t predicts label t + 1, the last nothing."""
    return TF.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def config_softcap(model: nn.Module) -> float | None:
    """The final-logit soft-cap the model's config asks for (Gemma 2's), or None."""
    return getattr(getattr(base_model(model), "config", None), "final_logit_softcapping", None)
