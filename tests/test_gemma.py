"""Gemma integration on tiny random Hugging Face Gemma / Gemma 2 / Gemma 3 models and a gemma_pytorch-style model."""

from __future__ import annotations

import math
import os
import tempfile

import pytest
import torch
from torch import nn

pytest.importorskip("transformers",
                    reason="the Gemma integration tests need transformers (scripts/test.sh installs it)")

import reserved_kernels as rk  # noqa: E402
from reserved_kernels.models import (  # noqa: E402
    load_reserved,
    merge,
    patch_model,
    perplexity,
    perplexity_change,
    save_reserved,
)
from reserved_kernels.vocab import ReservedVocab, default_tokenizer_path  # noqa: E402
from tests.families import tiny_gemma  # noqa: E402
from tests.oracle import assert_same_table_logits, captured_input  # noqa: E402

VARIANTS = ["gemma", "gemma2", "gemma3"]
RESERVED = list(range(7, 12))


def _batch(seed=0, batch=2, length=24):
    ids = torch.randint(108, 1024, (batch, length), generator=torch.Generator().manual_seed(seed))
    ids[:, 3] = 7
    ids[:, 9] = 9  # reserved tokens appear in the input
    return ids


def _train(model, steps=3, lr=0.05):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.5)
    for step in range(steps):
        ids = _batch(seed=step)
        out = model(input_ids=ids, labels=ids)
        opt.zero_grad()
        out.loss.backward()
        opt.step()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_patched_untrained_logits_are_bit_identical(variant, dtype):
    model = tiny_gemma(variant, dtype=dtype)
    ids = _batch()
    before = model(ids).logits
    patch_model(model, RESERVED)
    assert isinstance(model.get_input_embeddings(), rk.ReservedEmbedding)
    assert isinstance(model.get_output_embeddings(), rk.ReservedLMHead)
    assert torch.equal(model(ids).logits, before)


@pytest.mark.parametrize("variant", VARIANTS)
def test_only_reserved_rows_train_and_tied_logits_change(variant):
    model = tiny_gemma(variant)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    patch_model(model, RESERVED)
    emb = model.get_input_embeddings()
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["model.embed_tokens.reserved_weight"]
    assert model.get_output_embeddings().reserved_weight is emb.reserved_weight
    hidden = torch.randn(1, 4, 64)
    head_before = model.get_output_embeddings()(hidden).detach()
    start = emb.reserved_weight.detach().clone()
    _train(model)
    assert not torch.equal(start, emb.reserved_weight.detach())
    for name, p in model.named_parameters():
        if name == "model.embed_tokens.weight":
            keep = torch.ones(p.shape[0], dtype=torch.bool)
            keep[RESERVED] = False
            assert torch.equal(p[keep], frozen[name][keep]), "a frozen embedding row moved"
        elif name != "model.embed_tokens.reserved_weight":
            assert torch.equal(p, frozen[name]), name
    head_after = model.get_output_embeddings()(hidden).detach()
    others = [i for i in range(1024) if i not in RESERVED]
    assert not torch.equal(head_after[..., RESERVED], head_before[..., RESERVED])
    assert torch.equal(head_after[..., others], head_before[..., others])


def test_head_gradients_are_exact():
    torch.manual_seed(0)
    emb = rk.ReservedEmbedding(300, 16, reserved_ids=[7, 8, 200], dtype=torch.float64)
    with torch.no_grad():
        emb.reserved_weight.add_(torch.randn_like(emb.reserved_weight))
    head = rk.ReservedLMHead.tied_to(emb, final_logit_softcapping=5.0)
    hidden = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(3, 5, 300, dtype=torch.float64)
    head(hidden).backward(grad)
    rw = emb.reserved_weight.detach().clone().requires_grad_(True)
    hidden2 = hidden.detach().clone().requires_grad_(True)
    merged = emb.weight.detach().index_copy(0, emb.reserved_ids, rw)
    (torch.tanh((hidden2 @ merged.T) / 5.0) * 5.0).backward(grad)
    torch.testing.assert_close(hidden.grad, hidden2.grad)
    torch.testing.assert_close(emb.reserved_weight.grad, rw.grad)
    assert emb.weight.grad is None


def test_gradient_accumulation_over_two_forwards():
    model = patch_model(tiny_gemma("gemma"), RESERVED)
    out1 = model(input_ids=_batch(1), labels=_batch(1)).loss
    out2 = model(input_ids=_batch(2), labels=_batch(2)).loss
    (out1 + out2).backward()
    acc = model.get_input_embeddings().reserved_weight.grad.clone()
    model.zero_grad()
    model(input_ids=_batch(1), labels=_batch(1)).loss.backward()
    model(input_ids=_batch(2), labels=_batch(2)).loss.backward()
    torch.testing.assert_close(model.get_input_embeddings().reserved_weight.grad, acc)


