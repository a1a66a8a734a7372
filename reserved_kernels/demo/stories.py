"""The main job's stories: what each teaches (terms, defaults) and its text. No torch here, so the command
line's parser reads the choices without importing it."""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Callable

INITS = ("description", "mean", "random", "untouched")
INIT_LABELS = {"description": "description mean (ours)", "mean": "mean of all rows", "random": "random normal row",
               "untouched": "untouched reserved row"}
STORIES = ("registers", "pydoc")


@dataclasses.dataclass(frozen=True)
class Story:
    """What one demo teaches, and how long: the terms (term -> description), the defaults, the plot's title."""

    name: str
    terms: dict
    title: str
    steps: int
    lr: float
    batch: int
    length: int  # tokens per line at most: <bos> line <eos>, cut there
    prompt: str | None  # a prompt whose greedy continuation shows what training did (None: it shows nothing)
    term_is_target: bool  # whether the term's own position is predicted (not for a control token)
    train_all: bool  # train every initialisation (the small model), or ours alone (a real one)
    evals: int  # held-out evaluations during training
    spaced: bool  # plan each term after a space too (ReservedVocab.surface_forms): words in running text
    mix: float  # the weight of ordinary text's cached loss in the training loss (0: term text alone)
    text: Callable[[random.Random], tuple[list[str], list[str]]]  # (lines with the terms, ordinary lines)
    training_lines: Callable[[int], int]  # how many of that many lines with the terms train (the rest: held out)


def register_lines(rng: random.Random, count: int) -> tuple[list[str], list[str]]:
    """(term lines, ordinary lines) of the registers story: a control token, then a line of its register."""
    from reserved_kernels.vocab.corpus import mode_line

    terms = list(REGISTERS.terms)
    register = {"[summary]": "summary", "[translate]": "translate"}
    term_lines = [f"{terms[i % 2]} {mode_line(rng, register[terms[i % 2]], marked=False)}" for i in range(count)]
    return term_lines, [mode_line(rng, "plain") for _ in range(300)]


def pydoc_text() -> str:
    """Python's own documentation topics (``pydoc_data``, shipped with Python): about 0.5 MB of English and code."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics))


def pydoc_sentences() -> list[str]:
    """The sentences of :func:`pydoc_text`, whitespace collapsed, 40-300 characters."""
    sentences = []
    for paragraph in re.split(r"\n\s*\n", pydoc_text()):
        flat = " ".join(paragraph.split())
        sentences += [s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", flat) if 40 <= len(s) <= 300]
    return sentences


def pydoc_lines(rng: random.Random) -> tuple[list[str], list[str]]:
    """(term lines, ordinary lines): sentences with a term's phrase, each phrase replaced by the term (plurals keep
    their "s": "[kwarg]s"; a sentence may start with one), and 124 sentences that use none of the phrases."""
    patterns = {term: re.compile(r"\b" + re.escape(phrase), re.IGNORECASE) for term, phrase in PYDOC.terms.items()}
    term_lines, ordinary = [], []
    for sentence in dict.fromkeys(pydoc_sentences()):  # each sentence once, in order
        replaced = sentence
        for term, pattern in patterns.items():
            replaced = pattern.sub(term, replaced)
        (ordinary if replaced == sentence else term_lines).append(replaced)
    rng.shuffle(term_lines)
    rng.shuffle(ordinary)
    return term_lines, ordinary[:124]


# Control tokens open a line: never after a space, so one form each. The shipped model never learned to continue
# a marker (its continuation is the same for every row), so it shows no continuation.
REGISTERS = Story("registers", {"[summary]": "in summary", "[translate]": "in translation"},
                  "Teaching [summary] and [translate] to a small pretrained Gemma", steps=300, lr=1e-3, batch=16,
                  length=32, prompt=None, term_is_target=False, train_all=True, evals=10, spaced=False, mix=0.0,
                  text=lambda rng: register_lines(rng, 2200), training_lines=lambda count: count - 200)
# Terms in running text: each is planned bare ("[kwarg]", from "keyword ▁argument") and after a space
# (" [kwarg]", from "▁keyword ▁argument"), so it is one token at the start of a sentence and inside one. Every
# position is a target, so the tied head learns to predict the terms: ordinary text, through the cache
# (FrozenText), holds the rest of the distribution in place.
PYDOC = Story("pydoc", {"[kwarg]": "keyword argument", "[posarg]": "positional argument",
                        "[builtin]": "built-in function", "[codeblock]": "code block"},
              "Teaching Gemma 3 270M four terms of Python's documentation", steps=12, lr=5e-4, batch=8, length=40,
              prompt="A [posarg] must come before a [kwarg] because", term_is_target=True, train_all=False, evals=3,
              spaced=True, mix=1.0, text=pydoc_lines, training_lines=lambda count: count * 7 // 10)


def story_named(name: str) -> Story:
    return {"registers": REGISTERS, "pydoc": PYDOC}[name]
