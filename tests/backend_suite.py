"""The parametrized suite every backend runs: the reference and the compiled kernels on CPU, Triton in the
interpreter, Triton and the compiled CUDA kernels on a GPU.

A test module binds it with ``make_suite(backend, device)`` and re-exports the test functions; each test
forces ``backend`` around its calls to the public ops.
"""

from __future__ import annotations

import functools

import pytest
import torch

from reserved_kernels import ops
from tests import kernel_cases as kc


def make_suite(backend: str, device: str, *, skip_reason: str | None = None):
    """Test functions checking ``backend`` on ``device`` (all skipped with ``skip_reason`` when given)."""
    dev = torch.device(device)
    mark = pytest.mark.skipif(skip_reason is not None, reason=skip_reason or "")

    def forced(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            with ops.forced(backend):
                fn(*args, **kwargs)

        return mark(run)

    @pytest.mark.parametrize("dtype", kc.DTYPES, ids=str)
    @pytest.mark.parametrize("dim", kc.DIMS)
    @pytest.mark.parametrize("num_reserved", [0, 1, 5])
    @pytest.mark.parametrize("shape", [(0,), (9,), (4, 13)], ids=str)
    @forced
    def test_gather(dtype, dim, num_reserved, shape):
        kc.check_gather(dev, dtype, dim, num_reserved, shape, seed=dim * 7 + num_reserved)

    @pytest.mark.parametrize("dtype", kc.DTYPES, ids=str)
    @pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64], ids=str)
    @forced
    def test_gather_large(dtype, id_dtype):
        """Enough elements that the compiled CPU kernel copies frozen rows in bulk (2-D ids, repeated reserved ids)."""
        kc.check_gather(dev, dtype, 37, 5, (40, 70), master=True, id_dtype=id_dtype, seed=3)

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
    @pytest.mark.parametrize("int8", [False, True], ids=["float", "int8"])
    @forced
    def test_gather_fp32_master_rows(dtype, int8):
        kc.check_gather(dev, dtype, 123, 5, (3, 17), int8=int8, master=True)

    @pytest.mark.parametrize("dtype", kc.DTYPES, ids=str)
    @pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64], ids=str)
    @forced
    def test_gather_int8_table(dtype, id_dtype):
        kc.check_gather(dev, dtype, 123, 5, (3, 17), int8=True, id_dtype=id_dtype)

    @pytest.mark.parametrize("dtype", kc.DTYPES, ids=str)
    @pytest.mark.parametrize("dim", [3, 123])
    @pytest.mark.parametrize("out", ["float32", "table"])
    @pytest.mark.parametrize("shape", [(9,), (5, 40)], ids=str)
    @forced
    def test_scatter(dtype, dim, out, shape):
        kc.check_scatter(dev, dtype, dim, 5, shape, out_dtype=torch.float32 if out == "float32" else dtype, seed=dim)

    @pytest.mark.parametrize("kind", ["one-hot-row", "zipf"])
    @forced
    def test_scatter_skewed(kind):
        kc.check_skewed_scatter(dev, torch.float32, kind)

    @pytest.mark.parametrize("dtype", kc.DTYPES, ids=str)
    @pytest.mark.parametrize("table", ["float", "int8", "master"])
    @forced
    def test_segment_mean(dtype, table):
        kc.check_segment_mean(dev, dtype, 37, int8=table == "int8", master=table == "master")

    @pytest.mark.parametrize("dtype", kc.DTYPES, ids=str)
    @forced
    def test_empty(dtype):
        kc.check_empty(dev, dtype)

    @pytest.mark.parametrize("dtype", kc.DTYPES, ids=str)
    @forced
    def test_agrees_with_reference(dtype):
        kc.reference_agrees(dev, dtype)

    no_loss_kernel = pytest.mark.skipif(backend == "compiled", reason="the compiled extension has no kernel for the "
                                        "fused loss: linear_cross_entropy runs on the torch and triton backends")

    @pytest.mark.parametrize("dtype", kc.DTYPES + ([torch.float64] if backend == "torch" else []), ids=str)
    @pytest.mark.parametrize("softcap", [None, 3.0], ids=["no-cap", "cap"])
    @pytest.mark.parametrize("num_reserved", [0, 5])
    @pytest.mark.parametrize("dim", [3, 37])
    @no_loss_kernel
    @forced
    def test_linear_cross_entropy(dtype, softcap, num_reserved, dim):
        kc.check_linear_cross_entropy(dev, dtype, dim=dim, num_reserved=num_reserved, softcap=softcap,
                                      seed=dim + num_reserved)

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
    @pytest.mark.parametrize("stats", [False, True])
    @no_loss_kernel
    @forced
    def test_linear_cross_entropy_master_rows(dtype, stats):
        kc.check_linear_cross_entropy(dev, dtype, master=True, stats=stats, softcap=30.0, seed=7)

    @no_loss_kernel
    @forced
    def test_linear_cross_entropy_one_big_tile():
        """A budget larger than the whole problem: one token block, one vocabulary tile."""
        kc.check_linear_cross_entropy(dev, torch.float32, tile_bytes=64 << 20, seed=11)

    return dict(test_linear_cross_entropy=test_linear_cross_entropy,
                test_linear_cross_entropy_master_rows=test_linear_cross_entropy_master_rows,
                test_linear_cross_entropy_one_big_tile=test_linear_cross_entropy_one_big_tile,
                test_gather=test_gather, test_gather_large=test_gather_large,
                test_gather_fp32_master_rows=test_gather_fp32_master_rows,
                test_gather_int8_table=test_gather_int8_table, test_scatter=test_scatter,
                test_scatter_skewed=test_scatter_skewed, test_segment_mean=test_segment_mean, test_empty=test_empty,
                test_agrees_with_reference=test_agrees_with_reference)
