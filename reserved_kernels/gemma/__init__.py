"""Gemma integration: the model-integration names (``reserved_kernels.models``) plus Gemma's tiny test models."""

from reserved_kernels.gemma.tiny import tiny_gemma
from reserved_kernels.models import (
    UntrainedRows,
    causal_lm_logits,
    causal_lm_loss,
    freeze_rows,
    is_gemma_pytorch,
    load_reserved,
    merge,
    patch_model,
    perplexity,
    perplexity_change,
    save_reserved,
    untrained_rows,
)

__all__ = ["patch_model", "merge", "save_reserved", "load_reserved", "freeze_rows", "perplexity",
           "perplexity_change", "untrained_rows", "UntrainedRows", "causal_lm_logits", "causal_lm_loss",
           "is_gemma_pytorch", "tiny_gemma"]
