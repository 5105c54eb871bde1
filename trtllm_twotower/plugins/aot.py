"""The Triton kernels compiled ahead of time, as C for the TensorRT plugin library.

``python -m trtllm_twotower.plugins.aot --config CONFIG --out DIR`` writes, for one model config:
- ``triton_variants.c``: two cubins per kernel variant (a kernel with its argument types and
  constexprs): one compiled with the divisibility by 16 Triton's JIT would see on a GPU for its
  pointers and for the config's widths and strides (so loads vectorise as on the torch path), one
  without; and the table ``twotower_variants`` of (key, divisible arguments, function name, cubin,
  shared memory, warps) that ``csrc/triton_launch.cpp`` loads from, taking per launch the first
  row of the key whose promises the arguments keep;
- ``triton_constants.h``: the launchers' tiling constants (one source: the Python modules);
- ``plugin_nodes.h``: the plugins' names, tensors and fields (one source: ``onnx_nodes.NODES``);
- ``manifest.json``: config, target, triton version and every key.

The variants are found by running the Python launchers (``norms``, ``moe``, ``attention``,
``mamba``) on meta tensors with ``JITFunction.run`` recorded (``compile.recording``), at shapes
that take every branch the plugins take: both activation dtypes, causal or not, split or not,
per-prefix states or not, every ``_align`` tile up to ``moe.ALIGN_MAX_PAIRS``. The C++ side
(``csrc/triton_ops.cpp``) computes the same key for each launch and refuses a launch whose variant
was not compiled into the library.

Why not ``python -m triton.tools.compile``: its C launcher is written for a stand-alone program —
it calls ``exit()`` on a driver error (inside TensorRT that kills the server), loads one module
for device 0 only (a process with two GPUs needs one per context), and returns nothing for an
empty grid. The cubins and the argument convention are Triton's (``triton.compile``; the launch
passes the non-constexpr arguments in order, then the global and profile scratch pointers, as
``backends/nvidia/driver.c`` does), the loader is ours.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ..fsutil import atomic_directory
from .compile import META, REAL_CONFIG, Launch, compile_launch, recording, require_compiler

PREFIX = "trtllm_twotower.plugins."
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def variant_key(launch: Launch) -> str:
    """``module.kernel(types)[constexprs]wN``, e.g. ``norms._relu2_kernel(*bf16,*bf16,i32)[BLOCK=1024]w4``;
    ``csrc/triton_launch.cpp`` (``TritonLaunch::key``) builds the same string."""
    types = ",".join(t for _, t in launch.signature if t != "constexpr")
    constexprs = ",".join(f"{name}={int(v) if isinstance(v, bool) else v}" for name, v in launch.constexprs)
    return f"{launch.kernel.removeprefix(PREFIX)}({types})[{constexprs}]w{launch.num_warps}"


def plugin_launches(cfg, dtypes=("bfloat16", "float32")) -> list[tuple[Launch, tuple]]:
    """Every distinct launch the plugins of ``cfg``'s engines can make, in first-seen order, each
    with the indices of its runtime arguments that can be promised divisible by 16: every pointer,
    and the integers that were multiples of 16 in every recorded call (the config's widths and
    strides; not the batch- or length-dependent ones). The launcher checks them at each launch."""
    from . import attention, mamba, moe, norms

    D, H, KV, P = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    MH, MP, G, C, W = cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.n_groups, cfg.conv_dim, cfg.conv_kernel
    E, I, k = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.num_experts_per_tok
    f32 = torch.float32

    with recording() as calls:
        for name in dtypes:
            dtype = DTYPES[name]

            def t(*shape, dtype=dtype):
                return torch.empty(shape, dtype=dtype, device=META)

            for B, L in ((1, 2), (3, 5)):  # two shapes: what depends on them is never promised divisible
                x = t(B, L, D)
                norms.rms_norm(x, t(D), 1e-5)
                for first in (True, False):
                    norms.rms_norm(x, t(D), 1e-5, t(3, D), t(B, 3 * D), first)
                norms.gated_residual(x, x, t(3, D), t(B, 3 * D))
                norms.gated_rms_norm(t(B, L, cfg.d_inner), t(B, L, cfg.d_inner), t(cfg.d_inner), G, 1e-5)
                moe.relu2(t(B * L, cfg.moe_shared_expert_intermediate_size))
                moe.moe_route(t(B * L, D), t(E, D), t(E, dtype=f32), k, cfg.norm_topk_prob, cfg.routed_scaling_factor)
                for steps in (False, True):
                    mamba.seeded_mamba_scan(t(B, L, C), t(B, L, MH), t(C, W), t(C), t(MH, dtype=f32), t(MH, dtype=f32),
                                            t(MH, dtype=f32), t(B, C, W), t(B, MH, MP, cfg.ssm_state_size, dtype=f32),
                                            G, MP, steps)
            tile = 0
            for n in range(1, moe.ALIGN_MAX_PAIRS // k + 1):  # every power-of-two tile of the one-program sort
                if n == 1 or (n * k - 1).bit_length() > tile:
                    tile = (n * k - 1).bit_length()
                    for shared in (None, t(n, D)):
                        moe.moe_experts(t(n, D), t(n, k, dtype=torch.int64), t(n, k, dtype=f32), t(E, I, D),
                                        t(E, D, I), shared)
            for causal in (True, False):
                for B, L, context in ((1, 16, 0), (3, 5, 0), (1, 16, 4096), (3, 1, 4096), (2, 16, 1000)):  # 1 split, more
                    cache = t(B, context + L, KV, P)
                    attention.block_attention(t(B, L, H, P), t(B, L, KV, P), t(B, L, KV, P), cache, cache,
                                              t(B, dtype=torch.int32), context, causal, False)
    divisible: dict[Launch, set] = {}
    for call in calls:
        runtime = [(i, value) for i, (_, value) in enumerate(call.args)]
        ok = {i for i, value in runtime if isinstance(value, torch.Tensor) or (
            isinstance(value, int) and not isinstance(value, bool) and value % 16 == 0)}
        divisible[call.launch] = divisible.get(call.launch, ok) & ok
    return [(launch, tuple(sorted(ok))) for launch, ok in divisible.items()]


def _full_indices(launch: Launch, runtime_indices) -> tuple:
    """Runtime-argument indices -> indices in the kernel's whole argument list (constexprs included)."""
    runtime = [i for i, (_, kind) in enumerate(launch.signature) if kind != "constexpr"]
    return tuple(runtime[i] for i in runtime_indices)


