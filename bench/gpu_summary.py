#!/usr/bin/env python3
"""Issue 10's goals from one GPU run's files (``bench/run_gpu.sh``), and the README plot.

    python bench/gpu_summary.py DIR                      # the goal table (run_gpu.sh prints it last)
    python bench/gpu_summary.py DIR --plot out.png       # step latency vs floor, tokens/s vs batch

DIR holds ``towers.json`` (bench_towers.py) and ``kernels.json`` (bench_kernels.py); a missing or
partial file gives "not measured" rows, never an invented number. Each goal is reported with its
measured ratio, met or not.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path


def load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def step(towers: dict, name: str, batch: int, context: int) -> dict | None:
    return next((r for r in towers.get("steps", []) if (r["step"], r["batch"], r["context"]) == (name, batch, context)),
                None)


def best_ms(row: dict) -> tuple[float, str]:
    """The faster of the eager and CUDA-graph timings of a step row."""
    if row.get("ms_graph") and row["ms_graph"] < row["ms"]:
        return row["ms_graph"], "graph"
    return row["ms"], "eager"


def goals(towers: dict, kernels: dict) -> list[tuple[str, str, str, bool | None]]:
    """(goal, target, measured, met) rows; met None = not measured."""
    rows = []
    for name, label in (("ar_token", "AR token, batch 1, ctx 1k"), ("denoise16", "denoiser step, batch 1, ctx 1k")):
        r = step(towers, name, 1, 1024)
        if r is None:
            rows.append((label, "<= 1.25x floor", "not measured", None))
            continue
        ms, how = best_ms(r)
        rows.append((label, "<= 1.25x floor", f"{ms:.3f} ms ({how}) / floor {r['floor_ms']:.3f} ms = "
                     f"{ms / r['floor_ms']:.2f}x", ms / r["floor_ms"] <= 1.25))
    generation = {(g["mode"], g["batch"]): g for g in towers.get("generation", [])}
    ours = max((g for g in (generation.get(("ar", 1)), generation.get(("ar-graphs", 1))) if g and "tokens_per_s" in g),
               key=lambda g: g["tokens_per_s"], default=None)
    theirs = generation.get(("transformers-ar", 1))
    if ours and theirs and "tokens_per_s" in theirs:
        ratio = ours["tokens_per_s"] / theirs["tokens_per_s"]
        rows.append(("AR mode vs transformers greedy, batch 1", ">= 2x", f"{ours['tokens_per_s']:.1f} "
                     f"({ours['mode']}) / {theirs['tokens_per_s']:.1f} tok/s = {ratio:.2f}x", ratio >= 2))
    else:
        why = (theirs or {}).get("error", "not measured")
        rows.append(("AR mode vs transformers greedy, batch 1", ">= 2x", why[:80], None))
    attention = [r for r in kernels.get("block_attention", []) if isinstance(r, dict) and r.get("context", 0) >= 8192] \
        if isinstance(kernels.get("block_attention"), list) else []
    if attention:
        r = min(attention, key=lambda r: r["context"])
        rows.append((f"block attention, ctx {r['context']}", ">= 80% of copy bandwidth",
                     f"{r['fraction_of_copy_bandwidth']:.1%} ({r['speedup_vs_sdpa']:.2f}x SDPA)",
                     r["fraction_of_copy_bandwidth"] >= 0.8))
    else:
        rows.append(("block attention, ctx 8k", ">= 80% of copy bandwidth", _why(kernels, "block_attention"), None))
    scans = kernels.get("seeded_scan") if isinstance(kernels.get("seeded_scan"), list) else []
    for r in scans:
        rows.append((f"seeded scan, {r['tokens']} tokens", ">= 70% of byte floor",
                     f"{r['fraction_of_floor']:.1%} (torch form {r['torch_ms'] / r['ms']:.2f}x slower)",
                     r["fraction_of_floor"] >= 0.7))
    if not scans:
        rows.append(("seeded scan", ">= 70% of byte floor", _why(kernels, "seeded_scan"), None))
    return rows


def _why(kernels: dict, section: str) -> str:
    value = kernels.get(section)
    return value["error"][:80] if isinstance(value, dict) and "error" in value else "not measured"


def print_summary(towers: dict, kernels: dict) -> None:
    print(f"device: {towers.get('device') or kernels.get('device') or '?'}  commit: "
          f"{(towers.get('commit') or kernels.get('commit') or '?')[:12]}  date: {towers.get('date') or kernels.get('date')}")
    if towers:
        print(f"towers: {towers['layers']} layers, kernels={towers.get('kernels')}, complete={towers.get('complete')}, "
              f"copy bandwidth {towers['copy_bandwidth_bytes_per_s'] / 1e9:.0f} GB/s")
    for goal, target, measured, met in goals(towers, kernels):
        mark = {True: "MET", False: "not met", None: "n/a"}[met]
        print(f"  {goal:42s} {target:26s} {measured:60s} {mark}")
    for r in towers.get("steps", []):
        graph = f"graph {r['ms_graph']:8.3f}" if r.get("ms_graph") else "graph      -  "
        print(f"  {r['step']:10s} B={r['batch']:3d} ctx={r['context']:6d} eager {r['ms']:8.3f} {graph} "
              f"floor {r['floor_ms']:8.3f} ms")
    for e in towers.get("step_errors", []):
        print(f"  steps      B={e['batch']:3d} ctx={e['context']:6d} {e['error'][:90]}")
    for g in towers.get("generation", []):
        rate = f"{g['tokens_per_s']:9.1f} tok/s" if "tokens_per_s" in g else g.get("error", "")[:90]
        if g.get("steady_tokens_per_s"):
            rate += f"  (second half {g['steady_tokens_per_s']:9.1f} tok/s)"
        print(f"  generate {g['mode']:18s} B={g['batch']:3d} {rate}")


def plot(towers: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    steps = towers.get("steps", [])
    labels = [f"{r['step']}\nB{r['batch']} ctx {r['context'] // 1024}k" if r["context"] >= 1024 else
              f"{r['step']}\nB{r['batch']} ctx {r['context']}" for r in steps]
    xs = range(len(steps))
    left.bar([x - 0.27 for x in xs], [r["ms"] for r in steps], 0.27, label="eager")
    left.bar(list(xs), [r.get("ms_graph") or 0 for r in steps], 0.27, label="CUDA graph")
    left.bar([x + 0.27 for x in xs], [r["floor_ms"] for r in steps], 0.27, label="byte floor")
    left.set_xticks(list(xs), labels, fontsize=6, rotation=90)
    left.set_ylabel("ms per step")
    left.set_yscale("log")
    left.set_title("step latency against its floor")
    left.legend(fontsize=8)
    by_mode: dict[str, list] = {}
    for g in towers.get("generation", []):
        if "tokens_per_s" in g:
            by_mode.setdefault(g["mode"], []).append((g["batch"], g["tokens_per_s"]))
    for mode, points in sorted(by_mode.items()):
        points.sort()
        right.plot([b for b, _ in points], [t for _, t in points], marker="o", label=mode)
    right.set_xscale("log", base=2)
    right.set_xlabel("batch")
    right.set_ylabel("generated tokens / s")
    right.set_title("end to end")
    right.legend(fontsize=8)
    fig.suptitle(f"{towers.get('device')}, {towers.get('layers')} layers, {towers.get('date', '')[:10]}, "
                 f"commit {towers.get('commit', '?')[:8]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", type=Path)
    p.add_argument("--plot", type=Path, help="write the README's PNG here")
    args = p.parse_args(argv)
    towers, kernels = load(args.dir / "towers.json"), load(args.dir / "kernels.json")
    if not towers and not kernels:
        print(f"error: neither towers.json nor kernels.json readable in {args.dir}", file=sys.stderr)
        return 2
    print_summary(towers, kernels)
    if args.plot:
        if not towers.get("steps"):
            print("error: no step timings to plot", file=sys.stderr)
            return 2
        if importlib.util.find_spec("matplotlib") is None:
            print("error: --plot needs matplotlib (pip install -e '.[bench]')", file=sys.stderr)
            return 2
        plot(towers, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
