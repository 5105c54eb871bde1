"""Compile every Triton kernel for a GPU target without a GPU (``triton.compile`` + ``GPUTarget``).

The launchers (``norms.py``, ``attention.py``, ``mamba.py``, ``moe.py``) are called on meta tensors
of the real model's shapes with ``JITFunction.run`` replaced by a recorder, so each launch yields
exactly the kernel, argument types and constexprs a GPU run would compile; each distinct one is
then compiled ahead of time for the target (sm_90 by default) to a cubin. Run without
``TRITON_INTERPRET`` (the interpreter replaces the kernels): ``python -m trtllm_twotower.plugins.compile``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64",
          torch.int64: "i64", torch.int32: "i32", torch.bool: "i1"}
META = torch.device("meta")
REAL_CONFIG = Path(__file__).resolve().parents[2] / "bench" / "real_config.json"


@dataclass(frozen=True)
class Launch:
    """One kernel launch as a GPU run would compile it."""

    kernel: str  # module.function
    signature: tuple  # (name, type) per runtime argument, "constexpr" for compile-time ones
    constexprs: tuple  # (name, value)
    num_warps: int


@dataclass(frozen=True)
class Call:
    """One recorded launch with its grid and runtime argument values (tensors as they were passed)."""

    launch: Launch
    grid: tuple  # (x, y, z)
    args: tuple  # (name, value) per runtime argument, in the kernel's order


def _arg_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"cannot type a kernel argument of {type(value).__name__}")


def _constexpr_names(fn) -> set[str]:
    """The parameters of a @triton.jit function annotated ``tl.constexpr`` (as strings too)."""
    import inspect

    return {name for name, p in inspect.signature(fn).parameters.items() if "constexpr" in str(p.annotation)}


@contextmanager
def recording():
    """Within: kernel launches are recorded (nothing runs) into the yielded list of ``Call``. Works
    on compiled kernels and under ``TRITON_INTERPRET=1`` (where ``@triton.jit`` makes
    ``InterpretedFunction``s) alike."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    calls: list[Call] = []
    originals = {cls: cls.run for cls in (JITFunction, InterpretedFunction)}

    def record(self, *args, grid, warmup=False, **kwargs):
        num_warps = kwargs.pop("num_warps", 4)
        bound = dict(zip(self.arg_names, args), **kwargs)
        constexpr_names = _constexpr_names(self.fn)
        signature = tuple((name, "constexpr" if name in constexpr_names else _arg_type(bound[name]))
                          for name in self.arg_names)
        constexprs = tuple((name, _constexpr_value(bound[name])) for name in self.arg_names if name in constexpr_names)
        launch = Launch(f"{self.fn.__module__}.{self.fn.__name__}", signature, constexprs, num_warps)
        grid = tuple(grid) + (1,) * (3 - len(grid))
        calls.append(Call(launch, grid, tuple((name, bound[name]) for name in self.arg_names
                                              if name not in constexpr_names)))

    for cls in originals:
        cls.run = record
    try:
        yield calls
    finally:
        for cls, run in originals.items():
            cls.run = run


def _constexpr_value(value):
    return str(value) if not isinstance(value, (int, float, bool, str)) else value


