"""The sampling math of every mode (spec §7), batched, with per-row settings and per-row generators.

- ``commit_step``: one mask-diffusion step (spec §7.1, per-row t and k, §7.2) as tensor ops on the
  denoiser's device: mask exclusion, softmax, argmax or Gumbel-max, confidence, threshold, floor,
  top-k commit.
- ``ar_probs`` / ``sample_next``: the AR choice (spec §7.4): greedy, or temperature -> top_k -> top_p.
- ``verify_draft``: speculative mode's acceptance rule, which makes the output exactly the AR
  model's (greedy: token for token; sampled: in distribution).
- ``logprob_tables`` / ``read_logprobs``: the log-probabilities of committed tokens and their most
  likely alternatives, for the rows that ask (they draw nothing, so no token changes).

Every row draws only from its own generator, and only when it needs to, so a row's tokens never
depend on the other rows of the batch. The loops that call these live in ``lanes.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..devices import upload

MASK_LOGIT = -1e12  # the mask token can never be predicted (spec §7.1)
MAX_TOP_LOGPROBS = 20  # alternatives reported per token (OpenAI's chat limit)


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
    logprobs: int | None = None  # None: none; N: each token's log-probability and its N most likely alternatives


@dataclass(frozen=True)
class TokenLogprob:
    """A committed token's log-probability and the most likely tokens, under the distribution of the
    forward that chose it: log_softmax(logits / T), T the row's temperature (1 for greedy rows),
    before top_k / top_p truncation (``logprob_tables``)."""

    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, log-probability), most likely first, as many as asked


def per_row(value, rows: int, device, dtype=torch.float32) -> torch.Tensor:
    """A number, or one value per row, as a [rows] tensor on ``device`` (uploaded without a sync)."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype)
    return upload(list(value) if isinstance(value, (list, tuple)) else [value] * rows, device, dtype)


def host_values(value, rows: int) -> list[float]:
    """A number, or one value per row, as a host list (read once if it is a tensor): the settings
    that decide what the host launches (which rows sample) are never read back from the device."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return [float(v) for v in value] if isinstance(value, (list, tuple)) else [float(value)] * rows


def temperature_divisor(temps: list[float], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(sampled [B] bool: temperature > 0, divisor [B]: the temperature, 1 for greedy rows) on ``device``."""
    B = len(temps)
    return (per_row([t > 0 for t in temps], B, device, torch.bool),
            per_row([t if t > 0 else 1.0 for t in temps], B, device))


def commit_step(x: torch.Tensor, logits: torch.Tensor, mask_id: int, step: int, steps, threshold, temperature,
                generators: list[torch.Generator] | None = None, confidence: str = "sampled",
                return_probs: bool = False, masked: torch.Tensor | None = None):
    """One mask-diffusion step for a batch of blocks (spec §7.1, per-row t and k, §7.2).

    x [B, L] block ids (mask_id where masked); logits [B, L, V] fp32 from the denoiser. ``masked``
    [B, L] bool: the positions still open, when they are not simply ``x == mask_id`` (a given token
    may equal the mask id: speculative mode's known first token is any token the AR model chose). ``steps``,
    ``threshold``, ``temperature``: a number or one per row. Returns (new x [B, L], committed count
    [B]) and with ``return_probs`` the distribution each prediction was drawn from ([B, L, V],
    temperature applied; None when every row is greedy) and each position's confidence ([B, L], what
    the commit rule ranks by: a committed token's committing probability). Committed tokens never
    change. Among equal confidences the lower position commits first (stable sort). ``generators``: one per row, drawn
    from only by rows with temperature > 0 (one [L, V] table per step; the lanes only pass rows
    with an open block). No value is read back from the device: a step is launched, not waited for.
    ``confidence``: "sampled" = the temperature-1 probability of the drawn token (the spec's rule);
    "argmax" = the temperature-1 probability of the most likely token, which does not depend on
    the draw (speculative drafts: the token's law given that it was committed stays the sampling law).
    """
    B, L = x.shape
    device = x.device
    temps = host_values(temperature, B)
    steps = per_row(steps, B, device, torch.long)
    threshold = per_row(threshold, B, device)
    masked = x == mask_id if masked is None else masked  # [B, L]
    n = masked.sum(-1)  # [B]
    logits = exclude_mask(logits, mask_id)
    probs = torch.softmax(logits, dim=-1)  # confidence always at temperature 1
    pred = probs.argmax(-1)  # first maximal index on ties, as torch.argmax
    sample_probs = None
    sampled_rows = [b for b in range(B) if temps[b] > 0]
    if sampled_rows:  # Gumbel-max over the whole batch (greedy rows' results are discarded)
        sampled, divisor = temperature_divisor(temps, device)
        scores = torch.log_softmax(logits / divisor[:, None, None], dim=-1)  # [B, L, V]
        noise = torch.full_like(scores, 0.5)
        for b in sampled_rows:
            noise[b].uniform_(generator=generators[b])
        gumbel = -torch.log(-torch.log(noise.clamp_min(1e-10)))
        pred = torch.where(sampled[:, None], (scores + gumbel).argmax(-1), pred)
        if return_probs:
            sample_probs = torch.where(sampled[:, None, None], scores.exp(), 0.0)
    chosen = probs.max(-1).values if confidence == "argmax" else probs.gather(-1, pred[..., None])[..., 0]  # [B, L]
    confident = ((chosen > threshold[:, None]) & masked).sum(-1)  # strict >
    remaining = (steps - step).clamp_min(1)
    floor = (n + remaining - 1) // remaining  # ceil(n / (T - s))
    k = torch.where(step >= steps - 1, n, torch.minimum(n, torch.maximum(confident.clamp_min(1), floor)))
    # commit the k most confident masked positions; committed ones sort last, ties by position
    key = torch.where(masked, chosen, torch.full_like(chosen, float("-inf")))
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(L, device=device).expand_as(order))
    commit = masked & (rank < k[:, None])
    new_x = torch.where(commit, pred, x)
    return (new_x, k, sample_probs, chosen) if return_probs else (new_x, k)


