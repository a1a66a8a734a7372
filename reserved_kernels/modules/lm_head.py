"""``ReservedLMHead``: an output projection whose K reserved vocabulary columns use the trainable rows."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as TF
from torch import Tensor, nn

from reserved_kernels import functional as F
from reserved_kernels.modules.embedding import ReservedEmbedding


class ReservedLMHead(nn.Linear):
    """Drop-in for a bias-free ``nn.Linear(D, V)`` output head (``lm_head``), tied or untied.

    ``logits = hidden @ merged_weightᵀ`` without a merged V×D copy: before each forward the K
    reserved rows of ``weight`` are set to ``reserved_weight`` (they are the rows being trained,
    and the embedding never reads them: its slot map sends reserved ids to ``reserved_weight``),
    so one GEMM over ``weight`` gives every logit — bit-identical to the unpatched head while the
    rows are untrained. Backward gives ``hidden`` its exact gradient and the reserved rows only
    ``grad_logits[..., reserved]ᵀ @ hidden`` (K×D); ``weight`` gets nothing unless a user sets
    ``requires_grad`` on it, and no row outside ``reserved_ids`` is ever written. Tied to a
    :class:`ReservedEmbedding` (:meth:`tied_to`), it shares that module's ``weight`` and
    ``reserved_weight`` Parameters, so the input and output sides train one set of rows.

    ``final_logit_softcapping`` applies Gemma 2's ``cap * tanh(logits / cap)``; leave it ``None``
    when the model applies it itself (Hugging Face's Gemma2/3 ``ForCausalLM`` do).
    """

    reserved_ids: Tensor

    def __init__(self, in_features: int, out_features: int, *, reserved_ids: Tensor | Sequence[int],
                 weight: nn.Parameter | None = None, reserved_weight: nn.Parameter | None = None,
                 final_logit_softcapping: float | None = None, device=None, dtype=None) -> None:
        # nn.Linear would allocate a V x D weight: build it on "meta" and put the real one in place.
        super().__init__(in_features, out_features, bias=False, device="meta", dtype=dtype)
        ids = F.check_reserved_ids(reserved_ids, out_features)
        if weight is None:
            weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
            nn.init.kaiming_uniform_(weight, a=5 ** 0.5)
            weight.requires_grad_(False)
        if weight.shape != (out_features, in_features):
            raise ValueError(f"weight must be ({out_features}, {in_features}), got {tuple(weight.shape)}")
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
        self.register_buffer("reserved_ids", ids.to(self.weight.device))
        if reserved_weight is None:
            reserved_weight = nn.Parameter(self.weight.detach().index_select(0, self.reserved_ids).clone())
        if reserved_weight.shape != (ids.numel(), in_features):
            raise ValueError(f"reserved_weight must be ({ids.numel()}, {in_features}), got {tuple(reserved_weight.shape)}")
        self.reserved_weight = reserved_weight
        self.final_logit_softcapping = final_logit_softcapping

    @classmethod
    def tied_to(cls, embedding: ReservedEmbedding, *, final_logit_softcapping: float | None = None) -> ReservedLMHead:
        """An output head sharing ``embedding``'s frozen table and trainable rows (Gemma ties them)."""
        if embedding.weight_scaler is not None:
            raise NotImplementedError("a tied head over an int8 table would dequantise all V rows; use merged_weight()")
        return cls(embedding.embedding_dim, embedding.num_embeddings, reserved_ids=embedding.reserved_ids,
                   weight=embedding.weight, reserved_weight=embedding.reserved_weight,
                   final_logit_softcapping=final_logit_softcapping)

    @classmethod
    def from_linear(cls, linear: nn.Linear, reserved_ids: Tensor | Sequence[int], *,
                    final_logit_softcapping: float | None = None) -> ReservedLMHead:
        """Wrap an untied ``nn.Linear`` head, sharing its weight storage (no V×D copy)."""
        if linear.bias is not None:
            raise NotImplementedError("ReservedLMHead supports bias-free heads only (as Gemma's)")
        weight = nn.Parameter(linear.weight.detach(), requires_grad=False)
        return cls(linear.in_features, linear.out_features, reserved_ids=reserved_ids, weight=weight,
                   final_logit_softcapping=final_logit_softcapping)

    def forward(self, hidden: Tensor) -> Tensor:
        has_reserved = self.reserved_ids.numel() > 0
        if has_reserved:
            # Through .data: the K rows only change after an optimizer step, so a logits tensor
            # saved for an earlier backward (gradient accumulation) still sees the same values.
            self.weight.data.index_copy_(0, self.reserved_ids, self.reserved_weight.detach().to(self.weight.dtype))
        logits = TF.linear(hidden, self.weight)
        if has_reserved and self.reserved_weight.requires_grad and torch.is_grad_enabled():
            # r - r.detach() is exactly zero, so the logits keep their bits; its backward carries
            # grad_logits[..., reserved]ᵀ @ hidden to the K rows, and only to them (hidden is detached
            # here: its gradient already comes whole from the GEMM above).
            r = TF.linear(hidden.detach(), self.reserved_weight)
            logits = logits.index_add_(-1, self.reserved_ids, r - r.detach())
        if self.final_logit_softcapping is not None:
            cap = self.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        return logits

    @torch.no_grad()
    def merged_weight(self) -> Tensor:
        """A (V, D) copy of the projection as the forward pass sees it."""
        return self.weight.detach().clone().index_copy_(0, self.reserved_ids, self.reserved_weight.to(self.weight.dtype))

    @torch.no_grad()
    def merge_(self) -> ReservedLMHead:
        """Write the reserved rows into ``weight`` in place (for export); the forward pass is unchanged."""
        self.weight.index_copy_(0, self.reserved_ids, self.reserved_weight.to(self.weight.dtype))
        return self

    def extra_repr(self) -> str:
        cap = f", softcap={self.final_logit_softcapping}" if self.final_logit_softcapping is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, reserved={self.reserved_ids.numel()}{cap}"
