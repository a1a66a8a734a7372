"""Finding the rows of an embedding table that were never trained, from the weights alone.

Many checkpoints carry such rows: Llama 3's ``<|reserved_special_token_N|>`` rows are near zero, Qwen's
rows beyond its tokenizer were never seen, a vocabulary's unused slots may all keep one initial value.
They are the free slots a plan can use — and rows that must not feed a mean initialisation.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

NORM_FRACTION = 0.1  # a row is "near zero" below this fraction of the median row norm
_CHUNK_ROWS = 16384  # rows per pass: bounds the temporary float copy of a large table


@dataclasses.dataclass(frozen=True)
class UntrainedRows:
    """The rows :func:`untrained_rows` found, by which test, and the thresholds it used."""

    low_norm: tuple[int, ...]  # L2 norm below norm_threshold
    duplicated: tuple[int, ...]  # bitwise identical to at least one other row
    median_norm: float
    norm_threshold: float

    @property
    def ids(self) -> list[int]:
        """Every untrained row, sorted."""
        return sorted(set(self.low_norm) | set(self.duplicated))

    def __contains__(self, row: object) -> bool:
        return row in self.low_norm or row in self.duplicated

    def __len__(self) -> int:
        return len(self.ids)


def _row_norms(weight: Tensor, weight_scaler: Tensor | None) -> Tensor:
    norms = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    for start in range(0, weight.shape[0], _CHUNK_ROWS):
        rows = weight[start:start + _CHUNK_ROWS].float()
        if weight_scaler is not None:
            rows = rows * weight_scaler[start:start + _CHUNK_ROWS].float().unsqueeze(-1)
        norms[start:start + _CHUNK_ROWS] = rows.norm(dim=1)
    return norms


def _duplicated(weight: Tensor) -> Tensor:
    """Bool per row: bitwise equal to another row (64-bit row hashes group candidates; equality is then checked)."""
    rows, dim = weight.shape
    bits = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[weight.element_size()]
    coefficients = torch.randint(1, 2**62, (dim,), generator=torch.Generator().manual_seed(0)).to(weight.device)
    hashes = torch.empty(rows, dtype=torch.int64, device=weight.device)
    for start in range(0, rows, _CHUNK_ROWS):
        chunk = weight[start:start + _CHUNK_ROWS].contiguous().view(bits).to(torch.int64)
        hashes[start:start + _CHUNK_ROWS] = (chunk * coefficients).sum(dim=1)  # wraps modulo 2**64
    _, group, counts = torch.unique(hashes, return_inverse=True, return_counts=True)
    index = torch.arange(rows, device=weight.device)
    first = torch.full((counts.numel(),), rows, dtype=torch.int64, device=weight.device)
    first = first.scatter_reduce(0, group, index, reduce="amin")[group]  # each row's group representative
    candidate = (counts[group] > 1) & (index != first)
    same = torch.zeros(rows, dtype=torch.bool, device=weight.device)
    cand = candidate.nonzero().squeeze(-1)
    same[cand] = (weight[cand] == weight[first[cand]]).all(dim=1)
    same[first[same]] = True  # a representative with an equal partner is a duplicate too
    return same


@torch.no_grad()
def untrained_rows(weight: Tensor, *, weight_scaler: Tensor | None = None,
                   norm_fraction: float = NORM_FRACTION) -> UntrainedRows:
    """Rows of ``weight`` that look never trained.

    * **near zero**: L2 norm below ``norm_fraction`` (default 0.1) times the median row norm;
    * **duplicated**: bitwise identical to at least one other row (rows still at a shared initial value).

    ``weight_scaler`` dequantises an int8 table (per-row scales) before the norms are taken. Works on
    tables of any size in chunks (no full float copy) and on any device.
    """
    if weight.dim() != 2 or weight.shape[0] == 0:
        raise ValueError(f"weight must be a non-empty 2-D table, got shape {tuple(weight.shape)}")
    if not 0 <= norm_fraction < 1:
        raise ValueError(f"norm_fraction must lie in [0, 1), got {norm_fraction}")
    weight = weight.detach()
    norms = _row_norms(weight, weight_scaler)
    median = float(norms.median())
    threshold = norm_fraction * median
    low = (norms < threshold).nonzero().squeeze(-1).tolist()
    duplicated = _duplicated(weight if weight_scaler is None else weight.to(weight_scaler.dtype)
                             * weight_scaler.detach().unsqueeze(-1))
    return UntrainedRows(low_norm=tuple(low), duplicated=tuple(duplicated.nonzero().squeeze(-1).tolist()),
                         median_norm=median, norm_threshold=threshold)
