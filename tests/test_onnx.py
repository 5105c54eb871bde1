"""The ONNX route on the CPU: both towers exported from the network definition (custom plugin
nodes, dynamic batch / tokens / cache, external weights), run by ONNX Runtime with the nodes as
onnxruntime-extensions Python ops, against the torch backend: logits (also through Polygraphy's
Comparator) and the greedy tokens of every mode on the trained demo model in float32."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("onnx", "onnxruntime", "onnxruntime_extensions", "onnxscript",
                                                       "polygraphy")),
    reason="the onnx extra is not installed (pip install -e '.[onnx]')")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import build_engine  # noqa: E402
from trtllm_twotower.demo import TRAINED_DEMO_DIR  # noqa: E402
from trtllm_twotower.engine_io import state_names  # noqa: E402
from trtllm_twotower.network import towers  # noqa: E402
from trtllm_twotower.network.ops import TorchOps  # noqa: E402
from trtllm_twotower.onnx_export import GRAPHS, load_weights  # noqa: E402
from trtllm_twotower.onnx_nodes import DOMAIN, NODES  # noqa: E402

LIMITS = ["--max-batch-size", "4", "--max-seq-len", "256", "--max-input-len", "128", "--block-size", "16"]
# ORT's MatMul / Add against torch's F.linear / add: float32 sums in another order; the custom
# nodes are the torch backend's own ops
LOGITS_ATOL = 1e-3


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "graphs"
    assert build_engine.main(["--checkpoint", str(TRAINED_DEMO_DIR), "--onnx", str(out), "--dtype", "float32",
                              *LIMITS]) == 0
    return out


@pytest.fixture(scope="module")
def demo():
    from trtllm_twotower.config import load_config

    cfg = load_config(TRAINED_DEMO_DIR)
    return cfg, load_weights(TRAINED_DEMO_DIR, cfg, "float32")


@pytest.fixture(scope="module")
def runtimes(onnx_dir):
    from trtllm_twotower.runtime import TwoTowerRuntime

    return (TwoTowerRuntime.from_checkpoint(TRAINED_DEMO_DIR, backend="onnx", dtype="float32", engine_dir=onnx_dir),
            TwoTowerRuntime.from_checkpoint(TRAINED_DEMO_DIR, dtype="float32", context_device="cpu"))


def test_the_graphs_hold_plugin_nodes_named_state_dynamic_dims_and_external_weights(onnx_dir, demo):
    import onnx

    cfg, _ = demo
    manifest = json.loads((onnx_dir / "onnx_manifest.json").read_text())
    assert set(manifest["graphs"]) == set(GRAPHS) and manifest["dtype"] == "float32"
    op_types = set()
    for graph, name in manifest["graphs"].items():
        model = onnx.load(str(onnx_dir / name), load_external_data=False)
        custom = [n for n in model.graph.node if n.domain == DOMAIN]
        op_types |= {n.op_type for n in custom}
        for node in custom:
            attrs = {a.name: a for a in node.attribute}
            assert attrs["plugin_version"].s == b"1" and attrs["plugin_namespace"].s == b"twotower", node.op_type
        # no standard op stands in for a kernel: every non-custom node is a plain ONNX op
        assert all(n.domain in ("", DOMAIN) for n in model.graph.node)
        inputs = {i.name: _dims(i) for i in model.graph.input}
        assert inputs["input_ids"] == ["batch", "tokens"] and inputs["cache_lens"] == ["batch"]
        for kind, entries in state_names(cfg).items():
            for _, state in entries:
                assert inputs[state][0] == "batch"
                if kind in ("key", "value"):
                    assert inputs[state][1] == "max_seq_len"
        outputs = {o.name: _dims(o) for o in model.graph.output}
        assert outputs["logits"] == ["batch", "tokens", cfg.vocab_size]
        if graph.startswith("context"):
            assert all(f"new_key_{i}" in outputs for i in cfg.layers_of("*"))
            assert all(f"present_ssm_state_{i}" in outputs for i in cfg.layers_of("M"))
        large = [t for t in model.graph.initializer if len(t.dims) >= 2 and t.dims[0] * t.dims[1] >= 1024]
        assert large and all(t.data_location == onnx.TensorProto.EXTERNAL for t in large)  # the weight matrices
        assert (onnx_dir / f"{name}.data").stat().st_size > 1_000_000
    assert op_types == {n.op_type for n in NODES.values()}  # every kernel, across the graphs


def _dims(value) -> list:
    """A graph input's or output's dims: names of dynamic dims, sizes of static ones."""
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def _random_state(cfg, batch, capacity, tokens, gen):
    state = towers.empty_state(cfg, batch, capacity, torch.float32, "cpu")
    fill = lambda d: {i: torch.randn(t.shape, generator=gen) for i, t in d.items()}  # noqa: E731
    return towers.TowerState(lengths=torch.randint(0, capacity - tokens + 1, (batch,), generator=gen),
                             keys=fill(state.keys), values=fill(state.values), conv=fill(state.conv),
                             ssm=fill(state.ssm))


@pytest.mark.parametrize("batch,tokens,capacity", [(1, 5, 16), (3, 2, 9)])
def test_one_file_per_graph_serves_any_batch_length_and_capacity(runtimes, demo, batch, tokens, capacity):
    """Every graph against the torch backend's towers, at two batch sizes, lengths and capacities."""
    cfg, weights = demo
    executor = runtimes[0].executor
    ops = TorchOps(torch.float32, "cpu")
    gen = torch.Generator().manual_seed(batch * 100 + tokens)
    state = _random_state(cfg, batch, capacity, tokens, gen)
    ids = torch.randint(0, cfg.vocab_size, (batch, tokens), generator=gen)
    t = torch.rand(batch, generator=gen)
    for trace in (False, True):
        copy = towers.select_rows(state, list(range(batch)))  # extends append K/V in place
        logits, new = executor.extend(copy, ids, logits=True, trace=trace)
        ref_copy = towers.select_rows(state, list(range(batch)))
        ref_logits, ref = towers.context_forward(ops, cfg, weights["context"], ref_copy, ids, trace=trace)
        torch.testing.assert_close(logits, ref_logits, atol=LOGITS_ATOL, rtol=0)
        assert torch.equal(new.lengths, ref.lengths)
        for i in cfg.layers_of("*"):
            torch.testing.assert_close(new.keys[i], ref.keys[i], atol=1e-4, rtol=0)
        for i in cfg.layers_of("M"):
            torch.testing.assert_close(new.ssm[i], ref.ssm[i], atol=1e-4, rtol=1e-4)
            if trace:
                torch.testing.assert_close(new.trace.ssm[i], ref.trace.ssm[i], atol=1e-4, rtol=1e-4)
                torch.testing.assert_close(new.trace.conv[i], ref.trace.conv[i], atol=1e-4, rtol=0)
    for timestep in (t, None):
        den = executor.denoise(state, ids, timestep)
        torch.testing.assert_close(den, towers.denoise(ops, cfg, weights["denoiser"], state, ids, timestep),
                                   atol=LOGITS_ATOL, rtol=0)


