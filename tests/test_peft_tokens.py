"""PEFT's trainable tokens accelerated in one line (``patch_model(peft_model)``): PEFT's loss and gradients on
PEFT's own configurations, and PEFT's workflow unchanged.

Tolerance, as in test_frozen: the same loss summed in other orders (the fused loss's tiles against one N x V
GEMM, the K reserved columns apart): each of the V + D + T terms of a sum contributes at most one rounding of
eps32 relative, so ``(V + D + T)·eps32`` relative bounds the loss and the gradients.
"""

from __future__ import annotations

import copy

import pytest
import torch

peft = pytest.importorskip("peft", reason="accelerates PEFT's trainable tokens: tested against PEFT itself")
transformers = pytest.importorskip("transformers", reason="PEFT's trainable tokens wrap transformers models")

from reserved_kernels.models import (  # noqa: E402
    FrozenText,
    merge,
    patch_model,
    position_split,  # noqa: E402
)
from tests.families import tiny_gemma, tiny_llama  # noqa: E402

TOKENS = [7, 8, 9, 10]
LENGTH = 40
TOL = (1024 + 64 + LENGTH) * torch.finfo(torch.float32).eps


def _base(kind: str):
    return tiny_llama(1024, tied=False) if kind.startswith("llama") else tiny_gemma(kind)


CONFIGS = {  # PEFT's own configurations of trainable tokens
    "tokens-gemma": ("gemma", lambda: peft.TrainableTokensConfig(token_indices=TOKENS,
                                                                 target_modules=["embed_tokens"])),
    "tokens-gemma2": ("gemma2", lambda: peft.TrainableTokensConfig(token_indices=TOKENS,
                                                                   target_modules=["embed_tokens"])),
    "tokens-gemma3": ("gemma3", lambda: peft.TrainableTokensConfig(token_indices=TOKENS,
                                                                   target_modules=["embed_tokens"])),
    "tokens-llama-untied-embedding": ("llama", lambda: peft.TrainableTokensConfig(token_indices=TOKENS,
                                                                                  target_modules=["embed_tokens"])),
    "tokens-llama-untied-both": ("llama", lambda: peft.TrainableTokensConfig(
        token_indices=TOKENS, target_modules=["embed_tokens", "lm_head"])),
    "lora-gemma3": ("gemma3", lambda: peft.LoraConfig(target_modules=["q_proj", "v_proj"],
                                                      trainable_token_indices=TOKENS, init_lora_weights=False)),
    "lora-llama-untied": ("llama", lambda: peft.LoraConfig(target_modules=["q_proj"], trainable_token_indices=TOKENS,
                                                           init_lora_weights=False)),
}


def _peft_model(name: str, seed: int = 1):
    kind, config = CONFIGS[name]
    model = peft.get_peft_model(_base(kind), config())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # rows that moved, as after some training
        for n, p in model.named_parameters():
            if "trainable_tokens_delta" in n:
                p.add_(torch.randn(p.shape, generator=gen))
    return model


def _batch():
    ids = torch.randint(108, 1000, (3, LENGTH), generator=torch.Generator().manual_seed(0))
    ids[0, 5], ids[1, 20], ids[2, 0] = 7, 9, 10
    ids[0, 30] = 8
    mask = torch.ones_like(ids)
    mask[2, -6:] = 0
    return dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))


def _step(model):
    model.train()
    loss = model(**_batch()).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_accelerated_step_gives_pefts_loss_and_gradients(name):
    reference = _peft_model(name)
    ours = patch_model(copy.deepcopy(reference))
    layer = ours.get_input_embeddings()
    assert type(getattr(layer, "token_adapter", layer)).__name__ == "FastTrainableTokensLayer"
    ref_loss, ref_grads = _step(reference)
    loss, grads = _step(ours)
    torch.testing.assert_close(loss, ref_loss, rtol=TOL, atol=0)
    assert grads.keys() == ref_grads.keys() and any("trainable_tokens_delta" in n for n in grads)
    for n, g in grads.items():
        torch.testing.assert_close(g, ref_grads[n], rtol=TOL, atol=TOL * ref_grads[n].abs().max().item(), msg=n)


