"""The rows as a PEFT trainable-tokens adapter: written by save_reserved, loaded by PEFT without reserved_kernels,
read back by load_reserved (ours, or one PEFT wrote), and bad adapters refused with nothing changed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

peft = pytest.importorskip("peft", reason="the adapter format is PEFT's: its tests load with PEFT itself")
transformers = pytest.importorskip("transformers", reason="PEFT adapters wrap transformers models")

from reserved_kernels.models import load_reserved, patch_model, save_reserved  # noqa: E402
from reserved_kernels.models.artifacts.adapter import AdapterError  # noqa: E402
from reserved_kernels.modules.embedding import ReservedEmbedding  # noqa: E402
from reserved_kernels.vocab import ReservedVocab, default_tokenizer_path  # noqa: E402
from tests.families import tiny_gemma, tiny_llama  # noqa: E402
from tests.oracle import assert_same_table_logits, captured_input  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TERMS = {"[summary]": "a short summary of the text", "[translate]": "translate the text"}


def _vocab() -> ReservedVocab:
    vocab = ReservedVocab.from_file(default_tokenizer_path())
    vocab.assign(TERMS, spaced=False)
    return vocab


def _model(kind: str, dtype=torch.float32):
    return tiny_llama(1024, tied=False) if kind == "llama-untied" else tiny_gemma(kind, dtype=dtype)


def _trained(kind: str, vocab, dtype=torch.float32):
    """A patched model whose rows (and an untied head's) moved."""
    model = patch_model(_model(kind, dtype), vocab, init="description")
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for module in (model.get_input_embeddings(), model.get_output_embeddings()):
            if hasattr(module, "reserved_weight") and getattr(module, "tied", None) is None:
                module.reserved_weight.add_(torch.randn(module.reserved_weight.shape, generator=gen))
    return model


def _ids(vocab):
    ids = torch.randint(108, 1000, (2, 12), generator=torch.Generator().manual_seed(3))
    ids[0, 2], ids[1, 5] = vocab.plan.ids
    return ids


@pytest.mark.parametrize("kind", ["gemma3", "gemma2", "llama-untied"])
def test_peft_loads_the_adapter_without_reserved_kernels_and_gives_the_trained_logits(kind, tmp_path):
    vocab = _vocab()
    base = _model(kind)
    base.save_pretrained(tmp_path / "base")
    model = _trained(kind, vocab).eval()
    ids = _ids(vocab)
    head = model.get_output_embeddings()
    ours, hidden = captured_input(head, lambda: model(input_ids=ids).logits.detach())
    save_reserved(model, tmp_path / "adapter")
    files = set(os.listdir(tmp_path / "adapter"))
    assert {"adapter_config.json", "adapter_model.safetensors", "reserved_plan.json", "tokenizer.model"} <= files
    k, d = len(vocab.plan.ids), 64
    adapter_bytes = sum((tmp_path / "adapter" / f).stat().st_size for f in ("adapter_config.json",
                                                                            "adapter_model.safetensors"))
    assert adapter_bytes <= 2 * k * d * 4 + 64 * 1024
    torch.save(ids, tmp_path / "ids.pt")
    script = f"""
import sys
sys.modules["reserved_kernels"] = None  # not importable: PEFT alone reads the folder
import torch, transformers, peft
base = transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path / 'base')!r}, attn_implementation="eager")
model = peft.PeftModel.from_pretrained(base, {str(tmp_path / 'adapter')!r}).eval()
with torch.no_grad():
    torch.save(model(input_ids=torch.load({str(tmp_path / 'ids.pt')!r})).logits, {str(tmp_path / 'peft.pt')!r})
"""
    subprocess.run([sys.executable, "-c", script], check=True, cwd=str(tmp_path), capture_output=True)
    theirs = torch.load(tmp_path / "peft.pt")
    # The same body; PEFT computes every column from its merged V x D table, ours the K reserved columns apart.
    merged = head.weight.detach().clone()
    merged[vocab.plan.ids] = head.reserved_weight.detach().to(merged.dtype)
    assert_same_table_logits(theirs, ours, hidden, merged, vocab.plan.ids,
                             softcap=model.config.final_logit_softcapping if kind == "gemma2" else None)


def test_fp32_master_rows_of_a_16_bit_model_come_back_exactly(tmp_path):
    vocab = _vocab()
    model = _trained("gemma3", vocab, dtype=torch.bfloat16)
    rows = model.get_input_embeddings().reserved_weight
    assert rows.dtype == torch.float32
    save_reserved(model, tmp_path / "adapter")
    fresh = _model("gemma3", torch.bfloat16)
    assert load_reserved(fresh, tmp_path / "adapter") == vocab.plan
    loaded = fresh.get_input_embeddings().reserved_weight
    assert loaded.dtype == torch.float32 and torch.equal(loaded, rows)


@pytest.mark.parametrize("kind", ["gemma3", "llama-untied"])
def test_load_reserved_reads_an_adapter_peft_wrote(kind, tmp_path):
    ids_planned = [7, 8, 9]
    base = _model(kind)
    targets = ["embed_tokens"] + (["lm_head"] if kind == "llama-untied" else [])
    config = peft.TrainableTokensConfig(token_indices=ids_planned, target_modules=targets)
    peft_model = peft.get_peft_model(base, config)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for module in (peft_model.get_input_embeddings(), peft_model.get_output_embeddings()):
            if hasattr(module, "trainable_tokens_delta") and module.tied_adapter is None:
                module.trainable_tokens_delta["default"].add_(torch.randn(3, 64, generator=gen))
    peft_model.save_pretrained(tmp_path / "theirs")
    ids = torch.randint(108, 1000, (2, 10), generator=torch.Generator().manual_seed(4))
    ids[0, 3], ids[1, 1] = 7, 9
    with torch.no_grad():
        theirs = peft_model.eval()(input_ids=ids).logits
    fresh = _model(kind)
    assert load_reserved(fresh, tmp_path / "theirs") is None  # PEFT writes no plan
    head = fresh.get_output_embeddings()
    ours, hidden = captured_input(head, lambda: fresh.eval()(input_ids=ids).logits.detach())
    merged = head.weight.detach().clone()
    merged[ids_planned] = head.reserved_weight.detach()
    assert_same_table_logits(theirs, ours, hidden, merged, ids_planned)


def _adapter(tmp_path, vocab=None):
    vocab = vocab or _vocab()
    model = _trained("gemma3", vocab)
    folder = tmp_path / "adapter"
    save_reserved(model, folder)
    return folder, vocab


def _edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_bad_adapters_are_refused_naming_the_file_and_key_and_nothing_changes(tmp_path):
    from safetensors.torch import load_file, save_file

    folder, vocab = _adapter(tmp_path)
    unpatched = _model("gemma3")
    patched = patch_model(_model("gemma3"), vocab)
    rows_before = patched.get_input_embeddings().reserved_weight.detach().clone()

    def refused(match):
        for model in (unpatched, patched):
            with pytest.raises(AdapterError, match=match):
                load_reserved(model, folder)
        assert type(unpatched.get_input_embeddings()) is not ReservedEmbedding  # not patched by a failed load
        assert torch.equal(patched.get_input_embeddings().reserved_weight, rows_before)

    good = json.loads((folder / "adapter_config.json").read_text())
    _edit_config(folder, token_indices=[6, 5000])
    refused(r"adapter_config.json: key 'token_indices' holds \[5000\], outside this model's 1,024 rows")
    _edit_config(folder, token_indices=good["token_indices"])
    weights = folder / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = "base_model.model.model.embed_tokens.trainable_tokens_delta"
    save_file({**tensors, key: tensors[key][:, :32].contiguous()}, weights,
              metadata={"format": "pt", "reserved_kernels.table": "1024x64"})
    refused(rf"adapter_model.safetensors: key '{key}' holds rows of shape \(2, 32\), expected \(2, 64\)")
    save_file(tensors, weights, metadata={"format": "pt", "reserved_kernels.table": "2048x64"})
    refused(r"metadata key 'reserved_kernels.table' says a 2048x64 table; this model's is 1024x64")
    save_file(tensors, weights, metadata={"format": "pt", "reserved_kernels.table": "1024x64",
                                          "reserved_kernels.tokenizer_sha256": "0" * 64})
    with pytest.raises(AdapterError, match="planned for another tokenizer"):
        load_reserved(patched, folder)
    _edit_config(folder, peft_type="LORA")
    refused("key 'peft_type' is 'LORA', not 'TRAINABLE_TOKENS'")


def test_an_adapter_on_ids_that_are_not_reserved_slots_loads_with_a_warning(tmp_path):
    base = _model("gemma3")
    peft_model = peft.get_peft_model(base, peft.TrainableTokensConfig(token_indices=[300, 301],
                                                                      target_modules=["embed_tokens"]))
    peft_model.save_pretrained(tmp_path / "theirs")
    fresh = _model("gemma3")
    with pytest.warns(UserWarning, match=r"token_indices \[300, 301\] are not reserved slots"):
        load_reserved(fresh, tmp_path / "theirs", vocab=_vocab())
    assert fresh.get_input_embeddings().reserved_ids.tolist() == [300, 301]


def test_save_reserved_writes_no_pickle_and_never_overwrites_another_adapter(tmp_path):
    vocab = _vocab()
    model = _trained("gemma3", vocab)
    with pytest.raises(ValueError, match="writes a folder"):
        save_reserved(model, tmp_path / "rows.pt")
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(ValueError, match="holds a LORA adapter"):
        save_reserved(model, lora)
    assert json.loads((lora / "adapter_config.json").read_text()) == {"peft_type": "LORA"}
    save_reserved(model, tmp_path / "rows")
    assert not [f for f in os.listdir(tmp_path / "rows") if f.endswith((".pt", ".bin", ".pkl"))]


def test_rows_files_of_earlier_releases_still_load(tmp_path):
    """The .pt format (format_version 1) that save_reserved wrote before: read, no longer written."""
    vocab = _vocab()
    model = _trained("gemma3", vocab)
    embedding = model.get_input_embeddings()
    torch.save(dict(format_version=1, num_embeddings=1024, embedding_dim=64, reserved_ids=embedding.reserved_ids,
                    reserved_weight=embedding.reserved_weight.detach(), head_reserved_weight=None,
                    plan=vocab.plan.to_json()), tmp_path / "rows.pt")
    fresh = _model("gemma3")
    assert load_reserved(fresh, tmp_path / "rows.pt") == vocab.plan
    assert torch.equal(fresh.get_input_embeddings().reserved_weight, embedding.reserved_weight)


@pytest.mark.parametrize("kind", ["gemma3", "llama-untied"])
def test_every_reader_returns_the_same_typed_rows(kind, tmp_path):
    """An adapter folder, a patched model's save_pretrained folder, the export's model-free reader and a patched
    model all give ReservedRows holding the trained rows exactly (an untied head's own rows too)."""
    from reserved_kernels.models.artifacts.adapter import read_adapter
    from reserved_kernels.models.artifacts.gguf import ExportError, ExportRows
    from reserved_kernels.models.artifacts.rows import ReservedRows

    vocab = _vocab()
    model = _trained(kind, vocab)
    save_reserved(model, tmp_path / "rows")
    model.save_pretrained(tmp_path / "ckpt")
    vocab.save(tmp_path / "ckpt")
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    untied = head.tied is None
    found = read_adapter(str(tmp_path / "rows"), model)
    assert isinstance(found, ReservedRows) and found.ids == vocab.plan.ids and found.plan.ids == vocab.plan.ids
    assert torch.equal(found.rows, embedding.reserved_weight.detach())
    assert (found.head_rows is not None) == untied
    for export in (ExportRows.from_folder(str(tmp_path / "rows")), ExportRows.from_folder(str(tmp_path / "ckpt")),
                   ExportRows.from_model(model)):
        assert export.plan.ids == vocab.plan.ids
        assert torch.equal(torch.from_numpy(export.rows), embedding.reserved_weight.detach().float())
        if untied:
            assert torch.equal(torch.from_numpy(export.head_rows), head.reserved_weight.detach().float())
        else:
            assert export.head_rows is None
    with pytest.raises(ExportError, match="no plan"):
        ExportRows.of(ReservedRows(ids=found.ids, rows=found.rows, head_rows=None, plan=None, table_shape=None,
                                   source="rows without a plan"))
