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
from reserved_kernels.benchmarks import host, kernels, loss, report, suite

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
    subprocess.run([sys.executable, "-m", "reserved_kernels.benchmarks.train_step", "--vocab", "5000", "--dim", "64",
                    "--tokens", "256", "--slots", "9", "--repeat", "2", "--out", str(tmp_path)], check=True,
                   capture_output=True)
    [path] = tmp_path.glob("step-random-cpu-*.json")
    results = json.loads(path.read_text())["results"]
    assert {"reserved", "hook"} <= set(results) and "body" not in results  # the floor is for whole-model steps
    assert results["reserved"]["extra_bytes"] < results["hook"]["extra_bytes"]
    # CPU memory is the median of three processes, each kept in the file.
    assert all(len(r["extra_bytes_runs"]) == 3 and sorted(r["extra_bytes_runs"])[1] == r["extra_bytes"]
               for r in results.values())
    assert "| **reserved-kernels** |" in path.with_suffix(".md").read_text()


def test_whole_model_step_has_the_body_alone_floor(tmp_path):
    subprocess.run([sys.executable, "-m", "reserved_kernels.benchmarks.train_step", "--vocab", "3000", "--dim", "64",
                    "--tokens", "256", "--slots", "4", "--repeat", "2", "--memory-runs", "1", "--head",
                    "--out", str(tmp_path)], check=True,
                   capture_output=True)
    [path] = tmp_path.glob("step-random-cpu-*.json")
    assert {"reserved", "hook", "body"} <= set(json.loads(path.read_text())["results"])
    assert "Ours over the body alone" in path.with_suffix(".md").read_text()


def test_frozen_step_benchmark_reports_each_text_and_its_frozen_share(tmp_path):
    """``--frozen``: the skip on and off beside the body alone on three kinds of text, each with the share of
    positions before their sequence's first term (all of ordinary text, none with a term at 0)."""
    subprocess.run([sys.executable, "-m", "reserved_kernels.benchmarks.train_step", "--vocab", "3000", "--dim", "64",
                    "--tokens", "1024", "--slots", "4", "--repeat", "2", "--memory-runs", "1", "--head", "--frozen",
                    "--out", str(tmp_path)], check=True, capture_output=True)
    [path] = tmp_path.glob("frozen-random-cpu-*.json")
    texts = json.loads(path.read_text())["texts"]
    assert set(texts) == {"ordinary", "random", "start"}
    share = {text: p["results"]["reserved"]["frozen_share"] for text, p in texts.items()}
    assert share["ordinary"] == 1.0 and share["start"] == 0.0 and 0 < share["random"] < 1
    assert all({"reserved", "noskip", "body"} == set(p["results"]) for p in texts.values())
    assert "| random | " in path.with_suffix(".md").read_text()


def test_interleaved_runs_take_the_timed_processes_in_turn_and_pool_their_steps(tmp_path):
    """run_interleaved on a CPU: round i of the timed processes starts at the i-th child; each child's steps are
    pooled over its processes; memory is the median of its memory processes."""
    from reserved_kernels.benchmarks.harness import run_interleaved

    log = tmp_path / "order"
    script = ("import json, sys; name, what = sys.argv[1], sys.argv[2]; "
              "open(sys.argv[3], 'a').write(name + what[10] + ' ');"
              "print(json.dumps({'times_ms': [float(len(open(sys.argv[3]).read()))], 'extra_bytes': 7, 'name': name}))")

    def cmd(name):  # the harness appends --measure=...: the child reads it as its second argument
        return [sys.executable, "-c", script.replace("sys.argv[3]", repr(str(log))), name]

    out = run_interleaved({n: cmd(n) for n in "abc"}, "cpu", memory_runs=1, time_runs=3)
    order = log.read_text().split()
    assert order[:9] == ["at", "bt", "ct", "bt", "ct", "at", "ct", "at", "bt"]  # t: time, then m: memory
    assert sorted(order[9:]) == ["am", "bm", "cm"]
    assert all(len(r["times_ms"]) == 3 and r["time_runs"] == 3 and r["extra_bytes"] == 7 for r in out.values())
    assert out["b"]["name"] == "b" and out["a"]["median_ms"] == sorted(out["a"]["times_ms"])[1]


def test_a_random_position_is_drawn_afresh_for_each_step():
    """Each step's batch places its terms anew (a fixed draw of two positions says little about a uniform one);
    the same draw gives the same batch, so every recipe sees the same batches."""
    from reserved_kernels.benchmarks.common import batch_text
    from reserved_kernels.benchmarks.train_step import frozen_share

    reserved = torch.arange(7, 11)
    base = torch.randint(20, 3000, (1024,), generator=torch.Generator().manual_seed(0))
    draws = [batch_text("random", base, reserved, 512, draw) for draw in range(4)]
    assert len({tuple(torch.isin(d, reserved).int().argmax(1).tolist()) for d in draws}) == 4
    assert torch.equal(batch_text("random", base, reserved, 512, 2), draws[2])
    assert all(torch.isin(d, reserved).sum(1).tolist() == [1, 1] for d in draws)
    first = torch.isin(draws[0], reserved).int().argmax(1)
    assert frozen_share(draws[0], reserved) == first.sum().item() / 1024


