"""Text the project generates: fixed word lists and a seed, for the embedded tokenizer and the demo."""

from __future__ import annotations

import random

SUBJECTS = ["the model", "a tokenizer", "the embedding table", "this kernel", "the optimizer", "a new token",
            "the reserved row", "our benchmark", "the gradient", "each layer", "the vocabulary", "a control token",
            "la phrase", "el modelo", "die Tabelle", "le réseau", "the 学習 step", "データ"]
VERBS = ["reads", "writes", "trains", "scales", "gathers", "updates", "freezes", "measures", "initialises",
         "summarises", "translates", "compiles", "copies", "averages", "tokenises", "encodes", "decodes"]
OBJECTS = ["every row", "the mean of related rows", "a compact gradient", "only the planned slots",
           "held-out text", "the perplexity", "memory bandwidth", "the frozen weights", "a batch of 4096 tokens",
           "the learning rate", "a summary", "a translation", "the café menu", "naïve estimates", "東京 data",
           "español y français", "the output head", "Gemma's vocabulary"]
TAILS = [".", "!", "?", " again.", " in 12 ms.", " on 2 cores.", " (quickly).", ", then stops.", ": done.",
         " — twice.", "; see §3.", " at 3.5 TB/s."]


def corpus(lines: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for i in range(lines):
        words = [rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS)]
        sentence = " ".join(words) + rng.choice(TAILS)
        out.append(sentence[0].upper() + sentence[1:] + (f" {rng.randint(0, 99999)}" if i % 7 == 0 else ""))
    return out