@pytest.mark.parametrize("variant", VARIANTS)
def test_merge_round_trip_into_vanilla_transformers(variant):
    model = patch_model(tiny_gemma(variant), RESERVED)
    _train(model)
    ids = _batch(seed=5)
    trained, hidden = captured_input(model.get_output_embeddings(), lambda: model(ids).logits)
    table = model.get_input_embeddings().merged_weight()
    merge(model)
    assert type(model.get_input_embeddings()) is not rk.ReservedEmbedding
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    # The merged table's logits: the trained rows' columns come from the big GEMM now, not a K-column one.
    assert_same_table_logits(model(ids).logits, trained, hidden, table, RESERVED,
                             softcap=getattr(model.config, "final_logit_softcapping", None))
    fresh = tiny_gemma(variant, seed=123)
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh(ids).logits, model(ids).logits)
    assert all(p.requires_grad for p in model.parameters())  # restored to the pre-patch flags


def test_save_and_load_the_small_artifact(tmp_path):
    vocab = ReservedVocab.from_file(default_tokenizer_path())
    vocab.assign({"[summary]": "a short summary of the text", "[translate]": "translate the text"})
    model = patch_model(tiny_gemma("gemma2"), vocab, init="description")
    _train(model)
    ids = _batch(seed=7)
    ids[0, 0] = vocab.plan.ids[1]
    trained = model(ids).logits
    path = tmp_path / "rows"
    save_reserved(model, path, plan=vocab)
    assert sum((path / f).stat().st_size for f in ("adapter_config.json", "adapter_model.safetensors")) < 16 * 1024
    fresh = tiny_gemma("gemma2")
    plan = load_reserved(fresh, path)
    assert plan == vocab.plan
    assert torch.equal(fresh(ids).logits, trained)
    with pytest.raises(ValueError, match="says a 1024x64 table; this model's is 2048x64"):
        load_reserved(tiny_gemma("gemma", vocab_size=2048), path)


@pytest.mark.parametrize("init", ["description", "mean", "copy"])
def test_initialisation_choices_go_through_the_mean_op(init):
    vocab = ReservedVocab.from_file(default_tokenizer_path())
    vocab.assign({"[summary]": "a short summary", "[qa]": "question and answer"})
    model = tiny_gemma("gemma")
    table = model.get_input_embeddings().weight.detach().clone()
    patch_model(model, vocab, init=init, copy_from=500)
    rows = model.get_input_embeddings().reserved_weight.detach()
    if init == "description":
        expected = torch.stack([table[list(e.source_ids)].mean(0) for e in vocab.plan.entries])
    elif init == "mean":
        keep = [i for i in range(1024) if i not in vocab.plan.ids]
        expected = table[keep].mean(0).expand(4, -1)  # two terms, each bare and after a space
    else:
        expected = table[500].expand(4, -1)
    torch.testing.assert_close(rows, expected)


def test_noise_is_reproducible_with_a_generator():
    def rows():
        model = patch_model(tiny_gemma("gemma"), RESERVED, init="copy", copy_from=500, noise_std=0.1,
                            generator=torch.Generator().manual_seed(4))
        return model.get_input_embeddings().reserved_weight.detach()

    first, second = rows(), rows()
    assert torch.equal(first, second) and not torch.equal(first[0], first[1])


def test_patch_errors():
    model = patch_model(tiny_gemma("gemma"), RESERVED)
    with pytest.raises(ValueError, match="already patched"):
        patch_model(model, RESERVED)
    with pytest.raises(ValueError, match="needs a plan"):
        patch_model(tiny_gemma("gemma"), RESERVED, init="description")
    with pytest.raises(ValueError, match="init must be one of"):
        patch_model(tiny_gemma("gemma"), RESERVED, init="zeros")
    with pytest.raises(ValueError, match="not patched"):
        merge(tiny_gemma("gemma"))


def test_train_others_keeps_other_parameters_trainable():
    model = patch_model(tiny_gemma("gemma"), RESERVED, train_others=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "model.embed_tokens.reserved_weight" in trainable and "model.norm.weight" in trainable
    assert "model.embed_tokens.weight" not in trainable


def test_compile_patched_model_forward_and_backward():
    model = patch_model(tiny_gemma("gemma"), RESERVED)
    compiled = torch.compile(model, backend="aot_eager")
    ids = _batch()
    compiled(input_ids=ids, labels=ids).loss.backward()
    got = model.get_input_embeddings().reserved_weight.grad.clone()
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    torch.testing.assert_close(got, model.get_input_embeddings().reserved_weight.grad)


def test_perplexity_matches_the_definition():
    model = tiny_gemma("gemma")
    ids = _batch()
    mask = torch.ones_like(ids)
    mask[1, 20:] = 0
    logits = model(ids).logits[:, :-1]
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, 1024), targets.reshape(-1), ignore_index=-100)
    got = perplexity(model, [dict(input_ids=ids, attention_mask=mask)])
    assert math.isclose(got, math.exp(nll.item()), rel_tol=1e-4)
    change = perplexity_change(patch_model(model, RESERVED), [ids], lambda: _train(model))
    assert change["before"] > 1 and change["after"] > 1
    assert math.isclose(change["ratio"], change["after"] / change["before"])


