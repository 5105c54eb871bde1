"""A tiny, seeded TwoTower checkpoint in the official layout, for the demo and the tests.

Same file set as the real model: ``config.json`` (architectures NemotronHTwoTowerForCausalLM,
hybrid_override_pattern), sharded safetensors + ``model.safetensors.index.json`` and a tokenizer that
``transformers.AutoTokenizer`` loads (byte-level, ids pad 0 / bos 1 / eos 2 / mask 3). Random weights
are drawn at realistic scales (A_log, dt_bias and D as Mamba2 initialises them) so the numerics
exercise the same paths as the real model.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from .checkpoint import CONTEXT, DENOISER, TWOTOWER, tower_tensor_specs, write_safetensors
from .config import config_from_dict
from .fsutil import atomic_directory

DEMO_CONFIG = {
    "architectures": ["NemotronHTwoTowerForCausalLM"],
    "model_type": "nemotron_h",
    "hybrid_override_pattern": "M*EME*ME",
    "num_hidden_layers": 8,
    "hidden_size": 64,
    "vocab_size": 260,  # 4 special tokens + 256 byte tokens
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "attention_bias": False,
    "mamba_num_heads": 8,
    "mamba_head_dim": 8,
    "ssm_state_size": 16,
    "n_groups": 2,
    "conv_kernel": 4,
    "chunk_size": 8,
    "expand": 2,
    "use_conv_bias": True,
    "mamba_hidden_act": "silu",
    "mamba_proj_bias": False,
    "use_bias": False,
    "time_step_min": 0.001,
    "time_step_max": 0.1,
    "time_step_floor": 1e-4,
    "mamba_ssm_cache_dtype": "float32",
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "n_shared_experts": 1,
    "moe_shared_expert_intermediate_size": 48,
    "n_group": 1,
    "topk_group": 1,
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.5,
    "intermediate_size": 96,
    "mlp_hidden_act": "relu2",
    "mlp_bias": False,
    "layer_norm_epsilon": 1e-5,
    "residual_in_fp32": False,
    "tie_word_embeddings": False,
    "max_position_embeddings": 4096,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "bfloat16",
}
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<mask>"]  # ids 0..3


def init_tensor(key: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """A random value at the scale the real layer has (fp32 on the generator's device; the caller casts)."""
    device = gen.device

    def uniform(lo, hi):
        return lo + (hi - lo) * torch.rand(shape, generator=gen, device=device)

    def normal():
        return torch.randn(shape, generator=gen, device=device)

    if key.endswith("A_log"):
        return torch.log(uniform(1.0, 16.0))
    if key.endswith("dt_bias"):  # inverse softplus of dt ~ logU[1e-3, 1e-1], as Mamba2 initialises it
        dt = torch.exp(uniform(math.log(1e-3), math.log(1e-1)))
        return dt + torch.log(-torch.expm1(-dt))
    if key.endswith(".D"):
        return uniform(0.5, 1.5)
    if key.endswith("e_score_correction_bias"):
        return 0.01 * normal()
    if key.endswith("norm.weight") or key.endswith("norm_f.weight"):
        return 1.0 + 0.1 * normal()
    if key.startswith("scale_shift_tables"):
        return normal() / math.sqrt(shape[-1])
    if key.endswith("bias"):
        return 0.02 * normal()
    if key.endswith("embeddings.weight"):
        return normal()
    fan_in = shape[-1]
    return normal() / math.sqrt(fan_in)


def demo_tensors(cfg, seed: int) -> dict[str, torch.Tensor]:
    """Every tensor of a TwoTower checkpoint for ``cfg``, bf16 except the fp32 ones (as in Nano)."""
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for tower in (CONTEXT, DENOISER):
        for spec in tower_tensor_specs(cfg, TWOTOWER, tower):
            if spec.key in tensors:
                continue
            value = init_tensor(spec.key, spec.shape, gen)
            tensors[spec.key] = value if spec.fp32 else value.to(torch.bfloat16)
    return tensors


def write_tokenizer(directory: Path) -> None:
    """A byte-level BPE tokenizer (no merges): any text encodes, any id in the vocabulary decodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "mask_token": "<mask>",
        "model_max_length": DEMO_CONFIG["max_position_embeddings"],
    }, indent=2))


def write_checkpoint(directory: str | Path, raw_config: dict, tensors: dict[str, torch.Tensor],
                     num_shards: int = 3, with_tokenizer: bool = True, extra_files: dict[str, bytes] | None = None) -> Path:
    """Write config + sharded safetensors + index (+ tokenizer, + ``extra_files`` by name) atomically:
    a temp dir, then rename."""
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        (tmp / "config.json").write_text(json.dumps(raw_config, indent=2))
        names = list(tensors)
        per_shard = math.ceil(len(names) / num_shards)
        weight_map = {}
        for s in range(num_shards):
            shard = f"model-{s + 1:05d}-of-{num_shards:05d}.safetensors"
            chunk = {n: tensors[n] for n in names[s * per_shard : (s + 1) * per_shard]}
            write_safetensors(tmp / shard, chunk, metadata={"format": "pt"})
            weight_map.update({n: shard for n in chunk})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        if with_tokenizer:
            write_tokenizer(tmp)
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
    return directory


def write_demo_checkpoint(directory: str | Path, seed: int = 0, **overrides) -> Path:
    """The tiny demo checkpoint (``overrides`` change config.json fields, e.g. the pattern)."""
    raw = {**DEMO_CONFIG, **overrides}
    if "hybrid_override_pattern" in overrides and "num_hidden_layers" not in overrides:
        raw["num_hidden_layers"] = len(raw["hybrid_override_pattern"])
    cfg = config_from_dict(raw)
    return write_checkpoint(directory, raw, demo_tensors(cfg, seed))


def default_demo_dir() -> Path:
    """Where the demo checkpoint lives when none is given: $TWOTOWER_DEMO_DIR or ~/.cache."""
    env = os.environ.get("TWOTOWER_DEMO_DIR")
    return Path(env) if env else Path.home() / ".cache" / "trtllm_twotower" / "demo_checkpoint"


TRAINED_DEMO_DIR = Path(__file__).resolve().parent / "demo_model"


def default_checkpoint() -> Path:
    """The checkpoint used when none is given: the shipped trained demo model (``demo_model/``,
    see its TRAINING.md), else the random demo checkpoint."""
    if (TRAINED_DEMO_DIR / "model.safetensors.index.json").is_file():
        return TRAINED_DEMO_DIR
    return ensure_demo_checkpoint()


def ensure_demo_checkpoint(directory: str | Path | None = None) -> Path:
    """Generate the demo checkpoint on first use; reuse it afterwards."""
    directory = Path(directory) if directory else default_demo_dir()
    if not (directory / "model.safetensors.index.json").is_file():
        write_demo_checkpoint(directory)
    return directory
