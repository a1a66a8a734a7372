"""The torch.library ops: opcheck, gradcheck, torch.compile, and clear errors on bad input."""

from __future__ import annotations

import pytest
import torch

import reserved_kernels as rk
from reserved_kernels import ops
from tests.kernel_cases import make_case


def _gather_args(dtype=torch.float32, requires_grad=True, int8=False, master=False):
    c = make_case(device="cpu", dtype=dtype, dim=7, num_reserved=3, shape=(2, 9), int8=int8, master=master)
    rw = c["reserved_weight"].requires_grad_(requires_grad)
    return (c["ids"], c["weight"], rw, c["slot_map"], c["scaler"], 2.5)


@pytest.mark.parametrize("table", ["float", "int8", "bf16-master"])
def test_opcheck_gather(table):
    args = _gather_args(torch.bfloat16 if table != "float" else torch.float32, int8=table == "int8",
                        master=table == "bf16-master")
    torch.library.opcheck(ops.gather, args)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_scatter_grad(out_dtype):
    c = make_case(device="cpu", dtype=torch.bfloat16, dim=7, num_reserved=3, shape=(2, 9))
    grad = torch.randn(2, 9, 7, dtype=torch.bfloat16)
    torch.library.opcheck(ops.scatter_grad, (grad, c["ids"], c["slot_map"], 3, 1.5, out_dtype))


def test_opcheck_segment_mean():
    c = make_case(device="cpu", dtype=torch.float32, dim=7, num_reserved=3)
    offsets = torch.tensor([0, 2, 5], dtype=torch.int64)
    torch.library.opcheck(ops.segment_mean, (c["weight"], c["reserved_weight"], c["slot_map"], None, offsets,
                                             torch.tensor([1, 2, 3, 4, 5])))


def test_gradcheck_float64():
    c = make_case(device="cpu", dtype=torch.float64, dim=5, num_reserved=3, shape=(4, 6))
    rw = c["reserved_weight"].clone().requires_grad_(True)

    def f(rw):
        return rk.reserved_embedding(c["ids"], c["weight"], rw, c["slot_map"], scale=1.5)

    assert torch.autograd.gradcheck(f, (rw,))


def test_a_table_that_requires_grad_is_refused_with_the_reason():
    """Only the reserved rows train: a trainable table (e.g. PEFT's modules_to_save copy) is a clear error."""
    c = make_case(device="cpu", dtype=torch.float32, dim=6, num_reserved=3, shape=(5, 8))
    weight = c["weight"].clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match="modules_to_save"):
        rk.reserved_embedding(c["ids"], weight, c["reserved_weight"], c["slot_map"])
    with torch.no_grad():  # no gradient wanted: fine
        rk.reserved_embedding(c["ids"], weight, c["reserved_weight"], c["slot_map"])


@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_fullgraph_forward_backward(dynamic):
    emb = rk.ReservedEmbedding(64, 12, reserved_ids=[3, 9, 20], scale=12 ** 0.5)

    def step(ids):
        return emb(ids).float().pow(2).mean()

    compiled = torch.compile(step, fullgraph=True, dynamic=dynamic, backend="aot_eager")
    ids = torch.tensor([[3, 9, 1, 20, 3], [5, 6, 7, 8, 9]])
    loss = compiled(ids)
    loss.backward()
    got = emb.reserved_weight.grad.clone()
    emb.reserved_weight.grad = None
    step(ids).backward()
    torch.testing.assert_close(got, emb.reserved_weight.grad)
    torch.testing.assert_close(loss, step(ids))


def test_compile_inductor():
    emb = rk.ReservedEmbedding(64, 12, reserved_ids=[3, 9, 20], scale=2.0)
    compiled = torch.compile(lambda ids: emb(ids).sum(), fullgraph=True)
    ids = torch.tensor([3, 9, 1, 20])
    compiled(ids).backward()
    assert emb.reserved_weight.grad is not None and emb.reserved_weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------- bad input

