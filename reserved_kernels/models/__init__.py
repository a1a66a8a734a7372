"""Model integration: patch a causal LM so only planned rows train, merge back, keep the rows as a small artifact.

:class:`FrozenText` keeps ordinary text for the exact loss at the current rows at O(K·D) a token, and
:class:`PerplexityCallback` (a ``transformers.TrainerCallback``) watches it during training. :func:`export_gguf`
writes the rows and their tokens into a copy of the model's GGUF, for llama.cpp and Ollama.

Hugging Face Gemma 1/2/3, Llama 3 and Qwen2 (tied or untied heads, PEFT models around them) and
gemma_pytorch-layout models.

At the top, the patching core: :mod:`.patch` (patch_model, merge, freeze_rows), :mod:`.state` (what a patch
keeps), :mod:`.layout` (where a model keeps its table and head), :mod:`.batches` (a batch's parts and targets) and
:mod:`.position_split` (positions no reserved id reaches, run without a backward). Beneath it
:mod:`.integrations` (transformers and TRL, PEFT's trainable tokens, gemma_pytorch, the Trainer callback),
:mod:`.evaluation` (perplexity, FrozenText) and :mod:`.artifacts` (adapters and checkpoints, the GGUF export).
"""

from reserved_kernels.models.artifacts.checkpoint import load_reserved, save_pretrained, save_reserved
from reserved_kernels.models.artifacts.gguf import ExportError, export_gguf
from reserved_kernels.models.evaluation.frozen_text import FrozenText, StaleFrozenText
from reserved_kernels.models.evaluation.perplexity import perplexity, perplexity_change
from reserved_kernels.models.integrations.gemma_pytorch import causal_lm_logits, causal_lm_loss
from reserved_kernels.models.layout import is_gemma_pytorch
from reserved_kernels.models.patch import freeze_rows, merge, patch_model
from reserved_kernels.vocab import UntrainedRows, untrained_rows  # kept here too: rk.models.untrained_rows worked

__all__ = ["patch_model", "merge", "save_pretrained", "save_reserved", "load_reserved", "freeze_rows", "perplexity",
           "perplexity_change", "untrained_rows", "UntrainedRows", "causal_lm_logits", "causal_lm_loss",
           "is_gemma_pytorch", "FrozenText", "StaleFrozenText", "PerplexityCallback", "export_gguf", "ExportError"]


def __getattr__(name: str):
    if name == "PerplexityCallback":  # a transformers.TrainerCallback: transformers is imported only when asked for
        from reserved_kernels.models.integrations.trainer_callback import PerplexityCallback

        return PerplexityCallback
    raise AttributeError(f"module 'reserved_kernels.models' has no attribute {name!r}")
