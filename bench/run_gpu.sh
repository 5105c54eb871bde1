#!/usr/bin/env bash
# Everything a lent GPU session runs, in one call (device tool: `bash bench/run_gpu.sh`):
# build the kernels with that machine's nvcc, run the GPU tests (and compute-sanitizer on the small
# ones), then the benchmarks. Results land in $OUT (the device tool's folder) or bench/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/results}"
mkdir -p "$out"
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/device.txt"
bash trtllm_twotower/plugins/build.sh > "$out/build.log" 2>&1 || { tail -30 "$out/build.log"; exit 1; }
python -m pytest -q -m gpu tests 2>&1 | tee "$out/gpu_tests.log" | tail -15
compute-sanitizer --tool memcheck python -m pytest -q tests/test_kernels_gpu.py -k "small or tiny" \
    > "$out/sanitizer.log" 2>&1; tail -5 "$out/sanitizer.log"
python bench/bench_kernels.py --out "$out/kernels.json" 2>&1 | tail -8
# both towers at full depth need ~127 GB: 14 layers (two whole periods of the pattern) fit an H100
python bench/bench_towers.py --layers 14 --transformers --out "$out/towers.json" 2>&1 | tail -40
