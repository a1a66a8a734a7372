"""The Triton kernels compile for Hopper (sm_90) ahead of time, here on a machine without a GPU.

The interpreter tests check what the kernels compute; these check that the real compiler accepts
them, that row accesses become 16-byte vector loads and stores when rows are 16-byte aligned (the
launchers pass D and pointers that Triton specialises as divisible by 16 in that case), that the
gather and segment_mean kernels carry their device-side id assertions, and that the backward adds no
float atomics (its sums are ordered: bitwise repeatable).
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

import triton.language as tl  # noqa: E402

from reserved_kernels.triton import kernels as K  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
ALIGNED = ("tt.divisibility", 16)
ROW_TYPES = {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32}


def _compile(fn, signature: dict, constexprs: dict, aligned: tuple[str, ...]):
    names = list(signature)
    attrs = {(names.index(n),): [list(ALIGNED)] for n in aligned}
    # As the launchers run them: a kernel declared with debug=True keeps its device asserts.
    options = dict(debug=bool(fn.debug), sanitize_overflow=False)
    return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs), target=HOPPER,
                          options=options)


def _vector_accesses(ptx: str) -> set[str]:
    return set(re.findall(r"(?:ld|st)\.global(?:\.nc)?(?:\.L1::\w+|\.L2::\w+)*\.v4\.\w+", ptx))


def _float_atomics(ptx: str) -> list[str]:
    return re.findall(r"(?:atom|red)(?:\.\w+)*\.f(?:16|32|64)\b|(?:atom|red)(?:\.\w+)*\.bf16\b", ptx)


@pytest.mark.parametrize("row", list(ROW_TYPES))
@pytest.mark.parametrize("master", [False, True], ids=["table-dtype-rows", "fp32-master-rows"])
@pytest.mark.parametrize("int8", [False, True], ids=["float", "int8"])
def test_gather_compiles_with_vector_accesses_and_id_asserts(row, master, int8):
    signature = {"ids_ptr": "*i64", "weight_ptr": "*i8" if int8 else f"*{row}",
                 "reserved_ptr": "*fp32" if master else f"*{row}", "slot_ptr": "*i32",
                 "scaler_ptr": f"*{row}" if int8 else "*i32", "out_ptr": f"*{row}", "N": "i32", "V": "i32", "K": "i32",
                 "D": "i32", "scale": "fp32", "T": "constexpr", "HAS_SCALER": "constexpr", "APPLY_SCALE": "constexpr",
                 "BLOCK_N": "constexpr", "BLOCK_D": "constexpr"}
    compiled = _compile(K.gather_kernel, signature,
                        dict(T=ROW_TYPES[row], HAS_SCALER=int8, APPLY_SCALE=True, BLOCK_N=4, BLOCK_D=1024),
                        ("ids_ptr", "weight_ptr", "reserved_ptr", "slot_ptr", "scaler_ptr", "out_ptr", "D"))
    ptx = compiled.asm["ptx"]
    accesses = _vector_accesses(ptx)
    assert any(a.startswith("st.global") for a in accesses), accesses  # output rows
    assert any(a.startswith("ld.global") for a in accesses), accesses  # reserved / table rows
    assert "__assertfail" in ptx  # the device-side check of the ids (debug=True on this kernel)


@pytest.mark.parametrize("row", list(ROW_TYPES))
@pytest.mark.parametrize("out", ["fp32", "same"])
def test_backward_kernels_compile_without_float_atomics(row, out):
    plan = {"ids_ptr": "*i64", "slot_ptr": "*i32", "counts_ptr": "*i32"}
    count = _compile(K.count_kernel, {**plan, "N": "i32", "V": "i32", "K": "i32", "TILE_TOKENS": "i32",
                                       "BLOCK": "constexpr", "BLOCK_K": "constexpr"},
                     dict(BLOCK=256, BLOCK_K=256), ())
    place = _compile(K.place_kernel, {**plan, "bases_ptr": "*i32", "offsets_ptr": "*i32", "arrivals_ptr": "*i32",
                                       "NUM_ARRIVALS": "i32", "sorted_token_ptr": "*i32", "sorted_slot_ptr": "*i32",
                                       "N": "i32", "V": "i32", "K": "i32", "TILE_TOKENS": "i32", "NUM_TILES": "i32",
                                       "BLOCK_K": "constexpr", "ROUND": "constexpr"},
                     dict(BLOCK_K=256, ROUND=64), ())
    summed = _compile(K.sum_kernel, {"grad_ptr": f"*{row}", "sorted_token_ptr": "*i32", "sorted_slot_ptr": "*i32",
                                      "offsets_ptr": "*i32", "arrivals_ptr": "*i32", "pieces_ptr": "*fp32",
                                      "out_ptr": "*fp32" if out == "fp32" else f"*{row}", "K": "i32", "D": "i32",
                                      "CHUNK": "i32", "NUM_CHUNKS": "i32", "scale": "fp32",
                                      "ZERO_SLOTS": "constexpr", "BLOCK_Q": "constexpr", "BLOCK_D": "constexpr"},
                      dict(ZERO_SLOTS=8, BLOCK_Q=16, BLOCK_D=1024), ("grad_ptr", "pieces_ptr", "out_ptr", "D"))
    for kernel in (count, place, summed):
        assert not _float_atomics(kernel.asm["ptx"]), _float_atomics(kernel.asm["ptx"])
    assert "atom.global" in count.asm["ptx"] or "red.global" in count.asm["ptx"]  # integer counts
    assert any(a.startswith("ld.global") for a in _vector_accesses(summed.asm["ptx"]))  # gradient rows


def test_segment_mean_compiles_with_id_asserts():
    signature = {"weight_ptr": "*bf16", "reserved_ptr": "*fp32", "slot_ptr": "*i32", "scaler_ptr": "*i32",
                 "offsets_ptr": "*i64", "src_ptr": "*i64", "out_ptr": "*fp32", "NUM_IDS": "i32", "V": "i32",
                 "K": "i32", "D": "i32", "T": "constexpr", "HAS_SCALER": "constexpr", "BLOCK_N": "constexpr",
                 "BLOCK_D": "constexpr"}
    compiled = _compile(K.segment_mean_kernel, signature,
                        dict(T=tl.bfloat16, HAS_SCALER=False, BLOCK_N=16, BLOCK_D=1024),
                        ("weight_ptr", "reserved_ptr", "out_ptr", "D"))
    assert "__assertfail" in compiled.asm["ptx"]
    assert not _float_atomics(compiled.asm["ptx"])


@pytest.mark.parametrize("p", ["fp32", "bf16"], ids=["in-place", "bf16-softmax"])
@pytest.mark.parametrize("cap", [False, True], ids=["no-cap", "cap"])
def test_the_fused_loss_tile_kernel_compiles_with_vector_accesses_and_no_atomics(p, cap):
    """One program per tile row: 16-byte loads of the fp32 logits, stores of the softmax, no atomics at all."""
    signature = {"z_ptr": "*fp32", "p_ptr": f"*{p}", "masked_ptr": "*i1", "tcol_ptr": "*i64", "m_ptr": "*fp32",
                 "s_ptr": "*fp32", "a_ptr": "*fp32", "zt_ptr": "*fp32", "alpha_ptr": "*fp32", "COLS": "i32",
                 "stride_z": "i32", "stride_p": "i32", "softcap": "fp32", "MASKED": "constexpr", "HAS_CAP": "constexpr",
                 "HAS_MASK": "constexpr", "WANT_P": "constexpr", "WANT_A": "constexpr", "BLOCK": "constexpr"}
    compiled = _compile(K.lse_tile_kernel, signature,
                        dict(MASKED=-3.4e38, HAS_CAP=cap, HAS_MASK=True, WANT_P=True, WANT_A=True, BLOCK=2048),
                        ("z_ptr", "p_ptr", "COLS", "stride_z", "stride_p"))
    ptx = compiled.asm["ptx"]
    accesses = _vector_accesses(ptx)
    assert any(a.startswith("ld.global") for a in accesses), accesses
    assert not re.findall(r"\b(?:atom|red)\.", ptx)
