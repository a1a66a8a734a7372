"""Training and scoring gemma_pytorch-layout models (``GemmaForCausalLM`` with an ``embedder``).

gemma_pytorch's own ``forward`` is inference only: it runs under ``torch.no_grad``, needs kv caches and
masks, and its sampler multiplies by ``embedder.weight`` (dequantised whole for int8), so a patched
model's output head would never see the trained rows. :func:`causal_lm_logits` runs the same modules —
the embedder, the √D normaliser, ``model.model`` (decoder layers and final norm) with fresh kv caches,
the causal and sliding-window masks its ``generate`` builds, the tied head and Gemma 2's logit
soft-capping — differentiably, over every position, with the tied head reading the trained rows.

The layout, read from the model itself: ``embedder`` (``text_token_embedder`` in Gemma 3's multimodal
model) with ``weight`` (and ``weight_scaler`` when ``config.quant``); ``model.layers`` whose items have
an ``attn_type`` (an enum with ``GLOBAL`` / ``LOCAL_SLIDING`` members) and ``model.norm``; rotary tables
``freqs_cis`` (Gemma 1/2) or ``local_freqs_cis`` / ``global_freqs_cis`` (Gemma 3); ``config`` with
``hidden_size``, ``num_key_value_heads``, ``head_dim``, ``sliding_window_size`` and
``final_logit_softcapping``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from reserved_kernels._table import dequantised
from reserved_kernels.functional import build_slot_map, linear_cross_entropy, reduced_loss, reserved_logits
from reserved_kernels.models import position_split
from reserved_kernels.models.batches import config_softcap, default_labels, shifted_targets
from reserved_kernels.models.layout import embedder_name, is_gemma_pytorch
from reserved_kernels.models.state import patch_state
from reserved_kernels.modules.embedding import ReservedEmbedding

# gemma_pytorch's additive mask value (its generate() fills masked positions with this).
MASKED = -2.3819763e38


def _rotary_tables(model: nn.Module, positions: Tensor) -> dict:
    """The ``freqs_cis`` mapping gemma_pytorch's decoder expects: attention type -> rotary rows for ``positions``."""
    tables = {}
    for layer in model.model.layers:
        kind = layer.attn_type
        if kind in tables:
            continue
        if hasattr(model, "local_freqs_cis"):  # Gemma 3: one table per attention type
            source = model.local_freqs_cis if getattr(kind, "name", "") == "LOCAL_SLIDING" else model.global_freqs_cis
        else:
            source = model.freqs_cis
        tables[kind] = source.index_select(0, positions)
    return tables


def _masks(config, length: int, device: torch.device) -> tuple[Tensor, Tensor | None]:
    """The causal mask and the sliding-window one, additive float32, as gemma_pytorch's ``generate`` builds them."""
    mask = torch.triu(torch.full((1, 1, length, length), MASKED, device=device), diagonal=1)
    window = getattr(config, "sliding_window_size", None)
    local = None
    if window:
        local = mask + torch.tril(torch.full((1, 1, length, length), MASKED, device=device), diagonal=-window)
    return mask, local


class _Decoder:
    """The decoder of a gemma_pytorch-layout model over runs of positions of ``input_ids`` (B, T), differentiable:
    the :class:`~reserved_kernels.models.position_split.BodyRunner` of this layout. Each call gets kv caches of all T
    positions (fresh, or a prefix's, which it extends) and the rows of the causal and sliding-window masks of its
    positions, as gemma_pytorch's ``generate`` decodes: a run's queries see the cached keys before it and its own."""

    def __init__(self, model: nn.Module, input_ids: Tensor):
        if not is_gemma_pytorch(model):
            raise TypeError(f"{type(model).__name__} is not a gemma_pytorch-layout model (an `embedder` or "
                            "`text_token_embedder`, `model.layers` and a `config`)")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
        self.model, self.input_ids = model, input_ids
        self.length = input_ids.shape[1]
        self.mask, self.local_mask = _masks(model.config, self.length, input_ids.device)

    def _caches(self, batch: int, like: Tensor) -> list[tuple[Tensor, Tensor]]:
        config = self.model.config
        shape = (batch, self.length, config.num_key_value_heads, config.head_dim)
        return [(like.new_zeros(shape), like.new_zeros(shape)) for _ in self.model.model.layers]

    def _run(self, ids: Tensor, start: int, caches: list | None) -> tuple[Tensor, list]:
        """(final hidden states of ``ids`` standing at positions ``start...``, the caches they were written into)."""
        model, config = self.model, self.model.config
        stop = start + ids.shape[1]
        positions = torch.arange(start, stop, device=ids.device)
        hidden = getattr(model, embedder_name(model))(ids)
        hidden = hidden * torch.tensor(config.hidden_size ** 0.5, dtype=hidden.dtype, device=hidden.device)
        caches = self._caches(ids.shape[0], hidden) if caches is None else caches
        local = self.local_mask[:, :, start:stop] if self.local_mask is not None else None
        out = model.model(hidden_states=hidden, freqs_cis=_rotary_tables(model, positions), kv_write_indices=positions,
                          kv_caches=caches, mask=self.mask[:, :, start:stop], local_mask=local)
        return out, caches

    def whole(self, rows: Tensor | None = None) -> Tensor:
        """(B, T, D) final hidden states of ``rows`` (every row when None) at every position."""
        ids = self.input_ids if rows is None else self.input_ids.index_select(0, rows)
        return self._run(ids, 0, None)[0]

    def prefix(self, rows: Tensor, stop: int) -> tuple[Tensor, list]:
        return self._run(self.input_ids.index_select(0, rows)[:, :stop], 0, None)

    def suffix(self, rows: Tensor, start: int, prefix: list) -> Tensor:
        return self._run(self.input_ids.index_select(0, rows)[:, start:], start, prefix)[0]


