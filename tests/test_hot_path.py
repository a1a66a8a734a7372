"""The hot path's budgets, proven on a CPU-only machine: which ops a call runs, and that nothing synchronises.

* Op budget (``torch.profiler``): a forward runs one op, a backward at most three, none of them an
  N-sized sort, searchsorted, cat or nonzero.
* No host-device synchronisation on the CUDA code path: fake tensors stand for CUDA tensors (Triton's
  launches are stubbed out and recorded), and any ``.item()``, ``int()``, ``.tolist()``, ``nonzero`` or
  host-to-device copy fails the test. The compiled CUDA host code is checked from its source in
  ``test_cuda_extension.py``.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import reserved_kernels as rk
from reserved_kernels import _backend

aten = torch.ops.aten
FORBIDDEN = {"sort", "searchsorted", "cat", "nonzero", "argsort", "unique", "_unique2", "masked_select"}


def _top_level_ops(fn) -> list[str]:
    """Names of the ops ``fn`` calls directly (not those inside another op), from the profiler."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()

    def is_op(name: str) -> bool:
        return name.startswith(("aten::", "reserved_kernels::"))

    def nested(event) -> bool:
        parent = event.cpu_parent
        while parent is not None:
            if is_op(parent.name):
                return True
            parent = parent.cpu_parent
        return False

    return [e.name for e in prof.events() if is_op(e.name) and not nested(e)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_forward_is_one_op_and_a_backward_at_most_three(dtype):
    emb = rk.ReservedEmbedding(1000, 64, reserved_ids=list(range(7, 106)), scale=8.0, dtype=dtype)
    ids = torch.randint(0, 1000, (4, 512))
    ids[:, 0] = 7
    forward_ops = _top_level_ops(lambda: emb(ids))
    assert forward_ops == ["reserved_kernels::gather"], forward_ops
    out = emb(ids)
    grad = torch.randn_like(out)
    backward_ops = _top_level_ops(lambda: out.backward(grad))
    kernel_ops = [op for op in backward_ops if op not in ("aten::empty", "aten::empty_strided", "aten::detach")]
    assert "reserved_kernels::scatter_grad" in kernel_ops and len(kernel_ops) <= 3, backward_ops
    assert not {op.split("::")[1] for op in backward_ops} & FORBIDDEN


class _SyncDetector(TorchDispatchMode):
    """Records every op that would make the host wait for a CUDA stream, or copy host data to the device."""

    def __init__(self):
        super().__init__()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.name()
        if func in (aten._local_scalar_dense.default, aten.item.default) or "nonzero" in name:
            self.syncs.append(name)
        elif func in (aten.lift_fresh.default, aten.lift_fresh_copy.default):
            if args[0].device.type != "cpu":  # a constant made on the device from host data
                self.syncs.append(name)
        elif func in (aten._to_copy.default, aten.copy_.default):
            src = args[1] if func is aten.copy_.default else args[0]
            target = (args[0].device if func is aten.copy_.default
                      else kwargs.get("device", getattr(src, "device", None)))
            if (isinstance(src, torch.Tensor) and src.device.type == "cpu" and target is not None
                    and torch.device(target).type == "cuda"):
                self.syncs.append(name)
        return func(*args, **kwargs)


class _Launches:
    """Stands for a Triton kernel: ``kernel[grid](...)`` records the launch instead of running it."""

    def __init__(self, name: str, log: list):
        self.name, self.log = name, log

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.log.append((self.name, grid))


def _stub_triton(monkeypatch) -> list:
    from reserved_kernels.triton import launchers

    log: list = []
    for name in ("gather_kernel", "count_kernel", "place_kernel", "sum_kernel", "segment_mean_kernel"):
        monkeypatch.setattr(launchers, name, _Launches(name, log))
    monkeypatch.setattr(launchers, "_device_guard", lambda t: contextlib.nullcontext())
    return log


@contextlib.contextmanager
def _fake_cuda():
    """FakeTensorMode in which real CPU tensors may be moved to a (fake) CUDA device."""
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        yield mode


def _cpu_module(dtype):
    """Built for real on the CPU (building checks its arguments on the host); moved to fake CUDA later."""
    emb = rk.ReservedEmbedding(5000, 256, reserved_ids=list(range(7, 106)), scale=16.0, dtype=dtype)
    ids = torch.randint(0, 5000, (8, 512))
    ids[:, 0] = 7
    return emb, ids


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_module_and_autograd_on_cuda_tensors_never_synchronise(dtype):
    """Module, functional and autograd layers (C++, or Python without the extension) on fake CUDA tensors."""
    emb, ids = _cpu_module(dtype)
    with _fake_cuda():
        emb, ids = emb.to("cuda"), ids.to("cuda")
        detector = _SyncDetector()
        with detector:
            out = emb(ids)
            # The backward node itself (the engine would start CUDA device threads, which need a real GPU).
            node = out.grad_fn
            grads = node(torch.ones_like(out)) if callable(node) else node.apply(torch.ones_like(out))
        grad = [g for g in grads if g is not None]
        assert len(grad) == 1 and grad[0].shape == (99, 256) and grad[0].is_cuda
        assert grad[0].dtype == emb.reserved_weight.dtype
    assert not detector.syncs, detector.syncs


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_cuda_kernels_host_code_never_synchronises(backend, dtype, monkeypatch):
    """Triton's launchers (kernels stubbed, launches counted) and the reference, called on fake CUDA tensors."""
    if backend == "triton" and not _backend.triton_status()[0]:
        pytest.skip(_backend.triton_status()[1])
    from reserved_kernels import reference

    impl = reference
    if backend == "triton":
        from reserved_kernels.triton import launchers as impl
    launches = _stub_triton(monkeypatch) if backend == "triton" else []
    emb, ids = _cpu_module(dtype)
    with _fake_cuda():
        emb, ids = emb.to("cuda"), ids.to("cuda")
        offsets, src = torch.tensor([0, 3, 5]).to("cuda"), torch.tensor([200, 300, 400, 7, 9]).to("cuda")
        detector = _SyncDetector()
        with detector:
            out = impl.gather(ids, emb.weight, emb.reserved_weight, emb.slot_map, None, 16.0)
            forward_launches = len(launches)
            grad = impl.scatter_grad(torch.ones_like(out), ids, emb.slot_map, 99, 16.0, emb.reserved_weight.dtype)
            impl.segment_mean(emb.weight, emb.reserved_weight, emb.slot_map, None, offsets, src)
        assert out.shape == (8, 512, 256) and grad.shape == (99, 256)
    assert not detector.syncs, detector.syncs
    if backend == "triton":
        kernels = [name for name, _ in launches]
        assert forward_launches == 1 and kernels[1:4] == ["count_kernel", "place_kernel", "sum_kernel"], kernels
        assert kernels[4:] == ["segment_mean_kernel"], kernels


def test_the_python_autograd_path_never_synchronises_either():
    """Without the compiled extension, the Python autograd formula passes the same no-sync check."""
    env = dict(os.environ, **{_backend.EXTENSION_ENV_VAR: "0"})
    env.pop(_backend.ENV_VAR, None)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                           "module_and_autograd"],
                          env=env, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 passed" in proc.stdout


