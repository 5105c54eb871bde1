"""The Triton kernels compiled on a GPU against their torch references at real sizes and long
contexts (GPU only; run with `pytest -m gpu`; `tests/test_triton_kernels.py` runs the same kernels
interpreted on the CPU, and compiled on a GPU, at small odd shapes).

Error bounds: fp32 kernel vs fp32 reference relative error <= 1e-4; bf16 kernel vs the fp32
reference on the same (bf16-rounded) inputs <= 1e-2, and at most 2x the reference's own bf16 error
plus a small floor. Fresh random inputs each run."""

from __future__ import annotations

import pytest
import torch

from trtllm_twotower.plugins.reference import (block_attention_ref, gated_rms_norm_ref, moe_route_ref,
                                               rms_norm_ref, seeded_mamba_scan_ref)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
if torch.cuda.is_available():
    from trtllm_twotower.plugins import attention, mamba, moe, norms


def attend(q, k, v, k_cache, v_cache, cache_lens, causal, write):
    """The kernel with the runtime's arguments: lengths on the device, their bound from the host."""
    bound = int(cache_lens.max()) if cache_lens.numel() else 0
    return attention.block_attention(q, k, v, k_cache, v_cache, cache_lens.cuda(), bound, causal, write)


def scan(**args):
    return mamba.seeded_mamba_scan(**args)[:3]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def attention_inputs(B, L, H, K, P, lens, dtype, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    S = max(lens) + L + 3
    make = lambda *shape: torch.randn(*shape, device="cuda", generator=gen).to(dtype)  # noqa: E731
    return make(B, L, H, P), make(B, L, K, P), make(B, L, K, P), make(B, S, K, P), make(B, S, K, P), \
        torch.tensor(lens, dtype=torch.int32)


@pytest.mark.parametrize("lens", [[0], [1], [17], [1000], [8192], [0, 17, 1000, 5], [8192, 1, 300, 4000]])
@pytest.mark.parametrize("L", [1, 16])
@pytest.mark.parametrize("causal, write", [(True, True), (False, False)])
def test_block_attention_matches_reference(lens, L, causal, write):
    B, H, K, P = len(lens), 32, 2, 128
    q, k, v, kc, vc, cl = attention_inputs(B, L, H, K, P, lens, torch.float32, seed=sum(lens) + L)
    ref_kc, ref_vc = kc.clone(), vc.clone()
    ref = block_attention_ref(q, k, v, ref_kc, ref_vc, cl, causal, write)
    got_kc, got_vc = kc.clone(), vc.clone()
    got = attend(q, k, v, got_kc, got_vc, cl, causal, write)
    assert torch.isfinite(got).all() and rel(got, ref) <= 1e-4
    assert torch.equal(got_kc, ref_kc) and torch.equal(got_vc, ref_vc)  # same rows written, others untouched
    # bf16: the kernel's error against fp32 within 2x the reference's own bf16 error (+ floor)
    qb, kb, vb, kcb, vcb = (t.to(torch.bfloat16) for t in (q, k, v, kc, vc))
    exact = block_attention_ref(*(t.float() for t in (qb, kb, vb, kcb.clone(), vcb.clone())), cl, causal, False)
    ref_bf16 = block_attention_ref(qb, kb, vb, kcb.clone(), vcb.clone(), cl, causal, False)
    got_bf16 = attend(qb, kb, vb, kcb.clone(), vcb.clone(), cl, causal, False)
    assert rel(got_bf16, exact) <= 1e-2
    assert rel(got_bf16, exact) <= 2 * rel(ref_bf16, exact) + 1e-3


def test_block_attention_small_heads_and_device_lengths():
    q, k, v, kc, vc, cl = attention_inputs(4, 16, 8, 2, 16, [0, 1, 17, 90], torch.float32, seed=3)
    ref = block_attention_ref(q, k, v, kc.clone(), vc.clone(), cl, False, False)
    assert rel(attend(q, k, v, kc.clone(), vc.clone(), cl.cuda(), False, False), ref) <= 1e-4


def scan_inputs(B, L, H, P, G, N, W, dtype, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    C = H * P + 2 * G * N
    r = lambda *shape: torch.randn(*shape, device="cuda", generator=gen)  # noqa: E731
    dt_bias = torch.log(torch.expm1(torch.empty(H, device="cuda").uniform_(1e-3, 0.1, generator=gen)))
    A_log = torch.log(torch.empty(H, device="cuda").uniform_(1, 16, generator=gen))
    return dict(xbc=r(B, L, C).to(dtype), dt=r(B, L, H).to(dtype), conv_weight=(0.5 * r(C, W)).to(dtype),
                conv_bias=(0.1 * r(C)).to(dtype), dt_bias=dt_bias, A_log=A_log, D=torch.rand(H, device="cuda") + 0.5,
                conv_state=r(B, C, W).to(dtype), ssm_state=1e3 * r(B, H, P, N), n_groups=G, head_dim=P)


@pytest.mark.parametrize("L", [1, 16, 4096])
@pytest.mark.parametrize("B", [1, 4])
def test_seeded_scan_matches_reference_real_sizes(L, B):
    if L == 4096 and B == 4:
        pytest.skip("covered by B=1; the sequential reference is slow at this size")
    args = scan_inputs(B, L, 64, 64, 8, 128, 4, torch.float32, seed=L + B)
    y_ref, conv_ref, ssm_ref = seeded_mamba_scan_ref(**args)
    y, conv, ssm = scan(**args)
    assert rel(y, y_ref) <= 1e-4 and rel(ssm, ssm_ref) <= 1e-4 and torch.equal(conv, conv_ref)
    bf = scan_inputs(B, min(L, 64), 64, 64, 8, 128, 4, torch.bfloat16, seed=L)
    exact = seeded_mamba_scan_ref(**{k: (v.float() if torch.is_tensor(v) else v) for k, v in bf.items()})[0]
    ref_bf16 = seeded_mamba_scan_ref(**bf)[0]
    got_bf16 = scan(**bf)[0]
    assert rel(got_bf16, exact) <= 1e-2 and rel(got_bf16, exact) <= 2 * rel(ref_bf16, exact) + 1e-3


def test_seeded_scan_tiny_sizes_and_inputs_unchanged():
    args = scan_inputs(2, 5, 4, 8, 2, 16, 4, torch.float32, seed=9)
    before = {k: v.clone() for k, v in args.items() if torch.is_tensor(v)}
    y_ref, conv_ref, ssm_ref = seeded_mamba_scan_ref(**args)
    y, conv, ssm = scan(**args)
    assert rel(y, y_ref) <= 1e-4 and rel(ssm, ssm_ref) <= 1e-4 and torch.equal(conv, conv_ref)
    assert all(torch.equal(args[k], v) for k, v in before.items())


@pytest.mark.parametrize("B, L, sizes", [(1, 16, (64, 64, 8, 128)), (3, 5, (4, 8, 2, 16))])
def test_seeded_scan_per_position_states(B, L, sizes):
    """Speculative mode rolls the context back to the state after any token of an extend."""
    H, P, G, N = sizes
    args = scan_inputs(B, L, H, P, G, N, 4, torch.float32, seed=7 * L + B)
    y_ref, _, ssm_ref, steps_ref = seeded_mamba_scan_ref(**args, return_steps=True)
    y, _, ssm, _, steps = mamba.seeded_mamba_scan(**args, return_steps=True)
    assert steps.shape == (B, L + 1, H, P, N) and rel(steps, steps_ref) <= 1e-4
    assert torch.equal(steps[:, -1], ssm) and rel(y, y_ref) <= 1e-4


@pytest.mark.parametrize("n, k, E, H, I", [(1, 6, 128, 2688, 1856), (16, 6, 128, 2688, 1856), (37, 2, 8, 64, 32),
                                           (300, 6, 128, 256, 96)])
def test_moe_experts_matches_reference(n, k, E, H, I):
    from trtllm_twotower.plugins.reference import moe_experts_ref

    gen = torch.Generator(device="cuda").manual_seed(n + E)
    x = torch.randn(n, H, device="cuda", generator=gen)
    idx = torch.stack([torch.randperm(E, device="cuda", generator=gen)[:k] for _ in range(n)])  # distinct per token
    w = torch.rand(n, k, device="cuda", generator=gen)
    up = torch.randn(E, I, H, device="cuda", generator=gen) / H ** 0.5
    down = torch.randn(E, H, I, device="cuda", generator=gen) / I ** 0.5
    ref = moe_experts_ref(x, idx, w, up, down)
    got = moe.moe_experts(x, idx, w, up, down)
    assert rel(got, ref) <= 1e-4
    xb, upb, downb = x.bfloat16(), up.bfloat16(), down.bfloat16()
    exact = moe_experts_ref(xb.float(), idx, w, upb.float(), downb.float())
    ref_bf16 = moe_experts_ref(xb, idx, w, upb, downb)
    got_bf16 = moe.moe_experts(xb, idx, w, upb, downb)
    assert rel(got_bf16, exact) <= 2 * rel(ref_bf16, exact) + 1e-3


@pytest.mark.parametrize("n", [1, 16, 1024])
def test_router_and_norms_real_sizes(n):
    gen = torch.Generator(device="cuda").manual_seed(n)
    x = torch.randn(n, 2688, device="cuda", generator=gen).bfloat16()
    router = (torch.randn(128, 2688, device="cuda", generator=gen) / 50).bfloat16()
    bias = torch.randn(128, device="cuda", generator=gen) / 100
    ids, w = moe.moe_route(x, router, bias, 6, True, 2.5)
    ref_ids, ref_w = moe_route_ref(x, router, bias, 6, True, 2.5)
    assert (ids == ref_ids).float().mean() >= 0.999  # fp64 sums in another order: a near-tie may flip
    assert torch.allclose(w[ids == ref_ids], ref_w[ids == ref_ids], rtol=1e-5)
    weight = torch.randn(2688, device="cuda", generator=gen).bfloat16()
    assert rel(norms.rms_norm(x, weight, 1e-5).float(), rms_norm_ref(x, weight, 1e-5).float()) <= 4e-3
    y, z = (torch.randn(n, 4096, device="cuda", generator=gen).bfloat16() for _ in range(2))
    gw = torch.randn(4096, device="cuda", generator=gen).bfloat16()
    assert rel(norms.gated_rms_norm(y, z, gw, 8, 1e-5).float(), gated_rms_norm_ref(y, z, gw, 8, 1e-5).float()) <= 4e-3
