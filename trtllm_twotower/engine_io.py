"""Engine inputs and outputs, named once for the builder (``network/trt.py``) and the TensorRT
executor (``runtime/trt_executor.py``), and the build plan (shapes, profiles, GPU memory).

Context engine: ``input_ids`` over ``past_*`` state -> ``new_key_{i}`` / ``new_value_{i}`` (the K/V of
the new tokens, which the runtime appends to its caches: the engine only reads ``past_key_{i}``),
``present_conv_state_{i}`` / ``present_ssm_state_{i}`` and the last token's logits.
Denoiser engine: a block over the context's state (read only) -> logits, plus the commit
quantities computed next to the head (``pred_ids``, ``confidence``: mask excluded, argmax, softmax
max at temperature 1), so greedy steps need not copy [B, L, V] fp32 logits.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from .checkpoint import CONTEXT, DENOISER
from .config import ATTENTION, MAMBA, TwoTowerConfig

BATCH, TOKENS, CACHE = "batch", "tokens", "max_seq_len"


@dataclass(frozen=True)
class IOSpec:
    name: str
    dtype: str  # "int32" | "float32" | compute dtype name
    dims: tuple  # ints, or the names BATCH / TOKENS (dynamic), or CACHE (static: max_seq_len)
    is_input: bool


@dataclass(frozen=True)
class BuildLimits:
    max_batch_size: int = 8
    max_input_len: int = 4096
    max_seq_len: int = 8192
    block_size: int = 16

    def check(self) -> None:
        for name, value in asdict(self).items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        if self.max_input_len > self.max_seq_len:
            raise ValueError(f"max_input_len: {self.max_input_len} exceeds max_seq_len {self.max_seq_len}")
        if self.block_size > self.max_input_len:
            raise ValueError(f"block_size: {self.block_size} exceeds max_input_len {self.max_input_len}")


def state_names(cfg: TwoTowerConfig) -> dict[str, list[tuple[int, str]]]:
    """(layer, engine input name) of every state tensor, by kind."""
    return {
        "key": [(i, f"past_key_{i}") for i in cfg.layers_of(ATTENTION)],
        "value": [(i, f"past_value_{i}") for i in cfg.layers_of(ATTENTION)],
        "conv": [(i, f"past_conv_state_{i}") for i in cfg.layers_of(MAMBA)],
        "ssm": [(i, f"past_ssm_state_{i}") for i in cfg.layers_of(MAMBA)],
    }


def engine_io(cfg: TwoTowerConfig, tower: str, dtype: str = "bfloat16") -> list[IOSpec]:
    """Every input and output of one tower's engine, in binding order."""
    kv = (BATCH, CACHE, cfg.num_key_value_heads, cfg.head_dim)
    conv = (BATCH, cfg.conv_dim, cfg.conv_kernel)
    ssm = (BATCH, cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.ssm_state_size)
    shapes = {"key": (kv, dtype), "value": (kv, dtype), "conv": (conv, dtype), "ssm": (ssm, "float32")}
    io = [IOSpec("input_ids", "int32", (BATCH, TOKENS), True), IOSpec("cache_lens", "int32", (BATCH,), True)]
    if tower == DENOISER:
        io.append(IOSpec("timestep", "float32", (BATCH,), True))  # masked fraction of each row's block
    names = state_names(cfg)
    for kind, entries in names.items():
        dims, dt = shapes[kind]
        io += [IOSpec(name, dt, dims, True) for _, name in entries]
    if tower == CONTEXT:
        io.append(IOSpec("last_logits", "float32", (BATCH, cfg.vocab_size), False))
        new_kv = (BATCH, TOKENS, cfg.num_key_value_heads, cfg.head_dim)
        for kind, entries in names.items():
            dims, dt = shapes[kind]
            if kind in ("key", "value"):
                io += [IOSpec(name.replace("past_", "new_"), dt, new_kv, False) for _, name in entries]
            else:
                io += [IOSpec(name.replace("past_", "present_"), dt, dims, False) for _, name in entries]
    else:
        io += [IOSpec("logits", "float32", (BATCH, TOKENS, cfg.vocab_size), False),
               IOSpec("pred_ids", "int32", (BATCH, TOKENS), False),
               IOSpec("confidence", "float32", (BATCH, TOKENS), False)]
    return io


