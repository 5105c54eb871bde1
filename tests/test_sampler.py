"""The mask-diffusion commit rule on hand-built tables, and against a literal transcription of the spec."""

from __future__ import annotations

import math

import torch

from trtllm_twotower.runtime.sampler import MASK_LOGIT, commit_step

M = 3  # mask id
V = 8


def _logits_for(conf_rows, preds):
    """fp32 logits whose softmax (mask excluded) gives prediction preds[b][i] with probability
    conf_rows[b][i] and spreads the rest evenly over the other non-mask tokens."""
    B, L = len(conf_rows), len(conf_rows[0])
    logits = torch.empty(B, L, V)
    for b in range(B):
        for i in range(L):
            c, p = conf_rows[b][i], preds[b][i]
            rest = (1 - c) / (V - 2)
            row = torch.full((V,), math.log(rest))
            row[p] = math.log(c)
            row[M] = 5.0  # would win if the mask token were not excluded
            logits[b, i] = row
    return logits


def test_strict_threshold_and_floor():
    x = torch.full((1, 4), M)
    conf = [[0.9, 0.95, 0.5, 0.91]]
    logits = _logits_for(conf, [[4, 5, 6, 7]])
    new, k = commit_step(x, logits, M, step=0, steps=4, threshold=0.9, temperature=0.0)
    # 0.9 is NOT > 0.9: two above the threshold; floor ceil(4/4)=1 -> k=2, the two most confident
    assert k.tolist() == [2]
    assert new.tolist() == [[M, 5, M, 7]]


def test_floor_when_nothing_is_confident():
    x = torch.full((1, 6), M)
    logits = _logits_for([[0.2, 0.3, 0.25, 0.1, 0.4, 0.35]], [[4] * 6])
    new, k = commit_step(x, logits, M, step=1, steps=4, threshold=0.9, temperature=0.0)
    assert k.tolist() == [2]  # ceil(6 / (4 - 1)) = 2
    assert new.tolist() == [[M, M, M, M, 4, 4]]


def test_forced_last_step_commits_everything():
    x = torch.tensor([[M, 6, M, M]])
    logits = _logits_for([[0.2, 0.99, 0.25, 0.3]], [[4, 7, 5, 4]])
    new, k = commit_step(x, logits, M, step=3, steps=4, threshold=0.9, temperature=0.0)
    assert k.tolist() == [3]
    assert new.tolist() == [[4, 6, 5, 4]]  # committed token 6 unchanged


def test_ties_commit_lower_position_first():
    x = torch.full((1, 5), M)
    logits = _logits_for([[0.5, 0.6, 0.6, 0.6, 0.1]], [[4] * 5])
    new, k = commit_step(x, logits, M, step=0, steps=3, threshold=0.9, temperature=0.0)
    assert k.tolist() == [2]  # ceil(5/3)
    assert new.tolist() == [[M, 4, 4, M, M]]


def test_all_committed_row_is_left_alone_and_per_row_k():
    x = torch.tensor([[4, 5, 6, 7], [M, M, M, M]])
    logits = _logits_for([[0.99] * 4, [0.95, 0.2, 0.97, 0.3]], [[6, 6, 6, 6], [4, 5, 6, 7]])
    new, k = commit_step(x, logits, M, step=0, steps=16, threshold=0.9, temperature=0.0)
    assert k.tolist() == [0, 2]
    assert new.tolist() == [[4, 5, 6, 7], [4, M, 6, M]]


def test_mask_token_never_predicted():
    x = torch.full((2, 3), M)
    logits = torch.randn(2, 3, V)
    logits[..., M] = 100.0
    for temperature in (0.0, 0.7):
        gens = [torch.Generator().manual_seed(i) for i in range(2)]
        new, _ = commit_step(x, logits, M, step=15, steps=16, threshold=0.9, temperature=temperature, generators=gens)
        assert (new != M).all()


def _spec_rule(x, logits, step, steps, threshold):
    """Spec §7.1 transcribed literally for one row, with python lists."""
    x = list(x)
    masked = [i for i, t in enumerate(x) if t == M]
    n = len(masked)
    lg = logits.clone()
    lg[:, M] = MASK_LOGIT
    p = torch.softmax(lg.double(), -1)
    pred = [int(torch.argmax(lg[i])) for i in range(len(x))]
    conf = {i: float(p[i, pred[i]]) for i in masked}
    if step == steps - 1:
        k = n
    else:
        k = min(n, max(max(sum(c > threshold for c in conf.values()), 1), math.ceil(n / (steps - step))))
    chosen = sorted(masked, key=lambda i: (-conf[i], i))[:k]
    return [pred[i] if i in chosen else t for i, t in enumerate(x)]


def test_matches_literal_spec_rule_on_random_tables():
    gen = torch.Generator().manual_seed(0)
    for trial in range(200):
        B, L, steps = 3, 8, 6
        x = torch.full((B, L), M)
        x[torch.rand(B, L, generator=gen) < 0.4] = 4 + trial % 3
        logits = 3 * torch.randn(B, L, V, generator=gen)
        step = trial % steps
        new, _ = commit_step(x, logits, M, step=step, steps=steps, threshold=0.3, temperature=0.0)
        for b in range(B):
            assert new[b].tolist() == _spec_rule(x[b].tolist(), logits[b], step, steps, 0.3), (trial, b)


def test_gumbel_sampling_is_seeded_per_row():
    x = torch.full((2, 4), M)
    logits = torch.randn(2, 4, V, generator=torch.Generator().manual_seed(1))
    logits[1] = logits[0]
    draw = lambda seeds: commit_step(x, logits, M, 15, 16, 0.9, 1.0, [torch.Generator().manual_seed(s) for s in seeds])[0]  # noqa: E731
    assert torch.equal(draw([7, 7])[0], draw([7, 7])[1])  # same seed, same table -> same row
    outs = {tuple(draw([s, 0])[0].tolist()) for s in range(20)}
    assert len(outs) > 1  # temperature > 0 really samples


def test_mixed_batch_equals_each_row_alone_on_random_tables():
    """Greedy and sampled rows in one step (settings decided on the host, Gumbel-max over the whole
    batch, each sampled row drawing from its own generator) commit exactly what each row commits
    alone, with the same draw distributions."""
    gen = torch.Generator().manual_seed(3)
    for trial in range(30):
        B, L = 4, 8
        x = torch.full((B, L), M)
        x[torch.rand(B, L, generator=gen) < 0.3] = 5
        logits = 3 * torch.randn(B, L, V, generator=gen)
        temps, thresholds, steps = [0.0, 0.7, 1.3, 0.0], [0.3, 0.5, 0.2, 0.9], [4, 6, 2, 8]
        step = trial % 2
        seeds = [100 * trial + b for b in range(B)]
        batch = commit_step(x, logits, M, step, steps, thresholds, temps,
                            [torch.Generator().manual_seed(s) for s in seeds], return_probs=True)
        for b in range(B):
            alone = commit_step(x[b:b + 1], logits[b:b + 1], M, step, steps[b], thresholds[b], temps[b],
                                [torch.Generator().manual_seed(seeds[b])], return_probs=True)
            assert torch.equal(batch[0][b], alone[0][0]) and int(batch[1][b]) == int(alone[1][0]), (trial, b)
            if temps[b] > 0:
                assert torch.equal(batch[2][b], alone[2][0])
            else:
                assert alone[2] is None and not batch[2][b].any()
