"""The generation loops, one "lane" per kind of forward, over a running batch of rows.

A lane owns the context state of its rows (one ``TowerState``, each row at its own position) and
advances every row by one unit per call: a block (diffusion: the denoiser's steps, then the
context extend; speculative: a drafted block verified by the context extend) or a token (AR,
mock-AR). Rows join between units (``admit``: prefilled alone, then concatenated) and leave as
soon as they finish or are cancelled. Each row keeps its own settings and generators, so its
tokens do not depend on which other rows share the lane (spec §7.2; the scheduler's tests check it).

Modes (spec §7): diffusion (§7.1), speculative (the exact AR output from drafted blocks), AR
(§7.4), mock-AR (§7.5).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from . import sampler
from .sampler import SamplerSettings

MODES = ("diffusion", "speculative", "mock-ar", "ar")
# Speculative drafts commit by the probability of the most likely token, which does not depend on
# the draw, so a committed draft's law is the distribution it was drawn from (sampler.verify_draft).
DRAFT_CONFIDENCE = "argmax"


@dataclass
class RowOutput:
    tokens: list[int] = field(default_factory=list)
    steps: int = 0  # forwards that produced this row's tokens (denoiser steps in diffusion; see ``nfe``)
    denoiser_forwards: int = 0
    context_forwards: int = 0  # the prefill included
    finished: bool = False
    cancelled: bool = False
    accepted: list[int] = field(default_factory=list)  # speculative: drafts accepted per block
    attempts_by_position: list[int] = field(default_factory=list)  # speculative: drafts judged at 1 .. L-1
    accepts_by_position: list[int] = field(default_factory=list)


@dataclass(eq=False)
class Row:
    """One sequence being generated. ``emit(row, new_tokens)`` is called after each unit that
    changed it (the tokens may be empty when the row was cancelled); ``row.out.finished`` then says
    whether it was the last call. ``fail(error)`` reports a failed forward."""

    mode: str
    prompt: list[int]
    settings: SamplerSettings
    seed: int
    emit: Callable[["Row", list[int]], None]
    fail: Callable[[BaseException], None]
    index: int = 0  # its place in its request
    out: RowOutput = field(default_factory=RowOutput)
    cancelled: bool = False
    draft_gen: torch.Generator | None = None  # draws on the denoiser's device (diffusion, mock-AR)
    ar_gen: torch.Generator | None = None  # draws on the context device (AR, speculative verification)

    @property
    def tokens_needed(self) -> int:
        """Cache slots this row needs: its prompt, its output and what a unit writes past it."""
        s = self.settings
        if self.mode == "diffusion":
            return len(self.prompt) + -(-s.max_new_tokens // s.block_size) * s.block_size
        if self.mode == "speculative":
            return len(self.prompt) + s.max_new_tokens + s.block_size
        return len(self.prompt) + s.max_new_tokens


def verify_seed(seed: int) -> int:
    """A second, independent stream for speculative verification (never the drafts' own)."""
    return (seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) % (1 << 63)


def append_tokens(row: Row, tokens: list[int]) -> list[int]:
    """Add a row's new tokens, truncated at EOS (kept) and at max_new_tokens; returns those kept."""
    s = row.settings
    kept = tokens[: s.max_new_tokens - len(row.out.tokens)]
    if s.eos_token_id is not None and s.eos_token_id in kept:
        kept = kept[: kept.index(s.eos_token_id) + 1]
        row.out.finished = True
    row.out.tokens.extend(kept)
    if len(row.out.tokens) >= s.max_new_tokens:
        row.out.finished = True
    return kept


class Lane:
    """Rows that run one kind of forward together (one mode, one block size, one mask id)."""

    def __init__(self, executor, key: tuple):
        self.executor = executor
        self.key = key
        self.rows: list[Row] = []
        self.state = None
        self.capacity = 0

    def __len__(self) -> int:
        return len(self.rows)

    # ---- membership -----------------------------------------------------------------------------
    def admit(self, rows: list[Row]) -> None:
        """Prefill new rows and add them to the running batch (they run from the next unit on)."""
        ex = self.executor
        for r in rows:
            r.draft_gen = torch.Generator(device=ex.denoiser_device).manual_seed(r.seed)
            r.ar_gen = torch.Generator(device=ex.context_device).manual_seed(
                verify_seed(r.seed) if r.mode == "speculative" else r.seed)
        capacity = max([self.capacity] + [r.tokens_needed for r in rows])
        parts = self._prefill(rows, capacity)
        if self.rows:
            parts = {name: self._join(name, getattr(self, name), part, capacity) for name, part in parts.items()}
        for name, value in parts.items():
            setattr(self, name, value)
        self.rows += rows
        self.capacity = capacity
        for r in rows:
            r.out.context_forwards += 1
        self._after_admit(rows)

    def _join(self, name: str, old, new, capacity):
        if isinstance(old, torch.Tensor):
            return torch.cat([old, new.to(old.device)])
        return self.executor.concat([old, new], capacity)

    def _prefill(self, rows: list[Row], capacity: int) -> dict:
        state, _ = self.executor.prefill([r.prompt for r in rows], capacity)
        return {"state": state}

    def _after_admit(self, rows: list[Row]) -> None:
        """Hook: emit what admission already decided (speculative's first token may end a row)."""

    def remove_cancelled(self) -> None:
        cancelled = [r for r in self.rows if r.cancelled]
        if cancelled:
            for r in cancelled:
                r.out.cancelled = r.out.finished = True
                r.emit(r, [])
            self._keep([i for i, r in enumerate(self.rows) if not r.cancelled])

    def _keep(self, keep: list[int]) -> None:
        """Keep only the rows at ``keep`` (finished and cancelled rows leave at once)."""
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self._reset()
            return
        for name, value in self._batched().items():
            if isinstance(value, torch.Tensor):
                setattr(self, name, value[torch.tensor(keep, device=value.device)])
            else:
                setattr(self, name, self.executor.select(value, keep))

    def _batched(self) -> dict:
        return {"state": self.state}

    def _reset(self) -> None:
        self.state, self.capacity = None, 0

    def _settings(self, name: str) -> list:
        return [getattr(r.settings, name) for r in self.rows]

    # ---- one unit of generation ---------------------------------------------------------------------
    def advance(self) -> None:
        raise NotImplementedError

    def _emit(self, tokens_per_row: list[list[int]]) -> list[int]:
        """Append and report each row's new tokens; returns the indices of the rows that go on."""
        for r, tokens in zip(self.rows, tokens_per_row):
            r.emit(r, append_tokens(r, tokens))
        return [i for i, r in enumerate(self.rows) if not r.out.finished]

    def fill_block(self, x: torch.Tensor, given: int = 0, *, confidence: str = "sampled", record: bool = False):
        """The denoiser's steps over blocks x [B, L] on the context state (positions ``given`` .. L-1
        open, filled with the mask id), per row with its own step budget, threshold and temperature
        (spec §7.1). Returns the filled blocks and, with ``record``, the step that committed each
        position ([B, L], -1 = given) and the distribution each committed position was drawn from
        ([B, L, V], or None if all rows are greedy)."""
        ex, rows = self.executor, self.rows
        B, L = x.shape
        mask_id = rows[0].settings.mask_token_id
        steps, thresholds, temps = self._settings("steps_per_block"), self._settings("confidence_threshold"), \
            self._settings("temperature")
        gens = [r.draft_gen for r in rows]
        open_ = torch.ones(B, L, dtype=torch.bool, device=x.device)
        open_[:, :given] = False
        committed_at = torch.full((B, L), -1, dtype=torch.long, device=x.device)
        draft_probs = None
        for step in range(max(steps)):
            n = open_.sum(-1)  # [B] open positions per row
            open_rows = n.tolist()  # the step's one host synchronisation
            if max(open_rows) == 0:
                break
            logits = ex.denoise(self.state, x, n.float() / L)  # t = masked fraction per row
            for r, m in zip(rows, open_rows):
                if m > 0:
                    r.out.steps += 1
                    r.out.denoiser_forwards += 1
            new_x, _, probs = sampler.commit_step(x, logits, mask_id, step, steps, thresholds, temps, gens,
                                                  confidence=confidence, return_probs=True, masked=open_)
            newly = open_ & (new_x != mask_id)  # the denoiser never predicts the mask id
            if record:
                committed_at[newly] = step
                if probs is not None:
                    draft_probs = torch.zeros_like(probs) if draft_probs is None else draft_probs
                    draft_probs[newly] = probs[newly]
            open_ &= ~newly
            x = new_x
        return x, committed_at, draft_probs


class DiffusionLane(Lane):
    """Block mask diffusion (spec §7.1): fill a block, commit it to the context, repeat."""

    def advance(self) -> None:
        ex = self.executor
        s = self.rows[0].settings
        x = torch.full((len(self.rows), s.block_size), s.mask_token_id, dtype=torch.long, device=ex.denoiser_device)
        x, _, _ = self.fill_block(x)
        block = x.to(ex.context_device)
        keep = self._emit(block.tolist())
        block = block[keep] if len(keep) < len(self.rows) else block
        self._keep(keep)
        if self.rows:  # the context tower consumes the whole block, EOS and all (spec §7.3)
            _, self.state = ex.extend(self.state, block, logits=False)
            for r in self.rows:
                r.out.context_forwards += 1


class SpeculativeLane(Lane):
    """The denoiser drafts a block, the context tower's extend over it verifies every position.

    Each row carries ``pending``: the next token, already chosen by the AR rule but not yet in the
    context. A block is [pending, mask x (L-1)]; the denoiser fills positions 1..L-1; the context
    tower extends over the block (one forward) and its logits judge every draft
    (``sampler.verify_draft``); the row keeps the pending token and the accepted drafts, the context
    is rolled back to them (per-position Mamba states of that same extend), and the AR token after
    them becomes the next pending token. Output: exactly the AR model's."""

    def _prefill(self, rows, capacity):
        state, logits = self.executor.prefill([r.prompt for r in rows], capacity)
        pending = sampler.sample_next(logits, [r.settings.temperature for r in rows], [r.settings.top_k for r in rows],
                                      [r.settings.top_p for r in rows], [r.ar_gen for r in rows])
        for r in rows:
            r.out.steps += 1  # the prefill produced the first token
        return {"state": state, "pending": pending}

    def _batched(self) -> dict:
        return {"state": self.state, "pending": self.pending}

    def _after_admit(self, rows):
        self._finish_on_pending()

    def _finish_on_pending(self) -> None:
        """A pending token that ends its row (EOS, or the last token allowed) is emitted at once."""
        pending = self.pending.tolist()
        ending = []
        for i, r in enumerate(self.rows):
            s = r.settings
            if pending[i] == s.eos_token_id or len(r.out.tokens) + 1 >= s.max_new_tokens:
                ending.append(i)
        if ending:
            for i, r in enumerate(self.rows):
                if i in ending:
                    r.emit(r, append_tokens(r, [pending[i]]))
            self._keep([i for i, r in enumerate(self.rows) if not r.out.finished])

    def advance(self) -> None:
        ex, rows = self.executor, self.rows
        L = rows[0].settings.block_size
        x = torch.full((len(rows), L), rows[0].settings.mask_token_id, dtype=torch.long, device=ex.denoiser_device)
        x[:, 0] = self.pending.to(ex.denoiser_device)
        greedy = all(r.settings.temperature <= 0 for r in rows)
        draft, committed_at, draft_probs = self.fill_block(x, given=1, confidence=DRAFT_CONFIDENCE, record=not greedy)
        draft = draft.to(ex.context_device)
        logits, traced = ex.extend(self.state, draft, logits=True, trace=True)
        for r in rows:
            r.out.steps += 1
            r.out.context_forwards += 1
        verdict = sampler.verify_draft(draft, committed_at, draft_probs, logits, self._settings("temperature"),
                                       self._settings("top_k"), self._settings("top_p"), [r.ar_gen for r in rows])
        self.state = ex.rollback(traced, torch.tensor([1 + a for a in verdict.accepted]))
        self.pending = verdict.next_token
        drafts = draft.tolist()
        for r, a, tried in zip(rows, verdict.accepted, verdict.attempted):
            r.out.accepted.append(a)
            if len(r.out.attempts_by_position) < L - 1:
                r.out.attempts_by_position = [0] * (L - 1)
                r.out.accepts_by_position = [0] * (L - 1)
            for j in range(tried):
                r.out.attempts_by_position[j] += 1
                r.out.accepts_by_position[j] += j < a
        self._keep(self._emit([d[: 1 + a] for d, a in zip(drafts, verdict.accepted)]))
        if self.rows:
            self._finish_on_pending()


class TokenLane(Lane):
    """One token per forward: AR (the context tower alone, spec §7.4) or mock-AR (the denoiser as
    the next-token head over the context, re-reading the last committed token from the state before
    it, without time conditioning, spec §7.5)."""

    def __init__(self, executor, key: tuple):
        super().__init__(executor, key)
        self.mock_ar = key[0] == "mock-ar"

    def _prefill(self, rows, capacity):
        ex = self.executor
        if not self.mock_ar:
            state, logits = ex.prefill([r.prompt for r in rows], capacity)
            return {"state": state, "logits": logits}
        before, _ = ex.prefill([r.prompt[:-1] for r in rows], capacity)
        last = torch.tensor([[r.prompt[-1]] for r in rows], device=ex.context_device)
        _, state = ex.extend(before, last, logits=False)
        return {"state": state, "before": before, "last": last}

    def _batched(self) -> dict:
        return {"state": self.state, "before": self.before, "last": self.last} if self.mock_ar else \
            {"state": self.state, "logits": self.logits}

    def advance(self) -> None:
        ex, rows = self.executor, self.rows
        if self.mock_ar:
            logits = ex.denoise(self.before, self.last.to(ex.denoiser_device), None)[:, -1]
            gens = [r.draft_gen for r in rows]
        else:
            logits, gens = self.logits, [r.ar_gen for r in rows]
        tokens = sampler.sample_next(logits, self._settings("temperature"), self._settings("top_k"),
                                     self._settings("top_p"), gens)
        for r in rows:
            r.out.steps += 1
            r.out.denoiser_forwards += self.mock_ar
        keep = self._emit([[t] for t in tokens.tolist()])
        tokens = tokens.to(ex.context_device)[:, None]
        tokens = tokens[keep] if len(keep) < len(rows) else tokens
        self._keep(keep)
        if not self.rows:
            return
        logits, state = ex.extend(self.state, tokens, logits=not self.mock_ar)
        for r in self.rows:
            r.out.context_forwards += 1
        if self.mock_ar:
            self.before, self.last = self.state, tokens
        else:
            self.logits = logits[:, -1]
        self.state = state


LANES = {"diffusion": DiffusionLane, "speculative": SpeculativeLane, "mock-ar": TokenLane, "ar": TokenLane}


def lane_key(mode: str, s: SamplerSettings) -> tuple:
    """Rows that can share forwards: same mode, and for block modes the same block size and mask id."""
    return (mode, s.block_size, s.mask_token_id) if mode in ("diffusion", "speculative") else (mode,)
