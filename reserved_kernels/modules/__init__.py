"""nn.Modules users put in their models."""

from reserved_kernels.modules.embedding import ReservedEmbedding

__all__ = ["ReservedEmbedding"]
