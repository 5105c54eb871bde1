"""The prefix cache: context-tower states at page boundaries of prompts, so that a repeated prompt
prefix is not prefilled again, and a hit computes bit for bit what a cold prefill computes.

Exactness by construction: every prefill, cache on or off, runs in pieces that end at multiples of
``PAGE_TOKENS`` and at the prompt's end (``prefill_in_pages``). The state at a page boundary is
then the same whether the prefill started from scratch or resumed from a cached page, and so is
everything computed after it: a hit runs the very forwards the cold run runs after that boundary,
on the same inputs (attention reads ``cache[0:len]`` only, so the buffers' capacity does not
matter; each piece picks its scan form by its own length).

A page holds the K/V of its ``PAGE_TOKENS`` tokens for every attention layer and the Mamba conv and
fp32 SSM states at its end. Page j of a prompt is keyed by page j-1 and its own tokens, so a lookup
walks the prompt page by page and stops at the first miss. The page holding a prompt's last token
is never cached: the prefill always has a piece left to run, whose last logits the modes need.

Memory: the pages live on the context device and count against the scheduler's memory budget. A
running row holds (pins) the pages of its prompt until it finishes; only unpinned pages without
cached children are evicted, least recently used first, when the running rows need the room or
the cache its own ``capacity_bytes``.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from functools import partial

import torch

from ..network import towers

# A multiple of the scan's chunk (64: each full page takes the chunked SSD form) and of every
# power-of-two block size up to 256. Larger pages mean fewer prefill forwards, coarser hits.
PAGE_TOKENS = 256


def prefill_in_pages(run, state, prompt: list[int], page_tokens: int, on_page=None):
    """Prefill ``prompt`` after the ``state.lengths[0]`` tokens ``state`` (one row) already holds (0,
    or a page boundary), in pieces that end at multiples of ``page_tokens`` and at the prompt's end.

    run(state, ids: list[int], logits: bool) -> (fp32 logits [1, V] of the piece's last token or
    None, new state). on_page(end, state) after every piece that ends before the prompt's last
    token. Returns (logits [1, V] of the last prompt token, or None when nothing was left; state)."""
    logits = None
    for lo in range(int(state.lengths[0]), len(prompt), page_tokens):
        hi = min(lo + page_tokens, len(prompt))
        logits, state = run(state, prompt[lo:hi], hi == len(prompt))
        if hi < len(prompt) and on_page is not None:
            on_page(hi, state)
    return logits, state


def prefill_rows(prompts: list[list[int]], capacity: int, pages, empty_state, run, page_tokens: int):
    """Every executor's prefill: each row alone (prompts differ in length), resumed from its cached
    prefix when ``pages`` (``BatchPages``) has one, in page pieces (``prefill_in_pages``, which
    caches its new pages), then one batched state of ``capacity`` slots per row. ``empty_state()``
    makes one empty row; ``run`` as in ``prefill_in_pages``. Returns (state, fp32 logits of each
    row's last prompt token [B, V], or None when a prompt is empty)."""
    rows, last = [], []
    for b, prompt in enumerate(prompts):
        start = pages.resume(b) if pages is not None else None
        state = empty_state() if start is None else towers.concat_states([start], capacity)
        logits, state = prefill_in_pages(run, state, prompt, page_tokens,
                                         None if pages is None else partial(pages.store, b))
        if logits is not None:
            last.append(logits)
        rows.append(state)
    logits = torch.cat(last) if len(last) == len(prompts) else None
    return (rows[0] if len(rows) == 1 else towers.concat_states(rows, capacity)), logits


@dataclass(eq=False)
class Page:
    """The context state of one page of a prompt. keys/values: attention layer -> [1, P, K, Pd]
    (P = page tokens, K kv heads, Pd head dim); conv: Mamba layer -> [1, C, W]; ssm: Mamba layer
    -> [1, H, Pd, N] fp32, the states after the page's last token."""

    parent: "Page | None"
    tokens: tuple
    keys: dict
    values: dict
    conv: dict
    ssm: dict
    nbytes: int
    children: int = 0  # cached pages that continue this one (it is not evicted before them)
    pins: int = 0  # running rows whose prompt holds this page


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class PrefixCache:
    """Pages of prompts' context states, least recently used first. Used from the scheduler's
    thread only; ``stats`` may be read from any thread."""

    def __init__(self, page_tokens: int, capacity_bytes: int):
        self.page_tokens = page_tokens
        self.capacity_bytes = capacity_bytes
        self.limit = capacity_bytes  # what the running rows leave it now (``set_room``)
        self._pages: OrderedDict[tuple, Page] = OrderedDict()  # (parent, tokens) -> page
        self._held: dict = {}  # row -> the pages it pins
        self.bytes = 0
        self.pinned_bytes = 0
        self.lookups = self.prompt_tokens = self.hit_tokens = self.evicted_pages = 0

    # ---- one batch of new rows ---------------------------------------------------------------------
    def pages_for(self, rows: list, prompts: list[list[int]]) -> "BatchPages":
        """The executor's ``pages`` argument for prefilling ``prompts`` (one per row)."""
        return BatchPages(self, rows, prompts)

    def lookup(self, prompt: list[int]) -> list[Page]:
        """The longest chain of cached pages that starts ``prompt`` and ends before its last token
        (touched: most recently used)."""
        chain, P = [], self.page_tokens
        while (len(chain) + 1) * P < len(prompt):
            start = len(chain) * P
            page = self._pages.get((chain[-1] if chain else None, tuple(prompt[start:start + P])))
            if page is None:
                break
            chain.append(page)
        for page in reversed(chain):  # the chain's root ends up most recent: leaves are evicted first
            self._pages.move_to_end((page.parent, page.tokens))
        self.lookups += 1
        self.prompt_tokens += len(prompt)
        self.hit_tokens += len(chain) * P
        return chain

    def restore(self, chain: list[Page]) -> towers.TowerState:
        """One row's state after the chain's tokens (K/V buffers exactly that long)."""
        last = chain[-1]
        return towers.TowerState(
            lengths=torch.tensor([len(chain) * self.page_tokens]),
            keys={i: torch.cat([p.keys[i] for p in chain], dim=1) for i in last.keys},
            values={i: torch.cat([p.values[i] for p in chain], dim=1) for i in last.values},
            conv=dict(last.conv), ssm=dict(last.ssm))

    def insert(self, parent: Page | None, tokens: tuple, state: towers.TowerState) -> Page | None:
        """Cache the page ``tokens`` that ``state`` (one row) has just ended, after ``parent``.
        Returns it (an equal page already cached: that one), or None when it finds no room."""
        key = (parent, tokens)
        if key in self._pages:
            self._pages.move_to_end(key)
            return self._pages[key]
        hi = int(state.lengths[0])
        lo = hi - self.page_tokens
        nbytes = _nbytes([t[:, lo:hi] for t in (*state.keys.values(), *state.values.values())]) + \
            _nbytes([*state.conv.values(), *state.ssm.values()])
        if not self._evict(self.limit - nbytes):
            return None
        # copies: the row's buffers go on growing, and its Mamba states may be updated in place
        page = Page(parent, tokens,
                    keys={i: t[:, lo:hi].clone() for i, t in state.keys.items()},
                    values={i: t[:, lo:hi].clone() for i, t in state.values.items()},
                    conv={i: t.clone() for i, t in state.conv.items()},
                    ssm={i: t.clone() for i, t in state.ssm.items()}, nbytes=nbytes)
        self._pages[key] = page
        self.bytes += nbytes
        if parent is not None:
            parent.children += 1
        return page

    # ---- pins and room -----------------------------------------------------------------------------
    def pin(self, row, pages: list[Page]) -> None:
        for page in pages:
            if page.pins == 0:
                self.pinned_bytes += page.nbytes
            page.pins += 1
        self._held.setdefault(row, []).extend(pages)

    def release_finished(self) -> None:
        """Unpin the pages of rows that have finished (done, cancelled or failed)."""
        for row in [r for r in self._held if r.out.finished]:
            for page in self._held.pop(row):
                page.pins -= 1
                if page.pins == 0:
                    self.pinned_bytes -= page.nbytes

    def set_room(self, room: int) -> None:
        """The scheduler leaves the cache ``room`` bytes of its budget: evict down to it (or to
        ``capacity_bytes``). Pinned pages stay; admission never lets them pass the room."""
        self.limit = max(0, min(self.capacity_bytes, room))
        self._evict(self.limit)

    def _evict(self, target: int) -> bool:
        """Evict least-recently-used unpinned leaf pages until at most ``target`` bytes are cached."""
        while self.bytes > target:
            victim = next((p for p in self._pages.values() if p.children == 0 and p.pins == 0), None)
            if victim is None:
                return False
            del self._pages[(victim.parent, victim.tokens)]
            self.bytes -= victim.nbytes
            self.evicted_pages += 1
            if victim.parent is not None:
                victim.parent.children -= 1
        return True

    def stats(self) -> dict:
        return {"page_tokens": self.page_tokens, "pages": len(self._pages), "bytes": self.bytes,
                "capacity_bytes": self.capacity_bytes, "pinned_bytes": self.pinned_bytes,
                "lookups": self.lookups, "prompt_tokens": self.prompt_tokens, "hit_tokens": self.hit_tokens,
                "hit_rate": self.hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0,
                "evicted_pages": self.evicted_pages}


class BatchPages:
    """The prefix cache seen by one prefill of new rows (the executor's ``pages`` argument): each
    row resumes from its prompt's longest cached prefix, looked up just before its own prefill (so
    a row sees the pages the rows before it in the batch have just cached), and its new pages are
    cached as they are computed. A row pins every page of its prompt it used or cached."""

    def __init__(self, cache: PrefixCache, rows: list, prompts: list[list[int]]):
        self.cache, self.rows, self.prompts = cache, rows, prompts
        self.chains: list[list[Page]] = [[] for _ in rows]

    def resume(self, b: int) -> towers.TowerState | None:
        """Row b's state after its cached prefix (None: a miss); records its hit tokens."""
        chain = self.chains[b] = self.cache.lookup(self.prompts[b])
        self.cache.pin(self.rows[b], chain)
        self.rows[b].out.cached_tokens = len(chain) * self.cache.page_tokens
        return self.cache.restore(chain) if chain else None

    def store(self, b: int, end: int, state: towers.TowerState) -> None:
        """Row b's prefill has just reached the page boundary ``end``."""
        chain, P = self.chains[b], self.cache.page_tokens
        if len(chain) * P != end - P:  # an earlier page of this prompt found no room
            return
        page = self.cache.insert(chain[-1] if chain else None, tuple(self.prompts[b][end - P:end]), state)
        if page is not None:
            chain.append(page)
            self.cache.pin(self.rows[b], [page])
