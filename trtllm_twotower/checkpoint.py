"""Lazy safetensors reading and the checkpoint name map.

The real checkpoint is 118 GB, so nothing here maps or loads a shard whole: ``SafetensorsFile``
parses the 8-byte header length and the JSON header, then reads one tensor's bytes with
``readinto`` when asked. Peak host memory while loading is one tensor (plus the destination).

Layouts (spec §2): TwoTower (``context_tower.*``, ``context_lm_head``, ``denoiser_tower.*``,
``lm_head``, ``t_embedder.*``, ``t_block.*``, ``scale_shift_tables.*``) and the single-tower Nano base
(``backbone.*`` + ``lm_head``, context tower only). The map is data: ``tower_tensor_specs`` lists every
expected tensor with its shape and where it goes; per-expert tensors are stacked into ``[E, ...]``.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from .config import ATTENTION, MAMBA, MLP, MOE, TwoTowerConfig

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}

CONTEXT, DENOISER = "context", "denoiser"
TWOTOWER, NANO = "twotower", "nano"


class CheckpointError(ValueError):
    """A checkpoint that does not match the config; the message names every offending tensor."""


def capped(items: list[str], limit: int = 20) -> str:
    """A list for an error message, cut at ``limit`` entries ("... and N more")."""
    head = ", ".join(items[:limit])
    return head + (f" ... and {len(items) - limit} more" if len(items) > limit else "")


@dataclass(frozen=True)
class _Entry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


MAX_HEADER_BYTES = 100_000_000  # as the safetensors library


def parse_safetensors_header(header_bytes: bytes, data_bytes: int, where: str) -> dict[str, _Entry]:
    """Check a safetensors header against what the format promises and return its entries
    (``start`` relative to the data region). The format: a JSON object of tensor entries
    {"dtype", "shape", "data_offsets": [begin, end]} (plus an optional "__metadata__" object of
    strings); byte size = elements x dtype size; the regions tile the data exactly: contiguous,
    non-overlapping, from 0 to its end. ``where`` names the file in every error."""
    try:
        header = json.loads(header_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{where}: malformed safetensors header ({err})") from err
    if not isinstance(header, dict):
        raise CheckpointError(f"{where}: safetensors header is a JSON {type(header).__name__}, not an object")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"{where}: __metadata__ must be an object of strings")
    entries: dict[str, _Entry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        bad = lambda what: CheckpointError(f"{where}: tensor {name!r}: {what}")  # noqa: E731
        if not isinstance(info, dict):
            raise bad(f"entry is a JSON {type(info).__name__}, not an object")
        missing = [k for k in ("dtype", "shape", "data_offsets") if k not in info]
        if missing:
            raise bad(f"no {', '.join(missing)}")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise bad(f"unsupported dtype {dtype!r} (known: {', '.join(_DTYPES)})")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            raise bad(f"shape must be a list of non-negative integers, got {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
                or offsets[0] > offsets[1]):
            raise bad(f"data_offsets must be [begin, end] with 0 <= begin <= end, got {offsets!r}")
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=_DTYPES[dtype]).element_size()
        if offsets[1] - offsets[0] != nbytes:
            raise bad(f"data_offsets {offsets} hold {offsets[1] - offsets[0]} bytes; {dtype} {shape} needs {nbytes}")
        entries[name] = _Entry(_DTYPES[dtype], tuple(shape), offsets[0], nbytes)
    position = 0
    for name, entry in sorted(entries.items(), key=lambda kv: (kv[1].start, kv[1].start + kv[1].nbytes)):
        if entry.start != position:
            what = "overlaps the tensor before it" if entry.start < position else f"leaves a gap at byte {position}"
            raise CheckpointError(f"{where}: tensor {name!r}: data_offsets start at {entry.start}: {what}")
        position += entry.nbytes
    if position != data_bytes:
        raise CheckpointError(f"{where}: the tensors cover {position} bytes of data; the file holds {data_bytes}")
    return entries


class SafetensorsFile:
    """One safetensors file, header parsed and checked up front, tensors read one at a time on demand."""

    def __init__(self, path: Path):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{self.path}: truncated (no safetensors header)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > min(size - 8, MAX_HEADER_BYTES):
                raise CheckpointError(f"{self.path}: header length {header_len} exceeds the file size or "
                                      f"{MAX_HEADER_BYTES} bytes")
            header_bytes = f.read(header_len)
        base = 8 + header_len
        entries = parse_safetensors_header(header_bytes, size - base, str(self.path))
        self.entries = {n: _Entry(e.dtype, e.shape, base + e.start, e.nbytes) for n, e in entries.items()}

    def read(self, name: str) -> torch.Tensor:
        entry = self.entries[name]
        buf = torch.empty(entry.nbytes, dtype=torch.uint8)
        with open(self.path, "rb") as f:
            f.seek(entry.start)
            if f.readinto(memoryview(buf.numpy())) != entry.nbytes:
                raise CheckpointError(f"{self.path}: tensor {name!r}: short read (file changed or truncated)")
        return buf.view(entry.dtype).reshape(entry.shape)


class CheckpointReader:
    """All tensors of a checkpoint directory: sharded (``model.safetensors.index.json``) or not."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise CheckpointError(f"checkpoint: {self.directory} is not a directory")
        index = self.directory / "model.safetensors.index.json"
        files: dict[str, SafetensorsFile] = {}
        self._where: dict[str, SafetensorsFile] = {}
        if index.is_file():
            weight_map = _read_weight_map(index)
            missing = sorted({s for s in weight_map.values() if not (self.directory / s).is_file()})
            if missing:
                raise CheckpointError(f"{index}: shard files not found: {capped(missing)}")
            for shard in sorted(set(weight_map.values())):
                files[shard] = SafetensorsFile(self.directory / shard)
            absent = [f"{name} ({shard})" for name, shard in weight_map.items() if name not in files[shard].entries]
            if absent:
                raise CheckpointError(f"{index}: tensors listed but absent from their shard: {capped(absent)}")
            for name, shard in weight_map.items():
                self._where[name] = files[shard]
        else:
            paths = sorted(self.directory.glob("*.safetensors"))
            if not paths:
                raise CheckpointError(f"checkpoint: no *.safetensors files in {self.directory}")
            for p in paths:
                st = SafetensorsFile(p)
                for name in st.entries:
                    self._where[name] = st

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name].entries[name].shape

    def read(self, name: str) -> torch.Tensor:
        return self._where[name].read(name)


