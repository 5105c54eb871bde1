"""fp32 -> storage-dtype rounding shared by the Triton kernels.

The kernels round exactly where the torch reference rounds (PyTorch's bf16 ops: compute in fp32,
round to nearest even). ``tensor.to(tl.bfloat16)`` rounds to nearest even on a GPU, but Triton's
interpreter truncates (and its ``fp_downcast_rounding="rtne"`` neither carries nor ties to even),
so the rounding is done here with integer ops, which both execute identically; the final cast of
an already representable value is then exact everywhere. NaN payloads are not preserved.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def round_to(v, dtype: tl.constexpr):
    """fp32 ``v`` rounded to nearest even at ``dtype``'s precision, kept in fp32 (float32: as is)."""
    if dtype == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        return bits.to(tl.float32, bitcast=True)
    else:
        return v


@triton.jit
def to_storage(v, dtype: tl.constexpr):
    """fp32 ``v`` as ``dtype``, rounded to nearest even."""
    return round_to(v, dtype).to(dtype)
