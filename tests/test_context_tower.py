"""Context tower on the torch backend: against transformers NemotronH, and its own cache identities."""

from __future__ import annotations

import pytest
import torch

from conftest import load_towers
from trtllm_twotower.hf_reference import transformers_context_model
from trtllm_twotower.network import towers
from trtllm_twotower.network.ops import TorchOps


def _prompt(cfg, length, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(4, cfg.vocab_size, (1, length), generator=gen)


@pytest.mark.parametrize("length", [29, 150])
def test_matches_transformers_nemotron_h_fp32(all_kinds_dir, length):
    """Full-prompt logits equal transformers' NemotronHForCausalLM (prompts longer than the chunk
    size 8; 150 tokens also takes our chunked scan; pattern with M, *, E and -).
    Tolerance: 1e-4 of the logit scale."""
    cfg, ctx, _ = load_towers(all_kinds_dir)
    assert set("M*E-") <= set(cfg.layer_pattern) and cfg.chunk_size < length
    model = transformers_context_model(all_kinds_dir, ctx)
    ids = _prompt(cfg, length, seed=11)
    with torch.no_grad():
        expected = model(ids).logits.float()
    ops = TorchOps(torch.float32)
    logits, state = towers.context_forward(ops, cfg, ctx, towers.empty_state(cfg, 1, 160, torch.float32, "cpu"), ids)
    scale = expected.abs().max().item()
    assert logits.shape == expected.shape
    assert (logits - expected).abs().max().item() <= 1e-4 * scale
    assert int(state.lengths[0]) == length


def test_transformers_greedy_generate_matches_cached_decode(all_kinds_dir):
    """transformers' cached greedy generate == our prefill + one-token extends."""
    cfg, ctx, _ = load_towers(all_kinds_dir)
    model = transformers_context_model(all_kinds_dir, ctx)
    ids = _prompt(cfg, 13, seed=5)
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)[0, 13:].tolist()
    ops = TorchOps(torch.float32)
    logits, state = towers.context_forward(ops, cfg, ctx, towers.empty_state(cfg, 1, 32, torch.float32, "cpu"), ids)
    got = []
    for _ in range(12):
        tok = int(logits[0, -1].argmax())
        got.append(tok)
        logits, state = towers.context_forward(ops, cfg, ctx, state, torch.tensor([[tok]]))
    assert got == expected


def test_step_by_step_decode_equals_full_forward(all_kinds_dir):
    """Token-by-token cached decoding reproduces every position's logits of one full forward."""
    cfg, ctx, _ = load_towers(all_kinds_dir)
    ops = TorchOps(torch.float32)
    ids = _prompt(cfg, 21, seed=3)
    full, _ = towers.context_forward(ops, cfg, ctx, towers.empty_state(cfg, 1, 32, torch.float32, "cpu"), ids)
    state = towers.empty_state(cfg, 1, 32, torch.float32, "cpu")
    steps = []
    for j in range(ids.shape[1]):
        logits, state = towers.context_forward(ops, cfg, ctx, state, ids[:, j : j + 1])
        steps.append(logits)
    stepped = torch.cat(steps, dim=1)
    assert (stepped - full).abs().max().item() <= 1e-4 * full.abs().max().item()


def test_prefill_then_extend_equals_one_prefill(all_kinds_dir):
    """prefill(prompt ‖ block) == prefill(prompt) then extend(block): logits and every state."""
    cfg, ctx, _ = load_towers(all_kinds_dir)
    ops = TorchOps(torch.float32)
    ids = _prompt(cfg, 27, seed=8)
    prompt, block = ids[:, :11], ids[:, 11:]
    one_logits, one = towers.context_forward(ops, cfg, ctx, towers.empty_state(cfg, 1, 40, torch.float32, "cpu"), ids)
    _, mid = towers.context_forward(ops, cfg, ctx, towers.empty_state(cfg, 1, 40, torch.float32, "cpu"), prompt)
    ext_logits, two = towers.context_forward(ops, cfg, ctx, mid, block)
    tol = 1e-4 * one_logits.abs().max().item()
    assert (ext_logits - one_logits[:, 11:]).abs().max().item() <= tol
    assert torch.equal(one.lengths, two.lengths)
    for i in one.keys:
        n = int(one.lengths[0])
        assert torch.allclose(one.keys[i][:, :n], two.keys[i][:, :n], atol=1e-5, rtol=1e-5)
        assert torch.allclose(one.values[i][:, :n], two.values[i][:, :n], atol=1e-5, rtol=1e-5)
    for i in one.conv:
        assert torch.allclose(one.conv[i], two.conv[i], atol=1e-5, rtol=1e-5)
        assert torch.allclose(one.ssm[i], two.ssm[i], atol=1e-4, rtol=1e-4)
        assert one.ssm[i].dtype == torch.float32


def test_batched_rows_with_different_lengths_match_single_rows(all_kinds_dir):
    """Rows prefilled alone then stacked extend together exactly as each row alone."""
    cfg, ctx, _ = load_towers(all_kinds_dir)
    ops = TorchOps(torch.float32)
    prompts = [_prompt(cfg, n, seed=n) for n in (5, 12)]
    block = torch.randint(4, cfg.vocab_size, (2, 4), generator=torch.Generator().manual_seed(0))
    singles, rows = [], []
    for b, p in enumerate(prompts):
        _, s = towers.context_forward(ops, cfg, ctx, towers.empty_state(cfg, 1, 24, torch.float32, "cpu"), p)
        rows.append(s)
        singles.append(towers.context_forward(ops, cfg, ctx, s, block[b : b + 1])[0])
    # fresh prefills: the single-row extends above appended into those rows' buffers
    rows = [towers.context_forward(ops, cfg, ctx, towers.empty_state(cfg, 1, 24, torch.float32, "cpu"), p)[1]
            for p in prompts]
    batched, _ = towers.context_forward(ops, cfg, ctx, towers.concat_states(rows, 24), block)
    for b in range(2):
        assert torch.allclose(batched[b : b + 1], singles[b], atol=1e-5, rtol=1e-5)
