"""Every Python block of the README and of ``docs/`` runs, so that a snippet that stops working fails CI.

A page's blocks run in order in one namespace (a later block may use an earlier one's names), in a temporary
working directory, on the model the package ships. A block preceded by an HTML comment runs as it says:

* ``<!-- doctest: needs gemma-3-270m -->``: alone, where the real model's packages are installed (CI installs
  them; elsewhere it skips, saying why);
* ``<!-- doctest: given a gemma_pytorch model, its vocab and input_ids -->``: alone, with those names bound to a
  gemma_pytorch-layout model (``tests/gemma_pytorch_layout.py``: the package does not ship one), a vocabulary
  planned for it and a batch of ids.
"""

from __future__ import annotations

import pathlib
import re

import pytest

pytest.importorskip("transformers", reason="the documentation's examples run Hugging Face models")

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(?:<!-- doctest: (?P<how>[^>]*?) -->\n)?```python\n(?P<code>.*?)```", re.S)


def blocks(page: pathlib.Path) -> list[tuple[str | None, str]]:
    """(how, code) of each Python block of ``page``, in order."""
    return [(m.group("how"), m.group("code")) for m in BLOCK.finditer(page.read_text(encoding="utf-8"))]


def _run(code: str, namespace: dict, where: str) -> None:
    exec(compile(code, where, "exec"), namespace)  # noqa: S102 - the documentation's own examples


def _gemma_pytorch_names() -> dict:
    import torch

    import reserved_kernels as rk
    from tests.gemma_pytorch_layout import CausalLM, Config

    vocab = rk.ReservedVocab.from_file(rk.default_tokenizer_path())
    vocab.assign({"[summary]": "in summary"})
    ids = torch.randint(108, 1024, (2, 20), generator=torch.Generator().manual_seed(0))
    ids[:, 4] = vocab.plan.ids[0]
    return dict(model=CausalLM(Config(architecture="gemma2")), vocab=vocab, input_ids=ids)


def _needs(what: str) -> None:
    from reserved_kernels import pretrained

    if what == "gemma-3-270m":
        ok, why = pretrained.available("gemma-3-270m")
        if not ok:
            pytest.skip(why)
    else:
        raise AssertionError(f"unknown doctest requirement {what!r}")


def run_plain_blocks(page: pathlib.Path) -> int:
    """Run ``page``'s blocks without a comment in order, in one namespace; returns how many ran."""
    namespace: dict = {"__name__": "__doc_example__"}
    plain = [(index, code) for index, (how, code) in enumerate(blocks(page)) if how is None]
    for index, code in plain:
        _run(code, namespace, f"{page.name}, block {index}")
    return len(plain)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_each_pages_plain_blocks_run_in_order(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_plain_blocks(page)


SPECIAL = [(page, index) for page in PAGES for index, (how, _) in enumerate(blocks(page)) if how is not None]


@pytest.mark.parametrize("page, index", SPECIAL, ids=lambda x: str(x.relative_to(ROOT)) if isinstance(x, pathlib.Path)
                         else f"block{x}")
def test_each_block_with_its_own_set_up_runs(page, index, tmp_path, monkeypatch):
    how, code = blocks(page)[index]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__doc_example__"}
    if how.startswith("needs "):
        _needs(how.removeprefix("needs "))
    elif how == "given a gemma_pytorch model, its vocab and input_ids":
        namespace.update(_gemma_pytorch_names())
    else:
        raise AssertionError(f"{page}: unknown doctest comment {how!r}")
    _run(code, namespace, f"{page.relative_to(ROOT)}, block {index}")


def test_the_pages_have_blocks_and_the_check_fails_on_a_broken_one(tmp_path, monkeypatch):
    """The runner finds the blocks (a page without any would pass vacuously) and a broken block fails it."""
    assert len(blocks(ROOT / "README.md")) >= 1 and sum(len(blocks(page)) for page in PAGES) >= 10
    broken = tmp_path / "broken.md"
    broken.write_text("text\n\n```python\nx = 1\n```\n\n```python\ny = x + undefined_name\n```\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(NameError, match="undefined_name"):
        run_plain_blocks(broken)
