"""Frozen positions: the part of a training batch the trainable rows cannot reach, run without a backward.

Only the K rows train and attention is causal, so a position's hidden state depends on the rows only if a
reserved id occurs at or before it in its own row of the batch (packed sequences included: causality runs
along the row). Every other position is *frozen*: its hidden state is a constant, and it reaches the rows
through the tied head's K reserved columns alone. The patched training forward
(:mod:`reserved_kernels.models.causal_lm`) therefore runs

* the rows without a reserved id through the body under ``no_grad``, batched;
* each row whose first reserved id stands at position ``f >= max(T/8, 64)`` in two calls (rows with the
  same ``f`` together): positions ``[0, f)`` under ``no_grad``, keeping the model's own KV cache, then ``[f, T)`` with
  gradients, reading that cache;
* the other rows with a reserved id (an earlier one; left-padded rows, see :func:`split_points`) as usual,
  batched;

and asks the fused loss for the rows' gradient alone on the frozen positions (no accumulator GEMM there).
The loss and the rows' gradients are today's path's up to the order of floating-point sums (different
GEMM shapes). Deciding the split reads the ids on the host once a step; nothing else synchronises.

:func:`frozen_split_unsupported` says when this does not apply and the usual path runs instead.
gemma_pytorch's :func:`~reserved_kernels.models.causal_lm_loss` uses :func:`skip_unavailable` and
:func:`split_points` for whole rows only.
"""

from __future__ import annotations

import inspect
import os

import torch
from torch import Tensor, nn

from reserved_kernels.functional import reduced_loss
from reserved_kernels.models.layout import input_embedding, output_head
from reserved_kernels.models.state import patch_state

SKIP_ENV_VAR = "RESERVED_KERNELS_SKIP_FROZEN"  # 0: never skip (benchmarks, debugging)
# Keyword arguments the split knows how to slice by row (anything else with a value: the usual path).
_ROW_ARGS = ("input_ids", "attention_mask", "position_ids")
_HARMLESS = ("use_cache", "return_dict")
# A row is split only where its frozen prefix holds at least 1/8 of it and 64 positions: below that the backward
# it saves is worth less than the extra calls (measured: the shipped model's control token at position 1 made its
# demo 3x slower, and Gemma 3 270M's 40-token lines with a term anywhere 1.3x slower, split one call pair a row).
MIN_PREFIX_FRACTION, MIN_PREFIX_POSITIONS = 8, 64
# Dropout draws a random mask per call: split calls would draw other masks than one call.
_DROPOUT_KEYS = ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop",
                 "hidden_dropout_prob", "attention_probs_dropout_prob")


def skip_unavailable(model: nn.Module) -> str | None:
    """Why no position of ``model`` can be frozen now (None: frozen positions exist wherever no reserved id
    reaches): turned off, gradients off, or something besides the reserved rows trains (a LoRA adapter beside
    them makes every position depend on it)."""
    state = patch_state(model)
    if state is None or not state.skip_frozen:
        return "not patched with skip_frozen=True"
    if os.environ.get(SKIP_ENV_VAR, "1") == "0":
        return f"{SKIP_ENV_VAR}=0"
    if not torch.is_grad_enabled():
        return "gradients are off"
    if other_trainable(model) is not None:
        return "a parameter other than the reserved rows trains"
    return None


def reserved_rows(model: nn.Module) -> list[nn.Parameter]:
    """The trainable rows of a patched model: the embedding's, and an untied head's own."""
    rows = {id(m.reserved_weight): m.reserved_weight for m in (input_embedding(model), output_head(model))
            if hasattr(m, "reserved_weight")}
    return list(rows.values())


def other_trainable(model: nn.Module) -> str | None:
    """The name of a parameter besides the reserved rows that requires grad (a LoRA adapter's), or None: while one
    trains, no hidden state is a constant."""
    rows = {id(p) for p in reserved_rows(model)}
    return next((name for name, p in model.named_parameters() if p.requires_grad and id(p) not in rows), None)


def frozen_split_unsupported(model: nn.Module, body_kwargs: dict) -> str | None:
    """Why the frozen-position split of a Hugging Face model cannot run for this call (None: it can).

    :func:`skip_unavailable`, and: under gradient checkpointing (transformers turns the KV cache off in
    training there), with dropout, with ``inputs_embeds``, a cache passed in, extra outputs or other inputs
    it does not slice.
    """
    reason = skip_unavailable(model)
    if reason is not None:
        return reason
    checkpointing = ("is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing")
                     else "is_gradient_checkpointing")  # renamed in transformers 5.x
    if getattr(model, checkpointing, False):
        return "gradient checkpointing"
    config = getattr(model, "config", None)
    if any(float(getattr(config, key, 0) or 0) > 0 for key in _DROPOUT_KEYS):
        return "dropout"
    extra = [k for k, v in body_kwargs.items() if v is not None and k not in _ROW_ARGS + _HARMLESS]
    if extra:
        return f"inputs it does not split: {extra}"
    ids, mask = body_kwargs.get("input_ids"), body_kwargs.get("attention_mask")
    if not isinstance(ids, Tensor) or ids.dim() != 2:
        return "input_ids are not a (batch, length) tensor"
    if mask is not None and mask.shape != ids.shape:
        return "the attention mask is not a (batch, length) mask"
    position_ids = body_kwargs.get("position_ids")
    if position_ids is not None and position_ids.shape != ids.shape:
        return "position_ids are not (batch, length)"
    return None


