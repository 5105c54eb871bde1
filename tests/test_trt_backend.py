"""The engines (``pytest -m trt``): on a machine with TensorRT-LLM 1.2, a GPU and the plugin library
built against its TensorRT, build both towers' engines from the demo checkpoint with the Python API
and with ``trtllm-build``, run them through TrtExecutor, and compare with the torch backend; and the
ONNX route: engines built from the exported graphs (``build_engine.py --onnx``) against ONNX Runtime
through Polygraphy. Skipped (with the reason) everywhere else; nothing here fakes TensorRT."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.trt,
    pytest.mark.skipif(importlib.util.find_spec("tensorrt_llm") is None, reason="TensorRT-LLM 1.2 not installed"),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
LIMITS = ["--max-batch-size", "4", "--max-seq-len", "256", "--max-input-len", "128", "--block-size", "16"]


@pytest.fixture(scope="module")
def plugins(demo_dir):
    """The plugin library, its kernels compiled ahead of time for the demo checkpoint's config."""
    from trtllm_twotower.config import load_config
    from trtllm_twotower.plugins import plugin_library

    try:
        plugin_library.check_config(load_config(demo_dir))
        built = plugin_library.library_path().is_file()
    except plugin_library.PluginLibraryError:
        built = False
    if not built:
        subprocess.run(["bash", str(ROOT / "trtllm_twotower" / "plugins" / "build.sh"), str(demo_dir),
                        "-DTWOTOWER_BUILD_TRT_PLUGINS=ON"], check=True)
    return plugin_library.load_trt_plugins()


@pytest.fixture(scope="module")
def python_api_engines(demo_dir, tmp_path_factory, plugins):
    out = tmp_path_factory.mktemp("trt") / "api"
    subprocess.run([sys.executable, str(ROOT / "build_engine.py"), "--checkpoint", str(demo_dir), "--output-dir",
                    str(out), "--no-progress", *LIMITS], check=True)
    return out


@pytest.fixture(scope="module")
def trtllm_build_engines(demo_dir, tmp_path_factory, plugins):
    out = tmp_path_factory.mktemp("trt") / "cli"
    subprocess.run([sys.executable, str(ROOT / "build_engine.py"), "--checkpoint", str(demo_dir), "--output-dir",
                    str(out), "--no-progress", "--no-build", *LIMITS], check=True)
    subprocess.run(["bash", str(out / "trtllm_build.sh")], check=True, cwd=ROOT)
    return out


def _runtimes(demo_dir, engine_dir):
    from trtllm_twotower.runtime import TwoTowerRuntime

    engine = TwoTowerRuntime.from_checkpoint(demo_dir, backend="trt", engine_dir=engine_dir)
    torch_rt = TwoTowerRuntime.from_checkpoint(demo_dir, dtype="bfloat16", context_device="cuda:0")
    return engine, torch_rt


@pytest.mark.parametrize("which", ["python_api_engines", "trtllm_build_engines"])
def test_engine_logits_match_the_torch_backend(demo_dir, which, request):
    engine, torch_rt = _runtimes(demo_dir, request.getfixturevalue(which))
    prompts = [[5, 60, 7, 99, 42, 130, 8], [200, 9]]
    ctx_state, ctx_logits = engine.executor.prefill(prompts, 64)
    ref_state, ref_logits = torch_rt.executor.prefill(prompts, 64)
    scale = ref_logits.abs().max()
    assert (ctx_logits - ref_logits).abs().max() <= 0.05 * scale  # bf16 networks, different kernels
    block = torch.full((2, 16), torch_rt.cfg.mask_token_id, device="cuda:0")
    t = torch.ones(2, device="cuda:0")
    den = engine.executor.denoise(ctx_state, block, t)
    ref = torch_rt.executor.denoise(ref_state, block, t)
    assert (den - ref).abs().max() <= 0.05 * ref.abs().max()


@pytest.mark.parametrize("which", ["python_api_engines", "trtllm_build_engines"])
def test_engine_greedy_tokens_equal_the_torch_backend(demo_dir, which, request):
    engine, torch_rt = _runtimes(demo_dir, request.getfixturevalue(which))
    for mode in ("diffusion", "ar"):
        kw = dict(max_new_tokens=32, mode=mode, confidence_threshold=0.03, eos_token_id=None)
        assert engine.generate(["engine"], **kw).output_ids == torch_rt.generate(["engine"], **kw).output_ids


def test_engines_refuse_another_config(demo_dir, all_kinds_dir, python_api_engines):
    from trtllm_twotower.runtime import TwoTowerRuntime

    with pytest.raises(ValueError, match="built for another config.json"):
        TwoTowerRuntime.from_checkpoint(all_kinds_dir, backend="trt", engine_dir=python_api_engines)


# ---- the ONNX route -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def onnx_engines(demo_dir, tmp_path_factory, plugins):
    """The four graphs and their engines (build_engine.py builds them with TensorRT's Python API)."""
    import tensorrt as trt

    from trtllm_twotower.onnx_nodes import NODES

    registry = trt.get_plugin_registry()
    missing = [n.op_type for n in NODES.values() if registry.get_creator(n.op_type, "1", "twotower") is None]
    assert not missing, f"no TensorRT plugin creator for the ONNX nodes {missing}"
    out = tmp_path_factory.mktemp("trt") / "onnx"
    subprocess.run([sys.executable, str(ROOT / "build_engine.py"), "--checkpoint", str(demo_dir), "--onnx", str(out),
                    "--dtype", "float32", *LIMITS], check=True)
    return out


@pytest.mark.parametrize("graph", ["context", "context_trace", "denoiser", "denoiser_untimed"])
def test_onnx_engines_match_onnx_runtime_through_polygraphy(demo_dir, onnx_engines, graph):
    from polygraphy.backend.onnxrt import OnnxrtRunner
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner
    from polygraphy.comparator import Comparator, SimpleCompareFunc

    from trtllm_twotower.config import load_config
    from trtllm_twotower.engine_io import state_names
    from trtllm_twotower.network import towers
    from trtllm_twotower.runtime.onnx_executor import load_session

    cfg = load_config(demo_dir)
    gen = torch.Generator().manual_seed(11)
    feeds = []
    for batch, tokens in ((1, 16), (3, 5)):
        state = towers.empty_state(cfg, batch, 256, torch.float32, "cpu")
        by_kind = {"key": state.keys, "value": state.values, "conv": state.conv, "ssm": state.ssm}
        feed = {"input_ids": torch.randint(0, cfg.vocab_size, (batch, tokens), generator=gen).int().numpy(),
                "cache_lens": torch.randint(0, 200, (batch,), generator=gen).int().numpy()}
        if graph == "denoiser":
            feed["timestep"] = torch.rand(batch, generator=gen).numpy()
        feed.update({name: torch.randn(by_kind[kind][i].shape, generator=gen).numpy()
                     for kind, entries in state_names(cfg).items() for i, name in entries})
        feeds.append(feed)
    engine = EngineFromBytes((onnx_engines / "engines" / f"{graph}.engine").read_bytes())
    results = Comparator.run([OnnxrtRunner(load_session(onnx_engines / f"{graph}.onnx")), TrtRunner(engine)],
                             data_loader=feeds)
    assert bool(Comparator.compare_accuracy(results, compare_func=SimpleCompareFunc(atol=1e-3, rtol=1e-3)))
