"""The torch path on CUDA (kernels when built, else the references): same greedy tokens as CPU fp32."""

from __future__ import annotations

import pytest
import torch

from trtllm_twotower.runtime import TwoTowerRuntime

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("mode", ["diffusion", "mock-ar", "ar"])
def test_cuda_float32_tokens_equal_cpu_float32(demo_dir, mode):
    kw = dict(max_new_tokens=32, mode=mode, block_size=16, confidence_threshold=0.03, eos_token_id=None)
    prompts = ["gpu parity", "a second, longer prompt for the batch"]
    cpu = TwoTowerRuntime.from_checkpoint(demo_dir, dtype="float32", context_device="cpu", denoiser_device="cpu")
    gpu = TwoTowerRuntime.from_checkpoint(demo_dir, dtype="float32", context_device="cuda:0", denoiser_device="cuda:0")
    assert gpu.generate(prompts, **kw).output_ids == cpu.generate(prompts, **kw).output_ids


def test_cuda_bfloat16_runs_and_cross_device_mirror(demo_dir):
    rt = TwoTowerRuntime.from_checkpoint(demo_dir, dtype="bfloat16", context_device="cuda:0", denoiser_device="cuda:0")
    res = rt.generate(["bf16 on gpu"], max_new_tokens=32, eos_token_id=None)
    assert len(res.output_ids[0]) == 32
    # context on CPU, denoiser on the GPU: the state mirror crosses devices, tokens unchanged (fp32)
    split = TwoTowerRuntime.from_checkpoint(demo_dir, dtype="float32", context_device="cpu", denoiser_device="cuda:0")
    same = TwoTowerRuntime.from_checkpoint(demo_dir, dtype="float32", context_device="cpu", denoiser_device="cpu")
    kw = dict(max_new_tokens=32, confidence_threshold=0.03, eos_token_id=None)
    assert split.generate(["mirror"], **kw).output_ids == same.generate(["mirror"], **kw).output_ids


