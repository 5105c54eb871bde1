"""The AR step as one CUDA graph: the context tower's one-token forward replayed in one launch.

Eager, one token of a 52-layer tower is thousands of kernel launches, each costing host time,
which at small batch is far above the step's memory floor. ``DecodeGraph`` captures the step once
for a batch over that batch's own buffers and replays it for every token:
- inputs (tokens [B, 1], lengths [B]) are copied into static buffers before each replay;
- the K/V caches are the batch's own (attention appends the new token in place);
- the Mamba conv and SSM states live in static buffers that the graph updates in place, so a
  replay moves nothing else. The state a step returns therefore changes with the next step: only
  for callers that keep no older state (the AR lane; mock-AR keeps one, so it stays eager).
A new batch composition (a row joins or leaves: new state tensors) needs a new capture.

Capture needs a step without host reads (``tests/test_host_reads.py``) and lengths on the device
(attention then never reads them back). ``capture=False`` runs the same plumbing eagerly (the CPU
tests check it against the plain extend; the GPU tests check the captured graph).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..devices import upload
from ..network import towers


class DecodeGraph:
    """One-token context steps of one batch, replayed from a CUDA graph (or run eagerly)."""

    def __init__(self, ops, cfg, weights: dict, state: towers.TowerState, capture: bool):
        self.ops, self.cfg, self.weights = ops, cfg, weights
        self.device = ops.device
        self.capture = capture
        self.keys = state.keys  # the batch's K/V buffers: identify the batch this graph serves
        self.conv = dict(state.conv)  # the state's own buffers become the static ones, updated in place
        self.ssm = dict(state.ssm)
        self.tokens = torch.zeros(state.batch, 1, dtype=torch.long, device=self.device)
        self.lengths = torch.zeros(state.batch, dtype=torch.long, device=self.device)
        self.static_state = towers.TowerState(self.lengths, state.keys, state.values, self.conv, self.ssm)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    def serves(self, state: towers.TowerState) -> bool:
        """Whether ``state`` is this graph's batch (the same K/V buffers)."""
        return (state.batch == self.tokens.shape[0] and state.keys.keys() == self.keys.keys()
                and all(state.keys[i] is self.keys[i] for i in self.keys))

    def _step(self) -> torch.Tensor:
        logits, new = towers.context_forward(self.ops, self.cfg, self.weights, self.static_state, self.tokens)
        for i in self.conv:
            self.conv[i].copy_(new.conv[i])
            self.ssm[i].copy_(new.ssm[i])
        return logits

    def run(self, state: towers.TowerState, tokens: torch.Tensor):
        """tokens [B, 1] on top of ``state`` (this graph's batch) -> (fp32 logits [B, 1, V], new state)."""
        for i in self.conv:  # a state from elsewhere (the prefill, an eager step) is copied in once
            if state.conv[i] is not self.conv[i]:
                self.conv[i].copy_(state.conv[i])
            if state.ssm[i] is not self.ssm[i]:
                self.ssm[i].copy_(state.ssm[i])
        self.tokens.copy_(tokens)
        self.lengths.copy_(upload(state.lengths, self.device))
        if not self.capture:
            logits = self._step()
        elif self.graph is None:  # the first step runs eagerly (on a side stream, as capture asks), then is captured
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                logits = self._step().clone()
            torch.cuda.current_stream(self.device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):  # recorded, not executed: the state is not advanced twice
                self.logits = self._step()
        else:
            self.graph.replay()
            logits = self.logits.clone()  # the next replay overwrites the static output
        return logits, replace(state, lengths=state.lengths + 1, conv=self.conv, ssm=self.ssm, trace=None)
