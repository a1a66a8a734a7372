"""reserved-kernels: train only a handful of token embeddings and pay for those rows alone.

``import reserved_kernels as rk`` gives every public name (``rk.ReservedEmbedding``, ``rk.ReservedVocab``,
``rk.patch_model``, ``rk.pretrained`` …; see ``__all__``). Each is imported on first use, so the command line
answers ``--help`` without importing torch; the custom ops (``torch.ops.reserved_kernels``) are registered
with the first of them, or by ``import reserved_kernels.ops``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> the module that defines it (a module itself where the two are the same)
_EXPORTS = {
    "ReservedEmbedding": "reserved_kernels.modules.embedding",
    "ReservedLMHead": "reserved_kernels.modules.lm_head",
    "reserved_embedding": "reserved_kernels.functional",
    "linear_cross_entropy": "reserved_kernels.functional",
    "mean_init_": "reserved_kernels.functional",
    "build_slot_map": "reserved_kernels.functional",
    "ReservedVocab": "reserved_kernels.vocab",
    "ReservedPlan": "reserved_kernels.vocab",
    "PlanEntry": "reserved_kernels.vocab",
    "PlanError": "reserved_kernels.vocab",
    "default_tokenizer_path": "reserved_kernels.vocab",
    "patch_model": "reserved_kernels.models",
    "merge": "reserved_kernels.models",
    "save_pretrained": "reserved_kernels.models",
    "save_reserved": "reserved_kernels.models",
    "load_reserved": "reserved_kernels.models",
    "freeze_rows": "reserved_kernels.models",
    "perplexity": "reserved_kernels.models",
    "perplexity_change": "reserved_kernels.models",
    "FrozenText": "reserved_kernels.models",
    "StaleFrozenText": "reserved_kernels.models",
    "PerplexityCallback": "reserved_kernels.models",
    "untrained_rows": "reserved_kernels.vocab",
    "UntrainedRows": "reserved_kernels.vocab",
    "causal_lm_logits": "reserved_kernels.models",
    "causal_lm_loss": "reserved_kernels.models",
    "is_gemma_pytorch": "reserved_kernels.models",
    "export_gguf": "reserved_kernels.models",
    "ExportError": "reserved_kernels.models",
    "pretrained": "reserved_kernels.pretrained",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'reserved_kernels' has no attribute {name!r}")
    module = importlib.import_module(module_name)
    value = module if module_name.endswith("." + name) else getattr(module, name)
    globals()[name] = value  # later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # what a type checker and an IDE see; at run time __getattr__ imports on first use
    from reserved_kernels import pretrained
    from reserved_kernels.functional import build_slot_map, linear_cross_entropy, mean_init_, reserved_embedding
    from reserved_kernels.models import (
        ExportError,
        FrozenText,
        PerplexityCallback,
        StaleFrozenText,
        causal_lm_logits,
        causal_lm_loss,
        export_gguf,
        freeze_rows,
        is_gemma_pytorch,
        load_reserved,
        merge,
        patch_model,
        perplexity,
        perplexity_change,
        save_pretrained,
        save_reserved,
    )
    from reserved_kernels.modules.embedding import ReservedEmbedding
    from reserved_kernels.modules.lm_head import ReservedLMHead
    from reserved_kernels.vocab import (
        PlanEntry,
        PlanError,
        ReservedPlan,
        ReservedVocab,
        UntrainedRows,
        default_tokenizer_path,
        untrained_rows,
    )