def _count_syncs(run) -> int:
    """Synchronising CUDA calls made by ``run()``, from CUDA's sync debug mode."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@pytest.mark.parametrize("kernels", ["on", "off"])
@pytest.mark.parametrize("mode", ["diffusion", "speculative", "ar"])
def test_a_step_synchronises_once_on_cuda(demo_dir, monkeypatch, mode, kernels):
    """The CUDA twin of ``test_host_reads``: a denoiser step that completes no block, and an AR
    step, each make exactly one synchronising call (the completion flags; the AR tokens), with
    the Triton kernels and with the torch references."""
    from test_host_reads import _rows
    from trtllm_twotower.runtime import lanes

    monkeypatch.setenv("TWOTOWER_KERNELS", kernels)
    if kernels == "on":
        pytest.importorskip("triton", reason="the kernels are Triton's: pip install triton")
    rt = TwoTowerRuntime.from_checkpoint(demo_dir, dtype="bfloat16", context_device="cuda:0", denoiser_device="cuda:0")
    cfg = rt.executor.cfg
    rows = _rows(mode, cfg, [0.0, 0.8, 0.0, 1.3], steps_per_block=4, threshold=1.0, gen=torch.Generator().manual_seed(4))
    lane = lanes.LANES[mode](rt.executor, lanes.lane_key(mode, rows[0].settings))
    lane.admit(rows)
    lane.advance()  # warm-up: allocations, pinned host blocks, kernel loading
    if mode == "ar":
        assert _count_syncs(lane.advance) == 1
    else:
        lane.advance()  # now at step 2 of 4 in every row: the next step completes nothing
        assert _count_syncs(lane.advance) == 1


@pytest.mark.parametrize("kernels", ["on", "off"])
def test_cuda_graph_steps_match_eager(all_kinds_dir, monkeypatch, kernels):
    """AR and denoiser steps replayed from captured CUDA graphs (bf16: the grouped-GEMM MoE; fp32
    takes the spec's per-expert loop, which reads the routed ids back) give the eager steps' logits
    on the same inputs, also after the batch changed (a row left: a new capture); a replayed AR step
    synchronises once (its tokens). Not bit for bit: under capture attention masks the whole
    capacity (the lengths stay on the device), eager cuts it at the longest row."""
    from conftest import load_towers
    from test_host_reads import _rows
    from trtllm_twotower.runtime import lanes
    from trtllm_twotower.runtime.executor import TorchExecutor

    monkeypatch.setenv("TWOTOWER_KERNELS", kernels)
    if kernels == "on":
        pytest.importorskip("triton", reason="the kernels are Triton's: pip install triton")
    cuda = torch.device("cuda:0")
    cfg, ctx, den = load_towers(all_kinds_dir, torch.bfloat16, cuda)
    gen = torch.Generator().manual_seed(8)
    prompts = [torch.randint(4, cfg.vocab_size, (n,), generator=gen).tolist() for n in (7, 3, 12)]
    forced = torch.randint(4, cfg.vocab_size, (3, 10), generator=gen).to(cuda)
    blocks = torch.randint(4, cfg.vocab_size, (4, 3, 8), generator=gen).to(cuda)
    blocks[blocks % 3 == 0] = cfg.mask_token_id
    runs = {}
    for graphs in ("off", "on"):
        executor = TorchExecutor(cfg, ctx, den, torch.bfloat16, cuda, cuda, graphs=graphs)
        state, _ = executor.prefill(prompts, 40)
        steps, rows = [], forced
        for j in range(10):
            if j == 5:  # the middle row leaves
                state, rows = executor.select(state, [0, 2]), forced[[0, 2]]
            if j in (2, 7):  # denoiser steps over the current context (captured on the second sight)
                for block in blocks[:, : state.batch]:
                    t = (block == cfg.mask_token_id).float().mean(-1)
                    steps.append(executor.denoise(state, block, t).float())
            logits, state = executor.extend(state, rows[:, j : j + 1], logits=True, in_place=True)
            steps.append(logits[:, -1].float())
        runs[graphs] = steps
        if graphs == "on":
            assert executor._ctx_graphs._graphs["extend1_logits"].graph is not None
            assert executor._ctx_graphs._graphs["extend1_logits"].ids.shape[0] == 2
            assert executor._den_graphs._graphs["denoise"].graph is not None
    assert len(runs["off"]) == len(runs["on"]) == 18
    for eager, replayed in zip(runs["off"], runs["on"]):
        assert (replayed - eager).norm() / eager.norm() < 2e-2
    rows = _rows("ar", cfg, [0.0, 0.7], steps_per_block=1, threshold=0.5, gen=torch.Generator().manual_seed(5))
    lane = lanes.TokenLane(TorchExecutor(cfg, ctx, den, torch.bfloat16, cuda, cuda, graphs="on"), ("ar",))
    lane.admit(rows)
    lane.advance()  # a new batch: eager
    lane.advance()  # its second sight: captured
    assert _count_syncs(lane.advance) == 1  # a replay


@pytest.mark.parametrize("kind", ["ar_step", "denoiser_step"])
def test_profiled_launches_match_the_dry_run(kind):
    """The dry run's launch count (fake CUDA tensors) against the kernels the profiler sees on the
    GPU for the same step of the same config (the demo model's shape, random weights)."""
    import sys
    from pathlib import Path

    from torch.profiler import ProfilerActivity, profile

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench import dry_run
    from bench.bench_towers import random_weights
    from trtllm_twotower.config import load_config
    from trtllm_twotower.demo import TRAINED_DEMO_DIR

    cfg = load_config(TRAINED_DEMO_DIR / "config.json")
    expected = next(s["launches"] for s in dry_run.dry_run(cfg, batches=(1,), contexts=(64,), prefills=(),
                                                           log=lambda _: None)["steps"] if s["kind"] == kind)
    from trtllm_twotower.runtime.executor import TorchExecutor

    device = torch.device("cuda:0")
    executor = TorchExecutor(cfg, random_weights(cfg, "context", torch.bfloat16, device, 0),
                             random_weights(cfg, "denoiser", torch.bfloat16, device, 1), torch.bfloat16, device, device,
                             graphs="off")
    runner = dry_run.Runner(cfg, torch.bfloat16, executor)  # the dry run's steps, on real CUDA tensors
    setup, step, _ = runner.steps(1, 64)[kind]
    step(setup())  # compile the kernels first
    torch.cuda.synchronize()
    inputs = setup()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step(inputs)
        torch.cuda.synchronize()
    launched = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    print(f"{kind}: dry run {expected} launches, profiler {launched} device events")
    assert abs(launched - expected) <= 0.15 * expected, (launched, expected)
