"""Did held-out text get worse: :func:`.perplexity` (any model, any batch) and :class:`.FrozenText` (ordinary
text kept for the exact loss at the current rows, at O(K·D) a token)."""