def _read_weight_map(index: Path) -> dict[str, str]:
    """The index's ``weight_map``: tensor name -> shard file name (a plain name in the directory)."""
    try:
        raw = json.loads(index.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{index}: not valid UTF-8 JSON ({err})") from err
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: weight_map must be an object of tensor name -> shard file, got "
                              f"{type(weight_map).__name__}")
    bad = [f"{k}: {v!r}" for k, v in weight_map.items()
           if not isinstance(v, str) or not v or Path(v).name != v or v in (".", "..")]
    if bad:
        raise CheckpointError(f"{index}: weight_map entries must name a shard file in the directory: {capped(bad)}")
    return weight_map


# ---- the name map ------------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorSpec:
    key: str  # name in the checkpoint
    shape: tuple[int, ...]
    slot: tuple  # where it goes in the weights tree: ("layers", i, "q_proj") or ("layers", i, "experts_up", e)
    fp32: bool = False  # always held in fp32 (A_log, D, dt_bias, correction bias: spec §2.1, §3)


def detect_layout(keys: list[str]) -> str:
    if any(k.startswith("context_tower.") for k in keys):
        return TWOTOWER
    if any(k.startswith("backbone.") for k in keys):
        return NANO
    raise CheckpointError("checkpoint: neither 'context_tower.*' (TwoTower) nor 'backbone.*' (Nano) tensors found")


