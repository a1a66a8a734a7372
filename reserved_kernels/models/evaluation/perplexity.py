"""Held-out perplexity: the usual check that new tokens did not harm the rest of the model."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from reserved_kernels.models.batches import batch_parts, default_labels
from reserved_kernels.models.integrations.gemma_pytorch import causal_lm_loss
from reserved_kernels.models.layout import is_gemma_pytorch
from reserved_kernels.models.state import patch_state


def _summed_nll(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None, labels: Tensor | None) -> Tensor:
    """The summed next-token negative log-likelihood of one batch, through the model's loss path.

    A patched model's loss goes through the fused linear cross-entropy (``return_logits=False``): no
    (B, T, V) logits. An unpatched Hugging Face model computes its own (``num_items_in_batch=1`` turns its
    mean into the sum); a gemma_pytorch-layout model goes through ``causal_lm_loss``.
    """
    if is_gemma_pytorch(model):  # its own forward samples one token; score every position instead
        if labels is not None:
            raise ValueError("labels are not supported for gemma_pytorch-layout models; pass attention_mask")
        return causal_lm_loss(model, input_ids, attention_mask, reduction="sum")
    if labels is None:
        labels = default_labels(input_ids, attention_mask)
    state = patch_state(model)
    fused = {"return_logits": False} if state is not None and state.forward is not None else {}
    return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, num_items_in_batch=1,
                 **fused).loss


def _counted(input_ids: Tensor, attention_mask: Tensor | None, labels: Tensor | None) -> int:
    """How many next-token targets a batch has (its labels or unmasked tokens after the first position)."""
    if labels is not None:
        return int((labels[:, 1:] != -100).sum())
    if attention_mask is not None:
        return int((attention_mask[:, 1:] != 0).sum())
    return input_ids[:, 1:].numel()


@torch.no_grad()
def perplexity(model: nn.Module, batches: Iterable[Tensor | Mapping[str, Tensor]]) -> float:
    """exp(mean next-token negative log-likelihood) over every predicted, unmasked token.

    ``batches`` yields (B, T) ``input_ids`` tensors or dicts with ``input_ids`` and optionally
    ``attention_mask`` and ``labels`` (unshifted, -100 where a token is not a target). Works for Hugging
    Face causal LMs (and PEFT models around them) and for gemma_pytorch-layout models; a patched model
    is scored through the fused loss, without its (B, T, V) logits. The model is put in eval mode for
    the call and restored afterwards.
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for index, batch in enumerate(batches):
            ids, mask, labels = batch_parts(batch, index)
            total += float(_summed_nll(model, ids, mask, labels))
            count += _counted(ids, mask, labels)
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
