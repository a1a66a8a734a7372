"""Held-out perplexity: the usual check that new tokens did not harm the rest of the model."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _logits(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
    from reserved_kernels.models.gemma_pytorch import causal_lm_logits, is_gemma_pytorch

    if is_gemma_pytorch(model):  # its own forward samples one token; score every position instead
        return causal_lm_logits(model, input_ids)
    out = model(input_ids=input_ids, attention_mask=attention_mask)
    return out.logits if hasattr(out, "logits") else out


@torch.no_grad()
def perplexity(model: nn.Module, batches: Iterable[Tensor | Mapping[str, Tensor]]) -> float:
    """exp(mean next-token negative log-likelihood) over every predicted, unmasked token.

    ``batches`` yields (B, T) ``input_ids`` tensors or dicts with ``input_ids`` and optionally
    ``attention_mask``. Works for Hugging Face causal LMs (and PEFT models around them) and for
    gemma_pytorch-layout models (through :func:`~reserved_kernels.models.causal_lm_logits`). The model is
    put in eval mode for the call and restored afterwards.
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in batches:
            ids = batch if isinstance(batch, Tensor) else batch["input_ids"]
            mask = None if isinstance(batch, Tensor) else batch.get("attention_mask")
            logits = _logits(model, ids, mask)[:, :-1].float()
            targets = ids[:, 1:]
            if mask is not None:
                targets = targets.masked_fill(mask[:, 1:] == 0, -100)
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                                     reduction="sum").item()
            count += int((targets != -100).sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("no tokens to score: every batch was empty or fully masked")
    return math.exp(total / count)


def perplexity_change(model: nn.Module, batches: Iterable, train: Callable[[], object]) -> dict[str, float]:
    """Held-out perplexity before and after ``train()``: ``{"before", "after", "ratio"}``."""
    batches = list(batches)
    before = perplexity(model, batches)
    train()
    after = perplexity(model, batches)
    return dict(before=before, after=after, ratio=after / before)
