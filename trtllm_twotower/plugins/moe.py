"""Triton kernels of the MoE layer: the router in one launch, the routed relu^2 experts in four,
and relu^2 itself (the shared expert's and the dense MLP's activation) in one.

``moe_route`` (reference ``reference.moe_route_ref``): per token, the fp64 router GEMV, sigmoid,
correction bias, top-k, renormalisation and scale (torch: ~12 kernels).

``moe_experts`` (reference ``reference.moe_experts_ref`` + the shared expert's add), as vLLM's
fused MoE lays the work out:
1. ``_align``: the (token, slot) pairs sorted by expert (stable: ascending token within an expert),
   each expert's group padded to a multiple of BLOCK_M, and the expert of every BLOCK_M block;
   one program (pairs ≤ ``ALIGN_MAX_PAIRS``; longer prefills sort with torch ops);
2. ``_up``: per block, x[tokens] @ up[e]^T, rounded, relu^2, rounded (the reference's F.linear,
   relu, square);
3. ``_down``: per block, act @ down[e]^T rounded, times the routing weight in fp32, into an fp32
   buffer indexed by pair;
4. ``_combine``: per token, its k contributions summed in fp32 in ascending expert order (the
   reference's loop order), rounded once, plus the shared expert's output (rounded again, as the
   reference's add).
Empty experts cost nothing but a program that returns. Matmul operands are widened to fp32 first
(bf16 values are exact in tf32, so a bf16 model keeps exact products with fp32 accumulation; a
float32 model asks for IEEE fp32 dots).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rounding import round_to, to_storage

ALIGN_MAX_PAIRS = 8192
BLOCK_M = 16  # rows of one expert block: decode and denoiser steps route few tokens to each expert


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


# ---- relu^2 (dense MLP, shared expert) -------------------------------------------------------------
@triton.jit
def _relu2_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.maximum(tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32), 0.0)
    tl.store(out_ptr + offsets, to_storage(x * x, out_ptr.dtype.element_ty), mask=mask)


def relu2(x: torch.Tensor) -> torch.Tensor:
    """relu(x)^2, one rounding (``reference.relu2_ref``; torch launches two kernels)."""
    x = x.contiguous()
    out = torch.empty_like(x)
    if x.numel():
        _relu2_kernel[(triton.cdiv(x.numel(), 1024),)](x, out, x.numel(), BLOCK=1024)
    return out


# ---- router ------------------------------------------------------------------------------------
@triton.jit
def _route_kernel(x_ptr, router_ptr, bias_ptr, ids_ptr, weights_ptr, D, E, scale,
                  TOP_K: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    token = tl.program_id(0)
    experts = tl.arange(0, BLOCK_E)
    e_ok = experts < E
    # 1. logits = x @ router^T in fp64
    logits = tl.zeros([BLOCK_E], dtype=tl.float64)
    for start in range(0, D, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        c_ok = cols < D
        x = tl.load(x_ptr + token * D + cols, mask=c_ok, other=0.0).to(tl.float64)
        r = tl.load(router_ptr + experts[:, None] * D + cols[None, :], mask=e_ok[:, None] & c_ok[None, :],
                    other=0.0).to(tl.float64)
        logits += tl.sum(r * x[None, :], axis=1)
    scores = 1.0 / (1.0 + tl.exp(-logits))  # sigmoid, fp64
    # 2. top k of scores + bias, the lower id first among equals
    select = scores + tl.load(bias_ptr + experts, mask=e_ok, other=0.0).to(tl.float64)
    select = tl.where(e_ok, select, float("-inf"))
    slots = tl.arange(0, BLOCK_K)  # TOP_K rounded up to a power of two
    chosen = tl.zeros([BLOCK_K], dtype=tl.int64)
    weights = tl.zeros([BLOCK_K], dtype=tl.float64)
    for j in tl.static_range(TOP_K):
        best = tl.argmax(select, axis=0, tie_break_left=True)
        chosen = tl.where(slots == j, best, chosen)
        weights = tl.where(slots == j, tl.sum(tl.where(experts == best, scores, 0.0), axis=0), weights)
        select = tl.where(experts == best, float("-inf"), select)
    # 3. renormalise, scale
    if NORMALIZE:
        weights = weights / (tl.sum(weights, axis=0) + 1e-20)
    tl.store(ids_ptr + token * TOP_K + slots, chosen, mask=slots < TOP_K)
    tl.store(weights_ptr + token * TOP_K + slots, (weights * scale).to(tl.float32), mask=slots < TOP_K)


def moe_route(x: torch.Tensor, router: torch.Tensor, correction_bias: torch.Tensor, top_k: int, normalize: bool,
              scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D]; router [E, D]; correction_bias [E] -> ids [n, k] int64, weights [n, k] fp32."""
    tokens = x.reshape(-1, x.shape[-1]).contiguous()
    n, D = tokens.shape
    E = router.shape[0]
    ids = torch.empty((n, top_k), dtype=torch.int64, device=x.device)
    weights = torch.empty((n, top_k), dtype=torch.float32, device=x.device)
    if n:
        block_e = triton.next_power_of_2(E)
        _route_kernel[(n,)](tokens, router.contiguous(), correction_bias.contiguous(), ids, weights, D, E, scale,
                            TOP_K=top_k, NORMALIZE=normalize, BLOCK_E=block_e,
                            BLOCK_D=max(16, min(64, 4096 // block_e)), BLOCK_K=triton.next_power_of_2(top_k))
    return ids, weights


# ---- experts -----------------------------------------------------------------------------------
def align_capacity(pairs: int, experts: int, block_m: int = BLOCK_M) -> tuple[int, int]:
    """(blocks, padded rows) that any routing of ``pairs`` pairs over ``experts`` fits in."""
    blocks = triton.cdiv(pairs, block_m) + experts
    return blocks, blocks * block_m


@triton.jit
def _align_kernel(ids_ptr, sorted_ptr, block_expert_ptr, starts_ptr, T, E, NB,
                  BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr):
    """One program. ids [T] -> sorted [NB*BLOCK_M] (pair index, -1 for padding), block_expert [NB]
    (the expert of each block, -1 past the used blocks). starts [2, E] int32 is scratch."""
    pairs = tl.arange(0, BLOCK_T)
    ids = tl.load(ids_ptr + pairs, mask=pairs < T, other=E)
    # padding, and any id outside [0, E) (TensorRT times plugins on uninitialised inputs), sorts after
    # every expert and is dropped: no expert's kernel ever indexes with it
    ids = tl.where((ids >= 0) & (ids < E), ids, E).to(tl.int32)
    experts = tl.arange(0, BLOCK_E)
    e_ok = experts < E
    counts = tl.where(e_ok, tl.histogram(ids, BLOCK_E), 0)  # bin E (the padding) dropped
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    padded_end = tl.cumsum(padded, axis=0)
    # each expert's first row: in the sorted pairs (unpadded) and in the padded layout
    tl.store(starts_ptr + experts, tl.cumsum(counts, axis=0) - counts, mask=e_ok)
    tl.store(starts_ptr + E + experts, padded_end - padded, mask=e_ok)
    rows = NB * BLOCK_M
    for start in range(0, rows, BLOCK_T):  # every row starts as padding
        r = start + pairs
        tl.store(sorted_ptr + r, tl.full([BLOCK_T], -1, tl.int32), mask=r < rows)
    tl.debug_barrier()
    # sort by (expert, pair): a pair's rank within its expert is its sorted position - the expert's start
    keys = tl.sort(ids * BLOCK_T + pairs)
    key_expert = keys // BLOCK_T
    key_ok = key_expert < E
    first = tl.load(starts_ptr + key_expert, mask=key_ok, other=0)
    padded_first = tl.load(starts_ptr + E + key_expert, mask=key_ok, other=0)
    tl.store(sorted_ptr + padded_first + pairs - first, keys % BLOCK_T, mask=key_ok)
    # the expert of each block: the number of experts whose padded range ends at or before its first row
    total = tl.sum(padded, axis=0)
    for start in range(0, NB, 16):
        blocks = start + tl.arange(0, 16)
        ends_before = (padded_end[None, :] <= (blocks * BLOCK_M)[:, None]) & e_ok[None, :]
        owner = tl.sum(ends_before.to(tl.int32), axis=1)
        tl.store(block_expert_ptr + blocks, tl.where(blocks * BLOCK_M < total, owner, -1), mask=blocks < NB)


def _align_torch(flat_ids: torch.Tensor, E: int, NB: int, block_m: int):
    """``_align_kernel`` with torch ops, for prefills with more pairs than one program sorts."""
    T = flat_ids.numel()
    order = torch.argsort(flat_ids, stable=True)  # pairs grouped by expert, ascending within
    counts = torch.zeros(E, dtype=torch.int64, device=flat_ids.device).scatter_add_(0, flat_ids, torch.ones_like(flat_ids))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    offsets = padded_end - padded
    first = torch.cumsum(counts, 0) - counts
    sorted_ids = flat_ids[order]
    dest = offsets[sorted_ids] + torch.arange(T, device=flat_ids.device) - first[sorted_ids]
    sorted_pairs = torch.full((NB * block_m,), -1, dtype=torch.int32, device=flat_ids.device)
    sorted_pairs[dest] = order.to(torch.int32)
    starts = torch.arange(NB, device=flat_ids.device) * block_m
    owner = torch.searchsorted(padded_end, starts, right=True).to(torch.int32)
    block_expert = torch.where(starts < padded_end[-1], owner, -1)
    return sorted_pairs, block_expert


@triton.jit
def _expert_gemm(a_ptr, a_rows, a_ok, w_ptr, expert, n, K, N,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """fp32 [BLOCK_M, BLOCK_N] = a[a_rows, :K] @ w[expert, n, :K]^T (a [rows, K]; w [E, N, K])."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        k = start + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + a_rows[:, None] * K + k[None, :], mask=a_ok[:, None] & (k < K)[None, :],
                    other=0.0).to(tl.float32)
        w = tl.load(w_ptr + expert.to(tl.int64) * N * K + n[None, :] * K + k[:, None],
                    mask=(n < N)[None, :] & (k < K)[:, None], other=0.0).to(tl.float32)  # [BLOCK_K, BLOCK_N]
        acc += tl.dot(a, w, input_precision=PRECISION)
    return acc


@triton.jit
def _up_kernel(x_ptr, up_ptr, sorted_ptr, block_expert_ptr, act_ptr, D, I, TOP_K,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    block = tl.program_id(0)
    expert = tl.load(block_expert_ptr + block)
    if expert >= 0:
        dtype: tl.constexpr = act_ptr.dtype.element_ty
        rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(sorted_ptr + rows)
        token = tl.where(pair >= 0, pair // TOP_K, 0).to(tl.int64)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = _expert_gemm(x_ptr, token, pair >= 0, up_ptr, expert, n, D, I, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
        h = tl.maximum(round_to(acc, dtype), 0.0)
        tl.store(act_ptr + rows[:, None].to(tl.int64) * I + n[None, :], to_storage(h * h, dtype), mask=(n < I)[None, :])


@triton.jit
def _down_kernel(act_ptr, down_ptr, sorted_ptr, block_expert_ptr, weights_ptr, contrib_ptr, D, I,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    block = tl.program_id(0)
    expert = tl.load(block_expert_ptr + block)
    if expert >= 0:
        dtype: tl.constexpr = act_ptr.dtype.element_ty
        rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(sorted_ptr + rows)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = _expert_gemm(act_ptr, rows.to(tl.int64), rows >= 0, down_ptr, expert, n, I, D, BLOCK_M, BLOCK_N, BLOCK_K,
                           PRECISION)
        w = tl.load(weights_ptr + tl.where(pair >= 0, pair, 0), mask=pair >= 0, other=0.0)
        out = round_to(acc, dtype) * w[:, None]
        tl.store(contrib_ptr + tl.where(pair >= 0, pair, 0).to(tl.int64)[:, None] * D + n[None, :], out,
                 mask=(pair >= 0)[:, None] & (n < D)[None, :])


@triton.jit
def _combine_kernel(contrib_ptr, ids_ptr, shared_ptr, out_ptr, D,
                    TOP_K: tl.constexpr, HAS_SHARED: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
    token = tl.program_id(0)
    dtype: tl.constexpr = out_ptr.dtype.element_ty
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = cols < D
    slots = tl.arange(0, BLOCK_K)
    ids = tl.load(ids_ptr + token * TOP_K + slots, mask=slots < TOP_K, other=1 << 62)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for _ in tl.static_range(TOP_K):  # ascending expert id, one fp32 add at a time
        slot = tl.argmin(ids, axis=0, tie_break_left=True)
        acc += tl.load(contrib_ptr + (token * TOP_K + slot).to(tl.int64) * D + cols, mask=mask, other=0.0)
        ids = tl.where(slots == slot, 1 << 62, ids)
    out = round_to(acc, dtype)
    if HAS_SHARED:
        out = round_to(out + tl.load(shared_ptr + token * D + cols, mask=mask, other=0.0).to(tl.float32), dtype)
    tl.store(out_ptr + token * D + cols, out.to(dtype), mask=mask)  # out is representable


def moe_experts(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                shared: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., D]; ids, weights [n, k]; up [E, I, D]; down [E, D, I]; shared [..., D] or None ->
    routed experts (+ shared) [..., D], dtype of x."""
    tokens = x.reshape(-1, x.shape[-1]).contiguous()
    n, D = tokens.shape
    top_k = ids.shape[1]
    E, I, _ = up.shape
    out = torch.empty_like(tokens)
    if n == 0:
        return out.reshape(x.shape)
    T = n * top_k
    NB, rows = align_capacity(T, E)
    flat_ids = ids.reshape(-1).contiguous()
    if T <= ALIGN_MAX_PAIRS:
        sorted_pairs = torch.empty(rows, dtype=torch.int32, device=x.device)
        block_expert = torch.empty(NB, dtype=torch.int32, device=x.device)
        starts = torch.empty((2, E), dtype=torch.int32, device=x.device)
        _align_kernel[(1,)](flat_ids, sorted_pairs, block_expert, starts, T, E, NB,
                            BLOCK_T=triton.next_power_of_2(T), BLOCK_E=triton.next_power_of_2(E + 1),
                            BLOCK_M=BLOCK_M, num_warps=8)
    else:
        sorted_pairs, block_expert = _align_torch(flat_ids, E, NB, BLOCK_M)
    precision = _precision(x.dtype)
    act = torch.empty((rows, I), dtype=x.dtype, device=x.device)
    _up_kernel[(NB, triton.cdiv(I, 64))](tokens, up.contiguous(), sorted_pairs, block_expert, act, D, I, top_k,
                                         BLOCK_M=BLOCK_M, BLOCK_N=64, BLOCK_K=64, PRECISION=precision)
    contrib = torch.empty((T, D), dtype=torch.float32, device=x.device)
    _down_kernel[(NB, triton.cdiv(D, 64))](act, down.contiguous(), sorted_pairs, block_expert,
                                           weights.reshape(-1).contiguous(), contrib, D, I,
                                           BLOCK_M=BLOCK_M, BLOCK_N=64, BLOCK_K=64, PRECISION=precision)
    block_d = min(triton.next_power_of_2(D), 1024)
    has_shared = shared is not None
    _combine_kernel[(n, triton.cdiv(D, block_d))](contrib, flat_ids, shared.reshape(-1, D).contiguous() if has_shared
                                                  else tokens, out, D, TOP_K=top_k, HAS_SHARED=has_shared,
                                                  BLOCK_D=block_d, BLOCK_K=triton.next_power_of_2(top_k))
    return out.reshape(x.shape)


def moe_experts_launches(tokens: int, top_k: int) -> int:
    """Kernel launches of one ``moe_experts`` call (the dry run counts them)."""
    return 4 if tokens * top_k <= ALIGN_MAX_PAIRS else 3 + 12  # the torch alignment: about a dozen ops
