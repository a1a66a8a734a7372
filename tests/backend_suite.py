"""The parametrized suite every backend runs (reference on CPU, Triton in the interpreter, Triton/CUDA on a GPU).

A test module binds it with ``make_suite(impl, device)`` and re-exports the test functions.
"""

from __future__ import annotations

import pytest
import torch

from tests import kernel_cases as kc


def make_suite(get_impl, device: str):
    """Test functions checking the backend returned by ``get_impl()`` on ``device``."""
    dev = torch.device(device)

    @pytest.mark.parametrize("dtype", kc.DTYPES, ids=str)
    @pytest.mark.parametrize("dim", kc.DIMS)
    @pytest.mark.parametrize("num_reserved", [0, 1, 5])
    @pytest.mark.parametrize("shape", [(0,), (9,), (4, 13)], ids=str)
    def test_gather(dtype, dim, num_reserved, shape):
        kc.check_gather(get_impl(), dev, dtype, dim, num_reserved, shape, seed=dim * 7 + num_reserved)

    @pytest.mark.parametrize("dtype", kc.DTYPES, ids=str)
    @pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64], ids=str)
    def test_gather_int8_table(dtype, id_dtype):
        kc.check_gather(get_impl(), dev, dtype, 123, 5, (3, 17), int8=True, id_dtype=id_dtype)

    @pytest.mark.parametrize("dtype", kc.DTYPES, ids=str)
    @pytest.mark.parametrize("dim", [3, 123])
    @pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
    @pytest.mark.parametrize("shape", [(9,), (5, 40)], ids=str)
    def test_scatter(dtype, dim, deterministic, shape):
        kc.check_scatter(get_impl(), dev, dtype, dim, 5, shape, deterministic, seed=dim)

    @pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
    def test_scatter_one_hot(deterministic):
        kc.check_one_hot_scatter(get_impl(), dev, torch.float32, deterministic)

    @pytest.mark.parametrize("dtype", kc.DTYPES, ids=str)
    @pytest.mark.parametrize("int8", [False, True], ids=["float", "int8"])
    def test_segment_mean(dtype, int8):
        kc.check_segment_mean(get_impl(), dev, dtype, 37, int8=int8)

    @pytest.mark.parametrize("dtype", kc.DTYPES, ids=str)
    def test_empty(dtype):
        kc.check_empty(get_impl(), dev, dtype)

    @pytest.mark.parametrize("dtype", kc.DTYPES, ids=str)
    def test_agrees_with_reference(dtype):
        kc.reference_agrees(get_impl(), dev, dtype)

    return dict(test_gather=test_gather, test_gather_int8_table=test_gather_int8_table, test_scatter=test_scatter,
                test_scatter_one_hot=test_scatter_one_hot, test_segment_mean=test_segment_mean,
                test_empty=test_empty, test_agrees_with_reference=test_agrees_with_reference)
