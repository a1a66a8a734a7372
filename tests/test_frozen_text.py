"""FrozenText: the exact loss of ordinary text at the current rows from one pass, against the dense reference.

The dense reference is the unpatched model with the current rows written into its table (and untied head),
the whole table trainable, its own loss from its logits; its table gradient at the reserved ids is what the
rows must get. Tolerance, as in test_frozen: the same loss summed in other orders (the fused loss's tiles, the
cached K columns apart from the V − K frozen ones, the batch's rows in other GEMM shapes): each of the
V + D + T terms of a sum contributes at most one rounding of eps32 relative, so ``(V + D + T)·eps32`` relative
bounds the difference of the loss and of the rows' gradients.
"""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="FrozenText's tests use transformers models")

from reserved_kernels.models import FrozenText, StaleFrozenText, merge, patch_model  # noqa: E402
from tests.families import tiny_gemma, tiny_llama  # noqa: E402

RESERVED = [7, 8, 9, 10, 11]
LENGTH = 90  # past Gemma 2/3's tiny sliding window (64)
EPS32 = torch.finfo(torch.float32).eps
TOL = (1024 + 64 + LENGTH) * EPS32


def _model(kind: str):
    """(a tiny model of ``kind``, whether its head is tied)."""
    if kind == "llama-untied":
        return tiny_llama(1024, tied=False), False
    return tiny_gemma(kind), True


def _batches():
    """Ordinary text as a loader gives it: right padding, left padding, a -100 label, and a reserved *target* (the
    last token of a row is a reserved id: its own position predicts nothing, so nothing is reached)."""
    gen = torch.Generator().manual_seed(1)
    first = torch.randint(108, 1000, (3, LENGTH), generator=gen)
    first[0, -1] = 9
    mask = torch.ones_like(first)
    mask[1, -20:] = 0  # right padding
    mask[2, :15] = 0  # left padding
    labels = first.masked_fill(mask == 0, -100)
    labels[0, 30:34] = -100
    second = torch.randint(108, 1000, (2, LENGTH - 7), generator=gen)
    return [dict(input_ids=first, attention_mask=mask, labels=labels), second]


def _trained_rows(patched, tied: bool, seed: int = 3) -> None:
    """Move the rows as training would, far enough that the reserved columns matter."""
    gen = torch.Generator().manual_seed(seed)
    heads = [patched.get_input_embeddings()] + ([] if tied else [patched.get_output_embeddings()])
    with torch.no_grad():
        for module in heads:
            module.reserved_weight.add_(torch.randn(module.reserved_weight.shape, generator=gen) * 0.5)


def _dense_reference(model, patched, tied: bool, batches):
    """The unpatched model with the patched model's current rows in its tables: the mean loss over every batch and
    the table gradients at the reserved ids."""
    model = copy.deepcopy(model).train()
    for p in model.parameters():
        p.requires_grad_(False)
    tables = [model.get_input_embeddings().weight] + ([] if tied else [model.get_output_embeddings().weight])
    sources = [patched.get_input_embeddings()] + ([] if tied else [patched.get_output_embeddings()])
    with torch.no_grad():
        for table, source in zip(tables, sources, strict=True):
            table[RESERVED] = source.reserved_weight.to(table.dtype)
    for t in tables:
        t.requires_grad_(True)
    parts = [b if isinstance(b, dict) else dict(input_ids=b, labels=b) for b in batches]
    count = sum(int((p["labels"][:, 1:] != -100).sum()) for p in parts)
    loss = sum(model(**p, num_items_in_batch=count).loss for p in parts)
    loss.backward()
    return loss.detach(), [t.grad[RESERVED] for t in tables]


def _rows(patched, tied: bool):
    return [patched.get_input_embeddings().reserved_weight] + (
        [] if tied else [patched.get_output_embeddings().reserved_weight])


