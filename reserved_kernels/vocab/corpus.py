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


# The demo's model learns three registers, each a rule on the words of a line. Two are announced by a
# marker phrase the model is trained with; the demo gives each marker a single new control token.
MODES = ("plain", "summary", "translate")
MARKERS = {"summary": "in summary:", "translate": "in translation:"}
FOREIGN_SUBJECTS = ["la phrase", "el modelo", "die Tabelle", "le réseau", "los datos", "la tabla"]
FOREIGN_VERBS = ["lee", "escribe", "mesure", "liest", "copie", "calcula"]
FOREIGN_OBJECTS = ["el gradiente", "les données", "die Zeile", "la mesure", "el vocabulario", "la phrase"]
ENGLISH_SUBJECTS = [s for s in SUBJECTS if s not in FOREIGN_SUBJECTS and s.isascii()]
ENGLISH_OBJECTS = [o for o in OBJECTS if o.isascii()]


def mode_line(rng: random.Random, mode: str, marked: bool = True) -> str:
    """One line of a register: ``plain`` (subject, verb, object, tail), ``summary`` (subject and verb only),
    ``translate`` (foreign words); ``marked`` starts the summary and translate lines with their marker phrase."""
    if mode == "plain":
        line = f"{rng.choice(ENGLISH_SUBJECTS)} {rng.choice(VERBS)} {rng.choice(ENGLISH_OBJECTS)}{rng.choice(TAILS)}"
    elif mode == "summary":
        line = f"{rng.choice(ENGLISH_SUBJECTS)} {rng.choice(VERBS)}."
    else:
        line = f"{rng.choice(FOREIGN_SUBJECTS)} {rng.choice(FOREIGN_VERBS)} {rng.choice(FOREIGN_OBJECTS)}."
    line = line[0].upper() + line[1:]
    return f"{MARKERS[mode]} {line}" if marked and mode in MARKERS else line


def mode_corpus(lines: int, seed: int = 0, weights=(0.7, 0.15, 0.15)) -> list[tuple[str, str]]:
    """``(mode, line)`` pairs, marked, in the proportions ``weights`` of :data:`MODES`."""
    rng = random.Random(seed)
    return [(mode, mode_line(rng, mode)) for mode in rng.choices(MODES, weights=weights, k=lines)]
