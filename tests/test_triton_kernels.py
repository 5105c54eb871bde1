"""Every Triton kernel against its torch reference, on the CPU under Triton's interpreter (the same
source that runs on a GPU; ``conftest.py`` sets ``TRITON_INTERPRET=1`` where there is no CUDA).

Shapes are small and odd (lengths that are not tile multiples, batch > 1 with different lengths,
GQA, empty experts), inputs fresh random. Tolerances: float32 storage to fp32 rounding (the kernels
accumulate in another order); bfloat16 storage to one bf16 rounding step of the output scale
(an element may round the other way when the fp32 sums differ in their last bits).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

from trtllm_twotower.plugins import attention, mamba, moe, norms, reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16]


def close(got, want, dtype, fp32_tol=2e-5):
    """fp32: relative 2e-5 of the output's scale; bf16: two bf16 ulps of the output's scale."""
    scale = want.float().abs().max().clamp_min(1e-6)
    tol = fp32_tol if dtype == torch.float32 else 2 * 2.0 ** -8
    err = (got.float() - want.float()).abs().max() / scale
    assert err <= tol, f"max error {err:.3g} of scale > {tol:.3g}"


def rand(*shape, gen, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(DEVICE)


# ---- norms ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_and_its_modulated_forms(dtype):
    gen = torch.Generator().manual_seed(11)
    B, L, D = 3, 5, 40
    x, w = rand(B, L, D, gen=gen, dtype=dtype), rand(D, gen=gen, dtype=dtype)
    table, m = rand(3, D, gen=gen, dtype=dtype, scale=0.3), rand(B, 3 * D, gen=gen, dtype=dtype, scale=0.3)
    close(norms.rms_norm(x, w, 1e-5), reference.rms_norm_ref(x, w, 1e-5), dtype)
    for first in (True, False):
        close(norms.rms_norm(x, w, 1e-5, table, m, first),
              reference.modulated_rms_norm_ref(x, w, 1e-5, table, m, first), dtype)
    h = rand(B, L, D, gen=gen, dtype=dtype)
    close(norms.gated_residual(x, h, table, m), reference.gated_residual_ref(x, h, table, m), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gated_rms_norm_on_a_column_slice(dtype):
    gen = torch.Generator().manual_seed(12)
    B, L, D, G = 2, 3, 48, 4
    proj = rand(B, L, D + 20, gen=gen, dtype=dtype)
    z = proj[..., 7:7 + D]  # a strided slice, as the Mamba mixer's gate is
    y, w = rand(B, L, D, gen=gen, dtype=dtype), rand(D, gen=gen, dtype=dtype)
    close(norms.gated_rms_norm(y, z, w, G, 1e-5), reference.gated_rms_norm_ref(y, z, w, G, 1e-5), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu2(dtype):
    x = rand(3, 1500, gen=torch.Generator().manual_seed(10), dtype=dtype)  # two programs, the second partial
    assert torch.equal(moe.relu2(x), reference.relu2_ref(x))


# ---- MoE -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("top_k,experts", [(2, 8), (6, 20)])
def test_moe_route(top_k, experts):
    gen = torch.Generator().manual_seed(13)
    x, router = rand(7, 24, gen=gen, dtype=torch.bfloat16), rand(experts, 24, gen=gen, dtype=torch.bfloat16)
    bias = rand(experts, gen=gen, scale=0.1)
    ids, weights = moe.moe_route(x, router, bias, top_k, True, 2.5)
    want_ids, want_weights = reference.moe_route_ref(x, router, bias, top_k, True, 2.5)
    assert torch.equal(ids.cpu(), want_ids.cpu())
    torch.testing.assert_close(weights, want_weights, rtol=1e-6, atol=0)


def test_moe_route_ties_keep_the_lower_expert():
    router = torch.zeros(6, 8, device=DEVICE)
    router[[1, 4]] = 1.0  # experts 1 and 4 score the same; 1 must come first
    ids, _ = moe.moe_route(torch.ones(2, 8, device=DEVICE), router, torch.zeros(6, device=DEVICE), 2, True, 1.0)
    assert ids.tolist() == [[1, 4], [1, 4]]


@pytest.mark.parametrize("dtype", DTYPES)
def test_moe_experts_with_empty_experts_and_the_shared_add(dtype):
    gen = torch.Generator().manual_seed(14)
    n, D, I, E, k = 37, 24, 40, 12, 3
    x = rand(n, D, gen=gen, dtype=dtype)
    up, down = rand(E, I, D, gen=gen, dtype=dtype, scale=0.3), rand(E, D, I, gen=gen, dtype=dtype, scale=0.3)
    # experts 0..5 only (6..11 empty), distinct per token, in a random slot order
    ids = torch.stack([torch.randperm(6, generator=gen)[:k] for _ in range(n)]).to(DEVICE)
    weights = torch.rand(n, k, generator=gen).to(DEVICE)
    shared = rand(n, D, gen=gen, dtype=dtype)
    got = moe.moe_experts(x, ids, weights, up, down, shared)
    want = reference.moe_experts_ref(x, ids, weights, up, down) + shared
    close(got, want, dtype, fp32_tol=1e-5)
    close(moe.moe_experts(x, ids, weights, up, down), reference.moe_experts_ref(x, ids, weights, up, down), dtype,
          fp32_tol=1e-5)


def test_moe_alignment_kernel_equals_its_torch_form():
    """The one-program sort and the torch sort of long prefills lay the pairs out identically."""
    gen = torch.Generator().manual_seed(15)
    E, T = 10, 53
    ids = torch.randint(0, E - 3, (T,), generator=gen).to(DEVICE)  # three experts empty
    NB, rows = moe.align_capacity(T, E)
    sorted_pairs = torch.empty(rows, dtype=torch.int32, device=DEVICE)
    block_expert = torch.empty(NB, dtype=torch.int32, device=DEVICE)
    starts = torch.empty((2, E), dtype=torch.int32, device=DEVICE)
    moe._align_kernel[(1,)](ids, sorted_pairs, block_expert, starts, T, E, NB, BLOCK_T=64, BLOCK_E=16,
                            BLOCK_M=moe.BLOCK_M)
    want_pairs, want_blocks = moe._align_torch(ids, E, NB, moe.BLOCK_M)
    assert torch.equal(sorted_pairs.cpu(), want_pairs.cpu())
    assert torch.equal(block_expert.cpu(), want_blocks.cpu())
    # each expert's block holds exactly its pairs, ascending
    for e in range(E):
        rows_of_e = [int(p) for blk in (block_expert == e).nonzero().flatten().tolist()
                     for p in sorted_pairs[blk * moe.BLOCK_M:(blk + 1) * moe.BLOCK_M].tolist() if p >= 0]
        assert rows_of_e == (ids == e).nonzero().flatten().tolist()


def test_moe_alignment_drops_ids_outside_the_experts():
    """Ids outside [0, E) (what TensorRT's tactic timing feeds a plugin: uninitialised memory) are
    dropped as padding: the valid pairs are laid out exactly as without them, and no block is
    given an expert outside [0, E)."""
    gen = torch.Generator().manual_seed(16)
    E, T = 10, 53
    ids = torch.randint(0, E, (T,), generator=gen)
    bad = torch.randperm(T, generator=gen)[:9]
    garbage = ids.clone()
    garbage[bad] = torch.tensor([-1, -(2**40), E, E + 7, 2**31, 2**33 + 2, -(2**31), 2**62, 3 - 2**32])
    NB, rows = moe.align_capacity(T, E)
    outs = []
    for source in (garbage, ids.masked_fill(torch.isin(torch.arange(T), bad), E)):
        sorted_pairs = torch.empty(rows, dtype=torch.int32, device=DEVICE)
        block_expert = torch.empty(NB, dtype=torch.int32, device=DEVICE)
        starts = torch.empty((2, E), dtype=torch.int32, device=DEVICE)
        moe._align_kernel[(1,)](source.to(DEVICE), sorted_pairs, block_expert, starts, T, E, NB, BLOCK_T=64,
                                BLOCK_E=16, BLOCK_M=moe.BLOCK_M)
        outs.append((sorted_pairs.cpu(), block_expert.cpu()))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert not set(outs[0][0].tolist()) & set(bad.tolist())
    assert int(outs[0][1].max()) < E


# ---- attention -----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal,write", [(True, True), (False, False)])
@pytest.mark.parametrize("L,lens", [(1, [0, 9]), (5, [3, 70]), (16, [33, 1])])
def test_block_attention(dtype, causal, write, L, lens):
    gen = torch.Generator().manual_seed(16 + L)
    B, H, K, P, S = len(lens), 4, 2, 24, 96
    q, k, v = rand(B, L, H, P, gen=gen, dtype=dtype), rand(B, L, K, P, gen=gen, dtype=dtype), rand(B, L, K, P, gen=gen, dtype=dtype)
    k_cache, v_cache = rand(B, S, K, P, gen=gen, dtype=dtype), rand(B, S, K, P, gen=gen, dtype=dtype)
    lengths = torch.tensor(lens)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    want = reference.block_attention_ref(q, k, v, want_k, want_v, lengths, causal, write)
    got = attention.block_attention(q, k, v, k_cache, v_cache, lengths.to(DEVICE), max(lens), causal, write)
    close(got, want, dtype)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)  # appended, or untouched


@pytest.mark.parametrize("dtype", DTYPES)
def test_block_attention_split_over_a_long_cache(dtype, monkeypatch):
    """Few programs over a long cache: the cache is split and the partials combined."""
    monkeypatch.setattr(attention, "MIN_SPLIT_KEYS", 64)
    gen = torch.Generator().manual_seed(17)
    B, L, H, K, P, S = 2, 3, 4, 2, 16, 400
    lens = [390, 150]
    assert attention.num_splits(B, K, L * H // K, max(lens)) > 1
    assert attention.launches(B, L, H, K, max(lens)) == 2
    q, k, v = rand(B, L, H, P, gen=gen, dtype=dtype), rand(B, L, K, P, gen=gen, dtype=dtype), rand(B, L, K, P, gen=gen, dtype=dtype)
    k_cache, v_cache = rand(B, S, K, P, gen=gen, dtype=dtype), rand(B, S, K, P, gen=gen, dtype=dtype)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    want = reference.block_attention_ref(q, k, v, want_k, want_v, torch.tensor(lens), True, True)
    got = attention.block_attention(q, k, v, k_cache, v_cache, torch.tensor(lens, device=DEVICE), max(lens), True, True)
    close(got, want, dtype)
    assert torch.equal(k_cache, want_k)


# ---- the seeded Mamba2 block ---------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L", [1, 16])
def test_seeded_mamba_scan(dtype, L):
    gen = torch.Generator().manual_seed(18 + L)
    B, H, P, G, N, W = 2, 4, 20, 2, 8, 4
    C = H * P + 2 * G * N
    proj = rand(B, L, C + H + 5, gen=gen, dtype=dtype)
    xbc, dt = proj[..., 5:5 + C], proj[..., 5 + C:]  # column slices of one projection, as in the mixer
    conv_w, conv_b = rand(C, W, gen=gen, dtype=dtype, scale=0.5), rand(C, gen=gen, dtype=dtype, scale=0.1)
    dt_bias, A_log, D = rand(H, gen=gen, scale=0.5), rand(H, gen=gen, scale=0.5), rand(H, gen=gen)
    conv_state = rand(B, C, W, gen=gen, dtype=dtype)
    ssm_state = rand(B, H, P, N, gen=gen, scale=3.0)  # a large, non-zero seed
    args = (xbc, dt, conv_w, conv_b, dt_bias, A_log, D, conv_state, ssm_state, G, P)
    y, conv, ssm, conv_steps, ssm_steps = mamba.seeded_mamba_scan(*args, return_steps=True)
    want_y, want_conv, want_ssm, want_steps = reference.seeded_mamba_scan_ref(*args, return_steps=True)
    close(y, want_y, dtype, fp32_tol=1e-5)
    assert torch.equal(conv, want_conv)  # raw columns: no arithmetic
    assert torch.equal(conv_steps, reference.conv_state_steps(conv_state, xbc))
    torch.testing.assert_close(ssm, want_ssm, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ssm_steps, want_steps, rtol=1e-5, atol=1e-5)
    y2, conv2, ssm2, no_conv_steps, no_ssm_steps = mamba.seeded_mamba_scan(*args)
    assert torch.equal(y2, y) and torch.equal(ssm2, ssm) and no_conv_steps.numel() == no_ssm_steps.numel() == 0
