#!/usr/bin/env python3
"""Step latency of the towers against the memory floor of that very step, and end-to-end modes.

Builds towers with the real layer shapes from random weights (full depth, or the first --layers
layers of the real pattern when both towers must fit one GPU), random context states of the asked
length, and times on the torch backend:
  ar_token    one context-tower token with logits (the AR step)
  extend16    a 16-token context extend without logits (after each committed block)
  denoise16   a 16-token denoiser step (all masked: t = 1)
  generate    end-to-end generation per mode (ar, diffusion, speculative, mock-ar) and transformers' greedy AR
Each step's floor = (dense weights read + the distinct experts it actually routed + K/V and Mamba
state traffic) / measured device copy bandwidth. With --graphs every step is also timed as a
CUDA-graph replay and every mode also run with the executor's graphs on ("<mode>-graphs").
Results: one JSON (device, date, commit, numbers), saved after every shape and every mode.

    python bench/bench_towers.py --out bench/results/h100.json           # on a GPU
    python bench/bench_towers.py --smoke --out /tmp/smoke.json           # CPU: tiny config, checks the harness
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trtllm_twotower.checkpoint import CONTEXT, DENOISER, TWOTOWER, assemble_tower_weights  # noqa: E402
from trtllm_twotower.config import ATTENTION, MAMBA, MOE, config_from_dict  # noqa: E402
from trtllm_twotower.demo import DEMO_CONFIG, init_tensor  # noqa: E402
from trtllm_twotower.network import towers  # noqa: E402
from trtllm_twotower.network.ops import TorchOps  # noqa: E402
from trtllm_twotower.runtime import sampler  # noqa: E402
from trtllm_twotower.runtime.executor import TorchExecutor  # noqa: E402
from trtllm_twotower.runtime.graphs import run_then_capture  # noqa: E402
from trtllm_twotower.runtime.scheduler import Scheduler  # noqa: E402

# The released model's config.json fields (spec §1), as the tests and the build plan use them.
REAL_CONFIG = json.loads((ROOT / "bench" / "real_config.json").read_text())


class CountingOps(TorchOps):
    """TorchOps that records the distinct experts each MoE layer routed to (for the floor)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.distinct: list[int] = []

    def moe_route(self, x, router, correction_bias, top_k, normalize, scale):
        idx, w = super().moe_route(x, router, correction_bias, top_k, normalize, scale)
        self.distinct.append(int(idx.unique().numel()))
        return idx, w


def random_weights(cfg, tower: str, dtype, device, seed: int) -> dict:
    gen = torch.Generator(device=device).manual_seed(seed)
    return assemble_tower_weights(cfg, tower, TWOTOWER, lambda spec: init_tensor(spec.key, spec.shape, gen),
                                  dtype, device)


