"""Trained rows as every reader returns them, before they meet a model or a file."""

from __future__ import annotations

import dataclasses

from torch import Tensor

from reserved_kernels.vocab.planning import ReservedPlan


@dataclasses.dataclass(frozen=True)
class ReservedRows:
    """The K trained rows a reader found, exactly as trained.

    Read from a PEFT trainable-tokens adapter (:func:`~.adapter.read_adapter`), a patched model's checkpoint or a
    ``.pt`` file of earlier releases (:func:`~.checkpoint.load_reserved`), a folder without a model or a patched
    model (:class:`~.gguf.ExportRows`)."""

    ids: list[int]  # the reserved ids, row k for ids[k]
    rows: Tensor  # (K, D): the embedding's rows (float32 master rows of a 16-bit table as they were)
    head_rows: Tensor | None  # an untied head's own (K, D) rows; None where the head is tied
    plan: ReservedPlan | None  # the plan saved beside them, where there is one
    table_shape: tuple[int, int] | None  # (V, D) of the table they were trained in, where the file says
    source: str  # where they came from, for messages
