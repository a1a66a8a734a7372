"""The main job: give two control tokens a meaning in a small pretrained Gemma, and show each step measured.

The shipped model (``reserved_kernels/data/demo_gemma``, built by ``scripts/train_demo_model.py``) was
pretrained on three registers of generated text: plain sentences, and two registers announced by a
marker phrase — ``in summary:`` (subject and verb only) and ``in translation:`` (foreign words). The
demo maps two control tokens, ``[summary]`` and ``[translate]``, onto reserved ``<unusedN>`` slots, and
teaches the model to read each as its register's marker:

1. plan: the tokenizer's reserved slots get the terms (a renamed tokenizer, the plan);
2. initialise each new row four ways — the mean of its description's sub-token rows (ours), the mean
   of all rows (transformers' ``mean_resizing``), a random normal row, and the untouched ``<unusedN>``
   row — and measure the held-out loss on text that uses the terms;
3. train only the new rows (AdamW, small learning rate, a few hundred steps) for each initialisation;
   the control-token position itself is never a target, so the tied head is never pushed to predict
   a control token in ordinary text;
4. check that held-out perplexity on ordinary text did not move (±1%), that every frozen parameter is
   bit-identical, and what the gradients and optimizer state cost against the dense recipe.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import sys
import time

import torch

TERMS = {"[summary]": "in summary", "[translate]": "in translation"}
REGISTER = {"[summary]": "summary", "[translate]": "translate"}
INITS = ("description", "mean", "random", "untouched")
INIT_LABELS = {"description": "description mean (ours)", "mean": "mean of all rows", "random": "random normal row",
               "untouched": "untouched <unusedN> row"}
LENGTH = 32
BASE_TOLERANCE = 0.01


def default_model_path() -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "demo_gemma")


def encode_lines(lines: list[str], encode, *, bos: int, eos: int, pad: int,
                 length: int = LENGTH) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, labels, attention_mask): <bos> line <eos>, right-padded; padding is masked and not a target."""
    ids = torch.full((len(lines), length), pad, dtype=torch.long)
    labels = torch.full((len(lines), length), -100, dtype=torch.long)
    mask = torch.zeros(len(lines), length, dtype=torch.long)
    for row, line in enumerate(lines):
        tokens = ([bos] + encode(line) + [eos])[:length]
        ids[row, :len(tokens)] = torch.tensor(tokens)
        labels[row, :len(tokens)] = torch.tensor(tokens)
        mask[row, :len(tokens)] = 1
    return ids, labels, mask


def term_data(encode, count: int, rng: random.Random, **special) -> tuple[torch.Tensor, ...]:
    """Lines that start with a control token, then text of its register; the control token is not a target."""
    from reserved_kernels.vocab.corpus import mode_line

    terms = list(TERMS)
    lines = [f"{terms[i % len(terms)]} {mode_line(rng, REGISTER[terms[i % len(terms)]], marked=False)}"
             for i in range(count)]
    ids, labels, mask = encode_lines(lines, encode, **special)
    labels[:, 1] = -100
    return ids, labels, mask


def ordinary_data(encode, count: int, rng: random.Random, **special) -> tuple[torch.Tensor, ...]:
    """Plain sentences: text without any new term."""
    from reserved_kernels.vocab.corpus import mode_line

    return encode_lines([mode_line(rng, "plain") for _ in range(count)], encode, **special)


def mean_loss(model, ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, batch: int = 100) -> float:
    """Mean next-token negative log-likelihood over every target of (ids, labels), through the loss path
    (a patched model's fused loss: no (B, T, V) logits)."""
    from reserved_kernels.models import perplexity

    chunks = [dict(input_ids=ids[i:i + batch], labels=labels[i:i + batch], attention_mask=mask[i:i + batch])
              for i in range(0, ids.shape[0], batch)]
    return math.log(perplexity(model, chunks))