def exclude_mask(logits: torch.Tensor, mask_id: int) -> torch.Tensor:
    """The denoiser's logits [..., V] as fp32 with the mask token made impossible (a copy)."""
    logits = logits.float().clone()
    logits[..., mask_id] = MASK_LOGIT
    return logits


def logprob_tables(logits: torch.Tensor, tokens: torch.Tensor, temperature) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities under log_softmax(logits / T) (T per row; greedy rows: 1), on the device.

    logits [B, n, V], tokens [B, n] (the committed token at each place) -> (values [B, n, 1 + K]:
    the token's log-probability, then the K = min(MAX_TOP_LOGPROBS, V) largest, descending; ids
    [B, n, K] of those). Nothing is drawn or read back."""
    B = logits.shape[0]
    _, divisor = temperature_divisor(host_values(temperature, B), logits.device)
    scores = torch.log_softmax(logits.float() / divisor[:, None, None], dim=-1)  # [B, n, V]
    chosen = scores.gather(-1, tokens.to(logits.device)[..., None])  # [B, n, 1]
    top = scores.topk(min(MAX_TOP_LOGPROBS, scores.shape[-1]), dim=-1)  # sorted, descending
    return torch.cat([chosen, top.values], dim=-1), top.indices


def read_logprobs(values: torch.Tensor, ids: torch.Tensor, counts: list[int]) -> list[list[TokenLogprob]]:
    """``logprob_tables``' output read back: per row b, per place, a ``TokenLogprob`` with the
    ``counts[b]`` most likely tokens (one read of each table)."""
    width = max(counts)
    values, ids = values[..., : 1 + width].tolist(), ids[..., :width].tolist()
    return [[TokenLogprob(v[0], tuple(zip(i[:n], v[1: 1 + n]))) for v, i in zip(row_values, row_ids)]
            for row_values, row_ids, n in zip(values, ids, counts)]


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature,
                   counts: list[int]) -> list[list[TokenLogprob]]:
    """``read_logprobs(*logprob_tables(...))``: logits [B, n, V], tokens [B, n] -> [B][n] entries."""
    return read_logprobs(*logprob_tables(logits, tokens, temperature), counts)


def ar_probs(logits: torch.Tensor, temperature, top_k, top_p) -> torch.Tensor:
    """The AR sampling distribution (spec §7.4): softmax(logits / T) -> top_k -> top_p, renormalised;
    a one-hot of the argmax for greedy rows (T = 0). logits [B, V]; settings a number or per row."""
    B = logits.shape[0]
    device = logits.device
    temps, top_ks, top_ps = host_values(temperature, B), host_values(top_k, B), host_values(top_p, B)
    sampled, divisor = temperature_divisor(temps, device)
    probs = torch.softmax(logits.float() / divisor[:, None], dim=-1)
    if any(k > 0 for k in top_ks):
        V = probs.shape[-1]
        k = per_row([min(int(k), V) if k > 0 else V for k in top_ks], B, device, torch.long)
        sorted_p = torch.sort(probs, dim=-1, descending=True).values
        kth = sorted_p.gather(-1, (k - 1)[:, None])
        probs = torch.where(probs < kth, torch.zeros_like(probs), probs)
    if any(p < 1 for p in top_ps):
        top_p = per_row(top_ps, B, device)
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        drop = (sorted_p.cumsum(-1) - sorted_p > top_p[:, None]) & (top_p[:, None] < 1)  # keep the prefix reaching top_p
        probs = probs.scatter(-1, order, torch.where(drop, torch.zeros_like(sorted_p), sorted_p))
    probs = probs / probs.sum(-1, keepdim=True)
    one_hot = torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(probs.dtype)
    return torch.where(sampled[:, None], probs, one_hot)


def sample_next(logits: torch.Tensor, temperature, top_k, top_p, generators: list[torch.Generator]) -> torch.Tensor:
    """AR / mock-AR token choice: greedy argmax, else one draw per row from its own generator from
    ``ar_probs``. logits [B, V] -> tokens [B]."""
    B = logits.shape[0]
    temps = host_values(temperature, B)
    tokens = logits.argmax(-1)
    if any(t > 0 for t in temps):
        probs = ar_probs(logits, temps, top_k, top_p)
        for b in range(B):
            if temps[b] > 0:
                tokens[b] = torch.multinomial(probs[b], 1, generator=generators[b])[0]
    return tokens


def draft_law_known(commit_steps: torch.Tensor) -> torch.Tensor:
    """[B, n] commit step of each draft -> [B, n] bool: the draft's sampling distribution is also its
    law given the drafts before it, i.e. no earlier draft was committed at a later step (a later
    commit may depend on this draft's value)."""
    return torch.cummax(commit_steps, dim=-1).values <= commit_steps


@dataclass(frozen=True)
class Verdict:
    """The outcome of verifying one drafted block per row."""

    accepted: list[int]  # drafted tokens accepted per row (positions 1 .. accepted)
    next_token: torch.Tensor  # [B] the AR token for the position after the accepted ones
    attempted: list[int]  # positions whose draft was judged per row (accepted + 1, or all L - 1)


def verify_draft(draft: torch.Tensor, commit_step_of: torch.Tensor, draft_probs: torch.Tensor | None,
                 ar_logits: torch.Tensor, temperature, top_k, top_p, generators: list[torch.Generator]) -> Verdict:
    """Speculative mode's acceptance rule, per row, over a drafted block.

    draft [B, L]: position 0 is the already known next token, 1..L-1 the denoiser's drafts;
    commit_step_of [B, L]: the denoiser step that committed each draft; draft_probs [B, L, V]: the
    distribution each draft was drawn from (needed for rows with temperature > 0);
    ar_logits [B, L, V]: the context tower's logits over the block (position j predicts j + 1).

    Greedy rows: a draft is accepted while it equals the AR argmax; the first mismatch takes the
    argmax; a fully accepted block gets the next token from the last logits.
    Sampled rows (speculative sampling): the draft at j is accepted with probability
    min(1, p(d) / q(d)), on rejection the token is drawn from norm(max(0, p - q)). That rule is exact
    only if q is the law of the draft given the accepted prefix, which holds when no earlier
    position of the block was committed at a later denoiser step (the drafts are drawn with
    draw-independent confidence, ``commit_step(confidence="argmax")``). Where an earlier position was
    committed later, q is replaced by a point mass on the draft (accept with probability p(d),
    else draw from p without d): exact whatever the drafting did. Each row draws L - 1 uniforms
    and one token per block from its own generator.
    """
    B, L = draft.shape
    device = ar_logits.device
    temps = host_values(temperature, B)
    each_position = lambda values: [v for v in host_values(values, B) for _ in range(L)]  # noqa: E731
    p = ar_probs(ar_logits.reshape(B * L, -1), each_position(temps), each_position(top_k),
                 each_position(top_p)).view(B, L, -1)
    drafts = draft[:, 1:].to(device)  # [B, L-1], predicted by positions 0 .. L-2
    p_draft = p[:, :-1].gather(-1, drafts[..., None])[..., 0]  # [B, L-1]
    greedy = [t <= 0 for t in temps]
    accept = (drafts == ar_logits[:, :-1].argmax(-1)) & per_row(greedy, B, device, torch.bool)[:, None]
    q_valid = q_draft = None
    if not all(greedy):
        q_valid = draft_law_known(commit_step_of[:, 1:].to(device))
        q = draft_probs[:, 1:].to(device)
        q_draft = q.gather(-1, drafts[..., None])[..., 0]
        alpha = torch.where(q_valid, torch.clamp(p_draft / q_draft.clamp_min(1e-30), max=1.0), p_draft)
        for b in range(B):
            if not greedy[b]:
                accept[b] = torch.rand(L - 1, generator=generators[b], device=device) < alpha[b]
    accepted = torch.cumprod(accept.long(), dim=-1).sum(-1).tolist()  # leading accepts
    next_token = torch.empty(B, dtype=torch.long, device=device)
    for b in range(B):
        a = accepted[b]
        if greedy[b]:
            next_token[b] = ar_logits[b, a].argmax()
            continue
        if a < L - 1:  # rejected at position a + 1: draw from the residual there
            p_r, d = p[b, a], int(drafts[b, a])
            if bool(q_valid[b, a]):
                residual = torch.clamp(p_r - draft_probs[b, a + 1].to(device), min=0)
            else:
                residual = p_r.clone()
                residual[d] = 0
            dist = residual if float(residual.sum()) > 0 else p_r
        else:
            dist = p[b, L - 1]
        next_token[b] = torch.multinomial(dist / dist.sum(), 1, generator=generators[b])[0]
    attempted = [min(a + 1, L - 1) for a in accepted]
    return Verdict(accepted, next_token, attempted)
