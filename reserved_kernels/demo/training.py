"""The main job's training loop and its measures: initialise new rows, train only them, measure held-out loss."""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable

import torch


@dataclasses.dataclass
class TrainResult:
    """One initialisation's run: the trained model and its optimizer, and the curves its log and plot show."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    curve: list[tuple[int, float]]  # (step, held-out term loss)
    ordinary: list[tuple[int, float]]  # (step, ordinary-text perplexity through FrozenText); empty without training

    @property
    def first_loss(self) -> float:
        return self.curve[0][1]

    @property
    def last_loss(self) -> float:
        return self.curve[-1][1]

def length_batches(ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, batch: int = 16) -> list[dict]:
    """(ids, labels, mask) as batches of ``batch`` lines of similar length, each cut to its longest line."""
    order = mask.sum(1).argsort()
    chunks = []
    for i in range(0, ids.shape[0], batch):
        rows = order[i:i + batch]
        width = int(mask[rows].sum(1).max())
        chunks.append(dict(input_ids=ids[rows, :width], labels=labels[rows, :width], attention_mask=mask[rows, :width]))
    return chunks


def mean_loss(model, ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, batch: int = 16) -> float:
    """Mean next-token negative log-likelihood over every target of (ids, labels), through the loss path
    (a patched model's fused loss: no (B, T, V) logits) — a full forward pass, the slow way."""
    from reserved_kernels.models import perplexity

    return math.log(perplexity(model, length_batches(ids, labels, mask, batch)))


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by every parameter gradient and every optimizer-state tensor."""
    tensors = [p.grad for p in model.parameters()]
    tensors += [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def dense_recipe_state_bytes(model: torch.nn.Module, reserved_ids: list[int], ids, labels, mask) -> int:
    """One step of the usual recipe on ``model``: the whole table trainable, a hook zeroing other rows, AdamW."""
    from reserved_kernels.benchmarks.baselines import keep_gradient_rows

    for p in model.parameters():
        p.requires_grad_(False)
    weight = model.get_input_embeddings().weight
    keep_gradient_rows(weight, reserved_ids)
    optimizer = torch.optim.AdamW([weight], lr=1e-3, weight_decay=0.01)
    model.train()
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    optimizer.step()
    return state_bytes(model, optimizer)


def sharing_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model``'s modules that shares every parameter and buffer with it (no memory): patching the
    copy swaps only the copy's modules, and only its new rows train — the base model is left as it is."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


def initialised(base_model, vocab, init: str, seed: int) -> torch.nn.Module:
    """A patched copy of ``base_model`` whose new rows start as ``init`` says (see :data:`INIT_LABELS`)."""
    from reserved_kernels.models import patch_model

    model = sharing_copy(base_model)
    if init in ("description", "mean"):
        return patch_model(model, vocab, init=init)
    patch_model(model, vocab)  # untouched: the reserved rows as the checkpoint has them
    if init == "random":
        embedding = model.get_input_embeddings()
        std = embedding.weight.float().std().item()  # a normal row at the table's own scale
        noise = torch.randn(embedding.reserved_weight.shape, generator=torch.Generator().manual_seed(seed)) * std
        with torch.no_grad():
            embedding.reserved_weight.copy_(noise.to(embedding.reserved_weight))
    return model


def train_rows(model, data: dict, *, steps: int, lr: float, seed: int, batch: int, evals: int = 6,
               mix: float = 0.0, log: Callable[[str], None] = print) -> TrainResult:
    """Train ``model``'s trainable parameters (its new rows) on ``data["train"]``: the held-out term-loss curve and,
    at every step, ordinary text's perplexity through a :class:`~reserved_kernels.models.FrozenText` of
    ``data["ordinary"]`` (exact, O(K·D) a token). With ``mix``, the loss adds ``mix`` times the cached loss of the
    ordinary text ``data["mix"]`` (ordinary text in the training mix, through the cache as well)."""
    from reserved_kernels.models import FrozenText

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    train_ids, train_labels, train_mask = data["train"]
    generator = torch.Generator().manual_seed(seed)
    curve = [(0, mean_loss(model, *data["heldout"]))]
    if steps == 0:
        return TrainResult(model=model, optimizer=optimizer, curve=curve, ordinary=[])
    ordinary = FrozenText(model, length_batches(*data["ordinary"]))
    mixed = FrozenText(model, length_batches(*data["mix"])) if mix else None
    ordinary_curve = [(0, ordinary.perplexity())]
    every = max(1, steps // evals)
    start = time.perf_counter()
    model.train()
    for step in range(1, steps + 1):
        rows = torch.randint(0, train_ids.shape[0], (batch,), generator=generator).to(train_ids.device)
        width = int(train_mask[rows].sum(1).max())
        term_loss = model(input_ids=train_ids[rows, :width], attention_mask=train_mask[rows, :width],
                          labels=train_labels[rows, :width]).loss
        loss = term_loss + mix * mixed.loss() if mixed is not None else term_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        ordinary_curve.append((step, ordinary.perplexity()))
        if step % every == 0 or step == steps:
            curve.append((step, mean_loss(model, *data["heldout"])))
            log(f"    step {step}/{steps}: batch term loss {term_loss.item():.3f}"
                + (f" (+ {mix:g} x cached ordinary loss {(loss - term_loss).item() / mix:.3f})" if mixed else "")
                + f", held-out term loss {curve[-1][1]:.3f}, "
                f"ordinary-text perplexity {ordinary_curve[-1][1]:.3f} "
                f"({(time.perf_counter() - start) / step:.2g} s per step with evaluations)")
    return TrainResult(model=model, optimizer=optimizer, curve=curve, ordinary=ordinary_curve)


def train_init(base_model, vocab, init: str, data: dict, *, steps: int, lr: float, seed: int, batch: int = 16,
               evals: int = 10, mix: float = 0.0, log=print) -> TrainResult:
    """:func:`initialised`, then :func:`train_rows`."""
    model = initialised(base_model, vocab, init, seed)
    return train_rows(model, data, steps=steps, lr=lr, seed=seed, batch=batch, evals=evals, mix=mix, log=log)


@torch.no_grad()
def continuation(model, encode, decode, prompt: str, bos: int, tokens: int = 16) -> str:
    """The greedy continuation of ``prompt`` (encoded with the renamed tokenizer, so its terms are single tokens)."""
    ids = torch.tensor([[bos] + encode(prompt)], device=next(model.parameters()).device)
    was_training = model.training
    model.eval()
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, do_sample=False,
                         pad_token_id=model.config.pad_token_id)
    model.train(was_training)
    return decode(out[0, ids.shape[1]:].tolist())
