"""Tokenizers and tiny random models in Gemma's, Llama 3's and Qwen2's layouts, built in the tests (no download).

* Gemma 1/2/3: :func:`tiny_gemma`, whose ids 0-107 follow the embedded tokenizer's layout.

* Llama 3: a byte-level BPE ``tokenizer.json`` whose added tokens interleave used specials
  (``<|begin_of_text|>``, ``<|start_header_id|>``, ``<|eot_id|>`` …) with ``<|reserved_special_token_N|>``
  tokens, BOS added by the post-processor; the model's reserved rows are near zero, as in the release.
* Qwen2: a byte-level BPE with three specials and fewer tokens than the model has rows; the spare
  rows all keep one initial value.
"""

from __future__ import annotations

import json
import os

import torch

TEXT = ("The model trains every row, then stops. Le réseau mesure 4096 tokens; 東京 data — twice! "
        "A short summary of the text, and a translation into another language. ")
LLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                  "<|reserved_special_token_1|>", "<|start_header_id|>", "<|end_header_id|>",
                  "<|reserved_special_token_2|>", "<|eot_id|>"] + [
                      f"<|reserved_special_token_{i}|>" for i in range(3, 8)]
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _byte_level_bpe(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([TEXT] * 40, trainer)
    return tok


def llama3_tokenizer(folder) -> str:
    """A Llama 3-layout tokenizer folder (tokenizer.json + tokenizer_config.json); returns the json path."""
    from tokenizers import AddedToken, processors

    tok = _byte_level_bpe(400)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA_SPECIALS])
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", bos)])
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "tokenizer.json")
    tok.save(path)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(dict(tokenizer_class="PreTrainedTokenizerFast", bos_token="<|begin_of_text|>",
                       eos_token="<|end_of_text|>", model_max_length=512), f)
    return path


def qwen2_tokenizer(folder) -> str:
    """A Qwen2-layout tokenizer folder: its size is below the model's rows."""
    from tokenizers import AddedToken

    tok = _byte_level_bpe(400)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIALS])
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "tokenizer.json")
    tok.save(path)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(dict(tokenizer_class="PreTrainedTokenizerFast", eos_token="<|im_end|>", pad_token="<|endoftext|>",
                       model_max_length=512), f)
    return path


def _tiny(family: str, vocab_size: int, tied: bool, seed: int):
    """A random two-layer model of ``family`` ("llama" or "qwen2") and its distinct tables (input, output)."""
    import transformers

    config_cls, model_cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                             "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[family]
    torch.manual_seed(seed)
    config = config_cls(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                        tie_word_embeddings=tied)
    config._attn_implementation = "eager"
    model = model_cls(config).eval()
    tables = {id(t): t for t in (model.get_input_embeddings().weight, model.get_output_embeddings().weight)}
    return model, list(tables.values())


def tiny_llama(vocab_size: int, *, tied: bool, reserved_ids=(), seed: int = 0):
    """A random ``LlamaForCausalLM``; the rows of ``reserved_ids`` near zero (input and, untied, output)."""
    model, tables = _tiny("llama", vocab_size, tied, seed)
    with torch.no_grad():
        for table in tables:
            table[list(reserved_ids)] = 1e-6 * torch.randn(len(reserved_ids), 64)
    return model


def tiny_qwen2(vocab_size: int, tokenizer_size: int, *, tied: bool = False, seed: int = 0):
    """A random ``Qwen2ForCausalLM`` with ``vocab_size`` rows; those past ``tokenizer_size`` share one value."""
    model, tables = _tiny("qwen2", vocab_size, tied, seed)
    with torch.no_grad():
        for table in tables:
            table[tokenizer_size:] = table[tokenizer_size].clone()
    return model


GEMMA = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, head_dim=32, pad_token_id=0, eos_token_id=1, bos_token_id=2,
             max_position_embeddings=256)


def tiny_gemma(variant: str = "gemma", *, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A random ``GemmaForCausalLM`` (``variant="gemma"``), ``Gemma2ForCausalLM`` (final soft-cap 30) or
    ``Gemma3ForCausalLM``; tied, eager attention, in eval mode."""
    import transformers

    config_cls, model_cls = {
        "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM),
        "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
        "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM),
    }[variant]
    extra = {}
    if variant in ("gemma2", "gemma3"):
        extra = dict(sliding_window=64, final_logit_softcapping=30.0 if variant == "gemma2" else None,
                     query_pre_attn_scalar=32)
    config = config_cls(**{**GEMMA, **extra, **overrides}, tie_word_embeddings=True)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return model_cls(config).to(dtype).eval()
