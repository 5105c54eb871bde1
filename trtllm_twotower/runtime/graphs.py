"""Steps replayed from CUDA graphs: the AR token, the block extend and the denoiser step, one launch each.

Eager, one forward of a 52-layer tower is thousands of kernel launches, each costing host time,
which at small batch is far above the step's memory floor. A ``StepGraph`` captures one forward of
fixed shapes over one batch's buffers and replays it:
- inputs (token ids, t, lengths) are copied into static buffers before each replay;
- the K/V caches are the batch's own (the context tower appends to them in place), so a graph
  serves exactly one batch composition: a row joining or leaving makes new buffers, and the
  executor captures again once the new batch has been seen twice (rows that keep coming and going
  run eagerly instead of capturing at every step);
- the Mamba conv and SSM states live in static buffers. Context-tower steps (``owns_state``: the AR
  token, the extend over a committed diffusion block) update them in place and hand them back as
  the new state, so a replay moves nothing else (the old state is then invalid: those callers keep
  none; mock-AR and speculative verification keep one, so they stay eager). The denoiser only reads
  them: they are copied in when the context state is a different tensor from the one copied last,
  or after a replayed context step of the same executor changed it in place.

Capture needs a step without host reads (``tests/test_host_reads.py``) and lengths on the device
(attention then never reads them back). ``capture=False`` runs the same plumbing eagerly; the CPU
tests check it against the plain forwards, the GPU tests check captured replays.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import replace
from typing import Callable

import torch

from ..devices import upload
from ..network import towers

log = logging.getLogger(__name__)

# forward(static state, ids [B, L], t [B] or None) -> (fp32 logits, new state or None)
Forward = Callable[[towers.TowerState, torch.Tensor, torch.Tensor | None], tuple]


def batch_signature(state: towers.TowerState, ids: torch.Tensor, t: torch.Tensor | None) -> tuple:
    """What identifies a step's batch: the input shape, whether t is given, and the K/V buffers
    (weakly held: an old batch is not kept alive by it)."""
    return tuple(ids.shape), t is None, tuple(weakref.ref(k) for k in state.keys.values())


def same_batch(signature: tuple, state: towers.TowerState, ids: torch.Tensor, t: torch.Tensor | None) -> bool:
    shape, no_t, keys = signature
    return (shape == tuple(ids.shape) and no_t == (t is None) and len(keys) == len(state.keys)
            and all(ref() is k for ref, k in zip(keys, state.keys.values())))


def run_then_capture(step: Callable[[], torch.Tensor | None], device: torch.device):
    """Run ``step`` once eagerly on a side stream (capture wants its warm-up off the capture stream),
    then record it into a CUDA graph on that stream, not executed. Returns (the eager run's output,
    cloned; the graph and its static output, or None and None; the error capture raised, or None)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        out = step()
        out = None if out is None else out.clone()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, stream=side):  # recorded, not executed: the step runs once
            static = step()
    except Exception as error:  # noqa: BLE001 - the caller decides what a failed capture means
        return out, None, None, error
    return out, graph, static, None