def test_loss_benchmark_smoke(tmp_path):
    payload = loss.main(["--vocab", "3000", "--dim", "32", "--tokens", "128", "--slots", "4", "--repeat", "2",
                         "--memory-runs", "1", "--out", str(tmp_path)])
    results = {r["impl"]: r for r in payload["results"]}
    assert {"fused", "unfused"} <= set(results) and all(r["median_ms"] > 0 for r in results.values())
    [md] = tmp_path.glob("loss-cpu-*.md")
    assert "**fused (ours)**" in md.read_text()


@pytest.mark.parametrize("argv, commands, deprecated", [
    (["bench", "loss"], ["loss"], False),
    (["bench", "gguf", "--model", "gemma-3-270m"], ["gguf"], False),
    (["bench", "readme", "OTHER.md"], ["readme"], False),
    (["bench", "--loss"], ["loss"], True),
    (["bench", "--host", "--device", "cuda"], ["host"], True),
    (["bench", "--gguf"], ["gguf"], True),
    (["bench", "--readme"], ["readme"], True),
    (["bench", "--model", "gemma-3-270m"], ["step", "frozen", "frozen-text"], True),
    (["bench", "--model", "gemma-3-270m", "--frozen-only"], ["frozen"], True),
    (["bench", "--model", "gemma-3-270m", "--frozen-text"], ["frozen-text"], True),
    (["bench", "--device", "cpu"], ["kernels"], True),
])
def test_bench_takes_subcommands_and_the_earlier_flags_with_a_deprecation(argv, commands, deprecated, capsys):
    from reserved_kernels.cli import bench_commands, build_parser

    args = build_parser().parse_args(argv)
    assert bench_commands(args) == commands
    message = capsys.readouterr().err
    assert ("deprecated" in message) == deprecated
    if deprecated:  # it names the new spelling
        assert all(f"reserved-kernels bench {c}" in message for c in commands)


def test_bench_readme_regenerates_the_results_section_of_the_readme_given(tmp_path):
    from reserved_kernels.cli import main

    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\n{report.README_START}\nstale\n{report.README_END}\n", encoding="utf-8")
    main(["bench", "readme", str(readme), "--out", os.path.join(REPO, "bench", "results")])
    text = readme.read_text(encoding="utf-8")
    assert "stale" not in text and report.readme_section(os.path.join(REPO, "bench", "results")) in text


def test_the_results_page_and_the_readme_headline_are_generated_from_the_committed_files():
    results = os.path.join(REPO, "bench", "results")
    with open(os.path.join(REPO, report.RESULTS_PAGE), encoding="utf-8") as f:
        assert report.readme_section(results) in f.read()
    with open(os.path.join(REPO, report.README), encoding="utf-8") as f:
        headline = report.headline_section(results)
        assert "the real Gemma 3 270M training step" in headline and headline in f.read()


def test_bench_readme_regenerates_the_page_and_the_headline_in_place(tmp_path, monkeypatch):
    """Without a PAGE, `bench readme` rewrites docs/results.md and the README's headline, each between its own
    markers, and leaves the rest of each file as it was."""
    from reserved_kernels.cli import main

    (tmp_path / "docs").mkdir()
    (tmp_path / report.RESULTS_PAGE).write_text(f"# R\n{report.README_START}\nold\n{report.README_END}\ntail\n")
    (tmp_path / report.README).write_text(f"# T\n{report.HEADLINE_START}\nold\n{report.HEADLINE_END}\nend\n")
    monkeypatch.chdir(tmp_path)
    main(["bench", "readme", "--out", os.path.join(REPO, "bench", "results")])
    page, readme = (tmp_path / report.RESULTS_PAGE).read_text(), (tmp_path / report.README).read_text()
    assert "old" not in page and page.startswith("# R\n") and page.endswith("tail\n")
    assert "old" not in readme and readme.startswith("# T\n") and readme.endswith("end\n")
    assert "| **reserved-kernels** |" in readme


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
    out = benchmark(rk.ops.scatter_grad, grad, ids, emb.slot_map, 99, 16.0, torch.float32)
    assert out.shape == (99, 256)


@pytest.mark.benchmark(group="backward")
def test_bench_dense_backward(benchmark, table):
    emb, ids = table
    grad = torch.randn(2048, 256)
    out = benchmark(torch.ops.aten.embedding_dense_backward, grad, ids, 50_000, -1, False)
    assert out.shape == (50_000, 256)


@pytest.fixture(scope="module")
def head():
    torch.manual_seed(0)
    emb = rk.ReservedEmbedding(32_768, 128, reserved_ids=list(range(7, 23)))
    hidden = torch.randn(512, 128, requires_grad=True)
    return rk.ReservedLMHead.tied_to(emb), hidden, torch.randint(0, 32_768, (512,))


@pytest.mark.benchmark(group="loss")
def test_bench_fused_loss(benchmark, head):
    lm_head, hidden, targets = head
    benchmark(lambda: lm_head(hidden, targets).backward())
    assert hidden.grad is not None


@pytest.mark.benchmark(group="loss")
def test_bench_unfused_loss(benchmark, head):
    lm_head, hidden, targets = head
    benchmark(lambda: F.cross_entropy(lm_head(hidden), targets).backward())
    assert hidden.grad is not None