def test_the_trainable_parameters_are_peft_s_and_the_step_skips_frozen_positions_without_lora():
    model = _peft_model("tokens-gemma3")
    before = {n for n, p in model.named_parameters() if p.requires_grad}
    patch_model(model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == before
    assert position_split.skip_unavailable(model) is None
    lora = patch_model(_peft_model("lora-gemma3"))
    assert position_split.skip_unavailable(lora) == "a parameter other than the reserved rows trains"


def test_peft_s_workflow_runs_as_it_is_on_the_accelerated_model(tmp_path):
    ids = _batch()["input_ids"]
    model = patch_model(_peft_model("tokens-gemma3")).eval()
    reference = _peft_model("tokens-gemma3").eval()  # the same rows, PEFT's own path
    with torch.no_grad():
        trained = reference(input_ids=ids).logits
        assert torch.equal(model(input_ids=ids).logits[..., 11:], trained[..., 11:])
        torch.testing.assert_close(model(input_ids=ids).logits, trained, rtol=0, atol=TOL * trained.abs().max())
        with model.disable_adapter():
            torch.testing.assert_close(model(input_ids=ids).logits, _base("gemma3")(input_ids=ids).logits, rtol=0,
                                       atol=0)
        model.merge_adapter()
        assert torch.equal(model(input_ids=ids).logits, reference.merge_and_unload()(input_ids=ids).logits)
        model.unmerge_adapter()
        torch.testing.assert_close(model(input_ids=ids).logits, trained, rtol=0, atol=TOL * trained.abs().max())
    model.save_pretrained(tmp_path / "adapter")  # PEFT's own files, loaded by PEFT, accelerated again
    loaded = patch_model(peft.PeftModel.from_pretrained(_base("gemma3"), tmp_path / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, trained, rtol=0, atol=TOL * trained.abs().max())
        # A second adapter on other tokens, and set_adapter: the accelerated layer serves whichever is active.
        model.add_adapter("other", peft.TrainableTokensConfig(token_indices=[20, 21], target_modules=["embed_tokens"]))
        model.set_adapter("other")
        assert model.get_input_embeddings().reserved_ids.tolist() == [20, 21]
        other = model(input_ids=ids).logits
        model.set_adapter("default")
        torch.testing.assert_close(model(input_ids=ids).logits, trained, rtol=0, atol=TOL * trained.abs().max())
        assert not torch.equal(other, trained)
    merged = model.merge_and_unload()
    assert type(merged.get_input_embeddings()).__name__ == "Gemma3TextScaledWordEmbedding"


def test_merge_undoes_the_acceleration_and_frozen_text_reads_peft_s_rows():
    model = patch_model(_peft_model("tokens-gemma3"))
    rows = model.get_input_embeddings().trainable_tokens_delta["default"]
    ordinary = torch.randint(108, 1000, (2, 30), generator=torch.Generator().manual_seed(5))
    text = FrozenText(model, [ordinary])
    text.loss().backward()
    assert rows.grad is not None and rows.grad.abs().sum() > 0
    merge(model)
    assert type(model.get_input_embeddings()).__name__ == "TrainableTokensLayer"
    assert model.get_input_embeddings().trainable_tokens_delta["default"] is rows


def test_a_head_in_modules_to_save_and_other_ids_are_refused():
    with_head = peft.get_peft_model(_base("gemma3"), peft.LoraConfig(target_modules=["q_proj"],
                                                                     trainable_token_indices=TOKENS,
                                                                     modules_to_save=["lm_head"]))
    with pytest.raises(ValueError, match="modules_to_save.*V x D copy of the head"):
        patch_model(with_head)
    with pytest.raises(ValueError, match="trains the tokens"):
        patch_model(_peft_model("tokens-gemma3"), [7, 8, 9, 11])
    from reserved_kernels.models import save_reserved

    with pytest.raises(ValueError, match=r"PEFT's .*peft_model.save_pretrained"):
        save_reserved(patch_model(_peft_model("tokens-gemma3")), "unused-folder")


def _resume_run(out, *, stop=None, resume=None):
    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 24

        def __getitem__(self, i):
            ids = _batch()["input_ids"][i % 3].roll(i)
            return {"input_ids": ids, "labels": ids}

    class StopAt(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if stop and state.global_step >= stop:
                control.should_training_stop = True

    model = patch_model(_peft_model("tokens-gemma3"))
    args = transformers.TrainingArguments(output_dir=str(out), max_steps=6, per_device_train_batch_size=4,
                                          learning_rate=1e-2, save_steps=2, logging_steps=100, report_to=[],
                                          use_cpu=True, seed=0, data_seed=0, disable_tqdm=True)
    transformers.Trainer(model=model, args=args, train_dataset=Data(), callbacks=[StopAt()]).train(
        resume_from_checkpoint=resume)
    return model.get_input_embeddings().trainable_tokens_delta["default"].detach()


def test_trainer_checkpoints_of_the_accelerated_model_resume_exactly(tmp_path):
    whole = _resume_run(tmp_path / "whole")
    _resume_run(tmp_path / "cut", stop=2)
    resumed = _resume_run(tmp_path / "cut", resume=str(tmp_path / "cut" / "checkpoint-2"))
    assert torch.equal(resumed, whole)


def test_trl_sft_trainer_with_peft_trainable_tokens_runs_accelerated(tmp_path):
    trl = pytest.importorskip("trl", reason="needs trl (scripts/test.sh installs it)")
    datasets = pytest.importorskip("datasets", reason="needs datasets (a dependency of trl)")
    from reserved_kernels.vocab import ReservedVocab, default_tokenizer_path

    vocab = ReservedVocab.from_file(default_tokenizer_path())
    vocab.save(tmp_path / "tok")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
    rows = [[2, 7] + _batch()["input_ids"][s % 3, :12].tolist() for s in range(8)]
    args = trl.SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=3, per_device_train_batch_size=4,
                         learning_rate=1e-2, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                         disable_tqdm=True, seed=0)
    trainer = trl.SFTTrainer(model=tiny_gemma("gemma3"), args=args,
                             train_dataset=datasets.Dataset.from_dict({"input_ids": rows}), processing_class=tokenizer,
                             peft_config=peft.LoraConfig(target_modules=["q_proj"], trainable_token_indices=TOKENS))
    patch_model(trainer.model)  # after the trainer: it replaces the model's forward
    layer = trainer.model.get_input_embeddings().token_adapter  # LoRA's wrapper holds PEFT's token layer
    delta = layer.trainable_tokens_delta["default"]
    start = delta.detach().clone()
    trainer.train()
    assert type(layer).__name__ == "FastTrainableTokensLayer"
    assert not torch.equal(delta, start)
    assert [e for e in trainer.state.log_history if "loss" in e]


def test_an_unsupported_head_is_refused_before_anything_is_swapped():
    model = _peft_model("tokens-llama-untied-embedding")
    head = model.get_output_embeddings()
    head.bias = torch.nn.Parameter(torch.zeros(head.out_features))  # a head with a bias: not served
    with pytest.raises(TypeError, match="bias-free nn.Linear head"):
        patch_model(model)
    assert type(model.get_input_embeddings()).__name__ == "TrainableTokensLayer"


@pytest.mark.parametrize("name", ["tokens-gemma3", "tokens-llama-untied-both"])
def test_a_patched_head_follows_the_reserved_head_protocol_and_an_unpatched_one_does_not(name):
    """FrozenText and the position split read a patched head through ReservedHead: PEFT's accelerated layer and
    ReservedLMHead both follow it; the layers before patching do not."""
    from reserved_kernels.models.layout import output_head
    from reserved_kernels.modules import ReservedHead, ReservedLMHead

    model = _peft_model(name)
    assert not isinstance(output_head(model), ReservedHead)
    assert isinstance(output_head(patch_model(model)), ReservedHead)
    ours = patch_model(_base("gemma3"), TOKENS)
    assert isinstance(output_head(ours), ReservedLMHead) and isinstance(output_head(ours), ReservedHead)
