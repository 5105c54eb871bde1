"""The generation loops, one "lane" per kind of forward, over a running batch of rows.

A lane owns the context state of its rows (one ``TowerState``, each row at its own position) and
advances all of them by one forward per call:
- block lanes (diffusion, speculative): one denoiser step; every row fills its own block at its own
  step of it. Rows whose block is complete after that step are committed (diffusion: the context
  extends over the block; speculative: the extend verifies the drafts and the context rolls back to
  the accepted ones), reported, and start their next block;
- token lanes (AR, mock-AR): one token per row.
New rows join between two forwards (``admit``: prefilled alone, then concatenated), so a request
waits one denoiser step for its turn, and starts its first block at its own block boundary; rows
leave as soon as they finish or are cancelled. Each row keeps its own settings and generators and
takes exactly the steps it would take alone, so its tokens do not depend on the other rows.

A row with an ``on_step`` listener also reports what every forward did to it (``StepEvent``). Only
listened steps read those commits back from the device; a batch without listeners reads nothing more.
A row whose settings ask for ``logprobs`` gets each committed token's ``TokenLogprob`` (its
log-probability and most likely alternatives) beside it in ``RowOutput.logprobs`` and its events,
under the distribution of the forward that chose it: AR and mock-AR the token's own forward;
speculative the context tower's logits at the token's position in the verifying extend (the AR
distribution the output follows; the pending token's from the forward that drew it); diffusion the
denoiser step that committed it. Only those rows compute and read them; they draw nothing, so no
token changes.

Modes (spec §7): diffusion (§7.1), speculative (the exact AR output from drafted blocks), AR
(§7.4), mock-AR (§7.5).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from ..devices import upload
from . import sampler
from .sampler import SamplerSettings, TokenLogprob

MODES = ("diffusion", "speculative", "mock-ar", "ar")
# Speculative drafts commit by the probability of the most likely token, which does not depend on
# the draw, so a committed draft's law is the distribution it was drawn from (sampler.verify_draft).
DRAFT_CONFIDENCE = "argmax"


@dataclass(frozen=True)
class StepEvent:
    """What one forward did to one row (``Row.on_step``); a row's events are those it has alone.

    kind "step" (block modes): one denoiser step of block ``block`` (the row's blocks count from 0);
    ``step`` is the step within the block (0 .. steps_per_block - 1); ``positions`` the block
    positions committed at it, ``tokens`` their tokens and ``confidences`` their committing
    probabilities (diffusion: the temperature-1 probability of the drawn token, the commit rule's
    own; speculative drafts: that of the most likely token, see ``DRAFT_CONFIDENCE``).
    kind "block" (block modes): block ``block`` joins the output: ``tokens`` are the tokens the row
    keeps, at block positions 0 .. len(tokens) - 1 (fewer than the block at EOS or max_new_tokens).
    Speculative: position 0 is the known AR token, ``accepted`` the drafts kept after it and
    ``corrected`` the AR token at position 1 + accepted (replacing the rejected draft there, or the
    token after a fully accepted block), which is the next block's position 0. A row can end on
    that token alone: a last "block" event with ``tokens`` = [it] and ``accepted`` None.
    kind "token" (AR, mock-AR): the forward's one token, ``block`` its index in the output, ``step``
    the row's forward count before it, ``positions`` [0], ``confidences`` its temperature-1 probability.
    Concatenated, the "block" and "token" events' ``tokens`` are the row's output. ``logprobs``: on
    "block" and "token" events of a row that asked for them, one ``TokenLogprob`` per token.
    """

    row: int  # the row's place in its request
    kind: str
    block: int
    step: int | None
    positions: list[int]
    tokens: list[int]
    confidences: list[float]
    accepted: int | None = None
    corrected: int | None = None
    logprobs: list[TokenLogprob] | None = None


@dataclass
class RowOutput:
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token when the row asks for them
    blocks: int = 0  # blocks completed (block modes)
    steps: int = 0  # forwards that produced this row's tokens (denoiser steps in diffusion; see ``nfe``)
    denoiser_forwards: int = 0
    context_forwards: int = 0  # the prefill included
    cached_tokens: int = 0  # prompt tokens restored from the prefix cache, not prefilled
    finished: bool = False
    cancelled: bool = False
    accepted: list[int] = field(default_factory=list)  # speculative: drafts accepted per block
    attempts_by_position: list[int] = field(default_factory=list)  # speculative: drafts judged at 1 .. L-1
    accepts_by_position: list[int] = field(default_factory=list)


@dataclass(eq=False)
class Row:
    """One sequence being generated. ``emit(row, new_tokens)`` is called after each unit that
    changed it (the tokens may be empty when the row was cancelled); ``row.out.finished`` then says
    whether it was the last call. ``fail(error)`` reports a failed forward. ``on_step(event)``, when
    given, hears every forward's ``StepEvent`` (before the ``emit`` of the same unit)."""

    mode: str
    prompt: list[int]
    settings: SamplerSettings
    seed: int
    emit: Callable[["Row", list[int]], None]
    fail: Callable[[BaseException], None]
    index: int = 0  # its place in its request
    on_step: Callable[[StepEvent], None] | None = None
    out: RowOutput = field(default_factory=RowOutput)
    cancelled: bool = False
    draft_gen: torch.Generator | None = None  # draws on the denoiser's device (diffusion, mock-AR)
    ar_gen: torch.Generator | None = None  # draws on the context device (AR, speculative verification)
    pending_logprob: TokenLogprob | None = None  # speculative, a row asking for logprobs: its pending token's

    def leave_cancelled(self) -> None:
        """The row leaves because it was cancelled: its last event, with no new tokens."""
        self.out.cancelled = self.out.finished = True
        self.emit(self, [])

    def leave_failed(self, error: BaseException) -> None:
        """The row leaves because a forward it took part in failed."""
        self.out.finished = True
        self.fail(error)

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


def append_tokens(row: Row, tokens: list[int], logprobs: list[TokenLogprob] | None = None) -> list[int]:
    """Add a row's new tokens (and their ``logprobs``, one per token), truncated at EOS (kept) and
    at max_new_tokens; returns those kept."""
    s = row.settings
    kept = tokens[: s.max_new_tokens - len(row.out.tokens)]
    if s.eos_token_id is not None and s.eos_token_id in kept:
        kept = kept[: kept.index(s.eos_token_id) + 1]
        row.out.finished = True
    row.out.tokens.extend(kept)
    if logprobs is not None:
        row.out.logprobs.extend(logprobs[: len(kept)])
    if len(row.out.tokens) >= s.max_new_tokens:
        row.out.finished = True
    return kept


class Lane:
    """Rows that run one kind of forward together (one mode, one block size, one mask id). Its
    batched per-row fields (``_batched``) follow the rows as they join and leave."""

    batched_fields: tuple[str, ...] = ("state",)

    def __init__(self, executor, key: tuple, prefix_cache=None):
        self.executor = executor
        self.key = key
        self.prefix_cache = prefix_cache
        self.rows: list[Row] = []
        self.state = None
        self.capacity = 0

    def __len__(self) -> int:
        return len(self.rows)

    # ---- membership -----------------------------------------------------------------------------
    def admit(self, rows: list[Row]) -> None:
        """Prefill new rows and add them to the running batch (they run from the next forward on)."""
        ex = self.executor
        for r in rows:
            r.draft_gen = torch.Generator(device=ex.denoiser_device).manual_seed(r.seed)
            r.ar_gen = torch.Generator(device=ex.context_device).manual_seed(
                verify_seed(r.seed) if r.mode == "speculative" else r.seed)
        capacity = max([self.capacity] + [r.tokens_needed for r in rows])
        parts = self._prefill(rows, capacity)
        for r in rows:
            r.out.context_forwards += 1
        first = len(self.rows)
        for name in self.batched_fields:
            old, new = getattr(self, name), parts.get(name)
            if not self.rows or old is None:
                setattr(self, name, new)
            elif isinstance(old, torch.Tensor):  # a field only some rows needed so far: zeros for the new
                new = old.new_zeros((len(rows), *old.shape[1:])) if new is None else new.to(old.device)
                setattr(self, name, torch.cat([old, new]))
            else:
                setattr(self, name, self.executor.concat([old, new], capacity))
        self.rows += rows
        self.capacity = capacity
        self._after_admit(list(range(first, len(self.rows))))

    def _prefill(self, rows: list[Row], capacity: int) -> dict:
        """The new rows' values of every batched field (missing ones: zeros / None)."""
        raise NotImplementedError

    def _prefill_context(self, rows: list[Row], prompts: list[list[int]], capacity: int):
        """The executor's prefill of ``prompts`` (one per row), through the prefix cache when
        there is one. Returns (state, logits of each last prompt token [B, V] or None)."""
        pages = None if self.prefix_cache is None else self.prefix_cache.pages_for(rows, prompts)
        return self.executor.prefill(prompts, capacity, pages=pages)

    def _after_admit(self, new: list[int]) -> None:
        """Hook for what admission decides about the new rows at indices ``new``."""

    def remove_cancelled(self) -> None:
        cancelled = [r for r in self.rows if r.cancelled]
        if cancelled:
            for r in cancelled:
                r.leave_cancelled()
            self._keep([i for i, r in enumerate(self.rows) if not r.cancelled])

    def _keep(self, keep: list[int]) -> None:
        """Keep only the rows at ``keep`` (finished and cancelled rows leave at once)."""
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            for name in self.batched_fields:
                setattr(self, name, None)
            self.capacity = 0
            return
        for name in self.batched_fields:
            value = getattr(self, name)
            if isinstance(value, torch.Tensor):
                setattr(self, name, value[upload(keep, value.device, torch.long)])
            elif value is not None:
                setattr(self, name, self.executor.select(value, keep))

    def _settings(self, name: str, rows: list[int] | None = None) -> list:
        return [getattr(self.rows[i].settings, name) for i in (range(len(self.rows)) if rows is None else rows)]

    def _emit(self, indices: list[int], tokens_per_row: list[list[int]],
              event: Callable[[int, Row, list[int]], StepEvent] | None = None,
              logprobs: dict[int, list[TokenLogprob]] | None = None) -> None:
        """Append and report the new tokens of the rows at ``indices``. ``event(j, row, kept)``
        builds the StepEvent of ``indices[j]`` for a listening row from the tokens it kept.
        ``logprobs``: row index -> one entry per token, for the rows that ask."""
        for j, (i, tokens) in enumerate(zip(indices, tokens_per_row)):
            r = self.rows[i]
            entries = None if logprobs is None else logprobs.get(i)
            kept = append_tokens(r, tokens, entries)
            if r.on_step is not None and event is not None:
                e = event(j, r, kept)
                r.on_step(e if entries is None else replace(e, logprobs=entries[: len(kept)]))
            r.emit(r, kept)

    def _asking(self, rows: list[int] | None = None) -> list[int]:
        """The rows (of ``rows``, default all) that asked for log-probabilities."""
        return [i for i in (range(len(self.rows)) if rows is None else rows)
                if self.rows[i].settings.logprobs is not None]

    def _listening(self, rows: list[int] | None = None) -> list[int]:
        """The rows (of ``rows``, default all) with a step listener."""
        return [i for i in (range(len(self.rows)) if rows is None else rows) if self.rows[i].on_step is not None]

    def _extend(self, rows: list[int], tokens: torch.Tensor, *, logits: bool, trace: bool = False,
                in_place: bool = False):
        """The context extend of the rows at ``rows`` only (the others are mid-block). Returns
        (logits, the new state of those rows); ``_merge`` writes it back. ``in_place``: the lane
        keeps no older state, so the executor may reuse its buffers (a CUDA-graph replay)."""
        ex = self.executor
        whole = rows == list(range(len(self.rows)))
        sub = self.state if whole else ex.select(self.state, rows)
        out, new = ex.extend(sub, tokens, logits=logits, trace=trace, in_place=in_place)
        for i in rows:
            self.rows[i].out.context_forwards += 1
        return out, new

    def _merge(self, rows: list[int], new) -> None:
        whole = rows == list(range(len(self.rows)))
        self.state = new if whole else self.executor.merge(self.state, rows, new)

    # ---- one forward ---------------------------------------------------------------------------------
    def advance(self) -> None:
        raise NotImplementedError


class BlockLane(Lane):
    """Each row fills its own block, one denoiser step per ``advance`` (spec §7.1, per row with its
    own step budget, threshold and temperature). ``given`` leading positions of a block are known."""

    batched_fields = ("state", "x", "open", "block_step", "committed_at", "draft_probs")
    given = 0

    def __init__(self, executor, key: tuple, prefix_cache=None):
        super().__init__(executor, key, prefix_cache)
        self.x = self.open = self.block_step = self.committed_at = self.draft_probs = None

    def _new_blocks(self, count: int, first_tokens: torch.Tensor | None = None) -> dict:
        L, mask_id = self.key[1], self.key[2]
        device = self.executor.denoiser_device
        x = torch.full((count, L), mask_id, dtype=torch.long, device=device)
        open_ = torch.ones(count, L, dtype=torch.bool, device=device)
        if self.given:
            x[:, : self.given] = first_tokens.to(device).view(count, self.given)
            open_[:, : self.given] = False
        return {"x": x, "open": open_, "block_step": torch.zeros(count, dtype=torch.long, device=device),
                "committed_at": torch.full((count, L), -1, dtype=torch.long, device=device),
                "draft_probs": None}

    def _prefill(self, rows, capacity):
        state, _ = self._prefill_context(rows, [r.prompt for r in rows], capacity)
        return {"state": state, **self._new_blocks(len(rows))}

    def _confidence(self) -> str:
        return "sampled"  # the spec's rule: the temperature-1 probability of the drawn token

    def _restart(self, rows: list[int], first_tokens: torch.Tensor | None = None) -> None:
        """Give the rows at ``rows`` a fresh block."""
        fresh = self._new_blocks(len(rows), first_tokens)
        index = upload(rows, self.x.device, torch.long)
        for name in ("x", "open", "block_step", "committed_at"):
            getattr(self, name)[index] = fresh[name]

    def advance(self) -> None:
        ex, rows = self.executor, self.rows
        L, mask_id = self.key[1], self.key[2]
        n = self.open.sum(-1)  # every row has an open block
        logits = ex.denoise(self.state, self.x, n.float() / L)  # t = masked fraction per row
        for r in rows:
            r.out.steps += 1
            r.out.denoiser_forwards += 1
        temps = self._settings("temperature")
        record = self.given > 0 and any(t > 0 for t in temps)  # speculative's sampled rows need q
        new_x, _, probs, confidence = sampler.commit_step(
            self.x, logits, mask_id, self.block_step, self._settings("steps_per_block"),
            self._settings("confidence_threshold"), temps, [r.draft_gen for r in rows],
            confidence=self._confidence(), return_probs=True, masked=self.open)
        newly = self.open & (new_x != mask_id)  # the denoiser never predicts the mask id
        self._record_logprobs(logits, new_x, newly)
        listening = self._listening()
        if listening:
            self._report_step(listening, newly, new_x, confidence)
        self.committed_at = torch.where(newly, self.block_step[:, None], self.committed_at)
        if record and probs is not None:
            if self.draft_probs is None:
                self.draft_probs = torch.zeros_like(probs)
            self.draft_probs = torch.where(newly[..., None], probs, self.draft_probs)
        self.open &= ~newly
        self.x = new_x
        self.block_step += 1
        # the step's one read from the device: which blocks are complete (they are reported and
        # extended at once; everything before this line is queued without waiting)
        done = [i for i, complete in enumerate((~self.open.any(-1)).tolist()) if complete]
        if done:
            self._complete(done)

    def _record_logprobs(self, logits: torch.Tensor, new_x: torch.Tensor, newly: torch.Tensor) -> None:
        """Hook: keep what the rows asking for logprobs need of this step's commits (newly [B, L])."""

    def _report_step(self, listening: list[int], newly: torch.Tensor, new_x: torch.Tensor,
                     confidence: torch.Tensor) -> None:
        """The listening rows' "step" events: their commits of this step (newly, new_x, confidence
        [B, L]) and block steps, read back for those rows only (four reads)."""
        index = upload(listening, newly.device, torch.long)
        committed, tokens, confidences, steps = (t[index].tolist() for t in (newly, new_x, confidence, self.block_step))
        for j, i in enumerate(listening):
            r = self.rows[i]
            positions = [p for p, c in enumerate(committed[j]) if c]
            r.on_step(StepEvent(r.index, "step", r.out.blocks, steps[j], positions,
                                [tokens[j][p] for p in positions], [confidences[j][p] for p in positions]))

    def _emit_blocks(self, done: list[int], tokens_per_row: list[list[int]], accepted: list[int] | None = None,
                     corrected: list[int] | None = None, logprobs: dict[int, list[TokenLogprob]] | None = None) -> None:
        """Append and report the completed blocks of the rows at ``done`` ("block" events)."""
        def event(j: int, r: Row, kept: list[int]) -> StepEvent:
            return StepEvent(r.index, "block", r.out.blocks, None, list(range(len(kept))), kept, [],
                             None if accepted is None else accepted[j], None if corrected is None else corrected[j])

        self._emit(done, tokens_per_row, event, logprobs)
        for i in done:
            self.rows[i].out.blocks += 1

    def _complete(self, done: list[int]) -> None:
        raise NotImplementedError


class DiffusionLane(BlockLane):
    """Block mask diffusion (spec §7.1): a complete block is reported and the context tower
    consumes it (EOS and all, spec §7.3); the row's next block starts at the next step.

    Rows asking for logprobs: each position's entry is taken at the step that commits it, from that
    step's distribution (``commit_logprobs`` [B, L, 1 + K] / ``commit_top_ids`` [B, L, K], see
    ``sampler.logprob_tables``; zeros for rows that do not ask), and read when the block completes."""

    batched_fields = BlockLane.batched_fields + ("commit_logprobs", "commit_top_ids")

    def __init__(self, executor, key: tuple, prefix_cache=None):
        super().__init__(executor, key, prefix_cache)
        self.commit_logprobs = self.commit_top_ids = None

    def _record_logprobs(self, logits, new_x, newly):
        asking = self._asking()
        if not asking:
            return
        index = upload(asking, new_x.device, torch.long)
        values, ids = sampler.logprob_tables(sampler.exclude_mask(logits[index], self.key[2]), new_x[index],
                                             self._settings("temperature", asking))
        if self.commit_logprobs is None:  # the first step with a row that asks: every row gets a place
            B, L = new_x.shape
            self.commit_logprobs = values.new_zeros((B, L, values.shape[-1]))
            self.commit_top_ids = ids.new_zeros((B, L, ids.shape[-1]))
        here = newly[index][..., None]  # [b, L, 1]: only this step's commits take this step's values
        self.commit_logprobs[index] = torch.where(here, values, self.commit_logprobs[index])
        self.commit_top_ids[index] = torch.where(here, ids, self.commit_top_ids[index])

    def _complete(self, done):
        ex = self.executor
        blocks = self.x[done].to(ex.context_device)
        asking = self._asking(done)
        logprobs = None
        if asking:
            index = upload(asking, self.x.device, torch.long)
            logprobs = dict(zip(asking, sampler.read_logprobs(self.commit_logprobs[index], self.commit_top_ids[index],
                                                              self._settings("logprobs", asking))))
        self._emit_blocks(done, blocks.tolist(), logprobs=logprobs)
        going = [j for j, i in enumerate(done) if not self.rows[i].out.finished]
        if going:
            rows = [done[j] for j in going]
            _, new = self._extend(rows, blocks[going], logits=False, in_place=True)
            self._merge(rows, new)
            self._restart(rows)
        self._keep([i for i, r in enumerate(self.rows) if not r.out.finished])


class SpeculativeLane(BlockLane):
    """The denoiser drafts a block, the context tower's extend over it verifies every position.

    Each row carries ``pending``: the next token, already chosen by the AR rule but not yet in the
    context. A block is [pending, mask x (L-1)]; the denoiser fills positions 1..L-1; the context
    tower extends over the block (one forward) and its logits judge every draft
    (``sampler.verify_draft``); the row keeps the pending token and the accepted drafts, the context
    is rolled back to them (per-position Mamba states of that same extend), and the AR token after
    them becomes the next pending token. Output: exactly the AR model's."""

    batched_fields = BlockLane.batched_fields + ("pending",)
    given = 1

    def __init__(self, executor, key: tuple, prefix_cache=None):
        super().__init__(executor, key, prefix_cache)
        self.pending = None

    def _prefill(self, rows, capacity):
        state, logits = self._prefill_context(rows, [r.prompt for r in rows], capacity)
        pending = sampler.sample_next(logits, [r.settings.temperature for r in rows], [r.settings.top_k for r in rows],
                                      [r.settings.top_p for r in rows], [r.ar_gen for r in rows])
        asking = [j for j, r in enumerate(rows) if r.settings.logprobs is not None]
        if asking:
            index = upload(asking, logits.device, torch.long)
            entries = logprobs_of([rows[j] for j in asking], logits[index][:, None], pending[index][:, None])
            for j, (entry,) in zip(asking, entries):
                rows[j].pending_logprob = entry
        for r in rows:
            r.out.steps += 1  # the prefill produced the first token
        return {"state": state, "pending": pending, **self._new_blocks(len(rows), pending)}

    def _after_admit(self, new):
        self._finish_on_pending(new)

    def _confidence(self) -> str:
        return DRAFT_CONFIDENCE

    def _finish_on_pending(self, indices: list[int]) -> None:
        """A pending token that ends its row (EOS, or the last token allowed) is emitted at once."""
        if not indices:
            return
        pending = self.pending.tolist()
        ending = [i for i in indices if pending[i] == self.rows[i].settings.eos_token_id
                  or len(self.rows[i].out.tokens) + 1 >= self.rows[i].settings.max_new_tokens]
        if ending:
            self._emit(ending, [[pending[i]] for i in ending],
                       lambda j, r, kept: StepEvent(r.index, "block", r.out.blocks, None, [0], kept, []),
                       {i: [self.rows[i].pending_logprob] for i in self._asking(ending)})
            self._keep([i for i, r in enumerate(self.rows) if not r.out.finished])

    def _complete(self, done):
        ex = self.executor
        L = self.key[1]
        drafts = self.x[done].to(ex.context_device)
        logits, traced = self._extend(done, drafts, logits=True, trace=True)
        for i in done:
            self.rows[i].out.steps += 1
        verdict = sampler.verify_draft(
            drafts, self.committed_at[done], None if self.draft_probs is None else self.draft_probs[done], logits,
            self._settings("temperature", done), self._settings("top_k", done), self._settings("top_p", done),
            [self.rows[i].ar_gen for i in done])
        self._merge(done, ex.rollback(traced, torch.tensor([1 + a for a in verdict.accepted])))
        self.pending[upload(done, self.pending.device, torch.long)] = verdict.next_token.to(self.pending.device)
        for i, a, tried in zip(done, verdict.accepted, verdict.attempted):
            out = self.rows[i].out
            out.accepted.append(a)
            if not out.attempts_by_position:
                out.attempts_by_position, out.accepts_by_position = [0] * (L - 1), [0] * (L - 1)
            for j in range(tried):
                out.attempts_by_position[j] += 1
                out.accepts_by_position[j] += j < a
        corrected = verdict.next_token.tolist() if self._listening(done) else None  # read only when listened to
        self._emit_blocks(done, [d[: 1 + a] for d, a in zip(drafts.tolist(), verdict.accepted)], verdict.accepted,
                          corrected, self._verified_logprobs(done, drafts, logits, verdict))
        going = [i for i in done if not self.rows[i].out.finished]
        if going:
            self._restart(going, self.pending[upload(going, self.pending.device, torch.long)])
        survivors = [i for i, r in enumerate(self.rows) if not r.out.finished]
        going = [survivors.index(i) for i in going]
        self._keep(survivors)
        self._finish_on_pending(going)

    def _verified_logprobs(self, done: list[int], drafts: torch.Tensor, logits: torch.Tensor,
                           verdict: sampler.Verdict) -> dict[int, list[TokenLogprob]] | None:
        """The kept tokens' entries of the rows at ``done`` that ask: the pending token's, then each
        accepted draft's under the extend's logits at the position before it (logits [b, L, V]:
        position j predicts j + 1); the AR token at 1 + accepted becomes the next pending one's."""
        asking = [j for j, i in enumerate(done) if self.rows[i].settings.logprobs is not None]
        if not asking:
            return None
        next_token = verdict.next_token.to(drafts.device)
        targets = torch.cat([drafts[:, 1:], next_token[:, None]], dim=1)  # [b, L]: what position j chose
        targets.scatter_(1, torch.tensor(verdict.accepted, device=drafts.device)[:, None], next_token[:, None])
        index = upload(asking, logits.device, torch.long)
        rows = [self.rows[done[j]] for j in asking]
        out = {}
        for j, r, entries in zip(asking, rows, logprobs_of(rows, logits[index], targets[index])):
            a = verdict.accepted[j]
            out[done[j]] = [r.pending_logprob] + entries[:a]
            r.pending_logprob = entries[a]
        return out


class TokenLane(Lane):
    """One token per forward: AR (the context tower alone, spec §7.4) or mock-AR (the denoiser as
    the next-token head over the context, re-reading the last committed token from the state before
    it, without time conditioning, spec §7.5)."""

    def __init__(self, executor, key: tuple, prefix_cache=None):
        super().__init__(executor, key, prefix_cache)
        self.mock_ar = key[0] == "mock-ar"
        self.batched_fields = ("state", "before", "last") if self.mock_ar else ("state", "logits")
        self.before = self.last = self.logits = None

    def _prefill(self, rows, capacity):
        ex = self.executor
        if not self.mock_ar:
            state, logits = self._prefill_context(rows, [r.prompt for r in rows], capacity)
            return {"state": state, "logits": logits}
        before, _ = self._prefill_context(rows, [r.prompt[:-1] for r in rows], capacity)
        last = upload([[r.prompt[-1]] for r in rows], ex.context_device, torch.long)
        _, state = ex.extend(before, last, logits=False)
        return {"state": state, "before": before, "last": last}

    def advance(self) -> None:
        ex, rows = self.executor, self.rows
        if self.mock_ar:
            logits = ex.denoise(self.before, self.last.to(ex.denoiser_device), None)[:, -1]
            gens = [r.draft_gen for r in rows]
        else:
            logits, gens = self.logits, [r.ar_gen for r in rows]
        tokens = sampler.sample_next(logits, self._settings("temperature"), self._settings("top_k"),
                                     self._settings("top_p"), gens)
        asking = self._asking()
        logprobs = None
        if asking:
            index = upload(asking, logits.device, torch.long)
            logprobs = dict(zip(asking, logprobs_of([rows[i] for i in asking], logits[index][:, None],
                                                    tokens[index][:, None])))
        listening = self._listening()
        probability = None
        if listening:  # read only when listened to: the tokens' temperature-1 probabilities
            index = upload(listening, logits.device, torch.long)
            chosen = torch.softmax(logits[index].float(), dim=-1).gather(-1, tokens[index, None].to(logits.device))
            probability = dict(zip(listening, chosen[:, 0].tolist()))

        for r in rows:
            r.out.steps += 1
            r.out.denoiser_forwards += self.mock_ar

        def event(j: int, r: Row, kept: list[int]) -> StepEvent:
            return StepEvent(r.index, "token", len(r.out.tokens) - len(kept), r.out.steps - 1, [0], kept,
                             [probability[j]])

        self._emit(list(range(len(rows))), [[t] for t in tokens.tolist()], event, logprobs)
        keep = [i for i, r in enumerate(rows) if not r.out.finished]
        tokens = tokens.to(ex.context_device)[:, None]
        tokens = tokens[keep] if len(keep) < len(rows) else tokens
        self._keep(keep)
        if not self.rows:
            return
        # AR keeps no older state (the executor may replay the step as a CUDA graph); mock-AR keeps
        # the state before the last token for its head
        logits, state = self._extend(list(range(len(self.rows))), tokens, logits=not self.mock_ar,
                                     in_place=not self.mock_ar)
        if self.mock_ar:
            self.before, self.last = self.state, tokens
        else:
            self.logits = logits[:, -1]
        self.state = state


def logprobs_of(rows: list[Row], logits: torch.Tensor, tokens: torch.Tensor) -> list[list[TokenLogprob]]:
    """The rows' entries (with their own temperature and count) for ``tokens`` [b, n] under
    ``logits`` [b, n, V] (one read)."""
    return sampler.token_logprobs(logits, tokens, [r.settings.temperature for r in rows],
                                  [r.settings.logprobs for r in rows])


LANES = {"diffusion": DiffusionLane, "speculative": SpeculativeLane, "mock-ar": TokenLane, "ar": TokenLane}


def lane_key(mode: str, s: SamplerSettings) -> tuple:
    """Rows that can share forwards: same mode, and for block modes the same block size and mask id."""
    return (mode, s.block_size, s.mask_token_id) if mode in ("diffusion", "speculative") else (mode,)
