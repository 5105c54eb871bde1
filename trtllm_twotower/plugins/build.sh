#!/usr/bin/env bash
# Build the kernel library (and the TensorRT plugins when TensorRT is found) into build/plugins/.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cmake -S "$root/trtllm_twotower/plugins" -B "$root/build/plugins" "$@"
cmake --build "$root/build/plugins" -j"$(nproc)"
