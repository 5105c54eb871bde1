"""Readable torch references for the custom kernels.

Each function has the signature and semantics of its Triton twin (``plugins/*.py``, registered as
``torch.ops.twotower.*`` in ``custom_ops.py``). They are the eager torch backend's implementation on
CPU, the CPU implementation of the custom ops, and the yardstick of the kernel tests. Written as
numbered steps that map onto spec §3 / §5.1 / §5.3 / §5.4.

Shape alphabet: B batch, L new tokens, S cache capacity, H query heads, K kv heads, P head dim,
N state size, G groups, C conv channels (= H*P + 2*G*N), W conv width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..devices import upload


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """bf16(w_fp32 * x_fp32 * rsqrt(mean(x_fp32^2) + eps)) over the last dim (spec §3). x [..., D]."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.float() * y).to(x.dtype)


def relu2_ref(x: torch.Tensor) -> torch.Tensor:
    """relu(x)^2 with one rounding (relu of a bf16 value is exact)."""
    return torch.relu(x).square()


def modulate_ref(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """bf16(bf16(x * bf16(1 + scale)) + shift), each step rounded (spec §5.1)."""
    return x * (1 + scale) + shift


def layer_modulation_ref(table: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """shift, scale, gate [B, 1, D] of one layer: the rows of bf16(table + m.view(B, 3, D)).
    table [3, D] (the layer's scale_shift_table); m [B, 3D] (adaLN-single output)."""
    rows = table + m.reshape(m.shape[0], 3, -1)  # [B, 3, D]
    return rows[:, 0:1], rows[:, 1:2], rows[:, 2:3]


def modulated_rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, table: torch.Tensor, m: torch.Tensor,
                           modulate_first: bool) -> torch.Tensor:
    """The denoiser's pre-norm (spec §5.1): modulate THEN norm (Mamba, attention layers) or norm
    THEN modulate (MoE, MLP layers), with shift and scale from ``layer_modulation_ref``. x [B, L, D]."""
    shift, scale, _ = layer_modulation_ref(table, m)
    if modulate_first:
        return rms_norm_ref(modulate_ref(x, shift, scale), weight, eps)
    return modulate_ref(rms_norm_ref(x, weight, eps), shift, scale)


def gated_residual_ref(x: torch.Tensor, h: torch.Tensor, table: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """The denoiser's residual: bf16(x + bf16(gate * h)), gate from ``layer_modulation_ref``. x, h [B, L, D]."""
    _, _, gate = layer_modulation_ref(table, m)
    return x + gate * h


def gated_rms_norm_ref(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, n_groups: int, eps: float):
    """Gate THEN norm (norm_before_gate=False): v = y * silu(z) in fp32, RMS-normalised per group of
    channels, weight multiplied in fp32, one rounding. y, z [..., D] -> [..., D]."""
    v = y.float() * F.silu(z.float())
    shape = v.shape
    g = v.reshape(*shape[:-1], n_groups, shape[-1] // n_groups)
    g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + eps)
    return (g.reshape(shape) * weight.float()).to(y.dtype)


def moe_route_ref(x: torch.Tensor, router: torch.Tensor, correction_bias: torch.Tensor, top_k: int,
                  normalize: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Sigmoid router in fp64 (spec §3, R6 moe_router_dtype=fp64). x [..., D]; router [E, D];
    correction_bias [E] -> expert ids [n, k] int64 (by descending selection score; among equal
    scores the lower expert id first) and weights [n, k] fp32.
    1. scores = sigmoid(x @ router^T) in fp64
    2. the top k of scores + correction_bias (the bias only selects)
    3. weights = the plain scores of those experts, renormalised (``normalize``), times ``scale``"""
    scores = torch.sigmoid(x.reshape(-1, x.shape[-1]).double() @ router.double().t())  # [n, E]
    idx = torch.topk(scores + correction_bias.double(), top_k, dim=-1).indices
    w = scores.gather(1, idx)
    if normalize:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return idx, (w * scale).float()


def block_attention_ref(
    q: torch.Tensor,  # [B, L, H, P]
    k: torch.Tensor,  # [B, L, K, P]   the new tokens' keys
    v: torch.Tensor,  # [B, L, K, P]
    k_cache: torch.Tensor,  # [B, S, K, P]  keys of earlier tokens; rows valid in [0, cache_lens[b])
    v_cache: torch.Tensor,  # [B, S, K, P]
    cache_lens: torch.Tensor,  # [B] int   tokens already in the cache, per row
    causal: bool,
    write_cache: bool,
) -> torch.Tensor:  # [B, L, H, P], dtype of q
    """Queries of an L-token chunk attend to ``cache[0:len]`` plus the chunk's own K/V.

    causal=True  (context tower): query j sees cache[0:len] and chunk keys 0..j.
    causal=False (denoiser):      every query sees cache[0:len] and all L chunk keys.
    write_cache=True stores k, v into ``k_cache/v_cache[b, len_b : len_b + L]`` in place (the
    caller advances its lengths); False leaves the cache untouched (the denoiser is read-only).
    GQA: query head h reads kv head h // (H // K). No positional encoding (NoPE).
    Scores and softmax in fp32, scale 1/sqrt(P); probabilities @ V in fp32, one rounding at the end.
    Lengths on the host (the runtime's eager path) cut the cache at the longest row and are read
    there; lengths on the device (CUDA-graph capture) are never read back: the whole capacity is
    masked and the new K/V scattered to their positions on the device.
    """
    on_host = cache_lens.device.type == "cpu"
    max_len = (int(cache_lens.max()) if q.shape[0] else 0) if on_host else k_cache.shape[1] - q.shape[1]
    return _block_attention(q, k, v, k_cache, v_cache, cache_lens, max_len, causal, write_cache, on_host)


def _block_attention(q, k, v, k_cache, v_cache, cache_lens, max_len: int, causal: bool, write_cache: bool,
                     host_writes: bool) -> torch.Tensor:
    """``block_attention_ref`` over the cache prefix [0, max_len) (max_len >= every row's length);
    ``host_writes``: append the new K/V by host-side slices (else by a scatter on the device)."""
    B, L, H, P = q.shape
    K = k.shape[2]
    lens = upload(cache_lens.to(torch.long), q.device)  # [B]
    # 1. keys/values seen by the chunk: the cache prefix (padded to max_len) ‖ the chunk
    keys = torch.cat([k_cache[:, :max_len].float(), k.float()], dim=1)  # [B, max_len + L, K, P]
    values = torch.cat([v_cache[:, :max_len].float(), v.float()], dim=1)
    # 2. mask: cache slot s valid iff s < len_b; chunk key i visible to query j iff i <= j (causal);
    # built on q's device (a host-built mask would be a synchronising copy)
    slot = torch.arange(max_len, device=q.device)
    cache_ok = (slot[None, :] < lens[:, None])[:, None, :].expand(B, L, max_len)  # [B, L, max_len]
    chunk_ok = torch.ones(L, L, dtype=torch.bool, device=q.device)
    if causal:
        chunk_ok = torch.tril(chunk_ok)
    visible = torch.cat([cache_ok, chunk_ok[None].expand(B, L, L)], dim=2)  # [B, L, max_len+L]
    # 3. GQA: repeat each kv head for its H // K query heads
    group = H // K
    keys = keys.repeat_interleave(group, dim=2)  # [B, max_len + L, H, P]
    values = values.repeat_interleave(group, dim=2)
    # 4. fp32 scores, masked softmax, weighted sum
    scores = torch.einsum("blhp,bshp->bhls", q.float(), keys) / math.sqrt(P)  # [B, H, L, max_len+L]
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bhls,bshp->blhp", probs, values)  # [B, L, H, P]
    # 5. append the chunk's K/V to the cache (context tower only)
    if write_cache and host_writes:
        for b in range(B):
            start = int(cache_lens[b])
            k_cache[b, start : start + L] = k[b].to(k_cache.dtype)
            v_cache[b, start : start + L] = v[b].to(v_cache.dtype)
    elif write_cache:
        where = (lens[:, None] + torch.arange(L, device=q.device))[:, :, None, None].expand(B, L, K, P)
        k_cache.scatter_(1, where, k.to(k_cache.dtype))
        v_cache.scatter_(1, where, v.to(v_cache.dtype))
    return out.to(q.dtype)


def seeded_mamba_scan_ref(
    xbc: torch.Tensor,  # [B, L, C]  raw (pre-conv) x ‖ B ‖ C columns of the new tokens
    dt: torch.Tensor,  # [B, L, H]  raw dt (before dt_bias and softplus)
    conv_weight: torch.Tensor,  # [C, W]  depthwise taps; conv_weight[:, W-1] multiplies the current column
    conv_bias: torch.Tensor,  # [C]
    dt_bias: torch.Tensor,  # [H] fp32
    A_log: torch.Tensor,  # [H] fp32    A = -exp(A_log)
    D: torch.Tensor,  # [H] fp32        skip connection per head
    conv_state: torch.Tensor,  # [B, C, W]  last W raw columns before this chunk, most recent at W-1
    ssm_state: torch.Tensor,  # [B, H, P, N] fp32  state after the last processed token
    n_groups: int,
    head_dim: int,
    return_steps: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Seeded causal conv + SiLU, then the selective-state recurrence in fp32.

    Returns ``y`` [B, L, H*P] (dtype of xbc; C·S + D·x, before the gated norm), the new conv state
    [B, C, W] (last W raw columns of ``conv_state ‖ xbc``, dtype of conv_state) and the new fp32 SSM
    state [B, H, P, N]; with ``return_steps`` also the fp32 SSM state after each prefix of the
    chunk [B, L + 1, H, P, N] (index j = after the first j tokens; 0 = the seed; speculative mode
    rolls the context back to any of them). The inputs are not
    modified; the denoiser simply drops the new states.
    Head h reads group h // (H // G). The conv is seeded with the last W-1 columns of conv_state.
    """
    B, L, _ = xbc.shape
    x, Bm, Cm, dt, A, new_conv_state = _conv_and_params(xbc, dt, conv_weight, conv_bias, dt_bias, A_log,
                                                       conv_state, n_groups, head_dim)
    # 3. sequential recurrence: S = exp(dt A) S + dt x ⊗ B; y = S C + D x
    state = ssm_state.float().clone()  # [B, H, P, N]
    ys, steps = [], [state]
    for t in range(L):
        decay = torch.exp(dt[:, t] * A)  # [B, H]
        state = decay[:, :, None, None] * state + (dt[:, t, :, None] * x[:, t])[..., None] * Bm[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", state, Cm[:, t]) + D.float()[None, :, None] * x[:, t])
        steps.append(state)
    y = torch.stack(ys, dim=1).reshape(B, L, -1) if L else x.reshape(B, 0, -1)
    # 4. one rounding of y to the compute dtype
    if return_steps:
        return y.to(xbc.dtype), new_conv_state, state, torch.stack(steps, dim=1)
    return y.to(xbc.dtype), new_conv_state, state


def conv_state_steps(conv_state: torch.Tensor, xbc: torch.Tensor) -> torch.Tensor:
    """The conv state after each prefix of the L new tokens: [B, L + 1, C, W], entry j = the last W
    raw columns of ``conv_state ‖ xbc[:, :j]`` (0 = conv_state; layout only, no arithmetic).
    conv_state [B, C, W], xbc [B, L, C]."""
    W = conv_state.shape[2]
    seq = torch.cat([conv_state, xbc.transpose(1, 2).to(conv_state.dtype)], dim=2)  # [B, C, W + L]
    return seq.unfold(2, W, 1).permute(0, 2, 1, 3)  # [B, L + 1, C, W]


def _conv_and_params(xbc, dt, conv_weight, conv_bias, dt_bias, A_log, conv_state, n_groups: int, head_dim: int):
    """Steps 1-2 shared by both scan forms: the seeded conv + SiLU (one rounding to xbc's dtype) and
    the fp32 scan parameters. Returns x [B, L, H, P], B and C [B, L, H, N] (expanded per head),
    dt [B, L, H], A [H], and the new conv state [B, C, W]."""
    B, L, C = xbc.shape
    W = conv_weight.shape[1]
    H = dt.shape[2]
    P, G = head_dim, n_groups
    N = (C - H * P) // (2 * G)
    # 1. depthwise causal conv over [W-1 seed columns ‖ L new columns], fp32 accumulate, SiLU, one rounding
    # (one tap at a time, in tap order: a column's value never depends on how many columns there are)
    seq = torch.cat([conv_state[:, :, 1:].float(), xbc.transpose(1, 2).float()], dim=2)  # [B, C, W-1+L]
    w = conv_weight.float()[None, :, :, None]  # [1, C, W, 1]
    conv = conv_bias.float()[None, :, None].expand(B, C, L)
    for j in range(W):
        conv = conv + w[:, :, j] * seq[:, :, j : j + L]  # [B, C, L]
    xbc_conv = F.silu(conv).to(xbc.dtype).transpose(1, 2)  # [B, L, C]
    new_conv_state = torch.cat([conv_state, xbc.transpose(1, 2).to(conv_state.dtype)], dim=2)[:, :, -W:]
    # 2. split into x [B, L, H, P], B and C [B, L, G, N]; dt = softplus(dt + dt_bias) in fp32
    x, Bm, Cm = torch.split(xbc_conv.float(), [H * P, G * N, G * N], dim=-1)
    x = x.reshape(B, L, H, P)
    Bm = Bm.reshape(B, L, G, N).repeat_interleave(H // G, dim=2)  # [B, L, H, N]
    Cm = Cm.reshape(B, L, G, N).repeat_interleave(H // G, dim=2)
    dt = F.softplus(dt.float() + dt_bias.float())  # [B, L, H]; softplus passes the raw value above 20
    A = -torch.exp(A_log.float())  # [H]
    return x, Bm, Cm, dt, A, new_conv_state


def _segsum(a: torch.Tensor) -> torch.Tensor:
    """a [..., T] -> [..., T, T]: out[i, j] = sum(a[j+1 .. i]) for j <= i, -inf above the diagonal
    (the stable form: cumsum of a masked copy, not a difference of cumsums)."""
    T = a.shape[-1]
    a = a[..., None].expand(*a.shape, T)  # [..., T, T]: a[..., i, j] = a_i
    below = torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device), diagonal=-1)
    out = torch.cumsum(a.masked_fill(~below, 0), dim=-2)
    return out.masked_fill(~torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device)), float("-inf"))


def seeded_mamba_scan_chunked(xbc, dt, conv_weight, conv_bias, dt_bias, A_log, D, conv_state, ssm_state,
                              n_groups: int, head_dim: int, chunk_size: int = 128):
    """The same function as ``seeded_mamba_scan_ref``, in the chunked SSD form (Mamba2 paper,
    Listing 1, with an initial state): a few large einsums instead of one step per token, so long
    prefills are fast on the torch path. fp32 throughout; differs from the sequential form by fp32
    rounding only (checked in tests with large, non-zero initial states)."""
    B, L, _ = xbc.shape
    x, Bm, Cm, dt, A, new_conv_state = _conv_and_params(xbc, dt, conv_weight, conv_bias, dt_bias, A_log,
                                                       conv_state, n_groups, head_dim)
    pad = -L % chunk_size  # zero dt on padding: decay 1, no input, state unchanged
    X = F.pad(x * dt[..., None], (0, 0, 0, 0, 0, pad))  # [B, T, H, P]
    dA = F.pad(dt * A, (0, 0, 0, pad))  # [B, T, H]
    Bp, Cp = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (Bm, Cm))  # [B, T, H, N]
    c = (L + pad) // chunk_size
    X, Bp, Cp = (t.reshape(B, c, chunk_size, *t.shape[2:]) for t in (X, Bp, Cp))  # [B, c, l, H, .]
    dA = dA.reshape(B, c, chunk_size, -1).permute(0, 3, 1, 2)  # [B, H, c, l]
    dA_cumsum = torch.cumsum(dA, dim=-1)
    # 1. intra-chunk outputs (diagonal blocks)
    decay = torch.exp(_segsum(dA))  # [B, H, c, l, l]
    y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", Cp, Bp, decay, X)
    # 2. each chunk's own final state
    decay_states = torch.exp(dA_cumsum[..., -1:] - dA_cumsum)  # [B, H, c, l]
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", Bp, decay_states, X)  # [B, c, H, P, N]
    # 3. inter-chunk recurrence, seeded with the initial state
    states = torch.cat([ssm_state.float()[:, None], states], dim=1)  # [B, c+1, H, P, N]
    decay_chunk = torch.exp(_segsum(F.pad(dA_cumsum[..., -1], (1, 0))))  # [B, H, c+1, c+1]
    states = torch.einsum("bhzc,bchpn->bzhpn", decay_chunk, states)
    states, final_state = states[:, :-1], states[:, -1]
    # 4. state -> output, plus the D skip
    y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", Cp, states, torch.exp(dA_cumsum))
    y = (y_diag + y_off).reshape(B, c * chunk_size, *x.shape[2:])[:, :L] + D.float()[None, None, :, None] * x
    return y.reshape(B, L, -1).to(xbc.dtype), new_conv_state, final_state


def moe_experts_ref(
    x: torch.Tensor,  # [..., H]   the MoE layer's input (the normed hidden state)
    idx: torch.Tensor,  # [n, k] int  expert of each (token, slot), n = tokens in x
    weights: torch.Tensor,  # [n, k] fp32  routing weight of each (token, slot)
    up: torch.Tensor,  # [E, I, H]
    down: torch.Tensor,  # [E, H, I]
) -> torch.Tensor:  # [..., H], dtype of x
    """Routed relu^2 experts, the spec's loop (§3): for each expert in ascending id, its tokens
    through up -> relu^2 -> down (each op rounded to x's dtype), scaled by the routing weight and
    added to an fp32 accumulator; one rounding at the end. The shared expert is not included."""
    tokens = x.reshape(-1, x.shape[-1])  # [n, H]
    acc = torch.zeros(tokens.shape, dtype=torch.float32, device=x.device)
    for e in torch.unique(idx).tolist():
        rows, slots = torch.nonzero(idx == e, as_tuple=True)  # ascending token order
        a = torch.relu(F.linear(tokens[rows], up[e])).square()
        acc.index_add_(0, rows, F.linear(a, down[e]).float() * weights[rows, slots, None])
    return acc.to(x.dtype).reshape(x.shape)
