"""The main job on the shipped demo model: the relations it shows hold on every seed (not fixed numbers)."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers", reason="the demo needs transformers")

from reserved_kernels.cli import add_demo_arguments  # noqa: E402
from reserved_kernels.demo import job as demo  # noqa: E402
from reserved_kernels.demo import training as demo_training  # noqa: E402
from reserved_kernels.pretrained import shipped_model  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _args(seed, **overrides):
    parser = argparse.ArgumentParser()
    add_demo_arguments(parser)
    args = parser.parse_args(["--seed", str(seed), "--device", "cpu"])
    vars(args).update(overrides)
    return args


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_demo_training_shows_every_claim(seed):
    """Description-mean init starts best; training cuts the term perplexity by at least 30%; ordinary text
    moves by at most 1%, tracked at every step through the cache; every frozen parameter is bit-identical."""
    args = _args(seed)
    model, vocab, plan, data, story = demo.prepare(args, log=lambda line: None)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    base_before = math.exp(demo_training.mean_loss(model, *data["ordinary"]))
    start = {init: demo_training.train_init(model, vocab, init, data, steps=0, lr=story.lr, seed=seed).first_loss
             for init in ("mean", "random", "untouched")}
    ours = demo_training.train_init(model, vocab, "description", data, steps=story.steps, lr=story.lr, seed=seed,
                           log=lambda line: None)
    (_, before), (_, after) = ours.curve[0], ours.curve[-1]
    assert before < start["random"] and before < start["mean"], (before, start)
    assert math.exp(after) <= 0.7 * math.exp(before), (before, after)
    base_after = math.exp(demo_training.mean_loss(ours.model, *data["ordinary"]))
    assert abs(base_after / base_before - 1) <= 0.01, (base_before, base_after)
    assert len(ours.ordinary) == story.steps + 1  # tracked at every step through the cache: the slow way's value
    assert ours.ordinary[-1][1] == pytest.approx(base_after, rel=1e-5)
    for name, p in ours.model.named_parameters():
        if not name.endswith("reserved_weight"):
            assert torch.equal(p, frozen[name]), name
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters())  # the base model was copied, not patched


def test_demo_command_prints_a_json_summary_and_writes_its_files(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "reserved_kernels", "demo", "--steps", "20", "--inits", "description",
                           "random", "--device", "cpu", "--json", "--out", str(out)],
                          capture_output=True, text=True, check=True, cwd=REPO)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert f"plot: {out / 'loss_curves.png'}" in proc.stdout and (out / "loss_curves.png").exists()
    assert "greedy continuation" not in proc.stdout  # the toy model continues every row alike: no line for it
    assert {"base_ppl_before", "base_ppl_after", "base_ppl_after_cached", "ordinary_curve", "term_ppl_before",
            "term_ppl_after", "init_loss", "frozen_identical", "state_bytes", "dense_state_bytes"} <= set(summary)
    assert len(summary["ordinary_curve"]) == 21
    assert summary["base_ppl_after_cached"] == pytest.approx(summary["base_ppl_after"], rel=1e-5)
    assert set(summary["init_loss"]) == {"description", "random"} and summary["frozen_identical"] is True
    assert summary["dense_state_bytes"] > 100 * summary["state_bytes"]
    assert (out / "adapter_model.safetensors").stat().st_size < 16 * 1024  # the rows, as a PEFT adapter
    assert {"tokenizer.model", "reserved_plan.json", "tokenizer.json", "tokenizer_config.json", "adapter_config.json",
            "adapter_model.safetensors"} <= set(os.listdir(out))


def test_demo_runs_on_a_hugging_face_checkpoint_folder(tmp_path):
    """--model: any Gemma checkpoint folder with its tokenizer (here: the shipped model saved elsewhere)."""
    import shutil

    model_dir = tmp_path / "model"
    shutil.copytree(shipped_model(), model_dir)
    from reserved_kernels.vocab import default_tokenizer_path

    shutil.copy(default_tokenizer_path(), model_dir / "tokenizer.model")
    summary = demo.run(_args(0, model=str(model_dir), steps=5, inits=["description"], json=False,
                             out=str(tmp_path / "out")))
    assert (tmp_path / "out" / "loss_curves.png").exists()  # the plot by default, in the output folder
    assert summary["frozen_identical"] and summary["dense_state_bytes"] == 1024 * 96 * 4 * 3


def test_the_shipped_model_comes_from_the_training_script_deterministically(tmp_path):
    """The script is seeded and single-threaded: two short runs write the same bytes."""
    script = os.path.join(REPO, "scripts", "train_demo_model.py")
    digests = []
    for name in ("a", "b"):
        proc = subprocess.run([sys.executable, script, "--out", str(tmp_path / name), "--steps", "3"],
                              capture_output=True, text=True, check=True)
        digests.append(proc.stdout.strip().splitlines()[-1].split("sha256 ")[1])
    assert digests[0] == digests[1]
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    shipped = json.loads(open(os.path.join(shipped_model(), "config.json")).read())
    assert {k: config[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers")} == \
        {k: shipped[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers")}
