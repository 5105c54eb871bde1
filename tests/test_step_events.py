"""``on_step``: what every forward did to every row, on the trained demo model (CPU, float32).

The events must cover exactly the tokens returned, diffusion steps must fill each block once within
its step budget, speculative events must agree with the accepted counts and with the AR tokens that
replace rejected drafts, and a row's events in a batch must be the ones it has alone.
"""

from __future__ import annotations

import random

import pytest

from trtllm_twotower.demo import TRAINED_DEMO_DIR
from trtllm_twotower.runtime import StepEvent, TwoTowerRuntime

PROMPTS = ["Return a new list of", "The file is", "Create a new"]


@pytest.fixture(scope="module")
def runtime():
    return TwoTowerRuntime.from_checkpoint(TRAINED_DEMO_DIR, dtype="float32")


def rows_of(events: list[StepEvent], rows: int) -> list[list[StepEvent]]:
    return [[e for e in events if e.row == b] for b in range(rows)]


def output_of(events: list[StepEvent]) -> list[int]:
    return [t for e in events if e.kind in ("block", "token") for t in e.tokens]


def blocks_of(events: list[StepEvent]) -> list[tuple[list[StepEvent], StepEvent]]:
    """(the "step" events of each block, its "block" event), in order."""
    out, steps = [], []
    for e in events:
        if e.kind == "step":
            steps.append(e)
        else:
            out.append((steps, e))
            steps = []
    assert not steps, "steps after the last block"
    return out


def check_confidences(events: list[StepEvent]) -> None:
    for e in events:
        assert len(e.confidences) == (len(e.tokens) if e.kind != "block" else 0)
        assert all(0 < c <= 1 for c in e.confidences), e


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_diffusion_steps_fill_each_block_once_within_the_budget(runtime, temperature):
    rng = random.Random(temperature)
    L, budget, max_new = 16, rng.choice([4, 8, 16]), rng.choice([40, 48, 64])
    events = []
    result = runtime.generate(PROMPTS, max_new_tokens=max_new, block_size=L, steps_per_block=budget,
                              confidence_threshold=0.5, temperature=temperature, seed=[rng.randrange(1000) for _ in PROMPTS],
                              on_step=events.append)
    for b, mine in enumerate(rows_of(events, len(PROMPTS))):
        assert output_of(mine) == result.output_ids[b]
        check_confidences(mine)
        blocks = blocks_of(mine)
        assert sum(len(steps) for steps, _ in blocks) == result.nfe_per_row[b]
        for index, (steps, block) in enumerate(blocks):
            assert block.kind == "block" and block.block == index and all(s.block == index for s in steps)
            assert 1 <= len(steps) <= budget and [s.step for s in steps] == list(range(len(steps)))
            filled = {}
            for s in steps:
                assert s.positions and not set(s.positions) & set(filled)  # each step commits, never twice
                filled.update(zip(s.positions, s.tokens))
            assert sorted(filled) == list(range(L))  # the block is full after its steps
            kept = block.tokens
            assert block.positions == list(range(len(kept))) and kept == [filled[p] for p in range(len(kept))]
            assert len(kept) == L or index == len(blocks) - 1  # only the last block is cut


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_speculative_events_match_the_accepted_drafts(runtime, temperature):
    L, rows = 8, len(PROMPTS)
    events = []
    result = runtime.generate(PROMPTS, max_new_tokens=48, mode="speculative", block_size=L, steps_per_block=2,
                              confidence_threshold=0.5, temperature=temperature, seed=[3, 4, 5],
                              on_step=events.append)
    accepted = []
    for b, mine in enumerate(rows_of(events, rows)):
        assert output_of(mine) == result.output_ids[b]
        check_confidences(mine)
        blocks = blocks_of(mine)
        given = None
        for index, (steps, block) in enumerate(blocks):
            assert block.block == index
            if block.accepted is None:  # the row ended on the last verification's AR token
                assert index == len(blocks) - 1 and not steps and block.tokens == [given]
                continue
            accepted.append(block.accepted)
            assert 1 <= len(steps) <= 2
            drafts = {p: t for s in steps for p, t in zip(s.positions, s.tokens)}
            assert sorted(drafts) == list(range(1, L))  # position 0 is the known AR token
            kept = block.tokens
            assert 1 <= len(kept) <= 1 + block.accepted
            assert kept[1:] == [drafts[p] for p in range(1, len(kept))]
            if given is not None:
                assert kept[0] == given  # the previous block's corrected token opens this one
            if temperature == 0 and block.accepted < L - 1:
                assert block.corrected != drafts[1 + block.accepted]  # greedy: it replaced a rejected draft
            given = block.corrected
        if temperature == 0:  # and what the events add up to is the AR output
            ar = runtime.generate([PROMPTS[b]], max_new_tokens=48, mode="ar", temperature=0.0)
            assert result.output_ids[b] == ar.output_ids[0]
    assert len(accepted) == result.stats["blocks"]
    assert sum(accepted) / len(accepted) == pytest.approx(result.stats["accepted_per_block"])
    assert len(set(accepted)) > 1  # rows and blocks accept different numbers of drafts


@pytest.mark.parametrize("mode", ["ar", "mock-ar"])
def test_token_modes_report_one_token_per_step(runtime, mode):
    events = []
    result = runtime.generate(PROMPTS, max_new_tokens=20, mode=mode, temperature=0.8, seed=[7, 8, 9],
                              on_step=events.append)
    for b, mine in enumerate(rows_of(events, len(PROMPTS))):
        assert all(e.kind == "token" and len(e.tokens) == 1 for e in mine)
        assert output_of(mine) == result.output_ids[b]
        assert [e.block for e in mine] == list(range(len(mine)))
        assert [e.step for e in mine] == list(range(result.nfe_per_row[b]))
        check_confidences(mine)


@pytest.mark.parametrize("mode", ["diffusion", "speculative", "ar"])
def test_a_rows_events_are_its_events_alone(runtime, mode):
    """Rows of one batch with different settings: each row's events equal running it alone."""
    settings = [dict(confidence_threshold=0.5, temperature=0.0, steps_per_block=4),
                dict(confidence_threshold=0.9, temperature=0.8, steps_per_block=8),
                dict(confidence_threshold=0.7, temperature=0.0, steps_per_block=2)]
    common = dict(max_new_tokens=32, mode=mode, block_size=8)
    requests = [runtime.prepare([p], seed=11 + b, **common, **s) for b, (p, s) in enumerate(zip(PROMPTS, settings))]
    together = [[] for _ in PROMPTS]
    tickets = [runtime.submit(r, on_step=together[b].append) for b, r in enumerate(requests)]
    for t in tickets:
        runtime.scheduler.run_until(t)
    for b, request in enumerate(requests):
        alone = []
        runtime.run(request, on_step=alone.append)
        assert [(e.kind, e.block, e.step, e.positions, e.tokens, e.accepted, e.corrected) for e in together[b]] == \
            [(e.kind, e.block, e.step, e.positions, e.tokens, e.accepted, e.corrected) for e in alone]
        for e, f in zip(together[b], alone):
            assert e.confidences == pytest.approx(f.confidences, rel=1e-5, abs=1e-6)
