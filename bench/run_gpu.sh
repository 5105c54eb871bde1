#!/usr/bin/env bash
# Everything a lent GPU session runs, in one device call of at most 9 minutes (the lease is 15
# minutes of device time in all, machine start included), from a clean commit:
#     TWOTOWER_COMMIT=<sha of HEAD here> bash bench/run_gpu.sh      (device run, timeout_s 600)
# Stages in order of value, each with its own time limit (540 s together), each writing its file
# at once, so a stage that fails or runs long costs only itself. Files land in $OUT (the device
# tool's folder; 8 files, the most that come back) or bench/results/gpu-<date>/; the last lines
# printed are the summary (bench/gpu_summary.py, which also draws the README plot from them here).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/results/gpu-$(date -u +%Y%m%d)}"
mkdir -p "$out"
export PYTHONPATH=. PYTHONUNBUFFERED=1
stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, log to $out/NAME.log, report
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    echo "stage $name: exit $rc in $((SECONDS - start)) s (limit $limit s)" | tee -a "$out/device.txt"
    return $rc
}
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  nvcc --version | tail -2; python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  echo "commit: ${TWOTOWER_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"; date -u; } > "$out/device.txt" 2>&1
cat "$out/device.txt"
# 1. correctness: the Triton kernels compiled here vs references (small odd shapes, then real sizes), the
#    torch path on CUDA vs CPU, one sync per step, graphs vs eager
stage gpu_tests 220 python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py tests/test_kernels_gpu.py \
    tests/test_gpu_runtime.py; tail -4 "$out/gpu_tests.log"
# 2. kernels against their byte floors and their torch peers
stage kernels 60 python3 bench/bench_kernels.py --out "$out/kernels.json" --repeat 10
# 3. both towers at full depth (an H200 holds both: ~127 GB), eager and CUDA-graph replay, then
#    end to end per mode and transformers' greedy generate on the same weights
layers=52; python3 -c "import torch,sys; sys.exit(torch.cuda.get_device_properties(0).total_memory < 135e9)" || layers=14
stage towers 150 python3 bench/bench_towers.py --layers "$layers" --graphs --transformers --out "$out/towers.json"
# 4. the plugins' path: the same kernels compiled ahead of time (demo config), launched through the
#    plugin library's C ABI, against the JIT kernels' outputs bit for bit
stage aot 80 python3 -m pytest -q -p no:cacheprovider tests/test_triton_aot.py -m gpu; tail -3 "$out/aot.log"
# 5. memory checker on the small kernel tests (last: the least likely to change a decision)
stage sanitizer 30 compute-sanitizer --tool memcheck python3 -m pytest -q -p no:cacheprovider \
    tests/test_kernels_gpu.py -k "small or tiny"; tail -3 "$out/sanitizer.log"
python3 bench/gpu_summary.py "$out"