def real_model_launches(cfg, batches=(1, 64), lengths=(1, 16), context: int = 8192) -> list[Launch]:
    """Every distinct launch the towers of ``cfg`` make at these batch sizes and chunk lengths (bf16)."""
    from . import attention, mamba, moe, norms

    bf16, D = torch.bfloat16, cfg.hidden_size
    H, KV, P = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    MH, MP, G, C, W = cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.n_groups, cfg.conv_dim, cfg.conv_kernel
    E, I, k = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.num_experts_per_tok

    def t(*shape, dtype=bf16):
        return torch.empty(shape, dtype=dtype, device=META)

    with recording() as calls:
        for B in batches:
            for L in lengths:
                x = t(B, L, D)
                norms.rms_norm(x, t(D), 1e-5)
                for first in (True, False):
                    norms.rms_norm(x, t(D), 1e-5, t(3, D), t(B, 3 * D), first)
                norms.gated_residual(x, x, t(3, D), t(B, 3 * D))
                proj = t(B, L, cfg.in_proj_dim)
                z, xbc, dt = torch.split(proj, [cfg.d_inner, C, MH], dim=-1)
                norms.gated_rms_norm(t(B, L, cfg.d_inner), z, t(cfg.d_inner), G, 1e-5)
                for steps in (False, True):
                    mamba.seeded_mamba_scan(xbc, dt, t(C, W), t(C), t(MH, dtype=torch.float32),
                                            t(MH, dtype=torch.float32), t(MH, dtype=torch.float32), t(B, C, W),
                                            t(B, MH, MP, cfg.ssm_state_size, dtype=torch.float32), G, MP, steps)
                cache = t(B, context + 2 * L, KV, P)
                for causal in (True, False):
                    for max_len in (0, context):
                        attention.block_attention(t(B, L, H, P), t(B, L, KV, P), t(B, L, KV, P), cache, cache,
                                                  t(B, dtype=torch.int64), max_len, causal, causal)
                tokens = t(B * L, D)
                moe.moe_route(tokens, t(E, D), t(E, dtype=torch.float32), k, True, cfg.routed_scaling_factor)
                moe.moe_experts(tokens, t(B * L, k, dtype=torch.int64), t(B * L, k, dtype=torch.float32), t(E, I, D),
                                t(E, D, I), tokens)
                moe.relu2(t(B * L, cfg.moe_shared_expert_intermediate_size))
    return list(dict.fromkeys(call.launch for call in calls))  # distinct, in first-seen order


def require_compiler() -> None:
    """Refuse to compile under ``TRITON_INTERPRET``: the interpreter replaces the kernels."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("TRITON_INTERPRET is set: the interpreter replaces the kernels; unset it to compile")


def compile_launch(launch: Launch, target, divisible: tuple = ()):
    """A CompiledKernel (cubin and all) for ``target``; ``divisible``: the indices of the arguments
    (pointers: their address) promised to be multiples of 16, as Triton's JIT specialises them."""
    import importlib

    import triton
    from triton.compiler import ASTSource

    module, name = launch.kernel.rsplit(".", 1)
    fn = getattr(importlib.import_module(module), name)
    source = ASTSource(fn=fn, signature=dict(launch.signature), constexprs=dict(launch.constexprs),
                       attrs={(i,): [["tt.divisibility", 16]] for i in divisible})
    return triton.compile(source, target=target, options={"num_warps": launch.num_warps})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Compile every Triton kernel at the real model's shapes for a GPU "
                                                 "target, without a GPU.")
    parser.add_argument("--config", default=str(REAL_CONFIG))
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for H100/H200")
    parser.add_argument("--json", help="write a report (kernel, constexprs, cubin and shared-memory bytes)")
    args = parser.parse_args(argv)
    try:
        require_compiler()
    except RuntimeError as err:
        parser.error(str(err))
    from triton.backends.compiler import GPUTarget

    from ..config import load_config

    cfg = load_config(args.config)
    target = GPUTarget("cuda", args.arch, 32)
    report = []
    for launch in real_model_launches(cfg):
        start = time.perf_counter()
        compiled = compile_launch(launch, target)
        meta = compiled.metadata
        report.append({"kernel": launch.kernel, "constexprs": dict(launch.constexprs),
                       "cubin_bytes": len(compiled.asm["cubin"]), "shared_bytes": getattr(meta, "shared", None),
                       "seconds": round(time.perf_counter() - start, 2)})
        print(f"sm_{args.arch} {launch.kernel.rsplit('.', 2)[-2] + '.' + launch.kernel.rsplit('.', 1)[-1]:36s} {len(compiled.asm['cubin']):8d} bytes  "
              f"{dict(launch.constexprs)}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    print(f"{len(report)} kernels compiled for sm_{args.arch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
