"""Admission and back-pressure in the scheduler: round robin between requests, the rows one request
may hold, the bounded waiting queue, closing and aborting (a server's drain). Driven step by step in
this thread on the demo checkpoint (AR rows: one token per step)."""

from __future__ import annotations

import random

import pytest

from trtllm_twotower.runtime import TwoTowerRuntime
from trtllm_twotower.runtime.scheduler import ClosedError, QueueFullError, Scheduler


@pytest.fixture(scope="module")
def runtime(demo_dir):
    return TwoTowerRuntime.from_checkpoint(demo_dir, dtype="float32")


def submit(scheduler, runtime, prompts, max_new_tokens, seed=0):
    request = runtime.prepare(prompts, max_new_tokens=max_new_tokens, mode="ar", temperature=0.9, seed=seed,
                              eos_token_id=None)
    return scheduler.submit("ar", request.prompt_ids, request.settings, request.seeds)


def random_prompts(count: int, rng: random.Random) -> list[list[int]]:
    return [[rng.randrange(5, 250) for _ in range(rng.randrange(2, 9))] for _ in range(count)]


def steps_until_done(scheduler, ticket, limit=500) -> int:
    for steps in range(1, limit + 1):
        scheduler.step()
        if ticket.done.is_set():
            return steps
    raise AssertionError(f"not done after {limit} steps")


def test_a_short_request_beside_a_wide_one_starts_at_the_next_step(runtime):
    rng = random.Random()
    scheduler = Scheduler(runtime.executor, runtime.cfg, max_batch=8, memory_budget=1 << 40, reserved_rows=1)
    wide = submit(scheduler, runtime, random_prompts(40, rng), 6, seed=rng.randrange(1000))
    scheduler.step()
    assert scheduler.running == 7  # the wide request holds at most max_batch - reserved_rows
    short_prompt = random_prompts(1, rng)
    short = submit(scheduler, runtime, short_prompt, 4, seed=3)
    assert steps_until_done(scheduler, short) == 4  # admitted at once: one token per step, as alone
    assert not wide.done.is_set()
    steps_until_done(scheduler, wide)
    alone = runtime.generate(short_prompt, max_new_tokens=4, mode="ar", temperature=0.9, seed=3, eos_token_id=None)
    assert [r.out.tokens for r in short.rows] == alone.output_ids  # its tokens do not depend on the batch


def test_admission_takes_turns_between_waiting_requests(runtime):
    rng = random.Random()
    scheduler = Scheduler(runtime.executor, runtime.cfg, max_batch=6, memory_budget=1 << 40)
    first = submit(scheduler, runtime, random_prompts(20, rng), 3)
    second = submit(scheduler, runtime, random_prompts(20, rng), 3)
    scheduler.step()
    assert first.running == 3 and second.running == 3  # not the first request's six rows


def test_the_waiting_queue_is_bounded(runtime):
    rng = random.Random()
    scheduler = Scheduler(runtime.executor, runtime.cfg, max_batch=2, memory_budget=1 << 40, max_queued_requests=2)
    tickets = [submit(scheduler, runtime, random_prompts(1, rng), 2) for _ in range(2)]
    with pytest.raises(QueueFullError, match="2 requests are waiting"):
        submit(scheduler, runtime, random_prompts(1, rng), 2)
    scheduler.step()  # both admitted: the queue is empty again
    assert scheduler.queued_requests == 0
    tickets.append(submit(scheduler, runtime, random_prompts(1, rng), 2))
    tickets[-1].cancel()  # a cancelled request leaves the queue at the next step
    for t in tickets:
        steps_until_done(scheduler, t)
    assert scheduler.queued_requests == 0 and tickets[-1].cancelled


def test_close_refuses_and_abort_fails_what_runs_and_waits(runtime):
    rng = random.Random()
    scheduler = Scheduler(runtime.executor, runtime.cfg, max_batch=1, memory_budget=1 << 40)
    running = submit(scheduler, runtime, random_prompts(1, rng), 50)
    waiting = submit(scheduler, runtime, random_prompts(1, rng), 50)
    scheduler.step()
    scheduler.close()
    with pytest.raises(ClosedError):
        submit(scheduler, runtime, random_prompts(1, rng), 2)
    scheduler.abort(RuntimeError("drain timeout"))
    assert running.done.is_set() and waiting.done.is_set()
    assert str(running.error) == "drain timeout" and str(waiting.error) == "drain timeout"
    scheduler.step()  # the aborted rows leave
    assert scheduler.running == 0 and scheduler.queued_requests == 0
