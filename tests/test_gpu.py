"""Triton and the compiled CUDA kernels on a GPU: the shared suite, skew, dispatch, compile, CUDA graphs, asserts."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import reserved_kernels as rk
from reserved_kernels import _backend, ops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
BACKENDS = ["triton", "compiled"]


def _skip_unavailable(backend):
    ok, why = _backend.availability(backend, "cuda")
    if not ok:
        pytest.skip(why)


if torch.cuda.is_available():
    from tests import kernel_cases as kc
    from tests.backend_suite import make_suite

    for _backend_name in BACKENDS:
        _ok, _why = _backend.availability(_backend_name, "cuda")
        globals().update({f"{name}_{_backend_name}": fn for name, fn in
                          make_suite(_backend_name, "cuda", skip_reason=None if _ok else _why).items()})

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
    @pytest.mark.parametrize("softcap", [None, 30.0], ids=["no-cap", "cap"])
    def test_linear_cross_entropy_at_a_real_width(dtype, softcap):
        """Gemma 2's width, several token blocks and vocabulary tiles of the default 256 MiB budget: the tensor
        cores' 16-bit GEMMs with fp32 output, and the Triton tile kernel."""
        kc.check_linear_cross_entropy(torch.device("cuda"), dtype, vocab=40_001, dim=2304, num_reserved=64,
                                      tokens=3000, softcap=softcap, tile_bytes=256 << 20, master=dtype != torch.float32)

    @pytest.mark.parametrize("backend", BACKENDS)
    @pytest.mark.parametrize("kind", ["one-hot-row", "zipf"])
    def test_skewed_large(backend, kind):
        _skip_unavailable(backend)
        with ops.forced(backend):
            kc.check_skewed_scatter(torch.device("cuda"), torch.bfloat16, kind, num_tokens=20_000, dim=3840,
                                    num_reserved=64)


@pytest.mark.parametrize("backend", ["torch", *BACKENDS])
def test_module_forced_backend_matches_reference(backend):
    _skip_unavailable(backend)
    torch.manual_seed(0)
    emb = rk.ReservedEmbedding(5000, 2304, reserved_ids=list(range(7, 106)), scale=2304 ** 0.5,
                               device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        emb.reserved_weight.add_(torch.randn_like(emb.reserved_weight) * 1e-3)  # fp32 bits below bf16's resolution
    ids = torch.randint(0, 5000, (4, 257), device="cuda")
    ids[:, :99] = torch.arange(7, 106, device="cuda")
    merged = emb.merged_weight()
    expected = torch.nn.functional.embedding(ids, merged) * torch.tensor(2304 ** 0.5, dtype=torch.bfloat16)
    with ops.forced(backend):
        out = emb(ids)
        assert torch.equal(out, expected)
        out.float().sum().backward()
    assert emb.reserved_weight.grad.shape == (99, 2304) and emb.reserved_weight.grad.dtype == torch.float32


def test_default_dispatch_on_cuda():
    expected = "compiled" if _backend.availability("compiled", "cuda")[0] else "triton"
    assert ops.active("cuda") == expected


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_id_fails_a_device_assertion_naming_the_range(backend, tmp_path):
    """A bad id never yields a silent zero row: the kernel asserts (in a fresh process: it poisons the context)."""
    _skip_unavailable(backend)
    code = ("import torch, reserved_kernels as rk\n"
            "emb = rk.ReservedEmbedding(100, 64, reserved_ids=[3], device='cuda')\n"
            "out = emb(torch.tensor([5, 100, 3], device='cuda'))\n"
            "torch.cuda.synchronize()\n"
            "print('no assertion')\n")
    env = dict(os.environ, **{_backend.ENV_VAR: backend})
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "no assertion" not in text
    assert "ids must lie in [0, " in text and ("assert" in text.lower())


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


@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_graph_capture_of_a_training_step(backend):
    """Forward, backward and AdamW step captured in one CUDA graph: no host synchronisation anywhere."""
    _skip_unavailable(backend)
    torch.manual_seed(0)
    emb = rk.ReservedEmbedding(50_000, 512, reserved_ids=list(range(7, 106)), scale=512 ** 0.5, device="cuda",
                               dtype=torch.bfloat16)
    frozen = emb.weight.detach().clone()
    opt = torch.optim.AdamW([emb.reserved_weight], lr=1e-3, weight_decay=0.1, capturable=True)
    ids = torch.randint(0, 50_000, (4, 512), device="cuda")
    ids[:, :99] = torch.arange(7, 106, device="cuda")

    def step():
        opt.zero_grad(set_to_none=False)
        emb(ids).float().pow(2).mean().backward()
        opt.step()

    with ops.forced(backend):
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


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_master_rows_learn_at_a_small_learning_rate_on_cuda(backend):
    _skip_unavailable(backend)
    table = torch.randn(5000, 256, device="cuda", dtype=torch.bfloat16)
    emb = rk.ReservedEmbedding.from_embedding(table, [3, 4])
    start = emb.reserved_weight.detach().clone()
    opt = torch.optim.AdamW([emb.reserved_weight], lr=1e-5, weight_decay=0.0)
    with ops.forced(backend):
        for _ in range(3):
            opt.zero_grad()
            emb(torch.tensor([3, 4, 3], device="cuda")).float().sum().backward()
            opt.step()
    assert (emb.reserved_weight.detach() - start).abs().max().item() > 2e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_patched_gemma_on_cuda_is_bit_identical_and_trains(backend):
    pytest.importorskip("transformers", reason="needs transformers")
    _skip_unavailable(backend)
    from reserved_kernels.models import patch_model
    from tests.families import tiny_gemma

    model = tiny_gemma("gemma2", dtype=torch.bfloat16).cuda()
    ids = torch.randint(108, 1024, (2, 32), device="cuda")
    ids[:, 5] = 7
    before = model(ids).logits
    patch_model(model, list(range(7, 12)))
    with ops.forced(backend):
        assert torch.equal(model(ids).logits, before)
        model(input_ids=ids, labels=ids).loss.backward()
    assert model.get_input_embeddings().reserved_weight.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_offsets_beyond_int32_on_cuda(backend):
    """N * D > 2**31 output elements: the kernels' int64 address arithmetic must not wrap."""
    _skip_unavailable(backend)
    weight = torch.zeros(4, 2, dtype=torch.float16, device="cuda")
    weight[3] = 1.0
    reserved = torch.full((1, 2), 2.0, dtype=torch.float16, device="cuda")
    ids = torch.full((2**30 + 8,), 3, dtype=torch.int32, device="cuda")
    ids[-1] = 1
    with ops.forced(backend):
        out = ops.gather(ids, weight, reserved, rk.build_slot_map(torch.tensor([1]), 4, "cuda"), None, 1.0)
    assert out[-2].tolist() == [1.0, 1.0] and out[-1].tolist() == [2.0, 2.0]
