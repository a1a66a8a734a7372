"""The four public ops, defined once: schema, fake implementation, and the kernel behind each dispatch key.

* ``reserved_kernels::gather(ids, weight, reserved_weight, slot_map, weight_scaler, scale)`` —
  ``out[n] = cast(scale * row(ids[n]))`` in the table dtype; differentiable in ``reserved_weight``.
* ``reserved_kernels::scatter_grad(grad_out, ids, slot_map, num_slots, scale, out_dtype)`` —
  ``grad[k] = scale * Σ grad_out[n]`` over the tokens whose id has slot ``k``; a (K, D) tensor of
  ``out_dtype``, bitwise repeatable run to run whatever the id distribution.
* ``reserved_kernels::segment_mean(weight, reserved_weight, slot_map, weight_scaler, offsets, src_ids)`` —
  ``out[k] = mean(row(src_ids[offsets[k]:offsets[k+1]]))``, (K, D) in float32 (float64 for a float64 table).
* ``reserved_kernels::linear_cross_entropy(hidden, weight, reserved_weight, slot_map, targets, ignore_index,
  softcap, tile_bytes, compute_grad, stats)`` — each token's cross-entropy over the merged table's
  (soft-capped) logits, never building them (see :mod:`reserved_kernels.fused_loss`), with
  its entropy and whether the target is the top token (``stats``) and, when ``compute_grad``, each
  token's gradients, computed in the forward pass; differentiable in ``hidden`` and ``reserved_weight``.

``row(i)`` is ``reserved_weight[slot_map[i]]`` rounded to the table dtype when ``slot_map[i] >= 0``,
else ``weight[i]`` (times ``weight_scaler[i]`` for an int8 table, gemma_pytorch's layout). The table
dtype is ``weight``'s, or ``weight_scaler``'s for an int8 table; ``reserved_weight`` has the table dtype
or float32 (fp32 master rows of a 16-bit table).

Who serves each dispatch key is decided here, once, at import: the compiled extension registers CPU,
CUDA and Autograd kernels in C++ (``csrc/``) for the three embedding ops where it is built; every key it
leaves open gets a Python implementation below (the reference on CPU, Triton — else the reference — on
CUDA, the autograd formula). :func:`use` and :func:`forced` (or ``RESERVED_KERNELS_BACKEND`` at import)
register another backend's kernels over those defaults; :func:`active` says which backend serves a
device now. :mod:`reserved_kernels._backend` only says which backends exist; it does not import this
module.

Ids are validated without a host-device synchronisation: on CPU an out-of-range id raises IndexError
naming the value and the range; on CUDA a device-side assertion fires. The backward never re-validates.
``set_strict_id_checks(True)`` (or ``RESERVED_KERNELS_STRICT_IDS=1``) adds a synchronous check that raises
IndexError on CUDA too, for debugging.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

import torch
from torch import Tensor

from reserved_kernels import _backend
from reserved_kernels import reference as _reference
from reserved_kernels._table import acc_dtype, table_dtype

NAMESPACE = "reserved_kernels"
SCHEMAS = {
    "gather": "(Tensor ids, Tensor weight, Tensor reserved_weight, Tensor slot_map, Tensor? weight_scaler, "
              "float scale) -> Tensor",
    "scatter_grad": "(Tensor grad_out, Tensor ids, Tensor slot_map, int num_slots, float scale, "
                    "ScalarType out_dtype) -> Tensor",
    "segment_mean": "(Tensor weight, Tensor reserved_weight, Tensor slot_map, Tensor? weight_scaler, "
                    "Tensor offsets, Tensor src_ids) -> Tensor",
    "linear_cross_entropy": "(Tensor hidden, Tensor weight, Tensor reserved_weight, Tensor slot_map, Tensor targets, "
                            "int ignore_index, float? softcap, int tile_bytes, bool compute_grad, bool stats) "
                            "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
}
# The ops csrc/ implements. The fused loss is GEMMs (cuBLAS, MKL) around a per-tile step (Triton, or PyTorch):
# no compiled kernel of ours would run it faster, so the extension leaves it to Python.
COMPILED_OPS = ("gather", "scatter_grad", "segment_mean")
DEVICE_KEYS = {"cpu": "CPU", "cuda": "CUDA"}
STRICT_ENV_VAR = "RESERVED_KERNELS_STRICT_IDS"
FROZEN_TABLE_MESSAGE = (
    "the frozen table (weight) requires grad, but only the K reserved rows of a ReservedEmbedding train: set "
    "weight.requires_grad_(False). (PEFT's modules_to_save=['embed_tokens'] makes a V x D trainable copy of the "
    "table: leave the embedding out of modules_to_save.)")

_INDEX_DTYPES = (torch.int32, torch.int64)
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

_DEF = torch.library.Library(NAMESPACE, "DEF")
for _name, _schema in SCHEMAS.items():
    _DEF.define(_name + _schema)

gather = torch.ops.reserved_kernels.gather.default
scatter_grad = torch.ops.reserved_kernels.scatter_grad.default
segment_mean = torch.ops.reserved_kernels.segment_mean.default
linear_cross_entropy = torch.ops.reserved_kernels.linear_cross_entropy.default


# ------------------------------------------------------------------------------------------------ checks
# The same checks, with the same messages, as csrc/common.h: shapes and dtypes only, never device memory.

def _check_same_device(**tensors: Tensor | None) -> None:
    present = {k: t for k, t in tensors.items() if t is not None}
    if len({t.device for t in present.values()}) > 1:
        listing = ", ".join(f"{k} on {t.device}" for k, t in present.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def _check_index_dtype(ids: Tensor, name: str) -> None:
    if not isinstance(ids, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dtype not in _INDEX_DTYPES:
        raise TypeError(f"{name} must be an int32 or int64 tensor, got {ids.dtype}")


def check_table(weight: Tensor, reserved_weight: Tensor, slot_map: Tensor, weight_scaler: Tensor | None) -> None:
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (V, D), got shape {tuple(weight.shape)}")
    if reserved_weight.dim() != 2 or reserved_weight.shape[1] != weight.shape[1]:
        raise ValueError(f"reserved_weight must be (K, {weight.shape[1]}), got shape {tuple(reserved_weight.shape)}")
    if reserved_weight.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"reserved_weight must be floating point, got {reserved_weight.dtype}")
    if weight_scaler is not None:
        if weight.dtype != torch.int8:
            raise TypeError(f"weight_scaler is for an int8 table, but weight is {weight.dtype}")
        if weight_scaler.shape != (weight.shape[0],) or weight_scaler.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"weight_scaler must be a floating ({weight.shape[0]},) vector, "
                             f"got {weight_scaler.dtype} {tuple(weight_scaler.shape)}")
    elif weight.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"an integer table ({weight.dtype}) needs weight_scaler (per-row scales)")
    dtype = table_dtype(weight, weight_scaler)
    if reserved_weight.dtype not in (dtype, torch.float32):
        raise TypeError(f"reserved_weight must have the table's dtype ({dtype}) or float32, got {reserved_weight.dtype}")
    if slot_map.dtype != torch.int32 or slot_map.shape != (weight.shape[0],):
        raise ValueError(f"slot_map must be an int32 ({weight.shape[0]},) vector, got {slot_map.dtype} "
                         f"{tuple(slot_map.shape)}")
    for name, t in (("weight", weight), ("reserved_weight", reserved_weight), ("slot_map", slot_map),
                    ("weight_scaler", weight_scaler)):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    _check_same_device(weight=weight, reserved_weight=reserved_weight, slot_map=slot_map, weight_scaler=weight_scaler)


def check_gather(ids, weight, reserved_weight, slot_map, weight_scaler, scale=1.0) -> None:
    _check_index_dtype(ids, "ids")
    check_table(weight, reserved_weight, slot_map, weight_scaler)
    _check_same_device(ids=ids, weight=weight)


def check_scatter(grad_out, ids, slot_map, num_slots, scale, out_dtype) -> None:
    _check_index_dtype(ids, "ids")
    if grad_out.shape[:-1] != ids.shape or grad_out.dim() != ids.dim() + 1:
        raise ValueError(f"grad_out must have shape ids.shape + (D,) = {tuple(ids.shape)} + (D,), "
                         f"got {tuple(grad_out.shape)}")
    if grad_out.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"grad_out must be floating point, got {grad_out.dtype}")
    if out_dtype not in _FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be floating point, got {out_dtype}")
    if slot_map.dtype != torch.int32 or slot_map.dim() != 1:
        raise ValueError(f"slot_map must be an int32 vector, got {slot_map.dtype} of shape {tuple(slot_map.shape)}")
    if num_slots < 0:
        raise ValueError(f"num_slots must be >= 0, got {num_slots}")
    if ids.numel() >= 2**31:
        raise ValueError(f"scatter_grad supports fewer than 2**31 tokens, got {ids.numel()}")
    _check_same_device(grad_out=grad_out, ids=ids, slot_map=slot_map)


def check_segment_mean(weight, reserved_weight, slot_map, weight_scaler, offsets, src_ids) -> None:
    check_table(weight, reserved_weight, slot_map, weight_scaler)
    _check_index_dtype(src_ids, "src_ids")
    if src_ids.dim() != 1:
        raise ValueError(f"src_ids must be 1-D, got shape {tuple(src_ids.shape)}")
    if offsets.dtype != torch.int64 or offsets.dim() != 1 or offsets.shape[0] < 1:
        raise ValueError(f"offsets must be a non-empty int64 vector, got {offsets.dtype} of shape {tuple(offsets.shape)}")
    _check_same_device(weight=weight, offsets=offsets, src_ids=src_ids)


def check_linear_cross_entropy(hidden, weight, reserved_weight, slot_map, targets, ignore_index, softcap, tile_bytes,
                               compute_grad, stats) -> None:
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be 2-D (N, D), got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"weight must be a floating (V, D) table, got {weight.dtype} of shape {tuple(weight.shape)}")
    if hidden.dtype != weight.dtype or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden ({hidden.dtype}, D={hidden.shape[1]}) must have the table's dtype and width "
                         f"({weight.dtype}, D={weight.shape[1]})")
    check_table(weight, reserved_weight, slot_map, None)
    _check_index_dtype(targets, "targets")
    if targets.shape != (hidden.shape[0],):
        raise ValueError(f"targets must have shape ({hidden.shape[0]},), one per row of hidden, got {tuple(targets.shape)}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0 or None, got {softcap}")
    if tile_bytes < 1:
        raise ValueError(f"tile_bytes must be >= 1, got {tile_bytes}")
    _check_same_device(hidden=hidden, weight=weight, targets=targets)


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
                               compute_grad, stats):
    check_linear_cross_entropy(hidden, weight, reserved_weight, slot_map, targets, ignore_index, softcap, tile_bytes,
                               compute_grad, stats)
    n, acc = hidden.shape[0], acc_dtype(weight.dtype)
    stat = n if stats else 0
    grad = n if compute_grad else 0
    return (hidden.new_empty(n, dtype=acc), hidden.new_empty(stat, dtype=acc), hidden.new_empty(stat, dtype=torch.bool),
            hidden.new_empty((grad, hidden.shape[1])), hidden.new_empty((grad, reserved_weight.shape[0]), dtype=acc))


# ---------------------------------------------------------------------------------- Python implementations

_CHECKS = {"gather": check_gather, "scatter_grad": check_scatter, "segment_mean": check_segment_mean,
           "linear_cross_entropy": check_linear_cross_entropy}


def _checked(name: str, fn: Callable) -> Callable:
    """``fn`` (a backend's implementation of op ``name``) after the op's argument checks."""
    check = _CHECKS[name]

    def impl(*args):
        check(*args)
        return fn(*args)

    return impl


def _triton(name: str) -> Callable:
    """Triton's launcher for ``name``, imported on first call (importing Triton costs about a second)."""
    loaded: list[Callable] = []

    def call(*args):
        if not loaded:
            from reserved_kernels.triton import launchers

            loaded.append(getattr(launchers, name))
        return loaded[0](*args)

    return call


def _unavailable(backend: str, name: str, device_type: str, why: str) -> Callable:
    def raise_(*args):
        raise _backend.BackendUnavailableError(
            f"{_backend.ENV_VAR}={backend} is forced but cannot run {name} on {device_type} tensors: {why}")

    return raise_


def _python_impl(backend: str, name: str, device_type: str) -> Callable:
    """``backend``'s implementation of op ``name`` for ``device_type`` tensors, checks included; for a backend
    that cannot run them (or an unknown name) one that raises, with the reason, at the call."""
    if backend not in _backend.BACKENDS:
        return _unavailable(backend, name, device_type, f"not a backend; expected one of {_backend.BACKENDS}")
    if backend == "compiled" and name not in COMPILED_OPS:
        return _unavailable(backend, name, device_type, "the compiled extension has no kernel for it (it runs on "
                            "'torch' or 'triton')")
    ok, why = _backend.availability(backend, device_type)
    if not ok:
        return _unavailable(backend, name, device_type, why)
    if backend == "triton":
        return _checked(name, _triton(name))
    return _checked(name, getattr(_reference, name))


# ----------------------------------------------------------------------------------------------- autograd

def _gather_setup_context(ctx, inputs, output):
    ids, weight, reserved_weight, slot_map, weight_scaler, scale = inputs
    if weight.requires_grad:  # only called with gradients enabled and some input requiring grad
        raise RuntimeError(FROZEN_TABLE_MESSAGE)
    ctx.save_for_backward(ids, slot_map)
    ctx.num_slots = reserved_weight.shape[0]
    # d out / d row is the scale rounded to the output dtype, the factor the forward multiplied by.
    ctx.scale = _reference.rounded_scale(scale, table_dtype(weight, weight_scaler))
    ctx.dtype = reserved_weight.dtype


def _gather_backward(ctx, grad):
    ids, slot_map = ctx.saved_tensors
    grad_reserved = None
    if ctx.needs_input_grad[2]:
        grad_reserved = scatter_grad(grad, ids, slot_map, ctx.num_slots, ctx.scale, ctx.dtype)
    return None, None, grad_reserved, None, None, None


def _linear_cross_entropy_setup_context(ctx, inputs, output):
    hidden, weight, reserved_weight, slot_map, targets, ignore_index, softcap, tile_bytes, compute_grad, stats = inputs
    if weight.requires_grad:
        raise RuntimeError(FROZEN_TABLE_MESSAGE)
    if not compute_grad:
        raise RuntimeError("linear_cross_entropy was called with compute_grad=False, but hidden or reserved_weight "
                           "requires grad: the gradients are computed in the forward pass, so ask for them there")
    _loss, entropy, is_top1, grad_hidden, grad_reserved = output
    ctx.mark_non_differentiable(entropy, is_top1, grad_hidden, grad_reserved)
    ctx.save_for_backward(hidden, targets, grad_hidden, grad_reserved)
    ctx.rows_dtype = reserved_weight.dtype
    ctx.ignore_index = ignore_index


def _linear_cross_entropy_backward(ctx, grad_loss, *_):
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
    return d_hidden, None, d_rows, None, None, None, None, None, None, None


# ------------------------------------------------------------------------------------------- registration

# Keys the compiled extension serves, read before any Python kernel is registered next to them.
_EXTENSION_KEYS = _backend.extension_kernels()


def _extension_serves(device_type: str) -> bool:
    """Whether the compiled extension registered a kernel for each of its ops on ``device_type`` tensors."""
    return all((name, DEVICE_KEYS[device_type]) in _EXTENSION_KEYS for name in COMPILED_OPS)


def _python_default(device_type: str) -> str:
    """The Python backend for the keys the extension leaves open: Triton on CUDA where importable, else torch."""
    return "triton" if device_type == "cuda" and _backend.triton_status()[0] else "torch"


def default_backend(device_type: str, op: str = "gather") -> str:
    """The backend chosen at import for op ``op`` on ``device_type`` tensors."""
    if op in COMPILED_OPS and _extension_serves(device_type):
        return "compiled"
    return _python_default(device_type)


_FALLBACK = torch.library.Library(NAMESPACE, "IMPL")
for _device_type, _key in DEVICE_KEYS.items():
    for _name in SCHEMAS:
        if (_name, _key) not in _EXTENSION_KEYS:
            _FALLBACK.impl(_name, _python_impl(_python_default(_device_type), _name, _device_type), _key)
if ("gather", "Autograd") not in _EXTENSION_KEYS:
    torch.library.register_autograd("reserved_kernels::gather", _gather_backward,
                                    setup_context=_gather_setup_context, lib=_FALLBACK)
torch.library.register_autograd("reserved_kernels::linear_cross_entropy", _linear_cross_entropy_backward,
                                setup_context=_linear_cross_entropy_setup_context, lib=_FALLBACK)

_forced: dict = {"backend": None, "lib": None}


def forced_backend() -> str | None:
    """The backend forced now, or None."""
    return _forced["backend"]


def active(device_type: str, op: str = "gather") -> str:
    """The backend that serves op ``op`` on ``device_type`` tensors now (forced, or the default chosen at import)."""
    return forced_backend() or default_backend(device_type, op)


def _register_forced(backend: str | None) -> None:
    """Register ``backend``'s kernels over the defaults on the CPU and CUDA keys (None: remove them).

    A name that is not a backend registers kernels that raise, with the reason, at the call.
    """
    if _forced["lib"] is not None:
        _forced["lib"]._destroy()
    _forced.update(backend=None, lib=None)
    if backend is None:
        return
    lib = torch.library.Library(NAMESPACE, "IMPL")
    for device_type, key in DEVICE_KEYS.items():
        for name in SCHEMAS:
            if backend == "compiled" and (name, key) in _EXTENSION_KEYS:
                continue  # the extension's own kernel is already there
            lib.impl(name, _python_impl(backend, name, device_type), key)
    _forced.update(backend=backend, lib=lib)


def use(backend: str | None) -> None:
    """Force ``backend`` (one of ``_backend.BACKENDS``) for every later call; ``None``: back to the defaults."""
    if backend is not None and backend not in _backend.BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {_backend.BACKENDS}")
    _register_forced(backend)


@contextlib.contextmanager
def forced(backend: str):
    """Force ``backend`` inside the ``with`` block, then restore what was there before."""
    previous = forced_backend()
    use(backend)
    try:
        yield
    finally:
        _register_forced(previous)


def _force_from_environment() -> None:
    """``RESERVED_KERNELS_BACKEND`` at import; an unknown name fails every call, with the reason, not the import."""
    value = os.environ.get(_backend.ENV_VAR, "").strip().lower()
    if value:
        _register_forced(value)


_force_from_environment()

# --------------------------------------------------------------------------------------- strict id checks

_strict = {"on": os.environ.get(STRICT_ENV_VAR, "0") == "1"}


def set_strict_id_checks(enabled: bool) -> None:
    """Opt-in debug switch: check ids synchronously (IndexError on CUDA too) before every forward."""
    _strict["on"] = bool(enabled)


def strict_id_checks() -> bool:
    return _strict["on"]


def check_ids_now(ids: Tensor, num_embeddings: int, name: str = "ids") -> None:
    """Raise IndexError unless every value of ``ids`` lies in [0, num_embeddings). Synchronises a CUDA stream.

    Skipped while a CUDA graph is being captured (a synchronisation is illegal there).
    """
    _check_index_dtype(ids, name)
    if ids.numel() == 0 or (ids.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    lo, hi = (int(v) for v in torch.aminmax(ids))
    if lo < 0 or hi >= num_embeddings:
        bad = lo if lo < 0 else hi
        raise IndexError(f"{name} must lie in [0, {num_embeddings}), got {bad}")
