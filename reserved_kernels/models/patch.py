"""Swap a causal LM's embedding and output head for the reserved-row modules, and back.

Hugging Face causal LMs with ``get_input_embeddings`` — Gemma 1/2/3, Llama 3 and Qwen2, tied or untied
heads — a PEFT model around one, and gemma_pytorch-layout models (``embedder``, or
``text_token_embedder`` in Gemma 3's multimodal model; float or int8).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from reserved_kernels._progress import announced
from reserved_kernels.models import position_split
from reserved_kernels.models.integrations import huggingface, peft_tokens
from reserved_kernels.models.layout import (
    base_model,
    has_peft_layers,
    input_embedding,
    output_head,
    set_input_embedding,
)
from reserved_kernels.models.state import PatchState, attach, patch_state
from reserved_kernels.modules.embedding import ReservedEmbedding
from reserved_kernels.modules.lm_head import ReservedLMHead
from reserved_kernels.vocab.planning import ReservedPlan, ReservedVocab
from reserved_kernels.vocab.untrained import untrained_rows

INIT_CHOICES = (None, "description", "mean", "copy")
PEFT_ORDER_MESSAGE = (
    "the reserved rows of this patched model were frozen, and the model has PEFT adapter layers: "
    "get_peft_model() freezes every parameter that is not the adapter's. Apply LoRA first, then patch: "
    "peft_model = get_peft_model(model, config); patch_model(peft_model, plan). To train only the adapter "
    "and keep the rows as they are, call reserved_kernels.models.freeze_rows(model).")
FORWARD_REPLACED_MESSAGE = (
    "the patched model's forward was replaced after patch_model (TRL's SFTTrainer does so with its fused LM head, "
    "which reads lm_head.weight, the frozen table without the trained rows): create the trainer first, then "
    "patch_model(trainer.model, plan) — the patched forward serves TRL's fused_lm_head=True calls itself.")


def _reserved_ids(reserved) -> tuple[list[int], ReservedPlan | None]:
    if isinstance(reserved, ReservedVocab):
        reserved = reserved.plan
    if isinstance(reserved, ReservedPlan):
        if not reserved.entries:
            raise ValueError("the plan has no entries: assign terms before patching")
        return reserved.ids, reserved
    return [int(i) for i in torch.as_tensor(reserved).reshape(-1).tolist()], None


def _untrained_seed(reserved) -> list[int] | None:
    """Rows known never to have been trained, which seed the untrained-row test: a vocabulary's reserved slots, or
    a plan's."""
    if isinstance(reserved, ReservedVocab):
        return reserved.reserved_ids
    return reserved.ids if isinstance(reserved, ReservedPlan) else None