def _prefixes(layout: str, tower: str) -> tuple[str, str]:
    """(tower prefix, head key) for a tower in a layout."""
    if layout == NANO:
        if tower != CONTEXT:
            raise CheckpointError("checkpoint: a single-tower Nano checkpoint has no denoiser tower (AR mode only)")
        return "backbone.", "lm_head.weight"
    return (("context_tower.", "context_lm_head.weight") if tower == CONTEXT
            else ("denoiser_tower.", "lm_head.weight"))


def tower_tensor_specs(cfg: TwoTowerConfig, layout: str, tower: str) -> list[TensorSpec]:
    """Every tensor one tower needs, in checkpoint order."""
    prefix, head_key = _prefixes(layout, tower)
    H, V, E = cfg.hidden_size, cfg.vocab_size, cfg.n_routed_experts
    q_width, kv_width = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    specs = [TensorSpec(f"{prefix}embeddings.weight", (V, H), ("embeddings",))]
    for i, kind in enumerate(cfg.layer_pattern):
        p = f"{prefix}layers.{i}."
        m = p + "mixer."
        specs.append(TensorSpec(p + "norm.weight", (H,), ("layers", i, "norm")))
        if kind == MAMBA:
            nh = cfg.mamba_num_heads
            specs += [
                TensorSpec(m + "in_proj.weight", (cfg.in_proj_dim, H), ("layers", i, "in_proj")),
                TensorSpec(m + "conv1d.weight", (cfg.conv_dim, 1, cfg.conv_kernel), ("layers", i, "conv_weight")),
                TensorSpec(m + "dt_bias", (nh,), ("layers", i, "dt_bias"), fp32=True),
                TensorSpec(m + "A_log", (nh,), ("layers", i, "A_log"), fp32=True),
                TensorSpec(m + "D", (nh,), ("layers", i, "D"), fp32=True),
                TensorSpec(m + "norm.weight", (cfg.d_inner,), ("layers", i, "gated_norm")),
                TensorSpec(m + "out_proj.weight", (H, cfg.d_inner), ("layers", i, "out_proj")),
            ]
            if cfg.use_conv_bias:
                specs.append(TensorSpec(m + "conv1d.bias", (cfg.conv_dim,), ("layers", i, "conv_bias")))
        elif kind == ATTENTION:
            specs += [
                TensorSpec(m + "q_proj.weight", (q_width, H), ("layers", i, "q_proj")),
                TensorSpec(m + "k_proj.weight", (kv_width, H), ("layers", i, "k_proj")),
                TensorSpec(m + "v_proj.weight", (kv_width, H), ("layers", i, "v_proj")),
                TensorSpec(m + "o_proj.weight", (H, q_width), ("layers", i, "o_proj")),
            ]
        elif kind == MOE:
            inter = cfg.moe_intermediate_size
            specs += [
                TensorSpec(m + "gate.weight", (E, H), ("layers", i, "router")),
                TensorSpec(m + "gate.e_score_correction_bias", (E,), ("layers", i, "router_bias"), fp32=True),
            ]
            for e in range(E):
                specs += [
                    TensorSpec(f"{m}experts.{e}.up_proj.weight", (inter, H), ("layers", i, "experts_up", e)),
                    TensorSpec(f"{m}experts.{e}.down_proj.weight", (H, inter), ("layers", i, "experts_down", e)),
                ]
            if cfg.n_shared_experts:
                shared = cfg.moe_shared_expert_intermediate_size
                specs += [
                    TensorSpec(m + "shared_experts.up_proj.weight", (shared, H), ("layers", i, "shared_up")),
                    TensorSpec(m + "shared_experts.down_proj.weight", (H, shared), ("layers", i, "shared_down")),
                ]
        elif kind == MLP:
            specs += [
                TensorSpec(m + "up_proj.weight", (cfg.intermediate_size, H), ("layers", i, "up_proj")),
                TensorSpec(m + "down_proj.weight", (H, cfg.intermediate_size), ("layers", i, "down_proj")),
            ]
    specs += [
        TensorSpec(f"{prefix}norm_f.weight", (H,), ("norm_f",)),
        TensorSpec(head_key, (V, H), ("lm_head",)),
    ]
    if tower == DENOISER:
        T = cfg.time_embedding_dim
        specs += [
            TensorSpec("t_embedder.mlp.0.weight", (H, T), ("t_embed_in",)),
            TensorSpec("t_embedder.mlp.0.bias", (H,), ("t_embed_in_bias",)),
            TensorSpec("t_embedder.mlp.2.weight", (H, H), ("t_embed_out",)),
            TensorSpec("t_embedder.mlp.2.bias", (H,), ("t_embed_out_bias",)),
            TensorSpec("t_block.1.weight", (3 * H, H), ("t_block",)),
            TensorSpec("t_block.1.bias", (3 * H,), ("t_block_bias",)),
        ]
        specs += [TensorSpec(f"scale_shift_tables.{i}", (3, H), ("scale_shift", i)) for i in range(cfg.num_layers)]
    return specs


