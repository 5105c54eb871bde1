"""ctypes front of the compiled kernel library: same signatures as ``reference.py``.

The library is loaded once, from ``$TWOTOWER_KERNELS_LIB`` or ``build/plugins/`` (built by
``trtllm_twotower/plugins/build.sh``). Each entry point checks its tensors at the edge, fixes
layout and dtype, allocates outputs and workspace, and launches on the current CUDA stream; it
does no arithmetic. ``*_shapes`` give the output shapes without a GPU (the plugins' shape rules).
"""

from __future__ import annotations

import ctypes
import os
from functools import lru_cache
from pathlib import Path

import torch

from ..devices import upload

REPO_ROOT = Path(__file__).resolve().parents[2]
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}
_c_int, _c_size, _ptr = ctypes.c_int, ctypes.c_size_t, ctypes.c_void_p


class KernelError(RuntimeError):
    """A launch or argument error reported by the kernel library."""


def library_path(name: str = "libtwotower_kernels.so") -> Path:
    env = os.environ.get("TWOTOWER_KERNELS_LIB") if name == "libtwotower_kernels.so" else None
    return Path(env) if env else REPO_ROOT / "build" / "plugins" / name


@lru_cache(maxsize=1)
def _lib():
    path = library_path()
    if not path.is_file():
        return None
    lib = ctypes.CDLL(str(path))
    lib.twotower_error_string.restype = ctypes.c_char_p
    lib.twotower_error_string.argtypes = [_c_int]
    lib.twotower_block_attention.argtypes = [_ptr] * 8 + [_c_int] * 11 + [_ptr]
    lib.twotower_block_attention.restype = _c_int
    lib.twotower_block_attention_workspace_floats.argtypes = [_c_int] * 5
    lib.twotower_block_attention_workspace_floats.restype = _c_size
    lib.twotower_block_attention_num_splits.argtypes = [_c_int] * 6
    lib.twotower_block_attention_num_splits.restype = _c_int
    lib.twotower_seeded_mamba_scan.argtypes = [_ptr] * 14 + [_c_int] * 9 + [_ptr]
    lib.twotower_seeded_mamba_scan.restype = _c_int
    lib.twotower_seeded_mamba_scan_workspace_bytes.argtypes = [_c_int] * 4
    lib.twotower_seeded_mamba_scan_workspace_bytes.restype = _c_size
    lib.twotower_moe_experts.argtypes = [_ptr] * 7 + [_c_int] * 6 + [_ptr]
    lib.twotower_moe_experts.restype = _c_int
    lib.twotower_moe_experts_workspace_bytes.argtypes = [_c_int] * 6
    lib.twotower_moe_experts_workspace_bytes.restype = _c_size
    return lib


def available() -> bool:
    """The kernel library is built and loadable."""
    return _lib() is not None


def _check(code: int) -> None:
    if code != 0:
        raise KernelError(f"twotower kernel failed ({code}): {_lib().twotower_error_string(code).decode()}")


