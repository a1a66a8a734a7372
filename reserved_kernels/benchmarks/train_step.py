"""One training step for each recipe, each in a fresh process: peak memory and median time.

    python -m reserved_kernels.benchmarks.train_step [--device cpu|cuda] [--vocab 256000] [--dim 2048]
        [--slots 99] [--tokens 4096] [--dtype float32] [--head] [--model gemma-3-270m|DIR] [--out DIR]
    reserved-kernels bench step|frozen --model gemma-3-270m|DIR

Without ``--head`` the step is embedding forward, backward and AdamW. With ``--head`` it is a
whole tied embedding + output-head step: a Gemma model with no decoder layers (embedding, final
norm, tied ``lm_head``), next-token cross-entropy, AdamW. ``--model`` takes a named checkpoint
(``gemma-3-270m``, converted once) or a Hugging Face checkpoint folder instead (any family the planner
knows: its first ``--slots`` reserved slots train), its own table and, with ``--head``, the whole model.

Recipes: ``reserved`` (this package: the fused gather in, the fused loss out), ``hook`` (the table
trainable, a gradient hook zeroing the other rows, AdamW over the whole table, then restoring the
frozen rows that weight decay moved, as users must), ``peft`` (PEFT's trainable tokens, when installed;
the model's own loss from its logits), ``peftfast`` (the same PEFT model after ``patch_model(peft_model)``: PEFT's
parameter, our kernels) and, with ``--head``, ``body`` — the floor: our rows and the whole
body, forward and backward, but no head and no loss (the mean square of the final hidden states). Peak
memory is beyond the frozen model (or table) and inputs: CPU peak RSS with the high-water mark reset
after set-up (glibc's mmap threshold fixed, see ``harness.MEASURING_ENV``); CUDA ``max_memory_allocated``;
both over the first two steps, before timing (the timer's buffers never count).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json

from reserved_kernels.benchmarks.common import TEXTS, batch_text, checkpoint

MODULE = "reserved_kernels.benchmarks.train_step"  # what the measuring children run (python -m)
RECIPES = ("reserved", "noskip", "hook", "peft", "peftfast", "body")
CONFIG_KEYS = ("device", "vocab", "dim", "slots", "tokens", "dtype", "repeat", "head", "model", "text")


def _build(args, weight, reserved_ids, model=None):
    """(loss function of ids, optimizer, after-step hook or None) for one recipe."""
    import torch
    from torch import nn

    from reserved_kernels.benchmarks import baselines

    scale = weight.shape[1] ** 0.5
    if args.head:
        from reserved_kernels.benchmarks.harness import head_only_gemma
        from reserved_kernels.models import patch_model

        if model is None:
            model = head_only_gemma(weight)
        for p in model.parameters():
            p.requires_grad_(False)
        model.train()

        def loss_of(m):
            return lambda ids: m(input_ids=ids, labels=ids).loss

        if args.recipe == "body":  # the floor: the rows and the body train, no head, no loss over the vocabulary
            patch_model(model, reserved_ids.tolist())
            return ((lambda ids: model.base_model(input_ids=ids).last_hidden_state.float().pow(2).mean()),
                    torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3,
                                      weight_decay=0.01), None)
        if args.recipe in ("reserved", "noskip"):  # noskip: frozen positions pay the whole backward, as before
            patch_model(model, reserved_ids.tolist(), skip_frozen=args.recipe == "reserved")
            return loss_of(model), torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                                     lr=1e-3, weight_decay=0.01), None
        if args.recipe == "hook":
            opt, restore = baselines.hook_recipe(model.get_input_embeddings().weight, reserved_ids)
            return loss_of(model), opt, restore
        names = [n for n, m in model.named_modules() if m is model.get_input_embeddings()]
        wrapped = baselines.peft_trainable_tokens(model, names[0].rsplit(".", 1)[-1], reserved_ids)
        if args.recipe == "peftfast":
            patch_model(wrapped)  # the one line: PEFT's layers, our kernels
        return loss_of(wrapped), torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad],
                                                   lr=1e-3, weight_decay=0.01), None

    scale_t = torch.tensor(scale, dtype=weight.dtype, device=weight.device)
    if args.recipe == "reserved":
        import reserved_kernels as rk

        emb = rk.ReservedEmbedding.from_embedding(weight, reserved_ids, scale=scale)
        return (lambda ids: emb(ids).float().pow(2).mean()), torch.optim.AdamW(emb.parameters(), lr=1e-3,
                                                                               weight_decay=0.01), None
    if args.recipe == "hook":
        emb = nn.Embedding.from_pretrained(weight, freeze=False)  # shares the storage
        opt, restore = baselines.hook_recipe(emb.weight, reserved_ids)
        return (lambda ids: (emb(ids) * scale_t).float().pow(2).mean()), opt, restore
    holder = nn.Module()
    holder.embed = nn.Embedding.from_pretrained(weight, freeze=True)
    model = baselines.peft_trainable_tokens(holder, "embed", reserved_ids)
    embed = model.base_model.model.embed
    return ((lambda ids: (embed(ids) * scale_t).float().pow(2).mean()),
            torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.01), None)


def frozen_share(batch, reserved_ids) -> float:
    """The share of a batch's positions that stand before their sequence's first reserved id (all of a sequence
    without one): what the frozen-position skip runs without a backward."""
    import torch

    from reserved_kernels.models.position_split import first_positions

    return float(first_positions(torch.isin(batch, reserved_ids)).sum()) / batch.numel()


def child(args) -> None:
    import torch

    from reserved_kernels.benchmarks.harness import measure_step

    torch.manual_seed(0)
    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    model = None
    if args.model:
        model, weight, reserved_ids, tokens = checkpoint(args)
    else:
        weight = torch.randn(args.vocab, args.dim, device=dev, dtype=dtype)
        reserved_ids, tokens = torch.arange(7, 7 + args.slots, device=dev), args.vocab
    # One batch for every step a child runs (two to measure memory, a warm-up and the timed ones) where the terms'
    # positions are drawn afresh; the same batches, in the same order, for every recipe.
    draws = args.repeat + 2 if args.text == "random" else 1
    base = torch.randint(0, tokens, (args.tokens,), device=dev)
    batches = [batch_text(args.text, base, reserved_ids, min(args.tokens, 512) if args.head else args.tokens, draw)
               for draw in range(draws)]
    loss_fn, opt, after_step = _build(args, weight, reserved_ids, model)
    steps = itertools.count()

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(batches[next(steps) % draws]).backward()
        opt.step()
        if after_step is not None:
            after_step()

    shares = [frozen_share(b, reserved_ids) for b in batches]
    print(json.dumps(dict(recipe=args.recipe, frozen_share=sum(shares) / len(shares),
                          **measure_step(step, dev, args.measure, args.repeat))))


def run_one(recipe: str, memory_runs: int = 3, **config) -> dict:
    """One recipe in fresh subprocesses (no allocator state or peak carries over): memory (on a CPU the
    median of ``memory_runs`` processes) and time."""
    from reserved_kernels.benchmarks.harness import child_command, run_measured

    cmd = child_command(MODULE, config, CONFIG_KEYS, recipe=recipe)
    return run_measured(cmd, config.get("device", "cpu"), memory_runs)


def available_recipes(head: bool = True, frozen: bool = False) -> list[str]:
    """The recipes that run here: PEFT's where installed, the body-alone floor for whole-model steps; with
    ``frozen``, ours with the frozen-position skip on and off beside the body alone."""
    if frozen:
        return ["reserved", "noskip", "body"]
    has_peft = importlib.util.find_spec("peft") is not None
    return [r for r in RECIPES if r != "noskip" and (has_peft or not r.startswith("peft"))
            and (r != "body" or head) and (r != "peftfast" or head)]


def table(payload: dict) -> str:
    """Markdown: each recipe's memory beyond the model and median step, each over ours, and ours over the floor."""
    rows = payload["results"]
    ours, floor = rows["reserved"], rows.get("body")
    lines = ["| recipe | memory beyond the model | step, median s (p20–p80) | ÷ ours: memory, time |",
             "|---|---|---|---|"]
    for recipe, r in rows.items():
        label = {"reserved": "**reserved-kernels**", "noskip": "reserved-kernels, frozen positions not skipped",
                 "hook": "gradient hook", "peft": "PEFT trainable tokens",
                 "peftfast": "PEFT trainable tokens after `patch_model(peft_model)`",
                 "body": "the body alone (no head, no loss)"}[recipe]
        vs = "" if recipe == "reserved" else (f"{r['extra_bytes'] / max(ours['extra_bytes'], 1):.2f}×, "
                                              f"{r['median_ms'] / ours['median_ms']:.2f}×")
        lines.append(f"| {label} | {r['extra_bytes'] / 2**20:,.0f} MiB | {r['median_ms'] / 1e3:.2f} "
                     f"({r['p20_ms'] / 1e3:.2f}–{r['p80_ms'] / 1e3:.2f}) | {vs} |")
    if floor is not None:
        memory = 100 * (ours['extra_bytes'] / floor['extra_bytes'] - 1)
        lines.append(f"\nOurs over the body alone: {memory:+.1f}% memory, "
                     f"{ours['median_ms'] / floor['median_ms']:.2f}× the time.")
    return "\n".join(lines)


