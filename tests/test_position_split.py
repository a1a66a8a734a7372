"""Frozen positions: the patched training forward runs what no reserved id can reach without a backward, and
gives the dense reference's loss and row gradients.

The dense reference is the unpatched model with its whole table trainable and its own loss from logits; its
table gradient at the reserved ids is what the rows must get. Tolerance: the same loss summed in other orders
(the fused loss's tiles; rows of the batch and runs of positions in other GEMM shapes; the models' eager
attention takes its softmax in float32 over rows of other lengths): each of the V + D + T terms of a sum
contributes at most one rounding of eps32 relative, so ``(V + D + T)·eps32`` relative bounds the difference of
the loss, and the rows' gradients carry the same relative difference back through the body.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the frozen-position split is for transformers models")

from reserved_kernels.models import patch_model, position_split  # noqa: E402
from tests.families import tiny_gemma, tiny_llama, tiny_qwen2  # noqa: E402

RESERVED = [7, 8, 9, 10, 11]
LENGTH = 200  # longer than Gemma 2/3's tiny sliding window (64): a cached prefix crosses it
EPS32 = torch.finfo(torch.float32).eps


def _model(kind: str):
    """(a tiny model of ``kind``, whether its head is tied)."""
    if kind in ("gemma", "gemma2", "gemma3"):
        return tiny_gemma(kind), True
    if kind == "llama-untied":
        return tiny_llama(1024, tied=False), False
    return tiny_qwen2(1024, 1000, tied=True), True


def _batch(length: int = LENGTH):
    """Rows as a real batch mixes them: ordinary text, a term at position 0, a term mid-row (and a second one
    later), a term near the end, a left-padded row; -100 on padding."""
    ids = torch.randint(108, 1000, (5, length), generator=torch.Generator().manual_seed(0))
    ids[1, 0] = 7
    ids[2, 80], ids[2, 160] = 8, 11
    ids[3, 180] = 9
    ids[4, 100] = 10
    mask = torch.ones_like(ids)
    mask[4, :12] = 0  # left padding
    mask[1, -9:] = 0  # right padding
    return ids, mask, ids.masked_fill(mask == 0, -100)


def _dense_reference(model, tied: bool, **batch):
    """The unpatched model with its whole table (and untied head) trainable: its loss and the table gradients
    at the reserved ids."""
    model = copy.deepcopy(model).train()
    for p in model.parameters():
        p.requires_grad_(False)
    tables = [model.get_input_embeddings().weight] + ([] if tied else [model.get_output_embeddings().weight])
    for t in tables:
        t.requires_grad_(True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), [t.grad[RESERVED] for t in tables]


def _ours(model, tied: bool, skip: bool = True, **batch):
    patched = patch_model(copy.deepcopy(model), RESERVED, skip_frozen=skip).train()
    loss = patched(**batch).loss
    loss.backward()
    rows = [patched.get_input_embeddings().reserved_weight] + (
        [] if tied else [patched.get_output_embeddings().reserved_weight])
    return loss.detach(), [r.grad for r in rows]


def _assert_close(ours, reference, vocab=1024, dim=64, length=LENGTH):
    tol = (vocab + dim + length) * EPS32
    (loss, grads), (ref_loss, ref_grads) = ours, reference
    torch.testing.assert_close(loss, ref_loss, rtol=tol, atol=0)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=tol, atol=tol * r.abs().max().item())


@contextlib.contextmanager
def _split_calls():
    """Record whether each call of hf_split (the training loss's and TRL's statistics') split the batch (None:
    nothing was frozen)."""
    calls = []
    original = position_split.hf_split

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append(out is not None)
        return out

    position_split.hf_split = spy
    try:
        yield calls
    finally:
        position_split.hf_split = original


@pytest.mark.parametrize("kind", ["gemma", "gemma2", "gemma3", "llama-untied", "qwen2"])
def test_the_split_step_gives_the_dense_references_loss_and_gradients(kind):
    model, tied = _model(kind)
    ids, mask, labels = _batch()
    batch = dict(input_ids=ids, attention_mask=mask, labels=labels)
    with _split_calls() as calls:
        ours = _ours(model, tied, **batch)
    assert calls == [True]
    _assert_close(ours, _dense_reference(model, tied, **batch))


def test_only_the_live_positions_run_with_gradients():
    """The body sees, with gradients on, exactly the positions at or after each row's first reserved id."""
    model, tied = _model("gemma3")
    ids, mask, labels = _batch()
    patched = patch_model(copy.deepcopy(model), RESERVED).train()
    seen = []
    hook = patched.model.layers[0].register_forward_pre_hook(
        lambda module, args: seen.append((torch.is_grad_enabled(), args[0].shape[0] * args[0].shape[1])))
    patched(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    hook.remove()
    # Row 4's term is at 100, but the row is left-padded: its padding queries see the whole row, so it is not split.
    live = sum(LENGTH - f for f in (LENGTH, 0, 80, 180, 0))
    assert sum(n for grad, n in seen if grad) == live
    assert sum(n for grad, n in seen if not grad) == 5 * LENGTH - live


def test_packed_rows_shift_labels_and_the_trainer_normaliser():
    """position_ids restarting inside a row (packing), the labels shifted by the caller, num_items_in_batch."""
    model, tied = _model("gemma3")
    ids, mask, labels = _batch()
    position_ids = torch.cat([torch.arange(90), torch.arange(LENGTH - 90)]).expand(5, -1).contiguous()
    shift = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    batch = dict(input_ids=ids, attention_mask=mask, position_ids=position_ids, labels=labels, shift_labels=shift,
                 num_items_in_batch=123)
    with _split_calls() as calls:
        ours = _ours(model, tied, **batch)
    assert calls == [True]
    _assert_close(ours, _ours(model, tied, skip=False, **batch))
    reference = dict(input_ids=ids, attention_mask=mask, position_ids=position_ids, labels=labels,
                     num_items_in_batch=123)
    _assert_close(ours, _dense_reference(model, tied, **reference))


def test_a_batch_without_reserved_ids_still_gives_the_rows_their_head_gradient_and_zeros_at_the_input():
    """Ordinary text alone: the body runs without gradients; the tied head's K columns still train the rows; an
    untied model's input rows get the zero gradient the usual path gives them (an optimizer decays them)."""
    for kind in ("gemma", "llama-untied"):
        model, tied = _model(kind)
        ids = torch.randint(108, 1000, (2, 40), generator=torch.Generator().manual_seed(1))
        batch = dict(input_ids=ids, labels=ids)
        with _split_calls() as calls:
            ours = _ours(model, tied, **batch)
        assert calls == [True]
        _assert_close(ours, _dense_reference(model, tied, **batch), length=40)
        if not tied:
            assert torch.equal(ours[1][0], torch.zeros_like(ours[1][0]))


def test_the_skip_turns_itself_off_where_it_cannot_be_exact(monkeypatch):
    model, tied = _model("gemma3")
    ids, mask, labels = _batch()
    batch = dict(input_ids=ids, attention_mask=mask, labels=labels)
    reference = _dense_reference(model, tied, **batch)

    patched = patch_model(copy.deepcopy(model), RESERVED).train()
    # a LoRA beside the rows: every position depends on it
    patched.model.layers[0].mlp.down_proj.weight.requires_grad_(True)
    with _split_calls() as calls:
        patched(**batch).loss.backward()
    assert calls == []
    with _split_calls() as calls:
        _assert_close(_ours(model, tied, skip=False, **batch), reference)
    assert calls == []
    monkeypatch.setenv(position_split.SKIP_ENV_VAR, "0")
    with _split_calls() as calls:
        _ours(model, tied, **batch)
    assert calls == []


def test_autocast_gives_the_same_step_as_without_the_skip():
    """bf16 autocast on the CPU: the split runs the same autocast regions, so both paths agree to bf16's
    rounding (8 bits of mantissa, eps 2^-7, over the same (V + D + T) terms)."""
    model, tied = _model("gemma")
    ids, mask, labels = _batch()
    batch = dict(input_ids=ids, attention_mask=mask, labels=labels)
    results = []
    for skip in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(_ours(model, tied, skip=skip, **batch))
    (loss, grads), (ref_loss, ref_grads) = results
    tol = 2 ** -7 * 8
    torch.testing.assert_close(loss, ref_loss, rtol=tol, atol=0)
    torch.testing.assert_close(grads[0], ref_grads[0], rtol=tol, atol=tol * ref_grads[0].abs().max().item())


def test_rows_split_together_at_one_position_and_a_short_prefix_is_not_split():
    """Rows whose first term stands at the same position share one prefix call and one suffix call; a row whose
    frozen prefix is under 1/8 of it or 64 positions runs whole (its saved backward is worth less than a call)."""
    model, tied = _model("gemma")
    ids = torch.randint(108, 1000, (3, 160), generator=torch.Generator().manual_seed(2))
    ids[0, 100], ids[1, 100], ids[2, 50] = 7, 8, 9
    patched = patch_model(copy.deepcopy(model), RESERVED).train()
    calls = []
    hook = patched.model.layers[0].register_forward_pre_hook(
        lambda module, args: calls.append((torch.is_grad_enabled(), tuple(args[0].shape[:2]))))
    loss = patched(input_ids=ids, labels=ids).loss
    loss.backward()
    hook.remove()
    assert sorted(calls) == [(False, (2, 100)), (True, (1, 160)), (True, (2, 60))]
    _assert_close((loss.detach(), [patched.get_input_embeddings().reserved_weight.grad]),
                  _dense_reference(model, tied, input_ids=ids, labels=ids), length=160)
    short = ids.clone()
    short[:, 100] = short[2, 6]  # every row's first term now before position 64: nothing worth splitting
    short[0, 3], short[1, 63] = 7, 8
    with _split_calls() as split:
        patched(input_ids=short, labels=short).loss.backward()
    assert split == [False]  # the usual path ran


@pytest.mark.parametrize("reentrant", [False, True])
def test_under_gradient_checkpointing_rows_without_a_term_still_run_without_a_backward(reentrant):
    """transformers turns the KV cache off under gradient checkpointing, so no prefix is split there; rows without
    a reserved id still run under no_grad, and the step is the dense reference's."""
    model, tied = _model("gemma3")
    ids, mask, labels = _batch()
    batch = dict(input_ids=ids, attention_mask=mask, labels=labels)
    patched = patch_model(copy.deepcopy(model), RESERVED).train()
    if hasattr(patched, "activation_checkpointing_enable"):  # transformers 5's name; the old one warns there
        patched.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    else:
        patched.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    seen = []
    hook = patched.model.layers[0].register_forward_pre_hook(
        lambda module, args: seen.append((torch.is_grad_enabled(), tuple(args[0].shape[:2]))))
    with _split_calls() as calls:
        loss = patched(**batch).loss
    loss.backward()
    hook.remove()
    assert calls == [True]
    # Row 0 has no term; rows 1-4 run whole (the reentrant checkpoint runs each layer's forward again in backward).
    assert (False, (1, LENGTH)) in seen and {s for g, s in seen if g} == {(4, LENGTH)}
    rows = patched.get_input_embeddings().reserved_weight
    _assert_close((loss.detach(), [rows.grad]), _dense_reference(model, tied, **batch))


@pytest.mark.parametrize("shifted", [False, True])
def test_trl_statistics_split_the_batch_and_equal_the_dense_logits(shifted):
    """TRL's fused_lm_head=True call: per-token log-probabilities, entropy and top-1 in the batch's layout, from
    the split (frozen positions without a backward), equal to the unpatched model's logits; the rows' gradient of
    TRL's loss equals the dense reference's table gradient."""
    pytest.importorskip("trl", reason="the fused_lm_head contract is TRL's (scripts/test.sh installs it)")
    model, tied = _model("gemma3")
    ids, mask, labels = _batch()
    shift = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    extra = dict(shift_labels=shift) if shifted else {}
    patched = patch_model(copy.deepcopy(model), RESERVED).train()
    with _split_calls() as calls:
        out = patched(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True, **extra)
    assert calls == [True]
    out.loss.backward()
    dense = copy.deepcopy(model).train()
    for p in dense.parameters():
        p.requires_grad_(False)
    table = dense.get_input_embeddings().weight.requires_grad_(True)
    logits = dense(input_ids=ids, attention_mask=mask).logits.float()
    targets = shift if shifted else labels[:, 1:]
    logits = logits if shifted else logits[:, :-1]
    counted = targets != -100
    log_p = torch.log_softmax(logits, -1)
    expected = torch.where(counted, log_p.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1), 0)
    entropy = torch.where(counted, -(log_p.exp() * log_p).sum(-1), 0)
    top1 = counted & (logits.argmax(-1) == targets)
    assert out.log_probs.shape == targets.shape and torch.equal(out.label_mask, counted)
    tol = (1024 + 64 + LENGTH) * EPS32
    torch.testing.assert_close(out.log_probs, expected, rtol=tol, atol=tol * expected.abs().max().item())
    torch.testing.assert_close(out.entropy, entropy, rtol=tol, atol=tol * entropy.abs().max().item())
    # Top-1 may differ only where the two best logits are within the rounding of each other.
    top2 = logits.topk(2, -1).values
    near_tie = (top2[..., 0] - top2[..., 1]) <= tol * top2[..., 0].abs()
    assert torch.equal(out.is_top1 | near_tie, top1 | near_tie)
    (-expected.sum() / counted.sum()).backward()
    _assert_close((out.loss.detach(), [patched.get_input_embeddings().reserved_weight.grad]),
                  (-expected.sum().detach() / counted.sum(), [table.grad[RESERVED]]))


