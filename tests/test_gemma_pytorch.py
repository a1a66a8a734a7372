"""gemma_pytorch-layout models, float and int8: train, merge (re-quantising), export, perplexity, Gemma 3's names."""

from __future__ import annotations

import math

import pytest
import torch

import reserved_kernels as rk
from reserved_kernels.models import causal_lm_logits, causal_lm_loss, merge, patch_model, perplexity
from tests.gemma_pytorch_layout import CausalLM, Config, Embedding, prefill_logits
from tests.oracle import assert_same_table_logits, captured_output

RESERVED = [7, 8, 9]
LAYOUTS = [("gemma1", False), ("gemma2", False), ("gemma2", True), ("gemma3", False), ("gemma3", True)]


def _model(architecture="gemma2", quant=False, multimodal=False, seed=0):
    config = Config(architecture=architecture, quant=quant,
                    final_logit_softcapping=30.0 if architecture == "gemma2" else None)
    return CausalLM(config, multimodal=multimodal, seed=seed)


def _batch(seed=0, batch=2, length=20):
    ids = torch.randint(108, 1024, (batch, length), generator=torch.Generator().manual_seed(seed))
    ids[:, 4] = 7
    ids[:, 11] = 8  # reserved ids as inputs, and as targets of the tokens before them
    return ids


@pytest.mark.parametrize("architecture, quant", LAYOUTS)
def test_differentiable_logits_agree_with_the_models_own_forward(architecture, quant):
    """causal_lm_logits runs the model's real modules: at the last position it is the no-grad forward's logits."""
    model = _model(architecture, quant)
    ids = _batch()
    own = prefill_logits(model, ids)
    ours = causal_lm_logits(model, ids)[:, -1]
    torch.testing.assert_close(ours, own, rtol=1e-5, atol=1e-5)
    patch_model(model, RESERVED)
    assert torch.equal(causal_lm_logits(model, ids)[:, -1], ours)  # untrained: bit-identical
    assert torch.equal(prefill_logits(model, ids), own)  # its own forward and sampler still work


@pytest.mark.parametrize("architecture, quant", LAYOUTS)
def test_training_moves_only_the_reserved_rows_and_the_tied_head_uses_them(architecture, quant):
    model = _model(architecture, quant)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    patch_model(model, RESERVED)
    embedder = model.embedder
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["embedder.reserved_weight"]
    opt = torch.optim.AdamW([embedder.reserved_weight], lr=0.05, weight_decay=0.1)
    losses = []
    for step in range(8):
        loss = causal_lm_loss(model, _batch(seed=step % 2))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for name, p in model.named_parameters():
        if name != "embedder.reserved_weight":
            assert torch.equal(p, frozen[name]), name
    assert torch.equal(embedder.weight, frozen["embedder.weight"])  # the table itself is never written
    if quant:
        assert torch.equal(embedder.weight_scaler, frozen["embedder.weight_scaler"])
    # The head reads the trained rows: its reserved columns moved, the others did not.
    ids = _batch(seed=9)
    with torch.no_grad():
        hidden_logits = causal_lm_logits(model, ids)
        embedder.reset_reserved_()
        untrained = causal_lm_logits(model, ids)
    assert not torch.equal(hidden_logits[..., RESERVED], untrained[..., RESERVED])


def test_int8_merge_requantises_each_row_within_half_a_step_and_restores_the_module():
    model = _model("gemma2", quant=True)
    original = model.embedder
    patch_model(model, RESERVED)
    with torch.no_grad():
        model.embedder.reserved_weight.add_(torch.randn(3, 32) * 0.2)
    trained = model.embedder.reserved_weight.detach().clone()
    ids = _batch(seed=3)
    merge(model)
    assert model.embedder is original and type(original) is Embedding  # gemma_pytorch's own module again
    step = original.weight_scaler.detach()[RESERVED].float().unsqueeze(-1)
    dequantised = original.weight[RESERVED].float() * step
    assert ((dequantised - trained).abs() <= step / 2).all()
    # The merged model's own forward now uses the re-quantised rows, which moved by at most half a step;
    # it scores the last position alone, a GEMM of another shape than causal_lm_logits' for every column.
    ours, hidden = captured_output(model.model, lambda: causal_lm_logits(model, ids))
    table = original.weight.float() * original.weight_scaler.detach().unsqueeze(-1)
    assert_same_table_logits(prefill_logits(model, ids), ours[:, -1], hidden[:, -1], table, None, softcap=30.0)
    fresh = _model("gemma2", quant=True, seed=5)
    fresh.load_state_dict(model.state_dict())  # the export loads into a vanilla model
    assert torch.equal(fresh.embedder.weight, original.weight)