def _aliases(key: str) -> Iterator[str]:
    """The names a tensor may carry on disk: the remote code's load hook renames a stray
    ``{T}.embedding.weight`` to ``{T}.embeddings.weight`` (spec §2.1)."""
    yield key
    if key.endswith(".embeddings.weight"):
        yield key[: -len(".embeddings.weight")] + ".embedding.weight"


def resolve_keys(reader: CheckpointReader, cfg: TwoTowerConfig, towers: tuple[str, ...]) -> tuple[str, dict[str, str]]:
    """Check that every tensor the towers need is present with the right shape, and that nothing
    unexpected is there. Returns (layout, {spec key -> key on disk}). One error lists every problem."""
    keys = reader.keys()
    layout = detect_layout(keys)
    if layout == NANO:
        towers = tuple(t for t in towers if t == CONTEXT)
    on_disk: dict[str, str] = {}
    missing, misshaped = [], []
    for tower in towers:
        for spec in tower_tensor_specs(cfg, layout, tower):
            found = next((a for a in _aliases(spec.key) if a in reader), None)
            if found is None:
                missing.append(spec.key)
            elif tuple(reader.shape(found)) != spec.shape:
                misshaped.append(f"{found}: expected {list(spec.shape)}, found {list(reader.shape(found))}")
            else:
                on_disk[spec.key] = found
    # unexpected: anything that is not part of any tower of this layout
    known = set()
    for tower in ((CONTEXT, DENOISER) if layout == TWOTOWER else (CONTEXT,)):
        known.update(a for s in tower_tensor_specs(cfg, layout, tower) for a in _aliases(s.key))
    unexpected = sorted(k for k in keys if k not in known)
    problems = []
    if missing:
        problems.append(f"missing tensors ({len(missing)}): " + capped(missing))
    if misshaped:
        problems.append(f"misshaped tensors ({len(misshaped)}): " + capped(misshaped))
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): " + capped(unexpected))
    if problems:
        raise CheckpointError(f"checkpoint {reader.directory}: " + " | ".join(problems))
    return layout, on_disk


def load_tower_weights(
    reader: CheckpointReader,
    cfg: TwoTowerConfig,
    tower: str,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    layout: str | None = None,
    on_disk: dict[str, str] | None = None,
) -> dict:
    """Read one tower's tensors from a checkpoint, one at a time (see ``assemble_tower_weights``)."""
    if on_disk is None:
        layout, on_disk = resolve_keys(reader, cfg, (tower,))
    return assemble_tower_weights(cfg, tower, layout, lambda spec: reader.read(on_disk[spec.key]), dtype, device)


