"""What :func:`~reserved_kernels.models.patch_model` changed on a model, kept so that ``merge`` can undo it.

One :class:`PatchState` per patched model, held by the model that was patched (a PEFT wrapper's base model)
outside the module tree (its ``__dict__``), so ``state_dict`` and ``.parameters()`` never see it, and the
patched forward finds it on ``self`` whatever wraps the modules; :func:`patch_state` is the one way to reach it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from torch import nn
from torch.utils.hooks import RemovableHandle

from reserved_kernels.models.layout import base_model

_KEY = "_reserved_patch_state"


@dataclasses.dataclass
class ForwardSwap:
    """A Hugging Face model's forward replaced by the patched one
    (:mod:`reserved_kernels.models.integrations.huggingface`)."""

    previous: Callable | None  # the instance forward before, or None for the class's own
    fused_loss: bool  # labels= in training goes through the fused loss


@dataclasses.dataclass
class PatchState:
    embedding: nn.Module  # the original token table module, put back by merge
    head: nn.Module | None  # the original output head
    requires_grad: dict[str, bool]  # every parameter's flag before patching
    guard: RemovableHandle  # the training-call pre-hook on the base model
    vocab: Any = None  # the ReservedVocab given to patch_model, if one was (its tokenizer for save_pretrained)
    rows_frozen_on_purpose: bool = False  # freeze_rows was called: frozen rows beside PEFT layers are intended
    skip_frozen: bool = True  # positions no reserved id reaches run without a backward (models.position_split)
    # where the rows and every other parameter are registered, read each step without a walk (position_split)
    row_slots: tuple[tuple[dict, str], ...] = ()
    other_slots: tuple[tuple[dict, str], ...] = ()
    checkpointing: tuple[nn.Module, ...] = ()  # the modules whose gradient_checkpointing flag transformers reads
    dropout: bool = False  # the config asks for dropout: split calls would draw other masks than one call
    forward: ForwardSwap | None = None
    # PEFT token layers patch_model accelerated (models.integrations.peft_tokens)
    accelerated: list[nn.Module] = dataclasses.field(default_factory=list)


def attach(model: nn.Module, state: PatchState | None) -> None:
    """Keep ``state`` on ``model`` (a PEFT wrapper's base model); None forgets it."""
    base = base_model(model)
    if state is None:
        base.__dict__.pop(_KEY, None)
    else:
        base.__dict__[_KEY] = state


def patch_state(model: nn.Module) -> PatchState | None:
    """The state of a patched model (or of the model a PEFT wrapper holds), None when it is not patched."""
    return base_model(model).__dict__.get(_KEY)