def patch_model(model: nn.Module, reserved: Sequence[int] | Tensor | ReservedPlan | ReservedVocab | None = None, *,
                init: str | None = None, noise_std: float = 0.0, generator: torch.Generator | None = None,
                copy_from: int | None = None, exclude: Sequence[int] | None = None, exclude_untrained: bool = True,
                train_others: bool = False, reserved_dtype: torch.dtype | None = None,
                fused_loss: bool = True, skip_frozen: bool = True) -> nn.Module:
    """Make only the rows ``reserved`` of ``model``'s embedding (and tied output head) trainable.

    Works on Hugging Face ``GemmaForCausalLM`` / ``Gemma2ForCausalLM`` / ``Gemma3ForCausalLM`` (a
    scaled-embedding module in newer releases, the √D scale in the model's forward in older ones: both
    are kept exactly), on a PEFT model wrapping one, and on gemma_pytorch-layout models (int8 with
    ``weight_scaler`` too; train those with :func:`~reserved_kernels.models.causal_lm_loss`). Untrained,
    the patched model's logits are bit-identical to the original's. No V×D copy is made.

    Args:
        reserved: reserved ids, or a plan (``ReservedPlan`` / ``ReservedVocab``) whose ids are used.
        init: how to initialise the reserved rows, through the batched mean-init op on the raw rows:
            ``None`` (keep them), ``"description"`` (mean of each term's description sub-tokens; needs
            a plan), ``"mean"`` (mean of all rows except ``exclude`` and the reserved ids), ``"copy"``
            (row ``copy_from``). ``noise_std`` / ``generator`` add Gaussian noise.
        exclude_untrained: drop the table's untrained rows (:func:`untrained_rows`: near-zero or
            duplicated rows, and — given a plan, whose slots are known never to have been trained — rows
            in those slots' shared direction) from every mean; a description left with none falls back to
            the mean of all trained rows, with a warning. An untied head averages its own table's rows.
        train_others: keep other parameters' ``requires_grad``; by default every other parameter is
            frozen. A PEFT model always keeps its adapter trainable.
        reserved_dtype: dtype of the trainable rows (default float32 for a 16-bit table).
        fused_loss: a Hugging Face model's ``labels=`` loss in training goes through the fused linear
            cross-entropy, without the (B, T, V) logits (:mod:`reserved_kernels.models.integrations.huggingface`);
            False keeps the model's own loss from logits.
        skip_frozen: with the fused loss, positions that no reserved id can reach (before a row's first
            reserved id, and rows without one) run without a backward through the body, and only their K
            head columns' gradient is computed (:mod:`reserved_kernels.models.position_split`): in the training loss,
            TRL's ``fused_lm_head`` statistics and gemma_pytorch's ``causal_lm_loss``; the same loss and
            gradients up to floating-point summation order. It reads the batch's ids on the host once a
            step. It turns itself off — the usual path runs — whenever a parameter other than the rows
            trains (a LoRA adapter beside them), with dropout, with ``inputs_embeds``, a KV cache passed in,
            or inputs it does not slice (anything but ``input_ids``, a (B, T) ``attention_mask`` and
            ``position_ids``). A row is cut at its first reserved id only where that leaves at least
            max(T/8, 64) positions before it; never under gradient checkpointing (transformers turns the KV
            cache off there) or in a left-padded row (:func:`~reserved_kernels.models.position_split.split_points`):
            such rows run whole, and rows without a reserved id still run without a backward.
            False (or ``RESERVED_KERNELS_SKIP_FROZEN=0`` when patching) turns it off. Which parameters are the
            rows is decided here, and each step reads only the ``requires_grad`` flags of what is registered
            where the model's parameters are now (a parameter registered anew in place, as FSDP2 does, is
            read): a parameter added elsewhere after patching is not seen (patch after adding it; PEFT's
            adapters go first anyway, see below).

    With PEFT, apply the adapter first (``get_peft_model``), then patch the PEFT model: the adapter and
    the rows train together. Patching first and then calling ``get_peft_model`` freezes the rows (PEFT
    freezes every non-adapter parameter); the next training forward raises an error saying so.

    **PEFT's trainable tokens** (``TrainableTokensConfig``, or ``LoraConfig(trainable_token_indices=...)``):
    ``patch_model(peft_model)`` accelerates them in place (:mod:`reserved_kernels.models.integrations.peft_tokens`):
    PEFT's ``trainable_tokens_delta`` stays the trainable parameter and PEFT's layers stay in the model, computing
    through our fused gather and fused loss. ``reserved`` may then be omitted, or name the same ids (a
    :class:`ReservedVocab` is kept for :func:`save_pretrained`); ``init`` initialises PEFT's rows; the other
    options do not apply. :func:`merge` undoes the acceleration only (PEFT's ``merge_and_unload`` merges);
    save with PEFT's ``save_pretrained``. A head in ``modules_to_save`` (a trainable V x D copy) is refused.
    """
    if init not in INIT_CHOICES:
        raise ValueError(f"init must be one of {INIT_CHOICES}, got {init!r}")
    embedding = input_embedding(model)
    if isinstance(embedding, ReservedEmbedding) or patch_state(model) is not None:
        raise ValueError("the model is already patched; merge() it first")
    if peft_tokens.is_trainable_tokens(embedding):
        return _accelerate_peft(model, reserved, embedding, init=init, noise_std=noise_std, generator=generator,
                                copy_from=copy_from, exclude=exclude, exclude_untrained=exclude_untrained,
                                fused_loss=fused_loss, skip_frozen=skip_frozen)
    if reserved is None:
        raise TypeError("patch_model needs the reserved ids (or a plan) unless the model carries PEFT's trainable "
                        "tokens")
    ids, plan = _reserved_ids(reserved)
    if hasattr(embedding, "original_module"):
        raise ValueError(f"the embedding is wrapped by PEFT's {type(embedding).__name__} (modules_to_save or "
                         "trainable tokens), a trainable V x D copy of the table: leave the embedding out of "
                         "modules_to_save / trainable_token_indices; patch_model trains and saves the rows itself")
    base = base_model(model)
    peft = base is not model
    # Newer transformers keep the √D scale in the module (an fp32 buffer rounded to the table dtype in
    # forward); older ones and gemma_pytorch apply it in the model's forward.
    scale = float(embedding.embed_scale) if isinstance(getattr(embedding, "embed_scale", None), Tensor) else None
    head = output_head(model)
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    with announced(f"converting the embedding{'' if head is None else ' and the output head'} "
                   f"({len(ids)} trainable rows)"):
        new_embedding = ReservedEmbedding.from_embedding(embedding, ids, scale=scale, reserved_dtype=reserved_dtype)
        new_head = None
        if isinstance(head, nn.Linear):
            if head.weight is new_embedding.weight:
                new_head = ReservedLMHead.tied_to(new_embedding)
            else:
                new_head = ReservedLMHead.from_linear(head, ids, reserved_dtype=reserved_dtype)
    with announced(f"initialising {len(ids)} rows ({init})"):
        _initialise(new_embedding, new_head, init, plan, noise_std, generator, copy_from, exclude,
                    _untrained_seed(reserved) if exclude_untrained else False)
    set_input_embedding(model, new_embedding)
    if new_head is not None:
        base.set_output_embeddings(new_head)
    if not (train_others or peft):
        for p in model.parameters():
            p.requires_grad_(False)
    for module in (new_embedding, new_head):
        if module is not None:
            module.weight.requires_grad_(False)
            module.reserved_weight.requires_grad_(True)
    _keep_state(model, reserved, PatchState(embedding=embedding, head=head, requires_grad=requires_grad,
                                            guard=base.register_forward_pre_hook(_training_guard)),
                skip_frozen=skip_frozen, fused_loss=fused_loss if isinstance(new_head, ReservedLMHead) else None)
    return model


