"""The chunked (SSD) scan against the sequential fp32 recurrence, seeded with large states (spec §9.2)."""

from __future__ import annotations

import pytest
import torch

from trtllm_twotower.plugins.reference import seeded_mamba_scan_chunked, seeded_mamba_scan_ref


def _inputs(B, L, H=4, P=8, G=2, N=16, W=4, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    C = H * P + 2 * G * N
    return dict(
        xbc=torch.randn(B, L, C, generator=gen).to(dtype), dt=torch.randn(B, L, H, generator=gen).to(dtype),
        conv_weight=(0.5 * torch.randn(C, W, generator=gen)).to(dtype),
        conv_bias=(0.1 * torch.randn(C, generator=gen)).to(dtype),
        dt_bias=torch.log(torch.expm1(torch.empty(H).uniform_(1e-3, 0.1, generator=gen))),
        A_log=torch.log(torch.empty(H).uniform_(1, 16, generator=gen)), D=torch.rand(H, generator=gen) + 0.5,
        conv_state=torch.randn(B, C, W, generator=gen).to(dtype),
        ssm_state=1e3 * torch.randn(B, H, P, N, generator=gen),  # long contexts reach O(1e3)
        n_groups=G, head_dim=P,
    )


@pytest.mark.parametrize("L, chunk", [(1, 8), (5, 8), (16, 8), (37, 16), (130, 128), (300, 64)])
def test_chunked_equals_sequential(L, chunk):
    args = _inputs(2, L, seed=L)
    y_ref, conv_ref, state_ref = seeded_mamba_scan_ref(**args)
    y, conv, state = seeded_mamba_scan_chunked(**args, chunk_size=chunk)
    assert torch.equal(conv, conv_ref)
    assert (y - y_ref).norm() / y_ref.norm() < 1e-5
    assert (state - state_ref).norm() / state_ref.norm() < 1e-5


def test_chunked_bf16_inputs_keep_fp32_state():
    args = _inputs(1, 40, dtype=torch.bfloat16)
    y_ref, _, state_ref = seeded_mamba_scan_ref(**args)
    y, _, state = seeded_mamba_scan_chunked(**args, chunk_size=16)
    assert y.dtype == torch.bfloat16 and state.dtype == torch.float32 and torch.isfinite(y).all()
    assert (state - state_ref).norm() / state_ref.norm() < 1e-5
    assert (y.float() - y_ref.float()).norm() / y_ref.float().norm() < 1e-2  # one bf16 rounding apart


def test_per_position_states_are_the_states_of_shorter_scans():
    """The state after token j of an L-token scan is the final state of a scan over the first j + 1
    tokens, and the conv history after token j is that scan's new conv state (pure layout: equal).
    The SSM states agree to fp32 rounding, not bit for bit: vectorised softplus / exp round a tensor's
    tail differently from its body, so the same token may differ by an ulp between an L-token and a
    (j+1)-token call (the bit-for-bit rollback test uses ``RowInvariantOps``). 1e-6 still tells
    neighbouring positions apart: an off-by-one moves the state by far more (checked below)."""
    from trtllm_twotower.plugins.reference import conv_state_steps

    args = _inputs(3, 9, seed=11)
    _, _, final, steps = seeded_mamba_scan_ref(**args, return_steps=True)
    conv_steps = conv_state_steps(args["conv_state"], args["xbc"])
    assert steps.shape == (3, 10, 4, 8, 16) and conv_steps.shape == (3, 10, args["xbc"].shape[2], 4)
    assert torch.equal(steps[:, -1], final)
    assert torch.equal(steps[:, 0], args["ssm_state"]) and torch.equal(conv_steps[:, 0], args["conv_state"])
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    for j in (0, 3, 8):
        short = {**args, "xbc": args["xbc"][:, : j + 1], "dt": args["dt"][:, : j + 1]}
        _, conv_j, state_j = seeded_mamba_scan_ref(**short)
        assert torch.equal(conv_steps[:, j + 1], conv_j)
        assert rel(steps[:, j + 1], state_j) < 1e-6
        for other in (j, j + 2):
            if 0 <= other <= 9:
                assert rel(steps[:, other], state_j) > 1e-3
