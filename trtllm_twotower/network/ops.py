"""The op interface the towers are written against, and its eager torch backend.

The layer functions (``layers.py``) call only these ops, so a backend is a one-to-one table: this
module for torch (CPU and CUDA; the reference and the runtime's torch path), ``trt.py`` for
TensorRT-LLM. ``OP_NAMES`` is the interface; a CI test checks that the TensorRT table covers it.

Rounding (spec §3): tensors live in the compute dtype. In bfloat16 each op computes in fp32 and
rounds its result once (PyTorch's own semantics for bf16 element-wise ops and matmuls). In float32
nothing is rounded, so a float32 run compares token for token with a float32 run of the official code.
The SSM scan and state are always fp32; the MoE router is always fp64.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from ..devices import upload
from ..plugins import reference

# The torch scan switches from the per-token recurrence to the chunked SSD form at this many new
# tokens (prefills); blocks (16) and decode steps (1) stay sequential. Both are fp32.
SCAN_CHUNK = 64

OP_NAMES = (
    "embedding", "linear", "rms_norm", "modulated_rms_norm", "gated_residual", "gated_rms_norm", "split",
    "split_heads", "merge_heads", "add", "silu", "relu2", "timestep_embedding", "block_attention",
    "mamba_scan", "moe_route", "moe_experts", "logits",
)


def use_kernels(device: torch.device) -> bool:
    """The Triton kernels serve CUDA tensors unless ``TWOTOWER_KERNELS=off`` (decided once per backend)."""
    return device.type == "cuda" and os.environ.get("TWOTOWER_KERNELS", "auto") != "off"


class TorchOps:
    """Eager torch backend. ``dtype`` is the compute dtype (torch.bfloat16 or torch.float32).

    On CUDA the norms, the modulation, attention, the Mamba block and the MoE router and experts are
    the Triton kernels, called as ``torch.ops.twotower.*`` (``plugins/custom_ops.py``: one op each,
    with a fake implementation, so fake-tensor dry runs and CUDA graphs see the same calls);
    ``TWOTOWER_KERNELS=off`` forces the torch forms. Everywhere else (the CPU path, training)
    the ops are the torch references beside the kernels, exact to the spec's rounding.
    ``trace``: a set that receives the name of every op executed (used by the op-table test).
    ``kernels``: force the Triton kernels on or off (default: ``use_kernels``).
    """

    def __init__(self, dtype: torch.dtype, device: torch.device | str = "cpu", trace: set | None = None,
                 kernels: bool | None = None):
        self.dtype = dtype
        self.device = torch.device(device)
        self.trace = trace
        # grouped GEMMs: CPU in any dtype; CUDA kernels take bf16 only
        self.grouped_experts = hasattr(torch, "_grouped_mm") and (self.device.type == "cpu" or dtype == torch.bfloat16)
        self.kernels = use_kernels(self.device) if kernels is None else kernels
        if self.kernels:
            from ..plugins import custom_ops  # noqa: F401  (registers torch.ops.twotower)
        self._lengths = (None, None)  # (host lengths, their device copy): one upload per step, not per layer

    def _op(self, name: str) -> None:
        if self.trace is not None:
            self.trace.add(name)

    # ---- dense ops ----------------------------------------------------------------------------
    def embedding(self, table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """table [V, H], ids [B, L] -> [B, L, H]"""
        self._op("embedding")
        return F.embedding(ids, table)

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., in] @ weight[out, in]^T (+ bias): fp32 accumulate, one rounding."""
        self._op("linear")
        return F.linear(x, weight, bias)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """bf16(w_fp32 * x_fp32 * rsqrt(mean(x_fp32^2) + eps)) over the last dim (spec §3)."""
        self._op("rms_norm")
        if self.kernels:
            return torch.ops.twotower.rms_norm(x, weight, eps, None, None, False)
        return reference.rms_norm_ref(x, weight, eps)

    def modulated_rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float, table: torch.Tensor,
                           m: torch.Tensor, modulate_first: bool) -> torch.Tensor:
        """The denoiser's pre-norm (spec §5.1): shift and scale are rows of bf16(table + m);
        modulate then norm (``modulate_first``: Mamba, attention) or norm then modulate (MoE, MLP).
        x [B, L, D]; table [3, D]; m [B, 3D]."""
        self._op("modulated_rms_norm")
        if self.kernels:
            return torch.ops.twotower.rms_norm(x, weight, eps, table, m, modulate_first)
        return reference.modulated_rms_norm_ref(x, weight, eps, table, m, modulate_first)

    def gated_residual(self, x: torch.Tensor, h: torch.Tensor, table: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """The denoiser's residual bf16(x + bf16(gate * h)), gate = row 2 of bf16(table + m)."""
        self._op("gated_residual")
        if self.kernels:
            return torch.ops.twotower.gated_residual(x, h, table, m)
        return reference.gated_residual_ref(x, h, table, m)

    def gated_rms_norm(self, y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, n_groups: int, eps: float):
        """Gate THEN norm (norm_before_gate=False): v = y * silu(z) in fp32, RMS-normalised per
        group of channels, weight multiplied in fp32, one rounding. y, z [B, L, D] -> [B, L, D]."""
        self._op("gated_rms_norm")
        if self.kernels:
            return torch.ops.twotower.gated_rms_norm(y, z, weight, n_groups, eps)
        return reference.gated_rms_norm_ref(y, z, weight, n_groups, eps)

    def split(self, x: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
        """Split the last dim into pieces of the given widths."""
        self._op("split")
        return list(torch.split(x, sizes, dim=-1))

    def split_heads(self, x: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
        """[B, L, heads*head_dim] -> [B, L, heads, head_dim]"""
        self._op("split_heads")
        return x.reshape(*x.shape[:-1], heads, head_dim)

    def merge_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, heads, head_dim] -> [B, L, heads*head_dim]"""
        self._op("merge_heads")
        return x.reshape(*x.shape[:-2], -1)

    def add(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        self._op("add")
        return a + b

    def silu(self, x: torch.Tensor) -> torch.Tensor:
        self._op("silu")
        return F.silu(x)

    def relu2(self, x: torch.Tensor) -> torch.Tensor:
        """relu(x)^2 with one rounding (relu of a bf16 value is exact)."""
        self._op("relu2")
        if self.kernels:
            return torch.ops.twotower.relu2(x)
        return reference.relu2_ref(x)

    def timestep_embedding(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """Sinusoidal embedding of t (masked fraction, [B]) -> [B, dim], cos first (spec §5.1).
        t and t*1000 are rounded to the compute dtype first, as the official code casts them."""
        self._op("timestep_embedding")
        half = dim // 2
        steps = t.to(self.dtype) * 1000  # bf16(bf16(t) * 1000): 188 for t = 3/16, not 187.5
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = steps.float()[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(self.dtype)

    def logits(self, x: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
        """fp32(x @ head^T): the head's matmul is rounded to the compute dtype, then widened."""
        self._op("logits")
        return F.linear(x, head).float()

    # ---- custom kernels -----------------------------------------------------------------------
    def block_attention(self, q, k, v, k_cache, v_cache, cache_lens, causal: bool, write_cache: bool):
        """See ``plugins.reference.block_attention_ref``. ``cache_lens`` on the host (eager steps:
        the kernel's grid is sized by their maximum, uploaded once per step) or on the device (CUDA
        graphs: never read back; the grid covers the whole capacity)."""
        self._op("block_attention")
        if not self.kernels:
            return reference.block_attention_ref(q, k, v, k_cache, v_cache, cache_lens, causal, write_cache)
        if cache_lens.device.type == "cpu":
            max_len = int(cache_lens.max()) if cache_lens.numel() else 0
            if self._lengths[0] is not cache_lens:  # the same lengths tensor serves every layer of a step
                self._lengths = (cache_lens, upload(cache_lens, q.device))
            cache_lens = self._lengths[1]
        else:
            max_len = k_cache.shape[1] - q.shape[1]
        return torch.ops.twotower.block_attention(q, k, v, k_cache, v_cache, cache_lens, max_len, causal, write_cache)

    def mamba_scan(self, xbc, dt, conv_weight, conv_bias, dt_bias, A_log, D, conv_state, ssm_state,
                   n_groups: int, head_dim: int, per_position: bool = False):
        """See ``plugins.reference.seeded_mamba_scan_ref``: (y, new conv state, new fp32 ssm state);
        with ``per_position`` also the conv states [B, L + 1, C, W] and fp32 SSM states
        [B, L + 1, H, P, N] after each prefix of the chunk, 0 = the seed (speculative rollback)."""
        self._op("mamba_scan")
        args = (xbc, dt, conv_weight, conv_bias, dt_bias, A_log, D, conv_state, ssm_state, n_groups, head_dim)
        if self.kernels:
            y, new_conv, new_ssm, conv_steps, ssm_steps = torch.ops.twotower.seeded_mamba_scan(*args, per_position)
            return (y, new_conv, new_ssm, conv_steps, ssm_steps) if per_position else (y, new_conv, new_ssm)
        if not per_position:
            return _torch_mamba_scan(*args)
        y, new_conv, new_ssm, ssm_steps = reference.seeded_mamba_scan_ref(*args, return_steps=True)
        return y, new_conv, new_ssm, reference.conv_state_steps(conv_state, xbc), ssm_steps

    def moe_route(self, x: torch.Tensor, router: torch.Tensor, correction_bias: torch.Tensor, top_k: int,
                  normalize: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Sigmoid router in fp64 (spec §3, R6 moe_router_dtype=fp64); see ``reference.moe_route_ref``.
        x [B, L, H] -> expert ids [B*L, k] (int64), weights [B*L, k] fp32."""
        self._op("moe_route")
        if self.kernels:
            return torch.ops.twotower.moe_route(x, router, correction_bias, top_k, normalize, scale)
        return reference.moe_route_ref(x, router, correction_bias, top_k, normalize, scale)

    def moe_experts(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, up: torch.Tensor,
                    down: torch.Tensor, shared: torch.Tensor | None = None) -> torch.Tensor:
        """Routed relu^2 experts, plus the shared expert's output ``shared`` when given (one bf16 add).
        x [B, L, H]; idx, weights [n, k]; up [E, I, H]; down [E, H, I]; shared [B, L, H]."""
        self._op("moe_experts")
        if self.kernels:
            return torch.ops.twotower.moe_experts(x, idx, weights, up, down, shared)
        routed = self._routed_experts(x, idx, weights, up, down)
        return routed if shared is None else routed + shared

    def _routed_experts(self, x, idx, weights, up, down) -> torch.Tensor:
        """Grouped GEMMs over the (token, slot) pairs sorted by expert, no host synchronisation; each
        token's k outputs are then summed in fp32 in ascending expert order and rounded once, as
        ``reference.moe_experts_ref`` (the spec's loop, and the fallback without ``torch._grouped_mm``).
        Training (autograd recording through the experts) also takes the loop: grouped GEMMs have no
        reliable backward on the CPU."""
        if not self.grouped_experts or (torch.is_grad_enabled() and (x.requires_grad or up.requires_grad)):
            return reference.moe_experts_ref(x, idx, weights, up, down)
        tokens = x.reshape(-1, x.shape[-1])  # [n, H]
        n, k = idx.shape
        idx, slot_order = idx.sort(dim=-1)  # each token's experts ascending
        weights = weights.gather(-1, slot_order)
        flat = idx.reshape(-1)  # [n*k]
        order = torch.argsort(flat, stable=True)  # pairs grouped by expert
        # [E] group ends, by binary search in the sorted ids (torch.bincount would read the ids'
        # min and max back to the host on CUDA: two synchronisations per MoE layer)
        experts = torch.arange(up.shape[0], device=flat.device, dtype=flat.dtype)
        offsets = torch.searchsorted(flat[order], experts, right=True, out_int32=True)
        rows = tokens[order // k]  # [n*k, H]
        a = torch.relu(torch._grouped_mm(rows, up.transpose(-2, -1), offs=offsets)).square()  # [n*k, I]
        y = torch._grouped_mm(a, down.transpose(-2, -1), offs=offsets)  # [n*k, H], rounded like F.linear
        contrib = torch.empty((n * k, x.shape[-1]), dtype=torch.float32, device=x.device)
        contrib[order] = y.float() * weights.reshape(-1)[order, None]
        contrib = contrib.view(n, k, -1)
        acc = contrib[:, 0]
        for j in range(1, k):  # ascending expert order, one fp32 add at a time
            acc = acc + contrib[:, j]
        return acc.to(x.dtype).reshape(x.shape)


def _torch_mamba_scan(xbc, dt, conv_weight, conv_bias, dt_bias, A_log, D, conv_state, ssm_state, n_groups, head_dim):
    if xbc.shape[1] >= SCAN_CHUNK:
        return reference.seeded_mamba_scan_chunked(xbc, dt, conv_weight, conv_bias, dt_bias, A_log, D, conv_state,
                                                   ssm_state, n_groups, head_dim, chunk_size=SCAN_CHUNK)
    return reference.seeded_mamba_scan_ref(xbc, dt, conv_weight, conv_bias, dt_bias, A_log, D, conv_state,
                                           ssm_state, n_groups, head_dim)