def caption(payload: dict, with_text: bool = True) -> str:
    """One line saying what was measured, where and when (``with_text``: and where the batch's terms stand)."""
    from reserved_kernels.benchmarks.harness import machine_phrase, processes_phrase

    c, env = payload["config"], payload["environment"]
    where = machine_phrase(env)
    width = min(c['tokens'], 512)
    shape = f"{c['tokens'] // width} x {width} tokens" if c["head"] else f"{c['tokens']} tokens"
    text = {"mixed": "the first sequence opening with every reserved id", "ordinary": "ordinary text (no reserved id)",
            "random": "one term per sequence at a random position",
            "start": "a term at position 0 of every sequence"}[c.get("text", "mixed")]
    where_terms = text + ", " if with_text else ""
    model = c.get('model_name') or c.get('model') or 'random table'
    return (f"{model}: one AdamW step, {where}, {c['dtype']}, {shape}, "
            f"{c['slots']} reserved ids, {where_terms}{processes_phrase(c)}; torch {env['torch']}; {env['date']}, "
            f"commit {env.get('commit')}")


def frozen_table(payloads: dict) -> str:
    """Markdown: per kind of text, ours with the frozen-position skip and without, beside the body alone, and the
    share of positions the skip runs without a backward (the mean over the steps' batches)."""
    lines = ["| text | frozen positions | skip on: step s, memory | skip off: step s, memory | "
             "body alone: step s, memory | off ÷ on: time | on ÷ body: time, memory |",
             "|---|---|---|---|---|---|---|"]
    for text, payload in payloads.items():
        rows = payload["results"]
        on, off, body = rows["reserved"], rows["noskip"], rows["body"]

        def cell(r):
            return f"{r['median_ms'] / 1e3:.2f} ({r['p20_ms'] / 1e3:.2f}–{r['p80_ms'] / 1e3:.2f}), " \
                   f"{r['extra_bytes'] / 2**20:,.0f} MiB"

        share = f"{100 * on['frozen_share']:.0f}%" if "frozen_share" in on else ""
        lines.append(f"| {text} | {share} | {cell(on)} | {cell(off)} | {cell(body)} | "
                     f"{off['median_ms'] / on['median_ms']:.2f}× | "
                     f"{on['median_ms'] / body['median_ms']:.2f}×, {on['extra_bytes'] / body['extra_bytes']:.2f}× |")
    return "\n".join(lines)


