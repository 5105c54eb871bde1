"""Engine build and engine tokens (needs TensorRT-LLM 1.2 and a GPU; skipped otherwise)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("tensorrt_llm") is None, reason="TensorRT-LLM 1.2 not installed"),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_tiny_engines_give_the_torch_tokens(demo_dir, tmp_path):
    """Build both engines for the demo checkpoint; greedy diffusion and AR tokens equal the torch backend's."""
    import subprocess
    import sys
    from pathlib import Path

    from trtllm_twotower.runtime import TwoTowerRuntime

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "out"
    subprocess.run([sys.executable, str(root / "build_engine.py"), "--checkpoint", str(demo_dir), "--output-dir",
                    str(out), "--max-seq-len", "256", "--max-input-len", "128", "--no-progress"], check=True)
    engine = TwoTowerRuntime.from_checkpoint(demo_dir, backend="trt", engine_dir=out)
    torch_rt = TwoTowerRuntime.from_checkpoint(demo_dir, dtype="bfloat16", context_device="cuda:0")
    for mode in ("diffusion", "ar"):
        kw = dict(max_new_tokens=32, mode=mode, confidence_threshold=0.03, eos_token_id=None)
        assert engine.generate(["engine"], **kw).output_ids == torch_rt.generate(["engine"], **kw).output_ids
