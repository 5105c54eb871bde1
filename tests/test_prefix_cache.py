"""The prefix cache (``runtime/prefix_cache.py``): hits compute exactly what a cold run computes.

Cold references come from a runtime with the cache off (``prefix_cache_bytes=0``); its prefill runs
in the same page pieces, so "identical" means bit for bit: token lists compared exactly, states
with ``torch.equal``. Prompts are fresh random bytes around a shared prefix, a few pages long: pages
of 64 tokens in the scheduler tests (short contexts, quick steps), the default ``PAGE_TOKENS`` in
the end-to-end ones (trained model, ``run_runtime.py``, the server).
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import torch

from trtllm_twotower.demo import default_checkpoint
from trtllm_twotower.network import towers
from trtllm_twotower.runtime import TwoTowerRuntime
from trtllm_twotower.runtime.executor import TorchExecutor
from trtllm_twotower.runtime.prefix_cache import PAGE_TOKENS, PrefixCache
from trtllm_twotower.runtime.scheduler import Scheduler
from trtllm_twotower.training.corpus import read_corpus
from conftest import load_towers
from serving_process import start_openai_server, stop_server  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
P = 64  # the page of the ``runtimes`` fixture
KW = dict(max_new_tokens=12, block_size=8, steps_per_block=2, confidence_threshold=0.05, eos_token_id=None)


def random_ids(gen: torch.Generator, n: int) -> list[int]:
    return torch.randint(4, 256, (n,), generator=gen).tolist()


@pytest.fixture(scope="module")
def runtimes(demo_dir):
    """(cache off, cache on) over the same tiny random checkpoint, float32, pages of ``P`` tokens."""
    base = TwoTowerRuntime.from_checkpoint(demo_dir, dtype="float32", prefix_cache_bytes=0)
    ex = base.executor
    executor = TorchExecutor(base.cfg, ex.ctx_weights, ex.den_weights, ex.dtype, ex.context_device,
                             ex.denoiser_device, page_tokens=P)
    return tuple(TwoTowerRuntime(base.cfg, executor, None, demo_dir, has_denoiser=True, prefix_cache_bytes=size)
                 for size in (0, None))


class FakeRow:
    """What the cache needs of a row: its output record (``cached_tokens``, ``finished``)."""

    class Out:
        cached_tokens = 0
        finished = False

    def __init__(self):
        self.out = self.Out()


def state_rows_equal(a: towers.TowerState, b: towers.TowerState) -> bool:
    """Same lengths, and every K/V slot below them, conv and SSM state bit-identical."""
    if not torch.equal(a.lengths, b.lengths):
        return False
    n = int(a.lengths.max())
    return (all(torch.equal(a.keys[i][:, :n], b.keys[i][:, :n]) and torch.equal(a.values[i][:, :n], b.values[i][:, :n])
                for i in a.keys)
            and all(torch.equal(a.conv[i], b.conv[i]) and torch.equal(a.ssm[i], b.ssm[i]) for i in a.conv))


# ---- the executor: a resumed prefill is the cold prefill -----------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resumed_prefill_is_bit_identical_to_cold(all_kinds_dir, dtype):
    """Every layer kind (M, *, E, -), both dtypes: the state and last logits after a partial hit
    (pieces of the chunked scan form, a short sequential tail) equal a cold prefill's exactly."""
    cfg, ctx, den = load_towers(all_kinds_dir, dtype)
    executor = TorchExecutor(cfg, ctx, den, dtype, torch.device("cpu"), torch.device("cpu"), page_tokens=64)
    gen = torch.Generator().manual_seed(11)
    shared = random_ids(gen, 150)
    first, second = shared + random_ids(gen, 40), shared + random_ids(gen, 23)
    cache = PrefixCache(64, 1 << 30)
    executor.prefill([first], 256, pages=cache.pages_for([FakeRow()], [first]))
    assert cache.stats()["pages"] == 2  # 64 and 128; the page holding token 190 is never cached
    row = FakeRow()
    hit_state, hit_logits = executor.prefill([second], 256, pages=cache.pages_for([row], [second]))
    cold_state, cold_logits = executor.prefill([second], 256)
    assert row.out.cached_tokens == 128
    assert state_rows_equal(hit_state, cold_state)
    assert torch.equal(hit_logits, cold_logits)


