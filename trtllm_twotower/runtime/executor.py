"""The torch executor: the towers on their devices behind the sampler's interface.

``prefill`` / ``extend`` run the context tower on ``context_device`` and return its state;
``denoise`` runs the denoiser on ``denoiser_device`` over a read-only view of that state. With two
devices a ``StateMirror`` keeps a copy of the context state on the denoiser's device and moves only
what changed since the last block: the new K/V positions and the Mamba states.
"""

from __future__ import annotations

import os

import torch

from ..devices import upload
from ..network import towers
from ..network.ops import TorchOps
from .graphs import GraphCache
from .prefix_cache import PAGE_TOKENS, prefill_rows


class StateMirror:
    """The context state's copy on another device, updated incrementally."""

    def __init__(self, device: torch.device):
        self.device = device
        self._mirror: towers.TowerState | None = None
        self._source: towers.TowerState | None = None  # held, so identity comparison is sound

    def update(self, state: towers.TowerState) -> towers.TowerState:
        if self._source is state:
            return self._mirror
        old = self._mirror
        if old is None or old.batch != state.batch or old.capacity != state.capacity or bool((state.lengths < old.lengths).any()):
            # a new sequence: copy everything (owned buffers: later updates write into them)
            keys = {i: k.to(self.device, copy=True) for i, k in state.keys.items()}
            values = {i: v.to(self.device, copy=True) for i, v in state.values.items()}
        else:
            keys, values = old.keys, old.values
            for b in range(state.batch):  # only the positions appended since the last update
                lo, hi = int(old.lengths[b]), int(state.lengths[b])
                for i in keys:
                    keys[i][b, lo:hi].copy_(state.keys[i][b, lo:hi], non_blocking=True)
                    values[i][b, lo:hi].copy_(state.values[i][b, lo:hi], non_blocking=True)
        self._mirror = towers.TowerState(
            lengths=state.lengths.clone(), keys=keys, values=values,
            conv={i: c.to(self.device, non_blocking=True) for i, c in state.conv.items()},
            ssm={i: s.to(self.device, non_blocking=True) for i, s in state.ssm.items()},
        )
        self._source = state
        return self._mirror


def check_capacity(state, new_tokens: int) -> None:
    """The runtime owns the host-side lengths: it, not the network, refuses to write past a cache."""
    longest = int(state.lengths.max())
    if longest + new_tokens > state.capacity:
        raise ValueError(f"cache capacity {state.capacity} exceeded: {longest} + {new_tokens} tokens")


class RowStates:
    """The executors' bookkeeping of row states, the same for every backend (``network.towers``)."""

    @torch.inference_mode()
    def select(self, state, rows: list[int]):
        return towers.select_rows(state, rows)

    @torch.inference_mode()
    def concat(self, states: list, capacity: int):
        return towers.concat_states(states, capacity)

    @torch.inference_mode()
    def merge(self, state, rows: list[int], sub):
        """Write back the rows ``select(state, rows)`` became after an extend."""
        return towers.merge_rows(state, rows, sub)

    @torch.inference_mode()
    def rollback(self, state, keep: torch.Tensor):
        """The state after only the first keep[b] tokens of the traced extend that made ``state``."""
        return towers.rollback(state, keep)


GRAPH_MODES = ("off", "on", "emulate")


