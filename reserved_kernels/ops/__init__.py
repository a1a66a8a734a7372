"""The four public ops, defined once: schema, fake implementation, and the kernel behind each dispatch key.

* ``reserved_kernels::gather(ids, weight, reserved_weight, slot_map, weight_scaler, scale)`` —
  ``out[n] = cast(scale * row(ids[n]))`` in the table dtype; differentiable in ``reserved_weight``.
* ``reserved_kernels::scatter_grad(grad_out, ids, slot_map, num_slots, scale, out_dtype)`` —
  ``grad[k] = scale * Σ grad_out[n]`` over the tokens whose id has slot ``k``; a (K, D) tensor of
  ``out_dtype``, bitwise repeatable run to run whatever the id distribution.
* ``reserved_kernels::segment_mean(weight, reserved_weight, slot_map, weight_scaler, offsets, src_ids)`` —
  ``out[k] = mean(row(src_ids[offsets[k]:offsets[k+1]]))``, (K, D) in float32 (float64 for a float64 table).
* ``reserved_kernels::linear_cross_entropy(hidden, weight, reserved_weight, slot_map, targets, ignore_index,
  softcap, tile_bytes, grad_hidden, grad_rows, stats)`` — each token's cross-entropy over the merged table's
  (soft-capped) logits, never building them (see :mod:`reserved_kernels.ops.fused_loss`), with
  its entropy, whether the target is the top token and the log-sum-exp of the table's columns alone (``stats``:
  the frozen columns' share, for :class:`~reserved_kernels.models.FrozenText`) and each token's gradients, computed in
  the forward pass: for ``hidden`` when ``grad_hidden``, for the K reserved columns when ``grad_rows`` (each
  costs only when asked); differentiable in ``hidden`` and ``reserved_weight``.

``row(i)`` is ``reserved_weight[slot_map[i]]`` rounded to the table dtype when ``slot_map[i] >= 0``,
else ``weight[i]`` (times ``weight_scaler[i]`` for an int8 table, gemma_pytorch's layout). The table
dtype is ``weight``'s, or ``weight_scaler``'s for an int8 table; ``reserved_weight`` has the table dtype
or float32 (fp32 master rows of a 16-bit table).

Who serves each dispatch key is decided once, at import (:mod:`._dispatch`): the compiled extension registers CPU,
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

from reserved_kernels.ops._checks import (
                                          STRICT_ENV_VAR,
                                          check_gather,
                                          check_ids_now,
                                          check_linear_cross_entropy,
                                          check_scatter,
                                          check_segment_mean,
                                          check_table,
                                          set_strict_id_checks,
                                          strict_id_checks,
)
from reserved_kernels.ops._dispatch import active, default_backend, forced, forced_backend, use
from reserved_kernels.ops._schemas import (
                                          COMPILED_OPS,
                                          DEVICE_KEYS,
                                          FROZEN_TABLE_MESSAGE,
                                          NAMESPACE,
                                          SCHEMAS,
                                          gather,
                                          linear_cross_entropy,
                                          scatter_grad,
                                          segment_mean,
)

__all__ = ["gather", "scatter_grad", "segment_mean", "linear_cross_entropy", "SCHEMAS", "COMPILED_OPS", "DEVICE_KEYS",
           "NAMESPACE", "FROZEN_TABLE_MESSAGE", "STRICT_ENV_VAR", "use", "forced", "forced_backend", "active",
           "default_backend", "set_strict_id_checks", "strict_id_checks", "check_ids_now", "check_table",
           "check_gather", "check_scatter", "check_segment_mean", "check_linear_cross_entropy"]
