"""The generation loops: mask diffusion, mock-AR and AR (spec §7), one implementation for every
backend, written against the executor interface (``prefill``, ``extend``, ``denoise``).

The commit rule (``commit_step``) runs on the denoiser's device with tensor ops only: mask
exclusion, softmax, argmax or Gumbel-max, confidence, threshold, floor and top-k, batched with a
per-row masked count and timestep.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

MASK_LOGIT = -1e12  # the mask token can never be predicted (spec §7.1)


@dataclass
class BlockCommit:
    """What one row committed: its new token ids, and whether the row is done."""

    row: int
    token_ids: list[int]
    finished: bool


@dataclass
class RowOutput:
    tokens: list[int] = field(default_factory=list)
    steps: int = 0  # forwards that produced this row's tokens (denoiser steps, or decode steps in AR)
    finished: bool = False


def commit_step(x: torch.Tensor, logits: torch.Tensor, mask_id: int, step: int, steps: int,
                threshold: float, temperature: float, generators: list[torch.Generator] | None = None):
    """One mask-diffusion step for a batch of blocks (spec §7.1, per-row t and k, §7.2).

    x [B, L] block ids (mask_id where masked); logits [B, L, V] fp32 from the denoiser.
    Returns (new x [B, L], committed count [B]). Committed tokens never change. Among equal
    confidences the lower position commits first (stable sort). ``generators``: one per row, used
    only when temperature > 0 and only by rows that still have masked positions.
    """
    masked = x == mask_id  # [B, L]
    n = masked.sum(-1)  # [B]
    logits = logits.float().clone()
    logits[..., mask_id] = MASK_LOGIT
    probs = torch.softmax(logits, dim=-1)  # confidence always at temperature 1
    if temperature <= 0:
        pred = probs.argmax(-1)  # first maximal index on ties, as torch.argmax
    else:
        scores = torch.log_softmax(logits / temperature, dim=-1)
        noise = torch.empty_like(scores)
        for b, gen in enumerate(generators):
            if int(n[b]) > 0:  # a finished row draws nothing: its stream matches a row run alone
                noise[b].uniform_(generator=gen)
        pred = (scores - torch.log(-torch.log(noise.clamp_min(1e-10)))).argmax(-1)
    conf = probs.gather(-1, pred[..., None])[..., 0]  # [B, L]
    if step == steps - 1:
        k = n
    else:
        confident = ((conf > threshold) & masked).sum(-1)  # strict >
        floor = (n + (steps - step) - 1) // (steps - step)  # ceil(n / (T - s))
        k = torch.minimum(n, torch.maximum(confident.clamp_min(1), floor))
    # commit the k most confident masked positions; committed ones sort last, ties by position
    key = torch.where(masked, conf, torch.full_like(conf, float("-inf")))
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(x.shape[1], device=x.device).expand_as(order))
    commit = masked & (rank < k[:, None])
    return torch.where(commit, pred, x), k


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generators: list[torch.Generator]) -> torch.Tensor:
    """AR / mock-AR token choice (spec §7.4): greedy argmax, else softmax(logits / T) -> top_k ->
    top_p -> one draw per row from its own generator. logits [B, V] -> tokens [B]."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_k > 0:
        kth = torch.topk(probs, min(top_k, probs.shape[-1]), dim=-1).values[..., -1:]
        probs = torch.where(probs < kth, torch.zeros_like(probs), probs)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest prefix reaching top_p
        probs = probs.scatter(-1, order, torch.where(drop, torch.zeros_like(sorted_p), sorted_p))
    probs = probs / probs.sum(-1, keepdim=True)
    return torch.stack([torch.multinomial(probs[b], 1, generator=g)[0] for b, g in enumerate(generators)])


@dataclass(frozen=True)
class SamplerSettings:
    max_new_tokens: int
    block_size: int
    steps_per_block: int
    confidence_threshold: float
    temperature: float
    top_k: int
    top_p: float
    mask_token_id: int
    eos_token_id: int | None


OnCommit = Callable[[BlockCommit], None]


def _append(out: RowOutput, row: int, tokens: list[int], s: SamplerSettings, on_commit: OnCommit | None) -> None:
    """Add a row's new tokens, truncated at EOS (kept) and at max_new_tokens; report them."""
    room = s.max_new_tokens - len(out.tokens)
    kept = tokens[:room]
    if s.eos_token_id is not None and s.eos_token_id in kept:
        kept = kept[: kept.index(s.eos_token_id) + 1]
        out.finished = True
    out.tokens.extend(kept)
    if len(out.tokens) >= s.max_new_tokens:
        out.finished = True
    if on_commit is not None:
        on_commit(BlockCommit(row, kept, out.finished))


