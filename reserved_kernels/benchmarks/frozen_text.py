"""FrozenText against the full forward pass, side by side in one process: the cached perplexity and the cached
training step, their exactness before and after the rows train, and the one pass's cost.

    python -m reserved_kernels.benchmarks.frozen_text [--model gemma-3-270m|DIR] [--device cpu|cuda]
        [--tokens 1024] [--slots 16] [--repeat 5] [--out DIR]
    reserved-kernels bench frozen-text

The batch is ordinary text (random ids of the tokenizer, no reserved id) in sequences of 512. Measured, each the
median of ``--repeat`` runs, alternating the ways of each group so that a noisy machine slows them alike:

* **perplexity**: the patched model's forward through the fused loss (``perplexity``, no logits) against
  ``FrozenText.perplexity()``;
* **training step on ordinary text** (loss, backward, AdamW over the rows): through the patched model, frozen
  positions skipped (the body under no_grad, the loss's rows gradient alone), against ``FrozenText.loss()``;
* **the one pass** (``FrozenText(model, [batch])``) against the forward through the fused loss;
* **exactness**: the two perplexities' relative difference at the initial rows and after 20 AdamW steps of the
  rows on text that uses them (lr 1e-2, so the K columns move).
"""

from __future__ import annotations

import argparse
import statistics
import time


def _alternating(fns: list, repeat: int, sync) -> list[float]:
    """Median seconds of each of ``fns``, run in turn ``repeat`` times after one warm-up call of each (a noisy
    machine slows them alike); ``sync`` waits for the device after each call."""
    times: list[list[float]] = [[] for _ in fns]
    for rep in range(repeat + 1):
        for fn, spent in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            sync()
            if rep:
                spent.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def measure(args) -> dict:
    import torch

    from reserved_kernels.benchmarks.common import batch_text, checkpoint
    from reserved_kernels.models import FrozenText, patch_model, perplexity

    torch.manual_seed(0)
    model, _, reserved_ids, tokens = checkpoint(args)
    for p in model.parameters():
        p.requires_grad_(False)
    patch_model(model, reserved_ids.tolist())
    dev = torch.device(args.device)
    ids = batch_text("ordinary", torch.randint(0, tokens, (args.tokens,), device=dev), reserved_ids,
                     min(args.tokens, 512))
    batch = [ids]
    rows = model.get_input_embeddings().reserved_weight
    optimizer = torch.optim.AdamW([rows], lr=1e-2, weight_decay=0.0)
    text = FrozenText(model, batch, progress=False)
    out = dict(positions=len(text), store_bytes=text.nbytes)

    full_ppl, cached_ppl = perplexity(model, batch), text.perplexity()
    out["relative_difference_before"] = abs(cached_ppl / full_ppl - 1)
    out["perplexity_before"] = full_ppl

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    out["forward_s"], out["cached_perplexity_s"], out["pass_s"] = _alternating(
        [lambda: perplexity(model, batch), text.perplexity, lambda: FrozenText(model, batch, progress=False)],
        args.repeat, sync)

    def full_step():
        model.train()
        optimizer.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()

    def cached_step():
        optimizer.zero_grad(set_to_none=True)
        text.loss().backward()
        optimizer.step()

    state = rows.detach().clone()
    out["full_step_s"], out["cached_step_s"], out["cached_loss_and_grad_s"] = _alternating(
        [full_step, cached_step, lambda: text.loss().backward()], args.repeat, sync)
    with torch.no_grad():
        rows.copy_(state)

    terms = batch_text("random", torch.randint(0, tokens, (256,), device=dev), reserved_ids, 64)
    model.train()
    for _ in range(20):  # the rows train on text that uses them
        optimizer.zero_grad(set_to_none=True)
        model(input_ids=terms, labels=terms).loss.backward()
        optimizer.step()
    full_ppl, cached_ppl = perplexity(model, batch), text.perplexity()
    out["relative_difference_after"] = abs(cached_ppl / full_ppl - 1)
    out["perplexity_after"] = full_ppl
    out["rows_moved"] = float((rows.detach() - state).norm() / state.norm())
    return out


def table(payload: dict) -> str:
    r = payload["results"]
    c = payload["config"]
    lines = ["| what | the full forward | through FrozenText | full ÷ cached |", "|---|---|---|---|",
             f"| perplexity of the batch | {r['forward_s']:.3f} s | {r['cached_perplexity_s'] * 1e3:.2f} ms | "
             f"{r['forward_s'] / r['cached_perplexity_s']:,.0f}× |",
             "| training step on it (loss, backward, AdamW; full: frozen positions skipped) | "
             f"{r['full_step_s']:.3f} s | "
             f"{r['cached_step_s'] * 1e3:.2f} ms | {r['full_step_s'] / r['cached_step_s']:,.0f}× |",
             f"| the cached loss and its gradient alone | | {r['cached_loss_and_grad_s'] * 1e3:.2f} ms | "
             f"{r['forward_s'] / r['cached_loss_and_grad_s']:,.0f}× (against the forward) |",
             f"| the one pass (against one forward through the fused loss) | {r['forward_s']:.3f} s | "
             f"{r['pass_s']:.3f} s | {r['pass_s'] / r['forward_s']:.2f}× the forward |",
             "",
             f"Exactness: the cached perplexity is the full forward's within {r['relative_difference_before']:.1e} "
             f"relative at the initial rows ({r['perplexity_before']:.4f}) and {r['relative_difference_after']:.1e} "
             f"after 20 AdamW steps of the rows (moved {100 * r['rows_moved']:.0f}% of their norm; "
             f"{r['perplexity_after']:.4f}). The store: {r['positions']:,} positions, "
             f"{r['store_bytes'] / 2**20:.2f} MiB ({r['store_bytes'] / r['positions'] / 4:.0f} numbers a position; "
             f"{c['slots']} rows)."]
    return "\n".join(lines)


def caption(payload: dict) -> str:
    from reserved_kernels.benchmarks.harness import machine_phrase

    c, env = payload["config"], payload["environment"]
    return (f"{c.get('model_name') or c['model']}: FrozenText beside the full forward, {machine_phrase(env)}, "
            f"{c['dtype']}, {c['tokens'] // 512} x 512 tokens of ordinary text, {c['slots']} reserved ids, medians of "
            f"{c['repeat']} alternating runs in one process; torch {env['torch']}; {env['date']}, "
            f"commit {env.get('commit')}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", default=None, help="write frozen-text-<model>-<device>-<date>.json/.md here")
    args = parser.parse_args(argv)
    import datetime
    import os

    from reserved_kernels.benchmarks.harness import environment, write_report
    from reserved_kernels.pretrained import is_named, resolve

    name = args.model if is_named(args.model) else None
    args.model = resolve(args.model)
    payload = dict(environment=environment(), config={**vars(args), "model_name": name}, results=measure(args))
    print(caption(payload) + "\n\n" + table(payload))
    if args.out:
        label = name or os.path.basename(os.path.normpath(args.model))
        today = datetime.date.today().isoformat()
        write_report(os.path.join(args.out, f"frozen-text-{label}-{args.device}-{today}.json"),
                     payload, caption(payload), table(payload))


if __name__ == "__main__":
    main()
