"""Frozen text: the exact loss of ordinary text at the model's current rows, for O(K·D) a token.

In text without a reserved id (at or before a position, in its row) a patched model's hidden state ``h`` is a
constant while only the K rows train (:mod:`reserved_kernels.models.position_split`), and so are the log-sum-exp
over the V − K frozen columns of the head and the target's logit when the target is a frozen token. Only the K
reserved columns move. So the loss of such a position at the current rows ``R`` is exactly::

    loss = log(exp(lse_frozen) + Σ_k exp(cap(h·R_k))) − z_target       z_target = cap(h·R_k) for target slot k

:class:`FrozenText` runs the model over the text once (no gradients, evaluation mode) and keeps, for every counted
position, ``h`` (in the model's dtype), ``lse_frozen`` (the fused loss's ``frozen_lse`` statistic, from the same
pass over the table) and ``z_target``: D + 2 numbers a token. Every later :meth:`FrozenText.loss` costs N·K·D
multiply-adds instead of a forward pass (N·V·D for the head alone), and is differentiable in the rows: held-out
perplexity at every step (:class:`PerplexityCallback`), or ordinary text in the training loss for next to
nothing. A Trainer subclass adds it to the loss::

    class MixTrainer(transformers.Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if return_outputs:
                return loss[0] + 0.5 * ordinary.loss(), loss[1]
            return loss + 0.5 * ordinary.loss()
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from reserved_kernels import functional as F
from reserved_kernels._progress import Ticker
from reserved_kernels._table import acc_dtype, cap_slope, softcapped
from reserved_kernels.models import position_split
from reserved_kernels.models.batches import batch_parts, config_softcap, default_labels
from reserved_kernels.models.integrations.gemma_pytorch import decoder_states, tied_table
from reserved_kernels.models.layout import base_model, is_gemma_pytorch, output_head
from reserved_kernels.models.state import patch_state
from reserved_kernels.modules.lm_head import ReservedHead

EVAL_CHUNK_BYTES = 64 << 20  # the hidden states upcast per chunk of an evaluation


class StaleFrozenText(RuntimeError):
    """The model no longer computes the hidden states a :class:`FrozenText` holds."""


@dataclasses.dataclass
class _Head:
    """The tied or untied output head as the loss sees it: the frozen table, the trainable rows, their slots."""

    table: Tensor
    rows: nn.Parameter
    slot_map: Tensor
    softcap: float | None


def _head(model: nn.Module) -> _Head:
    base = base_model(model)
    softcap = config_softcap(base)
    if is_gemma_pytorch(base):
        table, rows, _, slot_map = tied_table(base)
        return _Head(table, rows, slot_map, softcap)
    head = output_head(model)
    if not isinstance(head, ReservedHead):
        raise TypeError(f"{type(head).__name__} is not a patched head: FrozenText needs the head patch_model "
                        "installs (patch_model(model, ...) first)")
    return _Head(head.weight.detach(), head.reserved_weight, head.slot_map,
                 softcap if softcap is not None else head.final_logit_softcapping)


def _hidden_states(model: nn.Module, ids: Tensor, mask: Tensor | None) -> Tensor:
    """(B, T, D) final hidden states (before the head) of a Hugging Face or gemma_pytorch-layout model."""
    base = base_model(model)
    if is_gemma_pytorch(base):
        return decoder_states(base, ids)
    return base.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state


def _refuse_reached(index: int, ids: Tensor, targets: Tensor, slot_map: Tensor) -> None:
    """A counted position at or after a reserved id of its row is not frozen: refused, by batch, row and position."""
    hit = position_split.reserved_hits(ids, slot_map)[:, :-1]  # the last position predicts nothing
    reached = hit.int().cummax(1).values.bool() & (targets != -100)
    if bool(reached.any()):
        row = int(reached.any(1).int().argmax())
        first = int(hit[row].int().argmax())
        raise ValueError(f"batch {index}, row {row}: the reserved id {int(ids[row, first])} at position {first} "
                         "reaches "
                         f"the counted positions from {first} on, which are not frozen; FrozenText keeps only text no "
                         "reserved id reaches (leave the row out, or set its labels to -100 from position "
                         f"{first + 1})")


class FrozenText:
    """Ordinary text kept for the exact loss at the model's current rows, at O(K·D) a token (see the module).

    Args:
        model: a model patched by :func:`~reserved_kernels.models.patch_model` (Hugging Face, tied or untied head,
            a PEFT wrapper, or gemma_pytorch's layout).
        batches: ``input_ids`` tensors (B, T), or dicts with ``input_ids`` and optionally ``attention_mask`` and
            ``labels`` (unshifted, -100 where not a target), as a DataLoader yields them. The model's own shift
            applies: position t predicts label t + 1. Every counted position must be one no reserved id reaches;
            any other is refused (ValueError naming the batch, row and position), never computed.
        path: keep the hidden states in this file (memory-mapped; read back chunk by chunk), for sets that do not
            fit in memory. The file is the store: keep it while the object lives.
        progress: print the pass's progress on stderr when it takes over a second.

    The pass runs in evaluation mode (no dropout), without gradients, at the current rows (the frozen columns do
    not depend on them). :meth:`loss` then refuses (:class:`StaleFrozenText`) a model that no longer computes the
    same hidden states: unpatched or merged, a parameter other than the reserved rows requiring grad (a LoRA adapter
    training beside the rows makes every hidden state move), or any such parameter changed in place (its version
    counter) or replaced since the pass.
    """

    def __init__(self, model: nn.Module, batches: Iterable[Tensor | Mapping[str, Tensor]], *,
                 path: str | os.PathLike | None = None, progress: bool = True) -> None:
        if patch_state(model) is None:
            raise TypeError(f"{type(model).__name__} is not patched: FrozenText evaluates a patched model's reserved "
                            "rows (reserved_kernels.patch_model(model, ...) first)")
        self._model = model
        head = _head(model)
        self._rows, self._softcap = head.rows, head.softcap
        self._acc = acc_dtype(head.table.dtype)
        lse, zt, reserved_at, reserved_slot, stored = [], [], [], [], []
        sink = open(path, "wb") if path is not None else None
        ticker = Ticker("FrozenText: the one pass", enabled=progress)
        positions, index, dtype = 0, -1, None
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for index, batch in enumerate(batches):
                    ids, mask, labels = batch_parts(batch, index)
                    labels = default_labels(ids, mask) if labels is None else labels
                    targets = labels[:, 1:].to(ids.device)
                    _refuse_reached(index, ids, targets, head.slot_map)
                    counted = targets != -100
                    h = _hidden_states(model, ids, mask)[:, :-1][counted]
                    t = targets[counted]
                    stats = F.linear_cross_entropy(h, head.table, head.rows.detach(), head.slot_map, t,
                                                   softcap=head.softcap, reduction="none", return_stats=True)
                    slot = head.slot_map.index_select(0, t.long()).long()
                    z = (h.to(self._acc) * head.table.index_select(0, t.long()).to(self._acc)).sum(-1)
                    z = softcapped(z, head.softcap) if head.softcap is not None else z
                    lse.append(stats.frozen_lse)
                    zt.append(torch.where(slot >= 0, 0, z))
                    on_slot = (slot >= 0).nonzero().squeeze(1)
                    reserved_at.append(on_slot + positions)
                    reserved_slot.append(slot.index_select(0, on_slot))
                    dtype = h.dtype
                    if sink is not None:
                        h.contiguous().cpu().view(torch.uint8).numpy().tofile(sink)
                    else:
                        stored.append(h)
                    positions += h.shape[0]
                    ticker.tick(f"{index + 1} batches, {positions:,} positions")
        finally:
            model.train(was_training)
            if sink is not None:
                sink.close()
        if positions == 0:
            raise ValueError(f"no counted position in {index + 1} batches: every batch was empty or fully masked")
        ticker.done(f"{index + 1} batches, {positions:,} positions")
        dim = head.table.shape[1]
        self.path = os.fspath(path) if path is not None else None
        if path is not None:
            self._h = torch.from_file(self.path, shared=False, size=positions * dim, dtype=dtype).view(positions, dim)
        else:
            self._h = torch.cat(stored)
        self._lse, self._zt = torch.cat(lse), torch.cat(zt)
        # The reserved targets' positions (ascending) stay on the host: each evaluation finds a chunk's share by a
        # host-side search, with no synchronisation on the device.
        self._reserved_at, self._reserved_slot = torch.cat(reserved_at).cpu(), torch.cat(reserved_slot)
        self._table_dtype = head.table.dtype
        self.batches = index + 1
        self._versions = self._parameter_versions()

    # --------------------------------------------------------------------------------------------- reading

    def __len__(self) -> int:
        """The number of counted positions held."""
        return self._h.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes held in memory: the hidden states (unless they are on disk), the two statistics, the reserved
        targets."""
        small = sum(t.numel() * t.element_size() for t in (self._lse, self._zt, self._reserved_at, self._reserved_slot))
        return small + (0 if self.path is not None else self._h.numel() * self._h.element_size())

    @property
    def disk_bytes(self) -> int:
        """Bytes of the memory-mapped file (0 when the store is in memory)."""
        return self._h.numel() * self._h.element_size() if self.path is not None else 0

    def __repr__(self) -> str:
        where = f"{self.disk_bytes / 2**20:,.1f} MiB on disk at {self.path!r} + " if self.path is not None else ""
        return (f"FrozenText({len(self):,} positions from {self.batches} batches, D={self._h.shape[1]}, "
                f"{where}{self.nbytes / 2**20:,.1f} MiB in memory)")

    # ------------------------------------------------------------------------------------------ evaluation

    def _parameter_versions(self) -> dict[int, int]:
        rows = {id(p) for p in position_split.reserved_rows(self._model)}
        return {id(p): p._version for p in self._model.parameters() if id(p) not in rows}

    def _check_current(self) -> None:
        model = self._model
        if patch_state(model) is None:
            raise StaleFrozenText("the model was merged or unpatched after the pass: FrozenText evaluates a patched "
                                  "model's rows")
        if not any(p is self._rows for p in position_split.reserved_rows(model)):
            raise StaleFrozenText("the model was patched again after the pass: its rows are not the ones the "
                                  "store was made for; make a new FrozenText")
        other = position_split.other_trainable(model)
        if other is not None:
            raise StaleFrozenText(f"{other} requires grad: with a parameter besides the reserved rows training "
                                  "(a LoRA adapter), the hidden states the store holds go stale; FrozenText "
                                  "serves the rows alone")
        if self._parameter_versions() != self._versions:
            raise StaleFrozenText("a parameter other than the reserved rows changed since the pass (in place, "
                                  "or replaced): the stored hidden states are stale; make a new FrozenText")

    def loss(self) -> Tensor:
        """The mean next-token loss over the stored positions at the model's current rows: exact (the
        same arithmetic as the fused loss up to the order of its sums), a scalar in float32 (float64 for a
        float64 model), differentiable with respect to the rows. N·K·D multiply-adds; no pass over the table."""
        self._check_current()
        want_grad = torch.is_grad_enabled() and self._rows.requires_grad
        return _CachedLoss.apply(self._rows, self, want_grad)

    def perplexity(self) -> float:
        """``exp`` of :meth:`loss`, without gradients."""
        with torch.no_grad():
            return math.exp(float(self.loss()))

    def _evaluate(self, rows: Tensor, want_grad: bool) -> tuple[Tensor, Tensor | None]:
        """(mean loss, its gradient with respect to the rows or None), chunk by chunk of the store."""
        acc, device, cap = self._acc, rows.device, self._softcap
        r = rows.detach().to(self._table_dtype).to(acc)  # as the forward pass sees them: rounded to the table dtype
        count, dim = self._h.shape
        chunk = max(EVAL_CHUNK_BYTES // (dim * torch.finfo(acc).bits // 8), 1)
        total = torch.zeros((), dtype=torch.float64, device=device)
        grad = torch.zeros_like(r) if want_grad else None
        bounds = torch.searchsorted(self._reserved_at, torch.arange(0, count + chunk, chunk)).tolist()  # host-side
        for c0 in range(0, count, chunk):
            c1 = min(c0 + chunk, count)
            h = self._h[c0:c1].to(device=device, dtype=acc)
            z = h @ r.T
            if cap is not None:
                z = softcapped(z, cap)
            lse = torch.logaddexp(self._lse[c0:c1].to(device), z.logsumexp(1))
            lo, hi = bounds[c0 // chunk], bounds[c0 // chunk + 1]
            rows_here = (self._reserved_at[lo:hi] - c0).to(device)
            slots_here = self._reserved_slot[lo:hi].to(device)
            zt = self._zt[c0:c1].to(device).index_put((rows_here,), z[rows_here, slots_here])
            total += (lse - zt).sum(dtype=torch.float64)
            if want_grad:
                p = torch.exp(z - lse.unsqueeze(1))
                slope = cap_slope(z, cap) if cap is not None else torch.ones_like(z)
                p.mul_(slope).index_put_((rows_here, slots_here), -slope[rows_here, slots_here], accumulate=True)
                grad.addmm_(p.T, h)
        return (total / count).to(acc), (grad / count if want_grad else None)


class _CachedLoss(torch.autograd.Function):
    """:meth:`FrozenText.loss`: the rows' gradient is computed in the forward chunk by chunk (no chunk kept for
    the backward), and the backward scales it by the upstream gradient."""

    @staticmethod
    def forward(ctx, rows: Tensor, text: FrozenText, want_grad: bool) -> Tensor:
        loss, grad = text._evaluate(rows, want_grad)
        ctx.rows_dtype = rows.dtype
        if grad is not None:
            ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, upstream: Tensor):
        (grad,) = ctx.saved_tensors
        return (grad * upstream).to(ctx.rows_dtype), None, None
