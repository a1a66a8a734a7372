"""Beyond Gemma: Llama 3's reserved special tokens and Qwen2's rows beyond its tokenizer, tied and untied heads."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the family tests need transformers")
pytest.importorskip("tokenizers", reason="the family tests build tokenizer.json files")

import reserved_kernels as rk  # noqa: E402
from reserved_kernels.models import load_reserved, merge, patch_model, save_reserved, untrained_rows  # noqa: E402
from reserved_kernels.vocab import PlanEntry, PlanError, ReservedPlan, ReservedVocab  # noqa: E402
from tests.families import llama3_tokenizer, qwen2_tokenizer, tiny_llama, tiny_qwen2  # noqa: E402
from tests.oracle import assert_same_table_logits, captured_input  # noqa: E402

TERMS = {"[summary]": "A short summary of the text", "[translate]": "a translation into another language"}
TEXT = "The model trains every row, then stops. Le réseau mesure 4096 tokens!"


@pytest.fixture(autouse=True)
def _quiet():
    transformers.logging.set_verbosity_error()


def _family(kind, tmp_path, tied):
    """(vocab, model, tokenizer folder) of one family, the model's untrained rows where the release has them."""
    if kind == "llama3":
        folder = tmp_path / "llama3"
        vocab = ReservedVocab.from_file(llama3_tokenizer(folder))
        model = tiny_llama(vocab.vocab_size, tied=tied, reserved_ids=vocab.reserved_ids)
    else:
        folder = tmp_path / "qwen2"
        path = qwen2_tokenizer(folder)
        size = ReservedVocab.from_file(path).vocab_size
        vocab = ReservedVocab.from_file(path, model_vocab_size=size + 60)
        model = tiny_qwen2(size + 60, size, tied=tied)
    return vocab, model, folder


FAMILIES = [("llama3", True), ("llama3", False), ("qwen2", False), ("qwen2", True)]


def test_llama3_reserved_tokens_in_number_order_never_a_used_special(tmp_path):
    vocab = ReservedVocab.from_file(llama3_tokenizer(tmp_path))
    pieces = [vocab.piece(i) for i in vocab.reserved_ids]
    assert pieces == [f"<|reserved_special_token_{n}|>" for n in range(8)] and vocab.families == ("llama3",)
    assert all(vocab.piece(i) not in ("<|start_header_id|>", "<|eot_id|>") for i in vocab.reserved_ids)


def test_qwen2_spare_rows_are_the_rows_beyond_the_tokenizer(tmp_path):
    path = qwen2_tokenizer(tmp_path)
    size = ReservedVocab.from_file(path).vocab_size
    vocab = ReservedVocab.from_file(path, model_vocab_size=size + 60)
    assert vocab.reserved_ids == list(range(size, size + 60)) and vocab.families == ("spare rows",)
    with pytest.raises(PlanError, match="rows but the tokenizer"):
        ReservedVocab.from_file(path, model_vocab_size=size - 1)


@pytest.mark.parametrize("kind, tied", FAMILIES[:3])
def test_planning_and_auto_tokenizer_round_trip(kind, tied, tmp_path):
    vocab, _, folder = _family(kind, tmp_path, tied)
    plan = vocab.assign(TERMS)
    assert plan.ids == vocab.reserved_ids[:4]  # each term bare and after a space
    out = tmp_path / "out"
    vocab.save(out)
    before = transformers.AutoTokenizer.from_pretrained(folder)
    after = transformers.AutoTokenizer.from_pretrained(out)
    assert after(TEXT).input_ids == before(TEXT).input_ids  # ordinary text: the same ids
    ids = after(f"[summary] {TEXT} [translate]", add_special_tokens=False).input_ids
    assert ids[0] == plan["[summary]"].id and ids[-1] == plan[" [translate]"].id
    assert not set(TERMS) & set(after.all_special_tokens)
    assert after.decode(ids) == f"[summary] {TEXT} [translate]"
    reloaded = ReservedVocab.from_file(vocab.path, plan=out)  # the plan (and the model's size) come back
    assert reloaded.plan == plan and reloaded.free_ids == vocab.free_ids


