"""Tokenizer planning: find the reserved ``<unusedN>`` slots, assign new terms to them, write the renamed tokenizer;
and :func:`untrained_rows`, which finds the rows of a weight table that were never trained."""

from reserved_kernels.vocab.planning import (
    PlanEntry,
    PlanError,
    ReservedPlan,
    ReservedVocab,
    default_tokenizer_path,
)
from reserved_kernels.vocab.untrained import UntrainedRows, untrained_rows

__all__ = ["ReservedVocab", "ReservedPlan", "PlanEntry", "PlanError", "default_tokenizer_path", "untrained_rows",
           "UntrainedRows"]
