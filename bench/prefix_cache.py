#!/usr/bin/env python3
"""The prefix cache on the trained demo model (CPU): one shared prefix, many suffixes.

One ``--prefix``-token prefix (held-out docstrings of the demo corpus) and ``--requests`` requests
with different ``--suffix``-token suffixes, sent one after another, then all at once. Each phase
starts from an empty cache, and runs with the cache off and on side by side in one process over
the same towers (one after another, alternating per request in the sequential phase, so that the
machine's load falls on both alike). Recorded: prompt tokens the context tower actually ran
(counted at the executor's prefill forwards), time to first block (submission to the first
committed tokens), and whether every output equals the cache-off run's; per mode (``MODES``): the
first block costs diffusion 16 denoiser forwards over the whole context (its default), speculative
one (its recommended setting) and the verifying extend, AR one token.

    python bench/prefix_cache.py --out bench/results/prefix_cache_cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_towers import git_commit  # noqa: E402
from trtllm_twotower.demo import default_checkpoint  # noqa: E402
from trtllm_twotower.runtime import TwoTowerRuntime  # noqa: E402
from trtllm_twotower.runtime.scheduler import Scheduler  # noqa: E402
from trtllm_twotower.training.corpus import is_held_out, read_corpus  # noqa: E402

MODES = {"diffusion": {}, "speculative": {"steps_per_block": 1}, "ar": {}}  # settings besides the defaults


def prompts_from_corpus(tokenizer, prefix_tokens: int, suffix_tokens: int, count: int) -> list[list[int]]:
    """A prefix of held-out documents, and one suffix per request from the documents after it."""
    need = prefix_tokens + count * suffix_tokens
    ids = []
    for doc in (d for d in read_corpus(default_checkpoint() / "corpus.txt.xz") if is_held_out(d)):
        ids += tokenizer.encode(doc + "\n\n", add_special_tokens=False)
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise ValueError(f"the held-out corpus has {len(ids)} tokens; {need} are needed")
    prefix = ids[:prefix_tokens]
    return [prefix + ids[prefix_tokens + i * suffix_tokens: prefix_tokens + (i + 1) * suffix_tokens]
            for i in range(count)]


class PrefillCounter:
    """Counts the prompt tokens the context tower runs: wraps the executor's prefill forward."""

    def __init__(self, executor):
        self.tokens = 0
        self._piece = executor._prefill_piece
        executor._prefill_piece = self

    def __call__(self, state, ids, logits):
        self.tokens += len(ids)
        return self._piece(state, ids, logits)


def submit(rt, scheduler: Scheduler, prompt: list[int], mode: str, args):
    settings = rt.prepare([prompt], mode=mode, max_new_tokens=args.new_tokens, eos_token_id=None,
                          **MODES[mode]).settings
    return scheduler.submit(mode, [prompt], settings, [0])


def finish(scheduler: Scheduler, tickets: list) -> None:
    while not all(t.done.is_set() for t in tickets):
        scheduler.step()


def summary(tickets: list, counted: int, seconds: float) -> dict:
    ttfb = [t.first_tokens - t.submitted for t in tickets]
    return {"prefill_tokens": counted, "cached_tokens": sum(r.out.cached_tokens for t in tickets for r in t.rows),
            "ttfb_mean_s": statistics.fmean(ttfb), "ttfb_p50_s": statistics.median(ttfb), "ttfb_max_s": max(ttfb),
            "seconds": seconds}


def run_phase(rt, counter: PrefillCounter, prompts: list[list[int]], mode: str, args, concurrent: bool) -> dict:
    """One phase with the cache off and on (fresh schedulers over the same towers: empty caches)."""
    schedulers = {"off": Scheduler(rt.executor, rt.cfg, prefix_cache_bytes=0),
                  "on": Scheduler(rt.executor, rt.cfg, prefix_cache_bytes=args.prefix_cache_bytes)}
    tickets, counted, seconds = {"off": [], "on": []}, {"off": 0, "on": 0}, {"off": 0.0, "on": 0.0}
    if concurrent:
        for name, scheduler in schedulers.items():
            before, start = counter.tokens, time.perf_counter()
            tickets[name] = [submit(rt, scheduler, p, mode, args) for p in prompts]
            finish(scheduler, tickets[name])
            counted[name], seconds[name] = counter.tokens - before, time.perf_counter() - start
    else:
        for prompt in prompts:
            for name, scheduler in schedulers.items():  # alternating: load changes hit both alike
                before, start = counter.tokens, time.perf_counter()
                tickets[name].append(submit(rt, scheduler, prompt, mode, args))
                finish(scheduler, tickets[name][-1:])
                counted[name] += counter.tokens - before
                seconds[name] += time.perf_counter() - start
    off, on = (summary(tickets[k], counted[k], seconds[k]) for k in ("off", "on"))
    identical = [a.rows[0].out.tokens == b.rows[0].out.tokens for a, b in zip(tickets["off"], tickets["on"])]
    return {"cache_off": off, "cache_on": on, "outputs_identical": all(identical),
            "prefill_tokens_saved": 1 - on["prefill_tokens"] / off["prefill_tokens"],
            "ttfb_mean_ratio": off["ttfb_mean_s"] / on["ttfb_mean_s"],
            "ttfb_p50_ratio": off["ttfb_p50_s"] / on["ttfb_p50_s"],
            "cache": schedulers["on"].prefix_cache.stats()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prefix", type=int, default=2048, help="shared prefix tokens")
    p.add_argument("--suffix", type=int, default=64, help="tokens of each request's own suffix")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=16, help="one block of the default size")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--prefix-cache-bytes", type=int, default=None, help="the cache-on runs' size (default: the budget)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "prefix_cache_cpu.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rt = TwoTowerRuntime.from_checkpoint(dtype=args.dtype)
    limit = rt.cfg.max_position_embeddings
    if args.prefix + args.suffix + args.new_tokens > limit:
        raise SystemExit(f"error: {args.prefix} + {args.suffix} + {args.new_tokens} tokens exceed the model's {limit}")
    prompts = prompts_from_corpus(rt.tokenizer, args.prefix, args.suffix, args.requests)
    rt.generate([prompts[0][:32]], max_new_tokens=args.new_tokens)  # warm-up
    counter = PrefillCounter(rt.executor)
    phases = {}
    for mode in args.modes.split(","):
        for name, concurrent in (("sequential", False), ("concurrent", True)):
            phases[f"{mode} {name}"] = phase = run_phase(rt, counter, prompts, mode, args, concurrent)
            print(mode, name, json.dumps({k: v for k, v in phase.items() if k != "cache"}), flush=True)
    result = {"device": f"CPU ({platform.machine()}, {platform.node()}), {args.threads} thread(s)",
              "torch": torch.__version__, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
              "commit": git_commit(), "checkpoint": "demo_model", "dtype": args.dtype, "mode_settings": MODES,
              "prefix_tokens": args.prefix, "suffix_tokens": args.suffix, "requests": args.requests,
              "new_tokens": args.new_tokens, "page_tokens": rt.executor.page_tokens, "phases": phases}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
