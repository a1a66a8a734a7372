"""Finding the rows of an embedding table that were never trained, from the weights alone.

Many checkpoints carry such rows: Llama 3's ``<|reserved_special_token_N|>`` rows are near zero, Qwen's
rows beyond its tokenizer were never seen, a vocabulary's unused slots may all keep one initial value.
And some never-trained rows are neither small nor equal: every row of Gemma 3 270M's table has a norm
near 1.03, yet its ``<unusedN>`` rows point nearly one way — the softmax moved them all together, away
from every token that did occur (Land & Bartolo 2024, "Fishing for Magikarp"). They are the free slots a
plan can use — and rows that must not feed a mean initialisation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor

from reserved_kernels._table import dequantised

NORM_FRACTION = 0.1  # a row is "near zero" below this fraction of the median row norm
# The reference rows must share a direction to be one: their median cosine with their mean direction.
COHERENCE = 0.5
# Power iterations for the first principal direction (a fixed start: deterministic). Gemma 3 270M's first
# eigenvalue is 4.8x its second, so 16 steps leave (1/4.8)^16 ~ 1e-11 of the rest.
_POWER_STEPS = 16
_CHUNK_ROWS = 16384  # rows per pass: bounds the temporary float copy of a large table


@dataclasses.dataclass(frozen=True)
class UntrainedRows:
    """The rows :func:`untrained_rows` found, by which test, and the thresholds it used.

    ``low_norm``: L2 norm below ``norm_threshold``. ``duplicated``: bitwise identical to another row.
    ``unused_direction``: cosine with the reference rows' shared direction above ``direction_threshold``
    (``direction_scores`` holds every row's cosine); empty, with ``direction_skipped`` saying why, when
    no reference rows were given or they share no direction.
    """

    low_norm: tuple[int, ...]
    duplicated: tuple[int, ...]
    median_norm: float
    norm_threshold: float
    unused_direction: tuple[int, ...] = ()
    direction_threshold: float | None = None
    direction_skipped: str | None = "no reference rows"
    direction_scores: Tensor | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def ids(self) -> list[int]:
        """Every untrained row, sorted."""
        return sorted(set(self.low_norm) | set(self.duplicated) | set(self.unused_direction))

    def __contains__(self, row: object) -> bool:
        return row in self.low_norm or row in self.duplicated or row in self.unused_direction

    def __len__(self) -> int:
        return len(self.ids)

    def tests_of(self, row: int) -> list[str]:
        """Which tests flagged ``row``, each with its value and threshold (e.g. for a report)."""
        found = []
        if row in self.low_norm:
            found.append(f"low norm (< {self.norm_threshold:.4g}, 0.1 x the median row norm)")
        if row in self.duplicated:
            found.append("bitwise identical to another row")
        if row in self.unused_direction:
            found.append(f"unused direction (cosine {float(self.direction_scores[row]):.3f} > "
                         f"{self.direction_threshold:.3f})")
        return found

    def summary(self) -> str:
        """One line: how many rows each test flagged, and its threshold."""
        direction = (f"{len(self.unused_direction):,} in the reserved rows' direction (cosine > "
                     f"{self.direction_threshold:.3f})" if self.direction_skipped is None
                     else f"direction test skipped: {self.direction_skipped}")
        return (f"{len(self):,} untrained rows: {len(self.low_norm):,} near zero (norm < {self.norm_threshold:.4g}), "
                f"{len(self.duplicated):,} duplicated, {direction}")


def _float_rows(weight: Tensor, weight_scaler: Tensor | None, start: int) -> Tensor:
    rows = weight[start:start + _CHUNK_ROWS].float()
    if weight_scaler is not None:
        rows = dequantised(rows, weight_scaler[start:start + _CHUNK_ROWS].float())
    return rows


def _row_norms(weight: Tensor, weight_scaler: Tensor | None) -> Tensor:
    norms = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    for start in range(0, weight.shape[0], _CHUNK_ROWS):
        norms[start:start + _CHUNK_ROWS] = _float_rows(weight, weight_scaler, start).norm(dim=1)
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


def _first_direction(weight: Tensor, weight_scaler: Tensor | None) -> Tensor:
    """The table's first (uncentred) principal direction, by power iteration on WᵀW from a fixed start: two
    matrix-vector products per step (cheaper than forming the D x D WᵀW once D is large)."""
    v = torch.ones(weight.shape[1], dtype=torch.float32, device=weight.device)
    for _ in range(_POWER_STEPS):
        w = torch.zeros_like(v)
        for start in range(0, weight.shape[0], _CHUNK_ROWS):
            rows = _float_rows(weight, weight_scaler, start)
            w += rows.T @ (rows @ v)
        v = w / w.norm()
    return v


def _directions(weight: Tensor, weight_scaler: Tensor | None, pc: Tensor, start: int) -> Tensor:
    """Unit rows with the first principal direction removed (a chunk)."""
    rows = _float_rows(weight, weight_scaler, start)
    rows = rows - (rows @ pc).unsqueeze(1) * pc
    return rows / rows.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


def _direction_test(weight: Tensor, weight_scaler: Tensor | None,
                    reference: Tensor) -> tuple[Tensor | None, float | None, str | None]:
    """(scores, threshold, why skipped): each row's cosine with the reference rows' shared direction."""
    if reference.numel() < 2:
        return None, None, "fewer than two reference rows with a norm (near-zero rows have no direction)"
    pc = _first_direction(weight, weight_scaler)
    total = torch.zeros(weight.shape[1], dtype=torch.float32, device=weight.device)
    for start in range(0, weight.shape[0], _CHUNK_ROWS):
        inside = reference[(reference >= start) & (reference < start + _CHUNK_ROWS)] - start
        if inside.numel():
            total += _directions(weight, weight_scaler, pc, start).index_select(0, inside).sum(0)
    shared = total / total.norm().clamp_min(torch.finfo(torch.float32).tiny)
    scores = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    for start in range(0, weight.shape[0], _CHUNK_ROWS):
        scores[start:start + _CHUNK_ROWS] = _directions(weight, weight_scaler, pc, start) @ shared
    typical_reference = float(scores[reference].median())
    if typical_reference < COHERENCE:
        return scores, None, (f"the reference rows share no direction (their median cosine with it is "
                              f"{typical_reference:.2f} < {COHERENCE})")
    return scores, (float(scores.median()) + typical_reference) / 2, None


@torch.no_grad()
def untrained_rows(weight: Tensor, *, weight_scaler: Tensor | None = None, norm_fraction: float = NORM_FRACTION,
                   reference_ids: Sequence[int] | Tensor | None = None) -> UntrainedRows:
    """Rows of ``weight`` that look never trained.

    * **near zero**: L2 norm below ``norm_fraction`` (default 0.1) times the median row norm;
    * **duplicated**: bitwise identical to at least one other row (rows still at a shared initial value);
    * **in the unused direction** (with ``reference_ids``, rows known never to have been trained — a
      tokenizer's reserved slots): magikarp's indicator. Remove the table's first principal direction
      (a component every row shares), take the mean direction of the reference rows (those not near
      zero), and flag every row whose cosine with it is above the threshold halfway between a typical
      row's cosine (the median over all rows) and a typical reference row's. Skipped, with the reason,
      when the reference rows share no direction (median cosine below 0.5), as near-zero noise does.

    ``weight_scaler`` dequantises an int8 table (per-row scales) first. Works on tables of any size in
    chunks (no full float copy) and on any device.
    """
    if weight.dim() != 2 or weight.shape[0] == 0:
        raise ValueError(f"weight must be a non-empty 2-D table, got shape {tuple(weight.shape)}")
    if not 0 <= norm_fraction < 1:
        raise ValueError(f"norm_fraction must lie in [0, 1), got {norm_fraction}")
    weight = weight.detach()
    norms = _row_norms(weight, weight_scaler)
    median = float(norms.median())
    threshold = norm_fraction * median
    low = norms < threshold
    duplicated = _duplicated(weight if weight_scaler is None else dequantised(weight, weight_scaler.detach()))
    found = dict(low_norm=tuple(low.nonzero().squeeze(-1).tolist()),
                 duplicated=tuple(duplicated.nonzero().squeeze(-1).tolist()), median_norm=median,
                 norm_threshold=threshold)
    if reference_ids is None:
        return UntrainedRows(**found)
    reference = torch.as_tensor(reference_ids, dtype=torch.int64).reshape(-1).to(weight.device)
    if reference.numel() and (int(reference.min()) < 0 or int(reference.max()) >= weight.shape[0]):
        raise IndexError(f"reference_ids must lie in [0, {weight.shape[0]})")
    reference = reference[~low[reference]].unique()
    scores, cut, skipped = _direction_test(weight, weight_scaler, reference)
    flagged = () if cut is None else tuple((scores > cut).nonzero().squeeze(-1).tolist())
    return UntrainedRows(**found, unused_direction=flagged, direction_threshold=cut, direction_skipped=skipped,
                         direction_scores=scores)