def test_float_merge_round_trip_changes_only_the_reserved_columns_and_within_rounding():
    model = _model("gemma1")
    patch_model(model, RESERVED)
    with torch.no_grad():
        model.embedder.reserved_weight.add_(torch.randn(3, 32))
    ids = _batch(seed=4)
    trained, hidden = captured_output(model.model, lambda: causal_lm_logits(model, ids))
    table = model.embedder.merged_weight()
    merge(model)
    # Patched, the K reserved columns came from a K-column GEMM; merged, from the V-column one. The
    # other columns are the same GEMM on the same inputs.
    assert_same_table_logits(causal_lm_logits(model, ids), trained, hidden, table, RESERVED)
    # gemma_pytorch's own forward scores the last position alone: another GEMM shape for every column.
    assert_same_table_logits(prefill_logits(model, ids), trained[:, -1], hidden[:, -1], table, None)


def test_gemma3_multimodal_text_token_embedder_is_recognised():
    model = _model("gemma3", multimodal=True)
    ids = _batch()
    before = prefill_logits(model, ids)
    patch_model(model, RESERVED)
    assert isinstance(model.text_token_embedder, rk.ReservedEmbedding)
    assert torch.equal(prefill_logits(model, ids), before)
    causal_lm_loss(model, ids).backward()
    assert model.text_token_embedder.reserved_weight.grad.shape == (3, 32)
    merge(model)
    assert type(model.text_token_embedder) is Embedding


@pytest.mark.parametrize("quant", [False, True])
def test_perplexity_works_for_gemma_pytorch_models(quant):
    model = _model("gemma2", quant)
    ids = _batch()
    expected = math.exp(causal_lm_loss(model, ids).item())
    assert math.isclose(perplexity(model, [ids]), expected, rel_tol=1e-5)
    patch_model(model, RESERVED)
    assert math.isclose(perplexity(model, [ids]), expected, rel_tol=1e-5)


def test_not_a_gemma_pytorch_model_is_a_clear_error():
    with pytest.raises(TypeError, match="not a gemma_pytorch-layout model"):
        causal_lm_logits(torch.nn.Linear(2, 2), torch.zeros(1, 2, dtype=torch.long))


@pytest.mark.parametrize("architecture, quant", LAYOUTS)
def test_the_loss_is_the_fused_ops_and_matches_the_logits(architecture, quant):
    """causal_lm_loss never builds the logits; it agrees with the cross-entropy of causal_lm_logits."""
    model = _model(architecture, quant)
    patch_model(model, RESERVED)
    rows = model.embedder.reserved_weight
    with torch.no_grad():
        rows.add_(torch.randn(3, 32, generator=torch.Generator().manual_seed(2)))
    ids = _batch(seed=5)
    mask = torch.ones_like(ids)
    mask[0, -4:] = 0
    losses, grads = [], []
    for fused in (True, False):
        rows.grad = None
        if fused:
            loss = causal_lm_loss(model, ids, mask)
        else:
            targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            logits = causal_lm_logits(model, ids)[:, :-1]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 1024), targets.reshape(-1))
        loss.backward()
        losses.append(loss.detach())
        grads.append(rows.grad.clone())
    tol = (1024 + 32) * torch.finfo(torch.float32).eps  # one loss summed in two orders (see test_gemma)
    torch.testing.assert_close(losses[0], losses[1], rtol=tol, atol=0)
    torch.testing.assert_close(grads[0], grads[1], rtol=tol, atol=tol * grads[1].abs().max().item())


@pytest.mark.parametrize("architecture, quant", [("gemma2", False), ("gemma3", True)])
def test_rows_without_a_reserved_id_run_without_a_backward_and_the_loss_is_the_same(architecture, quant):
    """A batch mixing ordinary text with text that uses the terms: the ordinary rows' body runs under no_grad
    (they reach the rows through the tied head alone); loss and row gradients match the logits path."""
    model = _model(architecture, quant)
    patch_model(model, RESERVED)
    rows = model.embedder.reserved_weight
    with torch.no_grad():
        rows.add_(torch.randn(3, 32, generator=torch.Generator().manual_seed(2)))
    ids = _batch(seed=5, batch=3)
    ids[1] = torch.randint(108, 1024, (20,), generator=torch.Generator().manual_seed(6))  # no reserved id
    seen = []
    hook = model.embedder.register_forward_pre_hook(lambda m, args: seen.append((torch.is_grad_enabled(),
                                                                                 args[0].shape[0])))
    loss = causal_lm_loss(model, ids)
    hook.remove()
    loss.backward()
    assert sorted(seen) == [(False, 1), (True, 2)]
    fused = (loss.detach(), rows.grad.clone())
    rows.grad = None
    logits = causal_lm_logits(model, ids)[:, :-1]
    reference = torch.nn.functional.cross_entropy(logits.reshape(-1, 1024), ids[:, 1:].reshape(-1))
    reference.backward()
    tol = (1024 + 32) * torch.finfo(torch.float32).eps  # one loss summed in other orders (see test_gemma)
    torch.testing.assert_close(fused[0], reference.detach(), rtol=tol, atol=0)
    torch.testing.assert_close(fused[1], rows.grad, rtol=tol, atol=tol * rows.grad.abs().max().item())


