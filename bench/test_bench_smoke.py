"""The benchmark suite in CI: smoke runs on the CPU (no timing assertions) and pytest-benchmark micro-benchmarks.

``pytest bench --benchmark-only`` times the micro-benchmarks; ``scripts/test.sh`` runs them once each
with ``--benchmark-disable`` as a check that they work.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import reserved_kernels as rk
from reserved_kernels.benchmarks import host, kernels, report, suite

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_suite_smoke_on_cpu(tmp_path):
    payload, path = suite.run_matrix("cpu", smoke=True, out=str(tmp_path), log=lambda s: None)
    seen = {(r["workload"], r["impl"]) for r in payload["rows"]}
    expected = {("forward", "torch"), ("forward", "F.embedding*scale"), ("forward+backward", "torch"),
                ("forward", "compiled"), ("forward+backward", "compiled"),
                ("forward+backward", "nn.Embedding+hook"), ("int8 forward", "torch"),
                ("int8 forward", "dequantise table"), ("mean init", "torch"), ("mean init", "per-token loop"),
                ("train step (embedding)", "reserved"), ("train step (embedding)", "hook"),
                ("train step (embedding + tied head)", "reserved"), ("train step (embedding + tied head)", "hook")}
    assert expected <= seen
    assert all(r["median_ms"] > 0 and r["p20_ms"] <= r["p80_ms"] for r in payload["rows"])
    assert payload["environment"]["torch"] == torch.__version__
    markdown = (tmp_path / os.path.basename(path).replace(".json", ".md")).read_text()
    assert "### mean init" in markdown and "peer ÷ ours" in markdown


def test_kernel_matrix_smoke_on_cpu(tmp_path):
    kernels.main(["--device", "cpu", "--smoke", "--out", str(tmp_path)])
    payload = json.loads((tmp_path / "kernels_cpu.json").read_text())
    impls = {(r["impl"], r["op"]) for r in payload["rows"]}
    assert {("torch", "forward"), ("torch", "backward"), ("F.embedding*scale", "forward"),
            ("nn.Embedding dense", "backward")} <= impls
    assert {r["dist"] for r in payload["rows"]} == {"uniform", "zipf", "one-hot-row"}


def test_host_overhead_smoke_on_cpu():
    payload = host.measure("cpu", calls=5, samples=3)
    assert {(r["op"], r["impl"]) for r in payload["rows"]} == {
        ("forward", "ours"), ("forward", "F.embedding*scale"), ("forward", "nn.Embedding*scale"),
        ("forward+backward", "ours"), ("forward+backward", "nn.Embedding*scale")}
    assert all(r["host_us"] > 0 for r in payload["rows"]) and "ours ÷ this" in host.table(payload)


def test_train_step_cli_smoke(tmp_path):
    out = tmp_path / "step.json"
    subprocess.run([sys.executable, "-m", "reserved_kernels.benchmarks.train_step", "--vocab", "5000", "--dim", "64",
                    "--tokens", "256", "--slots", "9", "--repeat", "2", "--out", str(out)], check=True,
                   capture_output=True)
    results = json.loads(out.read_text())["results"]
    assert {"reserved", "hook"} <= set(results)
    assert results["reserved"]["extra_bytes"] < results["hook"]["extra_bytes"]


def test_readme_results_are_generated_from_the_committed_files():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    assert report.readme_section(os.path.join(REPO, "bench", "results")) in readme


# ----------------------------------------------------------------------------- pytest-benchmark

@pytest.fixture(scope="module")
def table():
    torch.manual_seed(0)
    emb = rk.ReservedEmbedding(50_000, 256, reserved_ids=list(range(7, 106)), scale=16.0)
    ids = torch.randint(0, 50_000, (2048,))
    ids[:99] = emb.reserved_ids
    return emb, ids


@pytest.mark.benchmark(group="forward")
def test_bench_forward_ours(benchmark, table):
    emb, ids = table
    assert benchmark(emb, ids).shape == (2048, 256)


@pytest.mark.benchmark(group="forward")
def test_bench_forward_plain_lookup(benchmark, table):
    emb, ids = table
    scale = torch.tensor(16.0)
    assert benchmark(lambda: F.embedding(ids, emb.weight) * scale).shape == (2048, 256)


@pytest.mark.benchmark(group="backward")
def test_bench_scatter_grad(benchmark, table):
    emb, ids = table
    grad = torch.randn(2048, 256)
    out = benchmark(rk.ops.scatter_grad, grad, ids, emb._slot_map, 99, 16.0, torch.float32)
    assert out.shape == (99, 256)


@pytest.mark.benchmark(group="backward")
def test_bench_dense_backward(benchmark, table):
    emb, ids = table
    grad = torch.randn(2048, 256)
    out = benchmark(torch.ops.aten.embedding_dense_backward, grad, ids, 50_000, -1, False)
    assert out.shape == (50_000, 256)
