"""The kernels' torch custom ops (``torch.ops.twotower.*``) on the CPU: each op's fake (shape-only)
implementation agrees with what its CPU implementation (the torch reference) returns, the schema
declares what it mutates (``torch.library.opcheck``), and the CPU implementation is the reference."""

from __future__ import annotations

import pytest
import torch

from trtllm_twotower.plugins import custom_ops, reference  # noqa: F401  (registers the ops)


def _cases():
    gen = torch.Generator().manual_seed(21)
    r = lambda *shape, dtype=torch.float32: torch.randn(*shape, generator=gen).to(dtype)  # noqa: E731
    B, L, D, H, KV, P, S = 2, 3, 16, 4, 2, 8, 12
    MH, MP, G, N, W = 4, 4, 2, 4, 4
    C = MH * MP + 2 * G * N
    ids = torch.stack([torch.randperm(6, generator=gen)[:2] for _ in range(B * L)])
    return {
        "rms_norm": (r(B, L, D), r(D), 1e-5, None, None, False),
        "rms_norm_modulated": (r(B, L, D), r(D), 1e-5, r(3, D), r(B, 3 * D), True),
        "gated_residual": (r(B, L, D), r(B, L, D), r(3, D), r(B, 3 * D)),
        "gated_rms_norm": (r(B, L, D), r(B, L, D), r(D), 2, 1e-5),
        "relu2": (r(B, L, D),),
        "moe_route": (r(B, L, D), r(6, D), r(6), 2, True, 2.5),
        "moe_experts": (r(B * L, D), ids, torch.rand(B * L, 2, generator=gen), r(6, 5, D), r(6, D, 5), r(B * L, D)),
        "block_attention": (r(B, L, H, P), r(B, L, KV, P), r(B, L, KV, P), r(B, S, KV, P), r(B, S, KV, P),
                            torch.tensor([4, 7]), 7, True, True),
        "seeded_mamba_scan": (r(B, L, C), r(B, L, MH), r(C, W), r(C), r(MH), r(MH), r(MH), r(B, C, W), r(B, MH, MP, N),
                              G, MP, True),
    }


@pytest.mark.parametrize("case", list(_cases()))
def test_opcheck(case):
    args = _cases()[case]
    op = getattr(torch.ops.twotower, case.removesuffix("_modulated"))
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_the_cpu_implementation_is_the_reference():
    cases = _cases()
    x, w, eps, *_ = cases["rms_norm"]
    assert torch.equal(torch.ops.twotower.rms_norm(x, w, eps, None, None, False), reference.rms_norm_ref(x, w, eps))
    args = cases["block_attention"]
    k_cache, want_cache = args[3].clone(), args[3].clone()
    got = torch.ops.twotower.block_attention(*args[:3], k_cache, args[4].clone(), *args[5:])
    want = reference.block_attention_ref(*args[:3], want_cache, args[4].clone(), args[5], True, True)
    assert torch.equal(got, want) and torch.equal(k_cache, want_cache)  # the cache is appended in place
    y, conv, ssm, conv_steps, ssm_steps = torch.ops.twotower.seeded_mamba_scan(*cases["seeded_mamba_scan"])
    assert conv_steps.shape[1] == ssm_steps.shape[1] == y.shape[1] + 1 and torch.equal(ssm_steps[:, -1], ssm)