def decoder_states(model: nn.Module, input_ids: Tensor) -> Tensor:
    """(B, T, D) final hidden states of a gemma_pytorch-layout model over every position, differentiable."""
    return _Decoder(model, input_ids).whole()


def tied_table(model: nn.Module) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(table, trained rows, their ids, slot map) of the tied head: the float table (dequantised whole for
    int8, as gemma_pytorch's sampler does, but never written) and the rows as the forward pass sees them."""

    embedder = getattr(model, embedder_name(model))
    table = embedder.weight.detach()
    scaler = getattr(embedder, "weight_scaler", None)
    if scaler is not None and not table.is_floating_point():
        table = dequantised(table, scaler.detach())
    if isinstance(embedder, ReservedEmbedding):
        return table, embedder.reserved_weight, embedder.reserved_ids, embedder.slot_map
    ids = torch.empty(0, dtype=torch.int64, device=table.device)
    return table, table.new_empty(0, table.shape[1]), ids, build_slot_map(ids, table.shape[0], table.device)


def causal_lm_logits(model: nn.Module, input_ids: Tensor) -> Tensor:
    """(B, T, V) logits of a gemma_pytorch-layout model at every position, differentiable.

    A patched model (:func:`reserved_kernels.models.patch_model`) trains only its reserved rows here:
    the input side through the fused gather, the tied output head through the merged-table logits.
    To train, prefer :func:`causal_lm_loss`, which never builds these logits.
    """
    hidden = decoder_states(model, input_ids)
    table, rows, ids, _ = tied_table(model)
    return reserved_logits(hidden, table, rows, ids, softcap=config_softcap(model))


def causal_lm_loss(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None, *,
                   reduction: str = "mean") -> Tensor:
    """Next-token cross-entropy of a gemma_pytorch-layout model over ``input_ids`` (masked positions skipped).

    The tied head's loss goes through :func:`reserved_kernels.linear_cross_entropy` (with the config's
    final soft-cap): no (B, T, V) logits, and a patched model's rows get their K x D gradient.
    ``reduction`` is "mean" over the predicted tokens, or "sum".

    Positions no reserved id reaches run without a backward (:mod:`reserved_kernels.models.position_split`): rows
    without one, and each row's positions before its first one (the rest of the row then reads their kv
    caches). The attention mask only removes targets here (gemma_pytorch's attention has no padding mask), so
    every row can be split. One host read of the ids a step.
    """

    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    decoder = _Decoder(model, input_ids)
    targets = shifted_targets(default_labels(input_ids, attention_mask))
    table, rows, _, slot_map = tied_table(model)
    softcap = config_softcap(model)

    def loss_sum(hidden: Tensor, part_targets: Tensor) -> Tensor:
        return linear_cross_entropy(hidden, table, rows, slot_map, part_targets, ignore_index=-100, softcap=softcap,
                                    reduction="sum")

    plan = None
    if position_split.skip_unavailable(model) is None:
        plan = position_split.SplitPlan.of(position_split.split_points(input_ids, slot_map, None), input_ids.shape[1])
    if plan is None:
        total = loss_sum(decoder.whole(), targets)
    else:
        parts = position_split.split_hidden(plan, decoder, input_ids.device)
        trainable = position_split.in_slots(patch_state(model).row_slots)
        total = position_split.summed_loss(parts, targets, loss_sum, trainable)
    return reduced_loss(total, targets, reduction=reduction)