def profiles(tower: str, limits: BuildLimits) -> list[dict[str, tuple[int, int, int]]]:
    """Optimisation profiles as {dynamic dim: (min, opt, max)}: the context engine has a prefill
    profile and a step profile (one token or one block); the denoiser only runs blocks."""
    batch = (1, max(1, limits.max_batch_size // 2), limits.max_batch_size)
    step = {BATCH: batch, TOKENS: (1, limits.block_size, limits.block_size)}
    if tower == DENOISER:
        return [step]
    prefill = {BATCH: (1, 1, limits.max_batch_size), TOKENS: (1, limits.max_input_len // 2, limits.max_input_len)}
    return [prefill, step]


# ---- memory -----------------------------------------------------------------------------------

def _dtype_bytes(dtype: str) -> int:
    return {"bfloat16": 2, "float16": 2, "float32": 4, "int32": 4}[dtype]


def state_bytes_per_row(cfg: TwoTowerConfig, max_seq_len: int, dtype: str = "bfloat16", trace_len: int = 0) -> int:
    """K/V buffers of max_seq_len plus conv and fp32 SSM states, for one sequence of one tower; with
    ``trace_len``, also the per-position states of an extend of that many tokens (speculative mode)."""
    act = _dtype_bytes(dtype)
    kv = len(cfg.layers_of(ATTENTION)) * 2 * max_seq_len * cfg.num_key_value_heads * cfg.head_dim * act
    per_layer = cfg.conv_dim * cfg.conv_kernel * act + cfg.mamba_num_heads * cfg.mamba_head_dim * cfg.ssm_state_size * 4
    return kv + len(cfg.layers_of(MAMBA)) * per_layer * (1 + (trace_len + 1 if trace_len else 0))


def activation_bytes(cfg: TwoTowerConfig, tower: str, limits: BuildLimits, dtype: str = "bfloat16") -> int:
    """A coarse bound on the largest live activations: the widest per-token tensors of a prefill
    (Mamba in_proj, MoE intermediates) and, for the denoiser, fp32 logits of a batch of blocks."""
    act = _dtype_bytes(dtype)
    tokens = limits.max_batch_size * (limits.max_input_len if tower == CONTEXT else limits.block_size)
    per_token = (cfg.in_proj_dim + cfg.conv_dim + cfg.num_experts_per_tok * cfg.moe_intermediate_size
                 + cfg.moe_shared_expert_intermediate_size + 4 * cfg.hidden_size) * act
    logits = limits.max_batch_size * limits.block_size * cfg.vocab_size * 4 if tower == DENOISER else \
        limits.max_batch_size * cfg.vocab_size * 4
    return tokens * per_token + logits


def memory_plan(cfg: TwoTowerConfig, weight_bytes: dict[str, int], limits: BuildLimits,
                dtype: str = "bfloat16") -> list[dict]:
    """Estimated GPU memory of the three deployments: one tower per 80 GB GPU, both towers on one
    141 GB GPU, and the context tower alone (AR) on one 80 GB GPU. The denoiser device also holds
    a mirror of the context state. Capacities are what the CUDA context leaves usable (measured on
    this project's lent H100 / H200: about 78 and 139 GiB)."""
    gib = 2**30
    state = limits.max_batch_size * state_bytes_per_row(cfg, limits.max_seq_len, dtype)
    ctx = weight_bytes[CONTEXT] + state + activation_bytes(cfg, CONTEXT, limits, dtype)
    den = (weight_bytes.get(DENOISER, 0) + state + activation_bytes(cfg, DENOISER, limits, dtype)
           if DENOISER in weight_bytes else 0)
    h100, h200 = 78 * gib, 139 * gib
    plans = [{"layout": "context tower alone (AR) on one 80 GB GPU", "devices": {"cuda:0": ctx}, "capacity": h100}]
    if DENOISER in weight_bytes:
        plans += [
            {"layout": "two 80 GB GPUs: context on cuda:0, denoiser on cuda:1",
             "devices": {"cuda:0": ctx, "cuda:1": den}, "capacity": h100},
            {"layout": "both towers on one 141 GB GPU (H200)", "devices": {"cuda:0": ctx + den - state},
             "capacity": h200},
        ]
    for plan in plans:
        plan["devices_gib"] = {d: round(b / gib, 2) for d, b in plan["devices"].items()}
        plan["capacity_gib"] = plan.pop("capacity") / gib
        plan["fits"] = all(b <= plan["capacity_gib"] for b in plan["devices_gib"].values())
    return plans


# ---- engines on disk ----------------------------------------------------------------------------

# trtllm-build flags of both engines: padded [batch, tokens] inputs, and no TensorRT-LLM KV cache (the
# model keeps its own caches and runs its own attention plugin).
TRTLLM_BUILD_FLAGS = ("--remove_input_padding", "disable", "--kv_cache_type", "disabled")


class EngineMismatchError(ValueError):
    """Engines built for another config, or missing."""


def config_hash(twotower_config: dict) -> str:
    return hashlib.sha256(json.dumps(twotower_config, sort_keys=True).encode()).hexdigest()


def write_manifest(out_dir: Path, cfg: TwoTowerConfig, limits: BuildLimits, towers: list[str],
                   built_with: dict | None = None) -> None:
    """``manifest.json``: which config and limits the engines under ``engines/{tower}`` are for, and
    (after a Python-API build) the TensorRT-LLM, TensorRT and plugin library that built them."""
    manifest = {"config_sha256": config_hash(cfg.to_dict()), "limits": asdict(limits),
                "engines": {t: f"engines/{t}" for t in towers}, "built_with": built_with}
    (Path(out_dir) / "manifest.json").write_text(json.dumps(manifest, indent=2))


def check_manifest(engine_dir: Path, cfg: TwoTowerConfig) -> dict:
    """Refuse engines built for another model config, or not built yet."""
    path = Path(engine_dir) / "manifest.json"
    if not path.is_file():
        raise EngineMismatchError(f"{engine_dir}: no manifest.json (build with build_engine.py)")
    manifest = json.loads(path.read_text())
    if manifest.get("config_sha256") != config_hash(cfg.to_dict()):
        raise EngineMismatchError(f"{engine_dir}: engines were built for another config.json than the checkpoint's")
    missing = [t for t in (CONTEXT, DENOISER) if t not in manifest.get("engines", {})
               or not (Path(engine_dir) / manifest["engines"][t] / "rank0.engine").is_file()]
    if missing:
        raise EngineMismatchError(f"{engine_dir}: no engine for {', '.join(missing)} (run its trtllm_build.sh, or "
                                  "build_engine.py with TensorRT-LLM installed)")
    return manifest

