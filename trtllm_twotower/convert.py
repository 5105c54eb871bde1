"""HF checkpoint -> two TensorRT-LLM checkpoints (one per tower), streamed one tensor at a time.

A TRT-LLM checkpoint is a directory with ``config.json`` (a ``PretrainedConfig``) and
``rank0.safetensors``. The parameter names are the paths of the torch backend's weights tree
(``layers.3.in_proj``, ``layers.1.experts_up`` [E, I, H], ``layers.5.scale_shift`` [3, D], ...), which
are also the names TensorRT-LLM's ``Module.named_parameters`` gives the module tree that
``network/trt.py`` builds from ``module_tree`` (attribute names joined with ".", ModuleList
entries by index): converter, engine and torch backend share one description.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import (CONTEXT, DENOISER, NANO, TWOTOWER, CheckpointError, CheckpointReader,
                         StreamingSafetensorsWriter, TensorSpec, capped, resolve_keys, tower_tensor_specs)
from .config import MAMBA, TwoTowerConfig, config_from_dict, load_config
from .fsutil import atomic_directory

ARCHITECTURES = {CONTEXT: "TwoTowerContextForCausalLM", DENOISER: "TwoTowerDenoiser"}
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class TrtParam:
    """One TRT-LLM parameter: its name, shape, dtype and the checkpoint tensors it is made of
    (several = stacked along a new leading dim, in order; none = zeros)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    sources: tuple[TensorSpec, ...]


def _param_name(spec: TensorSpec) -> str:
    slot = spec.slot
    if len(slot) == 4:  # ("layers", i, "experts_up", e) -> stacked per layer
        return f"layers.{slot[1]}.{slot[2]}"
    if slot[0] == "scale_shift":  # ("scale_shift", i) -> that layer's [3, D] table
        return f"layers.{slot[1]}.scale_shift"
    return ".".join(str(s) for s in slot)


def trtllm_params(cfg: TwoTowerConfig, layout: str, tower: str, dtype: torch.dtype) -> list[TrtParam]:
    """Every parameter of a tower's TRT-LLM model, in file order."""
    groups: dict[str, list[TensorSpec]] = {}
    for spec in tower_tensor_specs(cfg, layout, tower):
        groups.setdefault(_param_name(spec), []).append(spec)
    params = []
    for name, specs in groups.items():
        first = specs[0]
        shape = first.shape
        if first.slot[-1] == "conv_weight":
            shape = (shape[0], shape[2])  # [C, 1, W] -> [C, W]
        if len(specs) > 1:
            shape = (len(specs), *shape)
        params.append(TrtParam(name, shape, torch.float32 if first.fp32 else dtype, tuple(specs)))
    if not cfg.use_conv_bias:  # one conv code path, as the torch loader: a missing bias is a zero bias
        params += [TrtParam(f"layers.{i}.conv_bias", (cfg.conv_dim,), dtype, ()) for i in cfg.layers_of(MAMBA)]
    return params


def module_tree(params: list[TrtParam]) -> dict:
    """The module tree of a tower's TRT-LLM model: {attribute: TrtParam} at the top, and "layers":
    [{attribute: TrtParam}] (a ModuleList). Joining the attribute path with "." gives each name."""
    tree: dict = {"layers": []}
    for p in params:
        parts = p.name.split(".")
        if parts[0] == "layers":
            i = int(parts[1])
            while len(tree["layers"]) <= i:
                tree["layers"].append({})
            tree["layers"][i][parts[2]] = p
        else:
            tree[p.name] = p
    return tree


def tree_names(tree: dict) -> list[str]:
    """Names as TensorRT-LLM's Module.named_parameters joins them (module.py: prefix + "." + name)."""
    names = [k for k in tree if k != "layers"]
    for i, layer in enumerate(tree["layers"]):
        names += [f"layers.{i}.{k}" for k in layer]
    return names


