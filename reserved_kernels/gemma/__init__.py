"""Gemma integration: patch a model so only planned rows train, merge back, keep the rows as a small artifact."""

from reserved_kernels.gemma.gemma_pytorch import causal_lm_logits, causal_lm_loss, is_gemma_pytorch
from reserved_kernels.gemma.patch import freeze_rows, load_reserved, merge, patch_model, save_reserved
from reserved_kernels.gemma.perplexity import perplexity, perplexity_change
from reserved_kernels.gemma.tiny import tiny_gemma

__all__ = ["patch_model", "merge", "save_reserved", "load_reserved", "freeze_rows", "perplexity",
           "perplexity_change", "causal_lm_logits", "causal_lm_loss", "is_gemma_pytorch", "tiny_gemma"]
