"""The main job: give new tokens a meaning in a pretrained Gemma by training only their rows, each step measured.

Two stories, one procedure:

* ``registers`` (the default, on the shipped model ``reserved_kernels/data/demo_gemma``, built by
  ``scripts/train_demo_model.py``): a small Gemma pretrained on three registers of generated text — plain
  sentences, and two registers announced by a marker phrase (``in summary:``, subject and verb only;
  ``in translation:``, foreign words). Two control tokens, ``[summary]`` and ``[translate]``, learn to
  stand for the markers. The control-token position is never a target, so the tied head is never pushed
  to predict a control token in ordinary text.
* ``pydoc`` (the default for a named real checkpoint: ``--model gemma-3-270m``): Google's Gemma 3 270M
  learns domain terms of Python's documentation (``pydoc_data``, which ships with Python) — ``[kwarg]``
  for "keyword argument", ``[posarg]`` for "positional argument", ``[builtin]`` for "built-in function",
  ``[codeblock]`` for "code block" — from sentences of that documentation where each term replaces its
  phrase; every position is a target. Each term is planned bare and after a space (two slots).

The stories (terms, defaults, text) are :mod:`reserved_kernels.demo.stories`; the training loop and its measures
:mod:`reserved_kernels.demo.training`; the closing table and the plot :mod:`reserved_kernels.demo.report`.
This module loads the model, runs the procedure and returns its summary (the command line exits on it).

The procedure:

1. plan: the tokenizer's reserved slots get the terms (a renamed tokenizer, the plan);
2. initialise each new row four ways — the mean of its description's sub-token rows (ours), the mean of
   all (trained) rows (transformers' ``mean_resizing``), a random normal row at the table's scale, and the
   untouched reserved row — and measure the held-out loss on text that uses the terms;
3. train only the new rows (AdamW, a small learning rate), every initialisation on the small model, ours
   on a real one (``--train-all`` trains each there too), with ordinary text's perplexity at every step through
   a :class:`~reserved_kernels.models.FrozenText` (exact, O(K·D) a token); on the real model ordinary text
   joins the training loss through a second one;
4. check the held-out perplexity of ordinary text (±1%; measured the slow way too, beside the cache's value),
   that every frozen parameter is bit-identical, what
   gradients and optimizer state cost against the dense recipe, and (on the real model) show a greedy
   continuation of a prompt that uses a term, before and after training;
5. on a named real checkpoint, write its own GGUF with the rows and tokens in (``model.gguf``, for llama.cpp and
   Ollama: :func:`~reserved_kernels.export_gguf`) and, where llama-cpp-python is installed, show llama.cpp's
   tokens of the prompt and its greedy continuation.

Every loss goes through the fused linear cross-entropy: no (B, T, V) logits, in evaluation or training.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import time
from collections.abc import Callable

import torch

from reserved_kernels.demo.report import closing_lines, write_plot
from reserved_kernels.demo.stories import (
    INIT_LABELS,
    INITS,
    Story,
    story_named,
)
from reserved_kernels.demo.training import (
    continuation,
    dense_recipe_state_bytes,
    initialised,
    mean_loss,
    state_bytes,
    train_rows,
)

# ----------------------------------------------------------------------------------------------------- text

def encode_lines(lines: list[str], encode, *, bos: int, eos: int, pad: int,
                 length: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, labels, attention_mask): <bos> line <eos> cut at ``length``, right-padded to the longest;
    padding is masked and not a target."""
    rows = [([bos] + encode(line) + [eos])[:length] for line in lines]
    width = max((len(r) for r in rows), default=1)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for row, tokens in enumerate(rows):
        ids[row, :len(tokens)] = torch.tensor(tokens)
        labels[row, :len(tokens)] = torch.tensor(tokens)
        mask[row, :len(tokens)] = 1
    return ids, labels, mask


def story_data(story: Story, encode_terms, encode_plain, rng: random.Random, **special) -> dict:
    """``{"train", "heldout", "ordinary", "mix"}``: (input_ids, labels, attention_mask) each; term text split
    70/30; ordinary text held out (the perplexity check), and apart from it the ordinary text a story mixes into
    training (``story.mix``)."""
    term_lines, ordinary = story.text(rng)
    cut = story.training_lines(len(term_lines))
    held = 60 if story.mix else len(ordinary)
    data = {"train": encode_lines(term_lines[:cut], encode_terms, length=story.length, **special),
            "heldout": encode_lines(term_lines[cut:], encode_terms, length=story.length, **special),
            "ordinary": encode_lines(ordinary[:held], encode_plain, length=story.length, **special)}
    if story.mix:
        data["mix"] = encode_lines(ordinary[held:], encode_plain, length=story.length, **special)
    if not story.term_is_target:  # the control token sits at position 1: never a target
        for key in ("train", "heldout"):
            data[key][1][:, 1] = -100
    return data


