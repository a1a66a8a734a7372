"""``ReservedEmbedding``: an ``nn.Embedding`` whose K reserved rows train and whose other rows stay frozen."""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from reserved_kernels import functional as F
from reserved_kernels._table import SIXTEEN_BIT, dequantised, table_dtype


def default_reserved_dtype(table_dtype: torch.dtype) -> torch.dtype:
    """float32 master rows for a 16-bit table (a small update is not rounded away), else the table's dtype."""
    return torch.float32 if table_dtype in SIXTEEN_BIT else table_dtype


def quantize_rows(rows: Tensor, scaler_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Symmetric int8 rows with one scale each: ``rows ≈ q * s``, ``|q * s - rows| <= s / 2`` elementwise.

    ``s = max|row| / 127`` rounded to ``scaler_dtype`` (gemma_pytorch's per-row ``weight_scaler``); that
    rounding moves ``s`` by at most half an ulp, so ``|row| / s`` stays below 127.5 and no value clamps.
    """
    rows = rows.float()
    scale = (rows.abs().amax(dim=1) / 127).to(scaler_dtype)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row: q = 0 with any scale
    q = torch.round(rows / scale.float().unsqueeze(1)).clamp_(-127, 127).to(torch.int8)
    return q, scale


class ReservedEmbedding(nn.Embedding):
    """Drop-in ``nn.Embedding`` that trains only the rows ``reserved_ids``.

    ``weight`` is the frozen (V, D) table (``requires_grad=False``; the forward and backward passes never
    write it). ``reserved_weight`` is the trainable (K, D) Parameter that replaces rows ``reserved_ids``
    in the forward pass, rounded to the table dtype there; for a 16-bit table it holds float32 master
    values by default, so an AdamW step of 1e-5 is not rounded away. The backward pass produces only
    a K×D gradient (bitwise repeatable), so optimizer state is K×D too, and weight decay can never move
    a frozen row.

    Args:
        num_embeddings, embedding_dim, padding_idx, device, dtype: as for ``nn.Embedding``.
        reserved_ids: the K distinct ids whose rows train (keyword-only).
        scale: multiplies every output row, rounded to the table dtype first (Gemma's √D normaliser).
        weight_scaler: per-row float scales of an int8 table (gemma_pytorch's quantised embedder);
            the output then has the scaler's dtype.
        reserved_dtype: dtype of ``reserved_weight``; default float32 for 16-bit tables, else the
            table's. Pass the table dtype to keep the rows in it.

    The state dict holds ``weight`` as the forward pass sees it (reserved rows rounded to the table
    dtype in place: a plain ``nn.Embedding`` loads it), ``reserved_weight`` (the master rows, so
    training resumes exactly) and ``reserved_ids``. ``max_norm``, ``scale_grad_by_freq`` and
    ``sparse=True`` are not supported and raise.
    """

    reserved_ids: Tensor
    weight_scaler: Tensor | None
    slot_map: Tensor

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None,
                 max_norm: float | None = None, norm_type: float = 2.0, scale_grad_by_freq: bool = False,
                 sparse: bool = False, _weight: Tensor | None = None, _freeze: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None, *,
                 reserved_ids: Tensor | Sequence[int], scale: float | None = None,
                 weight_scaler: Tensor | None = None, reserved_dtype: torch.dtype | None = None) -> None:
        if max_norm is not None:
            raise NotImplementedError("ReservedEmbedding does not support max_norm: it renormalises frozen rows "
                                      "in place during the forward pass")
        if scale_grad_by_freq:
            raise NotImplementedError("ReservedEmbedding does not support scale_grad_by_freq")
        if sparse:
            raise NotImplementedError("ReservedEmbedding does not support sparse=True: its gradient is already a "
                                      "compact K×D tensor, so any dense optimizer (AdamW, …) works")
        if _weight is not None and not _weight.is_floating_point() and weight_scaler is None:
            raise TypeError(f"an integer table ({_weight.dtype}) needs weight_scaler (per-row scales)")
        # The frozen table is created (or adopted, without a copy) by nn.Embedding itself.
        super().__init__(num_embeddings, embedding_dim, padding_idx, None, norm_type, False, False,
                         _weight, True, device, dtype)
        ids = F.check_reserved_ids(reserved_ids, num_embeddings, self.padding_idx)
        device = self.weight.device
        if weight_scaler is not None:
            if weight_scaler.shape != (num_embeddings,) or not weight_scaler.is_floating_point():
                raise ValueError(f"weight_scaler must be a floating ({num_embeddings},) vector, "
                                 f"got {weight_scaler.dtype} {tuple(weight_scaler.shape)}")
            weight_scaler = weight_scaler.detach().to(device)
        self.register_buffer("weight_scaler", weight_scaler)
        self.register_buffer("reserved_ids", ids.to(device))
        self.register_buffer("slot_map", F.build_slot_map(ids, num_embeddings, device), persistent=False)
        table_dtype = self.table_dtype
        reserved_dtype = default_reserved_dtype(table_dtype) if reserved_dtype is None else reserved_dtype
        if reserved_dtype not in (table_dtype, torch.float32):
            raise TypeError(f"reserved_dtype must be the table's dtype ({table_dtype}) or torch.float32, "
                            f"got {reserved_dtype}")
        self.reserved_weight = nn.Parameter(self._base_rows(self.weight, self.weight_scaler, self.reserved_ids,
                                                            reserved_dtype))
        self.scale = scale

    @classmethod
    def from_embedding(cls, embedding_or_weight: nn.Module | Tensor, reserved_ids: Tensor | Sequence[int], *,
                       scale: float | None = None, weight_scaler: Tensor | None = None,
                       reserved_dtype: torch.dtype | None = None) -> ReservedEmbedding:
        """Wrap an existing ``nn.Embedding`` (or any module with a 2-D ``weight``, or a weight tensor).

        The new module adopts the existing ``weight`` Parameter itself (no V×D copy) and sets its
        ``requires_grad`` to False, so anything holding that Parameter sees the table as frozen.
        ``padding_idx`` and a module's ``weight_scaler`` (gemma_pytorch's int8 embedder) are carried over.
        """
        padding_idx = None
        if isinstance(embedding_or_weight, Tensor):
            weight = embedding_or_weight
        elif isinstance(getattr(embedding_or_weight, "weight", None), Tensor):
            weight = embedding_or_weight.weight
            padding_idx = getattr(embedding_or_weight, "padding_idx", None)
            if isinstance(embedding_or_weight, nn.Embedding):
                if embedding_or_weight.max_norm is not None or embedding_or_weight.sparse:
                    raise NotImplementedError("cannot wrap an nn.Embedding with max_norm or sparse=True")
            if weight_scaler is None:
                weight_scaler = getattr(embedding_or_weight, "weight_scaler", None)
        else:
            raise TypeError(f"expected an nn.Embedding, a module with a 2-D weight, or a tensor; "
                            f"got {type(embedding_or_weight).__name__}")
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D (V, D), got shape {tuple(weight.shape)}")
        module = cls(weight.shape[0], weight.shape[1], padding_idx, _weight=weight.detach(), reserved_ids=reserved_ids,
                     scale=scale, weight_scaler=weight_scaler, reserved_dtype=reserved_dtype)
        if isinstance(weight, nn.Parameter):
            module.weight = weight.requires_grad_(False)
        return module

    @staticmethod
    def _base_rows(weight: Tensor, weight_scaler: Tensor | None, ids: Tensor, dtype: torch.dtype) -> Tensor:
        """``weight[ids]`` as the forward pass reads it (dequantised), as a new ``dtype`` tensor."""
        rows = weight.detach().index_select(0, ids.to(weight.device))
        if weight_scaler is not None:
            rows = dequantised(rows, weight_scaler.detach().index_select(0, ids))
        return rows.to(dtype, copy=True)

    @property
    def table_dtype(self) -> torch.dtype:
        """The dtype of the output rows: the table's, or the per-row scales' for an int8 table."""
        return table_dtype(self.weight, self.weight_scaler)

    @property
    def num_reserved(self) -> int:
        return self.reserved_ids.numel()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, "reserved_weight"):  # nn.Embedding.__init__ calls this before it exists
            self.reset_reserved_()

    @torch.no_grad()
    def reset_reserved_(self) -> None:
        """Set the reserved rows back to the table's rows ``weight[reserved_ids]``."""
        self.reserved_weight.copy_(self._base_rows(self.weight, self.weight_scaler, self.reserved_ids,
                                                   self.reserved_weight.dtype))

    def forward(self, input: Tensor) -> Tensor:
        return F.reserved_embedding(input, self.weight, self.reserved_weight, self.slot_map,
                                    weight_scaler=self.weight_scaler, scale=self.scale)

    @torch.no_grad()
    def merged_weight(self) -> Tensor:
        """A (V, D) copy of the table as the forward pass sees it (dequantised, reserved rows in place)."""
        if self.weight_scaler is not None:
            merged = dequantised(self.weight, self.weight_scaler)
        else:
            merged = self.weight.detach().clone()
        return merged.index_copy_(0, self.reserved_ids, self.reserved_weight.to(merged.dtype))

    @torch.no_grad()
    def merged_table(self) -> tuple[Tensor, Tensor | None]:
        """``(weight, weight_scaler)`` copies with the trained rows written in, in the table's own format.

        A float table gets the rows rounded to its dtype. An int8 table gets each trained row
        re-quantised with its own new scale (:func:`quantize_rows`): the dequantised row is within
        half a quantisation step (``weight_scaler[i] / 2``) of the trained row, elementwise.
        """
        if self.weight_scaler is None:
            table = self.weight.detach().clone()
            return table.index_copy_(0, self.reserved_ids, self.reserved_weight.to(table.dtype)), None
        q, scale = quantize_rows(self.reserved_weight, self.weight_scaler.dtype)
        table = self.weight.detach().clone().index_copy_(0, self.reserved_ids, q)
        return table, self.weight_scaler.detach().clone().index_copy_(0, self.reserved_ids, scale)

    @torch.no_grad()
    def merge_(self) -> ReservedEmbedding:
        """Write the trained rows into ``weight`` (and ``weight_scaler``) in place, for export.

        Rows are rounded to the table dtype (re-quantised for int8, see :meth:`merged_table`). This is
        the one method that writes the frozen table; the forward pass is unchanged by it.
        """
        if self.weight_scaler is None:
            self.weight.index_copy_(0, self.reserved_ids, self.reserved_weight.to(self.weight.dtype))
        else:
            q, scale = quantize_rows(self.reserved_weight, self.weight_scaler.dtype)
            self.weight.index_copy_(0, self.reserved_ids, q)
            self.weight_scaler.index_copy_(0, self.reserved_ids, scale)
        return self

    def to_embedding(self) -> nn.Embedding:
        """A plain ``nn.Embedding`` holding the merged rows, dequantised (the scale is not folded in)."""
        merged = self.merged_weight()
        return nn.Embedding(self.num_embeddings, self.embedding_dim, self.padding_idx, _weight=merged,
                            device=merged.device, dtype=merged.dtype)

    @torch.no_grad()
    def init_reserved_(self, sources, *, targets: Tensor | Sequence[int] | None = None, exclude=None,
                       noise_std: float = 0.0, generator: torch.Generator | None = None) -> ReservedEmbedding:
        """Set each target's reserved row to the mean of its source rows, all in one batched op.

        Args:
            sources: one list of source ids per target, or an ``(offsets, ids)`` int64 CSR pair; a
                single list is shared by every target. Rows are read as the forward pass sees them,
                all before any write.
            targets: reserved ids to initialise (default: all of ``reserved_ids``, in order).
            exclude: ids dropped from every source list (e.g. untrained reserved rows).
            noise_std, generator: add ``noise_std * N(0, 1)`` noise drawn from ``generator``.
        """
        F.init_reserved_rows_(self.reserved_weight, self.weight, self.slot_map, self.reserved_ids, sources,
                              targets=targets, weight_scaler=self.weight_scaler, exclude=exclude,
                              noise_std=noise_std, generator=generator)
        return self

    # ------------------------------------------------------------------------------------------ state dict

    def state_dict_table(self) -> tuple[Tensor, Tensor | None]:
        """:meth:`merged_table`, made once per state: a tied head's entry is then the same tensor (saved once)."""
        key = (self.weight._version, self.reserved_weight._version,
               None if self.weight_scaler is None else self.weight_scaler._version)
        cached = self.__dict__.get("_merged_cache")
        if cached is not None and cached[0] == key:
            table, scaler = cached[1](), cached[2]() if cached[2] is not None else None
            if table is not None and (scaler is not None or cached[2] is None):
                return table, scaler
        table, scaler = self.merged_table()
        self.__dict__["_merged_cache"] = (key, weakref.ref(table), weakref.ref(scaler) if scaler is not None else None)
        return table, scaler

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if keep_vars or type(self.weight) not in (Tensor, nn.Parameter):
            return  # live variables asked for, or a sharded (DTensor) table: keep the table as it is
        table, scaler = self.state_dict_table()
        destination[prefix + "weight"] = table
        if scaler is not None:
            destination[prefix + "weight_scaler"] = scaler

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        ids_key, rows_key, weight_key = prefix + "reserved_ids", prefix + "reserved_weight", prefix + "weight"
        local = {k: v for k, v in state_dict.items() if k.startswith(prefix)}
        if ids_key in local:
            ids = F.check_reserved_ids(local[ids_key], self.num_embeddings, self.padding_idx)
            if ids.numel() != self.num_reserved:
                raise ValueError(f"state dict has {ids.numel()} reserved ids, this module {self.num_reserved}")
        else:
            ids = self.reserved_ids
        if rows_key not in local and weight_key in local:
            # A plain table (nn.Embedding, or a merged export): the reserved rows start as its rows.
            scaler = local.get(prefix + "weight_scaler", self.weight_scaler)
            local[rows_key] = self._base_rows(local[weight_key], scaler, ids, self.reserved_weight.dtype)
            local[ids_key] = ids
        # The frozen table's own rows at the reserved ids are never part of a load: a merged checkpoint
        # must not write trained values into storage that other holders (a reference model) share.
        ids = ids.to(self.weight.device)
        keep = self.weight.detach().index_select(0, ids).clone()
        keep_scaler = None if self.weight_scaler is None else self.weight_scaler.index_select(0, ids)
        super()._load_from_state_dict(local, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        with torch.no_grad():
            self.weight.index_copy_(0, ids, keep)
            if keep_scaler is not None:
                self.weight_scaler.index_copy_(0, ids, keep_scaler)
        self.slot_map.copy_(F.build_slot_map(self.reserved_ids, self.num_embeddings, self.slot_map.device))

    def extra_repr(self) -> str:
        extra = f", reserved={self.num_reserved}"
        if self.reserved_weight.dtype != self.table_dtype:
            extra += f" ({str(self.reserved_weight.dtype).removeprefix('torch.')} master rows)"
        if self.scale is not None:
            extra += f", scale={self.scale:g}"
        if self.weight_scaler is not None:
            extra += ", int8"
        return super().extra_repr() + extra
