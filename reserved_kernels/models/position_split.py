"""Frozen positions: the part of a training batch the trainable rows cannot reach, run without a backward.

Only the K rows train and attention is causal, so a position's hidden state depends on the rows only if a
reserved id occurs at or before it in its own row of the batch (packed sequences included: causality runs
along the row). Every other position is *frozen*: its hidden state is a constant, and it reaches the rows
through the tied head's K reserved columns alone. A :class:`SplitPlan` says how a batch runs:

* the rows without a reserved id through the body under ``no_grad``, batched;
* each row whose first reserved id stands at position ``f >= max(T/8, 64)`` in two calls (rows with the
  same ``f`` together): positions ``[0, f)`` under ``no_grad``, keeping the model's own KV cache, then ``[f, T)`` with
  gradients, reading that cache;
* the other rows with a reserved id (an earlier one; left-padded rows, see :func:`split_points`; every such row
  under gradient checkpointing, where transformers turns the KV cache off) as usual, batched.

:func:`split_hidden` runs a plan through a model family's :class:`BodyRunner` and gives the final hidden states
in two :class:`Part`\\ s; the loss then asks the fused loss for the rows' gradient alone on the frozen one (no
accumulator GEMM there). The loss and the rows' gradients are the one-call path's up to the order of
floating-point sums (different GEMM shapes). Deciding the split reads the ids on the host once a step, and the
plan's row and position indices go to the device in one copy; nothing else synchronises.

Users: the patched Hugging Face training forward and TRL's ``fused_lm_head`` statistics
(:mod:`reserved_kernels.models.integrations.huggingface`, through :func:`split_loss` and :func:`hf_split`;
:func:`frozen_split_unsupported` and :func:`prefix_split_unsupported` say when they do not apply), and
gemma_pytorch's :func:`~reserved_kernels.models.causal_lm_loss` (:func:`skip_unavailable`).
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from reserved_kernels.functional import reduced_loss
from reserved_kernels.models.layout import base_model, input_embedding, output_head
from reserved_kernels.models.state import patch_state

SKIP_ENV_VAR = "RESERVED_KERNELS_SKIP_FROZEN"  # 0: never skip (benchmarks, debugging)
# Keyword arguments the split knows how to slice by row (anything else with a value: the usual path).
_ROW_ARGS = ("input_ids", "attention_mask", "position_ids")
_HARMLESS = ("use_cache", "return_dict")  # the split sets both itself
# A row is split only where its frozen prefix holds at least 1/8 of it and 64 positions: below that the backward
# it saves is worth less than the extra calls (splitting every row at its term made the shipped model's demo, whose
# control token stands at position 1, and Gemma 3 270M's short lines slower, not faster).
MIN_PREFIX_FRACTION, MIN_PREFIX_POSITIONS = 8, 64
# Dropout draws a random mask per call: split calls would draw other masks than one call.
_DROPOUT_KEYS = ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop",
                 "hidden_dropout_prob", "attention_probs_dropout_prob")


def skip_unavailable(model: nn.Module) -> str | None:
    """Why no position of ``model`` can be frozen now (None: frozen positions exist wherever no reserved id
    reaches): turned off, gradients off, the rows frozen, or something besides the rows trains (a LoRA adapter
    beside them makes every position depend on it).

    Called on every training forward, so it walks no module tree: it reads the rows and every other parameter
    through the slots :func:`~reserved_kernels.patch_model` kept (:func:`parameter_slots`), with their
    ``requires_grad`` flags, which stay the user's to change after patching."""
    state = patch_state(model)
    if state is None or not state.skip_frozen:
        return f"not patched with skip_frozen=True (or patched with {SKIP_ENV_VAR}=0)"
    if not torch.is_grad_enabled():
        return "gradients are off"
    if not any(p.requires_grad for p in in_slots(state.row_slots)):
        return "the reserved rows are frozen"
    if any(p.requires_grad for p in in_slots(state.other_slots)):
        return "a parameter other than the reserved rows trains"
    return None


def skip_allowed(skip_frozen: bool) -> bool:
    """``patch_model(skip_frozen=...)`` with the environment's say (``RESERVED_KERNELS_SKIP_FROZEN=0``: never),
    read once, at patch time."""
    return skip_frozen and os.environ.get(SKIP_ENV_VAR, "1") != "0"


def has_dropout(model: nn.Module) -> bool:
    """Whether ``model``'s config asks for dropout (its modules read it when built: read once, at patch time)."""
    config = getattr(model, "config", None)
    return any(float(getattr(config, key, 0) or 0) > 0 for key in _DROPOUT_KEYS)


