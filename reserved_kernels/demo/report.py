"""The main job's report: the closing table and the loss-curve plot."""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

from reserved_kernels.demo.stories import INIT_LABELS, Story

if TYPE_CHECKING:
    from reserved_kernels.demo.training import TrainResult

BASE_TOLERANCE = 0.01  # ordinary-text perplexity may move by at most 1%


def closing_lines(results: dict[str, TrainResult], story: Story, *, base_before: float, base_after: float,
                  cached_after: float, steps: int, texts: dict[str, str], moved: list[str], state: int, dense: int,
                  dense_how: str) -> list[str]:
    """The table of initialisations (``results``: each one's run), the ordinary-text perplexity before and after
    (and the cache's value, ``cached_after``), the continuations (``texts``), the frozen check (``moved``: the
    parameters that changed), and the state the rows cost (``state`` bytes) beside the dense recipe's."""
    lines = ["", f"{'initialisation':28s} {'term loss at step 0':>20s} {'after':>8s}   perplexity"]
    for init, r in results.items():
        l0, l1 = r.first_loss, r.last_loss
        trained_here = len(r.curve) > 1
        lines.append(f"{INIT_LABELS[init]:28s} {l0:20.3f} " + (
            f"{l1:8.3f}   {math.exp(l0):6.2f} -> {math.exp(l1):5.2f} ({100 * (math.exp(l1 - l0) - 1):+.0f}%)"
            if trained_here else f"{'':8s}   {math.exp(l0):6.2f}"))
    change = base_after / base_before - 1
    lines.append(f"ordinary-text perplexity (no new terms): {base_before:.4f} before, {base_after:.4f} after "
                 f"({100 * change:+.2f}%; {'within' if abs(change) <= BASE_TOLERANCE else 'OUTSIDE'} ±1%)")
    lines.append(f"  after, the slow way (a full forward pass) {base_after:.6f}; through the cache (FrozenText) "
                 f"{cached_after:.6f}: {abs(cached_after / base_after - 1):.1e} apart")
    if story.prompt is not None:
        lines.append(f"greedy continuation of {story.prompt!r}:")
        if "random" in texts:
            lines.append(f"  a random normal row, untrained:    {texts['random']!r}")
        lines.append(f"  the description mean, untrained:  {texts['description']!r}")
        lines.append(f"  the description mean, {steps} steps: {texts['trained']!r}")
    lines.append(f"frozen parameters bit-identical: {not moved}" + (f" (moved: {moved})" if moved else ""))
    lines.append(f"gradients + AdamW state: {state:,} bytes; dense recipe {dense:,} bytes ({dense_how}): "
                 f"{dense / state:,.0f}x more")
    return lines


def write_plot(results: dict[str, TrainResult], story: Story, path: str) -> bool:
    """Two panels as a PNG at ``path``: each initialisation's held-out term loss, and ordinary text's perplexity at
    every step of each trained one (through the cache); False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (terms, ordinary) = plt.subplots(1, 2, figsize=(11, 3.8))
    rows = len(story.terms) * (2 if story.spaced else 1)
    for init, result in results.items():
        steps, losses = zip(*result.curve, strict=True)
        terms.plot(steps, losses, marker="o", markersize=3, label=INIT_LABELS[init])
        if result.ordinary:
            steps, values = zip(*result.ordinary, strict=True)
            ordinary.plot(steps, values, label=INIT_LABELS[init])
    terms.set_ylabel("held-out loss on text with the new tokens")
    ordinary.set_ylabel("ordinary-text perplexity (exact, cached)")
    for ax in (terms, ordinary):
        ax.set_xlabel(f"training step (only the {rows} new rows train)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(story.title + (" (ordinary text in the training mix)" if story.mix else ""), fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
