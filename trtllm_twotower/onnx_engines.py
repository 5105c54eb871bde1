"""TensorRT engines from the exported ONNX graphs: shape ranges, the ``trtexec`` and
``polygraphy convert`` commands, and the same build through TensorRT's Python API.

NOT EXECUTED here (TensorRT needs NVIDIA's package index and a GPU). TensorRT's ONNX parser imports
each ``twotower`` node as the plugin of its op type (``onnx_nodes.py``); the plugin library must be
loaded first (``--staticPlugins`` / ``--plugins``: it registers its creators when loaded).
"""

from __future__ import annotations

import shlex
from pathlib import Path

from .config import TwoTowerConfig
from .engine_io import BuildLimits, state_names
from .plugins.plugin_library import library_path


def shape_ranges(cfg: TwoTowerConfig, graph: str, limits: BuildLimits) -> dict[str, tuple[tuple, tuple, tuple]]:
    """{input: (min, opt, max) shape} of one graph: one optimisation profile. The context graph
    takes prefills up to ``max_input_len``; the traced graph and the denoisers take one block."""
    batch = (1, max(1, limits.max_batch_size // 2), limits.max_batch_size)
    long = graph == "context"
    tokens = (1, limits.max_input_len // 2, limits.max_input_len) if long else (1, limits.block_size, limits.block_size)
    cache = (limits.max_seq_len,) * 3  # the runtime's buffers hold max_seq_len slots
    fixed = {"key": (cfg.num_key_value_heads, cfg.head_dim), "value": (cfg.num_key_value_heads, cfg.head_dim),
             "conv": (cfg.conv_dim, cfg.conv_kernel),
             "ssm": (cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.ssm_state_size)}
    ranges = {"input_ids": tuple((b, t) for b, t in zip(batch, tokens)), "cache_lens": tuple((b,) for b in batch)}
    if graph == "denoiser":
        ranges["timestep"] = ranges["cache_lens"]
    for kind, entries in state_names(cfg).items():
        for _, name in entries:
            if kind in ("key", "value"):
                ranges[name] = tuple((b, s, *fixed[kind]) for b, s in zip(batch, cache))
            else:
                ranges[name] = tuple((b, *fixed[kind]) for b in batch)
    return ranges


def _dims(shape: tuple, sep: str) -> str:
    return sep.join(str(d) for d in shape)


def engine_commands(cfg: TwoTowerConfig, graphs: list[str], onnx_dir: Path, limits: BuildLimits,
                    plugins: Path | None = None) -> list[list[str]]:
    """Per graph: the ``trtexec`` command, then the ``polygraphy convert`` command, each writing
    ``onnx_dir/engines/<graph>.engine`` (strongly typed: the graphs' own dtypes)."""
    plugins = plugins or library_path()
    commands = []
    for graph in graphs:
        ranges = shape_ranges(cfg, graph, limits)
        onnx_path, engine = onnx_dir / f"{graph}.onnx", onnx_dir / "engines" / f"{graph}.engine"
        shapes = [",".join(f"{name}:{_dims(r[k], 'x')}" for name, r in ranges.items()) for k in range(3)]
        commands.append(["trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine}", f"--staticPlugins={plugins}",
                         "--stronglyTyped", f"--minShapes={shapes[0]}", f"--optShapes={shapes[1]}",
                         f"--maxShapes={shapes[2]}", "--skipInference"])
        poly = ["polygraphy", "convert", str(onnx_path), "--convert-to", "trt", "-o", str(engine), "--plugins",
                str(plugins), "--strongly-typed"]
        for flag, k in (("--trt-min-shapes", 0), ("--trt-opt-shapes", 1), ("--trt-max-shapes", 2)):
            poly += [flag, *(f"{name}:[{_dims(r[k], ',')}]" for name, r in ranges.items())]
        commands.append(poly)
    return commands


def build_script(commands: list[list[str]], onnx_dir: Path, config: Path) -> str:
    """``trt_build.sh``: the plugin library for this model's config (its kernels compiled ahead of
    time), then the trtexec commands (the polygraphy ones as comments: either route builds the same
    engines)."""
    plugins = Path(__file__).resolve().parent / "plugins" / "build.sh"
    lines = ["#!/usr/bin/env bash", "# Engines from the ONNX graphs (TensorRT 10.13 and a GPU). The plugin library is built",
             "# for this model's config against the same TensorRT (TENSORRT_ROOT, see build.sh).", "set -euo pipefail",
             shlex.join(["bash", str(plugins), str(Path(config).resolve())]),
             f"mkdir -p {shlex.quote(str(onnx_dir / 'engines'))}"]
    for command in commands:
        line = shlex.join(command)
        lines.append(line if command[0] == "trtexec" else f"# or: {line}")
    return "\n".join(lines) + "\n"


def build_engines(cfg: TwoTowerConfig, graphs: list[str], onnx_dir: Path, limits: BuildLimits, dtype: str) -> None:
    """The same engines through TensorRT's Python API (as the commands of ``engine_commands``):
    ONNX parser, one optimisation profile, strongly typed network. Raises ValueError naming the
    graph and the parser's errors (a missing plugin creator among them)."""
    import tensorrt as trt

    from .plugins.plugin_library import check_config, load_trt_plugins

    check_config(cfg, dtype)  # its kernels were compiled for this model's shapes and the graphs' dtype
    load_trt_plugins()
    logger = trt.Logger(trt.Logger.WARNING)
    (onnx_dir / "engines").mkdir(exist_ok=True)
    for graph in graphs:
        builder = trt.Builder(logger)
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_dir / f"{graph}.onnx")):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))  # node, code, text
            raise ValueError(f"{graph}.onnx: TensorRT's ONNX parser failed: {errors}")
        config = builder.create_builder_config()
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shape_ranges(cfg, graph, limits).items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise ValueError(f"{graph}.onnx: TensorRT could not build an engine (see its log above)")
        (onnx_dir / "engines" / f"{graph}.engine").write_bytes(serialized)
