"""PEFT's trainable tokens at K×D cost: PEFT's own layers, computing through our ops.

PEFT's ``TrainableTokensLayer`` (``TrainableTokensConfig``, or ``LoraConfig(trainable_token_indices=...)``) builds
a merged V×D copy of the table on every forward (``W.index_copy``) and again for a tied head, so the step pays a
dense V×D gradient of the copy and the head's N×V logits. :func:`accelerate` keeps PEFT's layers where they are
and only changes their class to a subclass (:class:`FastTokensLayer`) whose forward is ours: the fused gather with
the active adapter's ``trainable_tokens_delta`` as the rows, read in place, and, for the head, the fused loss
(``head(hidden, targets)``, no logits) or the merged-table logits. ``isinstance`` still holds and the state dict
is unchanged, so PEFT's workflow is PEFT's: ``save_pretrained``, ``PeftModel.from_pretrained``,
``merge_and_unload``, ``unmerge``, ``disable_adapter()``, several adapters and ``set_adapter``,
``print_trainable_parameters``, Trainer checkpoints. A disabled or merged adapter, or several active at once, run
PEFT's own forward (and a loss through its logits). An untied head PEFT leaves alone (an ``nn.Linear``) gets the
fused loss with no rows. :func:`restore` puts the classes back.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as TF
from torch import Tensor, nn

from reserved_kernels import functional as F


def is_trainable_tokens(module: nn.Module | None) -> bool:
    """Whether ``module`` is PEFT's ``TrainableTokensLayer`` (PEFT is never imported here to find out)."""
    if module is None or "peft" not in sys.modules:
        return False
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    return isinstance(module, TrainableTokensLayer)


def _loss_from_logits(logits: Tensor, targets: Tensor, ignore_index: int = -100, reduction: str = "mean",
                      num_items_in_batch=None, softcap: float | None = None, return_stats: bool = False,
                      tile_bytes: int | None = None) -> Tensor:
    """The cross-entropy of full logits, for the calls PEFT's own forward serves; the fused loss's conventions."""
    if return_stats:
        raise NotImplementedError("token statistics need one active, unmerged adapter")
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    losses = TF.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                              ignore_index=ignore_index, reduction="none")
    if num_items_in_batch is not None:
        return losses.sum() / num_items_in_batch
    if reduction == "mean":
        return losses.sum() / (targets != ignore_index).sum()
    return losses.sum() if reduction == "sum" else losses.view(targets.shape)


class _HeadLoss:
    """``head(hidden, targets, ...)``: the fused loss over the layer's table and rows, as ReservedLMHead takes it."""

    final_logit_softcapping = None  # Hugging Face's Gemma 2/3 pass their soft-cap to the loss themselves
    weight_scaler = None  # a float table

    @torch.no_grad()
    def init_reserved_(self, sources, *, targets=None, exclude=None, noise_std: float = 0.0, generator=None):
        """The rows (PEFT's, in place) as means of source rows of this layer's table (``ReservedEmbedding``'s)."""
        F.init_reserved_rows_(self.reserved_weight, self.weight, self._slot_map, self.reserved_ids, sources,
                              targets=targets, exclude=exclude, noise_std=noise_std, generator=generator)
        return self

    def _fused_loss(self, hidden, targets, ignore_index=-100, reduction="mean", num_items_in_batch=None, softcap=None,
                    return_stats=False, tile_bytes=None):
        return F.linear_cross_entropy(hidden, self.weight, self.reserved_weight, self._slot_map, targets,
                                      ignore_index=ignore_index, softcap=softcap, reduction=reduction,
                                      num_items_in_batch=num_items_in_batch, tile_bytes=tile_bytes,
                                      return_stats=return_stats)


