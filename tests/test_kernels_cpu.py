"""The CUDA C kernels the TensorRT plugins still call (until they call the AOT-compiled Triton
kernels) on a machine without a GPU: they compile and their C-side checks work; and the torch
references match brute-force math."""

from __future__ import annotations

import ctypes
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from trtllm_twotower.plugins.reference import block_attention_ref, seeded_mamba_scan_ref

ROOT = Path(__file__).resolve().parents[1]
SYMBOLS = ("twotower_block_attention", "twotower_block_attention_workspace_floats",
           "twotower_block_attention_num_splits", "twotower_seeded_mamba_scan",
           "twotower_seeded_mamba_scan_workspace_bytes", "twotower_moe_experts", "twotower_moe_experts_workspace_bytes",
           "twotower_error_string")


@pytest.fixture(scope="session")
def built_library(tmp_path_factory):
    """Build libtwotower_kernels.so from a clean build dir with CMake + nvcc (compile only here)."""
    if shutil.which("nvcc") is None or shutil.which("cmake") is None:
        pytest.skip("nvcc or cmake not installed: cannot compile the CUDA kernels")
    build = tmp_path_factory.mktemp("plugins_build")
    subprocess.run(["cmake", "-S", str(ROOT / "trtllm_twotower" / "plugins"), "-B", str(build)], check=True,
                   capture_output=True, text=True)
    run = subprocess.run(["cmake", "--build", str(build), "-j2"], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    return build / "libtwotower_kernels.so"


def test_kernel_library_compiles_and_exports_the_c_abi(built_library):
    assert built_library.is_file()
    exported = subprocess.run(["nm", "-D", "--defined-only", str(built_library)], capture_output=True, text=True,
                              check=True).stdout
    for symbol in SYMBOLS:
        assert f" T {symbol}" in exported, symbol
    needed = subprocess.run(["readelf", "-d", str(built_library)], capture_output=True, text=True, check=True).stdout
    assert "libcudart" not in needed  # cudart linked statically: the .so runs next to any torch


def test_c_side_argument_checks_without_a_gpu(built_library):
    lib = ctypes.CDLL(str(built_library))
    lib.twotower_error_string.restype = ctypes.c_char_p
    attention = lib.twotower_block_attention
    attention.argtypes = [ctypes.c_void_p] * 8 + [ctypes.c_int] * 11 + [ctypes.c_void_p]
    dummy = ctypes.c_void_p(16)  # never dereferenced: argument checks come before any launch
    ptrs = [dummy] * 8
    assert attention(*([None] + ptrs[1:]), 1, 16, 4, 2, 16, 64, 0, 1, 0, 1, 1, None) == -4  # NULL q
    assert attention(*ptrs, 1, 16, 4, 3, 16, 64, 0, 1, 0, 1, 1, None) == -1  # H % K != 0
    assert attention(*ptrs, 1, 16, 4, 2, 24, 64, 0, 1, 0, 1, 1, None) == -2  # head dim 24 unsupported
    assert attention(*ptrs, 1, 16, 4, 2, 16, 64, 60, 1, 0, 1, 1, None) == -1  # 60 + 16 > capacity 64
    assert attention(*ptrs, 1, 16, 4, 2, 16, 64, 0, 1, 7, 1, 1, None) == -3  # bad dtype
    assert b"dimensions" in lib.twotower_error_string(-1)
    scan = lib.twotower_seeded_mamba_scan
    scan.argtypes = [ctypes.c_void_p] * 14 + [ctypes.c_int] * 9 + [ctypes.c_void_p]
    sptrs = [dummy] * 14
    # C = H*P + 2*G*N = 4*8 + 2*2*16 = 96
    assert scan(*sptrs, 1, 4, 95, 4, 4, 8, 2, 16, 0, None) == -1  # channels do not split
    assert scan(*sptrs, 1, 4, 96, 9, 4, 8, 2, 16, 0, None) == -2  # conv width above 8
    experts = lib.twotower_moe_experts
    experts.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_int] * 6 + [ctypes.c_void_p]
    eptrs = [dummy] * 7
    assert experts(*([None] + eptrs[1:]), 4, 2, 8, 64, 32, 1, None) == -4  # NULL x
    assert experts(*eptrs, 4, 9, 8, 64, 32, 1, None) == -1  # k > E
    assert experts(*eptrs, 4, 2, 2048, 64, 32, 1, None) == -2  # more experts than the router kernel holds
    assert experts(*eptrs, 4, 2, 8, 64, 32, 5, None) == -3  # bad dtype
    lib.twotower_block_attention_num_splits.restype = ctypes.c_int
    splits = lib.twotower_block_attention_num_splits(1, 16, 32, 2, 131072, 132)
    assert 8 <= splits <= 512  # long context, one sequence: split the keys to fill the GPU
    assert lib.twotower_block_attention_num_splits(64, 4096, 32, 2, 0, 132) == 1  # a big prefill needs none


