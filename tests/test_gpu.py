"""Triton and CUDA backends on a GPU: the shared suite, dispatch, torch.compile and CUDA-graph capture."""

from __future__ import annotations

import pytest
import torch

import reserved_kernels as rk
from reserved_kernels import _backend

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

if torch.cuda.is_available():
    from reserved_kernels.ops import _cuda
    from reserved_kernels.triton import launchers
    from tests import kernel_cases as kc
    from tests.backend_suite import make_suite

    def _cuda_backend():
        ok, why = _backend.cuda_extension_status()
        if not ok:
            pytest.skip(f"CUDA extension not built: {why}")
        return _cuda

    globals().update({f"{name}_triton": fn for name, fn in make_suite(lambda: launchers, "cuda").items()})
    globals().update({f"{name}_cuda": fn for name, fn in make_suite(_cuda_backend, "cuda").items()})

    @pytest.mark.parametrize("backend", ["triton", "cuda"])
    def test_one_hot_large(backend):
        impl = launchers if backend == "triton" else _cuda_backend()
        for det in (False, True):
            kc.check_one_hot_scatter(impl, torch.device("cuda"), torch.bfloat16, det, num_tokens=20_000, dim=3840)


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_module_forced_backend_matches_reference(backend, monkeypatch):
    if backend == "cuda" and not _backend.cuda_extension_status()[0]:
        pytest.skip("CUDA extension not built")
    torch.manual_seed(0)
    emb = rk.ReservedEmbedding(5000, 2304, reserved_ids=list(range(7, 106)), scale=2304 ** 0.5,
                               device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, 5000, (4, 257), device="cuda")
    ids[:, :99] = torch.arange(7, 106, device="cuda")
    merged = emb.merged_weight()
    expected = torch.nn.functional.embedding(ids, merged) * torch.tensor(2304 ** 0.5, dtype=torch.bfloat16)
    monkeypatch.setenv(_backend.ENV_VAR, backend)
    out = emb(ids)
    assert torch.equal(out, expected)
    out.float().sum().backward()
    assert emb.reserved_weight.grad.shape == (99, 2304)


def test_default_dispatch_on_cuda(monkeypatch):
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    assert _backend.select("gather", torch.device("cuda"), torch.bfloat16) in ("triton", "cuda")
    assert _backend.select("gather", torch.device("cuda"), torch.float64) == "torch"


def test_compile_inductor_on_cuda():
    emb = rk.ReservedEmbedding(1000, 256, reserved_ids=[7, 8, 9], scale=16.0, device="cuda", dtype=torch.bfloat16)
    compiled = torch.compile(lambda ids: emb(ids).float().pow(2).mean(), fullgraph=True)
    ids = torch.randint(0, 1000, (8, 64), device="cuda")
    ids[:, 0] = 7
    compiled(ids).backward()
    got = emb.reserved_weight.grad.clone()
    emb.reserved_weight.grad = None
    emb(ids).float().pow(2).mean().backward()
    torch.testing.assert_close(got, emb.reserved_weight.grad)


@pytest.mark.parametrize("deterministic", [False, True])
def test_cuda_graph_capture_of_a_training_step(deterministic):
    """Forward, backward and AdamW step captured in one CUDA graph: no host synchronisation anywhere."""
    torch.manual_seed(0)
    emb = rk.ReservedEmbedding(50_000, 512, reserved_ids=list(range(7, 106)), scale=512 ** 0.5, device="cuda",
                               deterministic=deterministic)
    frozen = emb.weight.detach().clone()
    opt = torch.optim.AdamW(emb.parameters(), lr=1e-3, weight_decay=0.1, capturable=True)
    ids = torch.randint(0, 50_000, (4, 512), device="cuda")
    ids[:, :99] = torch.arange(7, 106, device="cuda")

    def step():
        opt.zero_grad(set_to_none=False)
        emb(ids).pow(2).mean().backward()
        opt.step()

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm-up: Triton compiles, AdamW creates its state
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    before = emb.reserved_weight.detach().clone()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert not torch.equal(before, emb.reserved_weight.detach())
    assert torch.equal(frozen, emb.weight)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_patched_gemma_on_cuda_is_bit_identical_and_trains(backend, monkeypatch):
    pytest.importorskip("transformers", reason="needs transformers")
    if backend == "cuda" and not _backend.cuda_extension_status()[0]:
        pytest.skip("CUDA extension not built")
    from reserved_kernels.gemma import patch_model, tiny_gemma

    monkeypatch.setenv(_backend.ENV_VAR, backend)
    model = tiny_gemma("gemma2", dtype=torch.bfloat16).cuda()
    ids = torch.randint(108, 1024, (2, 32), device="cuda")
    ids[:, 5] = 7
    before = model(ids).logits
    patch_model(model, list(range(7, 12)))
    assert torch.equal(model(ids).logits, before)
    model(input_ids=ids, labels=ids).loss.backward()
    assert model.get_input_embeddings().reserved_weight.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_offsets_beyond_int32_on_cuda(backend, monkeypatch):
    """N * D > 2**31 output elements: the kernels' int64 address arithmetic must not wrap."""
    if backend == "cuda" and not _backend.cuda_extension_status()[0]:
        pytest.skip("CUDA extension not built")
    monkeypatch.setenv(_backend.ENV_VAR, backend)
    weight = torch.zeros(4, 2, dtype=torch.float16, device="cuda")
    weight[3] = 1.0
    reserved = torch.full((1, 2), 2.0, dtype=torch.float16, device="cuda")
    ids = torch.full((2**30 + 8,), 3, dtype=torch.int32, device="cuda")
    ids[-1] = 1
    out = rk.reserved_embedding(ids, weight, reserved, rk.build_slot_map(torch.tensor([1]), 4, "cuda"))
    assert out[-2].tolist() == [1.0, 1.0] and out[-1].tolist() == [2.0, 2.0]
