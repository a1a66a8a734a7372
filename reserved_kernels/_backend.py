"""Which backends exist here, which one serves each device, and forcing one for tests and benchmarks.

Backends: ``compiled`` (the extension ``reserved_kernels._C``: C++ kernels for CPU tensors, CUDA kernels
for CUDA tensors, and the autograd in C++), ``triton`` (CUDA tensors, or CPU tensors through Triton's
interpreter with ``TRITON_INTERPRET=1``) and ``torch`` (the pure-PyTorch reference).

Dispatch is PyTorch's own: :mod:`reserved_kernels.ops` registers one kernel per op and dispatch key,
chosen once, at import — the compiled extension where built, else Triton on CUDA and the reference on
CPU. A call never goes through Python to pick a backend. ``RESERVED_KERNELS_BACKEND=torch|triton|compiled``
(read at import) or :func:`use` / :func:`forced` register another backend's kernels over the defaults;
a forced backend that cannot run a call raises :class:`BackendUnavailableError` instead of falling back.
"""

from __future__ import annotations

import contextlib
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
def cuda_extension_status() -> tuple[bool, str]:
    """Load ``reserved_kernels._C`` (kernels registered with TORCH_LIBRARY_IMPL); never raise."""
    import torch

    if os.environ.get(EXTENSION_ENV_VAR, "1") == "0":
        return False, f"the compiled extension is disabled ({EXTENSION_ENV_VAR}=0)"
    here = os.path.dirname(os.path.abspath(__file__))
    candidates = sorted(glob.glob(os.path.join(here, "_C*.so")) + glob.glob(os.path.join(here, "_C*.pyd")))
    if not candidates:
        return False, "the compiled extension was not built (no reserved_kernels/_C*.so; see README, Install)"
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
        from reserved_kernels import ops

        ok, why = cuda_extension_status()
        if not ok:
            return False, why
        if not ops.extension_serves(device_type):
            return False, f"the compiled extension has no {device_type} kernels (built without a CUDA toolkit?)"
        return True, f"compiled extension ({why})"
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


def active(device_type: str) -> str:
    """The backend that serves ``device_type`` tensors now (forced, or the default chosen at import)."""
    from reserved_kernels import ops

    return ops.forced_backend() or ops.default_backend(device_type)


def use(backend: str | None) -> None:
    """Force ``backend`` for every later call (``None``: back to the defaults)."""
    from reserved_kernels import ops

    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    ops.force_backend(backend)


@contextlib.contextmanager
def forced(backend: str):
    """Force ``backend`` inside the ``with`` block, then restore what was there before."""
    from reserved_kernels import ops

    previous = ops.forced_backend()
    use(backend)
    try:
        yield
    finally:
        use(previous)
