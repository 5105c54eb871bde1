"""The Triton kernels as torch custom ops: ``torch.ops.twotower.<name>``.

Each op has three implementations, picked by torch's dispatcher:
- CUDA: the Triton kernel (``norms.py``, ``attention.py``, ``mamba.py``, ``moe.py``; triton is
  imported on the first CUDA call only);
- any other device: its torch reference (``reference.py``), so the op runs, exports and is
  compared on the CPU;
- fake (meta) tensors: output shapes and dtypes only, so ``FakeTensorMode`` (the dry run), CUDA
  graph capture and tracing see one op without running a kernel.
``launches`` gives the number of kernels one call launches (a function of shapes; the dry run
counts launches with it).
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch
from torch import Tensor
from torch.library import custom_op

from . import reference


# ---- norms ---------------------------------------------------------------------------------------
@custom_op("twotower::rms_norm", mutates_args=())
def rms_norm(x: Tensor, weight: Tensor, eps: float, table: Optional[Tensor], m: Optional[Tensor],
             modulate_first: bool) -> Tensor:
    """x [..., D] -> RMS norm; with the layer's ``table`` [3, D] and modulation ``m`` [B, 3D], the
    denoiser's modulated norm (``reference.modulated_rms_norm_ref``)."""
    if table is None:
        return reference.rms_norm_ref(x, weight, eps)
    return reference.modulated_rms_norm_ref(x, weight, eps, table, m, modulate_first)


@custom_op("twotower::gated_residual", mutates_args=())
def gated_residual(x: Tensor, h: Tensor, table: Tensor, m: Tensor) -> Tensor:
    """x + gate * h, the gate row of bf16(table + m) (``reference.gated_residual_ref``)."""
    return reference.gated_residual_ref(x, h, table, m)


@custom_op("twotower::gated_rms_norm", mutates_args=())
def gated_rms_norm(y: Tensor, z: Tensor, weight: Tensor, n_groups: int, eps: float) -> Tensor:
    """y * silu(z), RMS-normalised per group of channels (``reference.gated_rms_norm_ref``)."""
    return reference.gated_rms_norm_ref(y, z, weight, n_groups, eps)


@gated_rms_norm.register_fake
def _(y, z, weight, n_groups, eps):
    return torch.empty(y.shape, dtype=y.dtype, device=y.device)


@custom_op("twotower::relu2", mutates_args=())
def relu2(x: Tensor) -> Tensor:
    """relu(x)^2, one rounding (``reference.relu2_ref``)."""
    return reference.relu2_ref(x)


# ---- MoE -----------------------------------------------------------------------------------------
@custom_op("twotower::moe_route", mutates_args=())
def moe_route(x: Tensor, router: Tensor, correction_bias: Tensor, top_k: int, normalize: bool,
              scale: float) -> tuple[Tensor, Tensor]:
    """fp64 sigmoid router -> expert ids [n, k] int64, weights [n, k] fp32 (``reference.moe_route_ref``)."""
    return reference.moe_route_ref(x, router, correction_bias, top_k, normalize, scale)


@moe_route.register_fake
def _(x, router, correction_bias, top_k, normalize, scale):
    n = x.numel() // x.shape[-1]
    return (x.new_empty((n, top_k), dtype=torch.int64), x.new_empty((n, top_k), dtype=torch.float32))


@custom_op("twotower::moe_experts", mutates_args=())
def moe_experts(x: Tensor, ids: Tensor, weights: Tensor, up: Tensor, down: Tensor, shared: Optional[Tensor]) -> Tensor:
    """Routed relu^2 experts (``reference.moe_experts_ref``), plus the shared expert's output."""
    routed = reference.moe_experts_ref(x, ids, weights, up, down)
    return routed if shared is None else routed + shared


