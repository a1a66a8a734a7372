"""Which backends exist here, and which one each op call uses.

The order, in one place: the CUDA extension if built and the tensors are on CUDA (for the ops
where it is preferred, see ``_PREFER_CUDA``), then Triton if importable, then the pure-PyTorch
reference. ``RESERVED_KERNELS_BACKEND=torch|triton|cuda`` forces one backend; a forced backend
that cannot run the call raises :class:`BackendUnavailableError` instead of falling back.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import os
import warnings

import torch

BACKENDS = ("torch", "triton", "cuda")
ENV_VAR = "RESERVED_KERNELS_BACKEND"

# Ops for which the CUDA extension beats Triton on CUDA tensors; ops not listed go to Triton when
# both are available. Measured on an H200 (bench/results/h200/kernels_gpu.md, bf16, V=262,144):
# gather is faster through the extension at N <= 32,768 (less host overhead per call: ~110 µs vs
# ~190 µs floor); at N=131,072 the extension takes 18% longer than Triton for D=2,048 (4% for
# D=3,840) and 4% less for D=5,376. The extension's atomic scatter is 2-3x faster on uniform ids
# and its deterministic path ~20% faster; Triton's atomic scatter wins (3x) only when every token
# hits one row.
_PREFER_CUDA: frozenset[str] = frozenset({"gather", "scatter_grad", "segment_mean"})

# The Triton and CUDA kernels accumulate in fp32; float64 tables (gradcheck) use the reference.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class BackendUnavailableError(RuntimeError):
    """A backend was forced (``RESERVED_KERNELS_BACKEND``) but cannot run this call."""


@functools.cache
def cuda_extension_status() -> tuple[bool, str]:
    """Load ``reserved_kernels._C`` (CUDA kernels registered with TORCH_LIBRARY); never raise."""
    here = os.path.dirname(os.path.abspath(__file__))
    candidates = sorted(glob.glob(os.path.join(here, "_C*.so")) + glob.glob(os.path.join(here, "_C*.pyd")))
    if not candidates:
        return False, "the CUDA extension was not built (no reserved_kernels/_C*.so; see README, Install)"
    try:
        torch.ops.load_library(candidates[0])
    except (OSError, RuntimeError) as exc:  # a wrong torch/CUDA ABI shows up here
        warnings.warn(f"reserved_kernels: could not load the CUDA extension {candidates[0]}: {exc}", stacklevel=2)
        return False, f"the CUDA extension failed to load: {exc}"
    return True, candidates[0]


def interpreter_enabled() -> bool:
    """Whether Triton kernels run through the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def triton_status() -> tuple[bool, str]:
    """Whether Triton can be imported here; never raise."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return False, f"triton is not importable: {exc}"
    return True, f"triton {triton.__version__}"


def availability(backend: str, device: torch.device, dtype: torch.dtype | None = None) -> tuple[bool, str]:
    """Can ``backend`` run an op on ``dtype`` tensors on ``device``? Returns (ok, reason)."""
    if backend == "torch":
        return True, "pure-PyTorch reference"
    if dtype is not None and dtype not in KERNEL_DTYPES:
        return False, f"the {backend} kernels support {[str(d) for d in KERNEL_DTYPES]}, got {dtype}"
    if backend == "triton":
        ok, why = triton_status()
        if not ok:
            return False, why
        if device.type == "cuda":
            return True, why
        if device.type == "cpu" and interpreter_enabled():
            return True, why + " (interpreter)"
        return False, f"Triton runs on CUDA tensors, or on CPU tensors only with TRITON_INTERPRET=1 (got {device.type})"
    if backend == "cuda":
        ok, why = cuda_extension_status()
        if not ok:
            return False, why
        if device.type != "cuda":
            return False, f"the CUDA extension runs on CUDA tensors only (got {device.type})"
        return True, "CUDA extension"
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


def forced_backend() -> str | None:
    """The backend forced by ``RESERVED_KERNELS_BACKEND``, or None."""
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if not value:
        return None
    if value not in BACKENDS:
        raise BackendUnavailableError(f"{ENV_VAR}={value!r} is not a backend; expected one of {BACKENDS}")
    return value


def select(op: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """The backend that runs ``op`` for ``dtype`` tensors on ``device``."""
    forced = forced_backend()
    if forced is not None:
        ok, why = availability(forced, device, dtype)
        if not ok:
            raise BackendUnavailableError(f"{ENV_VAR}={forced} is forced but cannot run {op}: {why}")
        return forced
    if device.type == "cuda":
        cuda_ok = availability("cuda", device, dtype)[0]
        if cuda_ok and op in _PREFER_CUDA:
            return "cuda"
        if availability("triton", device, dtype)[0]:
            return "triton"
        if cuda_ok:
            return "cuda"
    return "torch"


@contextlib.contextmanager
def scoped_env(name: str, value: str):
    """Set environment variable ``name`` inside the ``with`` block, then restore its previous state."""
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


def forced(backend: str):
    """Force ``backend`` for the op calls inside the ``with`` block."""
    return scoped_env(ENV_VAR, backend)