class TorchExecutor(RowStates):
    """Eager torch towers. ``den_weights`` may be None (a Nano checkpoint: AR mode only).

    ``graphs`` (default: $TWOTOWER_CUDA_GRAPHS, else "off"): "on" replays the AR step, the block
    extend and the denoiser step from CUDA graphs on CUDA devices in bfloat16 (``runtime/graphs.py``; off until
    verified on a GPU); "emulate" runs the graphs' static-buffer plumbing without capture (tests,
    any device). ``page_tokens``: the prefill's piece length, the prefix cache's page (see
    ``runtime/prefix_cache.py``)."""

    modes = ("diffusion", "speculative", "mock-ar", "ar")

    def __init__(self, cfg, ctx_weights: dict, den_weights: dict | None, dtype: torch.dtype,
                 context_device: torch.device, denoiser_device: torch.device, graphs: str | None = None,
                 page_tokens: int = PAGE_TOKENS):
        graphs = graphs or os.environ.get("TWOTOWER_CUDA_GRAPHS", "off")
        if graphs not in GRAPH_MODES:
            raise ValueError(f"graphs: expected one of {', '.join(GRAPH_MODES)}, got {graphs!r} "
                             f"(from TWOTOWER_CUDA_GRAPHS?)")
        self.graphs = graphs
        self.page_tokens = page_tokens
        self.cfg = cfg
        self.dtype = dtype
        self.context_device = context_device
        self.denoiser_device = denoiser_device
        self.ctx_weights = ctx_weights
        self.den_weights = den_weights
        self.ctx_ops = TorchOps(dtype, context_device)
        self.den_ops = TorchOps(dtype, denoiser_device)
        self._mirror = StateMirror(denoiser_device) if denoiser_device != context_device else None
        self._ctx_graphs = self._graph_cache(self.ctx_ops)
        self._den_graphs = self._graph_cache(self.den_ops)

    def _graph_cache(self, ops: TorchOps) -> GraphCache | None:
        if self.graphs == "emulate":
            return GraphCache(ops.device, capture=False)
        # capture needs experts that read nothing back: the Triton kernels, or the grouped GEMMs (bf16
        # on CUDA); the spec's expert loop reads the routed ids back to the host
        if self.graphs == "on" and ops.device.type == "cuda" and (ops.kernels or ops.grouped_experts):
            return GraphCache(ops.device, capture=True)
        return None

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], capacity: int, pages=None):
        """Each row alone (prompts differ in length), in pieces that end at page boundaries
        (``prefix_cache.prefill_in_pages``, cache on or off), then one batched state. ``pages``
        (``prefix_cache.BatchPages``): each row resumes from its cached prefix, and its new pages
        are cached. Returns (state, fp32 logits of each row's last prompt token [B, V] or None
        when a prompt is empty)."""
        return prefill_rows(prompts, capacity, pages,
                            lambda: towers.empty_state(self.cfg, 1, capacity, self.dtype, self.context_device),
                            self._prefill_piece, self.page_tokens)

    def _prefill_piece(self, state, ids: list[int], logits: bool):
        hidden, state = towers.forward_layers(self.ctx_ops, self.cfg, self.ctx_weights,
                                              upload([ids], self.context_device), state,
                                              causal=True, commit=True)
        return (self.ctx_ops.logits(hidden[:, -1], self.ctx_weights["lm_head"]) if logits else None), state

    @torch.inference_mode()
    def extend(self, state, tokens: torch.Tensor, logits: bool, trace: bool = False, in_place: bool = False):
        """tokens [B, L] -> (fp32 logits [B, L, V] or None, new state). ``trace``: the new state
        carries the Mamba states after every position, for ``rollback``. ``in_place``: the caller
        keeps no older state, so with graphs on the step may be replayed from a CUDA graph that
        updates the Mamba states in place (``state`` is not valid afterwards): the AR step, the
        extend over a committed diffusion block."""
        check_capacity(state, tokens.shape[1])
        graph = None
        if in_place and not trace and self._ctx_graphs is not None:
            kind = f"extend{tokens.shape[1]}" + ("_logits" if logits else "")
            graph = self._ctx_graphs.get(kind, self._extend_forward(logits), state, tokens, None, owns_state=True)
        if graph is None:
            return towers.context_forward(self.ctx_ops, self.cfg, self.ctx_weights, state, tokens, logits=logits,
                                          trace=trace)
        out = graph.run(state, tokens, None)
        if self._den_graphs is not None:  # the Mamba states just changed in place
            self._den_graphs.forget_copies()
        return out, graph.advanced(state, tokens.shape[1])

    def _extend_forward(self, logits: bool):
        return lambda state, tokens, t: towers.context_forward(self.ctx_ops, self.cfg, self.ctx_weights, state,
                                                               tokens, logits=logits)

    @torch.inference_mode()
    def denoise(self, state, block: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
        """block [B, L], t [B] (None: mock-AR, no time conditioning) -> fp32 logits [B, L, V]."""
        if self._mirror is not None:
            state = self._mirror.update(state)
        graph = None if self._den_graphs is None else self._den_graphs.get(
            "denoise", self._denoise_forward, state, block, t, owns_state=False)
        if graph is None:
            return towers.denoise(self.den_ops, self.cfg, self.den_weights, state, block, t)
        return graph.run(state, block, t)

    def _denoise_forward(self, state, block, t):
        return towers.denoise(self.den_ops, self.cfg, self.den_weights, state, block, t), None

