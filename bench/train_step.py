"""One training step (embedding forward, backward, AdamW) for each recipe, each in a fresh process.

    python bench/train_step.py [--device cpu|cuda] [--vocab 256000] [--dim 2048] [--slots 99] [--tokens 4096]

Recipes: ``reserved`` (this package), ``hook`` (``nn.Embedding`` + a gradient hook that zeroes the
other rows, AdamW over the whole table, then restoring the frozen rows that weight decay moved, as
users must) and ``peft`` (PEFT's trainable tokens, when installed). Reported per recipe: peak memory
beyond the frozen table and inputs (CPU: peak RSS with the high-water mark reset after set-up; CUDA:
``max_memory_allocated``), and the median step time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RECIPES = ("reserved", "hook", "peft")


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _build(recipe: str, weight, reserved_ids, scale: float):
    """(step function, parameters) for one recipe over the shared frozen ``weight``."""
    import torch
    from torch import nn

    if recipe == "reserved":
        import reserved_kernels as rk

        emb = rk.ReservedEmbedding.from_embedding(weight, reserved_ids, scale=scale)
        opt = torch.optim.AdamW(emb.parameters(), lr=1e-3, weight_decay=0.01)
        return emb, opt, None
    if recipe == "hook":
        emb = nn.Embedding.from_pretrained(weight, freeze=False)  # shares the storage
        mask = torch.zeros(weight.shape[0], 1, dtype=torch.bool, device=weight.device)
        mask[reserved_ids] = True
        emb.weight.register_hook(lambda g: g * mask)
        frozen = weight.detach().clone()  # weight decay moves every row: keep them to restore

        def restore():
            with torch.no_grad():
                torch.where(mask, emb.weight, frozen, out=emb.weight)

        opt = torch.optim.AdamW(emb.parameters(), lr=1e-3, weight_decay=0.01)
        return _Scaled(emb, scale), opt, restore
    if recipe == "peft":
        import peft

        holder = nn.Module()
        holder.embed = nn.Embedding.from_pretrained(weight, freeze=True)
        config = peft.TrainableTokensConfig(target_modules=["embed"], token_indices=reserved_ids.tolist())
        model = peft.get_peft_model(holder, config)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.01)
        return _Scaled(model.base_model.model.embed, scale), opt, None
    raise ValueError(recipe)


class _Scaled:
    def __init__(self, emb, scale):
        self.emb, self.scale = emb, scale

    def __call__(self, ids):
        out = self.emb(ids)
        return out * self.scale


def child(args) -> None:
    import torch

    from bench.harness import cpu_median, gpu_median

    torch.manual_seed(0)
    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    weight = torch.randn(args.vocab, args.dim, device=dev, dtype=dtype)
    reserved_ids = torch.arange(7, 7 + args.slots, device=dev)
    ids = torch.randint(0, args.vocab, (args.tokens,), device=dev)
    ids[: args.slots] = reserved_ids  # every reserved row gets a gradient
    model, opt, after_step = _build(args.recipe, weight, reserved_ids, args.dim ** 0.5)

    def step():
        opt.zero_grad(set_to_none=True)
        model(ids).float().pow(2).mean().backward()
        opt.step()
        if after_step is not None:
            after_step()

    # Peak memory over the first two steps (optimizer state is created in the first), measured
    # before timing: the timer's own buffers (do_bench's L2 flush) must not count.
    if dev.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        step()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
        timing = gpu_median(step, warmup_ms=50, rep_ms=300)
    else:
        base = _rss_bytes("VmRSS")
        if not _reset_peak_rss():
            base = _rss_bytes("VmHWM")
        step()
        step()
        extra = _rss_bytes("VmHWM") - base
        timing = cpu_median(step, warmup=0, repeat=args.repeat)
    print(json.dumps(dict(recipe=args.recipe, extra_bytes=extra, **timing)))


def run_all(args) -> dict:
    """Each recipe in a fresh subprocess (so no allocator or peak carries over), side by side."""
    import importlib.util

    results = {}
    for recipe in RECIPES:
        if recipe == "peft" and importlib.util.find_spec("peft") is None:
            print("peft is not installed: skipping its recipe", file=sys.stderr)
            continue
        cmd = [sys.executable, __file__, "--child", "--recipe", recipe] + [
            f"--{k}={getattr(args, k)}" for k in ("device", "vocab", "dim", "slots", "tokens", "dtype", "repeat")]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{recipe} failed:\n{proc.stderr[-3000:]}")
        results[recipe] = json.loads(proc.stdout.strip().splitlines()[-1])
        r = results[recipe]
        print(f"{recipe:9s} extra memory {r['extra_bytes'] / 2**20:9.1f} MiB   step {r['median_ms']:9.1f} ms "
              f"(p20 {r['p20_ms']:.1f}, p80 {r['p80_ms']:.1f})", flush=True)
    ours = results["reserved"]
    for recipe, r in results.items():
        if recipe != "reserved":
            print(f"vs {recipe}: {r['extra_bytes'] / max(ours['extra_bytes'], 1):.1f}x less memory, "
                  f"{r['median_ms'] / ours['median_ms']:.1f}x faster")
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--vocab", type=int, default=256_000)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--slots", type=int, default=99)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", default=None, help="write JSON results here")
    parser.add_argument("--recipe", choices=RECIPES)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return
    from bench.harness import environment, write_results

    results = run_all(args)
    if args.out:
        config = {k: getattr(args, k) for k in ("device", "vocab", "dim", "slots", "tokens", "dtype", "repeat")}
        write_results(args.out, dict(environment=environment(), config=config, results=results))


if __name__ == "__main__":
    main()
