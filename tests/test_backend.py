"""Who serves each dispatch key, forcing a backend, and what a call costs on the host (checked without a GPU)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

import reserved_kernels as rk
from reserved_kernels import _backend, ops
from reserved_kernels.cli import info

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPS = list(ops.SCHEMAS)
EXPECTED = os.environ.get("RESERVED_KERNELS_EXPECT_CUDA_EXT") == "1"


def _registrations(op: str) -> dict[str, str]:
    """dispatch key -> where its kernel was registered, from the dispatcher's own dump."""
    dump = torch._C._dispatch_dump(f"reserved_kernels::{op}")
    return {m.group(1): m.group(2) for m in re.finditer(r"^(\w+)(?:\[alias\])?: registered at (\S+)", dump, re.M)}


@pytest.mark.parametrize("op", OPS)
def test_each_op_is_defined_once_with_cpu_cuda_and_one_autograd_kernel(op):
    regs = _registrations(op)
    assert {"CPU", "CUDA", "Autograd", "Meta"} <= set(regs), regs
    dump = torch._C._dispatch_dump(f"reserved_kernels::{op}")
    assert dump.count("schema:") == 1 and dump.count("Autograd") == 1
    assert not any(name.startswith("cuda_") for name in dir(torch.ops.reserved_kernels)), "no second layer of ops"


@pytest.mark.parametrize("op", ops.COMPILED_OPS)
def test_the_compiled_extension_serves_every_key_itself(op):
    """Where the extension is built, CPU, CUDA and Autograd are its C++ kernels: no Python between call and kernel."""
    ok, why = _backend.extension_status()
    if not ok and not EXPECTED:
        pytest.skip(f"compiled extension not built here: {why}")
    assert ok, why
    regs = _registrations(op)
    # Built without a CUDA toolkit, the extension has the C++ CPU kernels and autograd; CUDA stays Python's.
    with_cuda = EXPECTED or _backend.extension_has_kernels_for("cuda")
    for key in ("CPU", "Autograd") + (("CUDA",) if with_cuda else ()):
        assert regs[key].startswith(os.path.join(REPO, "csrc")) or "/csrc/" in regs[key], (key, regs[key])
    assert ops.active("cpu") == "compiled"
    assert (ops.active("cuda") == "compiled") == with_cuda


def test_the_fused_loss_is_served_by_python_on_every_key():
    """GEMMs around a tile step: torch's on CPU, Triton's (where importable) on CUDA; one Python autograd."""
    regs = _registrations("linear_cross_entropy")
    assert not any("csrc" in where for where in regs.values()), regs
    assert ops.default_backend("cpu", "linear_cross_entropy") == "torch"
    assert ops.default_backend("cuda", "linear_cross_entropy") == ("triton" if _backend.triton_status()[0] else "torch")


def test_without_the_extension_python_fills_every_key():
    """RESERVED_KERNELS_EXTENSION=0: the reference on CPU, Triton (or the reference) on CUDA, Python autograd."""
    code = ("import torch, reserved_kernels as rk, re\n"
            "from reserved_kernels import _backend, ops\n"
            "d = torch._C._dispatch_dump('reserved_kernels::gather')\n"
            "assert 'csrc' not in d, d\n"
            "print(ops.active('cpu'), ops.active('cuda'))\n"
            "e = rk.ReservedEmbedding(10, 4, reserved_ids=[1, 2], dtype=torch.bfloat16)\n"
            "e(torch.tensor([1, 2, 1])).float().sum().backward()\n"
            "assert e.reserved_weight.grad.dtype == torch.float32 and e.reserved_weight.grad[0, 0] == 2\n")
    env = dict(os.environ, **{_backend.EXTENSION_ENV_VAR: "0"})
    env.pop(_backend.ENV_VAR, None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    cpu, cuda = out.split()
    assert cpu == "torch" and cuda in ("triton", "torch")


def test_forcing_an_unavailable_backend_raises_at_the_call():
    emb = rk.ReservedEmbedding(10, 4, reserved_ids=[1])
    with ops.forced("triton"):
        if not _backend.interpreter_enabled():
            with pytest.raises(_backend.BackendUnavailableError, match="TRITON_INTERPRET=1"):
                emb(torch.tensor([1, 2]))
    assert emb(torch.tensor([1, 2])).shape == (2, 4)  # the defaults are back


def test_forcing_restores_what_was_there_before():
    before = ops.active("cpu")
    with ops.forced("torch"):
        assert ops.active("cpu") == "torch"
        emb = rk.ReservedEmbedding(10, 4, reserved_ids=[1])
        assert emb(torch.tensor([1, 2])).shape == (2, 4)
    assert ops.active("cpu") == before


def test_environment_variable_forces_at_import_and_unknown_names_fail_the_call():
    code = ("import torch, reserved_kernels as rk\n"
            "from reserved_kernels import _backend, ops\n"
            "print(ops.active('cpu'))\n"
            "try:\n"
            "    rk.ReservedEmbedding(10, 4, reserved_ids=[1])(torch.tensor([1]))\n"
            "except _backend.BackendUnavailableError as e:\n"
            "    print('error:', e)\n")

    def run(value: str) -> str:
        return subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **{_backend.ENV_VAR: value}),
                              capture_output=True, text=True, check=True).stdout

    assert run("torch").strip() == "torch"
    assert "not a backend" in run("numba")


def test_use_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown backend"):
        ops.use("numba")


def test_info_reports_every_backend():
    text = info()
    for backend in _backend.BACKENDS:
        assert f"cpu  {backend}" in text
    assert "compiled extension built:" in text


def test_the_backend_registry_imports_nothing_of_the_package():
    """``_backend`` finds out what exists; ``ops`` chooses and registers. The dependency runs one way only."""
    import ast

    tree = ast.parse(open(_backend.__file__, encoding="utf-8").read())
    imported = [n.module if isinstance(n, ast.ImportFrom) else a.name
                for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                for a in (n.names if isinstance(n, ast.Import) else [None])]
    assert not [m for m in imported if m and m.startswith("reserved_kernels")], imported