def run_all(args, frozen: bool = False) -> dict:
    """Each available recipe in fresh processes (:func:`harness.run_interleaved`: on a CPU ``--time-runs`` timed
    processes a recipe, taken in turn across the recipes, their steps pooled)."""
    from reserved_kernels.benchmarks.harness import child_command, run_interleaved

    config = {k: getattr(args, k) for k in CONFIG_KEYS}
    cmds = {recipe: child_command(MODULE, config, CONFIG_KEYS, recipe=recipe)
            for recipe in available_recipes(args.head, frozen)}
    results = run_interleaved(cmds, args.device, args.memory_runs, args.time_runs)
    for recipe, r in results.items():
        print(f"{recipe:9s} extra memory {r['extra_bytes'] / 2**20:9.1f} MiB   step {r['median_ms']:9.1f} ms "
              f"(p20 {r['p20_ms']:.1f}, p80 {r['p80_ms']:.1f})", flush=True)
    ours = results["reserved"]
    for recipe, r in results.items():
        if recipe not in ("reserved", "noskip", "body", "peftfast"):
            print(f"vs {recipe}: {r['extra_bytes'] / max(ours['extra_bytes'], 1):.1f}x less memory, "
                  f"{r['median_ms'] / ours['median_ms']:.1f}x faster")
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--vocab", type=int, default=256_000)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--slots", type=int, default=99)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--head", action="store_true", help="a whole step with the tied output head")
    parser.add_argument("--model",
                        help="a Hugging Face checkpoint folder (with its tokenizer) instead of a random table")
    parser.add_argument("--text", default="mixed", choices=TEXTS, help="where the reserved ids stand in the batch")
    parser.add_argument("--memory-runs", type=int, default=3,
                        help="CPU: memory processes per recipe (the median counts)")
    parser.add_argument("--time-runs", type=int, default=1,
                        help="CPU: timed processes per recipe, taken in turn across the recipes (their steps pooled)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.add_argument("--out", default=None, help="write JSON results here")
    parser.add_argument("--recipe", choices=RECIPES)
    parser.add_argument("--frozen", action="store_true",
                        help="ours with the frozen-position skip on and off beside the body alone, on ordinary text, "
                             "a term at a random position and a term at position 0 (ignores --text)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--measure", default="both", choices=["memory", "time", "both"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return
    from reserved_kernels.benchmarks.harness import environment, write_report
    from reserved_kernels.pretrained import is_named, resolve

    name = args.model if is_named(args.model) else None
    if args.model:
        args.model = resolve(args.model)  # a named checkpoint is converted (once) before the children start
    import datetime
    import os

    label = name or (os.path.basename(os.path.normpath(args.model)) if args.model else "random")
    stamp = f"{args.device}-{datetime.date.today().isoformat()}.json"

    def payload_of(results):
        return dict(environment=environment(), config={**{k: getattr(args, k) for k in CONFIG_KEYS},
                                                       "model_name": name, "memory_runs": args.memory_runs,
                                                       "time_runs": args.time_runs},
                    results=results)

    if not args.frozen:
        payload = payload_of(run_all(args))
        print(table(payload))
        if args.out:
            write_report(os.path.join(args.out, f"step-{label}-{stamp}"), payload, caption(payload), table(payload))
        return
    payloads = {}
    for text in ("ordinary", "random", "start"):
        args.text = text
        print(f"-- {text}", flush=True)
        payloads[text] = payload_of(run_all(args, frozen=True))
    frozen = dict(environment=environment(), texts=payloads)
    print(frozen_table(payloads))
    if args.out:
        write_report(os.path.join(args.out, f"frozen-{label}-{stamp}"), frozen,
                     caption(payloads["ordinary"], with_text=False), frozen_table(payloads))


if __name__ == "__main__":
    main()
