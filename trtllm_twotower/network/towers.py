"""The two towers: the layer loop and the residuals, nothing else.

``forward_layers`` is the one loop both towers run. The context tower (``context_forward``) uses
causal attention, appends its K/V and returns its new Mamba states; the denoiser (``denoise``)
modulates each layer with adaLN-single, attends bidirectionally over the context's K/V plus its
own block, seeds its Mamba layers from the context's states, and returns no state.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..config import ATTENTION, MAMBA, MLP, MOE, TwoTowerConfig
from . import layers


@dataclass(frozen=True)
class TowerState:
    """Explicit per-row state of the context tower (spec §4), keyed by layer index.

    lengths: [B] int64 on the host, tokens held per row (the runtime knows them without a sync).
    keys/values: attention layer -> [B, S, K, P] buffers (S = capacity), valid in [0, lengths[b]).
    conv: Mamba layer -> [B, C, W] last W raw xBC columns, most recent last (compute dtype).
    ssm: Mamba layer -> [B, heads, P, N] fp32 state after the last token.
    K/V buffers are shared by successive states (appended in place past ``lengths``); conv/ssm
    tensors are replaced, never modified, so an older state stays valid for mock-AR.
    """

    lengths: torch.Tensor
    keys: dict
    values: dict
    conv: dict
    ssm: dict

    @property
    def batch(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def capacity(self) -> int:
        return next(iter(self.keys.values())).shape[1] if self.keys else 1 << 62


def empty_state(cfg: TwoTowerConfig, batch: int, capacity: int, dtype: torch.dtype, device) -> TowerState:
    """Zero state for ``batch`` rows with room for ``capacity`` tokens (a sequence start)."""
    kv_shape = (batch, capacity, cfg.num_key_value_heads, cfg.head_dim)
    attn, mamba = cfg.layers_of(ATTENTION), cfg.layers_of(MAMBA)
    return TowerState(
        lengths=torch.zeros(batch, dtype=torch.long),
        keys={i: torch.zeros(kv_shape, dtype=dtype, device=device) for i in attn},
        values={i: torch.zeros(kv_shape, dtype=dtype, device=device) for i in attn},
        conv={i: torch.zeros(batch, cfg.conv_dim, cfg.conv_kernel, dtype=dtype, device=device) for i in mamba},
        ssm={i: torch.zeros(batch, cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.ssm_state_size,
                            dtype=torch.float32, device=device) for i in mamba},
    )


def stack_states(states: list[TowerState], capacity: int) -> TowerState:
    """Batch single-row states of different lengths into one state with ``capacity`` slots."""
    lengths = torch.cat([s.lengths for s in states])
    keys, values = {}, {}
    for i in states[0].keys:
        keys[i] = states[0].keys[i].new_zeros((len(states), capacity, *states[0].keys[i].shape[2:]))
        values[i] = torch.zeros_like(keys[i])
        for b, s in enumerate(states):
            n = int(s.lengths[0])
            keys[i][b, :n] = s.keys[i][0, :n]
            values[i][b, :n] = s.values[i][0, :n]
    return TowerState(
        lengths=lengths, keys=keys, values=values,
        conv={i: torch.cat([s.conv[i] for s in states]) for i in states[0].conv},
        ssm={i: torch.cat([s.ssm[i] for s in states]) for i in states[0].ssm},
    )


def select_rows(state: TowerState, rows: list[int]) -> TowerState:
    """A state holding only ``rows`` (copies; used when rows finish at different times)."""
    index = torch.tensor(rows, dtype=torch.long)
    pick = lambda d: {i: t[index.to(t.device)] for i, t in d.items()}  # noqa: E731
    return TowerState(lengths=state.lengths[index], keys=pick(state.keys), values=pick(state.values),
                      conv=pick(state.conv), ssm=pick(state.ssm))


def forward_layers(ops, cfg: TwoTowerConfig, w: dict, ids, state: TowerState, *, causal: bool,
                   commit: bool, modulation=None):
    """Run every layer over ``ids`` [B, L] on top of ``state``.

    commit=True (context tower): K/V appended, new Mamba states returned as a new TowerState.
    commit=False (denoiser, mock-AR head): ``state`` is only read; returns None for the state.
    modulation: [B, 3D] adaLN-single output, or None for a plain NemotronH pass.
    Returns (hidden [B, L, D] after the final norm, new state or None)."""
    L = ids.shape[1]
    if commit and int(state.lengths.max()) + L > state.capacity:
        raise ValueError(f"cache capacity {state.capacity} exceeded: {int(state.lengths.max())} + {L} tokens")
    eps = cfg.layer_norm_epsilon
    x = ops.embedding(w["embeddings"], ids)  # [B, L, D]
    conv, ssm = dict(state.conv), dict(state.ssm)
    for i, kind in enumerate(cfg.layer_pattern):
        lw = w["layers"][i]
        # pre-norm; with modulation: modulate THEN norm for M and *, norm THEN modulate for E and -
        if modulation is None:
            h = ops.rms_norm(x, lw["norm"], eps)
        else:
            shift, scale, gate = layers.layer_modulation(ops, cfg, w["scale_shift"][i], modulation)
            if kind in (MAMBA, ATTENTION):
                h = ops.rms_norm(ops.modulate(x, shift, scale), lw["norm"], eps)
            else:
                h = ops.modulate(ops.rms_norm(x, lw["norm"], eps), shift, scale)
        # mixer
        if kind == MAMBA:
            h, new_conv, new_ssm = layers.mamba2(ops, cfg, lw, h, state.conv[i], state.ssm[i])
            if commit:
                conv[i], ssm[i] = new_conv, new_ssm
        elif kind == ATTENTION:
            h = layers.attention(ops, cfg, lw, h, state.keys[i], state.values[i], state.lengths,
                                 causal=causal, write_cache=commit)
        elif kind == MOE:
            h = layers.moe(ops, cfg, lw, h)
        elif kind == MLP:
            h = layers.relu2_mlp(ops, lw["up_proj"], lw["down_proj"], h)
        # residual (the denoiser gates the mixer output first)
        x = ops.add(x, h if modulation is None else ops.mul(gate, h))
    x = ops.rms_norm(x, w["norm_f"], eps)
    new_state = replace(state, lengths=state.lengths + L, conv=conv, ssm=ssm) if commit else None
    return x, new_state


def context_forward(ops, cfg: TwoTowerConfig, w: dict, state: TowerState, ids, *, logits: bool = True):
    """Context tower prefill / extend / single-token decode: one code path for every length.

    ids [B, L] on top of ``state`` -> (fp32 logits [B, L, V] from ``context_lm_head`` or None, new state)."""
    hidden, new_state = forward_layers(ops, cfg, w, ids, state, causal=True, commit=True)
    return (ops.logits(hidden, w["lm_head"]) if logits else None), new_state


def denoise(ops, cfg: TwoTowerConfig, w: dict, ctx_state: TowerState, block_ids, t=None):
    """One denoiser forward over a block (spec §5.2): block_ids [B, L] with mask ids, t [B] the
    masked fraction per row -> fp32 logits [B, L, V] from the denoiser head. ``ctx_state`` is read,
    never written. t=None runs the denoiser weights without time conditioning (mock-AR, spec §7.5)."""
    modulation = None if t is None else layers.time_conditioning(ops, cfg, w, t)
    hidden, _ = forward_layers(ops, cfg, w, block_ids, ctx_state, causal=False, commit=False, modulation=modulation)
    return ops.logits(hidden, w["lm_head"])
