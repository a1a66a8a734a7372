"""What the model benchmarks share: a named checkpoint loaded for measuring, and a batch with its terms placed."""

from __future__ import annotations

# Where the batch's reserved ids stand (with --head, per sequence of 512): "mixed" — the first sequence opens
# with every slot, the rest is random text; "ordinary" — none; "random" — one term per sequence at a uniformly
# random position, drawn afresh for every step (as batches change in training: a single draw of two positions
# says little about a uniform one); "start" — a term at position 0 of every sequence.
TEXTS = ("mixed", "ordinary", "random", "start")


def checkpoint(args):
    """(model, its table, the first ``args.slots`` reserved slots of its tokenizer, its tokenizer's size)."""
    import torch
    import transformers

    from reserved_kernels.vocab import ReservedVocab

    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
    model.to(args.device)
    # On a CPU the weights are safetensors' memory map, read in page by page as a step first touches them:
    # they would count as that step's memory (the whole table for a recipe with the head, none of it for the
    # body alone; fewer pages where the page cache already held them). Copied into the process's own
    # memory now, they are part of the model the figures are measured beyond. (``to`` a GPU copies them.)
    if torch.device(args.device).type == "cpu":
        with torch.no_grad():
            for param in model.parameters():
                param.data = param.data.clone()
    weight = model.get_input_embeddings().weight
    vocab = ReservedVocab.from_folder(args.model, model_vocab_size=weight.shape[0])
    return (model, weight.detach(), torch.tensor(vocab.reserved_ids[:args.slots], device=args.device),
            vocab.tokenizer_size)


def batch_text(kind: str, ids, reserved_ids, width: int, draw: int = 0):
    """The batch (sequences of ``width``) with its reserved ids where ``kind`` (see :data:`TEXTS`) puts them;
    ``draw`` seeds which terms, and for "random" where."""
    import torch

    if kind == "mixed":
        ids = ids.clone()
        ids[: len(reserved_ids)] = reserved_ids  # every reserved row gets a gradient
        return ids.view(-1, width)
    hit = torch.isin(ids, reserved_ids)  # random text may draw a reserved id: ordinary text has none
    ids = torch.where(hit, ids.new_tensor(int(ids[~hit][0])), ids).view(-1, width)
    gen = torch.Generator().manual_seed(draw)
    rows = torch.arange(ids.shape[0])
    terms = reserved_ids[torch.randint(0, len(reserved_ids), (ids.shape[0],), generator=gen).to(reserved_ids.device)]
    if kind == "random":
        ids[rows, torch.randint(0, width, (ids.shape[0],), generator=gen)] = terms
    elif kind == "start":
        ids[:, 0] = terms
    return ids
