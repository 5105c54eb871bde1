"""Conversion to TRT-LLM checkpoints, the build plan, and the TensorRT op table (CPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import load_towers
from trtllm_twotower.checkpoint import CheckpointReader
from trtllm_twotower.config import config_from_dict
from trtllm_twotower.convert import convert_checkpoint, load_trtllm_checkpoint
from trtllm_twotower.engine_io import BuildLimits, engine_io
from trtllm_twotower.network import ops as ops_module
from trtllm_twotower.network import towers
from trtllm_twotower.network.ops import TorchOps
from trtllm_twotower.network.trt import TrtOps

ROOT = Path(__file__).resolve().parents[1]
REAL_CONFIG = json.loads((ROOT / "bench" / "real_config.json").read_text())


def _leaves(tree, prefix=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _leaves(v, f"{prefix}{k}.")
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _leaves(v, f"{prefix}{i}.")
    else:
        yield prefix[:-1], tree


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_gives_identical_weights_and_logits(demo_dir, tmp_path, dtype):
    out = convert_checkpoint(demo_dir, tmp_path / "trt", dtype=dtype, show_progress=False)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    cfg, ctx, den = load_towers(demo_dir, torch_dtype)
    ops = TorchOps(torch_dtype)
    ids = torch.randint(4, cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    for tower, original in (("context", ctx), ("denoiser", den)):
        cfg2, tower2, loaded = load_trtllm_checkpoint(out[tower])
        assert cfg2 == cfg and tower2 == tower
        a, b = dict(_leaves(original)), dict(_leaves(loaded))
        assert a.keys() == b.keys()
        for name in a:
            assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    state = towers.empty_state(cfg, 1, 32, torch_dtype, "cpu")
    logits, state = towers.context_forward(ops, cfg, load_trtllm_checkpoint(out["context"])[2], state, ids)
    ref, _ = towers.context_forward(ops, cfg, ctx, towers.empty_state(cfg, 1, 32, torch_dtype, "cpu"), ids)
    assert torch.equal(logits, ref)
    block = torch.full((1, 8), cfg.mask_token_id)
    got = towers.denoise(ops, cfg, load_trtllm_checkpoint(out["denoiser"])[2], state, block, torch.tensor([1.0]))
    assert torch.equal(got, towers.denoise(ops, cfg, den, state, block, torch.tensor([1.0])))


def test_converted_file_layout(demo_dir, tmp_path):
    out = convert_checkpoint(demo_dir, tmp_path / "trt", show_progress=False)
    meta = json.loads((out["denoiser"] / "config.json").read_text())
    assert meta["architecture"] == "TwoTowerDenoiser" and meta["dtype"] == "bfloat16"
    assert {"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "hidden_act", "mapping"} <= set(meta)
    reader = CheckpointReader(out["context"])
    assert reader.shape("layers.2.experts_up") == (8, 32, 64)  # stacked [E, I, H]
    assert reader.shape("layers.0.conv_weight") == (128, 4)
    assert CheckpointReader(out["denoiser"]).shape("layers.7.scale_shift") == (3, 64)  # one table per layer
    assert not list(tmp_path.glob(".trt.*")), "temp dir left behind"


def test_existing_output_and_bad_checkpoint(demo_dir, tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="exists"):
        convert_checkpoint(demo_dir, tmp_path / "taken", show_progress=False)
    with pytest.raises(ValueError, match="dtype"):
        convert_checkpoint(demo_dir, tmp_path / "x", dtype="int8", show_progress=False)
    assert not (tmp_path / "x").exists()


def test_build_engine_cli_without_tensorrt(demo_dir, tmp_path):
    out = tmp_path / "engines_out"
    run = subprocess.run([sys.executable, str(ROOT / "build_engine.py"), "--checkpoint", str(demo_dir),
                          "--output-dir", str(out), "--no-progress", "--max-seq-len", "512", "--max-input-len", "256"],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert "build the engines with" in run.stdout and "(TensorRT-LLM 1.2 and a GPU)" in run.stdout
    commands = [line.split() for line in (out / "trtllm_build.sh").read_text().splitlines()
                if line.startswith("trtllm-build")]
    assert [c[c.index("--model_cls_name") + 1] for c in commands] == ["TwoTowerContextForCausalLM", "TwoTowerDenoiser"]
    for c in commands:  # the flags the model needs, and an entry file that exists
        assert Path(c[c.index("--model_cls_file") + 1]).is_file()
        assert c[c.index("--remove_input_padding") + 1] == "disable" and c[c.index("--max_seq_len") + 1] == "512"
        assert (Path(c[c.index("--checkpoint_dir") + 1]) / "rank0.safetensors").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["engines"] == {"context": "engines/context", "denoiser": "engines/denoiser"}
    assert manifest["built_with"] is None and manifest["limits"]["max_seq_len"] == 512
    plan = json.loads((out / "build_plan.json").read_text())
    assert set(plan["towers"]) == {"context", "denoiser"}
    assert (out / "trtllm_checkpoint" / "context" / "rank0.safetensors").is_file()
    again = subprocess.run([sys.executable, str(ROOT / "build_engine.py"), "--checkpoint", str(demo_dir),
                            "--output-dir", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert again.returncode == 2 and "exists" in again.stderr
    bad = subprocess.run([sys.executable, str(ROOT / "build_engine.py"), "--checkpoint", str(tmp_path / "none"),
                          "--output-dir", str(tmp_path / "o2")], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "config.json: not found" in bad.stderr
    inspect = subprocess.run([sys.executable, str(ROOT / "build_engine.py"), "--inspect", str(out)],
                             capture_output=True, text=True, cwd=ROOT)
    assert inspect.returncode == 2 and "polygraphy" in inspect.stderr


def test_real_model_build_plan(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(REAL_CONFIG))
    run = subprocess.run([sys.executable, str(ROOT / "build_engine.py"), "--plan-only", "--config",
                          str(tmp_path / "config.json"), "--output-dir", str(tmp_path), "--max-batch-size", "8",
                          "--max-seq-len", "8192"], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    plan = json.loads((tmp_path / "build_plan.json").read_text())
    for tower in ("context", "denoiser"):
        assert abs(plan["towers"][tower]["weight_bytes"] / 1e9 - 63.2) < 0.2  # spec §1: 31.58 B params, bf16
    layouts = {m["layout"]: m for m in plan["memory"]}
    two = layouts["two 80 GB GPUs: context on cuda:0, denoiser on cuda:1"]
    assert two["fits"] and all(55 < g < 78 for g in two["devices_gib"].values())  # 63.2 GB = 58.9 GiB of weights
    assert layouts["both towers on one 141 GB GPU (H200)"]["fits"]
    io = {s.name: s for s in engine_io(config_from_dict(REAL_CONFIG), "context")}
    assert io["past_key_5"].dims == ("batch", "max_seq_len", 2, 128)
    assert io["past_ssm_state_0"].dims == ("batch", 64, 64, 128) and io["past_ssm_state_0"].dtype == "float32"
    assert io["new_key_42"].dims == ("batch", "tokens", 2, 128) and "present_key_42" not in io  # appended by the runtime
    assert "timestep" not in io and "past_conv_state_50" in io


def test_bad_build_limits():
    with pytest.raises(ValueError, match="max_input_len: 9000 exceeds max_seq_len 8192"):
        BuildLimits(8, 9000, 8192, 16).check()
    with pytest.raises(ValueError, match="max_batch_size"):
        BuildLimits(0, 16, 32, 16).check()


def test_trt_op_table_covers_every_op_the_towers_run(all_kinds_dir):
    """Every op the torch backend executes for both towers has a TensorRT mapping, and the two
    tables are the same interface."""
    trace: set = set()
    cfg, ctx, den = load_towers(all_kinds_dir)
    ops = TorchOps(torch.float32, trace=trace)
    ids = torch.randint(4, cfg.vocab_size, (1, 9), generator=torch.Generator().manual_seed(0))
    _, state = towers.context_forward(ops, cfg, ctx, towers.empty_state(cfg, 1, 24, torch.float32, "cpu"), ids)
    towers.denoise(ops, cfg, den, state, torch.full((1, 4), cfg.mask_token_id), torch.tensor([1.0]))
    assert trace == set(ops_module.OP_NAMES)  # the interface is exactly what the towers use
    trt_methods = {m for m in vars(TrtOps) if not m.startswith("_")}
    assert trt_methods == set(ops_module.OP_NAMES)


def test_module_tree_names_equal_the_checkpoint_keys(demo_dir, all_kinds_dir):
    """The TensorRT-LLM module tree is built from ``module_tree``; joined as upstream's
    Module.named_parameters joins names, it gives exactly the converter's parameter names."""
    from trtllm_twotower.checkpoint import TWOTOWER
    from trtllm_twotower.config import load_config
    from trtllm_twotower.convert import module_tree, trtllm_params, tree_names

    for directory in (demo_dir, all_kinds_dir):
        cfg = load_config(directory)
        for tower in ("context", "denoiser"):
            params = trtllm_params(cfg, TWOTOWER, tower, torch.bfloat16)
            tree = module_tree(params)
            assert sorted(tree_names(tree)) == sorted(p.name for p in params)
            assert len(tree["layers"]) == cfg.num_layers
            assert all("." not in name for layer in tree["layers"] for name in layer)  # attribute names


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # load_module: what trtllm-build calls
def test_trtllm_build_entry_file_uses_absolute_imports_only():
    """trtllm-build loads --model_cls_file with SourceFileLoader('models', path): a module without a
    package, so a relative import would fail there. Without TensorRT-LLM it stops with its own message."""
    import ast
    from importlib.machinery import SourceFileLoader

    entry = ROOT / "trtllm_twotower" / "trtllm_build_entry.py"
    tree = ast.parse(entry.read_text())
    assert all(node.level == 0 for node in ast.walk(tree) if isinstance(node, ast.ImportFrom))
    with pytest.raises(ImportError, match="TensorRT-LLM 1.2 is not installed"):
        SourceFileLoader("models", str(entry)).load_module()



