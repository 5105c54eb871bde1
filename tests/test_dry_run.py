"""The GPU path of the real model, executed on fake CUDA tensors (``bench/dry_run.py``): every step
runs through the executor and sampler with the Triton kernels' custom ops, reads nothing back inside
a step, and stays within the launch budget (a count, not a timing)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import dry_run  # noqa: E402
from trtllm_twotower.config import load_config  # noqa: E402
from trtllm_twotower.network.ops import TorchOps  # noqa: E402

REAL = load_config(ROOT / "bench" / "real_config.json")


@pytest.fixture(scope="module")
def real_model_run():
    return dry_run.dry_run(REAL, batches=(1,), contexts=(1024,), prefills=(1024,), log=lambda _: None)


def test_real_model_steps_stay_within_the_launch_budget(real_model_run):
    steps = {s["kind"]: s for s in real_model_run["steps"]}
    assert set(steps) == {"prefill", "ar_step", "extend", "denoiser_step", "speculative_verify"}
    for kind in ("ar_step", "extend", "denoiser_step"):
        step = steps[kind]
        assert step["error"] is None and step["host_reads"] == 0, step
        assert step["launches_per_layer"] <= dry_run.LAUNCH_BUDGET_PER_LAYER, (kind, step["launches_per_layer"])
        # the kernels ran as custom ops (the torch forms would be ~50 launches a layer)
        assert step["by_op"]["twotower.moe_experts"] == 4 * len(REAL.layers_of("E"))
        assert step["by_op"]["twotower.seeded_mamba_scan"] == len(REAL.layers_of("M"))
    assert steps["denoiser_step"]["by_op"]["twotower.gated_residual"] == REAL.num_layers
    assert steps["speculative_verify"]["error"] is None
    # the acceptance rule reads its verdict once, at the block boundary
    assert real_model_run["speculative_block_boundary_reads"] == ["_local_scalar_dense"]
    assert real_model_run["weight_bytes"]["context"] > 60e9  # the full 30B-A3B tower, in bf16


def test_launches_per_layer_by_kind(real_model_run):
    by_kind = real_model_run["launches_per_layer_by_kind"]
    assert set(by_kind) == {"M", "*", "E"}
    for kind, steps in by_kind.items():
        for step, launches in steps.items():
            assert 0 < launches <= dry_run.LAUNCH_BUDGET_PER_LAYER, (kind, step, launches)


def test_a_host_read_inside_a_step_fails_it(monkeypatch):
    """A step that reads a device value back is caught and named, not counted as a launch."""
    original = TorchOps.add

    def add_and_read(self, a, b):
        int(a.sum())  # a synchronising read on CUDA
        return original(self, a, b)

    monkeypatch.setattr(TorchOps, "add", add_and_read)
    small = load_config(ROOT / "trtllm_twotower" / "demo_model" / "config.json")
    out = dry_run.dry_run(small, batches=(1,), contexts=(64,), prefills=(), log=lambda _: None)
    failed = {s["kind"]: s["error"] for s in out["steps"] if s["error"]}
    assert failed.keys() >= {"ar_step", "extend"}  # the context tower's residual adds
    assert all("_local_scalar_dense" in e for e in failed.values())
    assert "denoiser_step" not in failed  # the denoiser's residual is gated_residual


@pytest.mark.parametrize("index", [
    (slice(None), -1), (1,), (slice(1, 3), None, Ellipsis), (Ellipsis, 2), (slice(None, None, 2), slice(1, None)),
    (torch.tensor([2, 0]),), (slice(None), torch.tensor([1, 1, 0])), (torch.tensor([0, 2]), torch.tensor([1, 3])),
])
def test_aten_indexing_equals_torch_indexing(index):
    """The dry run's indexing shim gives what torch's own indexing gives (on real tensors)."""
    t = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(0))
    want = t[index]
    with dry_run.AtenIndexing():
        got = t[index]
        written = t.clone()
        written[index] = -1.0
    assert torch.equal(got, want)
    expected = t.clone()
    expected[index] = -1.0
    assert torch.equal(written, expected)
