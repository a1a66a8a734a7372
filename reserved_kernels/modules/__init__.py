"""nn.Modules users put in their models, and the protocol a patched output head follows."""

from reserved_kernels.modules.embedding import ReservedEmbedding
from reserved_kernels.modules.lm_head import ReservedHead, ReservedLMHead

__all__ = ["ReservedEmbedding", "ReservedLMHead", "ReservedHead"]
