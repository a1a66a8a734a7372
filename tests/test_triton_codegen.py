"""The Triton kernels compile for Hopper (sm_90) ahead of time, here on a machine without a GPU.

The interpreter tests check what the kernels compute; these check that the real compiler accepts
them and that row accesses become 16-byte vector loads and stores when rows are 16-byte aligned
(the launchers pass D and pointers that Triton specialises as divisible by 16 in that case).
"""

from __future__ import annotations

import re

import pytest

triton = pytest.importorskip("triton", reason="Triton is not installed")

try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError:  # an older or newer Triton without this API
    pytest.skip("this Triton has no ahead-of-time ASTSource/GPUTarget API", allow_module_level=True)

from reserved_kernels.triton import kernels as K  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
ALIGNED = ("tt.divisibility", 16)


def _compile(fn, signature: dict, constexprs: dict, aligned: tuple[str, ...]):
    names = list(signature)
    attrs = {(names.index(n),): [list(ALIGNED)] for n in aligned}
    return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs), target=HOPPER)


def _vector_accesses(ptx: str) -> set[str]:
    return set(re.findall(r"(?:ld|st)\.global(?:\.nc)?\.v4\.\w+", ptx))


ROW_TYPES = ["bf16", "fp16", "fp32"]


@pytest.mark.parametrize("row", ROW_TYPES)
@pytest.mark.parametrize("int8", [False, True], ids=["float", "int8"])
def test_gather_compiles_with_vector_accesses(row, int8):
    signature = {"ids_ptr": "*i64", "weight_ptr": "*i8" if int8 else f"*{row}", "reserved_ptr": f"*{row}",
                 "slot_ptr": "*i32", "scaler_ptr": f"*{row}" if int8 else "*i32", "out_ptr": f"*{row}", "N": "i32",
                 "V": "i32", "D": "i32", "scale": "fp32", "HAS_SCALER": "constexpr", "APPLY_SCALE": "constexpr",
                 "BLOCK_N": "constexpr", "BLOCK_D": "constexpr"}
    compiled = _compile(K._gather_kernel, signature,
                        dict(HAS_SCALER=int8, APPLY_SCALE=True, BLOCK_N=4, BLOCK_D=1024),
                        ("ids_ptr", "weight_ptr", "reserved_ptr", "slot_ptr", "scaler_ptr", "out_ptr", "D"))
    accesses = _vector_accesses(compiled.asm["ptx"])
    assert any(a.startswith("st.global") for a in accesses), accesses  # output rows
    assert any(a.startswith("ld.global") for a in accesses), accesses  # reserved / table rows


@pytest.mark.parametrize("row", ROW_TYPES)
def test_atomic_scatter_compiles(row):
    signature = {"grad_ptr": f"*{row}", "ids_ptr": "*i64", "slot_ptr": "*i32", "out_ptr": "*fp32", "N": "i32",
                 "V": "i32", "D": "i32", "scale": "fp32", "BLOCK_N": "constexpr", "BLOCK_D": "constexpr"}
    compiled = _compile(K._scatter_atomic_kernel, signature, dict(BLOCK_N=4, BLOCK_D=1024),
                        ("grad_ptr", "ids_ptr", "slot_ptr", "out_ptr", "D"))
    ptx = compiled.asm["ptx"]
    assert any(a.startswith("ld.global") for a in _vector_accesses(ptx))  # gradient rows
    assert "red.global" in ptx or "atom.global" in ptx


@pytest.mark.parametrize("from_table", [False, True], ids=["gradient-rows", "table-rows"])
def test_deterministic_kernels_compile(from_table):
    signature = {"src_ptr": "*bf16", "index_ptr": "*i64", "bounds_ptr": "*i64", "partial_ptr": "*fp32",
                 "reserved_ptr": "*bf16", "slot_ptr": "*i32", "scaler_ptr": "*i64", "V": "i32", "D": "i32",
                 "FROM_TABLE": "constexpr", "HAS_SCALER": "constexpr", "BLOCK_N": "constexpr", "BLOCK_D": "constexpr"}
    compiled = _compile(K._piece_sum_kernel, signature, dict(FROM_TABLE=from_table, HAS_SCALER=False, BLOCK_N=16,
                                                             BLOCK_D=1024), ("src_ptr", "partial_ptr", "D"))
    assert "atom" not in compiled.asm["ptx"] and "red.global" not in compiled.asm["ptx"]  # no atomics: repeatable
    reduce_signature = {"partial_ptr": "*fp32", "piece_offsets_ptr": "*i64", "offsets_ptr": "*i64",
                        "out_ptr": "*fp32", "D": "i32", "scale": "fp32", "MEAN": "constexpr", "BLOCK_D": "constexpr"}
    reduced = _compile(K._segment_reduce_kernel, reduce_signature, dict(MEAN=not from_table, BLOCK_D=1024),
                       ("partial_ptr", "out_ptr", "D"))
    assert "atom" not in reduced.asm["ptx"]
