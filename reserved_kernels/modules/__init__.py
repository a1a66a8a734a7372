"""nn.Modules users put in their models."""

from reserved_kernels.modules.embedding import ReservedEmbedding
from reserved_kernels.modules.lm_head import ReservedLMHead

__all__ = ["ReservedEmbedding", "ReservedLMHead"]
