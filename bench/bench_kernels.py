#!/usr/bin/env python3
"""The Triton kernels against their byte floors, torch SDPA and the torch forms (GPU).

  block attention: 16 queries, batch 1, real heads (32/2 x 128), context 8k..128k; achieved bytes/s
                   (K/V read once + q/out) vs measured copy bandwidth (goal >= 80 %) and vs SDPA with
                   an explicit mask on the same data
  seeded scan:     a 16-token block and a 4k-token prefill at the real sizes (64 heads x 64 x 128
                   state); bytes (inputs, y, conv and fp32 states) over copy bandwidth (goal >= 70 %)
                   and the torch reference / chunked form
  routed experts:  16 and 96 tokens x 6 of 128 experts at the real widths; bytes of the distinct
                   experts routed over copy bandwidth, against TorchOps' grouped GEMMs (torch._grouped_mm)

    python bench/bench_kernels.py --out bench/results/kernels-<device>.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_towers import copy_bandwidth, git_commit, median_ms  # noqa: E402
from trtllm_twotower.plugins.reference import seeded_mamba_scan_chunked, seeded_mamba_scan_ref  # noqa: E402


def bench_attention(device, contexts, bandwidth, args) -> list[dict]:
    from trtllm_twotower.plugins import attention

    B, L, H, K, P = 1, 16, 32, 2, 128
    rows = []
    for ctx in contexts:
        q = torch.randn(B, L, H, P, device=device, dtype=torch.bfloat16)
        k, v = (torch.randn(B, L, K, P, device=device, dtype=torch.bfloat16) for _ in range(2))
        kc, vc = (torch.randn(B, ctx + L, K, P, device=device, dtype=torch.bfloat16) for _ in range(2))
        lens = torch.tensor([ctx], dtype=torch.int32, device=device)
        ms = median_ms(lambda: attention.block_attention(q, k, v, kc, vc, lens, ctx, False, False), device,
                       args.warmup, args.repeat)
        nbytes = 2 * (ctx + L) * K * P * 2 + 2 * B * L * H * P * 2  # K/V once, q in, out
        keys = torch.cat([kc[:, :ctx], k], 1).transpose(1, 2)  # [B, K, T, P]
        values = torch.cat([vc[:, :ctx], v], 1).transpose(1, 2)
        mask = torch.ones(L, ctx + L, dtype=torch.bool, device=device)
        sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
            q.transpose(1, 2), keys.repeat_interleave(H // K, 1), values.repeat_interleave(H // K, 1), attn_mask=mask)
        sdpa_ms = median_ms(sdpa, device, args.warmup, args.repeat)
        rows.append({"context": ctx, "ms": ms, "bytes": nbytes, "bytes_per_s": nbytes / (ms / 1e3),
                     "fraction_of_copy_bandwidth": nbytes / (ms / 1e3) / bandwidth, "sdpa_ms": sdpa_ms,
                     "speedup_vs_sdpa": sdpa_ms / ms})
        print(f"attention ctx={ctx:7d}  {ms:8.3f} ms  {rows[-1]['fraction_of_copy_bandwidth']:6.1%} of copy bw  "
              f"sdpa {sdpa_ms:8.3f} ms", flush=True)
    return rows


def bench_scan(device, bandwidth, args) -> list[dict]:
    from trtllm_twotower.plugins import mamba

    H, P, G, N, W = 64, 64, 8, 128, 4
    C = H * P + 2 * G * N
    rows = []
    for L in (16, 4096):
        dt_bias = torch.log(torch.expm1(torch.empty(H, device=device).uniform_(1e-3, 0.1)))
        inputs = dict(xbc=torch.randn(1, L, C, device=device, dtype=torch.bfloat16),
                      dt=torch.randn(1, L, H, device=device, dtype=torch.bfloat16),
                      conv_weight=torch.randn(C, W, device=device, dtype=torch.bfloat16),
                      conv_bias=torch.randn(C, device=device, dtype=torch.bfloat16), dt_bias=dt_bias,
                      A_log=torch.rand(H, device=device), D=torch.rand(H, device=device),
                      conv_state=torch.randn(1, C, W, device=device, dtype=torch.bfloat16),
                      ssm_state=torch.randn(1, H, P, N, device=device), n_groups=G, head_dim=P)
        ms = median_ms(lambda: mamba.seeded_mamba_scan(**inputs), device, args.warmup, args.repeat)
        nbytes = L * (C + H) * 2 + L * H * P * 2 + 2 * (C * W * 2 + H * P * N * 4)
        torch_form = seeded_mamba_scan_ref if L == 16 else seeded_mamba_scan_chunked
        ref_ms = median_ms(lambda: torch_form(**inputs), device, 1, 3)
        rows.append({"tokens": L, "ms": ms, "bytes": nbytes, "floor_ms": nbytes / bandwidth * 1e3,
                     "fraction_of_floor": nbytes / bandwidth * 1e3 / ms, "torch_ms": ref_ms,
                     "torch_form": torch_form.__name__})
        print(f"scan L={L:5d}  {ms:8.3f} ms  floor {rows[-1]['floor_ms']:7.3f} ms  "
              f"({rows[-1]['fraction_of_floor']:6.1%})  torch {ref_ms:8.3f} ms", flush=True)
    return rows


def bench_experts(device, bandwidth, args) -> list[dict]:
    from trtllm_twotower.network.ops import TorchOps
    from trtllm_twotower.plugins import moe

    E, k, D, I = 128, 6, 2688, 1856
    up = torch.randn(E, I, D, device=device, dtype=torch.bfloat16) / D ** 0.5
    down = torch.randn(E, D, I, device=device, dtype=torch.bfloat16) / I ** 0.5
    ops = TorchOps(torch.bfloat16, device)
    rows = []
    for n in (16, 96):
        x = torch.randn(n, D, device=device, dtype=torch.bfloat16)
        idx = torch.stack([torch.randperm(E, device=device)[:k] for _ in range(n)])
        w = torch.rand(n, k, device=device)
        ms = median_ms(lambda: moe.moe_experts(x, idx, w, up, down), device, args.warmup, args.repeat)
        grouped_ms = median_ms(lambda: ops._routed_experts(x, idx, w, up, down), device, args.warmup, args.repeat)
        distinct = int(torch.unique(idx).numel())
        nbytes = distinct * 2 * D * I * 2
        rows.append({"tokens": n, "distinct_experts": distinct, "ms": ms, "grouped_gemm_ms": grouped_ms,
                     "floor_ms": nbytes / bandwidth * 1e3, "fraction_of_floor": nbytes / bandwidth * 1e3 / ms})
        print(f"experts n={n:3d} ({distinct} experts)  {ms:8.3f} ms  grouped GEMM {grouped_ms:8.3f} ms  "
              f"floor {rows[-1]['floor_ms']:7.3f} ms", flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 131072])
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeat", type=int, default=20)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: needs a CUDA GPU (the Triton kernels compile for it on first use)", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    bandwidth = copy_bandwidth(device, 2 * 2**30)
    print(f"{torch.cuda.get_device_name(device)}: copy bandwidth {bandwidth / 1e9:.0f} GB/s", flush=True)
    result = {"device": torch.cuda.get_device_name(device),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "commit": git_commit(), "torch": torch.__version__, "copy_bandwidth_bytes_per_s": bandwidth}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    sections = {"block_attention": lambda: bench_attention(device, args.contexts, bandwidth, args),
                "seeded_scan": lambda: bench_scan(device, bandwidth, args),
                "moe_experts": lambda: bench_experts(device, bandwidth, args)}
    failed = False
    for name, run in sections.items():  # a failing kernel is a result; the others still run
        try:
            result[name] = run()
        except Exception as error:  # noqa: BLE001
            failed = True
            result[name] = {"error": f"{type(error).__name__}: {error}"[:500]}
            print(f"{name}: {result[name]['error']}", flush=True)
            with contextlib.suppress(Exception):  # a kernel fault poisons the context: later sections say so
                torch.cuda.synchronize(device)
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
