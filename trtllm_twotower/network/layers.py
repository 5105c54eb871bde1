"""One function per layer kind, each ``(ops, cfg, weights, x, state) -> (y, new_state)``.

Shared by both towers and every backend: the context tower calls them with causal attention and
commits the returned state; the denoiser calls them with bidirectional attention over the context's
caches and drops the state. Shapes: B batch, L new tokens, D hidden, S cache capacity.
"""

from __future__ import annotations

from ..config import TwoTowerConfig


def attention(ops, cfg: TwoTowerConfig, w: dict, h, k_cache, v_cache, cache_lens, *, causal: bool, write_cache: bool):
    """NoPE GQA attention over ``cache[0:len] ‖ own K/V`` (spec §3, §5.3).

    h [B, L, D]; k_cache, v_cache [B, S, K, P]; cache_lens [B]. write_cache appends the new K/V
    in place (context tower). Returns [B, L, D]."""
    q = ops.split_heads(ops.linear(h, w["q_proj"]), cfg.num_attention_heads, cfg.head_dim)  # [B, L, H, P]
    k = ops.split_heads(ops.linear(h, w["k_proj"]), cfg.num_key_value_heads, cfg.head_dim)  # [B, L, K, P]
    v = ops.split_heads(ops.linear(h, w["v_proj"]), cfg.num_key_value_heads, cfg.head_dim)
    o = ops.block_attention(q, k, v, k_cache, v_cache, cache_lens, causal, write_cache)  # [B, L, H, P]
    return ops.linear(ops.merge_heads(o), w["o_proj"])


def mamba2(ops, cfg: TwoTowerConfig, w: dict, h, conv_state, ssm_state, per_position: bool = False):
    """Mamba2 mixer seeded with explicit state (spec §3, §5.4).

    h [B, L, D]; conv_state [B, C, W] (last raw xBC columns); ssm_state [B, heads, P, N] fp32.
    Returns (out [B, L, D], new conv_state, new ssm_state, steps): steps is None, or with
    ``per_position`` (conv states [B, L + 1, C, W], fp32 ssm states [B, L + 1, heads, P, N]) after
    each prefix of the chunk (index 0 = the seed)."""
    # in_proj: z ‖ xBC ‖ dt
    proj = ops.linear(h, w["in_proj"])  # [B, L, d_inner + conv_dim + heads]
    z, xbc, dt = ops.split(proj, [cfg.d_inner, cfg.conv_dim, cfg.mamba_num_heads])
    # conv1d + SiLU + selective scan, fp32 state
    y, conv_state, ssm_state, *steps = ops.mamba_scan(
        xbc, dt, w["conv_weight"], w["conv_bias"], w["dt_bias"], w["A_log"], w["D"], conv_state, ssm_state,
        cfg.n_groups, cfg.mamba_head_dim, per_position=per_position,
    )  # y [B, L, d_inner]
    # gated group norm (gate then norm), out_proj
    y = ops.gated_rms_norm(y, z, w["gated_norm"], cfg.n_groups, cfg.layer_norm_epsilon)
    return ops.linear(y, w["out_proj"]), conv_state, ssm_state, (tuple(steps) if steps else None)


def relu2_mlp(ops, up, down, h):
    """Non-gated up -> relu^2 -> down (the dense MLP and the MoE shared expert)."""
    return ops.linear(ops.relu2(ops.linear(h, up)), down)


def moe(ops, cfg: TwoTowerConfig, w: dict, h):
    """Routed relu^2 experts (fp64 sigmoid router, correction bias for selection only) plus the
    shared expert on the same input (spec §3). h [B, L, D] -> [B, L, D]."""
    expert_ids, expert_weights = ops.moe_route(
        h, w["router"], w["router_bias"], cfg.num_experts_per_tok, cfg.norm_topk_prob, cfg.routed_scaling_factor
    )
    shared = relu2_mlp(ops, w["shared_up"], w["shared_down"], h) if cfg.n_shared_experts else None
    return ops.moe_experts(h, expert_ids, expert_weights, w["experts_up"], w["experts_down"], shared)


def time_conditioning(ops, cfg: TwoTowerConfig, w: dict, t):
    """adaLN-single (PixArt-alpha, spec §5.1): masked fraction t [B] -> modulation m [B, 3D]."""
    e = ops.timestep_embedding(t, cfg.time_embedding_dim)  # [B, 256]
    c = ops.linear(ops.silu(ops.linear(e, w["t_embed_in"], w["t_embed_in_bias"])), w["t_embed_out"], w["t_embed_out_bias"])
    return ops.linear(ops.silu(c), w["t_block"], w["t_block_bias"])  # [B, 3D]