# ---------------------------------------------------------------------------------------------- the job

def _load(args, device, log):
    """(model, vocab, folder): the shipped demo model and tokenizer, a named checkpoint (converted once), or a
    Hugging Face checkpoint folder of any family the planner knows, and its tokenizer."""
    import transformers

    from reserved_kernels.pretrained import resolve, shipped_model
    from reserved_kernels.vocab import ReservedVocab, default_tokenizer_path

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    folder = resolve(args.model, log=log) if args.model else shipped_model()
    start = time.perf_counter()
    # A local folder only: a model hub is never asked (resolve refused anything else).
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    rows = model.get_input_embeddings().num_embeddings
    if args.tokenizer or not args.model:
        vocab = ReservedVocab.from_file(args.tokenizer or default_tokenizer_path(), model_vocab_size=rows)
    else:
        vocab = ReservedVocab.from_folder(folder, model_vocab_size=rows)
    log(f"loaded {args.model or 'the shipped demo Gemma'} and its tokenizer in {time.perf_counter() - start:.0f} s")
    return model, vocab


def special_ids(model) -> dict:
    """<bos>, <eos> and padding ids from the model's config (padding falls back to <eos>)."""
    config = model.config
    bos = config.bos_token_id if config.bos_token_id is not None else config.eos_token_id
    pad = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
    return dict(bos=int(bos), eos=int(config.eos_token_id if not isinstance(config.eos_token_id, list)
                                        else config.eos_token_id[0]), pad=int(pad))


def device_of(args: argparse.Namespace) -> str:
    """``--device``, else CUDA where there is a device and the CPU otherwise."""
    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def story_for(args: argparse.Namespace) -> Story:
    """``--story``, else ``pydoc`` for a named real checkpoint and ``registers`` otherwise."""
    from reserved_kernels.pretrained import is_named

    return story_named(args.story or ("pydoc" if is_named(args.model) else "registers"))


def prepare(args: argparse.Namespace, log: Callable[[str], None] = print) -> tuple:
    """(model, vocab, plan, data, story): the frozen model, the plan of the story's terms, and its text
    (``data["train"]``, ``data["heldout"]``, ``data["ordinary"]``) on ``args.device``."""
    device = torch.device(device_of(args))
    torch.manual_seed(args.seed)
    story = story_for(args)
    model, vocab = _load(args, device, log)
    plan = vocab.assign(story.terms, spaced=story.spaced)
    rng = random.Random(args.seed)
    data = story_data(story, vocab.renamed_encoder(), vocab.encode, rng, **special_ids(model))
    data = {k: tuple(t.to(device) for t in v) for k, v in data.items()}
    return model, vocab, plan, data, story


def ship_to_gguf(args: argparse.Namespace, story: Story, vocab, log: Callable[[str], None]) -> dict | None:
    """A named checkpoint's rows and tokens written into a copy of its GGUF (``OUT/model.gguf``, what llama.cpp and
    Ollama run) and, where llama-cpp-python is installed, llama.cpp's own reading of the story's prompt: its tokens
    and its greedy continuation. None for a model without a GGUF of its own (the shipped one, a folder)."""
    from reserved_kernels.models.artifacts.gguf import export_gguf
    from reserved_kernels.pretrained import is_named

    if not is_named(args.model):
        return None
    path = export_gguf(args.out, args.model, os.path.join(args.out, "model.gguf"), force=True)
    log(f"wrote {path}: {args.model}'s own GGUF with the {len(vocab.plan)} rows and their tokens (llama-cli -m {path})")
    summary = dict(path=path)
    try:
        import llama_cpp
    except ImportError:
        log("  (pip install 'reserved-kernels[llama-cpp]' to see llama.cpp run it here)")
        return summary
    if story.prompt is None:
        return summary
    llm = llama_cpp.Llama(path, n_ctx=256, n_threads=min(4, os.cpu_count() or 1), verbose=False)
    try:
        ids = llm.tokenize(story.prompt.encode("utf-8"), add_bos=True, special=False)
        pieces = [llm.detokenize([i]).decode("utf-8", "replace") for i in ids[1:]]
        done = llm.create_completion(story.prompt, max_tokens=16, temperature=0.0, top_k=1, repeat_penalty=1.0)
    finally:
        llm.close()
    summary.update(tokens=ids, continuation=done["choices"][0]["text"])
    log(f"llama.cpp reads {story.prompt!r} as {len(pieces)} tokens: {pieces}")
    log(f"  and continues it greedily: {summary['continuation']!r}")
    return summary


