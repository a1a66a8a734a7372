#!/usr/bin/env bash
# The main job (README): install the package, then run the end-to-end demo.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet "torch<=2.14.1" ninja
RESERVED_KERNELS_BUILD_CUDA="${RESERVED_KERNELS_BUILD_CUDA:-0}" python -m pip install --quiet --no-build-isolation -e ".[gemma]"
reserved-kernels demo "$@"
