"""Smoke runs of the benchmark suite on the CPU (CI): the scripts run and write their results.

Not timed tests: nothing here asserts a duration. ``pytest bench --benchmark-only`` times the
reference gather with pytest-benchmark for a quick local look.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

import reserved_kernels as rk
from bench import kernels

HERE = os.path.dirname(os.path.abspath(__file__))


def test_kernel_matrix_smoke_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("RESERVED_KERNELS_CHECK_IDS", "0")  # main() turns the checks off for timing
    kernels.main(["--device", "cpu", "--smoke", "--out", str(tmp_path)])
    payload = json.loads((tmp_path / "kernels_cpu.json").read_text())
    impls = {(r["impl"], r["op"]) for r in payload["rows"]}
    assert {("torch", "forward"), ("torch", "backward"), ("torch-det", "backward"),
            ("F.embedding*scale", "forward"), ("nn.Embedding dense", "backward")} <= impls
    assert all(r["median_ms"] > 0 for r in payload["rows"])
    assert "| D | N | K |" in (tmp_path / "kernels_cpu.md").read_text()


def test_train_step_smoke_on_cpu(tmp_path):
    out = tmp_path / "step.json"
    subprocess.run([sys.executable, os.path.join(HERE, "train_step.py"), "--vocab", "5000", "--dim", "64",
                    "--tokens", "256", "--slots", "9", "--repeat", "2", "--out", str(out)], check=True)
    results = json.loads(out.read_text())["results"]
    assert {"reserved", "hook"} <= set(results)
    assert results["reserved"]["extra_bytes"] < results["hook"]["extra_bytes"]


def test_gather_benchmark(benchmark):
    emb = rk.ReservedEmbedding(20_000, 256, reserved_ids=list(range(7, 106)), scale=16.0)
    ids = torch.randint(0, 20_000, (2048,))
    out = benchmark(emb, ids)
    assert out.shape == (2048, 256)