def run(args: argparse.Namespace) -> dict:
    """The main job; returns the summary (the ``--json`` object)."""
    def log(line: str) -> None:
        print(line, flush=True)

    start = time.perf_counter()
    device = torch.device(device_of(args))
    model, vocab, plan, data, story = prepare(args, log)
    steps = args.steps if args.steps is not None else story.steps
    lr = args.lr if args.lr is not None else story.lr
    log(f"tokenizer: {vocab.path} ({vocab.vocab_size:,} ids, {len(vocab.reserved_ids):,} reserved slots)")
    for e in plan.entries:
        pieces = " ".join(vocab.piece(i) for i in e.source_ids)
        log(f"  {e.term!r:15s} -> id {e.id} (was {e.piece}); description {e.description!r} = {pieces}")
    embedding = model.get_input_embeddings()
    log(f"model: {args.model or 'the shipped demo Gemma'} ({type(model).__name__}, vocabulary "
        f"{embedding.num_embeddings:,} x {embedding.embedding_dim}); training {len(plan)} rows on {device}")
    log(f"text ({story.name}): {len(data['train'][0])} training and {len(data['heldout'][0])} held-out lines with "
        f"the terms, {len(data['ordinary'][0])} ordinary lines")

    snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
    log("ordinary-text perplexity before patching ...")
    base_before = math.exp(mean_loss(model, *data["ordinary"]))
    inits = ["description"] + [i for i in (args.inits or INITS) if i != "description"]  # ours is always measured
    train_all = story.train_all or args.train_all
    log(f"held-out loss on text with the new terms, per initialisation (AdamW lr={lr:g}, {steps} steps, batch "
        f"{story.batch}{'' if train_all else '; ours trains, the others are measured at step 0'}):")
    results, texts = {}, {}
    encode, decode = vocab.renamed_codec()
    for init in inits:
        patched = initialised(model, vocab, init, args.seed)
        if story.prompt is not None and init in ("description", "random"):
            texts[init] = continuation(patched, encode, decode, story.prompt, special_ids(model)["bos"])
        train_steps = steps if (train_all or init == "description") else 0
        clock = time.perf_counter()
        results[init] = train_rows(patched, data, steps=train_steps, lr=lr, seed=args.seed, batch=story.batch,
                                   evals=story.evals, mix=story.mix, log=log)
        run = results[init]
        log(f"  {INIT_LABELS[init]:26s} held-out term loss {run.first_loss:.3f} -> {run.last_loss:.3f}   "
            f"({train_steps} steps, {time.perf_counter() - clock:.1f} s)")
    ours = results["description"]
    trained = ours.model
    if story.prompt is not None:
        texts["trained"] = continuation(trained, encode, decode, story.prompt, special_ids(model)["bos"])
    log("ordinary-text perplexity after training, the slow way (a full forward pass) ...")
    base_after = math.exp(mean_loss(trained, *data["ordinary"]))
    cached_after = ours.ordinary[-1][1] if ours.ordinary else base_after
    moved = [name for name, p in trained.named_parameters()
             if not name.endswith("reserved_weight") and not torch.equal(p, snapshot[name])]
    moved += [name for name, p in model.named_parameters() if not torch.equal(p, snapshot[name])]
    state = state_bytes(trained, ours.optimizer)
    rows_total, dim = embedding.weight.shape
    if args.model:  # a real checkpoint: computed, not measured on a second copy of it
        dense = rows_total * dim * 4 * 3
        dense_how = "computed: V x D fp32 gradient + 2 AdamW moments"
    else:
        dense = dense_recipe_state_bytes(copy.deepcopy(model), plan.ids, *(t[:16] for t in data["train"]))
        dense_how = "measured after one step of the whole table trainable with a gradient hook"

    term_before, term_after = math.exp(ours.first_loss), math.exp(ours.last_loss)
    for line in closing_lines(results, story, base_before=base_before, base_after=base_after, cached_after=cached_after,
                              steps=steps, texts=texts, moved=moved, state=state, dense=dense, dense_how=dense_how):
        log(line)

    from reserved_kernels.models import save_reserved

    plot = args.plot or os.path.join(args.out, "loss_curves.png")
    log(f"plot: {plot}" if write_plot(results, story, plot)
        else "plot: none (matplotlib is not installed: pip install matplotlib)")
    save_reserved(trained, args.out, plan=vocab)
    log(f"wrote {args.out}: the renamed tokenizer, reserved_plan.json and the rows as a PEFT adapter "
        "(adapter_config.json, adapter_model.safetensors)")
    shipped = ship_to_gguf(args, story, vocab, log)
    log(f"done in {time.perf_counter() - start:.0f} s")
    summary = dict(base_ppl_before=base_before, base_ppl_after=base_after, base_ppl_after_cached=cached_after,
                   ordinary_curve=ours.ordinary, term_ppl_before=term_before,
                   term_ppl_after=term_after, init_loss={k: r.first_loss for k, r in results.items()},
                   final_loss={k: r.last_loss for k, r in results.items()}, frozen_identical=not moved,
                   state_bytes=state, dense_state_bytes=dense, steps=steps, lr=lr, seed=args.seed,
                   story=story.name, continuations=texts, gguf=shipped)
    if args.json:
        print(json.dumps(summary))
    return summary