def test_bad_ids_raise_clear_errors():
    ids, w, rw, sm, scaler, _ = _gather_args()
    with pytest.raises(IndexError, match=r"ids must lie in \[0, 97\), got 97"):
        ops.gather(torch.tensor([0, 97]), w, rw, sm, None, 1.0)
    with pytest.raises(IndexError, match=r"got -1"):
        ops.gather(torch.tensor([-1, 3]), w, rw, sm, None, 1.0)
    with pytest.raises(TypeError, match="int32 or int64"):
        ops.gather(torch.tensor([0.0, 1.0]), w, rw, sm, None, 1.0)


def test_strict_id_checks_are_an_opt_in_switch():
    emb = rk.ReservedEmbedding(10, 4, reserved_ids=[1])
    assert not ops.strict_id_checks()  # by default ids are checked inside the kernels, without a sync
    ops.set_strict_id_checks(True)
    try:
        with pytest.raises(IndexError, match=r"ids must lie in \[0, 10\), got 12"):
            emb(torch.tensor([1, 12]))
    finally:
        ops.set_strict_id_checks(False)


def test_mismatched_tables_raise():
    ids, w, rw, sm, *_ = _gather_args()
    with pytest.raises(ValueError, match="reserved_weight must be"):
        ops.gather(ids, w, rw[:, :3].contiguous(), sm, None, 1.0)
    with pytest.raises(TypeError, match="table's dtype"):
        ops.gather(ids, w, rw.double(), sm, None, 1.0)
    with pytest.raises(ValueError, match="slot_map"):
        ops.gather(ids, w, rw, sm[:-1], None, 1.0)
    with pytest.raises(ValueError, match="one device"):
        ops.gather(ids.to("meta"), w, rw, sm, None, 1.0)
    with pytest.raises(ValueError, match="contiguous"):
        ops.gather(ids, w.t().contiguous().t(), rw, sm, None, 1.0)


def test_segment_mean_rejects_empty_and_bad_offsets():
    c = make_case(device="cpu", dtype=torch.float32, dim=4, num_reserved=2)
    args = (c["weight"], c["reserved_weight"], c["slot_map"], None)
    with pytest.raises(ValueError, match=r"destinations \[1\] have none"):
        ops.segment_mean(*args, torch.tensor([0, 2, 2, 3]), torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="start at 0"):
        ops.segment_mean(*args, torch.tensor([1, 3]), torch.tensor([1, 2, 3]))
    with pytest.raises(IndexError, match="src_ids"):
        ops.segment_mean(*args, torch.tensor([0, 1]), torch.tensor([1000]))


def test_scatter_grad_shape_checks():
    c = make_case(device="cpu", dtype=torch.float32, dim=4, num_reserved=2, shape=(3, 5))
    with pytest.raises(ValueError, match="grad_out must have shape"):
        ops.scatter_grad(torch.randn(3, 4, 4), c["ids"], c["slot_map"], 2, 1.0, torch.float32)
    with pytest.raises(TypeError, match="out_dtype must be floating"):
        ops.scatter_grad(torch.randn(3, 5, 4), c["ids"], c["slot_map"], 2, 1.0, torch.int32)


def test_large_offsets_do_not_overflow_int32():
    """N * D > 2**31: the reference indexes rows, never flat int32 offsets (kernels use int64 program ids)."""
    weight = torch.zeros(4, 2, dtype=torch.float16)
    weight[3] = 1.0
    ids = torch.full((2**30 + 8,), 3, dtype=torch.int32)  # 2**31 + 16 output elements, 4 GiB as fp16
    out = rk.reserved_embedding(ids, weight, torch.zeros(0, 2, dtype=torch.float16),
                                rk.build_slot_map(torch.empty(0, dtype=torch.int64), 4))
    assert out[-1].tolist() == [1.0, 1.0] and out.shape == (2**30 + 8, 2)
