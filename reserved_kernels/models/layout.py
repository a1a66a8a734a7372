"""Where a model keeps what patching swaps: the model a PEFT wrapper holds, the token table, the output head.

Hugging Face models answer ``get_input_embeddings`` / ``get_output_embeddings``; gemma_pytorch-layout models
keep the table in ``embedder`` (``text_token_embedder`` in Gemma 3's multimodal model) and tie the head to it.
"""

from __future__ import annotations

import sys

from torch import Tensor, nn

EMBEDDER_NAMES = ("embedder", "text_token_embedder")


def base_model(model: nn.Module) -> nn.Module:
    """The model a PEFT wrapper holds (PeftModel -> LoraModel -> the transformers model), else ``model``."""
    if hasattr(model, "get_base_model") and hasattr(model, "peft_config"):
        return model.get_base_model()
    return model


def embedder_name(model: nn.Module) -> str | None:
    """The attribute holding a gemma_pytorch-layout model's token table, or None for another layout."""
    for name in EMBEDDER_NAMES:
        if isinstance(getattr(getattr(model, name, None), "weight", None), Tensor):
            return name
    return None


def is_gemma_pytorch(model: nn.Module) -> bool:
    """A gemma_pytorch-layout causal LM: a token embedder, ``model.layers`` and a ``config``."""
    return (embedder_name(model) is not None and hasattr(getattr(model, "model", None), "layers")
            and hasattr(model, "config"))


def _tokens_layer(module: nn.Module | None) -> nn.Module | None:
    """The layer holding PEFT's trainable tokens inside LoRA's ``TrainableTokensWrapper``, or ``module`` itself."""
    return getattr(module, "token_adapter", module)


def input_embedding(model: nn.Module) -> nn.Module:
    """The token table's module (a :class:`~reserved_kernels.ReservedEmbedding` once patched; PEFT's trainable-tokens
    layer, unwrapped from LoRA's wrapper, where PEFT trains tokens)."""
    base = base_model(model)
    if hasattr(base, "get_input_embeddings"):  # Hugging Face
        return _tokens_layer(base.get_input_embeddings())
    name = embedder_name(base)
    if name is not None:  # gemma_pytorch: `embedder`, or `text_token_embedder` (Gemma 3 multimodal)
        return getattr(base, name)
    raise TypeError(f"{type(model).__name__} has neither get_input_embeddings() (Hugging Face) nor an "
                    "`embedder` / `text_token_embedder` with a weight (gemma_pytorch)")


def set_input_embedding(model: nn.Module, module: nn.Module) -> None:
    base = base_model(model)
    if hasattr(base, "set_input_embeddings"):
        base.set_input_embeddings(module)
    else:
        setattr(base, embedder_name(base), module)


def output_head(model: nn.Module) -> nn.Module | None:
    """A Hugging Face model's output head (``lm_head``, unwrapped as :func:`input_embedding` is), or None
    (gemma_pytorch ties it to the embedder)."""
    base = base_model(model)
    return _tokens_layer(base.get_output_embeddings()) if hasattr(base, "get_output_embeddings") else None


def has_peft_layers(model: nn.Module) -> bool:
    """Whether ``model`` holds PEFT adapter layers (LoRA and the like)."""
    if "peft" not in sys.modules:
        return False
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in model.modules())
