"""The workflows users build around the rows, run in the real libraries on tiny Gemma, Gemma 2 and Gemma 3 models.

A transformers ``Trainer`` with checkpoints and resume, ``save_pretrained`` then
``AutoModelForCausalLM.from_pretrained``, PEFT LoRA in both orders, ``AutoTokenizer`` on a saved plan,
and the frozen table left untouched for anyone else holding it.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the workflow tests need transformers")

import reserved_kernels as rk  # noqa: E402
from reserved_kernels.models import (  # noqa: E402
    freeze_rows,
    load_reserved,
    merge,
    patch_model,
    position_split,  # noqa: E402
    save_reserved,
)
from reserved_kernels.vocab import ReservedVocab, default_tokenizer_path  # noqa: E402
from tests.families import tiny_gemma  # noqa: E402
from tests.oracle import assert_same_table_logits, captured_input  # noqa: E402

VARIANTS = ["gemma", "gemma2", "gemma3"]
RESERVED = [7, 8, 9]
EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture(autouse=True)
def _quiet_transformers():
    transformers.logging.set_verbosity_error()


def _batch(seed=0, batch=2, length=16, ordinary_every=None):
    """Rows with reserved ids at 3 and 9; with ``ordinary_every=n`` every n-th row is ordinary text instead (no
    reserved id: the patched training forward runs it without a backward, models.position_split)."""
    ids = torch.randint(108, 1024, (batch, length), generator=torch.Generator().manual_seed(seed))
    ids[:, 3] = 7
    ids[:, 9] = 8
    if ordinary_every:
        ids[::ordinary_every, 3], ids[::ordinary_every, 9] = 500, 600
    return ids


def _trained(variant="gemma", dtype=torch.float32, seed=0):
    model = patch_model(tiny_gemma(variant, dtype=dtype), RESERVED)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        model.get_input_embeddings().reserved_weight.add_(torch.randn(3, 64, generator=gen))
    return model


# ----------------------------------------------------------------------------- save_pretrained / from_pretrained

@pytest.mark.parametrize("variant", VARIANTS)
def test_save_pretrained_then_plain_from_pretrained_gives_the_trained_model(variant, tmp_path):
    model = _trained(variant)
    ids = _batch()
    trained, hidden = captured_input(model.get_output_embeddings(), lambda: model(ids).logits.detach())
    model.save_pretrained(tmp_path)  # raised "shared tensors ... not properly defined" before
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")  # as built
    assert not isinstance(loaded.get_input_embeddings(), rk.ReservedEmbedding)  # a vanilla model: rows merged
    # The merged table's reserved columns come from the V-column GEMM now, not the patched head's K-column one.
    assert_same_table_logits(loaded(ids).logits, trained, hidden, loaded.get_input_embeddings().weight, RESERVED,
                             softcap=getattr(model.config, "final_logit_softcapping", None))
    # Re-patched from the checkpoint, the rows come back exactly as trained (float32 master values).
    load_reserved(loaded, tmp_path)
    assert torch.equal(loaded.get_input_embeddings().reserved_weight, model.get_input_embeddings().reserved_weight)


def test_bf16_checkpoint_keeps_float32_master_rows_and_a_bf16_merged_table(tmp_path):
    model = _trained("gemma2", dtype=torch.bfloat16)
    model.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(os.path.join(tmp_path, "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.embed_tokens.reserved_weight").dtype == torch.float32
        table = f.get_tensor("model.embed_tokens.weight")
    assert "lm_head.weight" not in keys and "lm_head.reserved_weight" not in keys  # tied: stored once
    rows = model.get_input_embeddings().reserved_weight.detach()
    assert table.dtype == torch.bfloat16 and torch.equal(table[RESERVED], rows.bfloat16())


# ------------------------------------------------------------------------------------------ Trainer and resume

class _Data(torch.utils.data.Dataset):
    def __init__(self):
        self.ids = _batch(seed=1, batch=24, length=16, ordinary_every=3)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class _StopAt(transformers.TrainerCallback):
    """Stops the run after ``step`` steps, as a crash would, with the schedule of the whole run."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def _train(out, variant, dtype, *, stop=None, resume=None):
    model = patch_model(tiny_gemma(variant, dtype=dtype), RESERVED)
    args = transformers.TrainingArguments(output_dir=str(out), max_steps=6, per_device_train_batch_size=4,
                                          learning_rate=1e-2, weight_decay=0.1, save_steps=2, logging_steps=100,
                                          report_to=[], use_cpu=True, seed=0, data_seed=0, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Data(),
                                   callbacks=[_StopAt(stop)] if stop else None)
    trainer.train(resume_from_checkpoint=resume)
    return model


@pytest.mark.parametrize("variant, dtype", [("gemma", torch.float32), ("gemma2", torch.bfloat16),
                                            ("gemma3", torch.float32)], ids=str)
