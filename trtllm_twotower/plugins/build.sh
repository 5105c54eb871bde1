#!/usr/bin/env bash
# Build the kernel library (and the TensorRT plugins when TensorRT is found) into build/plugins/.
# Link the plugins against the libnvinfer that Python's `tensorrt` loads (TENSORRT_ROOT = that
# package's directory, or the same TensorRT release): a second libnvinfer in the process has its own
# plugin registry, and the engines' builder then finds no TwoTower creator ("plugin not found").
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cmake -S "$root/trtllm_twotower/plugins" -B "$root/build/plugins" "$@"
cmake --build "$root/build/plugins" -j"$(nproc)"