@pytest.mark.parametrize("mode", ["diffusion", "speculative", "ar", "mock-ar"])
def test_onnx_backend_greedy_tokens_equal_the_torch_backend(runtimes, mode):
    onnx_rt, torch_rt = runtimes
    kw = dict(max_new_tokens=12, mode=mode, confidence_threshold=0.5, eos_token_id=None)
    prompts = ["Return a new list of", "def f"]
    got, want = onnx_rt.generate(prompts, **kw), torch_rt.generate(prompts, **kw)
    assert got.output_ids == want.output_ids and len(got.output_ids[0]) == 12
    assert got.nfe_per_row == want.nfe_per_row


def test_polygraphy_comparator_onnxruntime_against_torch(onnx_dir, demo):
    """Polygraphy's Comparator over the context graph: ONNX Runtime against the torch tower."""
    from polygraphy.backend.base import BaseRunner
    from polygraphy.common import TensorMetadata
    from polygraphy.backend.onnxrt import OnnxrtRunner
    from polygraphy.comparator import Comparator, SimpleCompareFunc

    from trtllm_twotower.runtime.onnx_executor import load_session

    cfg, weights = demo
    session = load_session(onnx_dir / "context.onnx")
    names = state_names(cfg)

    class TorchTowerRunner(BaseRunner):
        def get_input_metadata_impl(self):
            meta = TensorMetadata()
            for i in session.get_inputs():
                meta.add(i.name, {"tensor(int32)": "int32", "tensor(float)": "float32"}[i.type], i.shape)
            return meta

        def infer_impl(self, feed_dict):
            start = time.perf_counter()
            feeds = {n: torch.from_numpy(a.copy()) for n, a in feed_dict.items()}
            by_kind = {kind: {i: feeds[name] for i, name in entries} for kind, entries in names.items()}
            state = towers.TowerState(lengths=feeds["cache_lens"].long(), keys=by_kind["key"],
                                      values=by_kind["value"], conv=by_kind["conv"], ssm=by_kind["ssm"])
            logits, new = towers.context_forward(TorchOps(torch.float32, "cpu"), cfg, weights["context"], state,
                                                 feeds["input_ids"].long())
            out = OrderedDict(logits=logits.numpy())
            out.update({f"present_ssm_state_{i}": new.ssm[i].numpy() for i in new.ssm})
            self.inference_time = time.perf_counter() - start
            return out

    gen = torch.Generator().manual_seed(7)
    feeds = []
    for batch, tokens in ((2, 4), (1, 7)):
        state = _random_state(cfg, batch, 12, tokens, gen)
        by_kind = {"key": state.keys, "value": state.values, "conv": state.conv, "ssm": state.ssm}
        feed = OrderedDict(input_ids=torch.randint(0, cfg.vocab_size, (batch, tokens), generator=gen).int().numpy(),
                           cache_lens=state.lengths.int().numpy())
        feed.update({name: by_kind[kind][i].numpy() for kind, entries in names.items() for i, name in entries})
        feeds.append(feed)
    results = Comparator.run([OnnxrtRunner(session, name="onnxruntime"), TorchTowerRunner(name="torch")],
                             data_loader=feeds)
    assert len(results) == 2 and all(len(r) == 2 for _, r in results)
    assert bool(Comparator.compare_accuracy(results, compare_func=SimpleCompareFunc(atol=LOGITS_ATOL, rtol=0)))
    # and the comparison can fail: a tolerance no float32 reordering meets
    assert not bool(Comparator.compare_accuracy(results, compare_func=SimpleCompareFunc(atol=1e-12, rtol=0)))


