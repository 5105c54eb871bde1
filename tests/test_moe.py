"""MoE: the grouped, sync-free expert path against the spec's loop; the fp64 router."""

from __future__ import annotations

import pytest
import torch

from trtllm_twotower.network.ops import TorchOps
from trtllm_twotower.plugins.reference import moe_experts_ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_experts_equal_the_spec_loop(dtype):
    gen = torch.Generator().manual_seed(0)
    E, H, I, n, k = 8, 32, 16, 37, 3
    x = torch.randn(1, n, H, generator=gen).to(dtype)
    up = (torch.randn(E, I, H, generator=gen) / H**0.5).to(dtype)
    down = (torch.randn(E, H, I, generator=gen) / I**0.5).to(dtype)
    router = torch.randn(E, H, generator=gen).to(dtype)
    ops = TorchOps(dtype)
    idx, w = ops.moe_route(x, router, 0.1 * torch.randn(E, generator=gen), k, True, 2.5)
    assert ops.grouped_experts  # this torch has torch._grouped_mm: the fast path is what runs
    got = ops.moe_experts(x, idx, w, up, down)
    ref = moe_experts_ref(x, idx, w, up, down)
    assert torch.equal(got, ref)
    assert len(torch.unique(idx)) < E or n * k > E  # some experts get several tokens


def test_router_selects_with_bias_and_weights_without_it():
    ops = TorchOps(torch.float32)
    x = torch.zeros(1, 1, 4)
    x[0, 0, 0] = 1.0
    router = torch.zeros(5, 4)
    router[:, 0] = torch.tensor([2.0, 1.0, 0.0, -1.0, -2.0])  # sigmoid scores descending with id
    bias = torch.tensor([0.0, 0.0, 0.0, 0.0, 10.0])  # only changes WHICH experts
    idx, w = ops.moe_route(x, router, bias, 2, True, 2.5)
    assert sorted(idx[0].tolist()) == [0, 4]
    s = torch.sigmoid(torch.tensor([2.0, -2.0], dtype=torch.float64))
    expected = {0: 2.5 * s[0] / s.sum(), 4: 2.5 * s[1] / s.sum()}
    for e, wt in zip(idx[0].tolist(), w[0].tolist()):
        assert abs(wt - float(expected[e])) < 1e-6
