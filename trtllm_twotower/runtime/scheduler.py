"""In-flight batching: one scheduler owns the running rows of every request.

``submit`` queues a request's rows (any thread); each ``step`` first admits waiting rows that fit
(prefilled alone, then joined to the lane of their mode and block size), then advances every lane
by one unit (a denoiser step, or a token for AR / mock-AR). Admission takes one row of each waiting
request in turn (round robin), so a request with many prompts does not hold a short one back, and
``reserved_rows`` slots of the batch are never filled by a single request: a request arriving at a
full batch of another one's rows starts at the next unit. The waiting queue holds at most
``max_queued_requests`` requests (``QueueFullError`` past that); ``close`` refuses new requests and
``abort`` fails every submitted one (a server's drain). Finished and cancelled rows leave at
once, so a new request waits at most one unit for its turn (then starts its first block at its own
boundary), never for the running batch to finish. Rows with
different thresholds, temperatures, seeds, step budgets and lengths share forwards (per-row values
in the commit rule); every row keeps its own generators, so its tokens equal running it alone.

The batch capacity comes from memory: a row's state (K/V for its length, conv and fp32 SSM states,
speculative mode's per-position states) is counted against ``memory_budget`` bytes (default: 80 %
of the free memory of the context device, or a quarter of the host's RAM on CPU), and at most
``max_batch`` rows run at once. The prefix cache (``runtime/prefix_cache.py``, at most
``prefix_cache_bytes``, default: the whole budget, 0: off) lives in the same budget: its pages
yield to new rows (least recently used first), except those that running rows hold. The Python API
drives a scheduler in the caller's thread; the servers run one in a background thread (``start``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from typing import Callable

import torch

from ..engine_io import state_bytes_per_row
from .lanes import LANES, Row, lane_key
from .prefix_cache import PrefixCache
from .sampler import SamplerSettings

log = logging.getLogger(__name__)
DEFAULT_MAX_BATCH = 256
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


class CapacityError(ValueError):
    """A request that cannot run within the scheduler's memory budget even alone."""


class QueueFullError(RuntimeError):
    """The waiting queue holds ``max_queued_requests`` requests already (the client may retry)."""


class ClosedError(RuntimeError):
    """The scheduler is draining or stopped: it takes no new requests."""


class Ticket:
    """A submitted request: its rows in order, streamed events, completion and errors.

    ``on_event(index, new_token_ids, finished)`` and ``on_done(ticket)`` (once, after the last event
    or a failure) are called from the scheduler's thread."""

    def __init__(self, on_event: Callable[[int, list[int], bool], None] | None,
                 on_done: Callable[["Ticket"], None] | None = None):
        self.rows: list[Row] = []
        self.waiting: deque[Row] = deque()  # rows not admitted yet, in order
        self.on_event = on_event
        self.on_done = on_done
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.submitted = time.perf_counter()
        self.first_tokens: float | None = None  # when the first row got its first tokens
        self.finished: float | None = None
        self.stopped: dict[int, int] = {}  # rows ended by a stop string: row index -> tokens kept
        self._open = 0

    def cancel(self) -> None:
        """Every row leaves before the next unit (its last event has finished=True)."""
        for r in self.rows:
            r.cancelled = True

    def stop_row(self, index: int, tokens_kept: int) -> None:
        """End a row at a stop string: it leaves before its next unit (as a cancelled row does) and
        its output is its first ``tokens_kept`` tokens. Call from the scheduler's thread (an event)."""
        self.stopped[index] = tokens_kept
        self.rows[index].cancelled = True

    @property
    def cancelled(self) -> bool:
        """A row was cancelled (the client went away), not ended by a stop string."""
        return any(r.out.cancelled and r.index not in self.stopped for r in self.rows)

    @property
    def running(self) -> int:
        """Rows admitted and not finished."""
        return self._open - len(self.waiting)

    def _emit(self, row: Row, tokens: list[int]) -> None:
        if tokens and self.first_tokens is None:
            self.first_tokens = time.perf_counter()
        if self.on_event is not None and self.error is None:
            self.on_event(row.index, tokens, row.out.finished)
        if row.out.finished:
            self._open -= 1
            if self._open == 0:
                self._close()

    def _fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
        self.cancel()
        self._close()

    def _close(self) -> None:
        if not self.done.is_set():
            self.finished = time.perf_counter()
            self.done.set()
            if self.on_done is not None:
                self.on_done(self)


