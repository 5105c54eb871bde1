"""Per-token log-probabilities in the runtime (``logprobs=N``), on the trained demo model (CPU, float32).

They must not change a token (every mode, greedy and sampled, alone and beside rows that do not ask),
come with each output id (result, ``on_block`` and ``on_step`` alike), hold N alternatives sorted,
and be what each mode documents: speculative reports the AR distribution (equal to AR's logprobs
when greedy), diffusion and mock-AR the probability their step committed the token with (the step
events' confidences), AR the log_softmax of the context tower's logits (checked against
transformers in ``test_openai_logprobs.py``).
"""

from __future__ import annotations

import math
import random

import pytest

from trtllm_twotower.demo import TRAINED_DEMO_DIR
from trtllm_twotower.runtime import TwoTowerRuntime

MODES = ["diffusion", "speculative", "ar", "mock-ar"]
PROMPTS = ["Return a new list of", "The file is"]
KNOBS = dict(block_size=8, steps_per_block=4, confidence_threshold=0.5)


@pytest.fixture(scope="module")
def runtime():
    return TwoTowerRuntime.from_checkpoint(TRAINED_DEMO_DIR, dtype="float32")


def check_entries(entries, count: int, greedy: bool) -> None:
    for e in entries:
        assert len(e.top) == count
        values = [v for _, v in e.top]
        assert values == sorted(values, reverse=True) and all(v <= 0 for v in values) and e.logprob <= 0
        if greedy and count:
            assert e.logprob == pytest.approx(values[0], abs=1e-6)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("mode", MODES)
def test_tokens_are_the_same_with_and_without_logprobs(runtime, mode, temperature):
    count = random.randint(0, 20)
    seed = random.randrange(1000)
    kw = dict(max_new_tokens=30, mode=mode, temperature=temperature, seed=seed, **KNOBS)
    plain = runtime.generate(PROMPTS, **kw)
    events, blocks = [], []
    asked = runtime.generate(PROMPTS, logprobs=count, on_step=events.append, on_block=blocks.append, **kw)
    assert asked.output_ids == plain.output_ids and asked.text == plain.text and plain.logprobs is None
    for row, (ids, entries) in enumerate(zip(asked.output_ids, asked.logprobs)):
        assert len(entries) == len(ids)
        check_entries(entries, count, temperature == 0)
        assert [x for e in events if e.row == row and e.kind in ("block", "token") for x in e.logprobs] == entries
        assert [x for b in blocks if b.row == row for x in b.logprobs] == entries
        assert all(e.logprobs is None for e in events if e.kind == "step")


@pytest.mark.parametrize("mode", MODES)
def test_a_row_that_asks_beside_one_that_does_not(runtime, mode):
    """Two requests share a lane; only the second asks. Each gets what it gets alone."""
    kw = dict(max_new_tokens=24, mode=mode, temperature=0.7, **KNOBS)
    alone = [runtime.generate([p], seed=s, logprobs=n, **kw) for p, s, n in zip(PROMPTS, (4, 9), (None, 5))]
    tickets = [runtime.submit(runtime.prepare([p], seed=s, logprobs=n, **kw))
               for p, s, n in zip(PROMPTS, (4, 9), (None, 5))]
    for t in tickets:
        runtime.scheduler.run_until(t)
    together = [runtime.result(t) for t in tickets]
    assert [r.output_ids for r in together] == [r.output_ids for r in alone]
    assert together[0].logprobs is None
    for got, want in zip(together[1].logprobs[0], alone[1].logprobs[0]):
        assert got.logprob == pytest.approx(want.logprob, abs=1e-5)
        assert [i for i, _ in got.top] == [i for i, _ in want.top]


def test_speculative_reports_the_ar_distribution(runtime):
    """Greedy speculative output is AR's token for token; its logprobs are AR's too (the context
    tower's logits at the same positions, from a block extend instead of single steps)."""
    kw = dict(max_new_tokens=40, temperature=0.0, seed=0, logprobs=4, **KNOBS)
    ar = runtime.generate(PROMPTS, mode="ar", **kw)
    spec = runtime.generate(PROMPTS, mode="speculative", **kw)
    assert spec.output_ids == ar.output_ids
    for row_spec, row_ar in zip(spec.logprobs, ar.logprobs):
        for s, a in zip(row_spec, row_ar):
            assert s.logprob == pytest.approx(a.logprob, abs=1e-4)
            assert [v for _, v in s.top] == pytest.approx([v for _, v in a.top], abs=1e-4)


@pytest.mark.parametrize("mode", ["diffusion", "mock-ar"])
def test_greedy_logprob_is_the_committing_probability(runtime, mode):
    """Greedy diffusion / mock-AR: exp(logprob) is the temperature-1 probability the step events
    report for the token (diffusion: the denoiser step that committed it, mask token excluded)."""
    events = []
    result = runtime.generate(PROMPTS[:1], max_new_tokens=32, mode=mode, temperature=0.0, seed=0, logprobs=1,
                              on_step=events.append, **KNOBS)
    committed = []  # the committing probability of each output token, in order
    if mode == "mock-ar":
        committed = [c for e in events for c in e.confidences]
    else:
        at: dict[int, float] = {}
        for e in events:
            if e.kind == "step":
                at.update(zip(e.positions, e.confidences))
            else:
                committed += [at[p] for p in e.positions]
                at = {}
    entries = result.logprobs[0]
    assert len(committed) == len(entries) == len(result.output_ids[0])
    for probability, entry in zip(committed, entries):
        assert math.exp(entry.logprob) == pytest.approx(probability, rel=1e-5)


def test_a_stop_string_cuts_the_logprobs_with_the_ids(runtime):
    full = runtime.generate(PROMPTS[:1], max_new_tokens=40, mode="ar", temperature=0.0, logprobs=2)
    text = full.text[0]
    stop = text[10:13]
    cut = runtime.generate(PROMPTS[:1], max_new_tokens=40, mode="ar", temperature=0.0, logprobs=2, stop=stop)
    kept = len(cut.output_ids[0])
    assert kept < len(full.output_ids[0]) and cut.logprobs[0] == full.logprobs[0][:kept]


@pytest.mark.parametrize("value", [-1, 21, True, 2.5, "3"])
def test_bad_logprobs_are_refused(runtime, value):
    with pytest.raises(ValueError, match=r"logprobs: expected None or an integer in \[0, 20\]"):
        runtime.generate(PROMPTS[:1], max_new_tokens=4, logprobs=value)