def generate_diffusion(executor, prompts: list[list[int]], s: SamplerSettings, generators, on_commit=None):
    """Block mask diffusion (spec §7.1): whole blocks until every row has max_new_tokens or an EOS."""
    B, L = len(prompts), s.block_size
    blocks = -(-s.max_new_tokens // L)
    state, _ = executor.prefill(prompts, capacity=max(map(len, prompts)) + blocks * L)
    outputs = [RowOutput() for _ in range(B)]
    active = list(range(B))  # original row of each state row
    for _ in range(blocks):
        x = torch.full((len(active), L), s.mask_token_id, dtype=torch.long, device=executor.denoiser_device)
        row_gens = [generators[r] for r in active]
        for step in range(s.steps_per_block):
            n = (x == s.mask_token_id).sum(-1)  # [B] masked per row
            masked_rows = n.tolist()  # the step's one host synchronisation
            if max(masked_rows) == 0:
                break
            logits = executor.denoise(state, x, n.float() / L)  # t = masked fraction per row
            for i, r in enumerate(active):
                outputs[r].steps += masked_rows[i] > 0
            x, _ = commit_step(x, logits, s.mask_token_id, step, s.steps_per_block, s.confidence_threshold,
                               s.temperature, row_gens)
        block = x.to(executor.context_device)
        for i, r in enumerate(active):
            _append(outputs[r], r, block[i].tolist(), s, on_commit)
        keep = [i for i, r in enumerate(active) if not outputs[r].finished]
        if not keep:
            break
        # the context tower consumes the whole block, EOS and all (spec §7.3)
        if len(keep) < len(active):
            state, block = executor.select(state, keep), block[keep]
            active = [active[i] for i in keep]
        _, state = executor.extend(state, block, logits=False)
    return outputs


def generate_ar(executor, prompts: list[list[int]], s: SamplerSettings, generators, on_commit=None):
    """The context tower alone, one token per forward (spec §7.4)."""
    state, logits = executor.prefill(prompts, capacity=max(map(len, prompts)) + s.max_new_tokens)
    return _token_loop(executor, state, logits, s, generators, on_commit, mock_ar=False)


def generate_mock_ar(executor, prompts: list[list[int]], s: SamplerSettings, generators, on_commit=None):
    """The denoiser as next-token head over the context (spec §7.5): it re-reads the last committed
    token from the context's state before that token, without time conditioning."""
    before, _ = executor.prefill([p[:-1] for p in prompts], capacity=max(map(len, prompts)) + s.max_new_tokens)
    last = torch.tensor([[p[-1]] for p in prompts], device=executor.context_device)
    _, state = executor.extend(before, last, logits=False)
    return _token_loop(executor, state, None, s, generators, on_commit, mock_ar=True, before=before, last=last)


def _token_loop(executor, state, logits, s: SamplerSettings, generators, on_commit, *, mock_ar: bool,
                before=None, last=None):
    B = state.batch
    outputs = [RowOutput() for _ in range(B)]
    active = list(range(B))
    for _ in range(s.max_new_tokens):
        if mock_ar:
            logits = executor.denoise(before, last.to(executor.denoiser_device), None)[:, -1]
        tokens = sample_next(logits, s.temperature, s.top_k, s.top_p, [generators[r] for r in active])
        token_list = tokens.tolist()
        for i, r in enumerate(active):
            outputs[r].steps += 1
            _append(outputs[r], r, [token_list[i]], s, on_commit)
        keep = [i for i, r in enumerate(active) if not outputs[r].finished]
        if not keep:
            break
        tokens = tokens.to(executor.context_device)[:, None]
        if len(keep) < len(active):
            state, tokens = executor.select(state, keep), tokens[keep]
            active = [active[i] for i in keep]
        before = state
        logits, state = executor.extend(state, tokens, logits=not mock_ar)
        logits = None if logits is None else logits[:, -1]
        last = tokens
    return outputs


MODES = {"diffusion": generate_diffusion, "mock-ar": generate_mock_ar, "ar": generate_ar}


def run(mode: str, executor, prompts, s: SamplerSettings, generators, on_commit=None):
    """Run a mode; returns (row outputs, seconds)."""
    start = time.perf_counter()
    outputs = MODES[mode](executor, prompts, s, generators, on_commit)
    return outputs, time.perf_counter() - start