def reserved_hits(input_ids: Tensor, slot_map: Tensor) -> Tensor:
    """(B, T) bool: where ``input_ids`` holds a reserved id (its slot in ``slot_map`` is >= 0)."""
    return slot_map.index_select(0, input_ids.reshape(-1).long()).view(input_ids.shape) >= 0


def split_points(input_ids: Tensor, slot_map: Tensor, attention_mask: Tensor | None) -> list[int]:
    """Where each row's live positions start: its first reserved id (the row's length where there is none), or
    0 for a left-padded row that has one. One host read.

    A left-padded row's padding queries see no key at all, and eager attention then spreads them evenly over
    every key of the call — future ones included — so what they hold (and predict: the position before the
    first real token predicts it) depends on the whole row: such a row with a reserved id is not split.
    """
    hit = reserved_hits(input_ids, slot_map)
    length = input_ids.shape[1]
    first = torch.where(hit.any(1), hit.int().argmax(1), length)
    if attention_mask is not None:
        first = torch.where((attention_mask[:, 0] == 0) & (first < length), 0, first)
    return first.tolist()


def _cache_keyword(body: nn.Module) -> str:
    """The name the body takes a KV cache under (``cache`` in newer transformers, ``past_key_values`` before)."""
    return "cache" if "cache" in inspect.signature(body.forward).parameters else "past_key_values"


def _rows(kwargs: dict, rows: slice | list[int], columns: slice = slice(None)) -> dict:
    """``kwargs`` with every per-position input cut to ``rows`` and ``columns``."""
    return {k: (v[rows][:, columns] if k in _ROW_ARGS and v is not None else v) for k, v in kwargs.items()}


def split_loss(model: nn.Module, body_kwargs: dict, shift_labels: Tensor, *, ignore_index: int,
               num_items_in_batch, softcap: float | None) -> Tensor | None:
    """The training loss of a patched Hugging Face causal LM with its frozen positions run without a backward
    (see the module docstring); None when no position is frozen (the usual path is as cheap)."""
    ids = body_kwargs["input_ids"]
    embedding, head = input_embedding(model), output_head(model)
    first = split_points(ids, embedding._slot_map, body_kwargs.get("attention_mask"))
    length = ids.shape[1]
    # A short frozen prefix saves less backward than its separate call costs (a small model's control token at
    # position 1): such rows run whole. Rows whose prefixes end at the same position split together.
    shortest = min(max(MIN_PREFIX_POSITIONS, length // MIN_PREFIX_FRACTION), length)
    if all(f < shortest for f in first):
        return None  # no row without a term, no prefix worth running apart: the usual path
    body = model.base_model
    kwargs = {k: v for k, v in body_kwargs.items() if v is not None and k != "use_cache"}
    frozen_h, frozen_t, live_h, live_t = [], [], [], []

    def keep(into_h, into_t, hidden: Tensor, targets: Tensor) -> None:
        into_h.append(hidden.reshape(-1, hidden.shape[-1]))
        into_t.append(targets.reshape(-1))

    none = [b for b, f in enumerate(first) if f == length]
    if none:
        with torch.no_grad():
            hidden = body(**_rows(kwargs, none), use_cache=False).last_hidden_state
        keep(frozen_h, frozen_t, hidden, shift_labels[none])
    at_start = [b for b, f in enumerate(first) if f < shortest]
    groups: dict[int, list[int]] = {}
    for b, f in enumerate(first):
        if shortest <= f < length:
            groups.setdefault(f, []).append(b)
    if at_start:
        keep(live_h, live_t, body(**_rows(kwargs, at_start), use_cache=False).last_hidden_state, shift_labels[at_start])
    cache_keyword = _cache_keyword(body)
    for f, rows in groups.items():
        with torch.no_grad():
            prefix = body(**_rows(kwargs, rows, slice(0, f)), use_cache=True)
        keep(frozen_h, frozen_t, prefix.last_hidden_state, shift_labels[rows, :f])
        suffix = _rows(kwargs, rows, slice(f, length))
        if "attention_mask" in kwargs:  # the mask covers the cached positions and the new ones
            suffix["attention_mask"] = kwargs["attention_mask"][rows]
        if "position_ids" not in kwargs:  # the positions the one call would give them
            suffix["position_ids"] = torch.arange(f, length, device=ids.device).unsqueeze(0)
        # The body's output names its cache as its keyword does (``cache`` / ``past_key_values``).
        hidden = body(**suffix, use_cache=True, **{cache_keyword: getattr(prefix, cache_keyword)}).last_hidden_state
        keep(live_h, live_t, hidden, shift_labels[rows, f:])

    def summed(hidden: list[Tensor], targets: list[Tensor]) -> Tensor:
        return head(torch.cat(hidden), torch.cat(targets).to(hidden[0].device), ignore_index=ignore_index,
                    reduction="sum", softcap=softcap)

    total = summed(frozen_h, frozen_t)
    if live_h:
        total = total + summed(live_h, live_t)
    elif embedding.reserved_weight.requires_grad:
        # No live position: the embedding's rows are not reached, yet the usual path gives them a zero gradient
        # (an optimizer then still decays them; DDP expects every trainable parameter to get one).
        total = total + embedding.reserved_weight.sum() * 0
    return reduced_loss(total, shift_labels, ignore_index=ignore_index, num_items_in_batch=num_items_in_batch)