def assemble_tower_weights(
    cfg: TwoTowerConfig,
    tower: str,
    layout: str,
    fetch: Callable[[TensorSpec], torch.Tensor],
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> dict:
    """The torch backend's weights tree for one tower, fetching one tensor at a time.

    Each tensor is cast to ``dtype`` (fp32 for the always-fp32 ones) and placed on ``device``.
    Per-expert matrices land in preallocated stacks: ``experts_up`` [E, I, H], ``experts_down``
    [E, H, I]. Conv weights are squeezed to [C, W]; the denoiser's tables stacked to [layers, 3, D]."""
    weights: dict = {"layers": [dict() for _ in range(cfg.num_layers)], "scale_shift": [None] * cfg.num_layers}
    E = cfg.n_routed_experts
    for spec in tower_tensor_specs(cfg, layout, tower):
        tensor = fetch(spec).to(torch.float32 if spec.fp32 else dtype)
        if spec.slot[-1] == "conv_weight":
            tensor = tensor.squeeze(1)
        node = weights
        for part in spec.slot[:-1][:2]:
            node = node[part]
        leaf = spec.slot[-1]
        if len(spec.slot) == 4:  # ("layers", i, "experts_up" | "experts_down", e): stack per layer
            if spec.slot[2] not in node:
                node[spec.slot[2]] = torch.empty((E, *spec.shape), dtype=dtype, device=device)
            node[spec.slot[2]][leaf].copy_(tensor)
        else:
            node[leaf] = tensor.to(device)
    if not cfg.use_conv_bias:  # one conv code path: a missing bias is a zero bias
        for i in cfg.layers_of(MAMBA):
            weights["layers"][i]["conv_bias"] = torch.zeros(cfg.conv_dim, dtype=dtype, device=device)
    if tower == DENOISER:
        weights["scale_shift"] = torch.stack(weights["scale_shift"])  # [layers, 3, H]
    else:
        del weights["scale_shift"]
    return weights


def tower_tensors(cfg: TwoTowerConfig, tower: str, weights: dict) -> dict[str, torch.Tensor]:
    """The inverse of ``assemble_tower_weights`` (TwoTower layout): checkpoint key -> tensor, with
    the on-disk shapes (conv weights [C, 1, W], one tensor per expert, one table per layer)."""
    out = {}
    for spec in tower_tensor_specs(cfg, TWOTOWER, tower):
        node = weights
        for part in spec.slot:
            node = node[part]
        out[spec.key] = node.detach().reshape(spec.shape)
    return out


class StreamingSafetensorsWriter:
    """Writes a safetensors file whose header is known up front, then the data tensor by tensor
    (a stacked tensor may come in pieces), so memory holds one source tensor at a time."""

    def __init__(self, path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        header: dict = {}
        offset = 0
        self._sizes: list[tuple[str, int]] = []
        for name, dtype, shape in entries:
            nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._sizes.append((name, nbytes))
            offset += nbytes
        if metadata:
            header["__metadata__"] = metadata
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # keep tensor data 8-byte aligned
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", len(blob)) + blob)
        self._index, self._written = 0, 0

    def write(self, piece: torch.Tensor) -> None:
        """Append the next piece of the current tensor (pieces of a tensor come in order)."""
        data = piece.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
        self._file.write(data)
        self._written += len(data)
        name, nbytes = self._sizes[self._index]
        if self._written > nbytes:
            raise CheckpointError(f"{name}: {self._written} bytes written, {nbytes} declared")
        if self._written == nbytes:
            self._index, self._written = self._index + 1, 0

    def close(self) -> None:
        self._file.close()
        if self._index != len(self._sizes):
            raise CheckpointError(f"{self._file.name}: closed after {self._index} of {len(self._sizes)} tensors")

    def __enter__(self) -> "StreamingSafetensorsWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """A clean exit checks that every tensor was written; an exception (a bad tensor, Ctrl-C,
        SIGTERM) just closes the file and goes on, so it is not masked by the incompleteness error."""
        if exc_type is None:
            self.close()
        else:
            self._file.close()


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write one safetensors file from a dict of tensors."""
    with StreamingSafetensorsWriter(path, [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()],
                                    metadata) as writer:
        for t in tensors.values():
            writer.write(t)
