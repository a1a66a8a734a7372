"""Host-side planning for the deterministic, atomic-free segment sums (shared by the Triton and CUDA backends).

A segment sum ``out[k] = Σ rows(index[offsets[k]:offsets[k+1]])`` runs in two launches:

1. *pieces*: the positions are cut at every segment boundary and every ``CHUNK`` positions, so
   each piece lies inside one segment and holds at most ``CHUNK`` rows; one program per piece
   writes its fp32 partial sum. A one-hot id distribution (every token on one slot) therefore
   still spreads over ``N / CHUNK`` programs instead of serialising on one.
2. *reduce*: one program per segment adds its pieces' partial sums in piece order.

Both orders are fixed by the inputs alone, so the result is bitwise repeatable. Everything here
is torch ops on the device, with no host synchronisation (shapes depend on sizes, not values).
"""

from __future__ import annotations

import torch
from torch import Tensor

CHUNK = 128


def sort_tokens_by_slot(ids: Tensor, slot_map: Tensor, num_slots: int) -> tuple[Tensor, Tensor]:
    """Token positions ordered by slot (stable) and the (K + 1) segment offsets into that order.

    Tokens of non-reserved (or out-of-range) ids sort last, after ``offsets[K]``, and are never summed.
    """
    flat = ids.reshape(-1).long()
    valid = (flat >= 0) & (flat < slot_map.shape[0])
    slot = slot_map.index_select(0, flat.clamp(0, slot_map.shape[0] - 1)).long()
    slot = torch.where(valid & (slot >= 0), slot, num_slots)
    sorted_slot, order = torch.sort(slot, stable=True)
    offsets = torch.searchsorted(sorted_slot, torch.arange(num_slots + 1, device=ids.device))
    return order, offsets


def plan_pieces(offsets: Tensor, num_positions: int, chunk: int = CHUNK) -> tuple[Tensor, Tensor]:
    """Piece boundaries (P + 1, int64) and, per segment, its first piece (K + 1, int64).

    Piece ``p`` covers positions ``[bounds[p], bounds[p+1])``; segment ``k`` owns pieces
    ``[piece_offsets[k], piece_offsets[k+1])``. Empty pieces (repeated boundaries) sum to zero.
    """
    num_segments = offsets.shape[0] - 1
    starts = torch.arange(0, max(num_positions, 1), chunk, device=offsets.device)
    bounds, _ = torch.sort(torch.cat([offsets, starts]))
    owner = torch.searchsorted(offsets, bounds[:-1], right=True) - 1  # segment of each piece; K past the end
    piece_offsets = torch.searchsorted(owner, torch.arange(num_segments + 1, device=offsets.device))
    return bounds, piece_offsets


class SegmentedBackend:
    """The host logic the Triton and CUDA backends share; each provides four kernels.

    ``gather(ids, weight, reserved_weight, slot_map, weight_scaler, scale)``,
    ``scatter_atomic(grad (N, D), ids (N,), slot_map, num_slots, scale)``,
    ``piece_sum(src, index, bounds, table)`` with ``table = (reserved_weight, slot_map, weight_scaler)``
    or None, and ``segment_reduce(partial, piece_offsets, offsets, scale, mean)``.
    """

    def gather(self, ids, weight, reserved_weight, slot_map, weight_scaler, scale):
        raise NotImplementedError

    def scatter_atomic(self, grad, ids, slot_map, num_slots, scale):
        raise NotImplementedError

    def piece_sum(self, src, index, bounds, table):
        raise NotImplementedError

    def segment_reduce(self, partial, piece_offsets, offsets, scale, mean):
        raise NotImplementedError

    def scatter_grad(self, grad_out: Tensor, ids: Tensor, slot_map: Tensor, num_slots: int, scale: float,
                     deterministic: bool) -> Tensor:
        dim, num_tokens = grad_out.shape[-1], ids.numel()
        if num_slots == 0 or num_tokens == 0 or dim == 0:
            return torch.zeros((num_slots, dim), dtype=torch.float32, device=grad_out.device)
        grad = grad_out.view(num_tokens, dim)
        if deterministic:
            order, offsets = sort_tokens_by_slot(ids, slot_map, num_slots)
            return self._segment_sum(grad, order, offsets, scale=scale, mean=False, table=None)
        return self.scatter_atomic(grad, ids.view(-1), slot_map, num_slots, scale)

    def segment_mean(self, weight: Tensor, reserved_weight: Tensor, slot_map: Tensor,
                     weight_scaler: Tensor | None, offsets: Tensor, src_ids: Tensor) -> Tensor:
        return self._segment_sum(weight, src_ids.long(), offsets, scale=1.0, mean=True,
                                 table=(reserved_weight, slot_map, weight_scaler))

    def _segment_sum(self, src: Tensor, index: Tensor, offsets: Tensor, *, scale: float, mean: bool,
                     table) -> Tensor:
        num_segments, dim = offsets.shape[0] - 1, src.shape[1]
        if num_segments == 0 or dim == 0:
            return torch.zeros((num_segments, dim), dtype=torch.float32, device=src.device)
        bounds, piece_offsets = plan_pieces(offsets, index.shape[0])
        partial = self.piece_sum(src, index, bounds, table)
        return self.segment_reduce(partial, piece_offsets, offsets, scale, mean)