def test_trainer_checkpoints_and_resumes_to_the_same_rows(variant, dtype, tmp_path):
    whole = _train(tmp_path / "whole", variant, dtype)
    _train(tmp_path / "cut", variant, dtype, stop=4)
    checkpoint = tmp_path / "cut" / "checkpoint-4"
    optimizer_bytes = os.path.getsize(checkpoint / "optimizer.pt")
    assert optimizer_bytes < 64 * 1024  # AdamW state is K×D: kilobytes
    resumed = _train(tmp_path / "cut", variant, dtype, resume=str(checkpoint))
    assert torch.equal(resumed.get_input_embeddings().reserved_weight, whole.get_input_embeddings().reserved_weight)
    frozen = tiny_gemma(variant, dtype=dtype).get_input_embeddings().weight
    keep = torch.ones(1024, dtype=torch.bool)
    keep[RESERVED] = False
    assert torch.equal(resumed.get_input_embeddings().weight[keep], frozen[keep])


class _PaddedData(torch.utils.data.Dataset):
    """Lines of different lengths, right-padded: the micro-batches of one step count different tokens, so
    the loss's normaliser (num_items_in_batch, over the whole accumulated batch) matters."""

    def __init__(self):
        self.ids = _batch(seed=2, batch=12, length=16, ordinary_every=3)
        self.mask = torch.ones_like(self.ids)
        for i in range(12):
            self.mask[i, 16 - 2 * (i % 6):] = 0

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        labels = self.ids[i].masked_fill(self.mask[i] == 0, -100)
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": labels}


def test_trainer_with_gradient_accumulation_follows_the_unfused_trajectory(tmp_path):
    """SGD (its step is the gradient itself, unlike Adam's, which a wrong normaliser would not show)."""
    rows = {}
    for fused in (True, False):
        model = patch_model(tiny_gemma("gemma2"), RESERVED, fused_loss=fused)
        start = model.get_input_embeddings().reserved_weight.detach().clone()
        args = transformers.TrainingArguments(output_dir=str(tmp_path / str(fused)), max_steps=3,
                                              per_device_train_batch_size=2, gradient_accumulation_steps=2,
                                              optim="sgd", learning_rate=1.0, lr_scheduler_type="constant",
                                              report_to=[], use_cpu=True, seed=0, data_seed=0, disable_tqdm=True,
                                              save_strategy="no")
        transformers.Trainer(model=model, args=args, train_dataset=_PaddedData()).train()
        rows[fused] = model.get_input_embeddings().reserved_weight.detach() - start
    assert rows[False].abs().max() > 1e-3  # the rows moved
    # Each gradient is the same loss's summed in two orders, within (V + D)·eps relative (see test_gemma);
    # three steps of lr 1 add three of them.
    tol = 3 * (1024 + 64) * EPS32
    torch.testing.assert_close(rows[True], rows[False], rtol=tol, atol=tol * rows[False].abs().max().item())


# ----------------------------------------------------------------------------------------------------- TRL

def _sft_setup(tmp_path):
    trl = pytest.importorskip("trl", reason="needs trl (scripts/test.sh installs it)")
    datasets = pytest.importorskip("datasets", reason="needs datasets (a dependency of trl)")
    vocab = ReservedVocab.from_file(default_tokenizer_path())
    vocab.assign({"[summary]": "a short summary of the text"})
    vocab.save(tmp_path / "tok")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
    term = vocab.plan["[summary]"].id
    # Every other line ordinary text: TRL's fused_lm_head statistics then split the batch (models.position_split).
    rows = [[2, term] + _batch(seed=s, batch=1, length=10)[0].tolist() if s % 2 else
            [2] + _batch(seed=s, batch=1, length=10, ordinary_every=1)[0].tolist() for s in range(8)]
    dataset = datasets.Dataset.from_dict({"input_ids": rows})
    args = trl.SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=3, per_device_train_batch_size=4,
                         learning_rate=1e-2, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                         disable_tqdm=True, seed=0)
    return trl, vocab, tokenizer, dataset, args


def test_trl_sft_trainer_trains_a_patched_model_through_the_fused_loss(tmp_path, monkeypatch):
    trl, vocab, tokenizer, dataset, args = _sft_setup(tmp_path)
    model = tiny_gemma("gemma")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    patch_model(trainer.model, vocab, init="description")  # after the trainer: it replaces the model's forward
    start = model.get_input_embeddings().reserved_weight.detach().clone()
    splits = []
    split = position_split.hf_split
    monkeypatch.setattr(position_split, "hf_split", lambda *a, **k: splits.append(split(*a, **k)) or splits[-1])
    trainer.train()
    assert any(parts is not None for parts in splits)  # the ordinary lines ran without a backward
    assert not torch.equal(model.get_input_embeddings().reserved_weight, start)
    for name, p in model.named_parameters():
        if not name.endswith("reserved_weight"):
            assert torch.equal(p, frozen[name]), name
    # TRL's metrics come from the fused loss's statistics: an entropy of at most log V = 6.93 (a random
    # tiny model is close to it) and an accuracy in [0, 1].
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged and all(0 <= e["mean_token_accuracy"] <= 1 and 0 < e["entropy"] <= math.log(1024) + 1e-4
                          for e in logged)