@pytest.mark.parametrize("kind", ["gemma", "gemma2", "gemma3", "llama-untied"])
def test_the_cached_loss_is_the_dense_references_before_and_after_the_rows_move(kind):
    model, tied = _model(kind)
    patched = patch_model(copy.deepcopy(model), RESERVED).train()
    batches = _batches()
    text = FrozenText(patched, batches)
    assert patched.training  # the pass ran in evaluation mode and put the mode back
    for step in range(2):
        if step:
            _trained_rows(patched, tied)
        for r in _rows(patched, tied):
            r.grad = None
        loss = text.loss()
        loss.backward()
        ref_loss, ref_grads = _dense_reference(model, patched, tied, batches)
        torch.testing.assert_close(loss, ref_loss, rtol=TOL, atol=0)
        ours = _rows(patched, tied)[-1].grad  # the head's rows: the tied embedding's, or the untied head's
        torch.testing.assert_close(ours, ref_grads[-1], rtol=TOL, atol=TOL * ref_grads[-1].abs().max().item())
        if not tied:  # the input side is never reached by frozen text
            assert _rows(patched, tied)[0].grad is None
        assert text.perplexity() == pytest.approx(float(ref_loss.exp()), rel=2 * TOL)


def test_the_cached_loss_equals_the_patched_models_own_fused_loss():
    """The same value the patched model's evaluation path gives (the slow way), at moved rows."""
    from reserved_kernels.models import perplexity

    model, tied = _model("gemma2")
    patched = patch_model(copy.deepcopy(model), RESERVED)
    batches = _batches()
    text = FrozenText(patched, batches)
    _trained_rows(patched, tied)
    assert text.perplexity() == pytest.approx(perplexity(patched, batches), rel=2 * TOL)


def test_the_disk_store_gives_the_same_bits_and_holds_the_hidden_states_on_disk(tmp_path):
    model, _ = _model("gemma3")
    patched = patch_model(copy.deepcopy(model), RESERVED)
    batches = _batches()
    in_memory = FrozenText(patched, batches)
    on_disk = FrozenText(patched, batches, path=tmp_path / "ordinary.bin")
    positions = len(in_memory)
    # targets: 3 rows of T - 1, less 20 right-padded, 14 left-padded (position 0 is never one), 4 at -100
    assert len(on_disk) == positions == 3 * (LENGTH - 1) - 20 - 14 - 4 + 2 * (LENGTH - 8)
    assert (tmp_path / "ordinary.bin").stat().st_size == on_disk.disk_bytes == positions * 64 * 4
    assert in_memory.nbytes - on_disk.nbytes == positions * 64 * 4
    assert in_memory.nbytes == positions * (64 + 2) * 4 + 2 * 8  # D + 2 numbers a token, one reserved target
    _trained_rows(patched, True)
    assert torch.equal(in_memory.loss(), on_disk.loss())
    assert "on disk" in repr(on_disk) and f"{positions:,} positions" in repr(on_disk)


def test_a_position_a_reserved_id_reaches_is_refused_by_batch_row_and_position():
    model, _ = _model("gemma")
    patched = patch_model(copy.deepcopy(model), RESERVED)
    batches = _batches()
    batches[1] = batches[1].clone()
    batches[1][1, 40] = 8
    with pytest.raises(ValueError, match=r"batch 1, row 1: the reserved id 8 at position 40 .*from position 41"):
        FrozenText(patched, batches)
    labels = batches[1].clone()
    labels[1, 41:] = -100  # what the message says: the row's reached positions no longer count
    text = FrozenText(patched, [dict(input_ids=batches[1], labels=labels)])
    assert len(text) == 2 * (LENGTH - 8) - (LENGTH - 8 - 40)


def test_bad_input_and_stale_models_are_refused():
    model, _ = _model("gemma3")
    with pytest.raises(TypeError, match="not patched"):
        FrozenText(model, _batches())
    patched = patch_model(copy.deepcopy(model), RESERVED)
    with pytest.raises(TypeError, match="batch 0: expected an input_ids tensor"):
        FrozenText(patched, [[1, 2, 3]])
    with pytest.raises(ValueError, match="no counted position in 1 batches"):
        FrozenText(patched, [dict(input_ids=torch.ones(2, 5, dtype=torch.long), labels=torch.full((2, 5), -100))])
    text = FrozenText(patched, _batches())
    layer = patched.model.layers[0].mlp.up_proj.weight
    layer.requires_grad_(True)  # a LoRA adapter training beside the rows moves every hidden state
    with pytest.raises(StaleFrozenText, match="model.layers.0.mlp.up_proj.weight requires grad"):
        text.loss()
    layer.requires_grad_(False)
    text.loss()
    with torch.no_grad():
        layer.mul_(1.0)  # changed in place: its version counter moves
    with pytest.raises(StaleFrozenText, match="changed since the pass"):
        text.loss()
    fresh = FrozenText(patched, _batches())
    merge(patched)
    with pytest.raises(StaleFrozenText, match="merged or unpatched"):
        fresh.perplexity()