def checkpointing_modules(model: nn.Module) -> tuple[nn.Module, ...]:
    """The modules whose ``gradient_checkpointing`` flag says whether transformers checkpoints a model (what its
    ``is_activation_checkpointing`` reads): those that have one, and the model itself."""
    base = base_model(model)
    return (base, *(m for m in base.modules() if m is not base and hasattr(m, "gradient_checkpointing")))


def reserved_rows(model: nn.Module) -> list[nn.Parameter]:
    """The trainable rows of a patched model: the embedding's, and an untied head's own."""
    rows = {id(m.reserved_weight): m.reserved_weight for m in (input_embedding(model), output_head(model))
            if hasattr(m, "reserved_weight")}
    return list(rows.values())


Slots = tuple[tuple[dict, str], ...]


def parameter_slots(model: nn.Module) -> tuple[Slots, Slots]:
    """Where the reserved rows, and every other parameter, of a patched ``model`` are registered: (the module's
    parameter dict, the name), each parameter once, to read without a walk of the module tree. Slots, not the
    parameters: a parameter registered anew later (FSDP2's ``fully_shard`` does so for every one) is read where it
    now is, and the one it replaced is not kept alive."""
    rows = {id(p) for p in reserved_rows(model)}
    row_slots, other_slots, seen = [], [], set()
    for module in model.modules():
        # A module's own registry, as named_parameters reads it; a shared (tied) parameter is kept once.
        for name, p in module._parameters.items():
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                (row_slots if id(p) in rows else other_slots).append((module._parameters, name))
    return tuple(row_slots), tuple(other_slots)


def in_slots(slots: Slots) -> list[nn.Parameter]:
    """The parameters registered in ``slots`` now (:func:`parameter_slots`)."""
    return [p for params, name in slots if (p := params.get(name)) is not None]


def other_trainable(model: nn.Module) -> str | None:
    """The name of a parameter besides the reserved rows that requires grad (a LoRA adapter's), or None: while one
    trains, no hidden state is a constant. Walks the model: for checks made once, not per step."""
    rows = {id(p) for p in reserved_rows(model)}
    return next((name for name, p in model.named_parameters() if p.requires_grad and id(p) not in rows), None)


def frozen_split_unsupported(model: nn.Module, body_kwargs: dict) -> str | None:
    """Why the frozen-position split of a Hugging Face model cannot run for this call (None: it can).

    :func:`skip_unavailable`, and: with dropout, with ``inputs_embeds``, a cache passed in, extra outputs or
    other inputs it does not slice. (Under gradient checkpointing rows are still split, prefixes are not:
    :func:`prefix_split_unsupported`.)
    """
    reason = skip_unavailable(model)
    if reason is not None:
        return reason
    if patch_state(model).dropout:
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


def prefix_split_unsupported(model: nn.Module) -> str | None:
    """Why a Hugging Face model's rows cannot be split at their first reserved id (None: they can): under
    gradient checkpointing transformers turns the KV cache off in training, so a suffix cannot read its prefix."""
    # transformers' is_activation_checkpointing walks every module for this flag; the modules that carry it were
    # kept at patch time (the model itself too: transformers sets it there on a model whose modules have none).
    checkpointing = any(getattr(m, "gradient_checkpointing", False) for m in patch_state(model).checkpointing)
    return "gradient checkpointing" if checkpointing else None


def reserved_hits(input_ids: Tensor, slot_map: Tensor) -> Tensor:
    """(B, T) bool: where ``input_ids`` holds a reserved id (its slot in ``slot_map`` is >= 0)."""
    return slot_map.index_select(0, input_ids.reshape(-1).long()).view(input_ids.shape) >= 0


def first_positions(hit: Tensor) -> Tensor:
    """(B,) each row's first ``True`` in the (B, T) ``hit``, or T where the row has none."""
    return torch.where(hit.any(1), hit.int().argmax(1), hit.shape[1])


def split_points(input_ids: Tensor, slot_map: Tensor, attention_mask: Tensor | None) -> list[int]:
    """Where each row's live positions start: its first reserved id (the row's length where there is none), or
    0 for a left-padded row that has one. One host read.

    A left-padded row's padding queries see no key at all, and eager attention then spreads them evenly over
    every key of the call — future ones included — so what they hold (and predict: the position before the
    first real token predicts it) depends on the whole row: such a row with a reserved id is not split.
    """
    length = input_ids.shape[1]
    first = first_positions(reserved_hits(input_ids, slot_map))
    if attention_mask is not None:
        first = torch.where((attention_mask[:, 0] == 0) & (first < length), 0, first)
    return first.tolist()


