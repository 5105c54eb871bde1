#!/usr/bin/env bash
# Build the plugin library for one model config into build/plugins/ (the kernels for that config
# compiled ahead of time into build/aot/ first, for sm_90 unless TWOTOWER_ARCH says otherwise):
#   bash trtllm_twotower/plugins/build.sh [CONFIG_OR_CHECKPOINT] [cmake -D... options]
# CONFIG defaults to the real model's config (bench/real_config.json). The plugins are built when
# TensorRT is found (TENSORRT_ROOT). Link them against the libnvinfer that Python's `tensorrt`
# loads (TENSORRT_ROOT = that package's directory, or the same TensorRT release): a second libnvinfer
# in the process has its own plugin registry, and the engines' builder then finds no TwoTower
# creator ("plugin not found").
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
config="${1:-$root/bench/real_config.json}"
[ $# -gt 0 ] && shift
python="${PYTHON:-python3}"
env -u TRITON_INTERPRET PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" "$python" -m trtllm_twotower.plugins.aot \
  --config "$config" --out "$root/build/aot" --arch "${TWOTOWER_ARCH:-90}"
cmake -S "$root/trtllm_twotower/plugins" -B "$root/build/plugins" -DTWOTOWER_AOT_DIR="$root/build/aot" "$@"
cmake --build "$root/build/plugins" -j"$(nproc)"