def test_the_direction_test_finds_untrained_rows_of_ordinary_norm_from_half_of_them():
    """Gemma 3's case, built: every row has the same norm and no two are equal, but 40 "unused" rows point
    nearly one way. Seeded by 20 of them, the test flags the other 20 and no ordinary row."""
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(3000, 64, generator=gen) + 0.5  # a component every row shares (removed first)
    unused = torch.arange(100, 140)
    table[unused] = torch.randn(64, generator=gen) * 3 + torch.randn(40, 64, generator=gen)
    table = table / table.norm(dim=1, keepdim=True)
    found = untrained_rows(table, reference_ids=unused[:20])
    assert not found.low_norm and not found.duplicated and found.direction_skipped is None
    assert set(found.unused_direction) == set(unused.tolist())
    assert "unused direction" in found.tests_of(130)[0] and found.tests_of(5) == []
    assert "40 in the reserved rows' direction" in found.summary()


def test_the_direction_test_is_skipped_with_the_reason_where_the_reference_has_no_direction(tmp_path):
    vocab, model, _ = _family("llama3", tmp_path, True)
    found = untrained_rows(model.get_input_embeddings().weight, reference_ids=vocab.reserved_ids)
    assert "fewer than two reference rows with a norm" in found.direction_skipped and not found.unused_direction
    gen = torch.Generator().manual_seed(1)
    noise = untrained_rows(torch.randn(500, 64, generator=gen), reference_ids=list(range(10)))
    assert "share no direction" in noise.direction_skipped and not noise.unused_direction
    assert set(found.low_norm) == set(vocab.reserved_ids)  # the norm test still finds Llama's rows


@pytest.mark.parametrize("kind, tied", FAMILIES)
def test_untrained_rows_are_found_and_left_out_of_every_mean(kind, tied, tmp_path):
    vocab, model, _ = _family(kind, tmp_path, tied)
    table = model.get_input_embeddings().weight.detach().clone()
    found = untrained_rows(table, reference_ids=vocab.reserved_ids)  # as patch_model seeds it with a plan
    if kind == "llama3":
        assert set(found.low_norm) == set(vocab.reserved_ids)  # near zero, as in the released weights
    else:
        assert set(found.duplicated) == set(vocab.reserved_ids)  # spare rows: one shared initial value
        assert set(found.unused_direction) == set(vocab.reserved_ids)  # and their direction is theirs alone
    plan = vocab.assign(TERMS)
    patch_model(model, vocab, init="mean")
    trained = [i for i in range(table.shape[0]) if i not in found and i not in vocab.reserved_ids]
    expected = table[trained].mean(0)
    rows = model.get_input_embeddings().reserved_weight.detach()
    torch.testing.assert_close(rows, expected.expand_as(rows))
    # A description whose rows are all untrained falls back to the mean of the trained rows, with a warning.
    fresh = _family(kind, tmp_path / "again", tied)[1]
    untrained_description = dict(plan.entries[0].__dict__, source_ids=(vocab.reserved_ids[5],))
    bad_plan = ReservedPlan(plan.tokenizer_sha256, (PlanEntry(**untrained_description),),
                                     plan.model_vocab_size)
    with pytest.warns(UserWarning, match="untrained or excluded"):
        patch_model(fresh, bad_plan, init="description")
    torch.testing.assert_close(fresh.get_input_embeddings().reserved_weight.detach()[0], expected)


