"""The CUDA-graph plumbing of the AR and denoiser steps (``runtime/graphs.py``), without capture.

``graphs="emulate"`` keeps every static buffer, the AR step's in-place Mamba state update, the
copy-in of a state made elsewhere (the denoiser: once per block), the capture on a batch's second
sight and the new graph when the batch changes, but calls the step instead of replaying it; every
mode's tokens must equal the eager executor's exactly, through rows joining and leaving. Capture
itself needs a GPU: ``tests/test_gpu_runtime.py`` compares captured replays with eager steps.
"""

from __future__ import annotations

import pytest
import torch

from conftest import load_towers
from trtllm_twotower.runtime import graphs
from trtllm_twotower.runtime.executor import TorchExecutor
from trtllm_twotower.runtime.sampler import SamplerSettings
from trtllm_twotower.runtime.scheduler import Scheduler


def _generate_staggered(executor, cfg, requests, mode="ar"):
    """Submit each (prompt, max_new_tokens, temperature, seed, delay) after ``delay`` scheduler
    steps; rows finish at different times, so the batch changes while it runs."""
    scheduler = Scheduler(executor, cfg, max_batch=8)
    tickets, step = [], 0
    pending = sorted(requests, key=lambda r: r[-1])
    while pending or any(not t.done.is_set() for t in tickets):
        while pending and pending[0][-1] <= step:
            prompt, new_tokens, temperature, seed, _ = pending.pop(0)
            settings = SamplerSettings(new_tokens, 8, 4, 0.3, temperature, 0, 0.95 if temperature else 1.0,
                                       cfg.mask_token_id, None)
            tickets.append(scheduler.submit(mode, [prompt], settings, [seed]))
        scheduler.step()
        step += 1
    return [t.rows[0].out.tokens for t in tickets]


@pytest.mark.parametrize("mode", ["ar", "diffusion", "speculative", "mock-ar"])
def test_emulated_graph_steps_equal_eager_steps(all_kinds_dir, monkeypatch, mode):
    cfg, ctx, den = load_towers(all_kinds_dir)
    gen = torch.Generator().manual_seed(8)
    requests = [(torch.randint(4, cfg.vocab_size, (n,), generator=gen).tolist(), new, temp, seed, delay)
                for n, new, temp, seed, delay in [(7, 20, 0.0, 1, 0), (3, 9, 0.9, 2, 0), (12, 17, 0.0, 3, 3),
                                                  (5, 26, 1.2, 4, 5), (9, 5, 0.0, 5, 9)]]
    built = []
    original = graphs.StepGraph.__init__

    def counting(self, forward, state, ids, t, device, capture, owns_state):
        built.append(("context" if owns_state else "denoise", state.batch))
        original(self, forward, state, ids, t, device, capture, owns_state)

    monkeypatch.setattr(graphs.StepGraph, "__init__", counting)
    cpu = torch.device("cpu")
    eager = _generate_staggered(TorchExecutor(cfg, ctx, den, torch.float32, cpu, cpu, graphs="off"), cfg, requests,
                                mode)
    assert built == []
    emulated = _generate_staggered(TorchExecutor(cfg, ctx, den, torch.float32, cpu, cpu, graphs="emulate"), cfg,
                                   requests, mode)
    assert emulated == eager
    assert [len(t) for t in eager] == [20, 9, 17, 26, 5]
    kinds = {k for k, _ in built}
    # AR graphs its context step; block modes their denoiser step, and diffusion its extend when
    # the whole batch completes a block at once; speculative verification and mock-AR keep an
    # older state, so their context steps stay eager
    if mode == "ar":
        assert kinds == {"context"}
    elif mode == "diffusion":
        assert "denoise" in kinds and kinds <= {"context", "denoise"}
    else:
        assert kinds == {"denoise"}
    assert len(built) >= 3 and max(b for _, b in built) >= 3  # a new graph as the batch changed


def test_one_diffusion_row_graphs_its_block_extends(all_kinds_dir):
    """A lone diffusion row completes every block alone: its extends are whole-batch steps, so the
    extend over each committed block becomes a graph too, and the tokens stay the eager ones."""
    cfg, ctx, den = load_towers(all_kinds_dir)
    cpu = torch.device("cpu")
    prompt = torch.randint(4, cfg.vocab_size, (6,), generator=torch.Generator().manual_seed(12)).tolist()
    outputs, executors = [], []
    for mode in ("off", "emulate"):
        executor = TorchExecutor(cfg, ctx, den, torch.float32, cpu, cpu, graphs=mode)
        outputs.append(_generate_staggered(executor, cfg, [(prompt, 40, 0.0, 7, 0)], "diffusion"))
        executors.append(executor)
    assert outputs[0] == outputs[1] and len(outputs[0][0]) == 40
    assert set(executors[1]._ctx_graphs._graphs) == {"extend8"} and set(executors[1]._den_graphs._graphs) == {"denoise"}


def test_graph_mode_is_checked(all_kinds_dir, monkeypatch):
    cfg, ctx, den = load_towers(all_kinds_dir)
    cpu = torch.device("cpu")
    monkeypatch.setenv("TWOTOWER_CUDA_GRAPHS", "yes")
    with pytest.raises(ValueError, match="graphs: expected one of off, on, emulate, got 'yes'"):
        TorchExecutor(cfg, ctx, den, torch.float32, cpu, cpu)
    monkeypatch.setenv("TWOTOWER_CUDA_GRAPHS", "on")  # on a CPU device: eager, no graph
    executor = TorchExecutor(cfg, ctx, den, torch.float32, cpu, cpu)
    state, logits = executor.prefill([[5, 6, 7]], 8)
    _, new = executor.extend(state, logits.argmax(-1, keepdim=True), logits=True, in_place=True)
    assert executor._ctx_graphs is None and executor._den_graphs is None and int(new.lengths[0]) == 4