@dataclasses.dataclass
class SplitPlan:
    """How the rows of a (B, ``length``) batch run (see the module docstring): ``frozen`` rows (no reserved id)
    without a backward, ``whole`` rows with one, and for each first position ``f`` the rows ``prefixes[f]``:
    ``[0, f)`` without a backward, ``[f, length)`` with one."""

    length: int
    frozen: list[int]
    whole: list[int]
    prefixes: dict[int, list[int]]

    @classmethod
    def of(cls, first: list[int], length: int, split_prefixes: bool = True) -> SplitPlan | None:
        """The plan for rows whose first reserved ids stand at ``first`` (:func:`split_points`); None where
        nothing would run without a backward (the usual path is as cheap). A short frozen prefix saves less
        backward than its separate call costs (a small model's control token at position 1): such rows run
        whole, as every row with a reserved id does without ``split_prefixes``."""
        shortest = min(max(MIN_PREFIX_POSITIONS, length // MIN_PREFIX_FRACTION), length)
        plan = cls(length, [], [], {})
        for b, f in enumerate(first):
            if f == length:
                plan.frozen.append(b)
            elif split_prefixes and f >= shortest:
                plan.prefixes.setdefault(f, []).append(b)
            else:
                plan.whole.append(b)
        return plan if plan.frozen or plan.prefixes else None


class BodyRunner(Protocol):
    """A model family's body over some rows of the batch, as :func:`split_hidden` calls it. ``rows`` is an int64
    tensor on the batch's device; every call returns final hidden states, (rows, positions, D)."""

    def whole(self, rows: Tensor) -> Tensor:
        """Every position of ``rows``."""

    def prefix(self, rows: Tensor, stop: int) -> tuple[Tensor, Any]:
        """Positions ``[0, stop)`` of ``rows``, and what :meth:`suffix` reads of them (a KV cache)."""

    def suffix(self, rows: Tensor, start: int, prefix: Any) -> Tensor:
        """Positions ``[start, length)`` of ``rows``, attending to their prefix through ``prefix``."""


@dataclasses.dataclass
class Part:
    """Final hidden states of some positions of a batch: ``hidden`` (M, D) and ``where`` (M,), each position's
    flat index ``b·T + t`` in the (B, T) batch."""

    hidden: Tensor
    where: Tensor


def split_hidden(plan: SplitPlan, runner: BodyRunner, device: torch.device) -> tuple[Part, Part | None]:
    """The batch's final hidden states by ``plan``: the frozen part (computed under ``no_grad``; never empty)
    and the live part (with gradients; None when every row is frozen). Together they hold every position once."""
    length = plan.length
    pieces: list[tuple[str, list[int], int, int]] = [("frozen", plan.frozen, 0, length)] if plan.frozen else []
    if plan.whole:
        pieces.append(("whole", plan.whole, 0, length))
    for f, rows in plan.prefixes.items():
        pieces += [("prefix", rows, 0, f), ("suffix", rows, f, length)]
    # Every piece's rows and flat positions, made on the host and sent to the device in one copy.
    host = []
    for _, rows, start, stop in pieces:
        rows_t = torch.tensor(rows, dtype=torch.int64)
        host += [rows_t, (rows_t.unsqueeze(1) * length + torch.arange(start, stop)).reshape(-1)]
    flat = torch.cat(host)
    if device.type == "cuda":
        flat = flat.pin_memory()
    indices = flat.to(device, non_blocking=True).split([t.numel() for t in host])
    frozen_h, frozen_w, live_h, live_w = [], [], [], []
    cached = None
    for i, (kind, _, start, stop) in enumerate(pieces):
        rows, where = indices[2 * i], indices[2 * i + 1]
        if kind == "frozen":
            with torch.no_grad():
                hidden = runner.whole(rows)
        elif kind == "whole":
            hidden = runner.whole(rows)
        elif kind == "prefix":
            with torch.no_grad():
                hidden, cached = runner.prefix(rows, stop)
        else:
            hidden, cached = runner.suffix(rows, start, cached), None
        into_h, into_w = (live_h, live_w) if kind in ("whole", "suffix") else (frozen_h, frozen_w)
        into_h.append(hidden.reshape(-1, hidden.shape[-1]))
        into_w.append(where)
    live = Part(torch.cat(live_h), torch.cat(live_w)) if live_h else None
    return Part(torch.cat(frozen_h), torch.cat(frozen_w)), live


def summed_loss(parts: tuple[Part, Part | None], targets: Tensor, loss_sum: Callable[[Tensor, Tensor], Tensor],
                rows: list[nn.Parameter]) -> Tensor:
    """Σ of ``loss_sum(hidden, targets)`` over both parts of :func:`split_hidden`, ``targets`` (B, T) in the batch's
    layout. With no live part, ``rows`` that require grad get a zero gradient, as the usual path gives an untied
    model's input rows (an optimizer then still decays them; DDP expects every trainable parameter to get one)."""
    flat = targets.reshape(-1)
    frozen, live = parts
    total = loss_sum(frozen.hidden, flat.index_select(0, frozen.where))
    if live is not None:
        return total + loss_sum(live.hidden, flat.index_select(0, live.where))
    for p in rows:
        if p.requires_grad:
            total = total + p.sum() * 0
    return total


def in_batch_order(parts: tuple[Part, Part | None], values: list[Tensor], shape: torch.Size) -> Tensor:
    """Per-position ``values`` (one tensor per part, in its order) put back in the batch's (B, T) ``shape``;
    differentiable."""
    where = torch.cat([p.where for p in parts if p is not None])
    return torch.cat(values).index_select(0, where.argsort()).view(shape)


def _cache_keyword(body: nn.Module) -> str:
    """The name the body takes a KV cache under (``cache`` in newer transformers, ``past_key_values`` before)."""
    return "cache" if "cache" in inspect.signature(body.forward).parameters else "past_key_values"


class _HFBody:
    """:class:`BodyRunner` for a Hugging Face model's backbone (``model.base_model``) on ``input_ids``,
    ``attention_mask`` and ``position_ids``; the prefix's KV cache is the model's own."""

    def __init__(self, model: nn.Module, body_kwargs: dict):
        self.body = model.base_model
        self.kwargs = {k: v for k, v in body_kwargs.items() if v is not None and k not in _HARMLESS}
        self.length = self.kwargs["input_ids"].shape[1]
        self.cache_keyword = _cache_keyword(self.body)

    def _cut(self, rows: Tensor, start: int, stop: int) -> dict:
        return {k: v.index_select(0, rows)[:, start:stop] for k, v in self.kwargs.items()}

    def whole(self, rows: Tensor) -> Tensor:
        return self.body(**self._cut(rows, 0, self.length), use_cache=False, return_dict=True).last_hidden_state

    def prefix(self, rows: Tensor, stop: int) -> tuple[Tensor, Any]:
        out = self.body(**self._cut(rows, 0, stop), use_cache=True, return_dict=True)
        # The body's output names its cache as its keyword does (``cache`` / ``past_key_values``).
        return out.last_hidden_state, getattr(out, self.cache_keyword)

    def suffix(self, rows: Tensor, start: int, prefix: Any) -> Tensor:
        kwargs = self._cut(rows, start, self.length)
        if "attention_mask" in self.kwargs:  # the mask covers the cached positions and the new ones
            kwargs["attention_mask"] = self.kwargs["attention_mask"].index_select(0, rows)
        if "position_ids" not in self.kwargs:  # the positions the one call would give them
            kwargs["position_ids"] = torch.arange(start, self.length, device=rows.device).unsqueeze(0)
        return self.body(**kwargs, use_cache=True, return_dict=True,
                         **{self.cache_keyword: prefix}).last_hidden_state


def hf_split(model: nn.Module, body_kwargs: dict) -> tuple[Part, Part | None] | None:
    """The final hidden states of a patched Hugging Face causal LM's batch in a frozen and a live part
    (:func:`split_hidden`); None when no position is frozen. The caller checked
    :func:`frozen_split_unsupported`."""
    ids = body_kwargs["input_ids"]
    first = split_points(ids, input_embedding(model).slot_map, body_kwargs.get("attention_mask"))
    plan = SplitPlan.of(first, ids.shape[1], split_prefixes=prefix_split_unsupported(model) is None)
    return None if plan is None else split_hidden(plan, _HFBody(model, body_kwargs), ids.device)


def split_loss(model: nn.Module, body_kwargs: dict, shift_labels: Tensor, *, ignore_index: int,
               num_items_in_batch, softcap: float | None) -> Tensor | None:
    """The training loss of a patched Hugging Face causal LM with its frozen positions run without a backward
    (see the module docstring); None when no position is frozen (the usual path is as cheap)."""
    parts = hf_split(model, body_kwargs)
    if parts is None:
        return None
    head = output_head(model)

    def loss_sum(hidden: Tensor, targets: Tensor) -> Tensor:
        return head(hidden, targets, ignore_index=ignore_index, reduction="sum", softcap=softcap)

    total = summed_loss(parts, shift_labels.to(parts[0].hidden.device), loss_sum,
                        in_slots(patch_state(model).row_slots))
    return reduced_loss(total, shift_labels, ignore_index=ignore_index, num_items_in_batch=num_items_in_batch)
