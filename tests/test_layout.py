"""The package's layout rules (issue #36): no module reads another module's private names, ``models/`` keeps
at most six files at its top, and the top level holds no part of the main job."""

from __future__ import annotations

import ast
import importlib.util
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "reserved_kernels"


def _modules() -> dict[pathlib.Path, ast.Module]:
    return {path: ast.parse(path.read_text(), str(path)) for path in sorted(PACKAGE.rglob("*.py"))}


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _defined(tree: ast.Module) -> set[str]:
    """The private names a module defines: functions, classes, assignments, attributes set on ``self``."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.isidentifier():
            names.add(node.value)  # register_buffer("_x", ...), self.__dict__["_x"] = ...
    return {n for n in names if _private(n)}


def private_reads() -> list[str]:
    """Each place a module imports or reads a private name that another module of the package defines."""
    trees = _modules()
    defined = {path: _defined(tree) for path, tree in trees.items()}
    everywhere = set().union(*defined.values())
    found = []
    for path, tree in trees.items():
        where = path.relative_to(PACKAGE.parent)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("reserved_kernels"):
                for alias in node.names:
                    submodule = importlib.util.find_spec(f"{node.module}.{alias.name}") if _private(alias.name) \
                        else None  # a package-private module (_backend, _table …) is the package's own
                    if _private(alias.name) and submodule is None:
                        found.append(f"{where}:{node.lineno}: from {node.module} import {alias.name}")
            elif isinstance(node, ast.Attribute) and _private(node.attr) and node.attr in everywhere:
                owner = node.value
                own = isinstance(owner, ast.Name) and owner.id in ("self", "cls")
                if not own and node.attr not in defined[path]:
                    found.append(f"{where}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_module_reads_another_modules_private_names():
    assert private_reads() == []


def test_the_check_finds_a_private_read(tmp_path, monkeypatch):
    """The rule above can fail: a module reading another's private function is reported."""
    fake = tmp_path / "reserved_kernels"
    (fake / "a").mkdir(parents=True)
    (fake / "a" / "one.py").write_text("def _helper():\n    return 1\n")
    (fake / "two.py").write_text("from reserved_kernels.a import one\n\nVALUE = one._helper()\n")
    monkeypatch.setitem(globals(), "PACKAGE", fake)
    assert private_reads() == ["reserved_kernels/two.py:3: one._helper"]


def test_models_keeps_at_most_six_files_at_its_top():
    files = sorted(p.name for p in (PACKAGE / "models").iterdir() if p.is_file() and p.suffix == ".py")
    assert len(files) <= 6, files


@pytest.mark.parametrize("prefix", ["demo", "stories", "recipes"])
def test_the_top_level_holds_no_part_of_the_main_job(prefix):
    assert not list(PACKAGE.glob(f"{prefix}*.py"))


def test_the_public_names_survive_the_moves():
    """``rk.*`` and ``reserved_kernels.models.*`` resolve (the layout moved the modules behind them, not them), and
    the moved functions are the same objects under both."""
    import reserved_kernels as rk
    import reserved_kernels.models as models

    missing = [n for n in rk.__all__ if getattr(rk, n, None) is None]
    missing += [f"models.{n}" for n in models.__all__ if getattr(models, n, None) is None]
    assert missing == []
    assert rk.untrained_rows is models.untrained_rows and rk.export_gguf is models.export_gguf
    assert rk.save_reserved is models.save_reserved and rk.pretrained.shipped_model().endswith("demo_gemma")
