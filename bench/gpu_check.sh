#!/usr/bin/env bash
# One prepared run on a GPU machine: build, info, the whole test suite with the GPU present,
# the kernel benchmark matrix and the training-step comparison. Logs and results go to DIR.
#   bash bench/gpu_check.sh DIR [--quick]
set -uo pipefail
out="${1:?usage: gpu_check.sh DIR [--quick]}"
quick="${2:-}"
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" RESERVED_KERNELS_BUILD_CUDA=1
export RESERVED_KERNELS_EXPECT_CUDA_EXT=1
py=python3

stage() { echo "== $1 ($(date +%T))"; }
stage build
$py -m pip install --no-build-isolation --no-deps --no-index -e . >"$out/build.log" 2>&1 || { tail -40 "$out/build.log"; exit 1; }
stage info
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv; $py -m reserved_kernels info; } 2>&1 | tee "$out/info.txt"
stage tests
timeout 240 $py -m pytest -q -p no:cacheprovider -rs tests 2>&1 | tee "$out/tests.log" | tail -25
stage kernels
timeout 240 $py -m reserved_kernels.benchmarks.kernels --out "$out" $quick 2>&1 | tee "$out/bench.log" | tail -45
stage train-step
timeout 120 $py -m reserved_kernels.benchmarks.train_step --device cuda --vocab 262144 --dim 3840 --slots 1024 --tokens 8192 \
  --dtype bfloat16 --out "$out/train_step_gpu.json" 2>&1 | tee "$out/train_step.log"
stage done