@pytest.mark.parametrize("architecture, quant", [("gemma1", False), ("gemma2", False), ("gemma3", True)])
def test_each_rows_prefix_before_its_first_reserved_id_runs_without_a_backward(architecture, quant):
    """Rows longer than the split threshold (64 positions): a row's positions before its first reserved id run
    under no_grad and fill the kv caches, the rest reads them (rows with the same first position together; the
    sliding window of 8 is crossed by the cached prefix); a row whose term comes too early runs whole. Loss and
    row gradients match the logits path."""
    model = _model(architecture, quant)
    patch_model(model, RESERVED)
    rows = model.embedder.reserved_weight
    with torch.no_grad():
        rows.add_(torch.randn(3, 32, generator=torch.Generator().manual_seed(2)))
    ids = torch.randint(108, 1024, (4, 100), generator=torch.Generator().manual_seed(7))
    ids[1, 70], ids[2, 70], ids[2, 90], ids[3, 5] = 7, 8, 9, 7  # row 0: ordinary text; row 3: too early to split
    mask = torch.ones_like(ids)
    mask[2, -6:] = 0  # right padding: those targets do not count
    seen = []
    hook = model.embedder.register_forward_pre_hook(lambda m, args: seen.append((torch.is_grad_enabled(),
                                                                                 tuple(args[0].shape))))
    loss = causal_lm_loss(model, ids, mask)
    hook.remove()
    loss.backward()
    assert sorted(seen) == [(False, (1, 100)), (False, (2, 70)), (True, (1, 100)), (True, (2, 30))]
    fused = (loss.detach(), rows.grad.clone())
    rows.grad = None
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    logits = causal_lm_logits(model, ids)[:, :-1]
    reference = torch.nn.functional.cross_entropy(logits.reshape(-1, 1024), targets.reshape(-1))
    reference.backward()
    tol = (1024 + 32 + 100) * torch.finfo(torch.float32).eps  # one loss summed in other orders (see test_gemma)
    torch.testing.assert_close(fused[0], reference.detach(), rtol=tol, atol=0)
    torch.testing.assert_close(fused[1], rows.grad, rtol=tol, atol=tol * rows.grad.abs().max().item())


@pytest.mark.parametrize("architecture, quant", [("gemma2", False), ("gemma3", True)])
def test_frozen_text_gives_the_logits_paths_loss_and_gradient(architecture, quant):
    """FrozenText on the gemma_pytorch layout (soft-capped Gemma 2, int8 Gemma 3): its cached loss at moved rows is
    the cross-entropy of causal_lm_logits, and so is its gradient."""
    model = _model(architecture, quant)
    patch_model(model, RESERVED)
    ids = torch.randint(108, 1024, (3, 20), generator=torch.Generator().manual_seed(4))
    ids[0, -1] = 8  # a reserved target at the last counted position; its own position predicts nothing
    mask = torch.ones_like(ids)
    mask[1, -5:] = 0
    text = rk.FrozenText(model, [dict(input_ids=ids, attention_mask=mask)])
    rows = model.embedder.reserved_weight
    with torch.no_grad():
        rows.add_(torch.randn(3, 32, generator=torch.Generator().manual_seed(2)))
    text.loss().backward()
    cached = rows.grad.clone()
    rows.grad = None
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    reference = torch.nn.functional.cross_entropy(causal_lm_logits(model, ids)[:, :-1].reshape(-1, 1024),
                                                  targets.reshape(-1))
    reference.backward()
    tol = (1024 + 32 + 20) * torch.finfo(torch.float32).eps  # one loss summed in other orders (see test_frozen_text)
    torch.testing.assert_close(text.loss().detach(), reference.detach(), rtol=tol, atol=0)
    torch.testing.assert_close(cached, rows.grad, rtol=tol, atol=tol * rows.grad.abs().max().item())