# ------------------------------------------------------------------- gemma_pytorch-style and older releases

class PytorchStyleEmbedder(nn.Module):
    """gemma_pytorch's embedder: an int8 weight with per-row scales, dequantised whole on every call."""

    def __init__(self, vocab, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.randint(-128, 128, (vocab, dim), dtype=torch.int8), requires_grad=False)
        self.weight_scaler = nn.Parameter(torch.rand(vocab) * 0.05)

    def forward(self, x):
        return nn.functional.embedding(x, self.weight * self.weight_scaler.unsqueeze(-1))


class PytorchStyleModel(nn.Module):
    """The shape of gemma_pytorch's GemmaForCausalLM: the √D normaliser is applied in forward."""

    def __init__(self, vocab=1024, dim=32):
        super().__init__()
        self.embedder = PytorchStyleEmbedder(vocab, dim)
        self.proj = nn.Linear(dim, dim)
        self.dim = dim

    def forward(self, input_ids):
        hidden = self.embedder(input_ids)
        hidden = hidden * torch.tensor(self.dim ** 0.5, dtype=hidden.dtype)
        return self.proj(hidden)


def test_gemma_pytorch_style_int8_embedder():
    torch.manual_seed(0)
    model = PytorchStyleModel()
    ids = _batch()
    before = model(ids)
    patch_model(model, RESERVED)
    assert isinstance(model.embedder, rk.ReservedEmbedding) and model.embedder.weight_scaler is not None
    assert torch.equal(model(ids), before)
    model(ids).pow(2).mean().backward()
    assert model.embedder.reserved_weight.grad.shape == (5, 32)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["embedder.reserved_weight"]


class OldStyleGemma(nn.Module):
    """Older transformers: a plain nn.Embedding, the normaliser in the model's forward, a tied lm_head."""

    def __init__(self, vocab=1024, dim=32):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, dim, padding_idx=0)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.embed_tokens.weight
        self.dim = dim

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids):
        hidden = self.embed_tokens(input_ids)
        hidden = hidden * torch.tensor(self.dim ** 0.5, dtype=hidden.dtype)
        return self.lm_head(torch.tanh(hidden))


def test_older_transformers_layout_keeps_the_scale_in_the_model():
    torch.manual_seed(0)
    model = OldStyleGemma()
    ids = _batch()
    before = model(ids)
    patch_model(model, RESERVED)
    assert model.embed_tokens.scale is None
    assert torch.equal(model(ids), before)


# -------------------------------------------------------------------------------------------- DDP

def _distributed_batch(kind: str):
    """Four rows, two a rank. "early": every row's terms before position 64, nothing is frozen; "split": rank 0
    gets an ordinary row and a row with its first term at 100, rank 1 a row with terms at 80 and 120 and an
    ordinary row — frozen rows and prefixes on both ranks."""
    if kind == "early":
        return _batch(batch=4)
    ids = torch.randint(108, 1024, (4, 160), generator=torch.Generator().manual_seed(4))
    ids[1, 100], ids[2, 80], ids[2, 120] = 7, 9, 11
    return ids


def _distributed_worker(rank, init_file, out_file, wrapper, kind):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        model = patch_model(tiny_gemma("gemma"), RESERVED).train()  # training: the loss is the fused op's
        grad_modes = []
        model.model.layers[0].register_forward_pre_hook(lambda m, args: grad_modes.append(torch.is_grad_enabled()))
        if wrapper == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            model = DistributedDataParallel(model)
            inner = model.module
        else:  # FSDP2: shard each decoder layer, then the root (embedding and tied head together); the fused
            # loss runs inside the head's forward, so the root's hooks have gathered the table for it
            from torch.distributed.fsdp import fully_shard

            for layer in model.model.layers:
                fully_shard(layer)
            inner = model = fully_shard(model)
        ids = _distributed_batch(kind).chunk(2)[rank]
        model(input_ids=ids, labels=ids).loss.backward()
        grad = inner.get_input_embeddings().reserved_weight.grad
        grad = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
        if rank == 0:
            torch.save((grad, grad_modes), out_file)
        dist.barrier()  # both ranks done before either tears down gloo
    finally:
        dist.destroy_process_group()
    # Skip interpreter finalisation on success: gloo's worker threads can abort it with SIGABRT
    # ("terminate called without an active exception"; see pytorch/pytorch#179291).
    os._exit(0)


