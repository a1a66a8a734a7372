"""The forward of a patched Hugging Face causal LM: with ``labels`` in training, the loss without the logits.

:func:`~reserved_kernels.models.patch_model` installs :func:`patched_forward` on the model instance
(``model.forward``, as Liger-Kernel and TRL do) and :func:`~reserved_kernels.models.merge` puts the
previous one back. What it does, by call:

* **no labels**: the model's own forward, unchanged (generation, logits).
* **labels, training** (``model.train()``): the backbone's hidden states, then the cross-entropy through
  the patched head's fused loss (:func:`reserved_kernels.linear_cross_entropy`) — the model's own label
  shift (or ``shift_labels``), ``ignore_index=-100``, ``num_items_in_batch`` (Trainer's normaliser under
  gradient accumulation) and the config's ``final_logit_softcapping``. No (B, T, V) logits are built, in
  the forward or the backward; the output's ``logits`` is None, as with Liger-Kernel. Positions no reserved
  id can reach run without a backward (:mod:`reserved_kernels.models.position_split`); the output then carries
  the loss alone.
* **labels, evaluation** (``model.eval()``): the model's own forward, logits and loss as unpatched — so a
  Trainer's ``compute_metrics`` still gets its logits. ``return_logits=False`` asks for the fused loss
  there too (what :func:`~reserved_kernels.models.perplexity` does); ``return_logits=True`` asks for the logits
  in training.
* **``fused_lm_head=True``** (TRL's ``SFTTrainer`` contract, TRL >= 1.16): per-token ``log_probs``,
  ``entropy``, ``is_top1`` and ``label_mask`` from the fused loss, never the logits. TRL's own fused head
  reads ``lm_head.weight`` — the frozen table, without the trained rows — so this one takes its place.
"""

from __future__ import annotations

import functools
import inspect
import types

from torch import nn

from reserved_kernels.models import position_split
from reserved_kernels.models.batches import config_softcap, shifted_targets
from reserved_kernels.models.layout import output_head
from reserved_kernels.models.state import ForwardSwap, PatchState, patch_state

_MARK = "_reserved_patched_forward"
# Keyword arguments of the loss, not of the backbone.
_LOSS_ONLY = ("num_items_in_batch", "shift_labels", "ignore_index", "logits_to_keep")


def install(model: nn.Module, state: PatchState, fused_loss: bool) -> None:
    """Make :func:`patched_forward` ``model.forward`` (the previous instance forward, if any, kept in ``state``).

    It shows the class forward's signature, as the model's own would: Trainer keeps only the dataset
    columns that signature names, and ``generate`` checks its keyword arguments against it.
    """
    state.forward = ForwardSwap(previous=model.__dict__.get("forward"), fused_loss=fused_loss)

    @functools.wraps(type(model).forward)
    def forward(self, *args, **kwargs):
        return patched_forward(self, *args, **kwargs)

    forward.__dict__[_MARK] = True
    model.forward = types.MethodType(forward, model)


def uninstall(model: nn.Module, state: PatchState) -> None:
    """Put back the forward :func:`install` replaced."""
    swap, state.forward = state.forward, None
    if swap is None:
        return
    if swap.previous is not None:
        model.forward = swap.previous
    else:
        model.__dict__.pop("forward", None)


def is_reached(model: nn.Module) -> bool:
    """Whether a call of ``model`` still runs the patched forward, possibly inside wrappers that say what they
    wrap (``__wrapped__``, as accelerate's autocast wrappers do). TRL's ``add_fused_lm_head`` replaces it
    with a forward that wraps the class's own, so it is not reached."""
    fn = model.__dict__.get("forward")
    fn = getattr(fn, "__func__", fn)
    while fn is not None:
        if getattr(fn, _MARK, False):
            return True
        fn = getattr(fn, "__wrapped__", None)
    return False