class FastTokensLayer(_HeadLoss):
    """Mixed in front of PEFT's ``TrainableTokensLayer`` (see the module docstring); never instantiated itself."""

    @property
    def tied(self) -> nn.Module | None:
        """The embedding's layer a tied head follows, or None."""
        return self.tied_adapter

    @property
    def fast(self) -> bool:
        """Whether one adapter is active, unmerged and enabled: the case our ops serve."""
        return not self.disable_adapters and not self.merged and len(self.active_adapters) == 1

    @property
    def reserved_weight(self) -> Tensor:
        """The active adapter's rows (K×D, PEFT's Parameter itself), or none."""
        if not self.fast:
            return self.weight.new_empty(0, self.weight.shape[1])
        return self.trainable_tokens_delta[self.active_adapters[0]]

    @property
    def reserved_ids(self) -> Tensor:
        if not self.fast:
            return torch.empty(0, dtype=torch.int64, device=self.weight.device)
        return self._ids_of(self.active_adapters[0])

    @property
    def _slot_map(self) -> Tensor:
        key = self.active_adapters[0] if self.fast else None
        cache = self.__dict__.setdefault("_reserved_slot_maps", {})
        if key not in cache:
            cache[key] = F.build_slot_map(self.reserved_ids, self.weight.shape[0], self.weight.device)
        return cache[key]

    def _ids_of(self, adapter: str) -> Tensor:
        return torch.tensor(self.token_indices[adapter], dtype=torch.int64, device=self.weight.device)

    def forward(self, x: Tensor, targets: Tensor | None = None, **loss_kwargs):
        base = self.get_base_layer()
        if isinstance(base, nn.Embedding):
            if not self.fast:
                return super().forward(x)
            scale = base.embed_scale if isinstance(getattr(base, "embed_scale", None), Tensor) else None
            return F.reserved_embedding(x, self.weight, self.reserved_weight, self._slot_map,
                                        scale=float(scale) if scale is not None else None)
        if targets is not None:
            if not self.fast:  # PEFT's own logits, then the loss
                return _loss_from_logits(super().forward(x), targets, **loss_kwargs)
            return self._fused_loss(x, targets, **loss_kwargs)
        if not self.fast:
            return super().forward(x)
        return F.reserved_logits(x, self.weight, self.reserved_weight, self.reserved_ids)


class FastLinearHead(_HeadLoss):
    """Mixed in front of an untied ``nn.Linear`` head PEFT does not train: the fused loss with no rows."""

    tied = None

    @property
    def reserved_weight(self) -> Tensor:
        return self.weight.new_empty(0, self.weight.shape[1])

    @property
    def reserved_ids(self) -> Tensor:
        return torch.empty(0, dtype=torch.int64, device=self.weight.device)

    @property
    def _slot_map(self) -> Tensor:
        if "_reserved_slot_map" not in self.__dict__:
            self.__dict__["_reserved_slot_map"] = F.build_slot_map(self.reserved_ids, self.weight.shape[0],
                                                                   self.weight.device)
        return self.__dict__["_reserved_slot_map"]

    def forward(self, x: Tensor, targets: Tensor | None = None, **loss_kwargs):
        return self._fused_loss(x, targets, **loss_kwargs) if targets is not None else super().forward(x)


def _swap(module: nn.Module, mixin: type) -> None:
    """Give ``module`` the class ``mixin`` + its own (one subclass per original class, made once)."""
    cls = type(module)
    fast = _SUBCLASSES.get(cls)
    if fast is None:
        fast = _SUBCLASSES[cls] = type(f"Fast{cls.__name__}", (mixin, cls), {"_original_class": cls})
    module.__class__ = fast


_SUBCLASSES: dict[type, type] = {}


def accelerate(embedding: nn.Module, head: nn.Module | None) -> list[nn.Module]:
    """Swap the classes of PEFT's token layers (and of an untied ``nn.Linear`` head beside them); returns the
    modules swapped, for :func:`restore`. The head must be PEFT's tied or own token layer, a plain
    ``nn.Linear`` (bias-free), or None."""
    swapped = [embedding]
    _swap(embedding, FastTokensLayer)
    if is_trainable_tokens(head):
        _swap(head, FastTokensLayer)
        swapped.append(head)
    elif type(head) is nn.Linear and head.bias is None:
        _swap(head, FastLinearHead)
        swapped.append(head)
    elif head is not None:
        raise TypeError(f"the output head is a {type(head).__name__}: PEFT's trainable tokens are accelerated beside "
                        "a bias-free nn.Linear head or PEFT's own token layer on it")
    return swapped


def restore(modules: list[nn.Module]) -> None:
    """Put back the classes :func:`accelerate` swapped."""
    for module in modules:
        original = getattr(type(module), "_original_class", None)
        if original is not None:
            module.__class__ = original