# ---- attention, Mamba ----------------------------------------------------------------------------
@custom_op("twotower::block_attention", mutates_args=("k_cache", "v_cache"))
def block_attention(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, cache_lens: Tensor,
                    max_len: int, causal: bool, write_cache: bool) -> Tensor:
    """An L-token chunk over cache[0:len] ‖ its own K/V (``reference.block_attention_ref``);
    ``max_len`` ≥ every length, known on the host."""
    out = reference.block_attention_ref(q, k, v, k_cache, v_cache, cache_lens, causal, write_cache)
    return out.contiguous()  # the layout the kernel (and the fake) produce


@block_attention.register_fake
def _(q, k, v, k_cache, v_cache, cache_lens, max_len, causal, write_cache):
    return torch.empty_like(q)


@custom_op("twotower::seeded_mamba_scan", mutates_args=())
def seeded_mamba_scan(xbc: Tensor, dt: Tensor, conv_weight: Tensor, conv_bias: Tensor, dt_bias: Tensor, A_log: Tensor,
                      D: Tensor, conv_state: Tensor, ssm_state: Tensor, n_groups: int, head_dim: int,
                      return_steps: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Seeded conv + selective scan (``reference.seeded_mamba_scan_ref``) -> y, new conv state, new
    fp32 SSM state, and the conv and SSM states after each prefix of the chunk ([B, L + 1, ...],
    empty tensors unless ``return_steps``)."""
    out = reference.seeded_mamba_scan_ref(xbc, dt, conv_weight, conv_bias, dt_bias, A_log, D, conv_state, ssm_state,
                                          n_groups, head_dim, return_steps=return_steps)
    if not return_steps:
        out = (*out, conv_state.new_empty(0), ssm_state.new_empty(0))
    else:
        y, new_conv, new_ssm, ssm_steps = out
        out = (y, new_conv, new_ssm, reference.conv_state_steps(conv_state, xbc), ssm_steps)
    return tuple(t.contiguous() for t in out)  # the layout the kernel (and the fake) produce


@seeded_mamba_scan.register_fake
def _(xbc, dt, conv_weight, conv_bias, dt_bias, A_log, D, conv_state, ssm_state, n_groups, head_dim, return_steps):
    B, L, _ = xbc.shape
    H = dt.shape[2]
    conv_steps = conv_state.new_empty((B, L + 1, *conv_state.shape[1:]) if return_steps else 0)
    ssm_steps = ssm_state.new_empty((B, L + 1, *ssm_state.shape[1:]) if return_steps else 0)
    return (xbc.new_empty((B, L, H * head_dim)), torch.empty_like(conv_state), torch.empty_like(ssm_state),
            conv_steps, ssm_steps)


# ---- the CUDA kernels, and the fakes shaped like their first argument --------------------------------
def _triton(module: str, function: str):
    """``plugins.<module>.<function>`` (importing triton on the first CUDA call only)."""
    def run(*args, **kwargs):
        return getattr(importlib.import_module(f"{__package__}.{module}"), function)(*args, **kwargs)
    return run


def _like_first(x, *_):
    return torch.empty_like(x)


def _register() -> None:
    for op, module in ((rms_norm, "norms"), (gated_residual, "norms"), (gated_rms_norm, "norms"), (relu2, "moe"),
                       (moe_route, "moe"), (moe_experts, "moe"), (block_attention, "attention"),
                       (seeded_mamba_scan, "mamba")):
        op.register_kernel("cuda")(_triton(module, op._name))  # each launcher is named as its op
    for op in (rms_norm, gated_residual, relu2, moe_experts):
        op.register_fake(_like_first)


_register()


# ---- launch counts -------------------------------------------------------------------------------
def launches(name: str, args: tuple) -> int:
    """Kernels launched by one call of ``torch.ops.twotower.<name>`` with these arguments."""
    if name == "block_attention":
        from .attention import launches as attention_launches

        q, k = args[0], args[1]
        B, L, H, _ = q.shape
        return attention_launches(B, L, H, k.shape[2], args[6])
    if name == "moe_experts":
        from .moe import moe_experts_launches

        x, ids = args[0], args[1]
        return moe_experts_launches(x.numel() // x.shape[-1], ids.shape[1])
    return 1