def _parameter_names(cls: type) -> tuple[str, ...]:
    """The names of ``cls.forward``'s positional parameters after ``self``, to name positional arguments."""
    params = list(inspect.signature(cls.forward).parameters.values())[1:]
    return tuple(p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


def patched_forward(self, *args, labels=None, return_logits: bool | None = None, fused_lm_head: bool = False,
                    **kwargs):
    """The patched model's forward (see the module docstring)."""
    state = patch_state(self)
    swap = state.forward
    if args:  # named, so that the backbone and the model's own forward both get them right
        kwargs.update(zip(_parameter_names(type(self)), args, strict=False))  # args name the first ones
    labels = kwargs.pop("labels", labels)
    if fused_lm_head:
        return _token_statistics(self, labels, kwargs)
    want_logits = (not self.training) if return_logits is None else return_logits
    if labels is None or want_logits or not swap.fused_loss:
        own = swap.previous or functools.partial(type(self).forward, self)
        return own(labels=labels, **kwargs)
    shift_labels, num_items, ignore_index = (kwargs.get("shift_labels"), kwargs.get("num_items_in_batch"),
                                             kwargs.get("ignore_index", -100))
    if shift_labels is None:  # the model's own shift: position t predicts label t + 1; the last predicts nothing
        shift_labels = shifted_targets(labels, ignore_index)
    body_kwargs = {k: v for k, v in kwargs.items() if k not in _LOSS_ONLY}
    from transformers.modeling_outputs import CausalLMOutputWithPast

    if position_split.frozen_split_unsupported(self, body_kwargs) is None:
        loss = position_split.split_loss(self, body_kwargs, shift_labels, ignore_index=ignore_index,
                                         num_items_in_batch=num_items,
                                 softcap=config_softcap(self))
        if loss is not None:
            return CausalLMOutputWithPast(loss=loss, logits=None)
    outputs = self.base_model(**body_kwargs)
    hidden = outputs.last_hidden_state
    loss = output_head(self)(hidden, shift_labels.to(hidden.device), ignore_index=ignore_index,
                                        num_items_in_batch=num_items, softcap=config_softcap(self))

    carried = {k: getattr(outputs, k) for k in CausalLMOutputWithPast.__dataclass_fields__
               if k not in ("loss", "logits") and hasattr(outputs, k)}
    return CausalLMOutputWithPast(loss=loss, logits=None, **carried)


def _token_statistics(self, labels, kwargs):
    """TRL's ``fused_lm_head=True`` output: per-token log-probabilities, entropy and top-1, no logits. Frozen
    positions run without a backward here too (:mod:`reserved_kernels.models.position_split`)."""
    from trl.trainer.utils import FusedCausalLMOutput

    shift_labels, num_items = kwargs.get("shift_labels"), kwargs.get("num_items_in_batch")
    body_kwargs = {k: v for k, v in kwargs.items() if k not in _LOSS_ONLY}
    # In the batch's (B, T) layout: position t predicts label t + 1, the last one nothing.
    targets = shift_labels if shift_labels is not None else shifted_targets(labels)
    head, softcap = output_head(self), config_softcap(self)

    def stats_of(hidden, part_targets):
        return head(hidden, part_targets, reduction="none", softcap=softcap, return_stats=True)

    splits = position_split.frozen_split_unsupported(self, body_kwargs) is None
    parts = position_split.hf_split(self, body_kwargs) if splits else None
    if parts is None:
        hidden = self.base_model(**{**body_kwargs, "use_cache": False}).last_hidden_state
        targets = targets.to(hidden.device)
        loss, entropy, is_top1, _ = stats_of(hidden, targets)
    else:
        targets = targets.to(parts[0].hidden.device)
        flat = targets.reshape(-1)
        per_part = [stats_of(p.hidden, flat.index_select(0, p.where)) for p in parts if p is not None]
        loss, entropy, is_top1 = (position_split.in_batch_order(parts, [getattr(s, name) for s in per_part],
                                                                targets.shape)
                                  for name in ("loss", "entropy", "is_top1"))
    if shift_labels is None:  # TRL's layout without shift_labels: the T - 1 positions that predict a label
        loss, entropy, is_top1, targets = (t[:, :-1] for t in (loss, entropy, is_top1, targets))
    mask = targets != -100
    log_probs = -loss
    loss = -log_probs.sum() / (mask.sum().clamp(min=1) if num_items is None else num_items)
    return FusedCausalLMOutput(loss=loss, log_probs=log_probs, entropy=entropy, is_top1=is_top1, label_mask=mask)
