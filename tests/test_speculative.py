"""Speculative mode: the denoiser drafts, the context tower verifies; the output is the AR model's.

- greedy: speculative == ar token for token on real tiny checkpoints (several layer patterns,
  prompt lengths, block sizes; batched and row by row), also with a scripted denoiser whose drafts
  are mostly right (so whole blocks, partial blocks and bonus tokens all occur);
- sampled: on a toy two-tower model with a 6-token vocabulary, the joint law of the first three
  tokens equals the AR model's (chi-square), and the same test fails for the naive rule;
- the rollback is exact: bit-identical to a fresh extend over the accepted tokens (fp32, with
  batch-invariant ops so that BLAS shape effects cannot hide an off-by-one).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import pytest
import torch

from conftest import load_towers
from invariant_ops import RowInvariantOps
from trtllm_twotower.config import config_from_dict
from trtllm_twotower.demo import DEMO_CONFIG, write_demo_checkpoint
from trtllm_twotower.network import towers
from trtllm_twotower.runtime import TwoTowerRuntime, lanes, sampler
from trtllm_twotower.runtime.executor import TorchExecutor
from trtllm_twotower.runtime.scheduler import Scheduler


@pytest.fixture(scope="module")
def pattern_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec")
    return {p: write_demo_checkpoint(root / p.replace("*", "A"), seed=i + 11, hybrid_override_pattern=p)
            for i, p in enumerate(("M*EME*ME", "M*E-ME*M", "*MM-E"))}


# ---- greedy: identical to AR -------------------------------------------------------------------------

@pytest.mark.parametrize("pattern", ["M*EME*ME", "M*E-ME*M", "*MM-E"])
@pytest.mark.parametrize("block_size", [2, 5, 16])
def test_greedy_speculative_equals_ar(pattern_dirs, pattern, block_size):
    rt = TwoTowerRuntime.from_checkpoint(pattern_dirs[pattern], dtype="float32")
    prompts = [[7], [9, 130, 44, 21, 5, 77, 250, 4, 12, 99, 31], [200, 6, 17]]
    kw = dict(max_new_tokens=23, eos_token_id=None, block_size=block_size, steps_per_block=3,
              confidence_threshold=0.02)
    ar = rt.generate(prompts, mode="ar", **kw)
    spec = rt.generate(prompts, mode="speculative", **kw)
    assert spec.output_ids == ar.output_ids
    for b, p in enumerate(prompts):
        assert rt.generate([p], mode="speculative", **kw).output_ids[0] == ar.output_ids[b]
    assert spec.stats["blocks"] >= 1 and 0 <= spec.stats["accepted_per_block"] <= block_size - 1


class OracleDrafts(TorchExecutor):
    """The real towers for one prompt, but the denoiser's logits point at the AR greedy
    continuation, except at output positions in ``wrong``: drafts are then right in long runs, so
    whole blocks, bonus tokens and rejections at known places all happen."""

    def __init__(self, base: TorchExecutor, prompt_len: int, continuation: list[int], wrong: set[int]):
        super().__init__(base.cfg, base.ctx_weights, base.den_weights, base.dtype, base.context_device,
                         base.denoiser_device)
        self.prompt_len, self.continuation, self.wrong = prompt_len, continuation, wrong

    def denoise(self, state, block, t):
        logits = torch.zeros(*block.shape, self.cfg.vocab_size)
        for j in range(block.shape[1]):
            pos = int(state.lengths[0]) + j - self.prompt_len  # output position of block slot j
            token = self.continuation[pos] if pos < len(self.continuation) else 5
            logits[0, j, token if pos not in self.wrong else 4 + (token - 3) % (self.cfg.vocab_size - 4)] = 20.0
        return logits


def test_greedy_with_good_drafts_accepts_whole_blocks(demo_dir):
    rt = TwoTowerRuntime.from_checkpoint(demo_dir, dtype="float32")
    prompt = [17, 4, 99, 5]
    kw = dict(max_new_tokens=40, eos_token_id=None, block_size=8, steps_per_block=2)
    ar = rt.generate([prompt], mode="ar", **kw).output_ids[0]
    oracle = OracleDrafts(rt.executor, len(prompt), ar, wrong={11, 12, 30})
    scheduler = Scheduler(oracle, rt.cfg)
    ticket = scheduler.submit("speculative", [prompt], rt.prepare([prompt], mode="speculative", **kw).settings, [0])
    scheduler.run_until(ticket)
    out = ticket.rows[0].out
    assert out.tokens == ar
    # slot 0 holds the known token; wrong drafts at output positions 11, 12 and 30 cut their blocks
    assert max(out.accepted) == 7 and min(out.accepted) < 7
    assert out.context_forwards < len(ar) / 3  # far fewer context forwards than AR's one per token


# ---- sampled: the AR model's distribution --------------------------------------------------------------

V, MASK = 6, 3


@dataclass(frozen=True)
class ToyState:
    history: tuple  # one token tuple per row
    extended: int = 0  # tokens of the last extend (what rollback may give back)


class ToyExecutor:
    """A two-tower model small enough to enumerate: the AR tower is a bigram table; the denoiser
    (blocks of 3) drafts position 2 first and then position 1 strongly dependent on it, so that
    the draft at 2 is not distributed as drawn once position 1 is known (the case the naive
    speculative rule gets wrong)."""

    modes = ("speculative", "ar")
    dtype = torch.float32
    context_device = denoiser_device = torch.device("cpu")

    def __init__(self, seed: int):
        gen = torch.Generator().manual_seed(seed)
        self.ar = 1.5 * torch.randn(V, V, generator=gen)  # logits of the next token given the last one

    def prefill(self, prompts, capacity, pages=None):  # its scheduler runs without a prefix cache
        return ToyState(tuple(tuple(p) for p in prompts)), self.ar[[p[-1] for p in prompts]]

    def extend(self, state, tokens, logits, trace=False, in_place=False):
        new = ToyState(tuple(h + tuple(t) for h, t in zip(state.history, tokens.tolist())), tokens.shape[1])
        return (self.ar[tokens] if logits else None), new

    def rollback(self, state, keep):
        return ToyState(tuple(h[: len(h) - state.extended + int(k)] for h, k in zip(state.history, keep)))

    def select(self, state, rows):
        return ToyState(tuple(state.history[i] for i in rows))

    def concat(self, states, capacity):
        return ToyState(sum((s.history for s in states), ()))

    def merge(self, state, rows, sub):
        history = list(state.history)
        for j, r in enumerate(rows):
            history[r] = sub.history[j]
        return ToyState(tuple(history))

    def denoise(self, state, block, t):
        B = block.shape[0]
        logits = torch.zeros(B, 3, V)
        logits[:, 2] = torch.log(torch.tensor([0.1, 0.1, 0.1, 1.0, 0.6, 0.1]))
        second_known = block[:, 2] != MASK
        follow = torch.full((B, V), math.log(0.06))
        follow[torch.arange(B), block[:, 2].clamp(0, V - 1)] = math.log(0.7)
        flat = torch.log(torch.tensor([0.3, 0.2, 0.25, 1.0, 0.15, 0.1])).expand(B, V)
        logits[:, 1] = torch.where(second_known[:, None], follow, flat)
        return logits


def _first_tokens(executor, n: int, settings) -> torch.Tensor:
    cfg = config_from_dict({**DEMO_CONFIG, "vocab_size": V})
    scheduler = Scheduler(executor, cfg, max_batch=n, memory_budget=1 << 40, prefix_cache_bytes=0)
    ticket = scheduler.submit("speculative", [[5]] * n, settings, list(range(n)))
    scheduler.run_until(ticket)
    return torch.tensor([r.out.tokens for r in ticket.rows])


def _chi_square(samples: torch.Tensor, exact: dict) -> float:
    """Pearson's statistic of the sample against the exact law (cells below 5 expected pooled),
    in standard deviations above its mean under the null (df), i.e. (X^2 - df) / sqrt(2 df)."""
    counts = {}
    for row in samples.tolist():
        counts[tuple(row)] = counts.get(tuple(row), 0) + 1
    n = samples.shape[0]
    stat, cells, rest_o, rest_e = 0.0, 0, 0, 0.0
    for seq, p in exact.items():
        if n * p >= 5:
            stat += (counts.get(seq, 0) - n * p) ** 2 / (n * p)
            cells += 1
        else:
            rest_o, rest_e = rest_o + counts.get(seq, 0), rest_e + n * p
    if rest_e > 0:
        stat += (rest_o - rest_e) ** 2 / rest_e
        cells += 1
    return (stat - (cells - 1)) / math.sqrt(2 * (cells - 1))


@pytest.fixture(scope="module")
def toy():
    executor = ToyExecutor(seed=3)
    settings = sampler.SamplerSettings(max_new_tokens=3, block_size=3, steps_per_block=2, confidence_threshold=0.99,
                                       temperature=1.0, top_k=0, top_p=1.0, mask_token_id=MASK, eos_token_id=None)
    p = torch.softmax(executor.ar, -1)
    joint, pair = {}, {}  # the AR law of the first three tokens, and of tokens 2 and 3
    for a, b, c in itertools.product(range(V), repeat=3):
        joint[(a, b, c)] = float(p[5, a] * p[a, b] * p[b, c])
        pair[(b, c)] = pair.get((b, c), 0.0) + joint[(a, b, c)]
    return executor, settings, joint, pair


N_SAMPLES = 12000


def _deviations(toy) -> list[float]:
    executor, settings, joint, pair = toy
    tokens = _first_tokens(executor, N_SAMPLES, settings)
    return [_chi_square(tokens, joint), _chi_square(tokens[:, 1:], pair)]


def test_sampled_speculative_first_tokens_follow_the_ar_law(toy):
    z = _deviations(toy)
    assert max(z) < 6, z  # standard deviations; the naive rule lands far above (next test)


def test_naive_speculative_rule_fails_the_same_test(toy, monkeypatch):
    """Trusting every draft's sampling distribution (and committing drafts by the confidence of the
    drawn token) biases the output: the draft at position 2 was drawn before position 1, which
    then followed it."""
    monkeypatch.setattr(sampler, "draft_law_known", lambda steps: torch.ones_like(steps, dtype=torch.bool))
    monkeypatch.setattr(lanes, "DRAFT_CONFIDENCE", "sampled")
    z = _deviations(toy)
    assert max(z) > 12, z


# ---- rollback -----------------------------------------------------------------------------------------------

def _clone(s: towers.TowerState) -> towers.TowerState:
    copy = lambda d: {i: t.clone() for i, t in d.items()}  # noqa: E731
    return towers.TowerState(s.lengths.clone(), copy(s.keys), copy(s.values), copy(s.conv), copy(s.ssm))


@pytest.mark.parametrize("pattern", ["M*EME*ME", "M*E-ME*M"])
def test_rollback_equals_a_fresh_extend_bit_for_bit(pattern_dirs, pattern):
    cfg, ctx, _ = load_towers(pattern_dirs[pattern])
    ops = RowInvariantOps(torch.float32, "cpu")
    gen = torch.Generator().manual_seed(5)
    rows = []
    for n in (5, 9, 2):
        prompt = torch.randint(4, cfg.vocab_size, (1, n), generator=gen)
        _, state = towers.context_forward(ops, cfg, ctx, towers.empty_state(cfg, 1, 40, torch.float32, "cpu"), prompt)
        rows.append(state)
    before = towers.concat_states(rows, 40)
    block = torch.randint(4, cfg.vocab_size, (3, 8), generator=gen)
    _, traced = towers.context_forward(ops, cfg, ctx, _clone(before), block, logits=False, trace=True)
    keep = torch.tensor([0, 3, 8])
    rolled = towers.rollback(traced, keep)
    for b in range(3):
        k = int(keep[b])
        fresh = towers.select_rows(before, [b])  # keep 0: the state before the extend
        if k:
            _, fresh = towers.context_forward(ops, cfg, ctx, _clone(fresh), block[b:b + 1, :k], logits=False)
        n = int(fresh.lengths[0])
        assert n == int(rolled.lengths[b])
        for i in fresh.conv:
            assert torch.equal(rolled.conv[i][b], fresh.conv[i][0]) and torch.equal(rolled.ssm[i][b], fresh.ssm[i][0])
        for i in fresh.keys:
            assert torch.equal(rolled.keys[i][b, :n], fresh.keys[i][0, :n])
            assert torch.equal(rolled.values[i][b, :n], fresh.values[i][0, :n])
    with pytest.raises(ValueError, match="no per-position trace"):
        towers.rollback(before, keep)
    with pytest.raises(ValueError, match="outside"):
        towers.rollback(traced, torch.tensor([0, 9, 1]))
