"""``ReservedLMHead``: an output projection whose K reserved vocabulary columns use the trainable rows."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from reserved_kernels import functional as F
from reserved_kernels.modules.embedding import ReservedEmbedding, default_reserved_dtype


@runtime_checkable
class ReservedHead(Protocol):
    """What the code around a patched model reads from its output head: :class:`ReservedLMHead`, and PEFT's token
    layer once ``patch_model`` accelerates it (:mod:`reserved_kernels.models.integrations.peft_tokens`).
    ``isinstance(head, ReservedHead)`` tells a patched head from any other."""

    weight: Tensor  # the frozen V x D table
    reserved_weight: Tensor  # the K trainable rows
    reserved_ids: Tensor  # (K,) their ids
    slot_map: Tensor  # (V,) int32: k at reserved_ids[k], -1 elsewhere (functional.build_slot_map)
    final_logit_softcapping: float | None  # the head's own soft-cap, or None

    def __call__(self, hidden: Tensor, targets: Tensor | None = None, *, ignore_index: int = -100,
                 reduction: str = "mean", num_items_in_batch: Tensor | int | None = None,
                 softcap: float | None = None, return_stats: bool = False, tile_bytes: int | None = None):
        """The logits of ``hidden``; with ``targets``, the fused cross-entropy against them instead."""


class ReservedLMHead(nn.Linear):
    """Drop-in for a bias-free ``nn.Linear(D, V)`` output head (``lm_head``), tied or untied.

    The logits are those of the merged table (``weight`` with rows ``reserved_ids`` replaced by the
    trained rows), computed without a V×D copy and without writing into ``weight``; while the rows are
    untrained they are bit-identical to the unpatched head's. Backward gives ``hidden`` its exact
    gradient and the reserved rows only ``grad_logits[..., reserved]ᵀ @ hidden`` (K×D); the frozen
    ``weight`` gets nothing.

    ``head(hidden, targets)`` returns the cross-entropy of those logits instead, through the fused
    :func:`~reserved_kernels.linear_cross_entropy`: the same gradients, and no (N, V) logits at all —
    what a patched causal LM's ``labels=`` path uses in training.

    Tied (:meth:`tied_to`, Gemma's layout) it shares the embedding's ``weight`` Parameter and reads the
    embedding's ``reserved_weight`` and ``reserved_ids`` at each call without registering them again,
    so state dicts (and ``save_pretrained``) hold each tensor once. Untied (:meth:`from_linear`) it has
    its own ``reserved_weight`` (float32 master rows for a 16-bit head) and ``reserved_ids``.

    ``final_logit_softcapping`` applies Gemma 2's ``cap * tanh(logits / cap)``; leave it ``None``
    when the model applies it itself (Hugging Face's Gemma2/3 ``ForCausalLM`` do).
    """

    def __init__(self, in_features: int, out_features: int, *, reserved_ids: Tensor | Sequence[int],
                 weight: nn.Parameter | None = None, final_logit_softcapping: float | None = None,
                 reserved_dtype: torch.dtype | None = None, device=None, dtype=None) -> None:
        # nn.Linear would allocate a V x D weight: build it on "meta" and put the real one in place.
        super().__init__(in_features, out_features, bias=False, device="meta", dtype=dtype)
        ids = F.check_reserved_ids(reserved_ids, out_features)
        if weight is None:
            weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
            nn.init.kaiming_uniform_(weight, a=5 ** 0.5)
        if weight.shape != (out_features, in_features):
            raise ValueError(f"weight must be ({out_features}, {in_features}), got {tuple(weight.shape)}")
        weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight)
        self.weight = weight.requires_grad_(False)
        self.register_buffer("reserved_ids", ids.to(self.weight.device))
        self.register_buffer("slot_map", F.build_slot_map(ids, out_features, self.weight.device), persistent=False)
        reserved_dtype = default_reserved_dtype(self.weight.dtype) if reserved_dtype is None else reserved_dtype
        self.reserved_weight = nn.Parameter(
            self.weight.detach().index_select(0, self.reserved_ids).to(reserved_dtype, copy=True))
        self.final_logit_softcapping = final_logit_softcapping

    @classmethod
    def tied_to(cls, embedding: ReservedEmbedding, *, final_logit_softcapping: float | None = None) -> ReservedLMHead:
        """An output head sharing ``embedding``'s frozen table and trainable rows (Gemma ties them)."""
        if embedding.weight_scaler is not None:
            raise NotImplementedError("a tied head over an int8 table would dequantise all V rows per call; "
                                      "gemma_pytorch-style models go through reserved_kernels.models.causal_lm_loss")
        head = cls.__new__(cls)
        nn.Module.__init__(head)
        head.in_features, head.out_features = embedding.embedding_dim, embedding.num_embeddings
        head.weight = embedding.weight
        head.register_parameter("bias", None)
        head.final_logit_softcapping = final_logit_softcapping
        head.__dict__["_tied"] = embedding  # not a submodule: its tensors belong to the embedding
        return head

    @classmethod
    def from_linear(cls, linear: nn.Linear, reserved_ids: Tensor | Sequence[int], *,
                    final_logit_softcapping: float | None = None,
                    reserved_dtype: torch.dtype | None = None) -> ReservedLMHead:
        """Wrap an untied ``nn.Linear`` head, adopting its weight Parameter (no V×D copy; set frozen)."""
        if linear.bias is not None:
            raise NotImplementedError("ReservedLMHead supports bias-free heads only (as Gemma's)")
        return cls(linear.in_features, linear.out_features, reserved_ids=reserved_ids, weight=linear.weight,
                   final_logit_softcapping=final_logit_softcapping, reserved_dtype=reserved_dtype)

    @property
    def tied(self) -> ReservedEmbedding | None:
        """The embedding this head is tied to, or None."""
        return self.__dict__.get("_tied")

    def __getattr__(self, name: str):
        tied = self.__dict__.get("_tied")
        if tied is not None and name in ("reserved_weight", "reserved_ids", "slot_map"):
            return getattr(tied, name)
        return super().__getattr__(name)

    def forward(self, hidden: Tensor, targets: Tensor | None = None, *, ignore_index: int = -100,
                reduction: str = "mean", num_items_in_batch: Tensor | int | None = None, softcap: float | None = None,
                return_stats: bool = False, tile_bytes: int | None = None):
        """The logits ``(..., V)`` of ``hidden``; with ``targets``, the cross-entropy against them instead,
        through :func:`reserved_kernels.linear_cross_entropy` (no logits are built: see there for the
        arguments). ``softcap`` is the loss's soft-cap, by default the head's ``final_logit_softcapping``.
        The loss runs inside this module's forward so that FSDP2 has gathered the table for it."""
        if targets is not None:
            cap = self.final_logit_softcapping
            if softcap is not None and cap is not None and softcap != cap:
                raise ValueError(f"softcap={softcap} differs from this head's final_logit_softcapping={cap}")
            return F.linear_cross_entropy(hidden, self.weight, self.reserved_weight, self.slot_map, targets,
                                          ignore_index=ignore_index, softcap=softcap if softcap is not None else cap,
                                          reduction=reduction, num_items_in_batch=num_items_in_batch,
                                          tile_bytes=tile_bytes, return_stats=return_stats)
        return F.reserved_logits(hidden, self.weight, self.reserved_weight, self.reserved_ids,
                                 softcap=self.final_logit_softcapping)

    @torch.no_grad()
    def init_reserved_(self, sources, *, targets: Tensor | Sequence[int] | None = None, exclude=None,
                       noise_std: float = 0.0, generator: torch.Generator | None = None) -> ReservedLMHead:
        """An untied head's rows: each the mean of its source rows *of this head's table* (see
        ``ReservedEmbedding.init_reserved_``); a tied head's rows are its embedding's, initialised there."""
        if self.tied is not None:
            raise ValueError("a tied head shares its embedding's rows: initialise them through the embedding")
        F.init_reserved_rows_(self.reserved_weight, self.weight, self.slot_map, self.reserved_ids, sources,
                              targets=targets, exclude=exclude, noise_std=noise_std, generator=generator)
        return self

    @torch.no_grad()
    def merged_weight(self) -> Tensor:
        """A (V, D) copy of the projection as the forward pass sees it."""
        rows = self.reserved_weight.to(self.weight.dtype)
        return self.weight.detach().clone().index_copy_(0, self.reserved_ids, rows)

    @torch.no_grad()
    def merge_(self) -> ReservedLMHead:
        """Write the reserved rows into ``weight`` in place (for export); the forward pass is unchanged."""
        if self.tied is not None:
            self.tied.merge_()
        else:
            self.weight.index_copy_(0, self.reserved_ids, self.reserved_weight.to(self.weight.dtype))
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if keep_vars or type(self.weight) not in (Tensor, nn.Parameter):
            return  # live variables asked for, or a sharded (DTensor) table: keep the table as it is
        if self.tied is not None:
            destination[prefix + "weight"] = self.tied.state_dict_table()[0]  # the embedding's tensor
        else:
            destination[prefix + "weight"] = self.merged_weight()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        if self.tied is not None:
            # The tied table loads through the embedding; a merged copy here must not overwrite its rows.
            local = {k: v for k, v in state_dict.items() if k.startswith(prefix) and k != prefix + "weight"}
            super()._load_from_state_dict(local, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                          error_msgs)
            if prefix + "weight" in missing_keys:
                missing_keys.remove(prefix + "weight")
            return
        rows_key = prefix + "reserved_weight"
        local = {k: v for k, v in state_dict.items() if k.startswith(prefix)}
        if rows_key not in local and prefix + "weight" in local:
            local[rows_key] = local[prefix + "weight"].index_select(
                0, self.reserved_ids.to(local[prefix + "weight"].device)).to(self.reserved_weight.dtype)
            local[prefix + "reserved_ids"] = self.reserved_ids
        keep = self.weight.detach().index_select(0, self.reserved_ids).clone()
        super()._load_from_state_dict(local, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        with torch.no_grad():
            self.weight.index_copy_(0, self.reserved_ids, keep)
        self.slot_map.copy_(F.build_slot_map(self.reserved_ids, self.out_features, self.slot_map.device))

    def extra_repr(self) -> str:
        cap = f", softcap={self.final_logit_softcapping}" if self.final_logit_softcapping is not None else ""
        tied = ", tied" if self.tied is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"reserved={self.reserved_ids.numel()}{tied}{cap}")
