"""Denoiser step on the torch backend: structural identities (no external reference exists)."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import load_towers
from trtllm_twotower.network import towers
from trtllm_twotower.network.ops import TorchOps


def _context(cfg, ctx, ops, length, seed, dtype=torch.float32, capacity=48):
    ids = torch.randint(4, cfg.vocab_size, (1, length), generator=torch.Generator().manual_seed(seed))
    _, state = towers.context_forward(ops, cfg, ctx, towers.empty_state(cfg, 1, capacity, dtype, "cpu"), ids)
    return ids, state


def _inert_copy_of_context(cfg, ctx, den):
    """Denoiser weights = context tower, lm_head = context_lm_head, shift 0 / scale 0 / gate 1."""
    w = copy.deepcopy(ctx)
    for name in ("t_embed_in", "t_embed_in_bias", "t_embed_out", "t_embed_out_bias"):
        w[name] = den[name]
    w["t_block"] = torch.zeros_like(den["t_block"])
    w["t_block_bias"] = torch.zeros_like(den["t_block_bias"])
    table = torch.zeros_like(den["scale_shift"])
    table[:, 2] = 1.0  # rows: shift, scale, gate
    w["scale_shift"] = table
    return w


def test_mock_ar_identity(all_kinds_dir):
    """The denoiser made a copy of the context tower with inert time conditioning, fed the last
    committed token at its position over the state before it, reproduces the context tower's
    next-token logits (checks conv/SSM seeding, the K/V concatenation, MoE, heads)."""
    cfg, ctx, den = load_towers(all_kinds_dir)
    ops = TorchOps(torch.float32)
    ids, _ = _context(cfg, ctx, ops, 19, seed=4)
    _, before = towers.context_forward(ops, cfg, ctx, towers.empty_state(cfg, 1, 48, torch.float32, "cpu"), ids[:, :-1])
    expected, _ = towers.context_forward(ops, cfg, ctx, before, ids[:, -1:])
    inert = _inert_copy_of_context(cfg, ctx, den)
    for t in (torch.tensor([1.0]), torch.tensor([0.25]), None):
        got = towers.denoise(ops, cfg, inert, before, ids[:, -1:], t)
        assert (got - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()
    # and the real denoiser weights give something else (the test can fail)
    other = towers.denoise(ops, cfg, den, before, ids[:, -1:], torch.tensor([1.0]))
    assert (other - expected).abs().max().item() > 1e-2


def test_bidirectional_inside_block_and_context_state_untouched(all_kinds_dir):
    cfg, ctx, den = load_towers(all_kinds_dir)
    ops = TorchOps(torch.float32)
    _, state = _context(cfg, ctx, ops, 15, seed=2)
    snapshot = copy.deepcopy(state)
    block = torch.full((1, 8), cfg.mask_token_id)
    block[0, 2] = 40
    base = towers.denoise(ops, cfg, den, state, block, torch.tensor([7 / 8]))
    changed = block.clone()
    changed[0, 6] = 77  # a LATER position
    other = towers.denoise(ops, cfg, den, state, changed, torch.tensor([7 / 8]))
    # earlier positions (0..5) see the change at 6: in-block attention is bidirectional
    assert (other[0, :6] - base[0, :6]).abs().max().item() > 1e-4
    # the context state is bit-identical after two denoiser steps
    assert torch.equal(state.lengths, snapshot.lengths)
    for i in state.keys:
        assert torch.equal(state.keys[i], snapshot.keys[i]) and torch.equal(state.values[i], snapshot.values[i])
    for i in state.conv:
        assert torch.equal(state.conv[i], snapshot.conv[i]) and torch.equal(state.ssm[i], snapshot.ssm[i])


def test_time_conditioning_changes_logits(all_kinds_dir):
    cfg, ctx, den = load_towers(all_kinds_dir)
    ops = TorchOps(torch.float32)
    _, state = _context(cfg, ctx, ops, 9, seed=6)
    block = torch.full((1, 4), cfg.mask_token_id)
    a = towers.denoise(ops, cfg, den, state, block, torch.tensor([1.0]))
    b = towers.denoise(ops, cfg, den, state, block, torch.tensor([0.5]))
    assert (a - b).abs().max().item() > 1e-3


def test_timestep_rounding_bf16_matches_spec():
    """bf16(bf16(t) * 1000) for t = k/16 (spec §5.1 table), and exactly 1000 t in float32."""
    expected = [62.5, 125, 188, 250, 312, 376, 438, 500, 564, 624, 688, 752, 812, 876, 936, 1000]
    t = torch.arange(1, 17, dtype=torch.float32) / 16
    assert (t.to(torch.bfloat16) * 1000).float().tolist() == expected
    ops = TorchOps(torch.bfloat16)
    emb = ops.timestep_embedding(t, 256)
    ts = torch.tensor(expected)
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(128) / 128)
    ref = torch.cat([torch.cos(ts[:, None] * freqs), torch.sin(ts[:, None] * freqs)], -1).to(torch.bfloat16)
    assert torch.equal(emb, ref)
    emb32 = TorchOps(torch.float32).timestep_embedding(t, 256)
    ref32 = torch.cat([torch.cos(1000 * t[:, None] * freqs), torch.sin(1000 * t[:, None] * freqs)], -1)
    assert torch.allclose(emb32, ref32, atol=1e-6)


def test_batched_denoise_per_row_t_equals_single_rows(all_kinds_dir):
    cfg, ctx, den = load_towers(all_kinds_dir)
    ops = TorchOps(torch.float32)
    rows = [_context(cfg, ctx, ops, n, seed=n, capacity=32)[1] for n in (6, 13)]
    blocks = torch.full((2, 4), cfg.mask_token_id)
    blocks[1, 1] = 50
    t = torch.tensor([1.0, 0.75])
    batched = towers.denoise(ops, cfg, den, towers.concat_states(rows, 32), blocks, t)
    for b in range(2):
        single = towers.denoise(ops, cfg, den, rows[b], blocks[b : b + 1], t[b : b + 1])
        assert torch.allclose(batched[b : b + 1], single, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("magnitude", [1e3, 3e4])
def test_bf16_no_nan_with_large_seeded_states(demo_dir, magnitude):
    """Seeded SSM states of large magnitude (long contexts reach O(1e3)) stay finite in a bf16 run:
    the scan and state are fp32 (spec §9.1)."""
    cfg, ctx, den = load_towers(demo_dir, torch.bfloat16)
    ops = TorchOps(torch.bfloat16)
    _, state = _context(cfg, ctx, ops, 10, seed=1, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    big = {i: magnitude * torch.randn(s.shape, generator=gen) for i, s in state.ssm.items()}
    state = towers.TowerState(state.lengths, state.keys, state.values, state.conv, big)
    block = torch.full((1, 16), cfg.mask_token_id)
    logits = towers.denoise(ops, cfg, den, state, block, torch.tensor([1.0]))
    assert torch.isfinite(logits).all()
    ctx_logits, _ = towers.context_forward(ops, cfg, ctx, state, block[:, :4])
    assert torch.isfinite(ctx_logits).all()
