"""Triton kernel of the seeded Mamba2 block: causal conv (seeded with the previous raw columns) +
SiLU + the selective scan (seeded with the fp32 SSM state), one launch.

Reference: ``reference.seeded_mamba_scan_ref``. One program owns one (row, head, block of BLOCK_P
head channels): its SSM state [BLOCK_P, N] stays in registers for the whole chunk, and it computes
the conv of its own x channels and of its group's B and C channels (the B/C conv is recomputed by
the heads sharing a group: W taps per channel, cheaper than a second launch). Per token, as the
reference: conv in fp32 in tap order, SiLU, rounded to the storage dtype; dt = softplus(dt +
dt_bias) in fp32; S = exp(dt A) S + (dt x) ⊗ B; y = S·C + D x, rounded once. The new conv state is
the last W raw columns of ``conv_state ‖ xbc``; with ``return_steps`` the conv and SSM states after
every prefix of the chunk are written too (speculative rollback). The scan is sequential in the chunk: exact for the 1- and
16-token steps this runtime issues; a long prefill is latency-bound here (the torch path uses the
chunked SSD form there; a chunked Triton form is the lever for prefills).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rounding import round_to, to_storage

BLOCK_P = 16


@triton.jit
def _conv_silu(xbc_ptr, conv_state_ptr, w_ptr, bias_ptr, channels, ok, t, b, xbc_sb, xbc_sl, C,
               W: tl.constexpr, dtype: tl.constexpr):
    """SiLU(bias + Σ_j w[c, j] · seq[t + j]) rounded to dtype, seq = conv_state[:, 1:] ‖ xbc (raw)."""
    acc = tl.load(bias_ptr + channels, mask=ok, other=0.0).to(tl.float32)
    for j in tl.static_range(W):
        s = t + j + 0 * channels  # index into seq (W-1 seed columns, then the chunk), per channel
        seeded = s < W - 1
        from_state = tl.load(conv_state_ptr + b * C * W + channels * W + 1 + s, mask=ok & seeded, other=0.0)
        from_chunk = tl.load(xbc_ptr + b * xbc_sb + (s - (W - 1)) * xbc_sl + channels, mask=ok & (s >= W - 1),
                             other=0.0)
        column = tl.where(seeded, from_state.to(tl.float32), from_chunk.to(tl.float32))
        acc = acc + tl.load(w_ptr + channels * W + j, mask=ok, other=0.0).to(tl.float32) * column
    return round_to(acc * tl.sigmoid(acc), dtype)


@triton.jit
def _softplus(x):
    """log(1 + exp(x)) as torch's softplus (the raw value above 20); log1p by Goldberg's identity."""
    e = tl.exp(x)
    u = 1.0 + e
    log1p = tl.where(u == 1.0, e, tl.log(u) * (e / (u - 1.0)))
    return tl.where(x > 20.0, x, log1p)


@triton.jit
def _conv_window(xbc_ptr, conv_state_ptr, out_ptr, channels, ok, b, j, xbc_sb, xbc_sl, C, W: tl.constexpr):
    """out[:, w] = (conv_state ‖ xbc)[:, j + w] for w < W: the conv state after the first j tokens
    (raw columns, representable in the state's dtype). ``out_ptr`` points at row b's [C, W]."""
    for w in tl.static_range(W):
        i = j + w + 0 * channels  # per channel
        in_state = i < W
        old = tl.load(conv_state_ptr + b * C * W + channels * W + i, mask=ok & in_state, other=0.0)
        new = tl.load(xbc_ptr + b * xbc_sb + (i - W) * xbc_sl + channels, mask=ok & (i >= W), other=0.0)
        value = tl.where(in_state, old.to(tl.float32), new.to(tl.float32))
        tl.store(out_ptr + channels * W + w, value.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _conv_windows(xbc_ptr, conv_state_ptr, new_conv_ptr, conv_steps_ptr, channels, ok, b, L, xbc_sb, xbc_sl, C,
                  W: tl.constexpr, RETURN_STEPS: tl.constexpr):
    """The new conv state (after all L tokens) and, with RETURN_STEPS, the state after each prefix."""
    _conv_window(xbc_ptr, conv_state_ptr, new_conv_ptr + b * C * W, channels, ok, b, L, xbc_sb, xbc_sl, C, W)
    if RETURN_STEPS:  # [B, L + 1, C, W]
        for j in range(0, L + 1):
            _conv_window(xbc_ptr, conv_state_ptr, conv_steps_ptr + (b * (L + 1) + j).to(tl.int64) * C * W, channels,
                         ok, b, j, xbc_sb, xbc_sl, C, W)


@triton.jit
def _seeded_mamba_scan_kernel(
    xbc_ptr, dt_ptr, conv_w_ptr, conv_b_ptr, dt_bias_ptr, a_log_ptr, d_ptr, conv_state_ptr, ssm_ptr,
    y_ptr, new_conv_ptr, new_ssm_ptr, conv_steps_ptr, ssm_steps_ptr,
    L, C, xbc_sb, xbc_sl, dt_sb, dt_sl,
    H: tl.constexpr, P: tl.constexpr, N: tl.constexpr, G: tl.constexpr, W: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, RETURN_STEPS: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    p_block = tl.program_id(2)
    g = h // (H // G)
    dtype: tl.constexpr = y_ptr.dtype.element_ty
    p = p_block * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = p < P
    n = tl.arange(0, BLOCK_N)
    n_ok = n < N
    x_channels = h * P + p
    b_channels = H * P + g * N + n
    c_channels = H * P + G * N + g * N + n
    A = -tl.exp(tl.load(a_log_ptr + h).to(tl.float32))
    dt_bias = tl.load(dt_bias_ptr + h).to(tl.float32)
    D = tl.load(d_ptr + h).to(tl.float32)
    state_offsets = ((b * H + h) * P + p[:, None]).to(tl.int64) * N + n[None, :]  # [BLOCK_P, BLOCK_N]
    state_ok = p_ok[:, None] & n_ok[None, :]
    state = tl.load(ssm_ptr + state_offsets, mask=state_ok, other=0.0)
    if RETURN_STEPS:  # [B, L + 1, H, P, N], index j = after the first j tokens
        step0 = (((b * (L + 1)).to(tl.int64) * H + h) * P + p[:, None]) * N + n[None, :]
        tl.store(ssm_steps_ptr + step0, state, mask=state_ok)
    for t in range(0, L):
        x = _conv_silu(xbc_ptr, conv_state_ptr, conv_w_ptr, conv_b_ptr, x_channels, p_ok, t, b, xbc_sb, xbc_sl, C,
                       W, dtype)
        B = _conv_silu(xbc_ptr, conv_state_ptr, conv_w_ptr, conv_b_ptr, b_channels, n_ok, t, b, xbc_sb, xbc_sl, C,
                       W, dtype)
        Cm = _conv_silu(xbc_ptr, conv_state_ptr, conv_w_ptr, conv_b_ptr, c_channels, n_ok, t, b, xbc_sb, xbc_sl, C,
                        W, dtype)
        dt = _softplus(tl.load(dt_ptr + b * dt_sb + t * dt_sl + h).to(tl.float32) + dt_bias)
        state = tl.exp(dt * A) * state + (dt * x)[:, None] * B[None, :]
        y = tl.sum(state * Cm[None, :], axis=1) + D * x
        tl.store(y_ptr + (b * L + t).to(tl.int64) * H * P + x_channels, to_storage(y, dtype), mask=p_ok)
        if RETURN_STEPS:
            step = (((b * (L + 1) + t + 1).to(tl.int64) * H + h) * P + p[:, None]) * N + n[None, :]
            tl.store(ssm_steps_ptr + step, state, mask=state_ok)
    tl.store(new_ssm_ptr + state_offsets, state, mask=state_ok)
    _conv_windows(xbc_ptr, conv_state_ptr, new_conv_ptr, conv_steps_ptr, x_channels, p_ok, b, L, xbc_sb, xbc_sl, C,
                  W, RETURN_STEPS)
    if (h % (H // G) == 0) & (p_block == 0):  # one program per group writes its B and C columns
        _conv_windows(xbc_ptr, conv_state_ptr, new_conv_ptr, conv_steps_ptr, b_channels, n_ok, b, L, xbc_sb, xbc_sl,
                      C, W, RETURN_STEPS)
        _conv_windows(xbc_ptr, conv_state_ptr, new_conv_ptr, conv_steps_ptr, c_channels, n_ok, b, L, xbc_sb, xbc_sl,
                      C, W, RETURN_STEPS)


def seeded_mamba_scan(xbc, dt, conv_weight, conv_bias, dt_bias, A_log, D, conv_state, ssm_state, n_groups: int,
                      head_dim: int, return_steps: bool = False):
    """xbc [B, L, C] and dt [B, L, H] (column slices of the in_proj output are fine); conv_weight
    [C, W]; conv_bias [C]; dt_bias, A_log, D [H]; conv_state [B, C, W]; ssm_state [B, H, P, N] fp32
    -> y [B, L, H*P] (dtype of xbc), new conv state [B, C, W], new fp32 SSM state [B, H, P, N],
    and with ``return_steps`` the conv [B, L + 1, C, W] and fp32 SSM [B, L + 1, H, P, N] states
    after each prefix of the chunk (index 0 = the seed; empty tensors otherwise)."""
    B, L, C = xbc.shape
    H = dt.shape[2]
    W = conv_weight.shape[1]
    P, G = head_dim, n_groups
    N = (C - H * P) // (2 * G)
    if xbc.stride(2) != 1:
        xbc = xbc.contiguous()
    if dt.stride(2) != 1:
        dt = dt.contiguous()
    conv_state, ssm_state = conv_state.contiguous(), ssm_state.contiguous()
    y = torch.empty((B, L, H * P), dtype=xbc.dtype, device=xbc.device)
    new_conv = torch.empty_like(conv_state)
    new_ssm = torch.empty_like(ssm_state)
    conv_steps = conv_state.new_empty((B, L + 1, C, W) if return_steps else 0)
    ssm_steps = ssm_state.new_empty((B, L + 1, H, P, N) if return_steps else 0)
    if B:
        _seeded_mamba_scan_kernel[(B, H, triton.cdiv(P, BLOCK_P))](
            xbc, dt, conv_weight.contiguous(), conv_bias.contiguous(), dt_bias.contiguous(), A_log.contiguous(),
            D.contiguous(), conv_state, ssm_state, y, new_conv, new_ssm, conv_steps, ssm_steps,
            L, C, xbc.stride(0), xbc.stride(1), dt.stride(0), dt.stride(1),
            H=H, P=P, N=N, G=G, W=W, BLOCK_P=BLOCK_P, BLOCK_N=triton.next_power_of_2(N), RETURN_STEPS=return_steps,
        )
    return y, new_conv, new_ssm, conv_steps, ssm_steps
