"""The ops' definitions: schemas, fake implementations (shapes for ``torch.compile``) and the autograd
formulas. Which kernel serves each dispatch key is :mod:`reserved_kernels.ops._dispatch`'s."""

from __future__ import annotations

import torch

from reserved_kernels import reference as _reference
from reserved_kernels._table import acc_dtype, table_dtype
from reserved_kernels.ops._checks import check_gather, check_linear_cross_entropy, check_scatter, check_segment_mean

NAMESPACE = "reserved_kernels"
SCHEMAS = {
    "gather": "(Tensor ids, Tensor weight, Tensor reserved_weight, Tensor slot_map, Tensor? weight_scaler, "
              "float scale) -> Tensor",
    "scatter_grad": "(Tensor grad_out, Tensor ids, Tensor slot_map, int num_slots, float scale, "
                    "ScalarType out_dtype) -> Tensor",
    "segment_mean": "(Tensor weight, Tensor reserved_weight, Tensor slot_map, Tensor? weight_scaler, "
                    "Tensor offsets, Tensor src_ids) -> Tensor",
    "linear_cross_entropy": "(Tensor hidden, Tensor weight, Tensor reserved_weight, Tensor slot_map, Tensor targets, "
                            "int ignore_index, float? softcap, int tile_bytes, bool grad_hidden, bool grad_rows, "
                            "bool stats) "
                            "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
}
# The ops csrc/ implements. The fused loss is GEMMs (cuBLAS, MKL) around a per-tile step (Triton, or PyTorch):
# no compiled kernel of ours would run it faster, so the extension leaves it to Python.
COMPILED_OPS = ("gather", "scatter_grad", "segment_mean")
DEVICE_KEYS = {"cpu": "CPU", "cuda": "CUDA"}
FROZEN_TABLE_MESSAGE = (
    "the frozen table (weight) requires grad, but only the K reserved rows of a ReservedEmbedding train: set "
    "weight.requires_grad_(False). (PEFT's modules_to_save=['embed_tokens'] makes a V x D trainable copy of the "
    "table: leave the embedding out of modules_to_save.)")

_DEF = torch.library.Library(NAMESPACE, "DEF")
for _name, _schema in SCHEMAS.items():
    _DEF.define(_name + _schema)

gather = torch.ops.reserved_kernels.gather.default
scatter_grad = torch.ops.reserved_kernels.scatter_grad.default
segment_mean = torch.ops.reserved_kernels.segment_mean.default
linear_cross_entropy = torch.ops.reserved_kernels.linear_cross_entropy.default


# -------------------------------------------------------------------------------------------------- fake

@torch.library.register_fake("reserved_kernels::gather", lib=_DEF)
def _gather_fake(ids, weight, reserved_weight, slot_map, weight_scaler, scale):
    check_gather(ids, weight, reserved_weight, slot_map, weight_scaler)
    return weight.new_empty((*ids.shape, weight.shape[1]), dtype=table_dtype(weight, weight_scaler))


@torch.library.register_fake("reserved_kernels::scatter_grad", lib=_DEF)
def _scatter_grad_fake(grad_out, ids, slot_map, num_slots, scale, out_dtype):
    check_scatter(grad_out, ids, slot_map, num_slots, scale, out_dtype)
    return grad_out.new_empty((num_slots, grad_out.shape[-1]), dtype=out_dtype)


@torch.library.register_fake("reserved_kernels::segment_mean", lib=_DEF)
def _segment_mean_fake(weight, reserved_weight, slot_map, weight_scaler, offsets, src_ids):
    check_segment_mean(weight, reserved_weight, slot_map, weight_scaler, offsets, src_ids)
    dtype = acc_dtype(table_dtype(weight, weight_scaler))
    return weight.new_empty((offsets.shape[0] - 1, weight.shape[1]), dtype=dtype)


