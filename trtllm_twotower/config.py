"""TwoTowerConfig: the model's sizes, read once from a checkpoint's ``config.json``.

Accepts the official NemotronH form (``hybrid_override_pattern``) and the transformers-5 form
(``layers_block_type``). Every inconsistency raises one ``ConfigError`` that names the field.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

# One character per layer, as in NemotronH's hybrid_override_pattern.
MAMBA, ATTENTION, MOE, MLP = "M", "*", "E", "-"
LAYER_CHARS = (MAMBA, ATTENTION, MOE, MLP)
# transformers 5.x names (R5) and the remote code's names (R3) for the same four kinds.
_BLOCK_TYPE_TO_CHAR = {
    "linear_attention": MAMBA, "mamba": MAMBA,
    "full_attention": ATTENTION, "attention": ATTENTION,
    "moe": MOE,
    "mlp": MLP,
}


class ConfigError(ValueError):
    """A config.json that cannot describe this model; the message names the field."""


@dataclass(frozen=True)
class TwoTowerConfig:
    """Sizes of one tower (both towers share them) plus the denoiser's extras."""

    layer_pattern: str  # one char per layer: M Mamba2, * attention, E MoE, - dense MLP
    hidden_size: int
    vocab_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    mamba_num_heads: int
    mamba_head_dim: int
    ssm_state_size: int
    n_groups: int
    conv_kernel: int
    chunk_size: int
    n_routed_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    moe_shared_expert_intermediate_size: int
    n_shared_experts: int
    routed_scaling_factor: float
    norm_topk_prob: bool
    intermediate_size: int  # dense MLP ('-') width; the real model has no such layer
    layer_norm_epsilon: float
    use_conv_bias: bool
    tie_word_embeddings: bool
    pad_token_id: int
    bos_token_id: int
    eos_token_id: int
    # Not in the official config.json: R2's default and R4's README use 3.
    mask_token_id: int = 3
    # PixArt-alpha's t_embedder input width; fixed at 256 in R1/R4 (t_embedder.mlp.0 is [H, 256]).
    time_embedding_dim: int = 256
    # NoPE: the real config carries 262144 but nothing reads positions; bounds the runtime's caches.
    max_position_embeddings: int = 262144

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layer_pattern)

    @property
    def d_inner(self) -> int:
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def conv_dim(self) -> int:
        """Channels of the depthwise conv: x ‖ B ‖ C."""
        return self.d_inner + 2 * self.n_groups * self.ssm_state_size

    @property
    def in_proj_dim(self) -> int:
        """Rows of the Mamba in_proj: z ‖ xBC ‖ dt."""
        return self.d_inner + self.conv_dim + self.mamba_num_heads

    def layers_of(self, char: str) -> list[int]:
        return [i for i, c in enumerate(self.layer_pattern) if c == char]

    def to_dict(self) -> dict[str, Any]:
        """The official config.json form: ``config_from_dict(cfg.to_dict()) == cfg``."""
        raw = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "layer_pattern"}
        return {"hybrid_override_pattern": self.layer_pattern, "num_hidden_layers": self.num_layers, **raw}


_REQUIRED_INT = (
    "hidden_size", "vocab_size", "num_attention_heads", "mamba_num_heads", "mamba_head_dim",
    "ssm_state_size", "n_groups", "conv_kernel", "n_routed_experts", "num_experts_per_tok",
    "moe_intermediate_size", "moe_shared_expert_intermediate_size",
)


def _layer_pattern(raw: dict[str, Any]) -> str:
    if "hybrid_override_pattern" in raw and raw["hybrid_override_pattern"] is not None:
        pattern = raw["hybrid_override_pattern"]
        if not isinstance(pattern, str) or not pattern:
            raise ConfigError(f"hybrid_override_pattern: expected a non-empty string, got {pattern!r}")
        for i, c in enumerate(pattern):
            if c not in LAYER_CHARS:
                raise ConfigError(
                    f"hybrid_override_pattern: unknown layer type {c!r} at layer {i} (known: M * E -)"
                )
    elif "layers_block_type" in raw:
        types = raw["layers_block_type"]
        if not isinstance(types, list) or not types:
            raise ConfigError(f"layers_block_type: expected a non-empty list, got {types!r}")
        chars = []
        for i, t in enumerate(types):
            if t not in _BLOCK_TYPE_TO_CHAR:
                raise ConfigError(
                    f"layers_block_type: unknown layer type {t!r} at layer {i} "
                    f"(known: {sorted(_BLOCK_TYPE_TO_CHAR)})"
                )
            chars.append(_BLOCK_TYPE_TO_CHAR[t])
        pattern = "".join(chars)
    else:
        raise ConfigError("hybrid_override_pattern: missing (neither it nor layers_block_type is present)")
    declared = raw.get("num_hidden_layers")
    if declared is not None and declared != len(pattern):
        raise ConfigError(
            f"num_hidden_layers: {declared} does not match the layer pattern's {len(pattern)} layers"
        )
    return pattern