def test_a_training_forward_does_not_walk_the_model_to_decide_the_split(monkeypatch):
    """Which parameters are the rows, and whether the config asks for dropout, are decided by patch_model; a
    training forward reads the kept tuples' flags and never walks the module tree (host time on every step:
    about 0.66 ms on Gemma 3 270M before, see the note of issue #36)."""
    model, _ = _model("gemma3")
    patched = patch_model(model, RESERVED).train()
    ids, mask, labels = _batch()
    walks = []
    for name in ("named_parameters", "named_modules"):
        original = getattr(torch.nn.Module, name)

        def counting(self, *args, _original=original, _name=name, **kwargs):
            walks.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.nn.Module, name, counting)
    with _split_calls() as calls:
        patched(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    assert calls and walks == []  # the split ran, and nothing walked the model to decide it


def test_the_decision_kept_at_patch_time_follows_the_flags_set_after_it():
    """Flags changed after patching are read on the next step: rows frozen on purpose (freeze_rows) or another
    parameter unfrozen turn the split off, and it comes back when they are undone. Dropout is read at patch time,
    when the model's modules have read it too."""
    from reserved_kernels.models import freeze_rows

    model, _ = _model("gemma3")
    patched = patch_model(copy.deepcopy(model), RESERVED).train()
    assert position_split.skip_unavailable(patched) is None
    layer = patched.model.layers[0].mlp.down_proj.weight
    layer.requires_grad_(True)
    assert position_split.skip_unavailable(patched) == "a parameter other than the reserved rows trains"
    layer.requires_grad_(False)
    assert position_split.skip_unavailable(patched) is None
    freeze_rows(patched)
    assert position_split.skip_unavailable(patched) == "the reserved rows are frozen"
    with torch.no_grad():
        assert position_split.skip_unavailable(patch_model(copy.deepcopy(model), RESERVED)) == "gradients are off"
    model.config.attention_dropout = 0.1
    ids, _, _ = _batch()
    dropping = patch_model(copy.deepcopy(model), RESERVED).train()
    assert position_split.frozen_split_unsupported(dropping, dict(input_ids=ids)) == "dropout"


def test_a_parameter_registered_anew_after_patching_is_read_where_it_now_is():
    """FSDP2's fully_shard registers every parameter anew after patching: the step reads each slot's current
    parameter (its flag, and the rows that get the zero gradient when nothing is live), and keeps none it replaced
    alive."""
    import gc
    import weakref

    model, _ = _model("gemma3")
    patched = patch_model(copy.deepcopy(model), RESERVED).train()
    layer = patched.model.layers[0].mlp.down_proj
    old = weakref.ref(layer.weight)
    layer.weight = torch.nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
    gc.collect()
    assert old() is None  # the patch state holds no parameter
    assert position_split.skip_unavailable(patched) is None
    layer.weight.requires_grad_(True)
    assert position_split.skip_unavailable(patched) == "a parameter other than the reserved rows trains"
    # An untied model's input rows get their (zero) gradient from summed_loss when every position is frozen.
    untied = patch_model(_model("llama-untied")[0], RESERVED).train()
    embedding = untied.get_input_embeddings()
    embedding.reserved_weight = torch.nn.Parameter(embedding.reserved_weight.detach().clone())
    ids = torch.randint(108, 1000, (2, LENGTH), generator=torch.Generator().manual_seed(1))  # ordinary text
    with _split_calls() as calls:
        untied(input_ids=ids, labels=ids).loss.backward()
    assert calls == [True]  # every position frozen: no live part
    assert embedding.reserved_weight.grad is not None and not embedding.reserved_weight.grad.any()