def _accelerate_peft(model: nn.Module, reserved, embedding: nn.Module, *, init, noise_std, generator, copy_from,
                     exclude, exclude_untrained, fused_loss: bool, skip_frozen: bool) -> nn.Module:
    """:func:`patch_model` for PEFT's trainable tokens: PEFT's layers computing through our ops (see there)."""
    base = base_model(model)
    head = output_head(model)
    if any(hasattr(m, "original_module") for m in (head, getattr(head, "base_layer", None)) if m is not None):
        raise ValueError("the output head is in PEFT's modules_to_save: a trainable V x D copy of the head (TRL's "
                         "SFTTrainer puts lm_head there when its chat template adds tokens to the tokenizer). Leave "
                         "lm_head out of modules_to_save (map new tokens onto reserved slots instead of adding them): "
                         "with trainable tokens the tied head trains its K rows already")
    adapters = embedding.active_adapters
    if len(adapters) != 1:
        raise ValueError(f"PEFT's trainable tokens are accelerated with one active adapter, not {adapters}")
    ids = list(embedding.token_indices[adapters[0]])
    plan = None
    if reserved is not None:
        wanted, plan = _reserved_ids(reserved)
        if sorted(wanted) != sorted(ids):
            raise ValueError(f"the PEFT adapter trains the tokens {ids[:8]}, not the ids given ({wanted[:8]})")
        if wanted != ids:
            raise ValueError("the plan's ids are the adapter's token_indices in another order: the rows would be "
                             "initialised for the wrong tokens; give the ids in the adapter's order")
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    swapped = peft_tokens.accelerate(embedding, head)
    if init is not None:
        with announced(f"initialising {len(ids)} rows ({init})"):
            _initialise(embedding, head, init, plan, noise_std, generator, copy_from, exclude,
                        _untrained_seed(reserved) if exclude_untrained else False)
    _keep_state(model, reserved, PatchState(embedding=embedding, head=head, requires_grad=requires_grad,
                                            guard=base.register_forward_pre_hook(_training_guard),
                                            accelerated=swapped),
                skip_frozen=skip_frozen, fused_loss=fused_loss if head is not None else None)
    return model


def _keep_state(model: nn.Module, reserved, state: PatchState, *, skip_frozen: bool, fused_loss: bool | None) -> None:
    """The end of both patch paths: what a training step needs decided once (where every parameter is registered,
    whether frozen positions may be skipped, whether the config asks for dropout) onto ``state``, ``state`` onto the
    model, and a transformers model's patched forward (its labels= path, and TRL's fused head) unless
    ``fused_loss`` is None (no patched head)."""
    state.vocab = reserved if isinstance(reserved, ReservedVocab) else None
    state.skip_frozen = position_split.skip_allowed(skip_frozen)
    attach(model, state)
    state.row_slots, state.other_slots = position_split.parameter_slots(model)
    state.dropout = position_split.has_dropout(model)
    state.checkpointing = position_split.checkpointing_modules(model)
    base = base_model(model)
    if fused_loss is not None and hasattr(base, "base_model_prefix") and hasattr(base, "config"):
        huggingface.install(base, state, fused_loss)


def _training_guard(module: nn.Module, args) -> None:
    """A forward pre-hook for training calls: the rows frozen with PEFT layers present means get_peft_model ran
    last; a patched forward no longer reached means something replaced it (TRL's fused head)."""
    if not (module.training and torch.is_grad_enabled()):
        return
    state = patch_state(module)
    if state is None:
        return
    if state.forward is not None and not huggingface.is_reached(module):
        raise RuntimeError(FORWARD_REPLACED_MESSAGE)
    if state.accelerated:  # PEFT's own adapter: PEFT says what trains
        return
    embedding = input_embedding(module)
    if not (embedding.reserved_weight.requires_grad or state.rows_frozen_on_purpose) and has_peft_layers(module):
        raise RuntimeError(PEFT_ORDER_MESSAGE)