class _Terms(torch.utils.data.Dataset):
    """Every target a reserved id: the head's reserved columns rise, and ordinary text pays for it."""

    def __len__(self):
        return 64

    def __getitem__(self, i):
        ids = torch.tensor([RESERVED[(i + j) % 5] for j in range(12)])
        return dict(input_ids=ids, labels=ids)


def _trainer(patched, tmp_path, trainer_cls=None, steps: int = 40):
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4,
                                          learning_rate=0.5, logging_steps=1000, report_to=[], save_strategy="no",
                                          use_cpu=True, disable_tqdm=True, seed=0)
    return (trainer_cls or transformers.Trainer)(model=patched, args=args, train_dataset=_Terms())


def test_the_callback_logs_perplexity_and_stops_a_trainer_when_it_rises(tmp_path):
    from reserved_kernels.models import PerplexityCallback

    model, _ = _model("gemma3")
    patched = patch_model(copy.deepcopy(model), RESERVED)
    trainer = _trainer(patched, tmp_path)
    callback = PerplexityCallback(FrozenText(patched, _batches()), every_n_steps=2, max_increase=0.05).attach(trainer)
    trainer.train()
    assert callback.stopped is not None and "past max_increase=5%" in callback.stopped
    assert trainer.state.global_step < 40 and trainer.state.global_step % 2 == 0
    logged = [h for h in trainer.state.log_history if "ordinary_perplexity" in h]
    assert logged and logged[-1]["ordinary_perplexity_change"] > 0.05
    assert logged[-1]["ordinary_perplexity"] == pytest.approx(callback.history[-1][1])
    assert [s for s, _ in callback.history] == list(range(0, trainer.state.global_step + 1, 2))


def test_ordinary_text_mixed_into_the_loss_through_the_cache_holds_its_perplexity(tmp_path):
    """The documented Trainer subclass: the same steps, with the cached ordinary loss added, leave ordinary text's
    perplexity lower than without it."""
    model, _ = _model("gemma3")
    after = {}
    for weight in (0.0, 1.0):
        patched = patch_model(copy.deepcopy(model), RESERVED)
        ordinary = FrozenText(patched, _batches())
        start = ordinary.perplexity()

        class MixTrainer(transformers.Trainer):
            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None,
                             _weight=weight, _ordinary=ordinary):  # this iteration's, bound when defined
                loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
                return loss + _weight * _ordinary.loss()

        _trainer(patched, tmp_path, MixTrainer, steps=10).train()
        after[weight] = ordinary.perplexity() / start - 1
    assert after[0.0] > 0.05 and after[1.0] < after[0.0] / 2, after


def test_bad_callback_arguments_are_refused():
    from reserved_kernels.models import PerplexityCallback

    with pytest.raises(TypeError, match="must be a FrozenText"):
        PerplexityCallback(object())
    model, _ = _model("gemma")
    text = FrozenText(patch_model(copy.deepcopy(model), RESERVED), _batches())
    with pytest.raises(ValueError, match="every_n_steps"):
        PerplexityCallback(text, every_n_steps=0)
    with pytest.raises(ValueError, match="max_increase"):
        PerplexityCallback(text, max_increase=-0.1)


def test_an_evaluation_in_many_chunks_gives_the_one_chunk_result(monkeypatch):
    """Chunks of 7 positions (reserved targets fall inside some): the same loss and gradient as one chunk, up to
    the order of the sums across chunks (within the module's tolerance)."""
    from reserved_kernels.models.evaluation import frozen_text

    model, tied = _model("gemma2")
    patched = patch_model(copy.deepcopy(model), RESERVED)
    text = FrozenText(patched, _batches())
    _trained_rows(patched, tied)
    rows = _rows(patched, tied)[-1]
    results = []
    for chunk_bytes in (frozen_text.EVAL_CHUNK_BYTES, 7 * 64 * 4):
        monkeypatch.setattr(frozen_text, "EVAL_CHUNK_BYTES", chunk_bytes)
        rows.grad = None
        loss = text.loss()
        loss.backward()
        results.append((loss.detach(), rows.grad.clone()))
    (one, g_one), (many, g_many) = results
    torch.testing.assert_close(many, one, rtol=TOL, atol=0)
    torch.testing.assert_close(g_many, g_one, rtol=TOL, atol=TOL * g_one.abs().max().item())