def test_lookup_hits_misses_and_never_the_last_page():
    cache = PrefixCache(4, 1 << 20)
    cfg_state = lambda n: towers.TowerState(  # noqa: E731 - a one-attention-layer, one-Mamba-layer state
        lengths=torch.tensor([n]), keys={0: torch.zeros(1, 16, 1, 2)}, values={0: torch.zeros(1, 16, 1, 2)},
        conv={1: torch.full((1, 3, 2), float(n))}, ssm={1: torch.full((1, 2, 2, 2), float(n))})
    prompt = list(range(10, 22))  # 12 tokens: pages end at 4 and 8; 12 holds the last token
    chain = []
    for end in (4, 8):
        chain.append(cache.insert(chain[-1] if chain else None, tuple(prompt[end - 4:end]), cfg_state(end)))
    assert [len(cache.lookup(p)) for p in (prompt, prompt[:9], prompt[:8], prompt[:5], prompt[:4])] == [2, 2, 1, 1, 0]
    assert len(cache.lookup(prompt[:6] + [99] * 6)) == 1  # partial: the second page differs
    assert len(cache.lookup([99] + prompt[1:])) == 0  # a miss at the first token
    restored = cache.restore(cache.lookup(prompt))
    assert int(restored.lengths[0]) == 8 and restored.keys[0].shape[1] == 8
    assert float(restored.conv[1].flatten()[0]) == 8.0  # the Mamba states at the chain's end
    stats = cache.stats()
    assert stats["hit_tokens"] == 4 * (2 + 2 + 1 + 1 + 0 + 1 + 0 + 2) and stats["lookups"] == 8


# ---- the scheduler: every mode, as a cold run ----------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("mode", ["diffusion", "speculative", "ar", "mock-ar"])
def test_every_mode_equals_the_cold_run(runtimes, mode, seed):
    """A miss, a hit of two pages, a partial hit of one; greedy (seed 0) and sampled (seed 1)."""
    off, on = runtimes
    gen = torch.Generator().manual_seed(100 + 10 * seed + ["diffusion", "speculative", "ar", "mock-ar"].index(mode))
    shared = random_ids(gen, 2 * P + 10)
    prompts = [shared + random_ids(gen, 30), shared + random_ids(gen, P), shared[:P + 5] + random_ids(gen, 9)]
    cached = []
    for prompt in prompts:
        kw = dict(mode=mode, temperature=0.9 * seed, seed=seed, **KW)
        hit, cold = on.generate([prompt], **kw), off.generate([prompt], **kw)
        assert hit.output_ids == cold.output_ids
        assert cold.stats["cached_tokens"] == 0
        cached.append(hit.stats["cached_tokens"])
    assert cached == [0, 2 * P, P]


def test_trained_model_bfloat16_equals_the_cold_run():
    """The shipped demo model at its own dtype, diffusion with its default knobs."""
    off = TwoTowerRuntime.from_checkpoint(default_checkpoint(), prefix_cache_bytes=0)
    on = TwoTowerRuntime.from_checkpoint(default_checkpoint())
    text = "\n\n".join(read_corpus(default_checkpoint() / "corpus.txt.xz")[:40])[:2 * PAGE_TOKENS + 40]
    prompts = [text + " Return the list", text + " The server"]
    hits = [on.generate(p, max_new_tokens=16, seed=3) for p in prompts]
    colds = [off.generate(p, max_new_tokens=16, seed=3) for p in prompts]
    assert [h.output_ids for h in hits] == [c.output_ids for c in colds]
    assert hits[1].stats["cached_tokens"] == 2 * PAGE_TOKENS


