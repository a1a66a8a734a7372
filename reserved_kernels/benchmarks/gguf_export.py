"""The GGUF export beside a plain copy of the same file, each in fresh processes: its time and its memory.

    python -m reserved_kernels.benchmarks.gguf_export [--model gemma-3-270m] [--terms 4] [--repeat 5]
        [--time-runs 3] [--out bench/results]
    reserved-kernels bench gguf

The rows: ``--terms`` terms planned on the model's own tokenizer (two slots each: bare and after a space), each row
its description's mean, saved as :func:`~reserved_kernels.save_reserved` saves them (a PEFT adapter folder and the
plan); the base: the model's own GGUF (Gemma 3 270M's Q4_K_M file, its table Q8_0). Two recipes:

* ``copy``: ``shutil.copyfile(base, out)`` (what ``cp`` does: the kernel copies);
* ``export``: :func:`~reserved_kernels.export_gguf` from the rows folder, every check included (the header parsed,
  the vocabulary's digest, the K rows quantised), written to a temporary sibling, flushed to disk and renamed.

Time: the median of ``--repeat`` runs a process, in ``--time-runs`` processes a recipe taken in turn (a shared
machine drifts), the output removed before each run (neither pays for deleting the last one). Memory: the peak RSS
of two runs beyond what the process held before them (its interpreter, torch, gguf and reserved_kernels
imported), glibc's mmap threshold fixed (``harness.MEASURING_ENV``), the median of 3 processes.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

CONFIG_KEYS = ("model", "terms", "repeat", "time_runs")
RECIPES = ("copy", "export")


def _operation(recipe: str, rows: str, base: str, out: str):
    import shutil

    from reserved_kernels.models.artifacts.gguf import export_gguf

    def run():
        if os.path.exists(out):
            os.unlink(out)
        if recipe == "copy":
            shutil.copyfile(base, out)
        else:
            export_gguf(rows, base, out)
    return run


def child(args) -> dict:
    import gguf  # noqa: F401  (imported before the measure: what the export's process holds anyway)
    import torch

    from reserved_kernels.benchmarks.harness import measure_step

    run = _operation(args.recipe, args.rows, args.base, args.target)
    try:
        return measure_step(run, torch.device("cpu"), args.measure, args.repeat)
    finally:
        if os.path.exists(args.target):
            os.unlink(args.target)


def _rows_folder(model: str, terms: int, folder: str) -> str:
    """``terms`` terms of Python's documentation planned on ``model``'s tokenizer, their rows saved in ``folder``."""
    import torch
    import transformers

    from reserved_kernels.demo.stories import PYDOC
    from reserved_kernels.models import patch_model, save_reserved
    from reserved_kernels.pretrained import resolve
    from reserved_kernels.vocab import ReservedVocab

    transformers.logging.set_verbosity_error()
    checkpoint = resolve(model)
    network = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, local_files_only=True)
    vocab = ReservedVocab.from_folder(checkpoint, model_vocab_size=network.get_input_embeddings().num_embeddings)
    vocab.assign(dict(list(PYDOC.terms.items())[:terms]))
    patch_model(network, vocab, init="description")
    return save_reserved(network, folder, plan=vocab)


def measure(args) -> dict:
    import tempfile

    from reserved_kernels.benchmarks.harness import run_interleaved
    from reserved_kernels.pretrained import gguf_file

    base = gguf_file(args.model)
    work = tempfile.mkdtemp(prefix="gguf-export-bench-")
    try:
        rows = _rows_folder(args.model, args.terms, os.path.join(work, "rows"))
        target = os.path.join(os.path.dirname(base), f".bench-{os.getpid()}.gguf")  # the base's file system
        cmds = {recipe: [sys.executable, "-m", "reserved_kernels.benchmarks.gguf_export", "--child",
                         f"--recipe={recipe}", f"--rows={rows}", f"--base={base}", f"--target={target}",
                         f"--repeat={args.repeat}"] for recipe in RECIPES}
        results = run_interleaved(cmds, "cpu", memory_runs=3, time_runs=args.time_runs)
    finally:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return dict(base=os.path.basename(base), base_bytes=os.path.getsize(base), slots=2 * args.terms,
                results=results)


def caption(payload: dict) -> str:
    from reserved_kernels.benchmarks.harness import machine_phrase

    env = payload["environment"]
    return (f"{machine_phrase(env)}, {env['date'][:10]}, commit {env.get('commit')}; {payload['base']} "
            f"({payload['base_bytes'] / 2**20:,.0f} MiB), {payload['slots']} rows and tokens; time: the median of "
            f"{payload['config']['repeat']} runs in each of {payload['config']['time_runs']} processes a recipe, "
            "taken in turn; memory: peak RSS beyond the process's imports, the median of 3 processes")


def table(payload: dict) -> str:
    results = payload["results"]
    copy = results["copy"]["median_ms"]
    lines = ["| recipe | median ms (p20–p80) | ÷ copy | peak RSS beyond imports |", "|---|---|---|---|"]
    for recipe in RECIPES:
        r = results[recipe]
        lines.append(f"| {recipe} | {r['median_ms']:,.0f} ({r['p20_ms']:,.0f}–{r['p80_ms']:,.0f}) | "
                     f"{r['median_ms'] / copy:.2f}× | {r['extra_bytes'] / 2**20:.1f} MiB |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gemma-3-270m",
                        help="a named checkpoint with a GGUF (default: gemma-3-270m)")
    parser.add_argument("--terms", type=int, default=4, help="terms planned (two rows each)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--time-runs", type=int, default=3)
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--recipe", choices=RECIPES, help=argparse.SUPPRESS)
    parser.add_argument("--rows", help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    parser.add_argument("--measure", choices=("time", "memory"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        import json

        print(json.dumps(child(args)))
        return
    from reserved_kernels.benchmarks.harness import environment, write_report

    payload = dict(measure(args), environment=environment(), config={k: getattr(args, k) for k in CONFIG_KEYS})
    date = datetime.date.today().isoformat()
    path = os.path.join(args.out, f"gguf-export-{args.model}-cpu-{date}.json")
    write_report(path, payload, f"*the GGUF export beside a plain copy* — {caption(payload)}", table(payload))
    print(table(payload))


if __name__ == "__main__":
    main()
