#!/usr/bin/env bash
# Build the wheel (CUDA extension forced when nvcc is present), install it into a fresh virtual
# environment, and check that it imports and reports the extension as built. CI runs this.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh  # the build needs torch: the project's environment (scripts/test.sh installed it)
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
build_cuda=0
command -v nvcc >/dev/null 2>&1 && build_cuda=1
RESERVED_KERNELS_BUILD_CUDA=$build_cuda TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" \
  python -m pip wheel --quiet --no-build-isolation --no-deps -w "$work/dist" .
wheel="$(ls "$work"/dist/reserved_kernels-*.whl)"
python -m venv "$work/venv"
"$work/venv/bin/python" -m pip install --quiet "torch<=2.14.1" "$wheel"
cd "$work"  # away from the checkout, so the import is the installed wheel
"$work/venv/bin/python" - "$build_cuda" <<'PY'
import sys

import reserved_kernels
from reserved_kernels import _backend

assert "site-packages" in reserved_kernels.__file__, reserved_kernels.__file__
built, why = _backend.extension_status()
print(f"wheel: {reserved_kernels.__file__}; compiled extension built: {built} ({why})")
if sys.argv[1] == "1" and not built:
    sys.exit("the wheel was built with the CUDA kernels but its extension does not load")
emb = reserved_kernels.ReservedEmbedding(10, 4, reserved_ids=[1, 2])
import os

import torch

assert emb(torch.tensor([1, 3])).shape == (2, 4)
from reserved_kernels.pretrained import shipped_model  # the main job's model ships in the wheel
from reserved_kernels.vocab import default_tokenizer_path

assert os.path.exists(os.path.join(shipped_model(), "model.safetensors")), shipped_model()
assert os.path.exists(default_tokenizer_path())
PY
"$work/venv/bin/reserved-kernels" info | grep "compiled extension built"