def _expect(name: str, t: torch.Tensor, shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Check one tensor at the edge; return it contiguous."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
    if t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got {t.device}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {list(shape)}, got {list(t.shape)}")
    if t.dtype != dtype:
        raise ValueError(f"{name}: expected {dtype}, got {t.dtype}")
    return t.contiguous()


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


# ---- block attention ---------------------------------------------------------------------------

def block_attention_shapes(q_shape, k_shape, cache_shape) -> tuple[int, ...]:
    """Output shape [B, L, H, P] from q [B, L, H, P], k [B, L, K, P], cache [B, S, K, P]."""
    B, L, H, P = q_shape
    if tuple(k_shape) != (B, L, k_shape[2], P) or k_shape[2] <= 0 or H % k_shape[2]:
        raise ValueError(f"k: expected [B, L, K, P] = [{B}, {L}, K, {P}] with H={H} divisible by K, got {list(k_shape)}")
    if tuple(cache_shape) != (B, cache_shape[1], k_shape[2], P):
        raise ValueError(f"k_cache: expected [{B}, S, {k_shape[2]}, {P}], got {list(cache_shape)}")
    return (B, L, H, P)


def _check_lead(name: str, t) -> None:
    """The library is built and the first tensor (which fixes device and dtype) is a CUDA fp32/bf16 tensor."""
    if not available():
        raise KernelError(f"kernel library not built ({library_path()}): run trtllm_twotower/plugins/build.sh")
    if not isinstance(t, torch.Tensor) or t.device.type != "cuda":
        raise ValueError(f"{name}: expected a CUDA tensor, got {getattr(t, 'device', type(t).__name__)}")
    if t.dtype not in _DTYPE_CODES:
        raise ValueError(f"{name}: expected float32 or bfloat16, got {t.dtype}")


def block_attention(q, k, v, k_cache, v_cache, cache_lens, causal: bool, write_cache: bool) -> torch.Tensor:
    """See ``reference.block_attention_ref``. ``cache_lens`` may live on the host (no sync) or the device."""
    _check_lead("q", q)
    B, L, H, P = block_attention_shapes(q.shape, k.shape, k_cache.shape)
    K, S = k.shape[2], k_cache.shape[1]
    device, dtype = q.device, q.dtype
    q = q.contiguous()
    k = _expect("k", k, (B, L, K, P), dtype, device)
    v = _expect("v", v, (B, L, K, P), dtype, device)
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):  # written in place: must already be contiguous
        _expect(name, t, (B, S, K, P), dtype, device)
        if not t.is_contiguous():
            raise ValueError(f"{name}: must be contiguous (it is updated in place)")
    if tuple(cache_lens.shape) != (B,):
        raise ValueError(f"cache_lens: expected shape [{B}], got {list(cache_lens.shape)}")
    max_len = int(cache_lens.max()) if cache_lens.device.type == "cpu" else S - L
    if max_len + L > S:
        raise ValueError(f"cache_lens: {max_len} + {L} new tokens exceed the cache capacity {S}")
    lens = upload(cache_lens, device, torch.int32)  # host lengths: queued, no sync
    lib = _lib()
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    splits = lib.twotower_block_attention_num_splits(B, L, H, K, max_len, sms)
    workspace = torch.empty(lib.twotower_block_attention_workspace_floats(B, L, H, P, splits), dtype=torch.float32,
                            device=device)
    out = torch.empty((B, L, H, P), dtype=dtype, device=device)
    _check(lib.twotower_block_attention(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), lens.data_ptr(),
        out.data_ptr(), workspace.data_ptr(), B, L, H, K, P, S, max_len, splits, _DTYPE_CODES[dtype], int(causal),
        int(write_cache), _stream(device)))
    return out


# ---- seeded Mamba2 scan ------------------------------------------------------------------------

def seeded_mamba_scan_shapes(xbc_shape, dt_shape, conv_state_shape, n_groups: int, head_dim: int):
    """(y, conv_state, ssm_state) shapes from xbc [B, L, C], dt [B, L, H], conv_state [B, C, W]."""
    B, L, C = xbc_shape
    H = dt_shape[2]
    if tuple(dt_shape) != (B, L, H):
        raise ValueError(f"dt: expected [{B}, {L}, H], got {list(dt_shape)}")
    if n_groups <= 0 or H % n_groups or (C - H * head_dim) <= 0 or (C - H * head_dim) % (2 * n_groups):
        raise ValueError(f"xbc: {C} channels do not split into x (H*P = {H * head_dim}) and B, C of {n_groups} groups")
    if tuple(conv_state_shape[:2]) != (B, C):
        raise ValueError(f"conv_state: expected [{B}, {C}, W], got {list(conv_state_shape)}")
    N = (C - H * head_dim) // (2 * n_groups)
    return (B, L, H * head_dim), (B, C, conv_state_shape[2]), (B, H, head_dim, N)


