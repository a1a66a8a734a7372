"""Gemma integration: patch a model so only planned rows train, merge back, keep the rows as a small artifact."""

from reserved_kernels.gemma.patch import load_reserved, merge, patch_model, save_reserved
from reserved_kernels.gemma.perplexity import perplexity, perplexity_change
from reserved_kernels.gemma.tiny import tiny_gemma

__all__ = ["patch_model", "merge", "save_reserved", "load_reserved", "perplexity", "perplexity_change",
           "tiny_gemma"]
