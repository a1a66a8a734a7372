"""Train the embedded default tokenizer: a small SentencePiece BPE model with Gemma's special-token layout.

    python scripts/train_tokenizer.py [--out reserved_kernels/data/tokenizer.model]

Layout, as in Gemma 1/2: <pad>=0, <eos>=1, <bos>=2, <unk>=3, <mask>=4, <2mass>=5, [@BOS@]=6,
<unused0>…<unused98> at 7–105, <start_of_turn>=106, <end_of_turn>=107, then 256 byte-fallback pieces,
then learned pieces. Identity normalisation, no dummy prefix, digits split: Gemma's settings.
The training text comes from ``reserved_kernels.vocab.corpus`` (fixed word lists, fixed seed): reproducible.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from reserved_kernels.vocab.corpus import corpus  # noqa: E402


def train(out_path: str, vocab_size: int = 1024) -> None:
    import sentencepiece as spm

    specials = [f"<unused{i}>" for i in range(99)] + ["<start_of_turn>", "<end_of_turn>"]
    with tempfile.TemporaryDirectory() as tmp:
        text = os.path.join(tmp, "corpus.txt")
        with open(text, "w", encoding="utf-8") as f:
            f.write("\n".join(corpus(20_000)) + "\n")
        prefix = os.path.join(tmp, "tok")
        spm.SentencePieceTrainer.train(
            input=text, model_prefix=prefix, model_type="bpe", vocab_size=vocab_size, character_coverage=1.0,
            pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
            unk_piece="<unk>", control_symbols=["<mask>", "<2mass>", "[@BOS@]"], user_defined_symbols=specials,
            byte_fallback=True, normalization_rule_name="identity", add_dummy_prefix=False,
            remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
            num_threads=1, minloglevel=2)
        # The trainer records its temporary paths in the model: fix them, so a retrain is byte-identical.
        from sentencepiece import sentencepiece_model_pb2 as pb

        proto = pb.ModelProto()
        with open(prefix + ".model", "rb") as f:
            proto.ParseFromString(f.read())
        proto.trainer_spec.input[:] = ["corpus.txt"]
        proto.trainer_spec.model_prefix = "tokenizer"
        os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
        with open(out_path, "wb") as f:
            f.write(proto.SerializeToString())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parser.add_argument("--out", default=os.path.join(here, "reserved_kernels", "data", "tokenizer.model"))
    parser.add_argument("--vocab-size", type=int, default=1024)
    args = parser.parse_args()
    train(args.out, args.vocab_size)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
