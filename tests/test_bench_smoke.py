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


def test_knob_report_smoke(tmp_path):
    """The knob report of the trained demo model runs end to end (one threshold, one step budget)."""
    from trtllm_twotower.demo import TRAINED_DEMO_DIR

    if not (TRAINED_DEMO_DIR / "model.safetensors.index.json").is_file():
        import pytest

        pytest.skip("the trained demo model is not in this checkout")
    out = tmp_path / "knobs.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "knob_report.py"), "--quick", "--no-plot", "--prompts", "2",
                    "--out", str(out)], check=True, capture_output=True, text=True, cwd=ROOT)
    rows = json.loads(out.read_text())["rows"]
    assert [r["mode"] for r in rows] == ["ar", "mock-ar", "diffusion", "speculative"]
    assert rows[0]["ar_agreement"] == 1.0 and rows[-1]["ar_agreement"] == 1.0  # speculative is exactly AR
    assert 1.0 <= rows[2]["tokens_per_step"] <= 16 and 0 < rows[2]["known_word_rate"] <= 1

