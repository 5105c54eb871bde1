"""Shared fixtures: tiny seeded checkpoints in the official layout, generated once per session."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # Triton kernels run under the interpreter (before triton is imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from trtllm_twotower.checkpoint import CheckpointReader, load_tower_weights, resolve_keys
from trtllm_twotower.config import load_config
from trtllm_twotower.demo import write_demo_checkpoint


@pytest.fixture(autouse=True)
def scheduler_errors_fail_the_test(caplog):
    """The scheduler turns a failed forward into failed requests and goes on; in tests any such
    failure is a bug, also one after the rows it hit had already finished."""
    import logging

    caplog.set_level(logging.ERROR, logger="trtllm_twotower.runtime.scheduler")
    yield
    failures = [r.getMessage() for r in caplog.records
                if r.name == "trtllm_twotower.runtime.scheduler" and r.levelno >= logging.ERROR]
    assert not failures, failures


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (and the built kernel library); skipped without one")
    config.addinivalue_line("markers", "triton: starts a real tritonserver (nvidia-pytriton) on loopback")
    config.addinivalue_line("markers", "trt: builds and runs TensorRT-LLM 1.2 engines (GPU); skipped without them")


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    """The demo checkpoint (pattern M*EME*ME)."""
    return write_demo_checkpoint(tmp_path_factory.mktemp("ckpt") / "demo", seed=0)


@pytest.fixture(scope="session")
def all_kinds_dir(tmp_path_factory):
    """A checkpoint whose pattern has every layer kind (M, *, E, -) and a chunk size below the prompts."""
    return write_demo_checkpoint(tmp_path_factory.mktemp("ckpt") / "all_kinds", seed=1,
                                 hybrid_override_pattern="M*E-ME*M", chunk_size=8)


def load_towers(directory, dtype=torch.float32, device="cpu"):
    """(cfg, context weights, denoiser weights) of a TwoTower checkpoint."""
    cfg = load_config(directory)
    reader = CheckpointReader(directory)
    layout, on_disk = resolve_keys(reader, cfg, ("context", "denoiser"))
    ctx = load_tower_weights(reader, cfg, "context", dtype, device, layout=layout, on_disk=on_disk)
    den = load_tower_weights(reader, cfg, "denoiser", dtype, device, layout=layout, on_disk=on_disk)
    return cfg, ctx, den