def test_trl_sft_trainer_created_after_patching_is_a_clear_error(tmp_path):
    """TRL's own fused head reads lm_head.weight (the frozen table, without the rows): refused, with the order."""
    trl, vocab, tokenizer, dataset, args = _sft_setup(tmp_path)
    model = patch_model(tiny_gemma("gemma"), vocab, init="description")
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    with pytest.raises(RuntimeError, match="create the trainer first, then patch_model"):
        trainer.train()


# ----------------------------------------------------------------------------------------------------- PEFT

def _lora():
    peft = pytest.importorskip("peft", reason="needs peft")
    return peft, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_lora_first_then_patch_trains_both_and_reloads_on_a_fresh_base(variant, tmp_path):
    peft, config = _lora()
    model = peft.get_peft_model(tiny_gemma(variant), config)
    patch_model(model, RESERVED)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n in trainable) and any(n.endswith("embed_tokens.reserved_weight") for n in trainable)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    start = model.get_input_embeddings().reserved_weight.detach().clone()
    for step in range(3):
        loss = model(input_ids=_batch(step), labels=_batch(step)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not torch.equal(start, model.get_input_embeddings().reserved_weight)
    model.eval()
    ids = _batch(seed=7)
    trained = model(input_ids=ids).logits.detach()
    model.save_pretrained(tmp_path)  # the adapter alone
    save_reserved(model, tmp_path / "rows")  # the rows: an adapter folder of their own
    reloaded = peft.PeftModel.from_pretrained(tiny_gemma(variant), tmp_path)
    load_reserved(reloaded, tmp_path / "rows")
    assert torch.equal(reloaded(input_ids=ids).logits, trained)


def test_patch_then_lora_is_a_clear_error_naming_the_working_order():
    peft, config = _lora()
    model = peft.get_peft_model(patch_model(tiny_gemma("gemma"), RESERVED), config)
    model.train()
    with pytest.raises(RuntimeError, match=r"Apply LoRA first, then patch"):
        model(input_ids=_batch(), labels=_batch())
    freeze_rows(model)  # training only the adapter on purpose is allowed
    model(input_ids=_batch(), labels=_batch()).loss.backward()
    model.eval()
    with torch.no_grad():
        model(input_ids=_batch())  # evaluation never trips the check


def test_modules_to_save_on_the_embedding_is_refused_in_either_order():
    peft, _ = _lora()
    config = peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["embed_tokens"])
    model = peft.get_peft_model(patch_model(tiny_gemma("gemma"), RESERVED), config)
    model.train()
    with pytest.raises(RuntimeError, match="modules_to_save"):
        model(input_ids=_batch(), labels=_batch())
    wrapped = peft.get_peft_model(tiny_gemma("gemma"), config)
    with pytest.raises(ValueError, match="modules_to_save"):
        patch_model(wrapped, RESERVED)


def test_merge_of_a_lora_model_restores_the_adapter_flags():
    peft, config = _lora()
    model = peft.get_peft_model(tiny_gemma("gemma"), config)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    patch_model(model, RESERVED)
    merge(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before


# --------------------------------------------------------------------------------- the frozen table stays frozen

def test_forward_never_writes_the_shared_table_and_patching_freezes_the_original_parameter():
    model = tiny_gemma("gemma")
    table = model.get_input_embeddings().weight
    reference = tiny_gemma("gemma")  # a reference model (KL / DPO) sharing the table's storage
    reference.get_input_embeddings().weight = table
    reference.tie_weights()
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    patch_model(model, RESERVED)
    assert table is model.get_input_embeddings().weight and not table.requires_grad
    with torch.no_grad():
        model.get_input_embeddings().reserved_weight.add_(1.0)
    ids = _batch()
    model(input_ids=ids, labels=ids).loss.backward()
    assert torch.equal(table, snapshot["model.embed_tokens.weight"])
    ref_logits = reference(ids).logits
    assert torch.equal(ref_logits, tiny_gemma("gemma")(ids).logits)  # the reference model is unchanged


# --------------------------------------------------------------------------------------------------- tokenizer

def test_auto_tokenizer_on_a_saved_plan_behaves_like_gemmas(tmp_path):
    import sentencepiece as spm

    vocab = ReservedVocab.from_file(default_tokenizer_path())
    vocab.assign({"[summary]": "a short summary of the text", "machine learning": None})
    vocab.save(tmp_path)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "[summary] of machine learning, then the model trains every row."
    ids = tok(text).input_ids
    assert ids[0] == 2  # <bos>, as Gemma's tokenizer adds it
    assert ids[1:] == spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model")).encode(text)
    assert vocab.plan["[summary]"].id in ids and vocab.plan[" machine learning"].id in ids  # after "of"
    assert not {"[summary]", "machine learning"} & set(tok.all_special_tokens)  # ordinary tokens
    assert tok.decode(ids, skip_special_tokens=True) == text
    plain = "Le réseau mesure 4096 tokens; 東京 data — twice!"  # text without terms: the original tokenizer's ids
    assert tok(plain).input_ids == [2] + spm.SentencePieceProcessor(model_file=default_tokenizer_path()).encode(plain)
