"""No host synchronisation inside a step (issue 10: a step is queued, not waited for).

Counted on the CPU with ``sync_lint.HostReads`` (every call that would read a CUDA tensor back);
``tests/test_gpu_runtime.py`` checks the same steps under CUDA's own sync debug mode. The towers'
forwards read nothing; a denoiser step of a block lane reads exactly one thing (which blocks are
complete), whatever mix of greedy and sampled rows it runs; an AR step reads its tokens (to stream
them). Attention is left out of the count: it takes the state's lengths, which live on the host
(the CUDA kernel reads them there; the torch reference builds its mask from them), and so does
the executor's capacity check.
"""

from __future__ import annotations

import pytest
import torch

from conftest import load_towers
from sync_lint import HostReads
from trtllm_twotower.network import towers
from trtllm_twotower.network.ops import TorchOps
from trtllm_twotower.runtime import executor as executor_module
from trtllm_twotower.runtime import lanes
from trtllm_twotower.runtime.executor import TorchExecutor
from trtllm_twotower.runtime.sampler import SamplerSettings


@pytest.fixture
def reads(monkeypatch):
    """A HostReads that leaves out the two readers of the host-side lengths: attention and the
    executor's capacity check."""
    lint = HostReads()

    def on_host_lengths(function):
        def run(*args, **kwargs):
            with lint.paused():
                return function(*args, **kwargs)
        return run

    monkeypatch.setattr(TorchOps, "block_attention", on_host_lengths(TorchOps.block_attention))
    monkeypatch.setattr(executor_module, "check_capacity", on_host_lengths(executor_module.check_capacity))
    return lint


def test_tower_forwards_read_nothing_back(all_kinds_dir, reads):
    cfg, ctx, den = load_towers(all_kinds_dir)
    ops = TorchOps(torch.float32, "cpu")
    gen = torch.Generator().manual_seed(3)
    state = towers.empty_state(cfg, 3, 64, torch.float32, "cpu")
    _, state = towers.context_forward(ops, cfg, ctx, state, torch.randint(4, cfg.vocab_size, (3, 11), generator=gen))
    token = torch.randint(4, cfg.vocab_size, (3, 1), generator=gen)
    block = torch.randint(4, cfg.vocab_size, (3, 16), generator=gen)
    masks = torch.full((3, 16), cfg.mask_token_id)
    steps = {
        "ar_token": lambda: towers.context_forward(ops, cfg, ctx, state, token),
        "extend16": lambda: towers.context_forward(ops, cfg, ctx, state, block, logits=False),
        "extend16_traced": lambda: towers.context_forward(ops, cfg, ctx, state, block, logits=True, trace=True),
        "denoise16": lambda: towers.denoise(ops, cfg, den, state, masks, torch.rand(3, generator=gen)),
        "mock_ar_head": lambda: towers.denoise(ops, cfg, den, state, token, None),
    }
    for name, run in steps.items():
        with torch.inference_mode(), reads:
            run()
        assert reads.total == 0, (name, dict(reads.calls))


def _rows(mode, cfg, temperatures, steps_per_block, threshold, gen):
    rows = []
    for i, temperature in enumerate(temperatures):
        settings = SamplerSettings(40, 8, steps_per_block, threshold, temperature, 0, 0.9 if temperature else 1.0,
                                   cfg.mask_token_id, None)
        prompt = torch.randint(4, cfg.vocab_size, (5 + 3 * i,), generator=gen).tolist()
        rows.append(lanes.Row(mode, prompt, settings, seed=i, emit=lambda row, tokens: None, fail=None))
    return rows


@pytest.mark.parametrize("mode", ["diffusion", "speculative"])
def test_a_denoiser_step_reads_one_thing(all_kinds_dir, reads, mode):
    """Threshold 1.0 never fires, so 4-step blocks complete exactly at their last step: steps 0-2
    of each block complete nothing and must read exactly once (the completion flags)."""
    cfg, ctx, den = load_towers(all_kinds_dir)
    executor = TorchExecutor(cfg, ctx, den, torch.float32, torch.device("cpu"), torch.device("cpu"))
    rows = _rows(mode, cfg, [0.0, 0.8, 0.0, 1.3], steps_per_block=4, threshold=1.0, gen=torch.Generator().manual_seed(4))
    lane = lanes.LANES[mode](executor, lanes.lane_key(mode, rows[0].settings))
    lane.admit(rows)
    for step in range(8):  # two blocks
        with reads:
            lane.advance()
        if step % 4 < 3:
            assert reads.total == 1 and sum(v for k, v in reads.calls.items() if k.endswith("tolist")) == 1, \
                (step, dict(reads.calls))
        reads.calls.clear()
    assert all(len(r.out.tokens) > 0 for r in rows)


def test_an_ar_step_reads_its_tokens_only(all_kinds_dir, reads):
    cfg, ctx, den = load_towers(all_kinds_dir)
    executor = TorchExecutor(cfg, ctx, den, torch.float32, torch.device("cpu"), torch.device("cpu"))
    rows = _rows("ar", cfg, [0.0, 0.7, 0.0], steps_per_block=1, threshold=0.5, gen=torch.Generator().manual_seed(5))
    lane = lanes.TokenLane(executor, ("ar",))
    lane.admit(rows)
    for _ in range(4):
        with reads:
            lane.advance()
        assert dict(reads.calls) == {"torch.Tensor.tolist": 1}
        reads.calls.clear()


@pytest.mark.parametrize("mode", ["diffusion", "speculative"])
def test_a_listened_step_reads_its_commits_back(all_kinds_dir, reads, mode):
    """``on_step`` costs reads only when a row listens: four more per denoiser step (the commits,
    tokens, confidences and block steps of the listening rows), whatever the rest of the batch."""
    cfg, ctx, den = load_towers(all_kinds_dir)
    executor = TorchExecutor(cfg, ctx, den, torch.float32, torch.device("cpu"), torch.device("cpu"))
    rows = _rows(mode, cfg, [0.0, 0.8, 0.0], steps_per_block=4, threshold=1.0, gen=torch.Generator().manual_seed(6))
    events = []
    rows[1].on_step = events.append
    lane = lanes.LANES[mode](executor, lanes.lane_key(mode, rows[0].settings))
    lane.admit(rows)
    for step in range(3):  # steps that complete no block
        with reads:
            lane.advance()
        assert reads.total == 1 + 4, (step, dict(reads.calls))
        reads.calls.clear()
    assert [e.step for e in events] == [0, 1, 2] and all(e.row == rows[1].index for e in events)