def _state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by every parameter gradient and every optimizer-state tensor."""
    tensors = [p.grad for p in model.parameters()]
    tensors += [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _dense_recipe_state_bytes(model: torch.nn.Module, reserved_ids: list[int], ids, labels, mask) -> int:
    """One step of the usual recipe on ``model``: the whole table trainable, a hook zeroing other rows, AdamW."""
    from reserved_kernels.recipes import keep_gradient_rows

    for p in model.parameters():
        p.requires_grad_(False)
    weight = model.get_input_embeddings().weight
    keep_gradient_rows(weight, reserved_ids)
    optimizer = torch.optim.AdamW([weight], lr=1e-3, weight_decay=0.01)
    model.train()
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    optimizer.step()
    return _state_bytes(model, optimizer)


def _initialise(model, vocab, init: str, seed: int) -> None:
    from reserved_kernels.models import patch_model

    if init in ("description", "mean"):
        patch_model(model, vocab, init=init)
        return
    patch_model(model, vocab)  # untouched: the <unusedN> rows as the checkpoint has them
    if init == "random":
        embedding = model.get_input_embeddings()
        std = embedding.weight.float().std().item()  # a normal row at the table's own scale
        noise = torch.randn(embedding.reserved_weight.shape, generator=torch.Generator().manual_seed(seed)) * std
        with torch.no_grad():
            embedding.reserved_weight.copy_(noise.to(embedding.reserved_weight))


def train_init(base_model, vocab, init: str, data: dict, *, steps: int, lr: float, seed: int, batch: int = 16,
               evals: int = 10, log=print) -> dict:
    """Patch a copy of ``base_model`` with one initialisation, train only its new rows; the held-out curve."""
    model = copy.deepcopy(base_model)
    _initialise(model, vocab, init, seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    train_ids, train_labels, train_mask = data["train"]
    generator = torch.Generator().manual_seed(seed)
    curve = [(0, mean_loss(model, *data["heldout"]))]
    every = max(1, steps // evals)
    start = time.perf_counter()
    model.train()
    for step in range(1, steps + 1):
        rows = torch.randint(0, train_ids.shape[0], (batch,), generator=generator).to(train_ids.device)
        loss = model(input_ids=train_ids[rows], attention_mask=train_mask[rows], labels=train_labels[rows]).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % every == 0 or step == steps:
            curve.append((step, mean_loss(model, *data["heldout"])))
    if steps:
        log(f"  {INIT_LABELS[init]:26s} held-out term loss {curve[0][1]:.3f} -> {curve[-1][1]:.3f}   "
            f"({steps} steps, {time.perf_counter() - start:.1f} s)")
    return dict(model=model, optimizer=optimizer, curve=curve)


def _plot(curves: dict, path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for init, curve in curves.items():
        steps, losses = zip(*curve)
        ax.plot(steps, losses, marker="o", markersize=3, label=INIT_LABELS[init])
    ax.set_xlabel("training step (only the 2 new rows train)")
    ax.set_ylabel("held-out loss on text with the new tokens")
    ax.set_title("Teaching [summary] and [translate] to a pretrained Gemma", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _load(args, device):
    """(model, vocab): the shipped demo model and tokenizer, or a Hugging Face checkpoint folder and its tokenizer.

    Any family the planner knows: Gemma's ``<unusedN>``, Llama 3's reserved special tokens, or — for a model
    with more embedding rows than its tokenizer has tokens (Qwen2) — those spare rows.
    """
    import transformers

    from reserved_kernels.vocab import ReservedVocab, default_tokenizer_path

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model or default_model_path())
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    rows = model.get_input_embeddings().num_embeddings
    if args.tokenizer or not args.model:
        vocab = ReservedVocab.from_file(args.tokenizer or default_tokenizer_path(), model_vocab_size=rows)
    else:
        vocab = ReservedVocab.from_folder(args.model, model_vocab_size=rows)
    return model, vocab


def _special_ids(model) -> dict:
    """<bos>, <eos> and padding ids from the model's config (padding falls back to <eos>)."""
    config = model.config
    bos = config.bos_token_id if config.bos_token_id is not None else config.eos_token_id
    pad = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
    return dict(bos=int(bos), eos=int(config.eos_token_id if not isinstance(config.eos_token_id, list)
                                        else config.eos_token_id[0]), pad=int(pad))


def prepare(args: argparse.Namespace) -> tuple:
    """(model, vocab, plan, data, ordinary): the frozen model, the plan of the two terms, the term text
    (``data["train"]``, ``data["heldout"]``) and held-out ordinary text, on ``args.device``."""
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model, vocab = _load(args, device)
    plan = vocab.assign(TERMS)
    encode = vocab.renamed_encoder()
    rng = random.Random(args.seed)
    special = _special_ids(model)
    data = {"train": term_data(encode, 2000, rng, **special), "heldout": term_data(encode, 200, rng, **special)}
    ordinary = ordinary_data(vocab.encode, 300, rng, **special)
    data = {k: tuple(t.to(device) for t in v) for k, v in data.items()}
    return model, vocab, plan, data, tuple(t.to(device) for t in ordinary)