def constants_header() -> str:
    from . import attention, mamba, moe

    values = {"ATTENTION_BLOCK_M": attention.BLOCK_M, "ATTENTION_BLOCK_N": attention.BLOCK_N,
              "ATTENTION_SPLIT_TARGET_PROGRAMS": attention.SPLIT_TARGET_PROGRAMS,
              "ATTENTION_MIN_SPLIT_KEYS": attention.MIN_SPLIT_KEYS, "ATTENTION_MAX_SPLITS": attention.MAX_SPLITS,
              "MOE_BLOCK_M": moe.BLOCK_M, "MOE_ALIGN_MAX_PAIRS": moe.ALIGN_MAX_PAIRS, "MAMBA_BLOCK_P": mamba.BLOCK_P}
    lines = ["// Generated by trtllm_twotower.plugins.aot from the Python launchers' constants. Do not edit.",
             "#pragma once", ""]
    lines += [f"#define TWOTOWER_{name} {value}" for name, value in values.items()]
    return "\n".join(lines) + "\n"


def nodes_header() -> str:
    """``plugin_nodes.h``: the plugins' interfaces, from the ONNX nodes' table (one source for the
    exporter, ONNX Runtime and the TensorRT plugins)."""
    from ..onnx_nodes import NODES, PLUGIN_NAMESPACE, PLUGIN_VERSION

    def codes(node, tensors):
        kinds = {"int32": "I", "int64": "L"}
        return "".join(kinds.get(kind, "F" if name in node.fp32 else "T") for name, kind in tensors)

    rows = []
    for node in NODES.values():
        fields = ", ".join(f'"{name}"' for name, _ in node.attributes) or "0"
        rows.append(f'    {{"{node.op_type}", "{node.op_type.removeprefix("TwoTower")}", "{codes(node, node.inputs)}", '
                    f'"{codes(node, node.outputs)}", {len(node.optional)}, {len(node.attributes)}, {{{fields}}}}},')
    return "\n".join([
        "// Generated by trtllm_twotower.plugins.aot from trtllm_twotower/onnx_nodes.py. Do not edit.",
        "// Tensor codes: T the activation dtype (the first input's: fp32 or bf16), F fp32, I int32, L int64.",
        "#pragma once", "",
        f'#define TWOTOWER_PLUGIN_NAMESPACE "{PLUGIN_NAMESPACE}"', f'#define TWOTOWER_PLUGIN_VERSION "{PLUGIN_VERSION}"', "",
        "typedef struct {", "    const char* name;     // plugin name = ONNX op type",
        "    const char* op;       // twotower_launch's op", "    const char* inputs;   // one code per input",
        "    const char* outputs;  // one code per output",
        "    int optional_inputs;  // trailing inputs that may be left out",
        "    int num_fields;", "    const char* fields[4];  // the node's attributes, in order", "} TwoTowerNode;", "",
        "static const TwoTowerNode twotower_nodes[] = {", *rows, "};",
        f"static const int twotower_num_nodes = {len(NODES)};", ""])


