"""The GPU benchmark harness runs end to end on CPU with the tiny config (so it does not rot)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_towers_smoke(tmp_path):
    out = tmp_path / "smoke.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "bench_towers.py"), "--smoke", "--device", "cpu",
                    "--out", str(out)], check=True, capture_output=True, text=True, cwd=ROOT)
    result = json.loads(out.read_text())
    assert {"device", "date", "commit", "copy_bandwidth_bytes_per_s", "steps", "generation"} <= set(result)
    steps = {(r["step"], r["batch"]) for r in result["steps"]}
    assert steps == {(s, b) for s in ("ar_token", "extend16", "denoise16") for b in (1, 2)}
    for row in result["steps"]:
        assert row["floor_ms"] > 0 and row["ms"] > 0 and row["ratio_to_floor"] == row["ms"] / row["floor_ms"]
        assert 1 <= row["distinct_experts_mean"] <= 8
    assert {r["mode"] for r in result["generation"]} == {"diffusion", "speculative", "mock-ar", "ar"}


def test_bench_kernels_refuses_without_a_gpu_or_library():
    import torch

    if torch.cuda.is_available():
        return
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_kernels.py"), "--out", "unused.json"],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 2 and "needs a CUDA GPU" in run.stderr
    assert not (ROOT / "unused.json").exists()