def random_state(cfg, batch: int, context: int, capacity: int, dtype, device, seed: int) -> towers.TowerState:
    """A context state as if ``context`` tokens had been read: random K/V, conv and SSM states."""
    gen = torch.Generator(device=device).manual_seed(seed)
    state = towers.empty_state(cfg, batch, capacity, dtype, device)
    for d in (state.keys, state.values, state.conv):
        for t in d.values():
            t.normal_(generator=gen)
    for t in state.ssm.values():
        t.normal_(generator=gen).mul_(10.0)
    return towers.TowerState(torch.full((batch,), context, dtype=torch.long), state.keys, state.values,
                             state.conv, state.ssm)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, device, warmup: int, repeat: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def copy_bandwidth(device, nbytes: int) -> float:
    """Bytes/s of a device-to-device copy, counting bytes read plus bytes written."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, warmup=3, repeat=10)
    return 2 * src.numel() * 4 / (ms / 1e3)


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def step_bytes(cfg, w: dict, distinct: list[int], batch: int, context: int, new_tokens: int, *,
               head: bool, writes_state: bool) -> int:
    """Fewest bytes one forward must move: dense weights, the routed experts, caches and states."""
    total = 0
    act = w["norm_f"].element_size()
    for i, kind in enumerate(cfg.layer_pattern):
        total += sum(nbytes(t) for name, t in w["layers"][i].items() if name not in ("experts_up", "experts_down"))
        if kind == ATTENTION:  # read the context's K/V, write the new tokens'
            total += batch * (context + new_tokens) * cfg.num_key_value_heads * cfg.head_dim * act * 2
        if kind == MAMBA:  # fp32 SSM state and conv history: read, and written back by the context tower
            state = cfg.mamba_num_heads * cfg.mamba_head_dim * cfg.ssm_state_size * 4
            total += batch * (state + cfg.conv_dim * cfg.conv_kernel * act) * (2 if writes_state else 1)
    for count, i in zip(distinct, cfg.layers_of(MOE)):  # only the experts this step routed to
        layer = w["layers"][i]
        total += count * (nbytes(layer["experts_up"][0]) + nbytes(layer["experts_down"][0]))
    total += nbytes(w["norm_f"]) + batch * new_tokens * cfg.hidden_size * act
    if head:
        total += nbytes(w["lm_head"])
    return total


def graph_ms(run, device, args) -> tuple[float | None, str | None]:
    """Median ms of the step replayed as one CUDA graph (the launch gaps gone), or (None, why not).
    The step must make no synchronising call: the state's lengths live on the device and attention
    runs in the kernel library (its torch reference reads the lengths on the host)."""
    if device.type != "cuda":
        return None, "CUDA graphs need a CUDA device"
    try:
        def step() -> None:  # the bench keeps no output
            run()

        _, graph, _, error = run_then_capture(step, device)
        if error is not None:
            raise error
        return median_ms(graph.replay, device, args.warmup, args.repeat), None
    except Exception as error:  # noqa: BLE001 - any capture failure is a result to report
        torch.cuda.synchronize(device)
        return None, f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"


def time_steps(cfg, ctx_w, den_w, dtype, device, batch: int, context: int, args, bandwidth: float) -> list[dict]:
    rows = []
    state = random_state(cfg, batch, context, context + 64, dtype, device, seed=batch + context)
    # the same state with its lengths on the device, for graph capture (no host reads of them)
    device_state = towers.TowerState(state.lengths.to(device), state.keys, state.values, state.conv, state.ssm)
    gen = torch.Generator(device=device).manual_seed(0)
    cases = []
    if ctx_w is not None:
        one = torch.randint(4, cfg.vocab_size, (batch, 1), device=device, generator=gen)
        block = torch.randint(4, cfg.vocab_size, (batch, 16), device=device, generator=gen)
        cases += [("ar_token", ctx_w, lambda ops, s: towers.context_forward(ops, cfg, ctx_w, s, one), 1, True, True),
                  ("extend16", ctx_w,
                   lambda ops, s: towers.context_forward(ops, cfg, ctx_w, s, block, logits=False), 16, False, True)]
    if den_w is not None:
        masks = torch.full((batch, 16), cfg.mask_token_id, device=device)
        t = torch.ones(batch, device=device)
        cases.append(("denoise16", den_w, lambda ops, s: towers.denoise(ops, cfg, den_w, s, masks, t), 16, True, False))
    with torch.inference_mode():
        for name, w, run, new_tokens, head, writes in cases:
            counting = CountingOps(dtype, device)
            run(counting, state)  # one pass to see which experts this step routes
            ops = TorchOps(dtype, device)
            ms = median_ms(lambda: run(ops, state), device, args.warmup, args.repeat)
            ms_graph, graph_error = graph_ms(lambda: run(ops, device_state), device, args) if args.graphs else (None, None)
            floor_bytes = step_bytes(cfg, w, counting.distinct, batch, context, new_tokens, head=head, writes_state=writes)
            floor_ms = floor_bytes / bandwidth * 1e3
            rows.append({"step": name, "batch": batch, "context": context, "ms": ms, "floor_ms": floor_ms,
                         "ratio_to_floor": ms / floor_ms, "floor_bytes": floor_bytes,
                         "ms_graph": ms_graph, "graph_ratio_to_floor": ms_graph / floor_ms if ms_graph else None,
                         "graph_error": graph_error,
                         "distinct_experts_mean": statistics.mean(counting.distinct) if counting.distinct else 0})
            graphed = f"graph {ms_graph:8.3f} ms x{ms_graph / floor_ms:5.2f}" if ms_graph else f"graph: {graph_error}"
            print(f"{name:10s} B={batch:3d} ctx={context:6d}  {ms:9.3f} ms  floor {floor_ms:8.3f} ms  "
                  f"x{ms / floor_ms:6.2f}  experts/layer {rows[-1]['distinct_experts_mean']:.1f}  "
                  f"{graphed if args.graphs else ''}", flush=True)
    return rows


def run_scheduled(executor, cfg, mode, prompts, settings, device):
    """One batch through a fresh scheduler, timed from submission to the last token. Returns (row
    outputs, seconds, steady tokens/s: the rate after the first half of the output, which leaves out
    the prefill and the graph captures a fresh batch costs; None if too few events). A failed
    forward raises (the scheduler would otherwise just end the rows early)."""
    scheduler = Scheduler(executor, cfg, max_batch=len(prompts))
    events = []  # (time, tokens so far)
    emitted = [0]

    def on_event(index, tokens, finished):
        emitted[0] += len(tokens)
        events.append((time.perf_counter(), emitted[0]))
    sync(device)
    start = time.perf_counter()
    ticket = scheduler.submit(mode, prompts, settings, list(range(len(prompts))), on_event=on_event)
    scheduler.run_until(ticket)
    sync(device)
    seconds = time.perf_counter() - start
    if ticket.error is not None:
        raise ticket.error
    half = next((e for e in events if e[1] >= emitted[0] / 2), None)
    steady = ((emitted[0] - half[1]) / (events[-1][0] - half[0])
              if half is not None and events[-1][0] > half[0] else None)
    return [r.out for r in ticket.rows], seconds, steady


def time_generation(cfg, raw, ctx_w, den_w, dtype, device, args, rows: list, save) -> None:
    """End to end per mode (and per mode with CUDA graphs, with --graphs), appended to ``rows``
    and saved after each."""
    executors = {"off": TorchExecutor(cfg, ctx_w, den_w, dtype, device, device, graphs="off")}
    if args.graphs:  # steps replayed from CUDA graphs (on the CPU the same plumbing, uncaptured: the smoke run)
        graphs = "on" if device.type == "cuda" else "emulate"
        executors[graphs] = TorchExecutor(cfg, ctx_w, den_w, dtype, device, device, graphs=graphs)
    modes = ("ar", "diffusion", "speculative", "mock-ar")
    runs = [(mode, graphs) for graphs in executors for mode in modes]
    gen = torch.Generator().manual_seed(1)
    for batch in args.gen_batches:
        prompts = [torch.randint(4, cfg.vocab_size, (args.gen_prompt,), generator=gen).tolist() for _ in range(batch)]
        for mode, graphs in runs:
            label = mode if graphs == "off" else f"{mode}-graphs"
            # speculative drafts in one denoiser step per block: its fewest forwards per token (README)
            steps_per_block = 1 if mode == "speculative" else 16
            settings = sampler.SamplerSettings(args.gen_tokens, 16, steps_per_block, args.threshold, 0.0, 0, 1.0,
                                               cfg.mask_token_id, None)
            try:
                run_scheduled(executors[graphs], cfg, mode, prompts, settings, device)  # warm-up
                outputs, seconds, steady = run_scheduled(executors[graphs], cfg, mode, prompts, settings, device)
            except Exception as error:  # noqa: BLE001 - e.g. a capture that fails: reported, the rest runs
                rows.append({"mode": label, "batch": batch, "graphs": graphs, "error": f"{type(error).__name__}: "
                             f"{error}"[:300]})
                print(f"generate {label:16s} B={batch:3d}  {rows[-1]['error']}", flush=True)
                save()
                continue
            tokens = sum(len(o.tokens) for o in outputs)
            steps = sum(o.steps for o in outputs)
            forwards = sum(o.denoiser_forwards + o.context_forwards for o in outputs)
            rows.append({"mode": label, "batch": batch, "graphs": graphs, "steps_per_block": steps_per_block,
                         "tokens_per_s": tokens / seconds, "seconds": seconds, "steady_tokens_per_s": steady,
                         "tokens_per_step": tokens / max(1, steps), "forwards_per_token": forwards / max(1, tokens)})
            print(f"generate {label:16s} B={batch:3d}  {tokens / seconds:9.1f} tok/s  (second half "
                  f"{steady or 0:9.1f})  tokens/step {rows[-1]['tokens_per_step']:.2f}", flush=True)
            save()
        if args.transformers and batch == 1:
            try:
                seconds = time_transformers(raw, ctx_w, dtype, device, prompts, args.gen_tokens)
            except Exception as error:  # noqa: BLE001 - the installed transformers may lack NemotronH
                rows.append({"mode": "transformers-ar", "batch": 1, "error": f"{type(error).__name__}: {error}"[:300]})
                print(f"generate transformers-ar: {rows[-1]['error']}", flush=True)
                save()
                continue
            rows.append({"mode": "transformers-ar", "batch": 1, "tokens_per_s": args.gen_tokens / seconds,
                         "seconds": seconds, "tokens_per_step": 1.0})
            print(f"generate transformers-ar B=  1  {args.gen_tokens / seconds:9.1f} tok/s", flush=True)
            save()


def time_transformers(raw, ctx_w, dtype, device, prompts, new_tokens: int) -> float:
    """Seconds of transformers' greedy ``generate`` (its NemotronH over our tensors), after a warm-up."""
    from trtllm_twotower.hf_reference import transformers_model_from_config

    model = transformers_model_from_config(raw, ctx_w, dtype)
    ids = torch.tensor(prompts, device=device)
    run = lambda: model.generate(ids, max_new_tokens=new_tokens, do_sample=False,  # noqa: E731
                                 eos_token_id=None, pad_token_id=0)
    with torch.inference_mode():
        run()
        sync(device)
        start = time.perf_counter()
        run()
        sync(device)
    return time.perf_counter() - start


