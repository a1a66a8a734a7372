"""Pretrain the demo's small Gemma on the generated registers: the model the main job teaches new tokens to.

    python scripts/train_demo_model.py [--out reserved_kernels/data/demo_gemma] [--steps 1500]

A ``GemmaForCausalLM`` with the embedded tokenizer's vocabulary (1,024 ids; Gemma 1/2 layout), trained on
``reserved_kernels.vocab.corpus.mode_corpus``: plain sentences, and two registers announced by a marker
phrase ("in summary:" — subject and verb only; "in translation:" — foreign words), one line per sequence
after <bos>. The reserved ``<unusedN>`` rows are never seen as inputs, as in Gemma. Everything is seeded,
single-threaded and deterministic: a rerun on the same platform writes the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "reserved_kernels", "data",
                           "demo_gemma")
CONFIG = dict(vocab_size=1024, hidden_size=96, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=1, head_dim=24, pad_token_id=0, eos_token_id=1, bos_token_id=2,
              max_position_embeddings=64, tie_word_embeddings=True)


def train(out: str, steps: int = 1500, seed: int = 0) -> str:
    import torch
    import transformers

    from reserved_kernels.demo.job import encode_lines
    from reserved_kernels.vocab import ReservedVocab, default_tokenizer_path
    from reserved_kernels.vocab.corpus import mode_corpus

    torch.manual_seed(seed)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    vocab = ReservedVocab.from_file(default_tokenizer_path())
    lines = [line for _, line in mode_corpus(30_000, seed=seed)]
    ids, labels, mask = encode_lines(lines, vocab.encode, bos=2, eos=1, pad=0)  # 32 tokens per line
    config = transformers.GemmaConfig(**CONFIG)
    config._attn_implementation = "eager"
    model = transformers.GemmaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.05)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        batch = torch.randint(0, len(lines), (64,), generator=generator)
        loss = model(input_ids=ids[batch], attention_mask=mask[batch], labels=labels[batch]).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}", flush=True)
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    with open(os.path.join(out, "model.safetensors"), "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    print(f"wrote {out} (model.safetensors sha256 {digest[:16]}…)")
    return digest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    train(args.out, args.steps, args.seed)


if __name__ == "__main__":
    main()
