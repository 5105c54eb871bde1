"""Triton kernels of the norms and the denoiser's modulation: one launch each.

- ``rms_norm``: spec §3's RMS norm; with a layer's adaLN-single table and modulation it is the
  denoiser's pre-norm, modulate-then-norm or norm-then-modulate (spec §5.1), the modulation rows
  added inside (torch runs 9 kernels for a norm and 5 more for the modulation).
- ``gated_residual``: x + gate * h with the gate row added inside.
- ``gated_rms_norm``: the Mamba mixer's y * silu(z), normalised per group.
References: ``reference.rms_norm_ref`` / ``modulated_rms_norm_ref`` / ``gated_residual_ref`` /
``gated_rms_norm_ref``. Every intermediate the reference rounds to the storage dtype is rounded
here too (``round_to``): bf16 runs match the reference to fp32 accumulation order, float32 runs
round nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rounding import round_to, to_storage

MODULATE_NONE, MODULATE_FIRST, MODULATE_AFTER = 0, 1, 2


@triton.jit
def _modulation_row(table_ptr, m_ptr, b, which: tl.constexpr, cols, mask, D, dtype: tl.constexpr):
    """Row ``which`` (0 shift, 1 scale, 2 gate) of bf16(table + m[b].view(3, D))."""
    t = tl.load(table_ptr + which * D + cols, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + b * 3 * D + which * D + cols, mask=mask, other=0.0).to(tl.float32)
    return round_to(t + m, dtype)


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, table_ptr, m_ptr, y_ptr, D, rows_per_batch, eps,
                     MODULATE: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0)  # one row of [B*L, D]
    dtype: tl.constexpr = y_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(x_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    if MODULATE != 0:
        b = row // rows_per_batch
        shift = _modulation_row(table_ptr, m_ptr, b, 0, cols, mask, D, dtype)
        one_plus_scale = round_to(1.0 + _modulation_row(table_ptr, m_ptr, b, 1, cols, mask, D, dtype), dtype)
    if MODULATE == 1:  # modulate, then norm
        x = round_to(round_to(x * one_plus_scale, dtype) + shift, dtype)
    x = tl.where(mask, x, 0.0)
    inv_rms = tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = round_to(w * (x * inv_rms), dtype)
    if MODULATE == 2:  # norm, then modulate
        y = round_to(round_to(y * one_plus_scale, dtype) + shift, dtype)
    tl.store(y_ptr + row * D + cols, y.to(dtype), mask=mask)  # y is representable


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, table: torch.Tensor | None = None,
             m: torch.Tensor | None = None, modulate_first: bool = False) -> torch.Tensor:
    """x [B, L, D] (or [..., D] without modulation) -> same shape and dtype. ``table`` [3, D] and
    ``m`` [B, 3D]: the denoiser's layer modulation (see ``reference.modulated_rms_norm_ref``)."""
    x = x.contiguous()
    D = x.shape[-1]
    rows = x.numel() // D
    y = torch.empty_like(x)
    if rows == 0:
        return y
    if table is None:
        mode, table, m, rows_per_batch = MODULATE_NONE, weight, weight, 1
    else:
        mode = MODULATE_FIRST if modulate_first else MODULATE_AFTER
        table, m, rows_per_batch = table.contiguous(), m.contiguous(), x.shape[1]
    _rms_norm_kernel[(rows,)](x, weight, table, m, y, D, rows_per_batch, eps, MODULATE=mode,
                              BLOCK_D=triton.next_power_of_2(D))
    return y


@triton.jit
def _gated_residual_kernel(x_ptr, h_ptr, table_ptr, m_ptr, out_ptr, D, rows_per_batch, BLOCK_D: tl.constexpr):
    row = tl.program_id(0)
    dtype: tl.constexpr = out_ptr.dtype.element_ty
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = cols < D
    gate = _modulation_row(table_ptr, m_ptr, row // rows_per_batch, 2, cols, mask, D, dtype)
    x = tl.load(x_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    h = tl.load(h_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * D + cols, to_storage(x + round_to(gate * h, dtype), dtype), mask=mask)


def gated_residual(x: torch.Tensor, h: torch.Tensor, table: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """x, h [B, L, D]; table [3, D]; m [B, 3D] -> x + gate * h (see ``reference.gated_residual_ref``)."""
    x, h = x.contiguous(), h.contiguous()
    B, L, D = x.shape
    out = torch.empty_like(x)
    if B * L == 0:
        return out
    block = min(triton.next_power_of_2(D), 1024)
    _gated_residual_kernel[(B * L, triton.cdiv(D, block))](x, h, table.contiguous(), m.contiguous(), out, D, L,
                                                           BLOCK_D=block)
    return out


@triton.jit
def _gated_rms_norm_kernel(y_ptr, z_ptr, w_ptr, out_ptr, D, group_size, y_row_stride, z_row_stride, eps,
                           BLOCK: tl.constexpr):
    row = tl.program_id(0)
    group = tl.program_id(1)
    dtype: tl.constexpr = out_ptr.dtype.element_ty
    cols = group * group_size + tl.arange(0, BLOCK)
    mask = tl.arange(0, BLOCK) < group_size
    y = tl.load(y_ptr + row * y_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + row * z_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    v = y * (z * tl.sigmoid(z))  # y * silu(z), fp32
    v = tl.where(mask, v, 0.0)
    inv_rms = tl.rsqrt(tl.sum(v * v, axis=0) / group_size + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * D + cols, to_storage((v * inv_rms) * w, dtype), mask=mask)


def gated_rms_norm(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, n_groups: int, eps: float) -> torch.Tensor:
    """y, z [..., D] (z may be a column slice of the in_proj output) -> [..., D], dtype of y
    (see ``reference.gated_rms_norm_ref``)."""
    D = y.shape[-1]
    y2, z2 = y.reshape(-1, D), z.reshape(-1, D)  # views: rows keep their stride
    if y2.stride(1) != 1:
        y2 = y2.contiguous()
    if z2.stride(1) != 1:
        z2 = z2.contiguous()
    out = torch.empty(y.shape, dtype=y.dtype, device=y.device)
    if y2.shape[0] == 0:
        return out
    group_size = D // n_groups
    _gated_rms_norm_kernel[(y2.shape[0], n_groups)](y2, z2, weight, out, D, group_size, y2.stride(0), z2.stride(0),
                                                    eps, BLOCK=triton.next_power_of_2(group_size))
    return out
