"""Triton kernel of block attention: an L-token chunk over ``cache[0:len] ‖ its own K/V``.

Reference: ``reference.block_attention_ref`` (same arguments, plus the host-known bound of the
lengths). One program serves one (row, kv head, block of query rows), where its query rows are
the (token, query head) pairs of that kv head's GQA group, so each K/V tile is read once for all
its query heads (the 16 heads of a 32/2 model). Online softmax in fp32 (scores scaled into the
exp2 domain). Short steps over a long cache split the cache over several programs
(flash-decoding): each writes its partial (max, sum, weighted values) and ``_combine_kernel``
merges them, a second launch; the chunk's own keys go to the last split. The split count is a
runtime argument: one compiled kernel serves every context length. The program that owns
(row, kv head, first query block, split 0) appends the chunk's K/V to the cache when asked
(``write_cache``): only slots at or past ``len`` are written, which no program reads.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .rounding import to_storage

BLOCK_M = 16  # query rows (token x head of a group) per program
BLOCK_N = 64  # keys per tile
SPLIT_TARGET_PROGRAMS = 264  # 2 per SM of an H100/H200 (132 SMs): enough programs to stream the cache
MIN_SPLIT_KEYS = 256
MAX_SPLITS = 64


def num_splits(batch: int, kv_heads: int, rows: int, max_len: int) -> int:
    """How many programs share one (row, kv head, query block)'s cache (1 = no combine launch)."""
    base = batch * kv_heads * triton.cdiv(rows, BLOCK_M)
    if base == 0 or max_len < 2 * MIN_SPLIT_KEYS:
        return 1
    return max(1, min(triton.cdiv(SPLIT_TARGET_PROGRAMS, base), max_len // MIN_SPLIT_KEYS, MAX_SPLITS))


def launches(batch: int, length: int, heads: int, kv_heads: int, max_len: int) -> int:
    """Kernel launches of one ``block_attention`` call (the dry run counts them)."""
    return 1 if num_splits(batch, kv_heads, length * (heads // kv_heads), max_len) == 1 else 2


@triton.jit
def _online_softmax_tile(q, keys_ptr, values_ptr, key_offsets, key_ok, visible, m_i, l_i, acc, p, p_ok,
                         PRECISION: tl.constexpr):
    """One tile of keys into the running (max, sum, acc) of every query row.
    keys/values at ``keys_ptr + key_offsets[n] + p``; visible [BLOCK_M, BLOCK_N]."""
    k = tl.load(keys_ptr + key_offsets[None, :] + p[:, None], mask=key_ok[None, :] & p_ok[:, None],
                other=0.0).to(tl.float32)  # [P, BLOCK_N]
    scores = tl.where(visible, tl.dot(q, k, input_precision=PRECISION), float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet stay at 0
    alpha = tl.exp2(m_i - m_safe)
    probs = tl.exp2(scores - m_safe[:, None])
    v = tl.load(values_ptr + key_offsets[:, None] + p[None, :], mask=key_ok[:, None] & p_ok[None, :],
                other=0.0).to(tl.float32)  # [BLOCK_N, P]
    acc = acc * alpha[:, None] + tl.dot(probs, v, input_precision=PRECISION)
    return m_new, l_i * alpha + tl.sum(probs, axis=1), acc


@triton.jit
def _block_attention_kernel(
    q_ptr, k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, lens_ptr, out_ptr, part_acc_ptr, part_stats_ptr,
    L, KV, num_splits, split_len, qk_scale,
    q_sb, q_sl, q_sh, k_sb, k_sl, k_sh, c_sb, c_ss, c_sh, o_sb, o_sl, o_sh,
    G: tl.constexpr, P: tl.constexpr, BLOCK_P: tl.constexpr, SPLIT: tl.constexpr,
    CAUSAL: tl.constexpr, WRITE_CACHE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row_head = tl.program_id(0)  # b * KV + kv head
    b = row_head // KV
    kv_head = row_head % KV
    query_block = tl.program_id(1)
    split = tl.program_id(2)
    rows = query_block * BLOCK_M + tl.arange(0, BLOCK_M)  # (token, head in group) pairs
    token = rows // G
    head = kv_head * G + rows % G
    row_ok = rows < L * G
    p = tl.arange(0, BLOCK_P)
    p_ok = p < P
    q = tl.load(q_ptr + b * q_sb + token[:, None] * q_sl + head[:, None] * q_sh + p[None, :],
                mask=row_ok[:, None] & p_ok[None, :], other=0.0).to(tl.float32) * qk_scale
    length = tl.load(lens_ptr + b).to(tl.int32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_P], tl.float32)
    # 1. this split's share of cache[0:len]
    cache_base = b.to(tl.int64) * c_sb + kv_head * c_sh
    lo = split * split_len
    hi = tl.minimum(lo + split_len, length)
    for start in range(lo, hi, BLOCK_N):
        s = start + tl.arange(0, BLOCK_N)
        s_ok = s < hi
        m_i, l_i, acc = _online_softmax_tile(q, k_cache_ptr + cache_base, v_cache_ptr + cache_base, s * c_ss, s_ok,
                                             s_ok[None, :] & row_ok[:, None], m_i, l_i, acc, p, p_ok, PRECISION)
    # 2. the chunk's own keys (last split): all of them, or keys j <= token when causal
    if split == num_splits - 1:
        own_base = b.to(tl.int64) * k_sb + kv_head * k_sh
        for start in range(0, L, BLOCK_N):
            j = start + tl.arange(0, BLOCK_N)
            j_ok = j < L
            visible = j_ok[None, :] & row_ok[:, None]
            if CAUSAL:
                visible = visible & (j[None, :] <= token[:, None])
            m_i, l_i, acc = _online_softmax_tile(q, k_ptr + own_base, v_ptr + own_base, j * k_sl, j_ok, visible,
                                                 m_i, l_i, acc, p, p_ok, PRECISION)
    # 3. the result, or this split's partial
    if not SPLIT:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + b * o_sb + token[:, None] * o_sl + head[:, None] * o_sh + p[None, :],
                 to_storage(out, out_ptr.dtype.element_ty), mask=row_ok[:, None] & p_ok[None, :])
    else:
        part = (row_head * num_splits + split) * L * G + rows  # [B*KV, splits, L*G]
        tl.store(part_acc_ptr + part[:, None].to(tl.int64) * BLOCK_P + p[None, :], acc, mask=row_ok[:, None])
        tl.store(part_stats_ptr + part * 2, m_i, mask=row_ok)
        tl.store(part_stats_ptr + part * 2 + 1, l_i, mask=row_ok)
    # 4. append the chunk's K/V at [len, len + L)
    if WRITE_CACHE:
        if (query_block == 0) & (split == 0):
            own_base = b.to(tl.int64) * k_sb + kv_head * k_sh
            for start in range(0, L, BLOCK_N):
                j = start + tl.arange(0, BLOCK_N)
                mask = (j < L)[:, None] & p_ok[None, :]
                src = own_base + j[:, None] * k_sl + p[None, :]
                dst = cache_base + (length + j)[:, None].to(tl.int64) * c_ss + p[None, :]
                tl.store(k_cache_ptr + dst, tl.load(k_ptr + src, mask=mask), mask=mask)
                tl.store(v_cache_ptr + dst, tl.load(v_ptr + src, mask=mask), mask=mask)


@triton.jit
def _combine_kernel(part_acc_ptr, part_stats_ptr, out_ptr, L, KV, num_splits, o_sb, o_sl, o_sh,
                    G: tl.constexpr, P: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr):
    row_head = tl.program_id(0)
    b = row_head // KV
    kv_head = row_head % KV
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < L * G
    token = rows // G
    head = kv_head * G + rows % G
    p = tl.arange(0, BLOCK_P)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_P], tl.float32)
    for split in range(0, num_splits):
        part = (row_head * num_splits + split) * L * G + rows
        m_s = tl.load(part_stats_ptr + part * 2, mask=row_ok, other=float("-inf"))
        l_s = tl.load(part_stats_ptr + part * 2 + 1, mask=row_ok, other=0.0)
        a_s = tl.load(part_acc_ptr + part[:, None].to(tl.int64) * BLOCK_P + p[None, :], mask=row_ok[:, None], other=0.0)
        m_new = tl.maximum(m_i, m_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha, beta = tl.exp2(m_i - m_safe), tl.exp2(m_s - m_safe)
        acc = acc * alpha[:, None] + a_s * beta[:, None]
        l_i = l_i * alpha + l_s * beta
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(out_ptr + b * o_sb + token[:, None] * o_sl + head[:, None] * o_sh + p[None, :],
             to_storage(out, out_ptr.dtype.element_ty), mask=row_ok[:, None] & (p < P)[None, :])


def block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    cache_lens: torch.Tensor, max_len: int, causal: bool, write_cache: bool) -> torch.Tensor:
    """q [B, L, H, P]; k, v [B, L, K, P]; k_cache, v_cache [B, S, K, P] (appended in place with
    ``write_cache``); cache_lens [B] int on q's device; max_len ≥ every length (host-known: the
    grid's split count comes from it, no length is read back) -> [B, L, H, P], dtype of q."""
    B, L, H, P = q.shape
    KV = k.shape[2]
    G = H // KV
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty_like(q)
    if B * L == 0:
        return out
    rows = L * G
    splits = num_splits(B, KV, rows, max_len)
    split_len = triton.cdiv(triton.cdiv(max(max_len, 1), splits), BLOCK_N) * BLOCK_N
    block_p = max(16, triton.next_power_of_2(P))
    if splits > 1:
        part_acc = torch.empty((B * KV * splits * rows, block_p), dtype=torch.float32, device=q.device)
        part_stats = torch.empty((B * KV * splits * rows, 2), dtype=torch.float32, device=q.device)
    else:
        part_acc = part_stats = out  # unused
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    grid = (B * KV, triton.cdiv(rows, BLOCK_M), splits)
    _block_attention_kernel[grid](
        q, k, v, k_cache, v_cache, cache_lens, out, part_acc, part_stats,
        L, KV, splits, split_len, 1.0 / math.sqrt(P) * 1.4426950408889634,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), out.stride(0), out.stride(1), out.stride(2),
        G=G, P=P, BLOCK_P=block_p, SPLIT=splits > 1, CAUSAL=causal, WRITE_CACHE=write_cache, PRECISION=precision,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
    )
    if splits > 1:
        _combine_kernel[(B * KV, triton.cdiv(rows, BLOCK_M))](
            part_acc, part_stats, out, L, KV, splits, out.stride(0), out.stride(1), out.stride(2),
            G=G, P=P, BLOCK_P=block_p, BLOCK_M=BLOCK_M)
    return out