@pytest.mark.parametrize("kind", ["early", "split"])
@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
def test_distributed_gradients_equal_one_process(wrapper, kind):
    """DDP and FSDP2 give the one-process gradient; with "split" batches each rank runs frozen rows and prefixes
    without a backward (several body calls a step, FSDP2's layers gathered for each)."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "grad.pt")
        mp.spawn(_distributed_worker, args=(os.path.join(tmp, "init"), out_file, wrapper, kind), nprocs=2, join=True)
        ddp_grad, grad_modes = torch.load(out_file)
    assert (False in grad_modes) == (kind == "split") and True in grad_modes
    model = patch_model(tiny_gemma("gemma"), RESERVED).train()
    grads = []
    for half in _distributed_batch(kind).chunk(2):  # each rank's mean loss; DDP averages the two gradients
        model.zero_grad()
        model(input_ids=half, labels=half).loss.backward()
        grads.append(model.get_input_embeddings().reserved_weight.grad.clone())
    torch.testing.assert_close(ddp_grad, (grads[0] + grads[1]) / 2)


# ------------------------------------------------------------------------------------------ the fused loss

def _pair(variant):
    """The same patched model twice, with trained-looking rows: the fused labels= path and the logits one."""
    models = []
    for fused in (True, False):
        model = patch_model(tiny_gemma(variant), RESERVED, fused_loss=fused)
        with torch.no_grad():
            noise = torch.randn(5, 64, generator=torch.Generator().manual_seed(3))
            model.get_input_embeddings().reserved_weight.add_(noise)
        models.append(model.train())
    return models


def _padded_batch():
    ids = _batch(batch=3)
    mask = torch.ones_like(ids)
    mask[1, -7:] = 0  # right padding, masked in attention and as targets, as a collator does
    return ids, mask, ids.masked_fill(mask == 0, -100)


def _grads(model):
    return model.get_input_embeddings().reserved_weight.grad.clone()


@pytest.mark.parametrize("variant", VARIANTS)
def test_training_with_labels_goes_through_the_fused_loss_without_logits(variant):
    fused, plain = _pair(variant)
    ids, mask, labels = _padded_batch()
    out = fused(input_ids=ids, attention_mask=mask, labels=labels)
    ref = plain(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits is None and ref.logits is not None
    out.loss.backward()
    ref.loss.backward()
    # The same loss summed in another order (tiles): within (V + D)·eps relative, V = 1024, D = 64; the
    # rows' gradient carries that relative difference back through the body.
    tol = (1024 + 64) * torch.finfo(torch.float32).eps
    torch.testing.assert_close(out.loss, ref.loss, rtol=tol, atol=0)
    torch.testing.assert_close(_grads(fused), _grads(plain), rtol=tol, atol=tol * _grads(plain).abs().max().item())
    # Trainer's normaliser: the sum over the batch divided by it.
    summed = fused(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=5).loss
    expected = plain(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=5).loss
    torch.testing.assert_close(summed, expected, rtol=tol, atol=0)


def test_logits_when_asked_and_in_evaluation_and_the_fused_loss_when_asked():
    fused, plain = _pair("gemma2")
    ids, mask, labels = _padded_batch()
    assert fused(input_ids=ids, labels=labels, return_logits=True).logits.shape == (3, 24, 1024)
    fused.eval()
    plain.eval()
    with torch.no_grad():
        evaluated = fused(input_ids=ids, attention_mask=mask, labels=labels)
        expected = plain(input_ids=ids, attention_mask=mask, labels=labels)
        assert torch.equal(evaluated.logits, expected.logits) and torch.equal(evaluated.loss, expected.loss)
        quick = fused(input_ids=ids, attention_mask=mask, labels=labels, return_logits=False)
    assert quick.logits is None
    tol = (1024 + 64) * torch.finfo(torch.float32).eps
    torch.testing.assert_close(quick.loss, expected.loss, rtol=tol, atol=0)
    assert torch.equal(fused(input_ids=ids).logits, plain(input_ids=ids).logits)  # no labels: the forward as it was


def test_merge_puts_the_models_own_forward_back():
    model = patch_model(tiny_gemma("gemma"), RESERVED)
    assert "forward" in model.__dict__
    merge(model)
    assert "forward" not in model.__dict__
    model.train()
    ids = _batch()
    assert model(input_ids=ids, labels=ids).logits is not None
