"""Config parsing and the lazy checkpoint reader: good inputs, every documented bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from trtllm_twotower.checkpoint import (CheckpointError, CheckpointReader, load_tower_weights, resolve_keys,
                                        write_safetensors)
from trtllm_twotower.config import ConfigError, config_from_dict, load_config
from trtllm_twotower.demo import DEMO_CONFIG, SPECIAL_TOKENS

REAL_PATTERN = "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"


def test_real_model_config_sizes():
    raw = json.loads((Path(__file__).resolve().parents[1] / "bench" / "real_config.json").read_text())
    assert raw["hybrid_override_pattern"] == REAL_PATTERN
    cfg = config_from_dict(raw)
    assert cfg.layers_of("*") == [5, 12, 19, 26, 33, 42]
    assert len(cfg.layers_of("M")) == 23 and len(cfg.layers_of("E")) == 23
    assert (cfg.d_inner, cfg.conv_dim, cfg.in_proj_dim) == (4096, 6144, 10304)


def test_transformers5_form_equals_official_form():
    official = config_from_dict(DEMO_CONFIG)
    names = {"M": "linear_attention", "*": "full_attention", "E": "moe", "-": "mlp"}
    hf5 = {k: v for k, v in DEMO_CONFIG.items() if k != "hybrid_override_pattern"}
    hf5["layers_block_type"] = [names[c] for c in DEMO_CONFIG["hybrid_override_pattern"]]
    assert config_from_dict(hf5) == official


@pytest.mark.parametrize("change, field", [
    ({"hybrid_override_pattern": "M*X"}, "hybrid_override_pattern: unknown layer type 'X' at layer 2"),
    ({"hybrid_override_pattern": None, "layers_block_type": ["moe", "rnn"]}, "layers_block_type: unknown layer type 'rnn' at layer 1"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"n_groups": 3}, "n_groups"),
    ({"num_hidden_layers": 9}, "num_hidden_layers"),
    ({"hidden_size": None}, "hidden_size: missing"),
    ({"ssm_state_size": "16"}, "ssm_state_size: expected an integer"),
    ({"num_experts_per_tok": 9}, "num_experts_per_tok"),
    ({"hybrid_override_pattern": "M*E-", "num_hidden_layers": 4, "intermediate_size": 0}, "intermediate_size"),
    ({"mask_token_id": 2}, "mask_token_id: equals eos_token_id"),
    ({"eos_token_id": 999}, "eos_token_id: 999 is outside the vocabulary"),
    ({"mlp_hidden_act": "gelu"}, "mlp_hidden_act"),
    ({"residual_in_fp32": True}, "residual_in_fp32"),
    ({"time_step_limit": [0.001, 1.0]}, "time_step_limit"),
])
def test_bad_config_names_the_field(change, field):
    raw = {**DEMO_CONFIG, **change}
    raw = {k: v for k, v in raw.items() if v is not None}
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw)
    assert field in str(err.value)


def test_missing_and_malformed_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config.json: not found"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path)


def test_sharded_reader_matches_written_tensors(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 5, generator=gen).to(torch.bfloat16), "b": torch.randn(7, generator=gen),
               "c": torch.randint(0, 9, (2, 2), generator=gen)}
    write_safetensors(tmp_path / "one.safetensors", tensors)
    reader = CheckpointReader(tmp_path)
    assert sorted(reader.keys()) == ["a", "b", "c"]
    for k, v in tensors.items():
        assert reader.shape(k) == tuple(v.shape) and torch.equal(reader.read(k), v)
    # the safetensors library reads our files
    from safetensors.torch import load_file
    assert torch.equal(load_file(tmp_path / "one.safetensors")["a"], tensors["a"])


def test_demo_checkpoint_layout_and_tokenizer(demo_dir):
    assert json.loads((demo_dir / "config.json").read_text())["architectures"] == ["NemotronHTwoTowerForCausalLM"]
    index = json.loads((demo_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3
    keys = set(index["weight_map"])
    for k in ("context_tower.embeddings.weight", "denoiser_tower.norm_f.weight", "context_lm_head.weight",
              "lm_head.weight", "t_embedder.mlp.0.weight", "t_block.1.bias", "scale_shift_tables.7",
              "context_tower.layers.2.mixer.experts.7.up_proj.weight", "denoiser_tower.layers.0.mixer.A_log"):
        assert k in keys
    size = sum(p.stat().st_size for p in demo_dir.glob("*.safetensors"))
    assert size < 8 * 2**20
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(demo_dir)
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.mask_token_id) == (0, 1, 2, 3)
    text = "Grüße, TwoTower! 123"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def _copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite_shard(directory: Path, mutate) -> None:
    """Apply ``mutate(dict of tensors)`` to every shard, keeping the index in sync."""
    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    reader = CheckpointReader(directory)
    shards = sorted(set(index["weight_map"].values()))
    new_map = {}
    for shard in shards:
        tensors = {k: reader.read(k) for k, s in index["weight_map"].items() if s == shard}
        mutate(tensors, shard)
        write_safetensors(directory / shard, tensors)
        new_map.update({k: shard for k in tensors})
    index["weight_map"] = new_map
    index_path.write_text(json.dumps(index))


def test_bad_checkpoint_reports_every_problem_at_once(demo_dir, tmp_path):
    bad = _copy_checkpoint(demo_dir, tmp_path / "bad")
    first = "model-00001-of-00003.safetensors"

    def mutate(tensors, shard):
        if shard != first:
            return
        del tensors["context_tower.embeddings.weight"]
        tensors["context_tower.layers.0.norm.weight"] = torch.ones(5, dtype=torch.bfloat16)
        tensors["context_tower.layers.0.mixer.bogus"] = torch.ones(2)

    _rewrite_shard(bad, mutate)
    cfg = load_config(bad)
    with pytest.raises(CheckpointError) as err:
        resolve_keys(CheckpointReader(bad), cfg, ("context", "denoiser"))
    msg = str(err.value)
    assert "missing tensors (1): context_tower.embeddings.weight" in msg
    assert "context_tower.layers.0.norm.weight: expected [64], found [5]" in msg
    assert "unexpected tensors (1): context_tower.layers.0.mixer.bogus" in msg


def test_missing_shard_and_truncated_file(demo_dir, tmp_path):
    bad = _copy_checkpoint(demo_dir, tmp_path / "noshard")
    (bad / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shard files not found: model-00002-of-00003.safetensors"):
        CheckpointReader(bad)
    cut = _copy_checkpoint(demo_dir, tmp_path / "cut")
    shard = cut / "model-00003-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"model-00003-of-00003.safetensors: the tensors cover \d+ bytes of data; the file holds"):
        CheckpointReader(cut)


def test_nano_layout_and_embedding_alias(demo_dir, tmp_path):
    """A single-tower Nano checkpoint (backbone.* + lm_head, stray 'embedding.' name) loads as the
    context tower and equals the TwoTower context tower tensor for tensor."""
    src = CheckpointReader(demo_dir)
    nano = {}
    for k in src.keys():
        if k.startswith("context_tower."):
            name = "backbone." + k[len("context_tower."):]
            nano[name.replace("embeddings.weight", "embedding.weight")] = src.read(k)
        elif k == "context_lm_head.weight":
            nano["lm_head.weight"] = src.read(k)
    (tmp_path / "nano").mkdir()
    write_safetensors(tmp_path / "nano" / "model.safetensors", nano)
    shutil.copy(demo_dir / "config.json", tmp_path / "nano" / "config.json")
    cfg = load_config(demo_dir)
    reader = CheckpointReader(tmp_path / "nano")
    layout, _ = resolve_keys(reader, cfg, ("context", "denoiser"))
    assert layout == "nano"
    a = load_tower_weights(reader, cfg, "context", torch.float32)
    b = load_tower_weights(src, cfg, "context", torch.float32)
    assert torch.equal(a["embeddings"], b["embeddings"]) and torch.equal(a["lm_head"], b["lm_head"])
    assert torch.equal(a["layers"][2]["experts_up"], b["layers"][2]["experts_up"])
    with pytest.raises(CheckpointError, match="no denoiser tower"):
        load_tower_weights(reader, cfg, "denoiser", torch.float32)


def test_loading_peak_memory_is_bounded_by_a_few_tensors(tmp_path):
    """Read a 384 MB synthetic checkpoint tensor by tensor in a fresh process: the peak RSS grows by
    a few tensors (16 MB each), not by the checkpoint."""
    n, numel = 24, 4 * 2**20  # 24 x 16 MB fp32
    for s in range(2):
        write_safetensors(tmp_path / f"shard{s}.safetensors",
                          {f"t{s}_{i}": torch.full((numel,), float(i)) for i in range(n // 2)})
    script = textwrap.dedent(f"""
        import resource, sys, torch
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        from trtllm_twotower.checkpoint import CheckpointReader
        reader = CheckpointReader({str(tmp_path)!r})
        torch.zeros(1) + 1
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        total = 0.0
        for k in reader.keys():
            total += float(reader.read(k)[0])
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((after - before) * 1024, total)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    grown, total = out.stdout.split()
    assert float(total) == 2 * sum(range(n // 2))
    checkpoint_bytes = n * numel * 4
    assert int(grown) < 4 * numel * 4, f"peak RSS grew {int(grown) / 2**20:.0f} MB reading {checkpoint_bytes / 2**20:.0f} MB"