def default_memory_budget(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(0.8 * free)
    return int(0.25 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


class Scheduler:
    def __init__(self, executor, cfg, max_batch: int | None = None, memory_budget: int | None = None,
                 prefix_cache_bytes: int | None = None, max_queued_requests: int | None = None,
                 reserved_rows: int = 0):
        self.executor = executor
        self.cfg = cfg
        self.max_batch = max_batch or DEFAULT_MAX_BATCH
        self.max_queued_requests = max_queued_requests  # None: unbounded (the Python API)
        self.reserved_rows = reserved_rows  # servers: max_batch // 8, at least 1
        self.memory_budget = memory_budget if memory_budget is not None else \
            default_memory_budget(executor.context_device)
        cache_bytes = self.memory_budget if prefix_cache_bytes is None else min(prefix_cache_bytes, self.memory_budget)
        self.prefix_cache = PrefixCache(executor.page_tokens, cache_bytes) if cache_bytes > 0 else None
        self.lanes: dict[tuple, object] = {}
        self._waiting: deque[Ticket] = deque()  # requests with rows to admit; the head is served next
        self._lock = threading.RLock()  # guards _waiting and _closed (callbacks under it may read counts)
        self._wake = threading.Condition(self._lock)
        self._drive = threading.Lock()  # one thread steps at a time
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._closed = False

    # ---- requests (any thread) -----------------------------------------------------------------------
    def submit(self, mode: str, prompts: list[list[int]], settings: SamplerSettings | list[SamplerSettings],
               seeds: list[int], on_event=None, on_done=None, on_step=None, ticket: Ticket | None = None) -> Ticket:
        """Queue one request (one row per prompt); settings: one for all rows or one per row. Raises
        CapacityError (it can never fit), QueueFullError or ClosedError before queueing anything.
        ``on_step(lanes.StepEvent)``: every forward of every row, from the scheduler's thread.
        ``ticket``: one the caller made (with its callbacks), so that they can reach it."""
        per_row = settings if isinstance(settings, list) else [settings] * len(prompts)
        ticket = ticket or Ticket(on_event, on_done)
        for index, (prompt, s, seed) in enumerate(zip(prompts, per_row, seeds, strict=True)):
            row = Row(mode, prompt, s, seed, ticket._emit, ticket._fail, index, on_step)
            need = self._row_bytes(row, row.tokens_needed)
            if need > self.memory_budget:
                raise CapacityError(f"request needs {need} bytes of state for {row.tokens_needed} tokens; the "
                                    f"scheduler's memory budget is {self.memory_budget} bytes")
            ticket.rows.append(row)
        ticket._open = len(ticket.rows)
        ticket.waiting.extend(ticket.rows)
        with self._lock:
            if self._closed:
                raise ClosedError("the server is shutting down and takes no new requests")
            if self.max_queued_requests is not None and len(self._waiting) >= self.max_queued_requests:
                raise QueueFullError(f"{len(self._waiting)} requests are waiting already (the limit); retry later")
            self._waiting.append(ticket)
            self._wake.notify()
        return ticket

    @property
    def running(self) -> int:
        return sum(len(lane) for lane in list(self.lanes.values()))  # also read by a server's metrics

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def waiting(self) -> int:
        """Rows waiting for admission."""
        with self._lock:
            return sum(len(t.waiting) for t in self._waiting)

    @property
    def queued_requests(self) -> int:
        with self._lock:
            return len(self._waiting)

    def close(self) -> None:
        """Refuse new requests (ClosedError); submitted ones go on."""
        with self._lock:
            self._closed = True

    def abort(self, error: BaseException) -> None:
        """Fail every submitted request that has not finished with ``error`` (its rows leave at the
        next unit; its ``on_done`` hears of it)."""
        with self._drive:  # between two units
            for lane in self.lanes.values():
                for row in lane.rows:
                    row.fail(error)
            with self._lock:
                waiting = list(self._waiting)
            for ticket in waiting:
                ticket._fail(error)
            with self._lock:
                self._wake.notify()

    # ---- the loop ---------------------------------------------------------------------------------------
    def step(self) -> bool:
        """Admit what fits, then one unit of every lane. Returns False when there was nothing to do."""
        with self._drive:
            self._admit()
            worked = False
            for key, lane in list(self.lanes.items()):
                lane.remove_cancelled()
                if not len(lane):
                    continue
                worked = True
                try:
                    lane.advance()
                except Exception as err:  # noqa: BLE001 - every row of the lane hears of it; others go on
                    log.exception("twotower: lane %s failed", key)
                    for r in lane.rows:
                        r.leave_failed(err)
                    del self.lanes[key]
            if self.prefix_cache is not None:
                self.prefix_cache.release_finished()
            return worked

    def run_until(self, ticket: Ticket) -> None:
        """Drive the scheduler in this thread until ``ticket`` is done (or wait, if a background
        thread drives it)."""
        while not ticket.done.is_set():
            if self._thread is not None:
                ticket.done.wait()
            elif not self.step():
                time.sleep(0.001)  # rows admitted by another caller's step are still running

    def _row_bytes(self, row: Row, capacity: int) -> int:
        trace = row.settings.block_size if row.mode == "speculative" else 0
        return state_bytes_per_row(self.cfg, capacity, DTYPE_NAMES[self.executor.dtype], trace)

    def _lane_bytes(self, key: tuple, extra: list[Row], extra_need: int) -> int:
        """State bytes of a lane once ``extra`` rows (needing up to ``extra_need`` slots) joined: every
        row of a lane has the same kind of state, its K/V sized by the lane's longest row."""
        lane = self.lanes.get(key)
        rows = (len(lane) if lane is not None else 0) + len(extra)
        if rows == 0:
            return 0
        capacity = max(lane.capacity if lane is not None else 0, extra_need)
        sample = extra[0] if extra else lane.rows[0]
        return rows * self._row_bytes(sample, capacity)

    def _drop_cancelled(self) -> None:
        """Cancelled requests leave the queue (their rows' last events); call with the lock held. A
        waiting row is only ever cancelled with its whole request, so the first one tells."""
        for ticket in [t for t in self._waiting if t.waiting[0].cancelled]:
            self._waiting.remove(ticket)
            while ticket.waiting:
                ticket.waiting.popleft().leave_cancelled()

    def _admit(self) -> None:
        admitted: dict[tuple, list[Row]] = {}
        need: dict[tuple, int] = {}
        lane_bytes = {key: self._lane_bytes(key, [], 0) for key in self.lanes}
        rows_now = self.running
        held = 0 if self.prefix_cache is None else self.prefix_cache.pinned_bytes  # the rest yields to rows
        share = max(1, self.max_batch - self.reserved_rows)  # the most rows one request may hold
        with self._lock:
            self._drop_cancelled()
            held_back: set[int] = set()  # requests at their share, passed over in this round
            while len(held_back) < len(self._waiting):
                ticket = self._waiting[0]
                if ticket.running >= share:
                    self._waiting.rotate(-1)
                    held_back.add(id(ticket))
                    continue
                row = ticket.waiting[0]
                key = lane_key(row.mode, row.settings)
                extra = admitted.get(key, []) + [row]
                extra_need = max(need.get(key, 0), row.tokens_needed)
                trial = self._lane_bytes(key, extra, extra_need)
                total = sum(lane_bytes.values()) - lane_bytes.get(key, 0) + trial
                if rows_now + 1 > self.max_batch or total + held > self.memory_budget:
                    break  # the head request is served first once there is room
                ticket.waiting.popleft()
                if ticket.waiting:
                    self._waiting.rotate(-1)  # round robin: the next request's turn
                else:
                    self._waiting.popleft()
                admitted[key], need[key], lane_bytes[key] = extra, extra_need, trial
                rows_now += 1
        if self.prefix_cache is not None:
            self.prefix_cache.set_room(self.memory_budget - sum(lane_bytes.values()))
        for key, rows in admitted.items():
            lane = self.lanes.setdefault(key, LANES[rows[0].mode](self.executor, key, self.prefix_cache))
            try:
                lane.admit(rows)
            except Exception as err:  # noqa: BLE001 - a failed prefill fails its own requests only
                log.exception("twotower: prefill failed")
                for r in rows:
                    r.leave_failed(err)
                if not lane.rows:
                    del self.lanes[key]

    # ---- background thread --------------------------------------------------------------------------
    def start(self) -> "Scheduler":
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name="twotower-scheduler", daemon=True)
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        """A background thread is serving (``start`` was called and it has not stopped)."""
        return self._thread is not None and self._thread.is_alive()

    def _serve(self) -> None:
        while True:
            with self._lock:
                while not self._waiting and not self.running and not self._stopping:
                    self._wake.wait()
                if self._stopping and not self._waiting and not self.running:
                    return
            try:
                self.step()
            except Exception:  # noqa: BLE001 - step fails rows itself; whatever escapes must not end serving
                log.exception("twotower: scheduler step failed")

    def stop(self) -> None:
        """Finish everything submitted, then stop the thread."""
        with self._lock:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
