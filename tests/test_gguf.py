"""export_gguf on small GGUFs written here: the shipped demo Gemma (SentencePiece) and a tiny Llama 3 (BPE).

Each export is read back with gguf-py's reader (not the export's own parser) and, where llama-cpp-python is
installed, loaded by llama.cpp itself. The real Gemma 3 270M file is tested in tests/test_real_gemma.py.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the GGUF export needs the gguf package "
                                          "(pip install 'reserved-kernels[gguf]')")
transformers = pytest.importorskip("transformers")

import reserved_kernels as rk  # noqa: E402
from reserved_kernels.models.artifacts import gguf as export  # noqa: E402
from reserved_kernels.vocab import ReservedVocab, default_tokenizer_path  # noqa: E402
from tests import families, gguf_files  # noqa: E402

try:
    import llama_cpp
except ImportError:
    llama_cpp = None
needs_llama_cpp = pytest.mark.skipif(llama_cpp is None, reason="llama.cpp's check needs llama-cpp-python "
                                                               "(pip install 'reserved-kernels[llama-cpp]')")
Q = gguf.GGMLQuantizationType
TERMS = {"[summary]": "in summary", "[translate]": "in translation"}


def shipped_model():
    from reserved_kernels.pretrained import shipped_model

    transformers.logging.set_verbosity_error()
    model = transformers.AutoModelForCausalLM.from_pretrained(shipped_model(), dtype=torch.float32).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    """(the patched shipped model, its vocab, the rows folder): rows moved away from their initialisation."""
    folder = tmp_path_factory.mktemp("rows")
    vocab = ReservedVocab.from_file(default_tokenizer_path())
    vocab.assign(TERMS)
    model = rk.patch_model(shipped_model(), vocab, init="description")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        rows = model.get_input_embeddings().reserved_weight
        rows.add_(torch.randn(rows.shape, generator=generator) * rows.std())
    rk.save_reserved(model, folder)
    return model, vocab, str(folder)


@pytest.fixture(scope="module")
def gemma_base(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("base") / "demo-gemma.gguf")
    return gguf_files.write_gemma(path, shipped_model(), default_tokenizer_path())


def plan_rows(model) -> np.ndarray:
    return model.get_input_embeddings().reserved_weight.detach().float().numpy()


@pytest.mark.parametrize("table_type", [Q.Q8_0, Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1],
                         ids=lambda t: t.name)
def test_the_rows_and_tokens_go_into_a_copy_of_the_gemma_gguf_and_nothing_else_changes(gemma, tmp_path, table_type):
    model, vocab, rows = gemma
    base = gguf_files.write_gemma(str(tmp_path / "base.gguf"), shipped_model(), default_tokenizer_path(),
                                  table_type=table_type)
    out = rk.export_gguf(rows, base, tmp_path / "out.gguf")
    assert out == str(tmp_path / "out.gguf")
    gguf_files.assert_only_the_plan_changed(base, out, vocab.plan, {export.TABLE: plan_rows(model)})


def test_a_patched_model_and_a_save_pretrained_folder_export_the_same_file(gemma, gemma_base, tmp_path):
    model, vocab, rows = gemma
    from_folder = rk.export_gguf(rows, gemma_base, tmp_path / "a.gguf")
    from_model = rk.export_gguf(model, gemma_base, tmp_path / "b.gguf")
    rk.save_pretrained(model, tmp_path / "checkpoint", vocab)
    from_checkpoint = rk.export_gguf(tmp_path / "checkpoint", gemma_base, tmp_path / "c.gguf")
    data = [open(p, "rb").read() for p in (from_folder, from_model, from_checkpoint)]
    assert data[0] == data[1] == data[2]


@pytest.mark.parametrize("alignment", [256, 16384])  # within a page, and beyond one (the data moves by a multiple)
def test_a_custom_alignment_is_kept(gemma, tmp_path, alignment):
    model, vocab, rows = gemma
    base = gguf_files.write_gemma(str(tmp_path / "base.gguf"), shipped_model(), default_tokenizer_path(),
                                  alignment=alignment)
    out = rk.export_gguf(rows, base, tmp_path / "out.gguf")
    assert gguf_files.read(out).alignment == alignment
    gguf_files.assert_only_the_plan_changed(base, out, vocab.plan, {export.TABLE: plan_rows(model)})


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    """(the patched tiny untied Llama 3, its vocab, rows folder, base GGUF with output.weight)."""
    folder = tmp_path_factory.mktemp("llama3")
    vocab = ReservedVocab.from_file(families.llama3_tokenizer(folder / "tokenizer"))
    vocab.assign({"[gpu]": "graphics card", "[cpu]": "processor"})
    model = families.tiny_llama(vocab.vocab_size, tied=False, reserved_ids=vocab.reserved_ids)
    base = gguf_files.write_llama3(str(folder / "base.gguf"), os.path.join(folder, "tokenizer", "tokenizer.json"),
                                   model.get_input_embeddings().weight.detach(),
                                   model.get_output_embeddings().weight.detach())
    rk.patch_model(model, vocab, init="description")
    with torch.no_grad():
        for module in (model.get_input_embeddings(), model.get_output_embeddings()):
            module.reserved_weight.add_(torch.randn_like(module.reserved_weight) * 0.1)
    rk.save_reserved(model, folder / "rows")
    return model, vocab, str(folder / "rows"), base


def test_a_llama3_gguf_gets_its_reserved_specials_renamed_and_the_untied_heads_own_rows(llama3, tmp_path):
    model, vocab, rows, base = llama3
    assert set(vocab.plan.ids) <= set(vocab.reserved_ids) and vocab.families == ("llama3",)
    out = rk.export_gguf(rows, base, tmp_path / "out.gguf")
    head = model.get_output_embeddings().reserved_weight.detach().numpy()
    assert not np.array_equal(head, plan_rows(model))
    gguf_files.assert_only_the_plan_changed(base, out, vocab.plan,
                                            {export.TABLE: plan_rows(model), export.OUTPUT: head})


# ------------------------------------------------------------------------------------------------ refusals

def refused(rows, base, out, match: str, **kwargs) -> export.ExportError:
    """The export raises ExportError matching ``match`` and leaves no file behind (``out`` as it was)."""
    folder = os.path.dirname(os.path.abspath(out))
    before = sorted(os.listdir(folder)) if os.path.isdir(folder) else None
    existed = os.path.exists(out)
    content = open(out, "rb").read() if existed and os.path.isfile(out) else None
    with pytest.raises(export.ExportError, match=match) as info:
        rk.export_gguf(rows, base, out, **kwargs)
    assert isinstance(info.value, ValueError)
    assert (sorted(os.listdir(folder)) if os.path.isdir(folder) else None) == before  # no temporary file left
    if content is not None:
        assert open(out, "rb").read() == content
    return info.value


def test_another_models_table_or_tokenizer_is_refused(gemma, tmp_path):
    model, vocab, rows = gemma
    narrow = np.random.default_rng(0).standard_normal((1024, 64)).astype(np.float32)
    other_shape = gguf_files.write_gemma(str(tmp_path / "narrow.gguf"), shipped_model(), default_tokenizer_path(),
                                         table=narrow)
    refused(rows, other_shape, str(tmp_path / "out.gguf"), r"narrow\.gguf: tensor 'token_embd\.weight' is 1024x64; "
            r"the rows of .* were trained in a 1024x96 table: another model")
    texts = gguf_files.sentencepiece_vocab(default_tokenizer_path())[0]
    texts[500] = texts[500] + "x"  # one piece differs: another tokenizer
    other_vocab = gguf_files.write_gemma(str(tmp_path / "vocab.gguf"), shipped_model(), default_tokenizer_path(),
                                         texts=texts)
    refused(rows, other_vocab, str(tmp_path / "out.gguf"), r"vocab\.gguf: key 'tokenizer\.ggml\.tokens' is not the "
            r"vocabulary of the tokenizer the rows were planned with")


def test_slots_that_are_not_the_plans_free_pieces_are_refused(gemma, gemma_base, tmp_path):
    model, vocab, rows = gemma
    once = rk.export_gguf(rows, gemma_base, tmp_path / "once.gguf")
    refused(rows, once, str(tmp_path / "twice.gguf"), r"once\.gguf: key 'tokenizer\.ggml\.tokens': id 7 is the term "
            r"itself: exported already, not the plan's free slot '<unused0>'")


def test_out_that_exists_or_is_the_base_is_refused_and_force_replaces(gemma, gemma_base, tmp_path):
    model, vocab, rows = gemma
    out = tmp_path / "out.gguf"
    out.write_bytes(b"the user's file")
    refused(rows, gemma_base, str(out), r"out\.gguf: exists \(pass force=True")
    refused(rows, gemma_base, gemma_base, r"demo-gemma\.gguf: is the base file itself", force=True)
    rk.export_gguf(rows, gemma_base, out, force=True)
    assert gguf_files.read(str(out)).fields[export.PLAN_KEY]


def test_a_table_type_gguf_py_cannot_write_is_refused_by_name(gemma, gemma_base, tmp_path):
    model, vocab, rows = gemma
    for ggml_type in (Q.Q6_K, Q.Q4_K, Q.IQ4_NL):
        base = gguf_files.with_tensor_type(gemma_base, str(tmp_path / f"{ggml_type.name}.gguf"), export.TABLE,
                                           ggml_type)
        refused(rows, base, str(tmp_path / "out.gguf"), rf"{ggml_type.name}\.gguf: tensor 'token_embd\.weight' is "
                rf"{ggml_type.name}, which gguf-py cannot write")


def test_unreadable_and_truncated_files_are_refused(gemma, gemma_base, tmp_path):
    model, vocab, rows = gemma
    out = str(tmp_path / "out.gguf")
    refused(rows, str(tmp_path / "missing.gguf"), out, r"missing\.gguf: cannot be read")
    (tmp_path / "text.gguf").write_bytes(b"not a model at all")
    refused(rows, str(tmp_path / "text.gguf"), out, r"text\.gguf: not a GGUF file")
    data = open(gemma_base, "rb").read()
    for cut, what in ((2000, r"truncated \(the file ends inside key 'tokenizer\.ggml\.tokens'"), (len(data) - 1000,
                                                                                  r"truncated \(.*ends at byte")):
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        refused(rows, str(tmp_path / "cut.gguf"), out, rf"cut\.gguf: {what}")


def test_rows_without_their_plan_or_of_an_unpatched_model_are_refused(gemma, gemma_base, tmp_path):
    model, vocab, rows = gemma
    lone = tmp_path / "lone"
    lone.mkdir()
    for name in os.listdir(rows):
        if name.startswith("adapter_"):
            (lone / name).write_bytes(open(os.path.join(rows, name), "rb").read())
    refused(str(lone), gemma_base, str(tmp_path / "out.gguf"), r"lone/reserved_plan\.json: missing")
    refused(shipped_model(), gemma_base, str(tmp_path / "out.gguf"), r"GemmaForCausalLM is not a patched model")


def test_an_interrupted_export_leaves_nothing_behind(gemma, gemma_base, tmp_path, monkeypatch):
    model, vocab, rows = gemma

    def interrupted(*args, **kwargs):  # Ctrl-C while the tensor data is copied
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "_copy_range", interrupted)
    with pytest.raises(KeyboardInterrupt):
        rk.export_gguf(rows, gemma_base, tmp_path / "out.gguf")
    assert os.listdir(tmp_path) == []


def test_a_plan_whose_spaced_form_has_the_higher_id_warns_for_ollama(gemma_base, tmp_path):
    vocab = ReservedVocab.from_file(default_tokenizer_path())
    vocab.assign(["[summary]"], spaced=False)
    vocab.assign(["[summary]"])  # an earlier release's order: the bare form first
    assert vocab.plan["[summary]"].id < vocab.plan[" [summary]"].id
    model = rk.patch_model(shipped_model(), vocab, init="description")
    with pytest.warns(UserWarning, match=r"spaced forms \[' \[summary\]'\] have higher ids.*Ollama"):
        rk.export_gguf(model, gemma_base, tmp_path / "out.gguf")


def test_the_command_line_exports_and_names_a_refusal(gemma, gemma_base, tmp_path):
    model, vocab, rows = gemma
    command = [sys.executable, "-m", "reserved_kernels", "export-gguf", rows, "--base", gemma_base, "--out",
               str(tmp_path / "out.gguf")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"wrote {tmp_path / 'out.gguf'}" in done.stdout
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode != 0 and "ExportError" in again.stderr and "exists" in again.stderr
    assert subprocess.run(command + ["--force"], capture_output=True, text=True, timeout=300).returncode == 0


# ------------------------------------------------------------------------------------------------ llama.cpp

@needs_llama_cpp
def test_llama_cpp_reads_each_gemma_term_as_one_token_and_ordinary_text_as_before(gemma, gemma_base, tmp_path):
    model, vocab, rows = gemma
    out = rk.export_gguf(rows, gemma_base, tmp_path / "out.gguf")
    llm = llama_cpp.Llama(out, vocab_only=True, verbose=False)
    base = llama_cpp.Llama(gemma_base, vocab_only=True, verbose=False)
    gguf_files.assert_each_term_is_one_token(llm, vocab.plan)
    text = open(os.path.join(os.path.dirname(families.__file__), "..", "README.md"), encoding="utf-8").read()
    text = text.replace("[summary]", "").replace("[translate]", "")
    assert gguf_files.tokenize(llm, text) == gguf_files.tokenize(base, text)


@needs_llama_cpp
def test_llama_cpp_reads_each_llama3_term_as_one_token(llama3, tmp_path):
    model, vocab, rows, base = llama3
    out = rk.export_gguf(rows, base, tmp_path / "out.gguf")
    llm = llama_cpp.Llama(out, vocab_only=True, verbose=False)
    gguf_files.assert_each_term_is_one_token(llm, vocab.plan)
    ordinary = families.TEXT
    base_llm = llama_cpp.Llama(base, vocab_only=True, verbose=False)
    assert gguf_files.tokenize(llm, ordinary) == gguf_files.tokenize(base_llm, ordinary)


@needs_llama_cpp
def test_llama_cpp_runs_the_exported_gemma_as_the_patched_model_computes(gemma, gemma_base, tmp_path):
    model, vocab, rows = gemma
    out = rk.export_gguf(rows, gemma_base, tmp_path / "out.gguf")
    patched = shipped_model()
    rk.load_reserved(patched, rows, vocab=vocab)
    encode = vocab.renamed_encoder()
    ordinary = [2] + vocab.encode("the cat sat on the mat and then it ran away from the dog")
    with_terms = [2] + encode("[summary] the cat sat. [translate] le chat, and [summary] again")
    gguf_files.assert_logits_agree(shipped_model(), patched, gemma_base, out, ordinary, with_terms, Q.Q8_0)


@pytest.mark.parametrize("kind", ["short", "empty", "nul", "long", "one byte"])
def test_the_token_list_is_parsed_as_the_one_by_one_walk_does(kind):
    """The numpy proposal of where each string starts is taken only where it is the walk itself: on token lists
    it cannot read (a NUL inside a text, a text of 65,536 bytes) the walk runs, with the same answer; the texts
    joined for the vocabulary's digest are the texts."""
    import io
    import struct

    rng = np.random.default_rng(0)
    texts = [bytes(rng.integers(1, 256, rng.integers(1, 300), dtype=np.uint8)) for _ in range(5000)]
    if kind == "empty":
        texts[2500] = b""
    elif kind == "nul":
        texts[100] = b"a\0\0\0\0\0\0\0b"
    elif kind == "long":
        texts[7] = b"x" * 70_000
    elif kind == "one byte":
        texts = [b"a"] * 5000
    raw = b"".join(struct.pack("<Q", len(t)) + t for t in texts) + b"\0" * 16
    cursor = export._Cursor(io.BytesIO(raw), "list.gguf")
    starts = cursor.strings(len(texts), "a token list")
    expected, pos = [], 0
    for text in texts:
        expected.append(pos + 8)
        pos += 8 + len(text)
    assert list(starts) == expected and cursor.pos == pos
    fast = export._proposed_starts(bytearray(raw), 0, len(texts))
    assert fast is None or list(fast) == expected  # a proposal is the walk, or nothing
    assert (fast is None) == (kind in ("nul", "long"))  # ordinary lists (an empty token too) are read in numpy
    assert export._joined(bytearray(raw), starts, pos) == b"\0".join(texts)


def test_a_term_whose_text_the_base_already_has_is_refused(gemma, tmp_path):
    """llama.cpp fails to load a vocabulary with two equal texts. Planning refuses a term its tokenizer has, and the
    vocabulary digest refuses a base whose pieces differ; a plan of an earlier release has no digest, so the export
    looks for the terms among the base's texts itself."""
    import dataclasses

    model, vocab, rows = gemma
    texts = gguf_files.sentencepiece_vocab(default_tokenizer_path())[0]
    texts[500] = "[summary]"
    base = gguf_files.write_gemma(str(tmp_path / "clash.gguf"), shipped_model(), default_tokenizer_path(), texts=texts)
    loaded = export.ExportRows.from_folder(rows)
    older = dataclasses.replace(loaded, plan=dataclasses.replace(loaded.plan, pieces_sha256=None))
    refused(older, base, str(tmp_path / "out.gguf"), r"clash\.gguf: key 'tokenizer\.ggml\.tokens' already has "
            r"\[\(500, '\[summary\]'\)\] \(id, text\): llama\.cpp refuses")
