"""``ReservedEmbedding``: an ``nn.Embedding`` whose K reserved rows train and whose other rows stay frozen."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from reserved_kernels import functional as F


class ReservedEmbedding(nn.Embedding):
    """Drop-in ``nn.Embedding`` that trains only the rows ``reserved_ids``.

    ``weight`` is the frozen (V, D) table (``requires_grad=False``); ``reserved_weight`` is the
    trainable (K, D) Parameter that replaces rows ``reserved_ids`` in the forward pass, initialised
    from ``weight[reserved_ids]``. The backward pass produces only a K×D gradient, so optimizer
    state is K×D too, and weight decay can never move a frozen row.

    Args:
        num_embeddings, embedding_dim, padding_idx, device, dtype: as for ``nn.Embedding``.
        reserved_ids: the K distinct ids whose rows train (keyword-only).
        scale: multiplies every output row, rounded to the table dtype first (Gemma's √D normaliser).
        weight_scaler: per-row float scales of an int8 table (gemma_pytorch's quantised embedder);
            the output and ``reserved_weight`` then have the scaler's dtype.
        deterministic: bitwise-repeatable backward (also on under ``torch.use_deterministic_algorithms``).

    ``max_norm``, ``scale_grad_by_freq`` and ``sparse=True`` are not supported and raise.
    """

    reserved_ids: Tensor
    weight_scaler: Tensor | None
    _slot_map: Tensor

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None,
                 max_norm: float | None = None, norm_type: float = 2.0, scale_grad_by_freq: bool = False,
                 sparse: bool = False, _weight: Tensor | None = None, _freeze: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None, *,
                 reserved_ids: Tensor | Sequence[int], scale: float | None = None,
                 weight_scaler: Tensor | None = None, deterministic: bool = False) -> None:
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
        self.register_buffer("_slot_map", F.build_slot_map(ids, num_embeddings, device), persistent=False)
        self.reserved_weight = nn.Parameter(self._base_rows(self.weight, self.weight_scaler, self.reserved_ids))
        self.scale = scale
        self.deterministic = deterministic

    @classmethod
    def from_embedding(cls, embedding_or_weight: nn.Module | Tensor, reserved_ids: Tensor | Sequence[int], *,
                       scale: float | None = None, weight_scaler: Tensor | None = None,
                       deterministic: bool = False) -> ReservedEmbedding:
        """Wrap an existing ``nn.Embedding`` (or any module with a 2-D ``weight``, or a weight tensor).

        The new module shares the existing weight storage: no V×D copy is made. ``padding_idx``
        and a module's ``weight_scaler`` (gemma_pytorch's int8 embedder) are carried over.
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
        return cls(weight.shape[0], weight.shape[1], padding_idx, _weight=weight.detach(),
                   reserved_ids=reserved_ids, scale=scale, weight_scaler=weight_scaler, deterministic=deterministic)

    @staticmethod
    def _base_rows(weight: Tensor, weight_scaler: Tensor | None, ids: Tensor) -> Tensor:
        """Dequantised ``weight[ids]`` (a copy), the way the forward pass reads a base row."""
        rows = weight.detach().index_select(0, ids.to(weight.device))
        if weight_scaler is not None:
            rows = rows.to(weight_scaler.dtype) * weight_scaler.detach().index_select(0, ids).unsqueeze(-1)
        return rows.clone()

    @property
    def num_reserved(self) -> int:
        return self.reserved_ids.numel()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, "reserved_weight"):  # nn.Embedding.__init__ calls this before it exists
            self.reset_reserved_()

    @torch.no_grad()
    def reset_reserved_(self) -> None:
        """Set the reserved rows back to ``weight[reserved_ids]``."""
        self.reserved_weight.copy_(self._base_rows(self.weight, self.weight_scaler, self.reserved_ids))

    def forward(self, input: Tensor) -> Tensor:
        return F.reserved_embedding(input, self.weight, self.reserved_weight, self._slot_map,
                                    weight_scaler=self.weight_scaler, scale=self.scale,
                                    padding_idx=self.padding_idx, deterministic=self.deterministic)

    @torch.no_grad()
    def merged_weight(self) -> Tensor:
        """A (V, D) copy of the table as the forward pass sees it (dequantised, reserved rows in place)."""
        if self.weight_scaler is not None:
            merged = self.weight.to(self.weight_scaler.dtype) * self.weight_scaler.unsqueeze(-1)
        else:
            merged = self.weight.detach().clone()
        return merged.index_copy_(0, self.reserved_ids, self.reserved_weight.to(merged.dtype))

    @torch.no_grad()
    def merge_(self) -> ReservedEmbedding:
        """Write the reserved rows into ``weight`` in place (for export); the forward pass is unchanged."""
        if self.weight_scaler is not None:
            raise NotImplementedError("merge_() into an int8 table would re-quantise the trained rows; "
                                      "use merged_weight() or to_embedding() instead")
        self.weight.index_copy_(0, self.reserved_ids, self.reserved_weight.to(self.weight.dtype))
        return self

    def to_embedding(self) -> nn.Embedding:
        """A plain ``nn.Embedding`` holding the merged rows (the scale is not folded in)."""
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
        if targets is None:
            slots = torch.arange(self.num_reserved, device=self.weight.device)
        else:
            targets = F.check_reserved_ids(targets, self.num_embeddings).to(self.weight.device)
            slots = self._slot_map.index_select(0, targets).long()
            if bool((slots < 0).any()):
                raise ValueError(f"targets must be reserved ids; not reserved: {targets[slots < 0][:10].tolist()}")
        means = F.mean_rows(self.weight, self.reserved_weight, self._slot_map, sources,
                            weight_scaler=self.weight_scaler, exclude=exclude)
        means = F.means_for_targets(means, slots.numel(), noise_std, generator)
        self.reserved_weight.index_copy_(0, slots, means.to(self.reserved_weight.dtype))
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        ids_key, rows_key = prefix + "reserved_ids", prefix + "reserved_weight"
        if ids_key in state_dict:
            ids = F.check_reserved_ids(state_dict[ids_key], self.num_embeddings, self.padding_idx)
            if ids.numel() != self.num_reserved:
                raise ValueError(f"state dict has {ids.numel()} reserved ids, this module {self.num_reserved}")
        else:
            ids = self.reserved_ids
        if rows_key not in state_dict and prefix + "weight" in state_dict:
            # A plain nn.Embedding state dict: the reserved rows start as its rows.
            scaler = state_dict.get(prefix + "weight_scaler", self.weight_scaler)
            state_dict[rows_key] = self._base_rows(state_dict[prefix + "weight"], scaler, ids)
            state_dict[ids_key] = ids
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._slot_map.copy_(F.build_slot_map(self.reserved_ids, self.num_embeddings, self._slot_map.device))

    def extra_repr(self) -> str:
        extra = f", reserved={self.num_reserved}"
        if self.scale is not None:
            extra += f", scale={self.scale:g}"
        if self.weight_scaler is not None:
            extra += ", int8"
        return super().extra_repr() + extra