def test_a_state_made_elsewhere_is_copied_in(all_kinds_dir):
    """Graph, then an eager extend on the same K/V buffers (fresh Mamba states), then the graph
    again: the fresh states must be copied into the graph's buffers, not ignored."""
    cfg, ctx, den = load_towers(all_kinds_dir)
    cpu = torch.device("cpu")
    gen = torch.Generator().manual_seed(9)
    prompts = [torch.randint(4, cfg.vocab_size, (n,), generator=gen).tolist() for n in (6, 10)]
    block = torch.randint(4, cfg.vocab_size, (2, 3), generator=gen)
    outputs = []
    for mode in ("off", "emulate"):
        executor = TorchExecutor(cfg, ctx, den, torch.float32, cpu, cpu, graphs=mode)
        state, logits = executor.prefill(prompts, 24)
        tokens = []
        for step in range(6):
            if step == 3:  # an eager multi-token extend in between
                _, state = executor.extend(state, block, logits=False)
            logits, state = executor.extend(state, (logits if step == 0 else logits[:, -1]).argmax(-1)[:, None],
                                            logits=True, in_place=True)
            tokens.append(logits[:, -1].argmax(-1).tolist())
        outputs.append(tokens)
    assert outputs[0] == outputs[1]


def test_denoiser_graph_sees_a_state_changed_in_place(all_kinds_dir):
    """AR steps from a graph update the Mamba states in place; a denoiser graph over that same
    state must copy it in again rather than trust that it copied that tensor before."""
    cfg, ctx, den = load_towers(all_kinds_dir)
    cpu = torch.device("cpu")
    gen = torch.Generator().manual_seed(10)
    prompts = [torch.randint(4, cfg.vocab_size, (n,), generator=gen).tolist() for n in (4, 9)]
    block = torch.full((2, 8), cfg.mask_token_id)
    t = torch.ones(2)
    results = []
    for mode in ("off", "emulate"):
        executor = TorchExecutor(cfg, ctx, den, torch.float32, cpu, cpu, graphs=mode)
        state, logits = executor.prefill(prompts, 24)
        outs = []
        for _ in range(5):  # AR-step graph from the 2nd step on, denoise graph from its 2nd call on
            outs.append(executor.denoise(state, block, t))
            tokens = logits.reshape(2, -1)[:, -cfg.vocab_size:].argmax(-1)[:, None]
            logits, state = executor.extend(state, tokens, logits=True, in_place=True)
        results.append(outs)
    for eager, emulated in zip(*results):
        assert torch.equal(eager, emulated)


def test_a_failed_capture_turns_that_step_eager(all_kinds_dir, caplog):
    """A capture that raises (on a GPU: a step that synchronises) leaves its StepGraph with the
    error; the cache then runs that kind of step eagerly for good and says why, once."""
    cfg, ctx, den = load_towers(all_kinds_dir)
    executor = TorchExecutor(cfg, ctx, den, torch.float32, torch.device("cpu"), torch.device("cpu"), graphs="emulate")
    state, _ = executor.prefill([[5, 6, 7], [8, 9, 10, 11]], 16)
    block, t = torch.full((2, 8), cfg.mask_token_id), torch.ones(2)
    cache = executor._den_graphs
    first = executor.denoise(state, block, t)  # first sight: eager
    assert cache._graphs == {} and torch.equal(executor.denoise(state, block, t), first)  # second: a graph
    cache._graphs["denoise"].capture_error = RuntimeError("operation not permitted when stream is capturing")
    with caplog.at_level("WARNING", logger="trtllm_twotower.runtime.graphs"):
        assert torch.equal(executor.denoise(state, block, t), first)
        assert torch.equal(executor.denoise(state, block, t), first)
    assert cache._graphs == {} and "denoise" in cache.failed
    assert [r.getMessage() for r in caplog.records].count(
        "CUDA graph capture of the denoise step failed (operation not permitted when stream is capturing): "
        "it runs eagerly from now on") == 1


def test_another_batch_drops_the_old_graph_at_once(all_kinds_dir):
    """When the batch changes, the old graph (its memory pool, the old K/V buffers it holds) goes
    at the first step of the new batch; the new batch gets its graph at its second step."""
    cfg, ctx, den = load_towers(all_kinds_dir)
    executor = TorchExecutor(cfg, ctx, den, torch.float32, torch.device("cpu"), torch.device("cpu"), graphs="emulate")
    state, _ = executor.prefill([[5, 6, 7], [8, 9, 10, 11]], 16)
    block, t = torch.full((2, 8), cfg.mask_token_id), torch.ones(2)
    graphs_of = executor._den_graphs._graphs
    for _ in range(2):
        executor.denoise(state, block, t)
    old = graphs_of["denoise"]
    assert old.serves(state, block, t)
    alone = executor.select(state, [1])
    executor.denoise(alone, block[1:], t[1:])
    assert graphs_of == {}
    executor.denoise(alone, block[1:], t[1:])
    assert graphs_of["denoise"] is not old and graphs_of["denoise"].serves(alone, block[1:], t[1:])