def trtllm_config(cfg: TwoTowerConfig, tower: str, dtype: str, block_size: int = 16) -> dict:
    """The TRT-LLM ``config.json``: PretrainedConfig's mandatory fields plus the model's own."""
    return {
        "architecture": ARCHITECTURES[tower],
        "dtype": dtype,
        "logits_dtype": "float32",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_size": cfg.head_dim,
        "hidden_act": "relu2",
        "norm_epsilon": cfg.layer_norm_epsilon,
        "position_embedding_type": "learned_absolute",  # unused: NoPE, the model's attention is a plugin
        "max_position_embeddings": cfg.max_position_embeddings,
        "mapping": {"world_size": 1, "tp_size": 1, "pp_size": 1},
        "quantization": {"quant_algo": None, "kv_cache_quant_algo": None},
        "tower": tower,
        "block_size": block_size,  # the step profile's token count
        "twotower": cfg.to_dict(),  # the model's config.json fields, read back by load_trtllm_checkpoint
    }


def write_tower_checkpoint(reader: CheckpointReader, on_disk: dict[str, str], cfg: TwoTowerConfig, layout: str,
                           tower: str, dtype_name: str, directory: Path, progress=None) -> None:
    """One tower's TRT-LLM checkpoint into ``directory`` (which must exist)."""
    params = trtllm_params(cfg, layout, tower, DTYPES[dtype_name])
    (directory / "config.json").write_text(json.dumps(trtllm_config(cfg, tower, dtype_name), indent=2))
    with StreamingSafetensorsWriter(directory / "rank0.safetensors",
                                    [(p.name, p.dtype, p.shape) for p in params]) as writer:
        for p in params:
            if not p.sources:
                writer.write(torch.zeros(p.shape, dtype=p.dtype))
            for spec in p.sources:
                writer.write(reader.read(on_disk[spec.key]).to(p.dtype))
                if progress is not None:
                    progress.update(1)


def convert_checkpoint(checkpoint_dir: str | Path, output_dir: str | Path, dtype: str = "bfloat16",
                       overwrite: bool = False, show_progress: bool = True) -> dict[str, Path]:
    """Write ``output_dir/{context,denoiser}/`` atomically (a temp dir beside it, then a rename).
    A Nano checkpoint gives the context tower only. Returns {tower: its directory}."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
    output_dir = Path(output_dir)
    if output_dir.exists() and not overwrite:
        raise FileExistsError(f"output directory {output_dir} exists (pass --overwrite to replace it)")
    cfg = load_config(checkpoint_dir)
    reader = CheckpointReader(checkpoint_dir)
    layout, on_disk = resolve_keys(reader, cfg, (CONTEXT, DENOISER))
    towers = (CONTEXT,) if layout == NANO else (CONTEXT, DENOISER)
    total = sum(len(tower_tensor_specs(cfg, layout, t)) for t in towers)
    progress = None
    if show_progress:
        from tqdm import tqdm

        progress = tqdm(total=total, unit="tensor", desc="convert")
    try:
        with atomic_directory(output_dir) as tmp:
            for tower in towers:
                (tmp / tower).mkdir()
                write_tower_checkpoint(reader, on_disk, cfg, layout, tower, dtype, tmp / tower, progress)
    finally:
        if progress is not None:
            progress.close()
    return {t: output_dir / t for t in towers}


def load_trtllm_checkpoint(directory: str | Path, device: torch.device | str = "cpu") -> tuple[TwoTowerConfig, str, dict]:
    """A converted tower back into the torch backend's weights tree: (config, tower, weights)."""
    directory = Path(directory)
    try:
        meta = json.loads((directory / "config.json").read_text())
        cfg, tower = config_from_dict(meta["twotower"]), meta["tower"]
    except (OSError, json.JSONDecodeError, KeyError) as err:
        raise CheckpointError(f"{directory}: not a trtllm-twotower TRT-LLM checkpoint ({err})") from err
    reader = CheckpointReader(directory)
    weights: dict = {"layers": [dict() for _ in range(cfg.num_layers)]}
    for name in reader.keys():
        parts = name.split(".")
        node = weights["layers"][int(parts[1])] if parts[0] == "layers" else weights
        node[parts[-1]] = reader.read(name).to(device)
    expected = {p.name for p in trtllm_params(cfg, TWOTOWER, tower, torch.bfloat16)}
    missing = sorted(expected - set(reader.keys()))
    if missing:
        raise CheckpointError(f"{directory}: missing parameters: {capped(missing)}")
    if tower == DENOISER:  # the torch towers index one [layers, 3, D] table
        weights["scale_shift"] = torch.stack([layer.pop("scale_shift") for layer in weights["layers"]])
    return cfg, tower, weights
