#!/usr/bin/env python3
"""The knob report of the trained demo model (CPU): what the threshold and the step budget buy.

For held-out prompts from the demo corpus, greedy generation in every mode: AR (the context tower
alone), mock-AR, diffusion at thresholds x step budgets, and speculative (the exact AR output) at a
few of them. Per configuration: tokens per denoiser step, forwards of both towers per generated
token, agreement with AR greedy (same token at the same position), bits/byte of the generated text
under the context tower, known-word rate (words seen in the training split), distinct experts per
denoiser step (per MoE layer), tokens/s on this CPU.

    python bench/knob_report.py [--checkpoint DIR] [--out bench/results/knobs_cpu.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_towers import git_commit  # noqa: E402
from trtllm_twotower.demo import default_checkpoint  # noqa: E402
from trtllm_twotower.network import towers  # noqa: E402
from trtllm_twotower.network.ops import TorchOps  # noqa: E402
from trtllm_twotower.runtime import TwoTowerRuntime  # noqa: E402
from trtllm_twotower.training import corpus as corpus_lib  # noqa: E402

THRESHOLDS = (0.5, 0.7, 0.8, 0.9, 0.95)
STEP_BUDGETS = (16, 8, 4)
SPECULATIVE = ((0.5, 1), (0.5, 2), (0.5, 4), (0.8, 8), (0.9, 16))


class ExpertCounter(TorchOps):
    """TorchOps that records the distinct experts each MoE call routes to."""

    def __init__(self, dtype, device):
        super().__init__(dtype, device)
        self.distinct: list[int] = []

    def moe_experts(self, x, idx, weights, up, down, shared=None):
        self.distinct.append(int(torch.unique(idx).numel()))
        return super().moe_experts(x, idx, weights, up, down, shared)


def prompts_from(corpus: Path, tokenizer, count: int, length: int) -> list[str]:
    """The first ``length`` characters of held-out documents long enough to continue."""
    docs = [d for d in corpus_lib.read_corpus(corpus) if corpus_lib.is_held_out(d) and len(d) > 4 * length]
    return [d[:length] for d in docs[:count]]


def known_words(corpus: Path) -> set[str]:
    docs = [d for d in corpus_lib.read_corpus(corpus) if not corpus_lib.is_held_out(d)]
    return {w.lower() for d in docs for w in re.findall(r"[A-Za-z]+", d)}


@torch.inference_mode()
def bits_per_byte(rt: TwoTowerRuntime, prompt_ids: list[int], output_ids: list[int]) -> tuple[float, int]:
    """Summed NLL (bits) of the output under the context tower given the prompt, and its length."""
    ex = rt.executor
    ids = torch.tensor([prompt_ids + output_ids])
    state = towers.empty_state(rt.cfg, 1, ids.shape[1], ex.dtype, ex.context_device)
    logits, _ = towers.context_forward(ex.ctx_ops, rt.cfg, ex.ctx_weights, state, ids)
    logp = torch.log_softmax(logits[0, len(prompt_ids) - 1 : -1].float(), -1)
    nll = -logp.gather(-1, torch.tensor(output_ids)[:, None]).sum().item()
    return nll / math.log(2), len(output_ids)


def measure(rt, prompts, ar_ids, words, mode, **knobs) -> dict:
    counter = ExpertCounter(rt.executor.dtype, rt.executor.denoiser_device)
    rt.executor.den_ops = counter
    start = time.perf_counter()
    res = rt.generate(prompts, max_new_tokens=64, mode=mode, temperature=0.0, eos_token_id=None, **knobs)
    seconds = time.perf_counter() - start
    prompt_ids = [rt.tokenizer.encode(p) for p in prompts]
    bits = [bits_per_byte(rt, p, o) for p, o in zip(prompt_ids, res.output_ids)]
    agree = [sum(a == b for a, b in zip(out, ref)) / len(ref) for out, ref in zip(res.output_ids, ar_ids)]
    found = [w.lower() for t in res.text for w in re.findall(r"[A-Za-z]+", t)]
    tokens = sum(map(len, res.output_ids))
    moe_layers = rt.cfg.layer_pattern.count("E")
    row = {"mode": mode, **knobs, "tokens_per_step": tokens / max(1, res.stats["denoiser_forwards"]),
           "forwards_per_token": res.stats["forwards_per_token"],
           "ar_agreement": sum(agree) / len(agree),
           "bits_per_byte": sum(b for b, _ in bits) / sum(n for _, n in bits),
           "known_word_rate": sum(w in words for w in found) / max(1, len(found)),
           "distinct_experts_per_step": (sum(counter.distinct) / len(counter.distinct)) if counter.distinct else None,
           "experts_per_layer": rt.cfg.n_routed_experts, "moe_layers": moe_layers,
           "tokens_per_s": tokens / seconds, "sample": prompts[0] + res.text[0]}
    if mode == "speculative":
        row["tokens_per_block"] = res.stats["tokens_per_block"]
        row["acceptance_by_position"] = res.stats["acceptance_by_position"]
    if mode in ("ar", "mock-ar"):
        row["tokens_per_step"] = 1.0
    return row


def plot(rows: list[dict], knobs_png: Path, speculative_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ar = next(r for r in rows if r["mode"] == "ar")
    for steps in STEP_BUDGETS:
        sel = [r for r in rows if r["mode"] == "diffusion" and r["steps_per_block"] == steps]
        xs = [r["confidence_threshold"] for r in sel]
        axes[0].plot(xs, [r["tokens_per_step"] for r in sel], "o-", label=f"{steps} steps/block")
        axes[1].plot(xs, [r["ar_agreement"] for r in sel], "o-", label=f"{steps} steps/block")
        axes[2].plot(xs, [r["known_word_rate"] for r in sel], "o-", label=f"{steps} steps/block")
    axes[0].set(xlabel="confidence threshold", ylabel="tokens per denoiser step", title="diffusion: parallelism")
    axes[1].set(xlabel="confidence threshold", ylabel="positions equal to AR greedy", title="agreement with AR")
    axes[2].axhline(ar["known_word_rate"], color="gray", ls=":", label="AR")
    axes[2].set(xlabel="confidence threshold", ylabel="known-word rate", title="word quality")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Trained two-tower demo model: diffusion knobs (CPU, greedy, 64 tokens from held-out prompts)")
    fig.tight_layout()
    fig.savefig(knobs_png, dpi=110)

    picks = [r for r in rows if r["mode"] in ("ar", "mock-ar", "speculative") or
             (r["mode"] == "diffusion" and (r["confidence_threshold"], r["steps_per_block"]) in SPECULATIVE)]
    short = {"speculative": "spec.", "diffusion": "diff."}
    labels = [r["mode"] if r["mode"] in ("ar", "mock-ar") else
              f"{short[r['mode']]}\n{r['confidence_threshold']}/{r['steps_per_block']}" for r in picks]
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.2))
    colors = ["C2" if r["mode"] == "speculative" else "C0" if r["mode"] == "diffusion" else "C7" for r in picks]
    axes[0].bar(labels, [r["forwards_per_token"] for r in picks], color=colors)
    axes[0].set(ylabel="forwards (both towers) per token", title="cost per generated token")
    axes[1].bar(labels, [r["tokens_per_s"] for r in picks], color=colors)
    axes[1].set(ylabel="tokens / s (CPU, 16 rows)", title="throughput")
    for ax in axes:
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle("AR, diffusion and speculative (= AR output) on the trained demo model; "
                 "threshold/steps per block under each bar")
    fig.tight_layout()
    fig.savefig(speculative_png, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--prompt-chars", type=int, default=48)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "knobs_cpu.json"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="one threshold and step budget (a smoke run)")
    p.add_argument("--no-plot", action="store_true", help="JSON only (plots need matplotlib: pip install '.[bench]')")
    args = p.parse_args(argv)
    global THRESHOLDS, STEP_BUDGETS, SPECULATIVE
    if args.quick:
        THRESHOLDS, STEP_BUDGETS, SPECULATIVE = (0.8,), (4,), ((0.8, 4),)
    torch.set_num_threads(args.threads)
    directory = Path(args.checkpoint) if args.checkpoint else default_checkpoint()
    rt = TwoTowerRuntime.from_checkpoint(directory, dtype="float32")
    corpus = directory / "corpus.txt.xz"
    prompts = prompts_from(corpus, rt.tokenizer, args.prompts, args.prompt_chars)
    words = known_words(corpus)
    ar = rt.generate(prompts, max_new_tokens=64, mode="ar", eos_token_id=None)
    rows = [measure(rt, prompts, ar.output_ids, words, "ar"), measure(rt, prompts, ar.output_ids, words, "mock-ar")]
    for steps in STEP_BUDGETS:
        for threshold in THRESHOLDS:
            rows.append(measure(rt, prompts, ar.output_ids, words, "diffusion", confidence_threshold=threshold,
                                steps_per_block=steps))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "sample"}), flush=True)
    for threshold, steps in SPECULATIVE:
        rows.append(measure(rt, prompts, ar.output_ids, words, "speculative", confidence_threshold=threshold,
                            steps_per_block=steps))
        print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("sample", "acceptance_by_position")}),
              flush=True)
    commit = git_commit()
    result = {"device": f"CPU ({platform.machine()}), {args.threads} thread(s)", "torch": torch.__version__,
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"), "commit": commit,
              "checkpoint": str(directory), "prompts": len(prompts), "new_tokens": 64, "temperature": 0.0,
              "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    if not args.no_plot:
        plot(rows, out.with_suffix(".png"), out.with_name(out.stem.replace("knobs", "speculative") + ".png"))
    print(f"wrote {out}" + ("" if args.no_plot else " and its plots"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
