"""The compiled CUDA code, checked on a machine without a GPU: machine code and host-path budgets.

Nothing here runs a CUDA kernel. The SASS shows 128-bit row accesses; the host functions' source shows
the budgets the hot path promises: no host-device synchronisation anywhere, and a backward of three
kernel launches with grids sized from shapes alone.
"""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from reserved_kernels import _backend

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
# Host calls that read device memory back (and so wait for the stream), in C++.
SYNCING_CALLS = [r"\.item\s*<", r"\.item\s*\(", r"\.cpu\s*\(", r"\.to\s*\(\s*at::kCPU", r"\bcudaMemcpy\s*\(",
                 r"cudaMemcpyDeviceToHost", r"cudaStreamSynchronize", r"cudaDeviceSynchronize", r"\.tolist",
                 r"\bnonzero\b", r"_local_scalar_dense", r"\.equal\s*\(", r"is_nonzero"]


def _source(name: str) -> str:
    with open(os.path.join(CSRC, name), encoding="utf-8") as f:
        return f.read()


def _function(source: str, name: str) -> str:
    start = source.index(f"at::Tensor {name}(")
    return source[start:source.index("\n}\n", start)]


@pytest.mark.parametrize("name", sorted(os.listdir(CSRC)))
def test_host_code_never_reads_device_memory(name):
    code = re.sub(r"//[^\n]*", "", _source(name))  # comments may name what the code avoids
    found = [pattern for pattern in SYNCING_CALLS if re.search(pattern, code)]
    assert not found, f"{name} calls {found}"


def test_the_backward_is_three_launches_sized_from_shapes():
    body = _function(_source("cuda.cu"), "scatter_grad_cuda")
    launches = re.findall(r"(\w+)<[^<>]*><<<", body)
    assert sorted(launches) == ["count_kernel", "place_kernel", "sum_kernel"], launches
    # No ATen op that launches work: only allocations (and a zero fill when there are no tokens at all).
    aten_calls = set(re.findall(r"\bat::(\w+)\s*\(", body))
    assert aten_calls <= {"empty"}, aten_calls
    assert "data_ptr" in body and "offsets[" not in body  # the host never indexes device buffers


def test_the_forward_is_one_launch():
    body = _function(_source("cuda.cu"), "gather_cuda")
    assert re.findall(r"(\w+)<[^<>]*><<<", body) == ["gather_kernel"]
    assert set(re.findall(r"\bat::(\w+)\s*\(", body)) <= {"empty"}


def _cuobjdump() -> str | None:
    """Triton's wheel carries cuobjdump; the CUDA toolkit may too."""
    import shutil

    try:
        import triton

        bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        if os.path.exists(bundled):
            return bundled
    except ImportError:
        pass
    return shutil.which("cuobjdump")


def test_extension_machine_code_uses_16_byte_row_accesses():
    """The compiled kernels load and store rows as 128-bit vectors (checked in SASS, no GPU needed)."""
    ok, path = _backend.extension_status()
    if not ok:
        pytest.skip(f"compiled extension not built here: {path}")
    if not _backend.extension_has_kernels_for("cuda"):
        pytest.skip("the extension was built without a CUDA toolkit: C++ CPU kernels only, no machine code to read")
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump here (neither Triton's nor the toolkit's)")
    sass = subprocess.run([tool, "--dump-sass", path], capture_output=True, text=True, check=True).stdout
    assert "LDG.E.128" in sass and "STG.E.128" in sass
