"""Which backends exist here, which one serves each device, and forcing one for tests and benchmarks.

Backends: ``compiled`` (the extension ``reserved_kernels._C``: C++ kernels for CPU tensors, CUDA kernels
for CUDA tensors, and the autograd in C++), ``triton`` (CUDA tensors, or CPU tensors through Triton's
interpreter with ``TRITON_INTERPRET=1``) and ``torch`` (the pure-PyTorch reference).

This module only finds out what exists; it imports nothing else of the package. The choice is
:mod:`reserved_kernels.ops`'s: it registers one kernel per op and dispatch key, once, at import — the
compiled extension where built, else Triton on CUDA and the reference on CPU — so a call never goes
through Python to pick a backend. ``RESERVED_KERNELS_BACKEND=torch|triton|compiled`` (read at import) or
``ops.use`` / ``ops.forced`` register another backend's kernels over the defaults; a forced backend that
cannot run a call raises :class:`BackendUnavailableError` instead of falling back.
"""

from __future__ import annotations

import functools
import glob
import os
import warnings

BACKENDS = ("torch", "triton", "compiled")
ENV_VAR = "RESERVED_KERNELS_BACKEND"
# Set to 0 to ignore a built extension (the pure-Python configuration, as on a machine without a compiler).
EXTENSION_ENV_VAR = "RESERVED_KERNELS_EXTENSION"


class BackendUnavailableError(RuntimeError):
    """A backend was forced (``RESERVED_KERNELS_BACKEND`` or :func:`use`) but cannot run this call."""


@functools.cache
def extension_status() -> tuple[bool, str]:
    """Load ``reserved_kernels._C`` (kernels registered with TORCH_LIBRARY_IMPL); never raise."""
    import torch

    if os.environ.get(EXTENSION_ENV_VAR, "1") == "0":
        return False, f"the compiled extension is disabled ({EXTENSION_ENV_VAR}=0)"
    here = os.path.dirname(os.path.abspath(__file__))
    candidates = sorted(glob.glob(os.path.join(here, "_C*.so")) + glob.glob(os.path.join(here, "_C*.pyd")))
    if not candidates:
        return False, "the compiled extension was not built (no reserved_kernels/_C*.so; see docs/setup.md, Install)"
    try:
        torch.ops.load_library(candidates[0])
    except (OSError, RuntimeError) as exc:  # a wrong torch/CUDA ABI shows up here
        warnings.warn(f"reserved_kernels: could not load the compiled extension {candidates[0]}: {exc}", stacklevel=2)
        return False, f"the compiled extension failed to load: {exc}"
    return True, candidates[0]


def interpreter_enabled() -> bool:
    """Whether Triton kernels run through the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def triton_status() -> tuple[bool, str]:
    """Whether Triton can be imported here; never raise."""
    try:
        import triton
    except ImportError as exc:
        return False, f"triton is not importable: {exc}"
    return True, f"triton {triton.__version__}"


@functools.cache
def extension_kernels() -> frozenset[tuple[str, str]]:
    """``(op, dispatch key)`` pairs the compiled extension registered, read right after it loads.

    :mod:`reserved_kernels.ops` calls this at import, before it registers any Python kernel, so the
    pairs are the extension's own (the dispatcher cannot tell them apart afterwards).
    """
    import torch

    if not extension_status()[0]:
        return frozenset()
    prefix = "reserved_kernels::"
    return frozenset((name.removeprefix(prefix), key) for key in ("CPU", "CUDA", "Autograd")
                     for name in torch._C._dispatch_get_registrations_for_dispatch_key(key)
                     if name.startswith(prefix))


def extension_has_kernels_for(device_type: str) -> bool:
    """Whether the compiled extension registered kernels for ``device_type`` ("cpu" or "cuda") tensors."""
    key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    return any(k == key for _, k in extension_kernels())


def availability(backend: str, device_type: str) -> tuple[bool, str]:
    """Can ``backend`` run the ops on ``device_type`` ("cpu" or "cuda") tensors? Returns (ok, reason)."""
    if backend == "torch":
        return True, "pure-PyTorch reference"
    if backend == "triton":
        ok, why = triton_status()
        if not ok:
            return False, why
        if device_type == "cuda":
            return True, why
        if device_type == "cpu" and interpreter_enabled():
            return True, why + " (interpreter)"
        return False, f"Triton runs on CUDA tensors, or on CPU tensors only with TRITON_INTERPRET=1 (got {device_type})"
    if backend == "compiled":
        ok, why = extension_status()
        if not ok:
            return False, why
        if not extension_has_kernels_for(device_type):
            return False, f"the compiled extension has no {device_type} kernels (built without a CUDA toolkit?)"
        return True, f"compiled extension ({why})"
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
