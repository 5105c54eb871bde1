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
from ..devices import upload
from . import layers


@dataclass(frozen=True)
class ExtendTrace:
    """The Mamba states after every position of the last extend (speculative mode), keyed by layer.

    conv: [B, L + 1, C, W]; ssm: [B, L + 1, heads, P, N] fp32. Index j = the state after the first
    j tokens of the extend (0 = before it, L = the state the extend returned)."""

    length: int  # L, tokens in the extend
    conv: dict
    ssm: dict


@dataclass(frozen=True)
class TowerState:
    """Explicit per-row state of the context tower (spec §4), keyed by layer index.

    lengths: [B] int64 on the host, tokens held per row (the runtime knows them without a sync).
    keys/values: attention layer -> [B, S, K, P] buffers (S = capacity), valid in [0, lengths[b]).
    conv: Mamba layer -> [B, C, W] last W raw xBC columns, most recent last (compute dtype).
    ssm: Mamba layer -> [B, heads, P, N] fp32 state after the last token.
    trace: the per-position states of the extend that made this state, when it was asked for.
    K/V buffers are shared by successive states (appended in place past ``lengths``); conv/ssm
    tensors are replaced, never modified, so an older state stays valid for mock-AR.
    """

    lengths: torch.Tensor
    keys: dict
    values: dict
    conv: dict
    ssm: dict
    trace: ExtendTrace | None = None

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


def concat_states(states: list[TowerState], capacity: int) -> TowerState:
    """The rows of several states (each of any batch and length) in one state with ``capacity``
    slots per row; each row's K/V is copied up to its length."""
    lengths = torch.cat([s.lengths for s in states])
    if int(lengths.max()) > capacity:
        raise ValueError(f"concat_states: a row holds {int(lengths.max())} tokens, more than the capacity {capacity}")
    keys, values = {}, {}
    for i, first in states[0].keys.items():
        keys[i] = first.new_zeros((len(lengths), capacity, *first.shape[2:]))
        values[i] = torch.zeros_like(keys[i])
        row = 0
        for s in states:
            for b in range(s.batch):
                n = int(s.lengths[b])
                keys[i][row, :n] = s.keys[i][b, :n]
                values[i][row, :n] = s.values[i][b, :n]
                row += 1
    return TowerState(
        lengths=lengths, keys=keys, values=values,
        conv={i: torch.cat([s.conv[i] for s in states]) for i in states[0].conv},
        ssm={i: torch.cat([s.ssm[i] for s in states]) for i in states[0].ssm},
    )


def _per_device(make):
    """``make(device)``, computed once per device (row indices uploaded once, not once per layer)."""
    cache = {}

    def get(device):
        if device not in cache:
            cache[device] = make(device)
        return cache[device]
    return get


def select_rows(state: TowerState, rows: list[int]) -> TowerState:
    """A state holding only ``rows`` (copies; used when rows finish at different times)."""
    index = torch.tensor(rows, dtype=torch.long)
    on_device = _per_device(lambda device: upload(index, device))
    pick = lambda d: {i: t[on_device(t.device)] for i, t in d.items()}  # noqa: E731
    return TowerState(lengths=state.lengths[index], keys=pick(state.keys), values=pick(state.values),
                      conv=pick(state.conv), ssm=pick(state.ssm))


def merge_rows(state: TowerState, rows: list[int], sub: TowerState) -> TowerState:
    """Write back ``sub`` (``select_rows(state, rows)``, since extended): the K/V of its new
    positions into ``state``'s shared buffers, its Mamba states and lengths in place of theirs."""
    index = torch.tensor(rows, dtype=torch.long)
    for j, r in enumerate(rows):
        lo, hi = int(state.lengths[r]), int(sub.lengths[j])
        for i in state.keys:
            state.keys[i][r, lo:hi] = sub.keys[i][j, lo:hi]
            state.values[i][r, lo:hi] = sub.values[i][j, lo:hi]
    lengths = state.lengths.clone()
    lengths[index] = sub.lengths
    on_device = _per_device(lambda device: upload(index, device))
    put = lambda old, new: {i: t.index_copy(0, on_device(t.device), new[i]) for i, t in old.items()}  # noqa: E731
    return TowerState(lengths=lengths, keys=state.keys, values=state.values, conv=put(state.conv, sub.conv),
                      ssm=put(state.ssm, sub.ssm))


def rollback(state: TowerState, keep: torch.Tensor) -> TowerState:
    """The state after only the first ``keep[b]`` tokens of the extend that made ``state`` (which
    must carry its trace): K/V by length (later slots are overwritten by the next extend), the
    Mamba states picked from the per-position states of that same extend, not recomputed.
    keep [B] int64 on the host, each in [0, L]."""
    trace = state.trace
    if trace is None:
        raise ValueError("rollback: the state carries no per-position trace (extend with trace=True)")
    if bool(((keep < 0) | (keep > trace.length)).any()):
        raise ValueError(f"rollback: keep {keep.tolist()} outside [0, {trace.length}]")
    rows = torch.arange(state.batch)
    on_device = _per_device(lambda device: (upload(rows, device), upload(keep, device)))
    pick = lambda d: {i: t[on_device(t.device)] for i, t in d.items()}  # noqa: E731
    return TowerState(lengths=state.lengths - trace.length + keep, keys=state.keys, values=state.values,
                      conv=pick(trace.conv), ssm=pick(trace.ssm))