def seeded_mamba_scan(xbc, dt, conv_weight, conv_bias, dt_bias, A_log, D, conv_state, ssm_state,
                      n_groups: int, head_dim: int, return_steps: bool = False):
    """See ``reference.seeded_mamba_scan_ref``: (y, new conv state, new fp32 ssm state[, fp32 ssm state
    after each token [B, L, H, P, N]]); inputs unchanged."""
    _check_lead("xbc", xbc)
    y_shape, conv_shape, ssm_shape = seeded_mamba_scan_shapes(xbc.shape, dt.shape, conv_state.shape, n_groups, head_dim)
    B, L, C = xbc.shape
    H, W = dt.shape[2], conv_state.shape[2]
    N = ssm_shape[3]
    device, dtype = xbc.device, xbc.dtype
    xbc = xbc.contiguous()
    dt = _expect("dt", dt, (B, L, H), dtype, device)
    conv_weight = _expect("conv_weight", conv_weight, (C, W), dtype, device)
    conv_bias = _expect("conv_bias", conv_bias, (C,), dtype, device)
    dt_bias = _expect("dt_bias", dt_bias, (H,), torch.float32, device)
    A_log = _expect("A_log", A_log, (H,), torch.float32, device)
    D = _expect("D", D, (H,), torch.float32, device)
    conv_state = _expect("conv_state", conv_state, conv_shape, dtype, device)
    ssm_state = _expect("ssm_state", ssm_state, ssm_shape, torch.float32, device)
    lib = _lib()
    y = torch.empty(y_shape, dtype=dtype, device=device)
    new_conv = torch.empty(conv_shape, dtype=dtype, device=device)
    new_ssm = torch.empty(ssm_shape, dtype=torch.float32, device=device)
    ssm_steps = torch.empty((B, L, *ssm_shape[1:]), dtype=torch.float32, device=device) if return_steps else None
    workspace = torch.empty(max(1, lib.twotower_seeded_mamba_scan_workspace_bytes(B, L, C, _DTYPE_CODES[dtype])),
                            dtype=torch.uint8, device=device)
    _check(lib.twotower_seeded_mamba_scan(
        xbc.data_ptr(), dt.data_ptr(), conv_weight.data_ptr(), conv_bias.data_ptr(), dt_bias.data_ptr(),
        A_log.data_ptr(), D.data_ptr(), conv_state.data_ptr(), ssm_state.data_ptr(), y.data_ptr(),
        new_conv.data_ptr(), new_ssm.data_ptr(), None if ssm_steps is None else ssm_steps.data_ptr(),
        workspace.data_ptr(), B, L, C, W, H, head_dim, n_groups, N, _DTYPE_CODES[dtype], _stream(device)))
    return (y, new_conv, new_ssm, ssm_steps) if return_steps else (y, new_conv, new_ssm)


# ---- routed relu^2 experts ----------------------------------------------------------------------

def moe_experts_shapes(x_shape, idx_shape, up_shape, down_shape) -> tuple[int, ...]:
    """Output shape (= x's) from x [..., H], idx [n, k], up [E, I, H], down [E, H, I]."""
    H = x_shape[-1]
    n = 1
    for d in x_shape[:-1]:
        n *= d
    E, I = up_shape[0], up_shape[1]
    if len(idx_shape) != 2 or idx_shape[0] != n:
        raise ValueError(f"idx: expected [{n}, k] (one row per token of x), got {list(idx_shape)}")
    if tuple(up_shape) != (E, I, H):
        raise ValueError(f"up: expected [E, I, {H}], got {list(up_shape)}")
    if tuple(down_shape) != (E, H, I):
        raise ValueError(f"down: expected [{E}, {H}, {I}], got {list(down_shape)}")
    return tuple(x_shape)


def moe_experts(x, idx, weights, up, down) -> torch.Tensor:
    """See ``reference.moe_experts_ref``. idx may be int64 (made int32 here)."""
    _check_lead("x", x)
    shape = moe_experts_shapes(x.shape, idx.shape, up.shape, down.shape)
    n, k = idx.shape
    E, I, H = up.shape
    device, dtype = x.device, x.dtype
    x = x.contiguous()
    ids = _expect("idx", idx.to(torch.int32), (n, k), torch.int32, device)
    weights = _expect("weights", weights, (n, k), torch.float32, device)
    up = _expect("up", up, (E, I, H), dtype, device)
    down = _expect("down", down, (E, H, I), dtype, device)
    lib = _lib()
    out = torch.empty(shape, dtype=dtype, device=device)
    workspace = torch.empty(lib.twotower_moe_experts_workspace_bytes(n, k, E, H, I, _DTYPE_CODES[dtype]),
                            dtype=torch.uint8, device=device)
    _check(lib.twotower_moe_experts(x.data_ptr(), ids.data_ptr(), weights.data_ptr(), up.data_ptr(), down.data_ptr(),
                                    out.data_ptr(), workspace.data_ptr(), n, k, E, H, I, _DTYPE_CODES[dtype],
                                    _stream(device)))
    return out


# ---- TensorRT plugins ---------------------------------------------------------------------------

@lru_cache(maxsize=1)
def load_trt_plugins() -> Path:
    """Load libtwotower_plugins.so (RTLD_GLOBAL): loading it registers our IPluginV3 creators in
    TensorRT's registry under the namespace "twotower" (once: later calls return the same path)."""
    path = library_path("libtwotower_plugins.so")
    if not path.is_file():
        raise KernelError(f"{path} not built: build with TensorRT present (TENSORRT_ROOT=... plugins/build.sh)")
    lib = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    lib.twotower_plugins_registered.restype = _c_int
    if not lib.twotower_plugins_registered():
        raise KernelError(f"{path}: its plugin creators could not be registered with TensorRT (already registered "
                          "by another copy of the library?)")
    return path
