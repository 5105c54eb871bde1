"""The torch references of the kernels (plugins/reference.py) against brute-force math."""

from __future__ import annotations

import math

import torch

from trtllm_twotower.plugins.reference import block_attention_ref, seeded_mamba_scan_ref



def test_block_attention_ref_against_brute_force():
    gen = torch.Generator().manual_seed(0)
    B, L, H, K, P, S = 2, 5, 4, 2, 8, 12
    lens = torch.tensor([3, 7])
    q, k, v = (torch.randn(B, L, n, P, generator=gen) for n in (H, K, K))
    kc, vc = torch.randn(B, S, K, P, generator=gen), torch.randn(B, S, K, P, generator=gen)
    for causal in (True, False):
        kc_w, vc_w = kc.clone(), vc.clone()
        out = block_attention_ref(q, k, v, kc_w, vc_w, lens, causal, write_cache=True)
        for b in range(B):
            n = int(lens[b])
            assert torch.equal(kc_w[b, n : n + L], k[b]) and torch.equal(kc_w[b, :n], kc[b, :n])
            for h in range(H):
                kvh = h // (H // K)
                keys = torch.cat([kc[b, :n, kvh], k[b, :, kvh]]).double()
                vals = torch.cat([vc[b, :n, kvh], v[b, :, kvh]]).double()
                for j in range(L):
                    seen = n + j + 1 if causal else n + L
                    w = torch.softmax(keys[:seen] @ q[b, j, h].double() / math.sqrt(P), 0)
                    assert torch.allclose(out[b, j, h].double(), w @ vals[:seen], atol=1e-5)
        untouched = kc.clone()
        block_attention_ref(q, k, v, untouched, vc.clone(), lens, causal, write_cache=False)
        assert torch.equal(untouched, kc)


def test_block_attention_ref_device_lengths_form():
    """The form used under CUDA-graph capture (lengths never read back: the whole capacity masked,
    the new K/V scattered on the device) equals the host-lengths form: same cache writes, outputs
    to fp32 rounding (the softmax runs over more, masked, slots)."""
    from trtllm_twotower.plugins.reference import _block_attention

    gen = torch.Generator().manual_seed(2)
    B, L, H, K, P, S = 3, 4, 4, 2, 8, 20
    lens = torch.tensor([0, 9, 16])
    q, k, v = (torch.randn(B, L, n, P, generator=gen) for n in (H, K, K))
    kc, vc = torch.randn(B, S, K, P, generator=gen), torch.randn(B, S, K, P, generator=gen)
    for causal in (True, False):
        host_k, host_v, dev_k, dev_v = kc.clone(), vc.clone(), kc.clone(), vc.clone()
        host = block_attention_ref(q, k, v, host_k, host_v, lens, causal, write_cache=True)
        dev = _block_attention(q, k, v, dev_k, dev_v, lens, S - L, causal, write_cache=True, host_writes=False)
        assert torch.equal(dev_k, host_k) and torch.equal(dev_v, host_v)
        assert (dev - host).abs().max() < 1e-6 * host.abs().max()


def test_seeded_scan_ref_multi_token_equals_token_by_token():
    gen = torch.Generator().manual_seed(1)
    B, L, H, P, G, N, W = 2, 6, 4, 8, 2, 16, 4
    C = H * P + 2 * G * N
    xbc, dt = torch.randn(B, L, C, generator=gen), torch.randn(B, L, H, generator=gen)
    w, bias = torch.randn(C, W, generator=gen), torch.randn(C, generator=gen)
    dt_bias, A_log, D = torch.rand(H, generator=gen) - 2, torch.rand(H, generator=gen), torch.rand(H, generator=gen)
    conv0, ssm0 = torch.randn(B, C, W, generator=gen), 50 * torch.randn(B, H, P, N, generator=gen)
    y, conv, ssm = seeded_mamba_scan_ref(xbc, dt, w, bias, dt_bias, A_log, D, conv0, ssm0, G, P)
    conv_t, ssm_t, ys = conv0, ssm0, []
    for t in range(L):
        y_t, conv_t, ssm_t = seeded_mamba_scan_ref(xbc[:, t : t + 1], dt[:, t : t + 1], w, bias, dt_bias, A_log, D,
                                                   conv_t, ssm_t, G, P)
        ys.append(y_t)
    assert torch.allclose(torch.cat(ys, 1), y, atol=1e-4, rtol=1e-5)
    assert torch.allclose(ssm_t, ssm, atol=1e-3, rtol=1e-5) and torch.equal(conv_t, conv)
    assert torch.equal(conv, xbc[:, -W:].transpose(1, 2))  # the last W raw columns
    short = seeded_mamba_scan_ref(xbc[:, :2], dt[:, :2], w, bias, dt_bias, A_log, D, conv0, ssm0, G, P)[1]
    assert torch.equal(short, torch.cat([conv0[:, :, 2:], xbc[:, :2].transpose(1, 2)], 2))