def test_two_concurrent_requests_share_a_prefix(runtimes):
    """Admitted in one step: the second row looks up after the first has cached its pages."""
    off, on = runtimes
    gen = torch.Generator().manual_seed(21)
    shared = random_ids(gen, 2 * P + 3)
    prompts = [shared + random_ids(gen, 17), shared + random_ids(gen, 40)]
    requests = [on.prepare([p], mode="diffusion", seed=2, **KW) for p in prompts]
    tickets = [on.submit(r) for r in requests]
    for t in tickets:
        on.scheduler.run_until(t)
    results = [on.result(t) for t in tickets]
    assert [r.stats["cached_tokens"] for r in results] == [0, 2 * P]
    assert [r.output_ids for r in results] == [off.run(r).output_ids for r in requests]
    assert on.scheduler.prefix_cache.pinned_bytes == 0  # both finished: nothing held


def test_a_cancelled_request_leaves_its_pages_usable(runtimes):
    off, on = runtimes
    gen = torch.Generator().manual_seed(31)
    shared = random_ids(gen, 2 * P + 1)
    cache = on.scheduler.prefix_cache
    ticket = on.submit(on.prepare([shared + random_ids(gen, 5)], mode="speculative", seed=4, **KW))
    on.scheduler.step()  # admitted and prefilled: its pages are cached and held
    assert cache.pinned_bytes > 0
    ticket.cancel()
    on.scheduler.run_until(ticket)
    assert ticket.cancelled and cache.pinned_bytes == 0
    prompt = shared + random_ids(gen, 12)
    hit = on.generate([prompt], mode="speculative", seed=4, **KW)
    assert hit.stats["cached_tokens"] == 2 * P
    assert hit.output_ids == off.generate([prompt], mode="speculative", seed=4, **KW).output_ids


# ---- memory ---------------------------------------------------------------------------------------

def page_bytes(cfg) -> int:
    attention = sum(1 for k in cfg.layer_pattern if k == "*")
    mamba = sum(1 for k in cfg.layer_pattern if k == "M")
    kv = 2 * attention * P * cfg.num_key_value_heads * cfg.head_dim * 4
    return kv + mamba * (cfg.conv_dim * cfg.conv_kernel * 4 + cfg.mamba_num_heads * cfg.mamba_head_dim
                         * cfg.ssm_state_size * 4)


def test_eviction_is_least_recently_used_within_a_small_cache(runtimes):
    off, on = runtimes
    cfg = on.cfg
    scheduler = Scheduler(on.executor, cfg, prefix_cache_bytes=2 * page_bytes(cfg))
    cache = scheduler.prefix_cache
    gen = torch.Generator().manual_seed(41)
    prompts = [random_ids(gen, P + 7) for _ in range(3)]  # one page each

    def run(prompt):
        ticket = scheduler.submit("ar", [prompt], on.prepare([prompt], mode="ar", **KW).settings, [0])
        scheduler.run_until(ticket)
        assert ticket.rows[0].out.tokens == off.generate([prompt], mode="ar", **KW).output_ids[0]
        return ticket.rows[0].out.cached_tokens

    assert [run(p) for p in prompts[:2]] == [0, 0]
    assert run(prompts[0]) == P  # a hit; prompts[1] is now the least recently used
    assert run(prompts[2]) == 0 and cache.evicted_pages == 1 and cache.bytes <= cache.capacity_bytes
    assert run(prompts[0]) == P and run(prompts[1]) == 0  # prompts[1] was the one evicted