def git_commit() -> str:
    """The commit measured: $TWOTOWER_COMMIT when set (a copied tree without .git, e.g. on a lent
    GPU machine), else git's HEAD, with "+dirty" when the tree has uncommitted changes."""
    if os.environ.get("TWOTOWER_COMMIT"):
        return os.environ["TWOTOWER_COMMIT"]
    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, check=True).stdout  # noqa: E731
    try:
        return git("rev-parse", "HEAD").strip() + ("+dirty" if git("status", "--porcelain", "--untracked-files=no").strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON results file")
    p.add_argument("--smoke", action="store_true", help="tiny demo config on CPU: checks the harness only")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--layers", type=int, default=52, help="first N layers of the real pattern (52 = full depth)")
    p.add_argument("--towers", choices=["context", "denoiser", "both"], default="both")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192])
    p.add_argument("--gen-batches", type=int, nargs="*", default=[1, 4, 16])
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--gen-prompt", type=int, default=256)
    p.add_argument("--threshold", type=float, default=0.8)
    p.add_argument("--transformers", action="store_true", help="also time transformers' greedy generate (AR baseline)")
    p.add_argument("--graphs", action="store_true",
                   help="also time each step replayed as a CUDA graph (needs the kernel library)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeat", type=int, default=10)
    args = p.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.smoke:
        raw = dict(DEMO_CONFIG)
        args.batches, args.contexts, args.gen_batches = [1, 2], [16], [1]
        args.gen_tokens, args.gen_prompt, args.warmup, args.repeat = 16, 8, 1, 2
        dtype = torch.float32
    else:
        pattern = REAL_CONFIG["hybrid_override_pattern"][: args.layers]
        raw = {**REAL_CONFIG, "hybrid_override_pattern": pattern, "num_hidden_layers": len(pattern)}
        dtype = torch.bfloat16
    cfg = config_from_dict(raw)
    ctx_w = random_weights(cfg, CONTEXT, dtype, device, seed=0) if args.towers in ("context", "both") else None
    den_w = random_weights(cfg, DENOISER, dtype, device, seed=1) if args.towers in ("denoiser", "both") else None
    bandwidth = copy_bandwidth(device, 64 * 2**20 if args.smoke else 2 * 2**30)
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.machine()}), "
          f"layers {cfg.num_layers}, copy bandwidth {bandwidth / 1e9:.0f} GB/s", flush=True)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(), "torch": torch.__version__, "layers": cfg.num_layers, "dtype": str(dtype),
        "kernels": os.environ.get("TWOTOWER_KERNELS", "auto"),
        "copy_bandwidth_bytes_per_s": bandwidth, "steps": [], "generation": [], "complete": False,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save = lambda: out.write_text(json.dumps(result, indent=2))  # noqa: E731 - after every piece: a cut run keeps its numbers
    for b in args.batches:
        for c in args.contexts:
            try:
                result["steps"] += time_steps(cfg, ctx_w, den_w, dtype, device, b, c, args, bandwidth)
            except Exception as error:  # noqa: BLE001 - e.g. out of memory at the largest shape: the rest runs
                result.setdefault("step_errors", []).append({"batch": b, "context": c,
                                                             "error": f"{type(error).__name__}: {error}"[:300]})
                print(f"steps B={b} ctx={c}: {result['step_errors'][-1]['error']}", flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            save()
    if args.towers == "both":
        time_generation(cfg, raw, ctx_w, den_w, dtype, device, args, result["generation"], save)
    result["complete"] = True
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