# FakeTensor stands for CUDA here: a data_ptr() read on it is a deprecation warning now and an error in later torch.
@pytest.mark.filterwarnings("error::UserWarning")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_the_fused_loss_host_code_never_synchronises(backend, dtype, monkeypatch):
    """The tiled loss on fake CUDA tensors: tile shapes come from shapes alone, targets are checked on the
    device; Triton's tile launches are stubbed and counted (one per vocabulary tile and token block)."""
    if backend == "triton" and not _backend.triton_status()[0]:
        pytest.skip(_backend.triton_status()[1])
    from reserved_kernels import reference

    impl, log = reference, []
    if backend == "triton":
        from reserved_kernels.triton import launchers as impl

        monkeypatch.setattr(impl, "lse_tile_kernel", _Launches("lse_tile_kernel", log))
        monkeypatch.setattr(impl, "_device_guard", lambda t: contextlib.nullcontext())
    emb, _ = _cpu_module(dtype)
    hidden = torch.randn(1024, 256).to(dtype)
    targets = torch.randint(0, 5000, (1024,))
    with _fake_cuda():
        emb, hidden, targets = emb.to("cuda"), hidden.to("cuda"), targets.to("cuda")
        detector = _SyncDetector()
        with detector, torch.no_grad():  # as inside the op, below autograd
            loss, entropy, top1, grad_hidden, grad_rows, frozen_lse = impl.linear_cross_entropy(
                hidden, emb.weight, emb.reserved_weight, emb.slot_map, targets, -100, 30.0, 1 << 20, True, True, True)
        assert loss.shape == (1024,) and grad_hidden.shape == (1024, 256) and grad_rows.shape == (1024, 99)
        assert frozen_lse.shape == (1024,)
    assert not detector.syncs, detector.syncs
    if backend == "triton":
        from reserved_kernels.ops.fused_loss import bytes_per_tile_element, tile_shape

        rows, cols = tile_shape(1024, 5000, 1 << 20, bytes_per_tile_element(dtype, "cuda", False, True))
        blocks, tiles = -(-1024 // rows), -(-5000 // cols)
        assert len(log) == blocks * (tiles + 1), (len(log), blocks, tiles)  # + the reserved tile per block


def test_the_frozen_position_split_copies_its_indices_to_the_device_once(monkeypatch):
    """models.position_split.split_hidden on fake CUDA (a runner standing for the body): the plan's row and position
    indices cross to the device in one copy, and nothing reads the device back. (The plan itself comes from the
    one host read of the ids a step, models.position_split.split_points.)"""
    from reserved_kernels.models import position_split

    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self)  # page-locking: no fake implementation
    plan = position_split.SplitPlan.of([300, 100, 300, 20, 100], 300)
    assert plan.frozen == [0, 2] and plan.whole == [3] and plan.prefixes == {100: [1, 4]}
    calls = []

    class Body:
        def whole(self, rows):
            calls.append(("whole", torch.is_grad_enabled()))
            return torch.zeros(rows.shape[0], 300, 8, device=rows.device)

        def prefix(self, rows, stop):
            calls.append(("prefix", torch.is_grad_enabled()))
            return torch.zeros(rows.shape[0], stop, 8, device=rows.device), "its cache"

        def suffix(self, rows, start, prefix):
            calls.append(("suffix", torch.is_grad_enabled(), prefix))
            return torch.ones(rows.shape[0], 300 - start, 8, device=rows.device)

    with _fake_cuda():
        detector = _SyncDetector()
        with detector:
            frozen_part, live = position_split.split_hidden(plan, Body(), torch.device("cuda"))
        assert frozen_part.hidden.shape == (2 * 300 + 2 * 100, 8) and live.hidden.shape == (300 + 2 * 200, 8)
        assert frozen_part.where.is_cuda and live.where.shape == (700,)
    assert calls == [("whole", False), ("whole", True), ("prefix", False), ("suffix", True, "its cache")]
    assert detector.syncs == ["aten::_to_copy"], detector.syncs
