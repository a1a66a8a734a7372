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
    return F.reduced_loss(losses, targets, ignore_index=ignore_index, reduction=reduction,
                          num_items_in_batch=num_items_in_batch)


class _HeadLoss:
    """``head(hidden, targets, ...)``: the fused loss over the layer's table and rows, as ReservedLMHead takes it."""

    final_logit_softcapping = None  # Hugging Face's Gemma 2/3 pass their soft-cap to the loss themselves
    weight_scaler = None  # a float table

    @torch.no_grad()
    def init_reserved_(self, sources, *, targets=None, exclude=None, noise_std: float = 0.0, generator=None):
        """The rows (PEFT's, in place) as means of source rows of this layer's table (``ReservedEmbedding``'s)."""
        F.init_reserved_rows_(self.reserved_weight, self.weight, self.slot_map, self.reserved_ids, sources,
                              targets=targets, exclude=exclude, noise_std=noise_std, generator=generator)
        return self

    def _served_adapter(self) -> str | None:
        """The PEFT adapter whose rows the layer serves now, or None (the table alone)."""
        return None

    def _index(self) -> tuple[Tensor, Tensor]:
        """(ids, slot map) of the active adapter's tokens, made once per adapter and device: no host-to-device
        copy (a synchronisation on CUDA) per call."""
        adapter, device = self._served_adapter(), self.weight.device
        cache = self.__dict__.setdefault("_reserved_index", {})
        if (adapter, device) not in cache:
            ids = torch.tensor(self.token_indices[adapter] if adapter is not None else [], dtype=torch.int64,
                               device=device)
            cache[adapter, device] = ids, F.build_slot_map(ids, self.weight.shape[0], device)
        return cache[adapter, device]

    @property
    def reserved_ids(self) -> Tensor:
        return self._index()[0]

    @property
    def slot_map(self) -> Tensor:
        return self._index()[1]

    def _fused_loss(self, hidden, targets, ignore_index=-100, reduction="mean", num_items_in_batch=None, softcap=None,
                    return_stats=False, tile_bytes=None):
        return F.linear_cross_entropy(hidden, self.weight, self.reserved_weight, self.slot_map, targets,
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

    def _served_adapter(self) -> str | None:
        return self.active_adapters[0] if self.fast else None

    @property
    def reserved_weight(self) -> Tensor:
        """The active adapter's rows (K×D, PEFT's Parameter itself), or none."""
        adapter = self._served_adapter()
        if adapter is None:
            return self.weight.new_empty(0, self.weight.shape[1])
        return self.trainable_tokens_delta[adapter]

    def forward(self, x: Tensor, targets: Tensor | None = None, **loss_kwargs):
        if isinstance(self.get_base_layer(), nn.Embedding):
            if not self.fast:
                return super().forward(x)
            return F.reserved_embedding(x, self.weight, self.reserved_weight, self.slot_map,
                                        scale=self.__dict__[_SCALE])
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

    def forward(self, x: Tensor, targets: Tensor | None = None, **loss_kwargs):
        return self._fused_loss(x, targets, **loss_kwargs) if targets is not None else super().forward(x)


def _swap(module: nn.Module, mixin: type) -> None:
    """Give ``module`` the class ``mixin`` + its own (one subclass per pair, made once)."""
    cls = type(module)
    fast = _SUBCLASSES.get((cls, mixin))
    if fast is None:
        fast = _SUBCLASSES[cls, mixin] = type(f"Fast{cls.__name__}", (mixin, cls), {"_original_class": cls})
    module.__class__ = fast


_SUBCLASSES: dict[tuple[type, type], type] = {}
_SCALE = "_reserved_embed_scale"  # the embedding's √D scale as a float, read once (a device tensor in the module)


def accelerate(embedding: nn.Module, head: nn.Module | None) -> list[nn.Module]:
    """Swap the classes of PEFT's token layers (and of an untied ``nn.Linear`` head beside them); returns the
    modules swapped, for :func:`restore`. The head must be PEFT's tied or own token layer, a plain
    ``nn.Linear`` (bias-free), or None."""
    if is_trainable_tokens(head):
        head_mixin = FastTokensLayer
    elif type(head) is nn.Linear and head.bias is None:
        head_mixin = FastLinearHead
    elif head is not None:  # refused before anything is swapped
        raise TypeError(f"the output head is a {type(head).__name__}: PEFT's trainable tokens are accelerated beside "
                        "a bias-free nn.Linear head or PEFT's own token layer on it")
    scale = getattr(embedding.get_base_layer(), "embed_scale", None)
    embedding.__dict__[_SCALE] = float(scale) if isinstance(scale, Tensor) else None
    _swap(embedding, FastTokensLayer)
    swapped = [embedding]
    if head is not None:
        _swap(head, head_mixin)
        swapped.append(head)
    return swapped


def restore(modules: list[nn.Module]) -> None:
    """Put back the classes :func:`accelerate` swapped."""
    for module in modules:
        original = getattr(type(module), "_original_class", None)
        if original is not None:
            module.__class__ = original
        for key in (_SCALE, "_reserved_index"):
            module.__dict__.pop(key, None)