def committed(state: TowerState, tokens: int, new_keys: dict, new_values: dict, conv: dict, ssm: dict,
              trace: ExtendTrace | None = None) -> TowerState:
    """The state after an extend of ``tokens`` tokens computed by an engine or graph that outputs the
    chunk's K/V (layer -> [B, L, K, P]) instead of writing them: they are appended to ``state``'s
    buffers here, at each row's length; ``conv`` / ``ssm`` are the new Mamba states."""
    for i in state.keys:
        device = state.keys[i].device
        rows = torch.arange(state.batch, device=device)[:, None]
        slots = upload(state.lengths, device)[:, None] + torch.arange(tokens, device=device)  # [B, L]
        state.keys[i][rows, slots] = new_keys[i]
        state.values[i][rows, slots] = new_values[i]
    return TowerState(lengths=state.lengths + tokens, keys=state.keys, values=state.values, conv=conv, ssm=ssm,
                      trace=trace)


def forward_layers(ops, cfg: TwoTowerConfig, w: dict, ids, state: TowerState, *, causal: bool,
                   commit: bool, modulation=None, trace: bool = False):
    """Run every layer over ``ids`` [B, L] on top of ``state``.

    commit=True (context tower): K/V appended, new Mamba states returned as a new TowerState
    (with ``trace``, carrying the Mamba states after every position: see ``rollback``).
    commit=False (denoiser, mock-AR head): ``state`` is only read; returns None for the state.
    modulation: [B, 3D] adaLN-single output, or None for a plain NemotronH pass.
    Returns (hidden [B, L, D] after the final norm, new state or None)."""
    eps = cfg.layer_norm_epsilon
    x = ops.embedding(w["embeddings"], ids)  # [B, L, D]
    conv, ssm = dict(state.conv), dict(state.ssm)
    conv_steps, ssm_steps = {}, {}
    for i, kind in enumerate(cfg.layer_pattern):
        lw = w["layers"][i]
        # pre-norm; with modulation: modulate THEN norm for M and *, norm THEN modulate for E and -
        if modulation is None:
            h = ops.rms_norm(x, lw["norm"], eps)
        else:
            h = ops.modulated_rms_norm(x, lw["norm"], eps, w["scale_shift"][i], modulation,
                                       modulate_first=kind in (MAMBA, ATTENTION))
        # mixer
        if kind == MAMBA:
            h, new_conv, new_ssm, steps = layers.mamba2(ops, cfg, lw, h, state.conv[i], state.ssm[i],
                                                        per_position=commit and trace)
            if commit:
                conv[i], ssm[i] = new_conv, new_ssm
            if steps is not None:  # index j = after the first j tokens (0 = before the extend)
                conv_steps[i], ssm_steps[i] = steps
        elif kind == ATTENTION:
            h = layers.attention(ops, cfg, lw, h, state.keys[i], state.values[i], state.lengths,
                                 causal=causal, write_cache=commit)
        elif kind == MOE:
            h = layers.moe(ops, cfg, lw, h)
        elif kind == MLP:
            h = layers.relu2_mlp(ops, lw["up_proj"], lw["down_proj"], h)
        # residual (the denoiser gates the mixer output first)
        x = ops.add(x, h) if modulation is None else ops.gated_residual(x, h, w["scale_shift"][i], modulation)
    x = ops.rms_norm(x, w["norm_f"], eps)
    if not commit:
        return x, None
    steps = ExtendTrace(ids.shape[1], conv_steps, ssm_steps) if trace else None
    return x, replace(state, lengths=state.lengths + ids.shape[1], conv=conv, ssm=ssm, trace=steps)


def context_forward(ops, cfg: TwoTowerConfig, w: dict, state: TowerState, ids, *, logits: bool = True,
                    trace: bool = False):
    """Context tower prefill / extend / single-token decode: one code path for every length.

    ids [B, L] on top of ``state`` -> (fp32 logits [B, L, V] from ``context_lm_head`` or None, new state;
    with ``trace`` the new state carries the per-position Mamba states, see ``rollback``)."""
    hidden, new_state = forward_layers(ops, cfg, w, ids, state, causal=True, commit=True, trace=trace)
    return (ops.logits(hidden, w["lm_head"]) if logits else None), new_state


def denoise(ops, cfg: TwoTowerConfig, w: dict, ctx_state: TowerState, block_ids, t=None):
    """One denoiser forward over a block (spec §5.2): block_ids [B, L] with mask ids, t [B] the
    masked fraction per row -> fp32 logits [B, L, V] from the denoiser head. ``ctx_state`` is read,
    never written. t=None runs the denoiser weights without time conditioning (mock-AR, spec §7.5)."""
    modulation = None if t is None else layers.time_conditioning(ops, cfg, w, t)
    hidden, _ = forward_layers(ops, cfg, w, block_ids, ctx_state, causal=False, commit=False, modulation=modulation)
    return ops.logits(hidden, w["lm_head"])