def test_block_attention_ref_against_brute_force():
    gen = torch.Generator().manual_seed(0)
    B, L, H, K, P, S = 2, 5, 4, 2, 8, 12
    lens = torch.tensor([3, 7])
    q, k, v = (torch.randn(B, L, n, P, generator=gen) for n in (H, K, K))
    kc, vc = torch.randn(B, S, K, P, generator=gen), torch.randn(B, S, K, P, generator=gen)
    for causal in (True, False):
        kc_w, vc_w = kc.clone(), vc.clone()
        out = block_attention_ref(q, k, v, kc_w, vc_w, lens, causal, write_cache=True)
        for b in range(B):
            n = int(lens[b])
            assert torch.equal(kc_w[b, n : n + L], k[b]) and torch.equal(kc_w[b, :n], kc[b, :n])
            for h in range(H):
                kvh = h // (H // K)
                keys = torch.cat([kc[b, :n, kvh], k[b, :, kvh]]).double()
                vals = torch.cat([vc[b, :n, kvh], v[b, :, kvh]]).double()
                for j in range(L):
                    seen = n + j + 1 if causal else n + L
                    w = torch.softmax(keys[:seen] @ q[b, j, h].double() / math.sqrt(P), 0)
                    assert torch.allclose(out[b, j, h].double(), w @ vals[:seen], atol=1e-5)
        untouched = kc.clone()
        block_attention_ref(q, k, v, untouched, vc.clone(), lens, causal, write_cache=False)
        assert torch.equal(untouched, kc)


def test_block_attention_ref_device_lengths_form():
    """The form used under CUDA-graph capture (lengths never read back: the whole capacity masked,
    the new K/V scattered on the device) equals the host-lengths form: same cache writes, outputs
    to fp32 rounding (the softmax runs over more, masked, slots)."""
    from trtllm_twotower.plugins.reference import _block_attention

    gen = torch.Generator().manual_seed(2)
    B, L, H, K, P, S = 3, 4, 4, 2, 8, 20
    lens = torch.tensor([0, 9, 16])
    q, k, v = (torch.randn(B, L, n, P, generator=gen) for n in (H, K, K))
    kc, vc = torch.randn(B, S, K, P, generator=gen), torch.randn(B, S, K, P, generator=gen)
    for causal in (True, False):
        host_k, host_v, dev_k, dev_v = kc.clone(), vc.clone(), kc.clone(), vc.clone()
        host = block_attention_ref(q, k, v, host_k, host_v, lens, causal, write_cache=True)
        dev = _block_attention(q, k, v, dev_k, dev_v, lens, S - L, causal, write_cache=True, host_writes=False)
        assert torch.equal(dev_k, host_k) and torch.equal(dev_v, host_v)
        assert (dev - host).abs().max() < 1e-6 * host.abs().max()


def test_seeded_scan_ref_multi_token_equals_token_by_token():
    gen = torch.Generator().manual_seed(1)
    B, L, H, P, G, N, W = 2, 6, 4, 8, 2, 16, 4
    C = H * P + 2 * G * N
    xbc, dt = torch.randn(B, L, C, generator=gen), torch.randn(B, L, H, generator=gen)
    w, bias = torch.randn(C, W, generator=gen), torch.randn(C, generator=gen)
    dt_bias, A_log, D = torch.rand(H, generator=gen) - 2, torch.rand(H, generator=gen), torch.rand(H, generator=gen)
    conv0, ssm0 = torch.randn(B, C, W, generator=gen), 50 * torch.randn(B, H, P, N, generator=gen)
    y, conv, ssm = seeded_mamba_scan_ref(xbc, dt, w, bias, dt_bias, A_log, D, conv0, ssm0, G, P)
    conv_t, ssm_t, ys = conv0, ssm0, []
    for t in range(L):
        y_t, conv_t, ssm_t = seeded_mamba_scan_ref(xbc[:, t : t + 1], dt[:, t : t + 1], w, bias, dt_bias, A_log, D,
                                                   conv_t, ssm_t, G, P)
        ys.append(y_t)
    assert torch.allclose(torch.cat(ys, 1), y, atol=1e-4, rtol=1e-5)
    assert torch.allclose(ssm_t, ssm, atol=1e-3, rtol=1e-5) and torch.equal(conv_t, conv)
    assert torch.equal(conv, xbc[:, -W:].transpose(1, 2))  # the last W raw columns
    short = seeded_mamba_scan_ref(xbc[:, :2], dt[:, :2], w, bias, dt_bias, A_log, D, conv0, ssm0, G, P)[1]
    assert torch.equal(short, torch.cat([conv0[:, :, 2:], xbc[:, :2].transpose(1, 2)], 2))