def freeze_rows(model: nn.Module) -> nn.Module:
    """Freeze a patched model's reserved rows on purpose (e.g. to train only a PEFT adapter next)."""
    embedding = patched_embedding(model)
    patch_state(model).rows_frozen_on_purpose = True
    embedding.reserved_weight.requires_grad_(False)
    head = output_head(model)
    if isinstance(head, ReservedLMHead):
        head.reserved_weight.requires_grad_(False)
    return model


def _sources(weight: Tensor, weight_scaler: Tensor | None, reserved_ids: list[int], init: str, plan, copy_from,
             exclude, untrained: list[int] | None | bool) -> tuple[list[list[int]], list[int] | None]:
    """(source lists, target ids) of one table for ``init``; excluded and untrained rows never feed a mean.

    ``untrained``: False keeps untrained rows; otherwise they are found, seeded by these reference ids
    (None: no reference). A description whose rows are all untrained (or excluded) falls back to the mean
    of every trained row, with a warning naming the term.
    """
    if init == "copy":
        if copy_from is None:
            raise ValueError('init="copy" needs copy_from=<row id>')
        return [[int(copy_from)]], None
    skip = set(exclude or ()) | set(reserved_ids)
    if untrained is not False:
        with announced(f"looking for untrained rows in the {weight.shape[0]:,} x {weight.shape[1]} table"):
            skip |= set(untrained_rows(weight, weight_scaler=weight_scaler, reference_ids=untrained).ids)
    trained = [i for i in range(weight.shape[0]) if i not in skip]
    if init == "mean":
        return [trained], None
    if plan is None:
        raise ValueError('init="description" needs a plan (ReservedPlan or ReservedVocab), not bare ids')
    lists = []
    for entry in plan.entries:
        kept = [i for i in entry.source_ids if i not in skip]
        if not kept:
            warnings.warn(f"{entry.term!r}: every row of its description is untrained or excluded "
                          f"({list(entry.source_ids)[:10]}); its row starts as the mean of all trained rows",
                          UserWarning, stacklevel=4)
            kept = trained
        lists.append(kept)
    return lists, plan.ids


def _initialise(embedding: ReservedEmbedding, head: ReservedLMHead | None, init, plan, noise_std, generator,
                copy_from, exclude, untrained) -> None:
    if init is None:
        return
    ids = embedding.reserved_ids.tolist()
    head = head if head is not None and head.tied is None and head.reserved_ids.numel() else None
    sources, targets = _sources(embedding.weight, embedding.weight_scaler, ids, init, plan, copy_from, exclude,
                                untrained)
    embedding.init_reserved_(sources, targets=targets, noise_std=noise_std, generator=generator)
    if head is not None:
        # An untied head's rows are output vectors: the means of the same ids in the head's own table.
        sources, targets = _sources(head.weight, None, ids, init, plan, copy_from, exclude, untrained)
        head.init_reserved_(sources, targets=targets, noise_std=noise_std, generator=generator)


def patched_embedding(model: nn.Module) -> ReservedEmbedding:
    embedding = input_embedding(model)
    state = patch_state(model)
    if state is not None and state.accelerated:
        raise ValueError("the rows of this model are PEFT's (patch_model accelerated its trainable tokens): PEFT's "
                         "own methods manage them; save with peft_model.save_pretrained(folder), the same adapter "
                         "format")
    if not isinstance(embedding, ReservedEmbedding):
        raise ValueError("the model is not patched (its input embedding is not a ReservedEmbedding)")
    return embedding


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """Write the trained rows into the tables and put the original (vanilla) modules back.

    Rows are rounded to the table dtype; an int8 gemma_pytorch table re-quantises each trained row with
    its own new scale (within half a quantisation step, see ``ReservedEmbedding.merged_table``). The
    result's state dict loads into an unpatched model and gives the same logits. Each parameter's
    ``requires_grad`` is restored to what it was before :func:`patch_model`.
    """
    state = patch_state(model)
    if state is not None and state.accelerated:  # PEFT's rows stay PEFT's: undo the acceleration only
        peft_tokens.restore(state.accelerated)
        state.guard.remove()
        huggingface.uninstall(base_model(model), state)
        attach(model, None)
        return model
    embedding = patched_embedding(model)
    head = output_head(model)
    embedding.merge_()  # in place, into the Parameter the original module still holds
    set_input_embedding(model, state.embedding)
    if isinstance(head, ReservedLMHead):
        if head.tied is None:
            head.merge_()
        base_model(model).set_output_embeddings(state.head)
    state.guard.remove()
    huggingface.uninstall(base_model(model), state)
    attach(model, None)
    for name, p in model.named_parameters():
        p.requires_grad_(state.requires_grad.get(name, p.requires_grad))
    return model
