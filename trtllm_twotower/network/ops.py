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

import logging
import math
import os

import torch
import torch.nn.functional as F

from ..plugins import reference

log = logging.getLogger(__name__)

# The torch scan switches from the per-token recurrence to the chunked SSD form at this many new
# tokens (prefills); blocks (16) and decode steps (1) stay sequential. Both are fp32.
SCAN_CHUNK = 64

OP_NAMES = (
    "embedding", "linear", "rms_norm", "gated_rms_norm", "split", "split_heads", "merge_heads",
    "add", "mul", "silu", "relu2", "modulate", "timestep_embedding", "block_attention",
    "mamba_scan", "moe_route", "moe_experts", "logits",
)


class TorchOps:
    """Eager torch backend. ``dtype`` is the compute dtype (torch.bfloat16 or torch.float32).

    On CUDA tensors the two custom ops use the compiled kernel library when it is built (chosen
    once, here; ``TWOTOWER_KERNELS=off`` forces the torch forms); everywhere else they use the torch
    references beside the kernels.
    ``trace``: a set that receives the name of every op executed (used by the op-table test).
    """

    def __init__(self, dtype: torch.dtype, device: torch.device | str = "cpu", trace: set | None = None):
        self.dtype = dtype
        self.device = torch.device(device)
        self.trace = trace
        # grouped GEMMs: CPU in any dtype; CUDA kernels take bf16 only
        self.grouped_experts = hasattr(torch, "_grouped_mm") and (self.device.type == "cpu" or dtype == torch.bfloat16)
        self._block_attention = reference.block_attention_ref
        self._mamba_scan = _torch_mamba_scan
        if self.device.type == "cuda" and os.environ.get("TWOTOWER_KERNELS", "auto") != "off":
            from ..plugins import kernels

            if kernels.available():
                self._block_attention = kernels.block_attention
                self._mamba_scan = kernels.seeded_mamba_scan
            else:
                log.warning("twotower kernel library not built: using the torch reference ops on %s", self.device)

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
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return (weight.float() * y).to(x.dtype)

    def gated_rms_norm(self, y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, n_groups: int, eps: float):
        """Gate THEN norm (norm_before_gate=False): v = y * silu(z) in fp32, RMS-normalised per
        group of channels, weight multiplied in fp32, one rounding. y, z [B, L, D] -> [B, L, D]."""
        self._op("gated_rms_norm")
        v = y.float() * F.silu(z.float())
        shape = v.shape
        g = v.reshape(*shape[:-1], n_groups, shape[-1] // n_groups)
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + eps)
        return (g.reshape(shape) * weight.float()).to(y.dtype)

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

    def mul(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        self._op("mul")
        return a * b

    def silu(self, x: torch.Tensor) -> torch.Tensor:
        self._op("silu")
        return F.silu(x)

    def relu2(self, x: torch.Tensor) -> torch.Tensor:
        """relu(x)^2 with one rounding (relu of a bf16 value is exact)."""
        self._op("relu2")
        return torch.relu(x).square()

    def modulate(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """bf16(bf16(x * bf16(1 + scale)) + shift), each step rounded (spec §5.1).
        x [B, L, H]; shift, scale [B, 1, H]."""
        self._op("modulate")
        return x * (1 + scale) + shift

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
        """See ``plugins.reference.block_attention_ref``."""
        self._op("block_attention")
        return self._block_attention(q, k, v, k_cache, v_cache, cache_lens, causal, write_cache)

    def mamba_scan(self, xbc, dt, conv_weight, conv_bias, dt_bias, A_log, D, conv_state, ssm_state,
                   n_groups: int, head_dim: int, per_position: bool = False):
        """See ``plugins.reference.seeded_mamba_scan_ref``: (y, new conv state, new fp32 ssm state);
        with ``per_position`` also the conv state [B, L, C, W] and fp32 SSM state [B, L, H, P, N]
        after each token (speculative mode rolls back to them)."""
        self._op("mamba_scan")
        if not per_position:
            return self._mamba_scan(xbc, dt, conv_weight, conv_bias, dt_bias, A_log, D, conv_state, ssm_state,
                                    n_groups, head_dim)
        scan = self._mamba_scan if self._mamba_scan is not _torch_mamba_scan else reference.seeded_mamba_scan_ref
        y, new_conv, new_ssm, ssm_steps = scan(xbc, dt, conv_weight, conv_bias, dt_bias, A_log, D, conv_state,
                                               ssm_state, n_groups, head_dim, return_steps=True)
        return y, new_conv, new_ssm, reference.conv_state_steps(conv_state, xbc), ssm_steps

    # ---- MoE ----------------------------------------------------------------------------------
    def moe_route(self, x: torch.Tensor, router: torch.Tensor, correction_bias: torch.Tensor, top_k: int,
                  normalize: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Sigmoid router in fp64 (spec §3, R6 moe_router_dtype=fp64). The correction bias only
        selects; weights are the plain sigmoid scores, renormalised, times ``scale``.
        x [B, L, H] -> expert ids [B*L, k] (int64), weights [B*L, k] fp32. Among equal selection
        scores torch.topk keeps the lower expert id first (deterministic on one device)."""
        self._op("moe_route")
        scores = torch.sigmoid(x.reshape(-1, x.shape[-1]).double() @ router.double().t())  # [n, E]
        idx = torch.topk(scores + correction_bias.double(), top_k, dim=-1).indices
        w = scores.gather(1, idx)
        if normalize:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return idx, (w * scale).float()

    def moe_experts(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor,
                    up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        """Routed relu^2 experts. x [B, L, H]; idx, weights [n, k]; up [E, I, H]; down [E, H, I].

        Grouped GEMMs over the (token, slot) pairs sorted by expert, no host synchronisation; each
        token's k outputs are then summed in fp32 in ascending expert order and rounded once, as
        ``reference.moe_experts_ref`` (the spec's loop, and the fallback without ``torch._grouped_mm``). Training
        (autograd recording through the experts) also takes the loop: grouped GEMMs have no reliable
        backward on the CPU."""
        self._op("moe_experts")
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
