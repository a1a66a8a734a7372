"""A tiny random Gemma-architecture model for the demo and the tests (matches the embedded tokenizer)."""

from __future__ import annotations

import torch
from torch import nn

TINY = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=32, pad_token_id=0, eos_token_id=1, bos_token_id=2,
            max_position_embeddings=256)


def tiny_gemma(variant: str = "gemma", *, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> nn.Module:
    """A randomly initialised ``GemmaForCausalLM`` (``variant="gemma"``), ``Gemma2ForCausalLM`` or ``Gemma3ForCausalLM``.

    Needs ``transformers``; the layout (ids 0-107) is that of the embedded tokenizer.
    """
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
    config = config_cls(**{**TINY, **extra, **overrides}, tie_word_embeddings=True)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return model_cls(config).to(dtype).eval()
