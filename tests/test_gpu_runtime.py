"""The torch path on CUDA (kernels when built, else the references): same greedy tokens as CPU fp32."""

from __future__ import annotations

import pytest
import torch

from trtllm_twotower.runtime import TwoTowerRuntime

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("mode", ["diffusion", "mock-ar", "ar"])
def test_cuda_float32_tokens_equal_cpu_float32(demo_dir, mode):
    kw = dict(max_new_tokens=32, mode=mode, block_size=16, confidence_threshold=0.03, eos_token_id=None)
    prompts = ["gpu parity", "a second, longer prompt for the batch"]
    cpu = TwoTowerRuntime.from_checkpoint(demo_dir, dtype="float32", context_device="cpu", denoiser_device="cpu")
    gpu = TwoTowerRuntime.from_checkpoint(demo_dir, dtype="float32", context_device="cuda:0", denoiser_device="cuda:0")
    assert gpu.generate(prompts, **kw).output_ids == cpu.generate(prompts, **kw).output_ids


def test_cuda_bfloat16_runs_and_cross_device_mirror(demo_dir):
    rt = TwoTowerRuntime.from_checkpoint(demo_dir, dtype="bfloat16", context_device="cuda:0", denoiser_device="cuda:0")
    res = rt.generate(["bf16 on gpu"], max_new_tokens=32, eos_token_id=None)
    assert len(res.output_ids[0]) == 32
    # context on CPU, denoiser on the GPU: the state mirror crosses devices, tokens unchanged (fp32)
    split = TwoTowerRuntime.from_checkpoint(demo_dir, dtype="float32", context_device="cpu", denoiser_device="cuda:0")
    same = TwoTowerRuntime.from_checkpoint(demo_dir, dtype="float32", context_device="cpu", denoiser_device="cpu")
    kw = dict(max_new_tokens=32, confidence_threshold=0.03, eos_token_id=None)
    assert split.generate(["mirror"], **kw).output_ids == same.generate(["mirror"], **kw).output_ids