def _int(raw: dict[str, Any], name: str, default: int | None = None) -> int:
    value = raw.get(name, default)
    if value is None:
        raise ConfigError(f"{name}: missing")
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    if value < 0:
        raise ConfigError(f"{name}: must be >= 0, got {value}")
    return value


def _float(raw: dict[str, Any], name: str, default: float) -> float:
    value = raw.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name}: expected a finite number, got {value!r}")
    return float(value)


def _bool(raw: dict[str, Any], name: str, default: bool) -> bool:
    value = raw.get(name, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    return value


def _token_id(raw: dict[str, Any], name: str, default: int) -> int:
    value = raw.get(name, default)
    if isinstance(value, list):  # instruct configs list several eos ids; the first is the tokenizer's
        if not value:
            raise ConfigError(f"{name}: empty list")
        value = value[0]
    return _int({name: value}, name)


def config_from_dict(raw: dict[str, Any]) -> TwoTowerConfig:
    """Build and validate the config from a parsed config.json (official or transformers-5 form)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a JSON object, got {type(raw).__name__}")
    pattern = _layer_pattern(raw)
    for name in _REQUIRED_INT:
        _int(raw, name)
    heads = _int(raw, "num_attention_heads")
    hidden = _int(raw, "hidden_size")
    cfg = TwoTowerConfig(
        layer_pattern=pattern,
        hidden_size=hidden,
        vocab_size=_int(raw, "vocab_size"),
        num_attention_heads=heads,
        num_key_value_heads=_int(raw, "num_key_value_heads", heads),
        head_dim=_int(raw, "head_dim", hidden // heads if heads else None),
        mamba_num_heads=_int(raw, "mamba_num_heads"),
        mamba_head_dim=_int(raw, "mamba_head_dim"),
        ssm_state_size=_int(raw, "ssm_state_size"),
        n_groups=_int(raw, "n_groups"),
        conv_kernel=_int(raw, "conv_kernel"),
        chunk_size=_int(raw, "chunk_size", 128),
        n_routed_experts=_int(raw, "n_routed_experts"),
        num_experts_per_tok=_int(raw, "num_experts_per_tok"),
        moe_intermediate_size=_int(raw, "moe_intermediate_size"),
        moe_shared_expert_intermediate_size=_int(raw, "moe_shared_expert_intermediate_size"),
        n_shared_experts=_int(raw, "n_shared_experts", 1),
        routed_scaling_factor=_float(raw, "routed_scaling_factor", 1.0),
        norm_topk_prob=_bool(raw, "norm_topk_prob", True),
        intermediate_size=_int(raw, "intermediate_size", 0),
        layer_norm_epsilon=_float(raw, "layer_norm_epsilon", 1e-5),
        use_conv_bias=_bool(raw, "use_conv_bias", True),
        tie_word_embeddings=_bool(raw, "tie_word_embeddings", False),
        pad_token_id=_token_id(raw, "pad_token_id", 0),
        bos_token_id=_token_id(raw, "bos_token_id", 1),
        eos_token_id=_token_id(raw, "eos_token_id", 2),
        mask_token_id=_token_id(raw, "mask_token_id", 3),
        time_embedding_dim=_int(raw, "time_embedding_dim", 256),
        max_position_embeddings=_int(raw, "max_position_embeddings", 262144),
    )
    _validate(cfg, raw)
    return cfg


def _validate(cfg: TwoTowerConfig, raw: dict[str, Any]) -> None:
    def positive(name: str) -> None:
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"{name}: must be > 0, got {getattr(cfg, name)}")

    for name in ("hidden_size", "vocab_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                 "mamba_num_heads", "mamba_head_dim", "ssm_state_size", "n_groups", "conv_kernel",
                 "chunk_size", "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size",
                 "moe_shared_expert_intermediate_size"):
        positive(name)
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise ConfigError(
            f"num_key_value_heads: {cfg.num_attention_heads} attention heads are not divisible by "
            f"{cfg.num_key_value_heads} kv heads"
        )
    if cfg.mamba_num_heads % cfg.n_groups:
        raise ConfigError(f"n_groups: {cfg.mamba_num_heads} mamba heads are not divisible by {cfg.n_groups} groups")
    if cfg.d_inner % cfg.n_groups:
        raise ConfigError(f"n_groups: d_inner {cfg.d_inner} is not divisible by {cfg.n_groups} groups")
    if cfg.num_experts_per_tok > cfg.n_routed_experts:
        raise ConfigError(
            f"num_experts_per_tok: {cfg.num_experts_per_tok} exceeds n_routed_experts {cfg.n_routed_experts}"
        )
    if cfg.n_shared_experts not in (0, 1):
        raise ConfigError(f"n_shared_experts: only 0 or 1 supported, got {cfg.n_shared_experts}")
    if MLP in cfg.layer_pattern and cfg.intermediate_size <= 0:
        raise ConfigError("intermediate_size: required (> 0) when the pattern has dense MLP ('-') layers")
    if cfg.tie_word_embeddings:
        raise ConfigError("tie_word_embeddings: TwoTower towers have their own heads; true is not supported")
    if cfg.time_embedding_dim % 2:
        raise ConfigError(f"time_embedding_dim: must be even, got {cfg.time_embedding_dim}")
    if not (cfg.layer_norm_epsilon > 0 and math.isfinite(cfg.layer_norm_epsilon)):
        raise ConfigError(f"layer_norm_epsilon: must be a positive number, got {cfg.layer_norm_epsilon}")
    if raw.get("mamba_hidden_act", "silu") != "silu":
        raise ConfigError(f"mamba_hidden_act: only 'silu' is supported, got {raw['mamba_hidden_act']!r}")
    if raw.get("mlp_hidden_act", "relu2") != "relu2":
        raise ConfigError(f"mlp_hidden_act: only 'relu2' is supported, got {raw['mlp_hidden_act']!r}")
    if raw.get("attention_bias", False) or raw.get("mlp_bias", False) or raw.get("use_bias", False):
        raise ConfigError("attention_bias/mlp_bias/use_bias: biases are not part of this model; must be false")
    if raw.get("residual_in_fp32", False):
        raise ConfigError("residual_in_fp32: the residual stream of this model is bf16; true is not supported")
    if raw.get("moe_latent_size") is not None:
        raise ConfigError("moe_latent_size: latent MoE projections are not part of this model; must be null")
    limit = raw.get("time_step_limit", [0.0, float("inf")])
    if limit is not None and (not isinstance(limit, (list, tuple)) or len(limit) != 2 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in limit)):
        raise ConfigError(f"time_step_limit: expected [min, max], got {limit!r}")
    if limit is not None and (float(limit[0]) != 0.0 or float(limit[1]) != float("inf")):
        # R3 clamps dt only when the limit differs from (0, inf); no released TwoTower config does.
        raise ConfigError(f"time_step_limit: only the no-op (0.0, inf) is supported, got {limit!r}")
    for name in ("mask_token_id", "eos_token_id"):
        if getattr(cfg, name) >= cfg.vocab_size:
            raise ConfigError(f"{name}: {getattr(cfg, name)} is outside the vocabulary of {cfg.vocab_size}")
    if cfg.mask_token_id == cfg.eos_token_id:
        raise ConfigError(f"mask_token_id: equals eos_token_id ({cfg.eos_token_id})")


def config_file(path: str | Path) -> Path:
    """The ``config.json`` of a checkpoint directory, or ``path`` itself when it is the file."""
    path = Path(path)
    return path / "config.json" if path.is_dir() else path


def load_config(path: str | Path) -> TwoTowerConfig:
    """Read ``config.json`` from a checkpoint directory (or the file itself)."""
    file = config_file(path)
    if not file.is_file():
        raise ConfigError(f"config.json: not found at {file}")
    try:
        raw = json.loads(file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{file}: not UTF-8 ({err.reason} at byte {err.start})") from err
    except json.JSONDecodeError as err:
        raise ConfigError(f"{file}: not valid JSON ({err})") from err
    try:
        return config_from_dict(raw)
    except ConfigError as err:
        raise ConfigError(f"{file}: {err}") from None