@torch.library.register_fake("reserved_kernels::linear_cross_entropy", lib=_DEF)
def _linear_cross_entropy_fake(hidden, weight, reserved_weight, slot_map, targets, ignore_index, softcap, tile_bytes,
                               grad_hidden, grad_rows, stats):
    check_linear_cross_entropy(hidden, weight, reserved_weight, slot_map, targets, ignore_index, softcap, tile_bytes,
                               grad_hidden, grad_rows, stats)
    n, acc = hidden.shape[0], acc_dtype(weight.dtype)
    stat = n if stats else 0
    return (hidden.new_empty(n, dtype=acc), hidden.new_empty(stat, dtype=acc), hidden.new_empty(stat, dtype=torch.bool),
            hidden.new_empty((n if grad_hidden else 0, hidden.shape[1])),
            hidden.new_empty((n if grad_rows else 0, reserved_weight.shape[0]), dtype=acc),
            hidden.new_empty(stat, dtype=acc))


# ----------------------------------------------------------------------------------------------- autograd

def gather_setup_context(ctx, inputs, output):
    ids, weight, reserved_weight, slot_map, weight_scaler, scale = inputs
    if weight.requires_grad:  # only called with gradients enabled and some input requiring grad
        raise RuntimeError(FROZEN_TABLE_MESSAGE)
    ctx.save_for_backward(ids, slot_map)
    ctx.num_slots = reserved_weight.shape[0]
    # d out / d row is the scale rounded to the output dtype, the factor the forward multiplied by.
    ctx.scale = _reference.rounded_scale(scale, table_dtype(weight, weight_scaler))
    ctx.dtype = reserved_weight.dtype


def gather_backward(ctx, grad):
    ids, slot_map = ctx.saved_tensors
    grad_reserved = None
    if ctx.needs_input_grad[2]:
        grad_reserved = scatter_grad(grad, ids, slot_map, ctx.num_slots, ctx.scale, ctx.dtype)
    return None, None, grad_reserved, None, None, None


def linear_cross_entropy_setup_context(ctx, inputs, output):
    (hidden, weight, reserved_weight, slot_map, targets, ignore_index, softcap, tile_bytes, grad_hidden, grad_rows,
     stats) = inputs
    if weight.requires_grad:
        raise RuntimeError(FROZEN_TABLE_MESSAGE)
    for name, wanted, asked in (("hidden", hidden.requires_grad, grad_hidden),
                                ("reserved_weight", reserved_weight.requires_grad, grad_rows)):
        if wanted and not asked:
            raise RuntimeError(f"linear_cross_entropy was called with grad_{'hidden' if name == 'hidden' else 'rows'}"
                               f"=False, but {name} requires grad: the gradients are computed in the forward pass, "
                               "so ask for them there")
    _loss, entropy, is_top1, grad_hidden, grad_reserved, frozen_lse = output
    ctx.mark_non_differentiable(entropy, is_top1, grad_hidden, grad_reserved, frozen_lse)
    ctx.save_for_backward(hidden, targets, grad_hidden, grad_reserved)
    ctx.rows_dtype = reserved_weight.dtype
    ctx.ignore_index = ignore_index


def linear_cross_entropy_backward(ctx, grad_loss, *_):
    """Each token's gradient was computed in the forward pass; only the upstream gradient scales it here.

    An ignored token's gradient is zero whatever comes from upstream: a mean over no token sends an
    infinite upstream gradient, and the unfused path's gradient is zero there, not NaN.
    """
    hidden, targets, grad_hidden, grad_reserved = ctx.saved_tensors
    g = torch.where(targets != ctx.ignore_index, grad_loss, 0).unsqueeze(1)
    d_hidden = d_rows = None
    if ctx.needs_input_grad[0]:
        d_hidden = (grad_hidden.to(g.dtype) * g).to(hidden.dtype)
    if ctx.needs_input_grad[2]:
        d_rows = ((grad_reserved * g).t() @ hidden.to(g.dtype)).to(ctx.rows_dtype)
    return d_hidden, None, d_rows, None, None, None, None, None, None, None, None


