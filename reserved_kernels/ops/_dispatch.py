"""Who serves each op on each dispatch key: decided once, at import — the compiled extension's C++ kernels
where it registered them, a Python implementation on every key it leaves open (the reference on CPU, Triton
— else the reference — on CUDA, and the autograd formulas) — and forcing another backend for tests and
benchmarks."""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Callable

import torch

from reserved_kernels import _backend
from reserved_kernels.ops._checks import CHECKS
from reserved_kernels.ops._schemas import (
    COMPILED_OPS,
    DEVICE_KEYS,
    NAMESPACE,
    SCHEMAS,
    gather_backward,
    gather_setup_context,
    linear_cross_entropy_backward,
    linear_cross_entropy_setup_context,
)


def _checked(name: str, fn: Callable) -> Callable:
    """``fn`` (a backend's implementation of op ``name``) after the op's argument checks."""
    check = CHECKS[name]

    def impl(*args):
        check(*args)
        return fn(*args)

    return impl


def _on_first_call(module: str, name: str) -> Callable:
    """``module``'s function ``name``, imported on its first call: importing Triton costs about a second, and
    the reference imports the fused-loss driver from this package (:mod:`reserved_kernels.ops.fused_loss`), so it
    cannot be read while this package loads."""
    loaded: list[Callable] = []

    def call(*args):
        if not loaded:
            loaded.append(getattr(importlib.import_module(module), name))
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
    module = "reserved_kernels.triton.launchers" if backend == "triton" else "reserved_kernels.reference"
    return _checked(name, _on_first_call(module, name))


# Keys the compiled extension serves, read before any Python kernel is registered next to them.
_EXTENSION_KEYS = _backend.extension_kernels()


def _extension_serves_every_op(device_type: str) -> bool:
    """Whether the compiled extension registered a kernel for each of its ops on ``device_type`` tensors."""
    return all((name, DEVICE_KEYS[device_type]) in _EXTENSION_KEYS for name in COMPILED_OPS)


def _python_default(device_type: str) -> str:
    """The Python backend for the keys the extension leaves open: Triton on CUDA where importable, else torch."""
    return "triton" if device_type == "cuda" and _backend.triton_status()[0] else "torch"


def default_backend(device_type: str, op: str = "gather") -> str:
    """The backend chosen at import for op ``op`` on ``device_type`` tensors."""
    if op in COMPILED_OPS and _extension_serves_every_op(device_type):
        return "compiled"
    return _python_default(device_type)


_FALLBACK = torch.library.Library(NAMESPACE, "IMPL")
for _device_type, _key in DEVICE_KEYS.items():
    for _name in SCHEMAS:
        if (_name, _key) not in _EXTENSION_KEYS:
            _FALLBACK.impl(_name, _python_impl(_python_default(_device_type), _name, _device_type), _key)
if ("gather", "Autograd") not in _EXTENSION_KEYS:
    torch.library.register_autograd("reserved_kernels::gather", gather_backward,
                                    setup_context=gather_setup_context, lib=_FALLBACK)
torch.library.register_autograd("reserved_kernels::linear_cross_entropy", linear_cross_entropy_backward,
                                setup_context=linear_cross_entropy_setup_context, lib=_FALLBACK)

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