@pytest.mark.parametrize("kind, tied", FAMILIES)
def test_bit_identical_then_only_the_reserved_rows_train_and_merge_exports(kind, tied, tmp_path):
    vocab, model, _ = _family(kind, tmp_path, tied)
    plan = vocab.assign(TERMS)
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    ids[:, 2] = plan.ids[0]
    before = model(ids).logits
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    patch_model(model, vocab, init="description")
    head = model.get_output_embeddings()
    assert isinstance(head, rk.ReservedLMHead) and (head.tied is not None) == tied
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    expected = ["model.embed_tokens.reserved_weight"] + ([] if tied else ["lm_head.reserved_weight"])
    assert trainable == sorted(expected)
    if not tied:  # the head's rows start from the head's own table: output vectors, not input ones
        assert not torch.equal(head.reserved_weight, model.get_input_embeddings().reserved_weight)
    embedding = model.get_input_embeddings()
    with torch.no_grad():  # untrained but initialised: the reserved columns move, nothing else does
        embedding.reset_reserved_()
        if not tied:
            head.reserved_weight.copy_(head.weight[head.reserved_ids])
    assert torch.equal(model(ids).logits, before)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05, weight_decay=0.5)
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        assert embedding.reserved_weight.grad.shape == (len(plan), 64)
        if not tied:
            assert head.reserved_weight.grad.shape == (len(plan), 64)  # K x D, never V x D
        optimizer.step()
    for name, p in model.named_parameters():
        if not name.endswith("reserved_weight"):
            assert torch.equal(p, frozen[name]), name
    trained, hidden = captured_input(head, lambda: model(ids).logits.detach())
    changed = [i for i in range(trained.shape[-1]) if not torch.equal(trained[..., i], before[..., i].detach())]
    assert changed  # the new rows moved the logits
    out = tmp_path / "saved"
    model.save_pretrained(out)
    # A vanilla model with the rows merged; eager attention, as the tiny model was built, so its body is the
    # same computation.
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    # Merged, the reserved columns come from the V-column GEMM, not the patched head's K-column one.
    table = reloaded.get_output_embeddings().weight
    assert_same_table_logits(reloaded(ids).logits, trained, hidden, table, plan.ids)
    save_reserved(model, tmp_path / "rows", plan=vocab)
    fresh = _family(kind, tmp_path / "fresh", tied)[1]
    assert load_reserved(fresh, tmp_path / "rows") == plan
    assert torch.equal(fresh(ids).logits, trained)  # the same base + the rows file: identical logits
    merge(model)
    assert type(model.get_input_embeddings()) is torch.nn.Embedding
    assert_same_table_logits(model(ids).logits, trained, hidden, table, plan.ids)


@pytest.mark.parametrize("kind, tied", [("llama3", False), ("qwen2", False)])
def test_the_demo_and_the_training_step_benchmark_take_a_checkpoint_of_the_family(kind, tied, tmp_path):
    import argparse
    import shutil

    from reserved_kernels.benchmarks import train_step
    from reserved_kernels.cli import add_demo_arguments
    from reserved_kernels.demo import job as demo

    vocab, model, folder = _family(kind, tmp_path, tied)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model.config.bos_token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(folder / name, checkpoint / name)
    parser = argparse.ArgumentParser()
    add_demo_arguments(parser)
    args = parser.parse_args(["--model", str(checkpoint), "--steps", "4", "--inits", "description", "--device", "cpu",
                              "--out", str(tmp_path / "out")])
    summary = demo.run(args)
    assert summary["frozen_identical"] and summary["term_ppl_after"] < summary["term_ppl_before"]
    result = train_step.run_one("reserved", memory_runs=1, device="cpu", vocab=0, dim=0, slots=2, tokens=64,
                                dtype="float32", repeat=2, head=True, model=str(checkpoint))
    assert result["median_ms"] > 0 and result["extra_bytes"] >= 0


@pytest.mark.parametrize("kind, tied", FAMILIES)
def test_the_fused_training_loss_of_each_family_matches_its_logits_loss(kind, tied, tmp_path):
    """Untied heads too: both tables' rows get the fused loss's K x D gradients."""
    vocab, base, _ = _family(kind, tmp_path, tied)
    plan = vocab.assign(TERMS)
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    ids[:, 2] = plan.ids[0]
    models = []
    for fused in (True, False):
        model = copy.deepcopy(base)
        patch_model(model, vocab, init="description", fused_loss=fused).train()
        out = model(input_ids=ids, labels=ids)
        assert (out.logits is None) == fused
        out.loss.backward()
        models.append((out.loss, [p.grad for n, p in model.named_parameters() if p.requires_grad]))
    (loss, grads), (ref, ref_grads) = models
    tol = (vocab.vocab_size + 64) * torch.finfo(torch.float32).eps  # one loss summed in two orders, see test_gemma
    torch.testing.assert_close(loss, ref, rtol=tol, atol=0)
    assert len(grads) == (1 if tied else 2)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=tol, atol=tol * r.abs().max().item())
