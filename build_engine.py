#!/usr/bin/env python3
"""Convert a TwoTower (or Nano) HF checkpoint into two TensorRT-LLM checkpoints and, where
TensorRT-LLM 1.2 and a GPU are present, build one BF16 engine per tower.

    python build_engine.py --checkpoint HF_DIR --output-dir OUT
        OUT/trtllm_checkpoint/{context,denoiser}/   config.json + rank0.safetensors
        OUT/build_plan.json                         engine I/O, profiles, plugins, GPU memory per layout
        OUT/engines/{context,denoiser}/ + OUT/manifest.json    only with TensorRT-LLM 1.2
    python build_engine.py --plan-only --config config.json [--max-seq-len ...]   plan without weights
    python build_engine.py --inspect OUT/engines/context      Polygraphy layer / I/O listing
    python build_engine.py --checkpoint HF_DIR --onnx OUT [--dtype float32]
        OUT/{context,context_trace,denoiser,denoiser_untimed}.onnx (+ .onnx.data weights)
        OUT/onnx_manifest.json, OUT/trt_build.sh (trtexec; polygraphy convert as comments)
        OUT/engines/<graph>.engine                 only with TensorRT installed (Python API)
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

from trtllm_twotower.checkpoint import CONTEXT, DENOISER, NANO, TWOTOWER, CheckpointError
from trtllm_twotower.config import ConfigError, TwoTowerConfig, config_file, load_config
from trtllm_twotower.convert import ARCHITECTURES, DTYPES, convert_checkpoint, trtllm_params
from trtllm_twotower.engine_io import TRTLLM_BUILD_FLAGS, BuildLimits, engine_io, memory_plan, profiles, write_manifest
from trtllm_twotower.fsutil import Terminated, atomic_directory
from trtllm_twotower.plugins.plugin_library import PluginLibraryError

PLUGINS = {CONTEXT: ["TwoTowerBlockAttention (causal)", "TwoTowerSeededMambaScan", "TwoTowerMoeExperts"],
           DENOISER: ["TwoTowerBlockAttention (bidirectional)", "TwoTowerSeededMambaScan (state dropped)",
                      "TwoTowerMoeExperts"]}


def weight_bytes(cfg: TwoTowerConfig, layout: str, dtype: str) -> dict[str, int]:
    towers = (CONTEXT,) if layout == NANO else (CONTEXT, DENOISER)
    return {t: sum(torch.Size(p.shape).numel() * torch.empty((), dtype=p.dtype).element_size()
                   for p in trtllm_params(cfg, layout, t, DTYPES[dtype])) for t in towers}


def build_plan(cfg: TwoTowerConfig, layout: str, limits: BuildLimits, dtype: str) -> dict:
    sizes = weight_bytes(cfg, layout, dtype)
    return {
        "dtype": dtype,
        "limits": limits.__dict__,
        "towers": {t: {"weight_bytes": sizes[t], "plugins": PLUGINS[t], "profiles": profiles(t, limits),
                       "io": [{"name": s.name, "dtype": s.dtype, "dims": list(s.dims), "input": s.is_input}
                              for s in engine_io(cfg, t, dtype)]}
                   for t in sizes},
        "memory": memory_plan(cfg, sizes, limits, dtype),
    }


def trtllm_build_commands(out: Path, limits: BuildLimits, towers: list[str]) -> list[list[str]]:
    """The ``trtllm-build`` command of each tower (the Python-API build does the same)."""
    entry = Path(__file__).resolve().parent / "trtllm_twotower" / "trtllm_build_entry.py"
    return [["trtllm-build", "--checkpoint_dir", str(out / "trtllm_checkpoint" / tower),
             "--output_dir", str(out / "engines" / tower), "--model_cls_file", str(entry),
             "--model_cls_name", ARCHITECTURES[tower], "--max_batch_size", str(limits.max_batch_size),
             "--max_input_len", str(limits.max_input_len), "--max_seq_len", str(limits.max_seq_len),
             "--max_num_tokens", str(limits.max_batch_size * limits.max_input_len),
             "--output_timing_cache", str(out / "timing.cache"), *TRTLLM_BUILD_FLAGS] for tower in towers]


def print_plan(plan: dict) -> None:
    for tower, info in plan["towers"].items():
        n_in = sum(1 for io in info["io"] if io["input"])
        print(f"{tower:9s} engine: {info['weight_bytes'] / 1e9:6.2f} GB weights, {n_in} inputs, "
              f"{len(info['io']) - n_in} outputs, {len(info['profiles'])} profile(s); plugins: {', '.join(info['plugins'])}")
    for m in plan["memory"]:
        devices = ", ".join(f"{d} {g:.1f} GiB" for d, g in m["devices_gib"].items())
        print(f"  {'fits' if m['fits'] else 'DOES NOT FIT'}: {m['layout']}: {devices} (of {m['capacity_gib']:.0f} GiB)")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="HF checkpoint directory (TwoTower or Nano)")
    p.add_argument("--output-dir", help="where the checkpoints, plan and engines go (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output-dir")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--max-input-len", type=int, default=4096, help="longest prefill")
    p.add_argument("--max-seq-len", type=int, default=8192, help="prompt + generated tokens (K/V buffer length)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=1, help="engines built in parallel (one per GPU)")
    p.add_argument("--plan-only", action="store_true", help="print the build plan from --config, no weights")
    p.add_argument("--config", help="config.json for --plan-only")
    p.add_argument("--inspect", metavar="ENGINE_DIR", help="list an engine's layers and I/O with Polygraphy")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-build", action="store_true", help="write the checkpoints and trtllm_build.sh, build no engine")
    p.add_argument("--onnx", metavar="OUT", help="export both towers to ONNX in OUT (written atomically) with the "
                   "TensorRT engine commands; builds the engines when TensorRT is installed")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.inspect:
            from trtllm_twotower.network.trt import inspect_engine

            return inspect_engine(Path(args.inspect))
        limits = BuildLimits(args.max_batch_size, args.max_input_len, args.max_seq_len, args.block_size)
        limits.check()
        if args.plan_only:
            if not args.config:
                raise ValueError("--plan-only needs --config config.json")
            plan = build_plan(load_config(args.config), TWOTOWER, limits, args.dtype)
            print_plan(plan)
            if args.output_dir:
                Path(args.output_dir).mkdir(parents=True, exist_ok=True)
                (Path(args.output_dir) / "build_plan.json").write_text(json.dumps(plan, indent=2))
            return 0
        if args.onnx:
            if not args.checkpoint or args.output_dir:
                raise ValueError("--onnx OUT needs --checkpoint, and takes no --output-dir")
            return build_onnx(args, limits)
        if not args.checkpoint or not args.output_dir:
            raise ValueError("--checkpoint and --output-dir are required (or --plan-only / --inspect / --onnx)")
        return build(args, limits)
    except (ValueError, ConfigError, CheckpointError, ImportError, PluginLibraryError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # an existing or unwritable --output-dir, a full disk
        print(f"error: {f'{err.strerror}: {err.filename}' if err.strerror else err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was written (the partial output was removed)", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated: nothing was written (the partial output was removed)", file=sys.stderr)
        return 143


def _new_output(path: str, overwrite: bool) -> Path:
    """The output directory, refused when it exists unless ``--overwrite`` (written atomically later)."""
    out = Path(path)
    if out.exists() and not overwrite:
        raise FileExistsError(f"output directory {out} exists (pass --overwrite to replace it)")
    return out


def _write_script(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


def build(args, limits: BuildLimits) -> int:
    out = _new_output(args.output_dir, args.overwrite)
    cfg = load_config(args.checkpoint)
    try:
        import tensorrt_llm  # noqa: F401
    except ImportError:
        tensorrt_llm = None
    with atomic_directory(out) as tmp:
        towers = convert_checkpoint(args.checkpoint, tmp / "trtllm_checkpoint", args.dtype,
                                    show_progress=not args.no_progress)
        layout = NANO if DENOISER not in towers else TWOTOWER
        plan = build_plan(cfg, layout, limits, args.dtype)
        (tmp / "build_plan.json").write_text(json.dumps(plan, indent=2))
        print_plan(plan)
        commands = trtllm_build_commands(out, limits, list(towers))
        _write_script(tmp / "trtllm_build.sh", "#!/usr/bin/env bash\n# Build the engines with trtllm-build "
                      "(TensorRT-LLM 1.2, a GPU; the trtllm_twotower package importable)\n"
                      "set -euo pipefail\n" + "".join(shlex.join(c) + "\n" for c in commands))
        write_manifest(tmp, cfg, limits, list(towers))
        if tensorrt_llm is not None and not args.no_build:
            from trtllm_twotower.network.trt import build_engines

            build_engines({t: tmp / "trtllm_checkpoint" / t for t in towers}, tmp, cfg, limits, args.workers)
    if tensorrt_llm is None or args.no_build:
        print(f"wrote {out}/trtllm_checkpoint, {out}/build_plan.json and {out}/manifest.json; build the engines "
              f"with {out}/trtllm_build.sh (TensorRT-LLM 1.2 and a GPU):")
        for c in commands:
            print("  " + shlex.join(c))
    return 0


def build_onnx(args, limits: BuildLimits) -> int:
    """The ONNX graphs of both towers, the engine commands and, with TensorRT, the engines."""
    from trtllm_twotower import onnx_engines, onnx_export

    out = _new_output(args.onnx, args.overwrite)
    cfg = load_config(args.checkpoint)
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        tensorrt = None
    with atomic_directory(out) as tmp:
        graphs = onnx_export.export_towers(args.checkpoint, tmp, args.dtype)
        commands = onnx_engines.engine_commands(cfg, graphs, out, limits)
        _write_script(tmp / "trt_build.sh", onnx_engines.build_script(commands, out, config_file(args.checkpoint)))
        if tensorrt is not None and not args.no_build:
            onnx_engines.build_engines(cfg, graphs, tmp, limits, args.dtype)
    print(f"wrote {', '.join(f'{g}.onnx' for g in graphs)} and trt_build.sh to {out}")
    if tensorrt is None or args.no_build:
        print("TensorRT is not installed: build the engines on a GPU machine with one of (per graph):")
        for c in commands:
            print("  " + shlex.join(c))
    return 0


if __name__ == "__main__":
    sys.exit(main())