def test_the_cache_yields_to_rows_and_never_drops_a_running_rows_pages(runtimes):
    """Budget: one running row and about one page. A second request's prompt finds no room while
    the first row holds its page; at every step lanes + cache stay within the budget."""
    off, on = runtimes
    cfg = on.cfg
    gen = torch.Generator().manual_seed(51)
    first, second = random_ids(gen, P + 9), random_ids(gen, P + 9)
    settings = on.prepare([first], mode="diffusion", **KW).settings
    probe = Scheduler(on.executor, cfg, prefix_cache_bytes=0)
    ticket = probe.submit("diffusion", [first], settings, [0])
    row_bytes = probe._row_bytes(ticket.rows[0], ticket.rows[0].tokens_needed)
    probe.run_until(ticket)
    scheduler = Scheduler(on.executor, cfg, memory_budget=2 * row_bytes + page_bytes(cfg) + 1000)
    cache = scheduler.prefix_cache
    a = scheduler.submit("diffusion", [first], settings, [0])
    scheduler.step()
    held = cache.pinned_bytes
    assert held == page_bytes(cfg) and cache.bytes == held
    b = scheduler.submit("diffusion", [second], settings, [1])
    while not (a.done.is_set() and b.done.is_set()):
        scheduler.step()
        lanes = sum(scheduler._lane_bytes(key, [], 0) for key in scheduler.lanes)
        assert lanes + cache.bytes <= scheduler.memory_budget
        if not a.done.is_set():
            assert cache.lookup(first) and cache.pinned_bytes >= held  # the running row's page stays
    assert cache.pinned_bytes == 0
    for t, p, seed in ((a, first, 0), (b, second, 1)):
        assert t.rows[0].out.tokens == off.generate([p], mode="diffusion", seed=seed, **KW).output_ids[0]


def test_prefix_cache_bytes_is_validated_and_zero_turns_it_off(demo_dir):
    for bad in (-1, True, 1.5, "8"):
        with pytest.raises(ValueError, match="prefix_cache_bytes"):
            TwoTowerRuntime.from_checkpoint(demo_dir, prefix_cache_bytes=bad)
    assert TwoTowerRuntime.from_checkpoint(demo_dir, prefix_cache_bytes=0).scheduler.prefix_cache is None
    rt = TwoTowerRuntime.from_checkpoint(demo_dir, prefix_cache_bytes=12345, memory_budget=1 << 30)
    assert rt.scheduler.prefix_cache.capacity_bytes == 12345


def test_run_runtime_reports_cached_tokens_and_refuses_a_bad_size(demo_dir):
    ids = ",".join(map(str, random_ids(torch.Generator().manual_seed(61), PAGE_TOKENS + 20)))
    args = [sys.executable, "run_runtime.py", "--checkpoint", str(demo_dir), "--mode", "ar", "--max-new-tokens", "4",
            "--prompt-ids", ids, "--prompt-ids", ids, "--json"]
    out = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    # the second row looks up after the first row's prefill cached the page
    assert json.loads(out.stdout.splitlines()[-1])["stats"]["cached_tokens"] == PAGE_TOKENS
    bad = subprocess.run(args[:2] + ["--prefix-cache-bytes", "-5"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: prefix_cache_bytes: expected an integer >= 0 (0 = off), got -5"]


# ---- the OpenAI server --------------------------------------------------------------------------

def test_openai_server_reports_cached_tokens_and_cache_state(demo_dir, tmp_path):
    pytest.importorskip("fastapi", reason="fastapi/uvicorn not installed (pip install '.[serve]')")
    proc, port = start_openai_server(tmp_path / "server.log", "--checkpoint", str(demo_dir), "--prefix-cache-bytes",
                                     str(1 << 26))
    url = f"http://127.0.0.1:{port}"
    try:
        prompt = random_ids(torch.Generator().manual_seed(71), PAGE_TOKENS + 30)

        def complete():
            body = json.dumps({"prompt": prompt, "max_tokens": 8, "temperature": 0, "mode": "ar"}).encode()
            request = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=120) as r:
                return json.loads(r.read())

        first, second = complete(), complete()
        assert first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
        assert second["usage"]["prompt_tokens_details"] == {"cached_tokens": PAGE_TOKENS}
        assert second["choices"][0]["token_ids"] == first["choices"][0]["token_ids"]
        with urllib.request.urlopen(url + "/health", timeout=10) as r:
            state = json.loads(r.read())["prefix_cache"]
        assert state["pages"] == 1 and state["capacity_bytes"] == 1 << 26 and state["hit_tokens"] == PAGE_TOKENS
        assert state["hit_rate"] == pytest.approx(PAGE_TOKENS / (2 * len(prompt)))
    finally:
        stop_server(proc)
