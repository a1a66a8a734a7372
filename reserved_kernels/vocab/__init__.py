"""Tokenizer planning: find the reserved ``<unusedN>`` slots, assign new terms to them, write the renamed tokenizer."""

from reserved_kernels.vocab.planning import (
    PlanEntry,
    PlanError,
    ReservedPlan,
    ReservedVocab,
    default_tokenizer_path,
)

__all__ = ["ReservedVocab", "ReservedPlan", "PlanEntry", "PlanError", "default_tokenizer_path"]
