"""The differentiable functions the modules call: one place that defines the maths."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as TF
from torch import Tensor

from reserved_kernels import ops
from reserved_kernels._table import softcapped


def check_reserved_ids(reserved_ids: Tensor | Sequence[int], num_embeddings: int,
                       padding_idx: int | None = None) -> Tensor:
    """Validate reserved ids and return them as an int64 CPU tensor (in the order given).

    Raises on float ids, ids outside [0, num_embeddings), duplicates, or the padding id (its row
    never receives a gradient in ``nn.Embedding``, so training it would be a contradiction).
    """
    ids = torch.as_tensor(reserved_ids) if not isinstance(reserved_ids, Tensor) else reserved_ids.detach()
    if ids.numel() == 0:
        return torch.empty(0, dtype=torch.int64)
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"reserved_ids must be integers, got {ids.dtype}")
    if ids.dim() != 1:
        raise ValueError(f"reserved_ids must be 1-D, got shape {tuple(ids.shape)}")
    ids = ids.to("cpu", torch.int64)
    bad = ids[(ids < 0) | (ids >= num_embeddings)]
    if bad.numel():
        raise IndexError(f"reserved_ids must lie in [0, {num_embeddings}), got {bad[:10].tolist()}")
    unique, counts = torch.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"reserved_ids must be distinct; repeated: {unique[counts > 1][:10].tolist()}")
    if padding_idx is not None and bool((ids == padding_idx).any()):
        raise ValueError(f"reserved_ids must not contain padding_idx={padding_idx}")
    return ids


def build_slot_map(reserved_ids: Tensor, num_embeddings: int, device: torch.device | str | None = None) -> Tensor:
    """int32 vector of length V: ``slot_map[reserved_ids[k]] = k``, -1 elsewhere (4 bytes per vocabulary id)."""
    slot_map = torch.full((num_embeddings,), -1, dtype=torch.int32, device=device)
    if reserved_ids.numel():
        slot_map[reserved_ids.to(device=slot_map.device, dtype=torch.int64)] = torch.arange(
            reserved_ids.numel(), dtype=torch.int32, device=slot_map.device)
    return slot_map


def reserved_embedding(ids: Tensor, weight: Tensor, reserved_weight: Tensor, slot_map: Tensor, *,
                       weight_scaler: Tensor | None = None, scale: float | None = None) -> Tensor:
    """``out[n] = cast(scale * row(ids[n]))``; the gradient reaches ``reserved_weight`` as a compact K×D tensor.

    Bit-identical to ``F.embedding(ids, merged) * torch.tensor(scale, dtype=dtype)`` where ``merged``
    is ``weight`` (dequantised with ``weight_scaler`` for an int8 table) with rows ``reserved_ids``
    replaced by ``reserved_weight`` rounded to the table dtype. The backward is always bitwise
    repeatable. Ids are checked without a host sync (IndexError on CPU, a device-side assertion on
    CUDA); ``ops.set_strict_id_checks(True)`` adds a synchronous check for debugging.
    """
    if ops.strict_id_checks():
        ops.check_ids_now(ids, weight.shape[0])
    return ops.gather(ids, weight, reserved_weight, slot_map, weight_scaler, 1.0 if scale is None else float(scale))


def to_csr(sources: Sequence[Sequence[int]] | tuple[Tensor, Tensor], device: torch.device | str | None = None,
           exclude: Tensor | Sequence[int] | None = None) -> tuple[Tensor, Tensor]:
    """Lists of source ids (or an ``(offsets, ids)`` pair) as int64 CSR, minus ``exclude``d ids.

    Raises if a list is empty, before or after exclusion, naming the destination. Tensor work
    only (no Python loop per list for CSR input), so batched initialisation stays one cheap call.
    """
    if isinstance(sources, tuple) and len(sources) == 2 and all(isinstance(t, Tensor) for t in sources):
        offsets, ids = sources
        if ids.is_floating_point() or offsets.is_floating_point():
            raise TypeError("CSR offsets and ids must be integer tensors")
        if offsets.dim() != 1 or ids.dim() != 1 or offsets.numel() < 1:
            raise ValueError("CSR offsets and ids must be 1-D, with at least one offset")
        offsets, ids = offsets.to("cpu", torch.int64), ids.to("cpu", torch.int64)
        if int(offsets[0]) != 0 or int(offsets[-1]) != ids.numel():
            raise ValueError(f"offsets must start at 0 and end at len(ids)={ids.numel()}")
        lengths = offsets.diff()
        if bool((lengths < 0).any()):
            raise ValueError("offsets must be non-decreasing")
    else:
        lists = [src.reshape(-1).tolist() if isinstance(src, Tensor) else list(src) for src in sources]
        for k, src in enumerate(lists):
            if any(isinstance(i, float) for i in src):
                raise TypeError(f"source ids must be integers; destination {k} has {src}")
        lengths = torch.tensor([len(src) for src in lists], dtype=torch.int64)
        ids = torch.tensor([i for src in lists for i in src], dtype=torch.int64)
    if exclude is not None:
        keep = ~torch.isin(ids, torch.as_tensor(exclude, dtype=torch.int64).reshape(-1))
        segment = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
        lengths = torch.bincount(segment[keep], minlength=lengths.numel())
        ids = ids[keep]
    empty = (lengths == 0).nonzero().squeeze(-1).tolist()
    if empty:
        why = " after excluding ids" if exclude is not None else ""
        raise ValueError(f"every destination needs at least one source id{why}; destinations {empty[:10]} have none")
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    return offsets.to(device), ids.to(device)


def mean_rows(weight: Tensor, reserved_weight: Tensor, slot_map: Tensor, sources, *,
              weight_scaler: Tensor | None = None, exclude=None) -> Tensor:
    """fp32 (S, D): the mean of ``row(i)`` over each of the S source lists.

    Every row is read before anything is written, so the result does not depend on order.
    """
    offsets, src_ids = to_csr(sources, weight.device, exclude)
    return ops.segment_mean(weight, reserved_weight, slot_map, weight_scaler, offsets, src_ids)


def means_for_targets(means: Tensor, num_targets: int, noise_std: float = 0.0,
                      generator: torch.Generator | None = None) -> Tensor:
    """One fp32 row per target: ``means`` as given, or its single row for every target; plus N(0, noise_std²).

    Raises if the counts differ (and ``means`` is not a single shared row) or ``noise_std`` is invalid.
    """
    if not math.isfinite(noise_std) or noise_std < 0:
        raise ValueError(f"noise_std must be a finite number >= 0, got {noise_std}")
    if means.shape[0] == 1 and num_targets != 1:
        means = means.expand(num_targets, means.shape[1])
    if means.shape[0] != num_targets:
        raise ValueError(f"got {num_targets} targets but {means.shape[0]} source lists")
    if noise_std > 0:
        noise = torch.randn(means.shape, generator=generator, dtype=torch.float32,
                            device=generator.device if generator is not None else means.device)
        means = means + noise.to(means.device) * noise_std
    return means


@torch.no_grad()
def init_reserved_rows_(rows: Tensor, weight: Tensor, slot_map: Tensor, reserved_ids: Tensor, sources, *,
                        targets: Tensor | Sequence[int] | None = None, weight_scaler: Tensor | None = None,
                        exclude=None, noise_std: float = 0.0, generator: torch.Generator | None = None) -> None:
    """Set ``rows[k]`` (the trainable rows of ``reserved_ids``) to the mean of target k's source rows, batched.

    ``sources`` as for :func:`to_csr` (one list per target, or one list shared by all); rows are read as the
    forward pass sees them (``slot_map`` sends reserved ids to ``rows``), all before any write. ``targets``
    are reserved ids (default: all, in order). Shared by the embedding and an untied output head.
    """
    if targets is None:
        slots = torch.arange(reserved_ids.numel(), device=weight.device)
    else:
        targets = check_reserved_ids(targets, weight.shape[0]).to(weight.device)
        slots = slot_map.index_select(0, targets).long()
        if bool((slots < 0).any()):
            raise ValueError(f"targets must be reserved ids; not reserved: {targets[slots < 0][:10].tolist()}")
    means = mean_rows(weight, rows, slot_map, sources, weight_scaler=weight_scaler, exclude=exclude)
    means = means_for_targets(means, slots.numel(), noise_std, generator)
    rows.index_copy_(0, slots, means.to(rows.dtype))


@torch.no_grad()
def mean_init_(table: Tensor, dst: Tensor | Sequence[int], sources, *, exclude=None, noise_std: float = 0.0,
               generator: torch.Generator | None = None) -> Tensor:
    """``table[dst[k]] = mean(table[sources[k]])`` for all k in one batched op; returns ``table``.

    Sources are read as they were before any write, so the result does not depend on order
    even when a destination is also another's source. ``sources`` is a list of id lists or an
    ``(offsets, ids)`` CSR pair (a single list is shared by every destination); ``exclude`` drops
    ids from every list (e.g. untrained rows).
    """
    if table.dim() != 2 or not table.is_floating_point():
        raise ValueError(f"table must be a floating 2-D tensor, got {table.dtype} of shape {tuple(table.shape)}")
    dst = check_reserved_ids(dst, table.shape[0]).to(table.device)  # same rules: in range, distinct
    no_slots = torch.full((table.shape[0],), -1, dtype=torch.int32, device=table.device)
    means = mean_rows(table.contiguous(), table.new_empty(0, table.shape[1]), no_slots, sources, exclude=exclude)
    means = means_for_targets(means, dst.numel(), noise_std, generator)
    table.index_copy_(0, dst, means.to(table.dtype))
    return table


# The fused loss's tile budget per device: on a CPU, tiles of N x 2,048 fp32 logits (16 MiB at N = 2,048) also
# run the GEMMs faster than one N x V GEMM; on a GPU, 8,192 x 8,192 tiles keep the tensor cores busy.
DEFAULT_TILE_BYTES = {"cpu": 16 << 20, "cuda": 256 << 20}
REDUCTIONS = ("mean", "sum", "none")


def reduced_loss(losses: Tensor, targets: Tensor, *, ignore_index: int = -100, reduction: str = "mean",
                 num_items_in_batch: Tensor | int | None = None) -> Tensor:
    """Per-token ``losses`` (0 where ignored; a scalar already summed for "mean" and "sum") reduced as
    :func:`linear_cross_entropy` does: divided by ``num_items_in_batch`` when given, else by the counted
    targets ("mean"), summed ("sum"), or shaped as ``targets`` ("none"). One normaliser for every loss path."""
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, Tensor):
            num_items_in_batch = num_items_in_batch.to(losses.device)
        return losses.sum() / num_items_in_batch
    if reduction == "mean":
        return losses.sum() / (targets != ignore_index).sum().to(losses.device)
    if reduction == "sum":
        return losses.sum()
    return losses.view(targets.shape)


class CrossEntropyStats(NamedTuple):
    """:func:`linear_cross_entropy` with ``return_stats=True``: the loss, and per token (without gradient) the
    entropy of the next-token distribution and whether the target is its top token (0 and False where ignored),
    and the log-sum-exp of the frozen table's columns alone — every column but the reserved ones — for every
    token (what :class:`~reserved_kernels.models.FrozenText` keeps)."""

    loss: Tensor
    entropy: Tensor
    is_top1: Tensor
    frozen_lse: Tensor


def linear_cross_entropy(hidden: Tensor, weight: Tensor, reserved_weight: Tensor, slot_map: Tensor, targets: Tensor,
                         *, ignore_index: int = -100, softcap: float | None = None, reduction: str = "mean",
                         num_items_in_batch: Tensor | int | None = None, tile_bytes: int | None = None,
                         return_stats: bool = False) -> Tensor | CrossEntropyStats:
    """Cross-entropy of ``hidden @ merged.T`` (optionally soft-capped) against ``targets``, without the logits.

    ``merged`` is ``weight`` (V, D) with the rows ``slot_map`` points at replaced by ``reserved_weight``
    rounded to the table dtype — what :class:`~reserved_kernels.ReservedLMHead` computes logits from. The
    value is ``F.cross_entropy(cap(hidden @ merged.T), targets, ignore_index=..., reduction=...)`` with
    ``cap(x) = softcap·tanh(x / softcap)``; no (N, V) tensor exists in the forward or the backward (memory
    beyond the inputs: an N x D gradient and one tile of at most ``tile_bytes``, by default 16 MiB on a CPU
    and 256 MiB on a GPU). ``hidden`` gets its exact gradient through the merged table, ``reserved_weight``
    gets ``(softmax − onehot)[:, reserved]ᵀ · hidden`` (K x D), the frozen ``weight`` nothing.

    Args:
        hidden: (..., D) hidden states (cast to the table's dtype, e.g. under autocast).
        targets: (...) int64/int32 next-token ids, already shifted; ``ignore_index`` marks tokens that do not count.
        reduction: "mean" (over counted tokens; NaN when none counts, as ``F.cross_entropy``), "sum" or "none".
        num_items_in_batch: divide the sum by this instead (Trainer's normaliser under gradient accumulation).
        return_stats: also return each token's entropy, whether its target is the top token and the log-sum-exp
            of the frozen columns alone (:class:`CrossEntropyStats`).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(targets, Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"targets must have hidden's leading shape {tuple(hidden.shape[:-1])}, "
                         f"got {tuple(targets.shape)}")
    if hidden.dtype != weight.dtype:  # autocast hands over 16-bit hidden states for a float32 table
        hidden = hidden.to(weight.dtype)
    flat = hidden.reshape(-1, hidden.shape[-1])
    # Each gradient is computed only when it is wanted: a detached hidden (frozen positions) costs one GEMM per tile.
    grad_enabled = torch.is_grad_enabled()
    budget = tile_bytes if tile_bytes is not None else DEFAULT_TILE_BYTES.get(hidden.device.type, 64 << 20)
    loss, entropy, is_top1, _, _, frozen_lse = ops.linear_cross_entropy(flat, weight, reserved_weight, slot_map,
                                                            targets.reshape(-1), ignore_index, softcap, budget,
                                                            grad_enabled and flat.requires_grad,
                                                            grad_enabled and reserved_weight.requires_grad,
                                                            return_stats)
    loss = reduced_loss(loss, targets, ignore_index=ignore_index, reduction=reduction,
                        num_items_in_batch=num_items_in_batch)
    if return_stats:
        return CrossEntropyStats(loss, entropy.view(targets.shape), is_top1.view(targets.shape),
                                 frozen_lse.view(targets.shape))
    return loss


class _ReservedLogits(torch.autograd.Function):
    """``hidden @ merged_weightᵀ`` from the frozen table and the K rows, with no V×D copy and no write into the table.

    Forward: one GEMM over the table, then the K reserved columns become ``hidden @ rowsᵀ`` — for the
    rows that differ from the table's own; columns of rows still equal to the table's keep the big GEMM's
    bits, so an untrained patched head is bit-identical to the original. Backward, the merged table's
    gradient: ``hidden`` gets ``g @ table + g[..., ids] @ (rows - table[ids])``, the rows get
    ``g[..., ids]ᵀ @ hidden`` (K×D), the table nothing.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, rows: Tensor, ids: Tensor) -> Tensor:
        logits = TF.linear(hidden, weight)
        own = TF.linear(hidden, rows)
        changed = (rows != weight.index_select(0, ids)).any(dim=1)
        logits.index_copy_(-1, ids, torch.where(changed, own, logits.index_select(-1, ids)))
        ctx.save_for_backward(hidden, weight, rows, ids)
        return logits

    @staticmethod
    def backward(ctx, grad: Tensor):
        hidden, weight, rows, ids = ctx.saved_tensors
        grad_res = grad.index_select(-1, ids)
        grad_hidden = grad_rows = None
        if ctx.needs_input_grad[0]:
            delta = (rows - weight.index_select(0, ids)).to(grad.dtype)
            grad_hidden = (grad @ weight.to(grad.dtype) + grad_res @ delta).to(hidden.dtype)
        if ctx.needs_input_grad[2]:
            flat = grad_res.reshape(-1, grad_res.shape[-1])
            grad_rows = (flat.t() @ hidden.reshape(-1, hidden.shape[-1]).to(grad.dtype)).to(rows.dtype)
        return grad_hidden, None, grad_rows, None


def reserved_logits(hidden: Tensor, weight: Tensor, reserved_weight: Tensor, reserved_ids: Tensor, *,
                    softcap: float | None = None) -> Tensor:
    """The logits ``(..., V)`` of the merged table (``weight`` with rows ``reserved_ids`` replaced by
    ``reserved_weight``, rounded to the table dtype), optionally soft-capped — without a V×D copy.

    Differentiable in ``hidden`` and ``reserved_weight`` (see :class:`_ReservedLogits`); the table gets no
    gradient. With no reserved ids it is ``hidden @ weightᵀ``.
    """
    if reserved_ids.numel():
        logits = _ReservedLogits.apply(hidden, weight, reserved_weight.to(weight.dtype), reserved_ids)
    else:
        logits = TF.linear(hidden, weight)
    return softcapped(logits, softcap) if softcap is not None else logits
