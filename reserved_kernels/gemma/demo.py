"""The end-to-end demo: plan three terms, initialise their rows, train only them, check nothing else moved."""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch

DEFAULT_TERMS = {
    "[summary]": "a short summary of the text",
    "[translate]": "translate the text into another language",
    "reserved-row": "a row of the embedding table that was never trained",
}


def _state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by every parameter gradient and every optimizer-state tensor."""
    tensors = [p.grad for p in model.parameters()]
    tensors += [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _dense_recipe_state_bytes(model: torch.nn.Module, reserved_ids: list[int], rows: torch.Tensor) -> int:
    """One step of the usual recipe: the whole table trainable, a hook zeroing other rows' gradient, AdamW."""
    for p in model.parameters():
        p.requires_grad_(False)
    from reserved_kernels.benchmarks.train_step import keep_gradient_rows

    weight = model.get_input_embeddings().weight
    keep_gradient_rows(weight, reserved_ids)
    optimizer = torch.optim.AdamW([weight], lr=1e-3, weight_decay=0.01)
    model.train()
    model(input_ids=rows, labels=rows).loss.backward()
    optimizer.step()
    return _state_bytes(model, optimizer)


def _progress(step: int, total: int, loss: float, width: int = 30) -> None:
    """A bar redrawn in place on a terminal; about ten plain lines when the output is a file or pipe."""
    done = int(width * (step + 1) / total)
    line = f"  [{'#' * done}{'.' * (width - done)}] step {step + 1:4d}/{total}  loss {loss:8.4f}"
    if sys.stdout.isatty():
        print("\r" + line, end="\n" if step + 1 == total else "", flush=True)
    elif (step + 1) % max(1, total // 10) == 0 or step + 1 == total:
        print(line, flush=True)


def _batches(encode, texts, length, device):
    """Fixed-length rows of token ids (each text encoded, concatenated, cut into rows)."""
    flat = [i for text in texts for i in encode(text + "\n")]
    rows = len(flat) // length
    return torch.tensor(flat[: rows * length], device=device).view(rows, length)


def run(args: argparse.Namespace) -> dict:
    from reserved_kernels import _backend
    from reserved_kernels.gemma import merge, patch_model, perplexity, tiny_gemma
    from reserved_kernels.vocab import ReservedVocab, default_tokenizer_path
    from reserved_kernels.vocab.corpus import corpus

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    vocab = ReservedVocab.from_file(args.tokenizer or default_tokenizer_path())
    plan = vocab.assign(DEFAULT_TERMS)
    print(f"tokenizer: {vocab.path} ({vocab.vocab_size} ids, {len(vocab.reserved_ids)} reserved slots)")
    for e in plan.entries:
        print(f"  {e.term!r:16} -> id {e.id:3d} (was {e.piece}), initialised from "
              f"{len(e.source_ids)} description tokens")

    if args.model:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.model).to(device)
    else:
        model = tiny_gemma("gemma", seed=args.seed).to(device)
    encode = vocab.renamed_encoder()
    terms = list(DEFAULT_TERMS)
    texts = corpus(600, seed=args.seed + 1)
    train = _batches(encode, [f"{terms[i % 3]} {t}" for i, t in enumerate(texts)], 32, device)
    heldout = _batches(encode, corpus(200, seed=args.seed + 2), 32, device)

    snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
    # The dense-gradient recipe, measured on a copy (only for the small default model: a real
    # checkpoint would double its memory, so there the baseline is computed instead).
    dense_bytes = None if args.model else _dense_recipe_state_bytes(copy.deepcopy(model), plan.ids, train[:8])
    patch_model(model, vocab, init="description")
    embedding = model.get_input_embeddings()
    backend = _backend.active(device.type)
    print(f"model: {type(model).__name__}, vocabulary {embedding.num_embeddings} x {embedding.embedding_dim}; "
          f"training {embedding.num_reserved} rows; backend {backend} on {device}")

    before = perplexity(model, heldout.split(16))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.01)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    model.train()
    for step in range(args.steps):
        rows = train[torch.randint(0, train.shape[0], (8,), device=device)]
        loss = model(input_ids=rows, labels=rows).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        _progress(step, args.steps, loss.item())
    print(f"  {args.steps} steps in {time.perf_counter() - start:.1f} s")
    after = perplexity(model, heldout.split(16))
    print(f"held-out perplexity: before {before:.3f}, after {after:.3f} ({100 * (after / before - 1):+.2f}%)")

    moved = []
    for name, p in model.named_parameters():
        if name == "model.embed_tokens.weight":
            keep = torch.ones(p.shape[0], dtype=torch.bool, device=p.device)
            keep[embedding.reserved_ids] = False
            same = torch.equal(p[keep], snapshot[name][keep])
        elif name.endswith("reserved_weight"):
            continue
        else:
            same = torch.equal(p, snapshot[name])
        if not same:
            moved.append(name)
    print(f"frozen rows and parameters bit-identical: {not moved}" + (f" (moved: {moved})" if moved else ""))

    ours = _state_bytes(model, optimizer)
    if dense_bytes is None:
        rows_total, dim = embedding.weight.shape
        dense_bytes, how = rows_total * dim * embedding.weight.element_size() * 3, "computed: V×D gradient + 2 moments"
    else:
        how = "measured after one step"
    print(f"gradient + optimizer state: {ours / 1024:.1f} KiB (measured), dense-gradient recipe "
          f"{dense_bytes / 2**20:.2f} MiB ({how}): {dense_bytes / ours:.0f}x more")
    if device.type == "cuda":
        print(f"peak CUDA memory during training: {torch.cuda.max_memory_allocated() / 2**20:.1f} MiB")

    if args.out:
        from reserved_kernels.gemma import save_reserved

        vocab.save(args.out)
        save_reserved(model, f"{args.out}/reserved_rows.pt", plan=vocab)
        print(f"wrote {args.out}/tokenizer.model, reserved_plan.json and reserved_rows.pt")
    merge(model)
    if moved:
        sys.exit("frozen parameters changed")
    return dict(before=before, after=after, moved=moved, state_bytes=ours, dense_bytes=dense_bytes)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", help="a Hugging Face Gemma checkpoint folder (default: a tiny random Gemma)")
    parser.add_argument("--tokenizer", help="its tokenizer.model or tokenizer.json (default: the embedded one)")
    parser.add_argument("--out", help="folder to write the renamed tokenizer, plan and trained rows")
