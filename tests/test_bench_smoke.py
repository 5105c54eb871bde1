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
                    "--graphs", "--out", str(out)], check=True, capture_output=True, text=True, cwd=ROOT)
    result = json.loads(out.read_text())
    assert {"device", "date", "commit", "copy_bandwidth_bytes_per_s", "steps", "generation"} <= set(result)
    steps = {(r["step"], r["batch"]) for r in result["steps"]}
    assert steps == {(s, b) for s in ("ar_token", "extend16", "denoise16") for b in (1, 2)}
    for row in result["steps"]:
        assert row["floor_ms"] > 0 and row["ms"] > 0 and row["ratio_to_floor"] == row["ms"] / row["floor_ms"]
        assert 1 <= row["distinct_experts_mean"] <= 8
        assert row["ms_graph"] is None and row["graph_error"] == "CUDA graphs need a CUDA device"  # CPU: skipped, said why
    modes = {"diffusion", "speculative", "mock-ar", "ar"}
    assert {r["mode"] for r in result["generation"]} == modes | {m + "-graphs" for m in modes}
    assert all("tokens_per_s" in r for r in result["generation"])  # no mode failed (the graph plumbing: emulated)


def test_bench_kernels_refuses_without_a_gpu():
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



def test_gpu_summary_judges_each_goal_by_its_measured_ratio(tmp_path, capsys):
    """The goal table of a GPU run: met / not met from the numbers, "not measured" where a file or
    a section is missing or failed, and the plot from the step rows."""
    sys.path.insert(0, str(ROOT))
    from bench import gpu_summary

    def row(step, ms, floor, ms_graph=None):
        return {"step": step, "batch": 1, "context": 1024, "ms": ms, "floor_ms": floor, "ms_graph": ms_graph}

    towers = {"device": "GPU-X", "layers": 52, "commit": "abc", "date": "2026-12-03", "complete": True,
              "copy_bandwidth_bytes_per_s": 4.3e12,
              "steps": [row("ar_token", 5.0, 2.0, ms_graph=2.4), row("denoise16", 3.0, 2.0)],
              "generation": [{"mode": "ar", "batch": 1, "tokens_per_s": 300.0},
                             {"mode": "transformers-ar", "batch": 1, "tokens_per_s": 100.0}]}
    kernels = {"block_attention": [{"context": 8192, "fraction_of_copy_bandwidth": 0.5, "speedup_vs_sdpa": 2.0}],
               "seeded_scan": {"error": "KernelError: boom"}}
    table = {g[0]: g for g in gpu_summary.goals(towers, kernels)}
    assert table["AR token, batch 1, ctx 1k"][3] is True and "(graph)" in table["AR token, batch 1, ctx 1k"][2]
    assert table["denoiser step, batch 1, ctx 1k"][3] is False and "1.50x" in table["denoiser step, batch 1, ctx 1k"][2]
    assert table["AR mode vs transformers greedy, batch 1"][3] is True
    assert table["block attention, ctx 8192"][3] is False
    assert table["seeded scan"][2] == "KernelError: boom" and table["seeded scan"][3] is None
    (tmp_path / "towers.json").write_text(json.dumps(towers))
    plotted = gpu_summary.main([str(tmp_path), "--plot", str(tmp_path / "p.png")])
    out, err = capsys.readouterr()
    assert "GPU-X" in out
    try:
        import matplotlib  # noqa: F401 - the bench extra
    except ImportError:  # CI installs no plotting library: one clear error, no half-written file
        assert plotted == 2 and "--plot needs matplotlib" in err and not (tmp_path / "p.png").exists()
    else:
        assert plotted == 0 and (tmp_path / "p.png").stat().st_size > 10_000
    assert gpu_summary.main([str(tmp_path / "missing")]) == 2


def test_prefix_cache_bench_smoke(tmp_path):
    """A short run of bench/prefix_cache.py: its counts follow from the prompts, its outputs match."""
    out = tmp_path / "prefix.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "prefix_cache.py"), "--prefix", "300", "--suffix", "8",
                    "--requests", "3", "--new-tokens", "2", "--modes", "ar", "--out", str(out)],
                   check=True, capture_output=True, text=True, cwd=ROOT)
    result = json.loads(out.read_text())
    assert {"device", "date", "commit", "phases"} <= set(result)
    for phase in result["phases"].values():
        assert phase["outputs_identical"]
        assert phase["cache_off"]["prefill_tokens"] == 3 * 308
        assert phase["cache_on"]["prefill_tokens"] == 308 + 2 * (308 - 256)  # one 256-token page hit twice