def test_onnx_backend_refuses_bad_input(onnx_dir, all_kinds_dir, tmp_path):
    from trtllm_twotower.runtime import TwoTowerRuntime

    with pytest.raises(ValueError, match="float32 graphs on the CPU"):
        TwoTowerRuntime.from_checkpoint(TRAINED_DEMO_DIR, backend="onnx", dtype="bfloat16", engine_dir=onnx_dir)
    with pytest.raises(ValueError, match="engine_dir: required for backend='onnx'"):
        TwoTowerRuntime.from_checkpoint(TRAINED_DEMO_DIR, backend="onnx", dtype="float32")
    with pytest.raises(ValueError, match="no onnx_manifest.json"):
        TwoTowerRuntime.from_checkpoint(TRAINED_DEMO_DIR, backend="onnx", dtype="float32", engine_dir=tmp_path)
    with pytest.raises(ValueError, match="another config.json"):
        TwoTowerRuntime.from_checkpoint(all_kinds_dir, backend="onnx", dtype="float32", engine_dir=onnx_dir)


def test_build_engine_onnx_writes_the_engine_commands_and_refuses_bad_input(onnx_dir, demo, tmp_path, capsys):
    cfg, _ = demo
    script = (onnx_dir / "trt_build.sh").read_text()
    build_plugins = next(line for line in script.splitlines() if line.startswith("bash "))
    assert build_plugins.endswith(f"plugins/build.sh {(TRAINED_DEMO_DIR / 'config.json').resolve()}")
    for graph in GRAPHS:
        trtexec = next(line for line in script.splitlines()
                       if line.startswith(f"trtexec --onnx={onnx_dir}/{graph}.onnx"))
        assert "--staticPlugins=" in trtexec and "--stronglyTyped" in trtexec
        assert f"--saveEngine={onnx_dir}/engines/{graph}.engine" in trtexec
        tokens = 128 if graph == "context" else 16  # prefills up to max_input_len; blocks elsewhere
        assert f"--maxShapes=input_ids:4x{tokens},cache_lens:4," in trtexec
        assert f"past_key_{cfg.layers_of('*')[0]}:4x256x{cfg.num_key_value_heads}x{cfg.head_dim}" in trtexec
        assert f"# or: polygraphy convert {onnx_dir}/{graph}.onnx --convert-to trt" in script
    assert build_engine.main(["--checkpoint", str(TRAINED_DEMO_DIR), "--onnx", str(onnx_dir)]) == 2
    assert "exists (pass --overwrite" in capsys.readouterr().err
    bad, weightless = tmp_path / "bad", tmp_path / "weightless"  # a config without weights fails mid-export
    weightless.mkdir()
    (weightless / "config.json").write_text((TRAINED_DEMO_DIR / "config.json").read_text())
    assert build_engine.main(["--checkpoint", str(weightless), "--onnx", str(bad)]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert not bad.exists() and not list(tmp_path.glob(".bad.tmp-*"))  # nothing half-written
    assert build_engine.main(["--onnx", str(bad)]) == 2
    assert "--onnx OUT needs --checkpoint" in capsys.readouterr().err


def test_run_runtime_backend_onnx(onnx_dir, runtimes, capsys):
    import run_runtime

    args = ["--backend", "onnx", "--engine-dir", str(onnx_dir), "--dtype", "float32", "--mode", "ar",
            "--max-new-tokens", "6", "--prompt", "def f", "--json"]
    assert run_runtime.main(args) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["output_ids"] == runtimes[1].generate(["def f"], max_new_tokens=6, mode="ar").output_ids
    assert run_runtime.main(["--backend", "onnx", "--engine-dir", str(onnx_dir)]) == 2  # bfloat16 by default
    assert "float32 graphs on the CPU" in capsys.readouterr().err