class StepGraph:
    """One forward of fixed shapes over one batch's state, from a CUDA graph (or run eagerly)."""

    def __init__(self, forward: Forward, state: towers.TowerState, ids: torch.Tensor, t: torch.Tensor | None,
                 device: torch.device, capture: bool, owns_state: bool):
        self.forward, self.device, self.capture, self.owns_state = forward, device, capture, owns_state
        self.signature = batch_signature(state, ids, t)  # the batch this graph serves
        own = (lambda d: dict(d)) if owns_state else (lambda d: {i: x.clone() for i, x in d.items()})  # noqa: E731
        self.conv, self.ssm = own(state.conv), own(state.ssm)
        # the tensor each static buffer was last filled from (weak: an old state is not kept alive);
        # a state whose tensors are the buffers themselves needs no copy at all
        self._sources: dict[str, dict] = {"conv": {}, "ssm": {}}
        self.ids = torch.zeros_like(ids, device=device)
        self.t = None if t is None else torch.zeros_like(t, dtype=torch.float32, device=device)
        self.lengths = torch.zeros(state.batch, dtype=torch.long, device=device)
        self.static_state = towers.TowerState(self.lengths, state.keys, state.values, self.conv, self.ssm)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self.capture_error: BaseException | None = None

    def serves(self, state: towers.TowerState, ids: torch.Tensor, t: torch.Tensor | None) -> bool:
        return same_batch(self.signature, state, ids, t)

    def _step(self) -> torch.Tensor:
        logits, new = self.forward(self.static_state, self.ids, self.t)
        if self.owns_state:
            for i in self.conv:
                self.conv[i].copy_(new.conv[i])
                self.ssm[i].copy_(new.ssm[i])
        return logits

    def _copy_in(self, name: str, buffers: dict, state_tensors: dict) -> None:
        sources = self._sources[name]
        for i, x in state_tensors.items():
            if x is not buffers[i] and (i not in sources or sources[i]() is not x):
                buffers[i].copy_(x)
                sources[i] = weakref.ref(x)

    def run(self, state: towers.TowerState, ids: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor | None:
        """The forward's fp32 logits (or None, for an extend without them) for ``ids`` (and ``t``) on
        top of ``state`` (this graph's batch)."""
        self._copy_in("conv", self.conv, state.conv)
        self._copy_in("ssm", self.ssm, state.ssm)
        self.ids.copy_(ids)
        if t is not None:
            self.t.copy_(t)
        self.lengths.copy_(upload(state.lengths, self.device))
        if not self.capture:
            return self._step()
        with torch.cuda.device(self.device):  # the side and capture streams on this graph's device
            if self.graph is not None:
                self.graph.replay()
                return None if self.logits is None else self.logits.clone()  # the next replay overwrites it
            # the first run executes eagerly, then is captured (the state advances once); if the
            # capture fails the step has still run, and this kind of step stays eager (GraphCache)
            logits, self.graph, self.logits, self.capture_error = run_then_capture(self._step, self.device)
            return logits

    def forget_copies(self) -> None:
        """Copy the state in again at the next run (its tensors were changed in place)."""
        self._sources = {"conv": {}, "ssm": {}}

    def advanced(self, state: towers.TowerState, tokens: int) -> towers.TowerState:
        """The state after an ``owns_state`` step: the static Mamba buffers, lengths + tokens."""
        return replace(state, lengths=state.lengths + tokens, conv=self.conv, ssm=self.ssm, trace=None)


class GraphCache:
    """The executor's graphs, one per kind of step, captured on the second sight of a batch. A kind
    whose capture fails once runs eagerly from then on (logged once, with the reason)."""

    def __init__(self, device: torch.device, capture: bool):
        self.device, self.capture = device, capture
        self._graphs: dict[str, StepGraph] = {}
        self._seen: dict[str, tuple] = {}  # kind -> the last batch run eagerly (weak K/V refs, shapes)
        self.failed: dict[str, BaseException] = {}  # kind -> why its capture failed

    def forget_copies(self) -> None:
        """A context state was changed in place (a replayed AR step): copy it in again."""
        for graph in self._graphs.values():
            graph.forget_copies()

    def get(self, kind: str, forward: Forward, state, ids, t, owns_state: bool) -> StepGraph | None:
        """The graph for this step, or None: run it eagerly (a batch seen for the first time)."""
        graph = self._graphs.get(kind)
        if graph is not None and graph.capture_error is not None:
            self.failed[kind] = graph.capture_error
            del self._graphs[kind]
            log.warning("CUDA graph capture of the %s step failed (%s): it runs eagerly from now on", kind,
                        graph.capture_error)
        if kind in self.failed:
            return None
        if graph is not None and graph.serves(state, ids, t):
            return graph
        self._graphs.pop(kind, None)  # another batch's graph: free its pool and the old buffers it holds now
        seen = self._seen.get(kind)
        # without attention layers no buffer identifies the batch: stay eager
        if seen is None or not same_batch(seen, state, ids, t) or not state.keys:
            self._seen[kind] = batch_signature(state, ids, t)
            return None
        self._graphs[kind] = StepGraph(forward, state, ids, t, self.device, self.capture, owns_state)
        return self._graphs[kind]