def _c_bytes(data: bytes) -> str:
    return ",\n".join(",".join(str(b) for b in data[i:i + 40]) for i in range(0, len(data), 40))


def variants_source(compiled: list[tuple[str, tuple, object]], banner: str) -> str:
    """The C table of (key, divisible arguments, cubin) for ``csrc/triton_launch.cpp``."""
    parts = [f"// {banner}", "// Generated by trtllm_twotower.plugins.aot. Do not edit.",
             '#include "triton_variants.h"', ""]
    rows = []
    for i, (key, divisible, kernel) in enumerate(compiled):
        meta = kernel.metadata
        for field, expected in (("num_ctas", 1), ("global_scratch_size", 0), ("profile_scratch_size", 0),
                                ("launch_cooperative_grid", False), ("launch_pdl", False)):
            if getattr(meta, field, expected) != expected:
                raise RuntimeError(f"{key}: {field} = {getattr(meta, field)} is not supported by the plugin launcher")
        cubin = kernel.asm["cubin"]
        parts.append(f"static const unsigned char cubin_{i}[{len(cubin)}] = {{\n{_c_bytes(cubin)}}};")
        if divisible:
            parts.append(f"static const int divisible_{i}[{len(divisible)}] = {{{', '.join(map(str, divisible))}}};")
        hints = f"divisible_{i}, {len(divisible)}" if divisible else "0, 0"
        rows.append(f'    {{"{key}", {hints}, "{meta.name}", cubin_{i}, {len(cubin)}, {meta.shared}, {meta.num_warps}}},')
    parts += ["", "const TwoTowerVariant twotower_variants[] = {", *rows, "};",
              f"const int twotower_num_variants = {len(compiled)};", ""]
    return "\n".join(parts)


def write_aot(cfg, out: Path, arch: int = 90, dtypes=("bfloat16", "float32"), log=print) -> dict:
    """Compile every plugin variant of ``cfg`` for sm_``arch`` and write the C sources into ``out``
    (atomically: ``fsutil.atomic_directory``)."""
    import triton
    from triton.backends.compiler import GPUTarget

    require_compiler()
    target = GPUTarget("cuda", arch, 32)
    compiled = []
    for launch, divisible in plugin_launches(cfg, dtypes):
        key = variant_key(launch)
        # with the divisibility Triton's JIT would see on a GPU (vectorised loads), then without:
        # the launcher takes the first whose promises the launch's arguments keep
        for hints in ((divisible, ()) if divisible else ((),)):
            compiled.append((key, hints, compile_launch(launch, target, _full_indices(launch, hints))))
        log(f"sm_{arch} {key}")
    manifest = {"arch": arch, "triton": triton.__version__, "dtypes": list(dtypes), "config": cfg.to_dict(),
                "variants": [{"key": key, "divisible": list(hints)} for key, hints, _ in compiled]}
    banner = f"triton {triton.__version__}, sm_{arch}, {len(compiled)} cubins"
    with atomic_directory(out) as staging:
        (staging / "triton_variants.c").write_text(variants_source(compiled, banner))
        (staging / "triton_constants.h").write_text(constants_header())
        (staging / "plugin_nodes.h").write_text(nodes_header())
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Compile the Triton kernels of one model config ahead of time into "
                                                 "C sources for the TensorRT plugin library.")
    parser.add_argument("--config", default=str(REAL_CONFIG),
                        help="a config.json or a checkpoint directory (default: the real model's config)")
    parser.add_argument("--out", required=True, help="output directory (replaced atomically)")
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for H100/H200")
    parser.add_argument("--dtypes", default="bfloat16,float32", help="activation dtypes to compile for")
    args = parser.parse_args(argv)
    from ..config import load_config

    dtypes = tuple(d.strip() for d in args.dtypes.split(",") if d.strip())
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown or not dtypes:
        parser.error(f"--dtypes: {', '.join(unknown) or 'none given'}; choose from {', '.join(DTYPES)}")
    try:
        cfg = load_config(args.config)
        manifest = write_aot(cfg, Path(args.out), args.arch, dtypes)
    except (OSError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    kernels = len({v["key"] for v in manifest["variants"]})
    print(f"{kernels} kernel variants ({len(manifest['variants'])} cubins) compiled for sm_{args.arch} into {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