def test_a_checkpoint_without_conv_bias_converts_with_zero_biases(tmp_path):
    """use_conv_bias: false (the converter used to leave conv_bias out, and the TensorRT network's
    Mamba layer reads it): every Mamba layer gets a zero bias, as the torch loader gives it."""
    from trtllm_twotower.demo import write_demo_checkpoint

    ckpt = write_demo_checkpoint(tmp_path / "nobias", seed=3, use_conv_bias=False)
    out = convert_checkpoint(ckpt, tmp_path / "trtllm", show_progress=False)
    for tower, directory in out.items():
        cfg, _, weights = load_trtllm_checkpoint(directory)
        for i in cfg.layers_of("M"):
            assert torch.equal(weights["layers"][i]["conv_bias"], torch.zeros(cfg.conv_dim, dtype=torch.bfloat16))
    cfg, ctx, _ = load_towers(ckpt, torch.bfloat16)
    _, _, converted = load_trtllm_checkpoint(out["context"])
    state = towers.empty_state(cfg, 1, 8, torch.bfloat16, "cpu")
    ids = torch.tensor([[5, 9, 13]])
    ops = TorchOps(torch.bfloat16)
    ref, _ = towers.context_forward(ops, cfg, ctx, state, ids)
    got, _ = towers.context_forward(ops, cfg, converted, towers.empty_state(cfg, 1, 8, torch.bfloat16, "cpu"), ids)
    assert torch.equal(got, ref)
