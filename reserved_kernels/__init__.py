"""reserved-kernels: train only a handful of token embeddings and pay for those rows alone."""

__version__ = "0.1.0"

from reserved_kernels import ops as _ops  # noqa: F401  (registers the torch.library ops)
from reserved_kernels.functional import build_slot_map, linear_cross_entropy, mean_init_, reserved_embedding
from reserved_kernels.modules.embedding import ReservedEmbedding
from reserved_kernels.modules.lm_head import ReservedLMHead

__all__ = [
    "ReservedEmbedding",
    "ReservedLMHead",
    "reserved_embedding",
    "linear_cross_entropy",
    "mean_init_",
    "build_slot_map",
    "__version__",
]