def run(args: argparse.Namespace) -> dict:
    """The main job; returns the summary (the ``--json`` object)."""
    device = torch.device(args.device)
    model, vocab, plan, data, ordinary = prepare(args)
    print(f"tokenizer: {vocab.path} ({vocab.vocab_size} ids, {len(vocab.reserved_ids)} reserved slots)")
    for e in plan.entries:
        pieces = " ".join(vocab.piece(i) for i in e.source_ids)
        print(f"  {e.term:12s} -> id {e.id} (was {e.piece}); description {e.description!r} = {pieces}")
    embedding = model.get_input_embeddings()
    print(f"model: {args.model or 'the shipped demo Gemma'} ({type(model).__name__}, vocabulary "
          f"{embedding.num_embeddings} x {embedding.embedding_dim}); training {len(plan)} rows on {device}")

    snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
    base_before = math.exp(mean_loss(model, *ordinary))

    inits = ["description"] + [i for i in (args.inits or INITS) if i != "description"]  # ours is always measured
    print(f"held-out loss on text with the new terms, per initialisation "
          f"(AdamW lr={args.lr:g}, {args.steps} steps, batch 16):")
    results = {init: train_init(model, vocab, init, data, steps=args.steps, lr=args.lr, seed=args.seed)
               for init in inits}
    ours = results["description"]
    trained = ours["model"]
    base_after = math.exp(mean_loss(trained, *ordinary))
    moved = [name for name, p in trained.named_parameters()
             if not name.endswith("reserved_weight") and not torch.equal(p, snapshot[name])]
    state = _state_bytes(trained, ours["optimizer"])
    rows_total, dim = embedding.weight.shape
    if args.model:  # a real checkpoint: computed, not measured on a second copy of it
        dense = rows_total * dim * 4 * 3
        dense_how = "computed: V x D fp32 gradient + 2 AdamW moments"
    else:
        dense = _dense_recipe_state_bytes(copy.deepcopy(model), plan.ids, *(t[:16] for t in data["train"]))
        dense_how = "measured after one step of the whole table trainable with a gradient hook"

    term_before, term_after = math.exp(ours["curve"][0][1]), math.exp(ours["curve"][-1][1])
    print()
    print(f"{'initialisation':28s} {'term loss at step 0':>20s} {'after':>8s}   perplexity")
    for init, r in results.items():
        l0, l1 = r["curve"][0][1], r["curve"][-1][1]
        print(f"{INIT_LABELS[init]:28s} {l0:20.3f} {l1:8.3f}   {math.exp(l0):6.2f} -> {math.exp(l1):5.2f} "
              f"({100 * (math.exp(l1 - l0) - 1):+.0f}%)")
    change = base_after / base_before - 1
    print(f"ordinary-text perplexity (no new terms): {base_before:.4f} before, {base_after:.4f} after "
          f"({100 * change:+.2f}%; {'within' if abs(change) <= BASE_TOLERANCE else 'OUTSIDE'} ±1%)")
    print(f"frozen parameters bit-identical: {not moved}" + (f" (moved: {moved})" if moved else ""))
    print(f"gradients + AdamW state: {state:,} bytes; dense recipe {dense:,} bytes ({dense_how}): "
          f"{dense / state:,.0f}x more")

    plot = os.path.join(args.out, "loss_curves.png") if args.out else args.plot
    if plot:
        print(f"plot: {plot}" if _plot({k: r['curve'] for k, r in results.items()}, plot)
              else "plot: matplotlib is not installed (pip install matplotlib)")
    if args.out:
        from reserved_kernels.models import save_reserved

        vocab.save(args.out)
        save_reserved(trained, os.path.join(args.out, "reserved_rows.pt"), plan=vocab)
        print(f"wrote {args.out}: the renamed tokenizer, reserved_plan.json and reserved_rows.pt")
    summary = dict(base_ppl_before=base_before, base_ppl_after=base_after, term_ppl_before=term_before,
                   term_ppl_after=term_after, init_loss={k: r["curve"][0][1] for k, r in results.items()},
                   final_loss={k: r["curve"][-1][1] for k, r in results.items()}, frozen_identical=not moved,
                   state_bytes=state, dense_state_bytes=dense, steps=args.steps, lr=args.lr, seed=args.seed)
    if args.json:
        print(json.dumps(summary))
    if moved:
        sys.exit("frozen parameters changed")
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", help="a Hugging Face Gemma checkpoint folder (default: the shipped demo model)")
    parser.add_argument("--tokenizer", help="its tokenizer.model or tokenizer.json (default: the model folder's, "
                                            "or the embedded one)")
    parser.add_argument("--inits", nargs="+", choices=INITS, help="initialisations to compare (default: all four)")
    parser.add_argument("--out", help="folder for the renamed tokenizer, plan, trained rows and loss_curves.png")
    parser.add_argument("--plot", help="where to write the loss-curve PNG without --out")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the measured results")
