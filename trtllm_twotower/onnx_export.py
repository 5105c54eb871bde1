"""ONNX export of both towers from the one network definition (``network/towers.py``).

The towers run on ``ExportOps`` (``TorchOps`` with the kernels on, CPU tensors), so every kernel is
one ``torch.ops.twotower.*`` call in the exported program; the dynamo exporter's translation table
turns each into a custom node (``onnx_nodes.py``: domain ``twotower``, op type = plugin name).
Attention is the exception: the custom op appends K/V in place, which an ONNX graph cannot, so
``ExportOps`` emits the read-only attention node directly (``torch.onnx.ops.symbolic``) and the
context graph outputs the chunk's K/V.

Graphs (all inputs and outputs named as in ``engine_io``; dynamic batch, tokens and cache length):
    context.onnx           input_ids [B, L] int32, cache_lens [B] int32, past_* state
                           -> logits [B, L, V] fp32, new_key_i / new_value_i [B, L, K, P],
                              present_conv_state_i, present_ssm_state_i      (prefill = extend of
                              an empty state)
    context_trace.onnx     the same, plus conv_state_steps_i [B, L + 1, C, W] and
                           ssm_state_steps_i [B, L + 1, H, P, N]: the Mamba states after each
                           prefix (speculative rollback)
    denoiser.onnx          input_ids (the block), cache_lens, timestep [B] fp32, past_* -> logits
    denoiser_untimed.onnx  the same without timestep (mock-AR)
Weights are external data beside each graph (``<graph>.onnx.data``).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from .checkpoint import CONTEXT, DENOISER, NANO, CheckpointReader, load_tower_weights, resolve_keys
from .config import ATTENTION, MAMBA, TwoTowerConfig, load_config
from .engine_io import config_hash, state_names
from .network import towers
from .network.ops import TorchOps
from .onnx_nodes import DOMAIN, NODES, plugin_attributes, register_schemas
from .plugins import custom_ops  # noqa: F401  (registers torch.ops.twotower)

GRAPHS = {"context": CONTEXT, "context_trace": CONTEXT, "denoiser": DENOISER, "denoiser_untimed": DENOISER}
OPSET = 18
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class ExportOps(TorchOps):
    """``TorchOps`` with the kernels on; attention is the read-only custom node, and the chunk's
    K/V of every attention layer are kept (in layer order) for the graph's outputs."""

    def __init__(self, dtype: torch.dtype):
        super().__init__(dtype, "cpu", kernels=True)
        self.new_kv: list[tuple[torch.Tensor, torch.Tensor]] = []

    def block_attention(self, q, k, v, k_cache, v_cache, cache_lens, causal: bool, write_cache: bool):
        self._op("block_attention")
        if write_cache:
            self.new_kv.append((k, v))
        attrs = {"num_heads": q.shape[2], "num_kv_heads": k.shape[2], "head_dim": q.shape[3], "causal": int(causal),
                 **plugin_attributes()}
        return torch.onnx.ops.symbolic(f"{DOMAIN}::{NODES['block_attention'].op_type}",
                                       (q, k, v, k_cache, v_cache, cache_lens), attrs, dtype=q.dtype,
                                       shape=q.shape, version=1)


def _flatten(tree, prefix="") -> dict[str, torch.Tensor]:
    """The weights tree as {"layers__3__in_proj": tensor}; None leaves are left out."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    flat = {}
    for key, value in items:
        name = f"{prefix}{key}"
        if isinstance(value, (dict, list)):
            flat.update(_flatten(value, name + "__"))
        elif value is not None:
            flat[name] = value
    return flat


def _unflatten(module: torch.nn.Module, shape_of) -> dict | list:
    """Rebuild a weights tree of the shape of ``shape_of`` from the module's buffers."""
    def build(node, prefix):
        items = node.items() if isinstance(node, dict) else enumerate(node)
        out = {} if isinstance(node, dict) else [None] * len(node)
        for key, value in items:
            name = f"{prefix}{key}"
            if isinstance(value, (dict, list)):
                out[key] = build(value, name + "__")
            elif value is not None:
                out[key] = getattr(module, name)
        return out
    return build(shape_of, "")


class TowerGraph(torch.nn.Module):
    """One tower as a module over flat, named inputs: the weights are its buffers (initializers)."""

    def __init__(self, cfg: TwoTowerConfig, weights: dict, dtype: torch.dtype, graph: str):
        super().__init__()
        self.cfg, self.dtype, self.graph, self._tree = cfg, dtype, graph, weights
        for name, tensor in _flatten(weights).items():
            self.register_buffer(name, tensor)
        self.names = state_names(cfg)

    def _state(self, cache_lens, past) -> towers.TowerState:
        by_kind = {kind: {i: past[name] for i, name in entries} for kind, entries in self.names.items()}
        return towers.TowerState(lengths=cache_lens, keys=by_kind["key"], values=by_kind["value"],
                                 conv=by_kind["conv"], ssm=by_kind["ssm"])

    def forward(self, input_ids, cache_lens, *rest):
        ops = ExportOps(self.dtype)
        w = _unflatten(self, self._tree)
        past = dict(zip(input_names(self.cfg, self.graph)[2:], rest))
        timestep = past.pop("timestep", None)
        state = self._state(cache_lens, past)
        if GRAPHS[self.graph] == DENOISER:
            return towers.denoise(ops, self.cfg, w, state, input_ids, timestep)
        trace = self.graph == "context_trace"
        logits, new = towers.context_forward(ops, self.cfg, w, state, input_ids, trace=trace)
        outputs = [logits, *(k for k, _ in ops.new_kv), *(v for _, v in ops.new_kv),
                   *(new.conv[i] for i in self.cfg.layers_of(MAMBA)), *(new.ssm[i] for i in self.cfg.layers_of(MAMBA))]
        if trace:
            outputs += [*(new.trace.conv[i] for i in self.cfg.layers_of(MAMBA)),
                        *(new.trace.ssm[i] for i in self.cfg.layers_of(MAMBA))]
        return tuple(outputs)


def input_names(cfg: TwoTowerConfig, graph: str) -> list[str]:
    names = ["input_ids", "cache_lens"] + (["timestep"] if graph == "denoiser" else [])
    return names + [name for entries in state_names(cfg).values() for _, name in entries]


def output_names(cfg: TwoTowerConfig, graph: str) -> list[str]:
    if GRAPHS[graph] == DENOISER:
        return ["logits"]
    attn, mamba = cfg.layers_of(ATTENTION), cfg.layers_of(MAMBA)
    names = (["logits"] + [f"new_key_{i}" for i in attn] + [f"new_value_{i}" for i in attn]
             + [f"present_conv_state_{i}" for i in mamba] + [f"present_ssm_state_{i}" for i in mamba])
    if graph == "context_trace":
        names += [f"conv_state_steps_{i}" for i in mamba] + [f"ssm_state_steps_{i}" for i in mamba]
    return names


# ---- translation of the custom ops into custom nodes --------------------------------------------
def _translation_table() -> dict:
    import onnxscript

    register_schemas()
    tw = onnxscript.values.Opset(DOMAIN, 1)
    plugin = plugin_attributes()

    def node(name):
        return getattr(tw, NODES[name].op_type)

    def rms_norm(x, weight, eps: float, table=None, m=None, modulate_first: bool = False):
        if table is None:
            return node("rms_norm")(x, weight, eps=eps, **plugin)
        return node("modulated_rms_norm")(x, weight, table, m, eps=eps, modulate_first=int(modulate_first), **plugin)

    def gated_residual(x, h, table, m):
        return node("gated_residual")(x, h, table, m, **plugin)

    def gated_rms_norm(y, z, weight, n_groups: int, eps: float):
        return node("gated_rms_norm")(y, z, weight, n_groups=n_groups, eps=eps, **plugin)

    def relu2(x):
        return node("relu2")(x, **plugin)

    def moe_route(x, router, correction_bias, top_k: int, normalize: bool, scale: float):
        return node("moe_route")(x, router, correction_bias, top_k=top_k, normalize=int(normalize), scale=scale,
                                 **plugin)

    def moe_experts(x, ids, weights, up, down, shared=None):
        if shared is None:
            raise ValueError("ONNX export: MoE layers without a shared expert (n_shared_experts = 0) are not exported")
        return node("moe_experts")(x, ids, weights, up, down, shared, **plugin)

    def seeded_mamba_scan(xbc, dt, conv_weight, conv_bias, dt_bias, A_log, D, conv_state, ssm_state, n_groups: int,
                          head_dim: int, return_steps: bool):
        return node("seeded_mamba_scan")(xbc, dt, conv_weight, conv_bias, dt_bias, A_log, D, conv_state, ssm_state,
                                         n_groups=n_groups, head_dim=head_dim, return_steps=int(return_steps),
                                         **plugin)

    ops = torch.ops.twotower
    return {ops.rms_norm.default: rms_norm, ops.gated_residual.default: gated_residual,
            ops.gated_rms_norm.default: gated_rms_norm, ops.relu2.default: relu2, ops.moe_route.default: moe_route,
            ops.moe_experts.default: moe_experts, ops.seeded_mamba_scan.default: seeded_mamba_scan}


# ---- export -------------------------------------------------------------------------------------
def _example_inputs(cfg: TwoTowerConfig, graph: str, dtype: torch.dtype):
    """Distinct small sizes (batch 2, 3 tokens, 7 cache slots), so none is specialised."""
    B, L, S = 2, 3, 7
    state = towers.empty_state(cfg, B, S, dtype, "cpu")
    by_kind = {"key": state.keys, "value": state.values, "conv": state.conv, "ssm": state.ssm}
    past = [by_kind[kind][i] for kind, entries in state_names(cfg).items() for i, _ in entries]
    ids = torch.randint(0, cfg.vocab_size, (B, L), dtype=torch.int32)
    lens = torch.tensor([1, 2], dtype=torch.int32)
    timestep = [torch.tensor([0.5, 1.0])] if graph == "denoiser" else []
    return (ids, lens, *timestep, *past)


def _dynamic_shapes(cfg: TwoTowerConfig, graph: str):
    from torch.export import Dim

    batch, tokens, cache = Dim("batch"), Dim("tokens"), Dim("max_seq_len")
    shapes = [{0: batch, 1: tokens}, {0: batch}] + ([{0: batch}] if graph == "denoiser" else [])
    for kind, entries in state_names(cfg).items():
        shapes += [{0: batch, 1: cache} if kind in ("key", "value") else {0: batch} for _ in entries]
    return (shapes[0], shapes[1], tuple(shapes[2:]))  # forward(input_ids, cache_lens, *rest)


def export_graph(cfg: TwoTowerConfig, weights: dict, graph: str, path: Path, dtype: str = "float32") -> Path:
    """Export one graph of ``GRAPHS`` to ``path`` (weights in ``path.data``)."""
    torch_dtype = DTYPES[dtype]
    module = TowerGraph(cfg, weights, torch_dtype, graph).eval()
    with torch.no_grad(), warnings.catch_warnings():
        # every dynamic dim of one name is one Dim: the exporter warns that it names them once
        warnings.filterwarnings("ignore", message="# The axis name")
        program = torch.onnx.export(
            module, _example_inputs(cfg, graph, torch_dtype), dynamo=True, opset_version=OPSET,
            dynamic_shapes=_dynamic_shapes(cfg, graph), input_names=input_names(cfg, graph),
            output_names=output_names(cfg, graph), custom_translation_table=_translation_table(),
            optimize=False, verbose=False)  # the optimizer drops the custom nodes' output types
    program.save(str(path), external_data=True)
    return path


def load_weights(checkpoint: Path, cfg: TwoTowerConfig, dtype: str) -> dict:
    reader = CheckpointReader(checkpoint)
    layout, on_disk = resolve_keys(reader, cfg, (CONTEXT, DENOISER))
    towers_present = (CONTEXT,) if layout == NANO else (CONTEXT, DENOISER)
    return {t: load_tower_weights(reader, cfg, t, DTYPES[dtype], "cpu", layout, on_disk) for t in towers_present}


def export_towers(checkpoint: str | Path, out_dir: str | Path, dtype: str = "float32") -> list[str]:
    """Every graph of the checkpoint's towers into ``out_dir`` (an existing directory), plus
    ``onnx_manifest.json`` (config hash, dtype, graphs). Returns the graph names written."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    cfg = load_config(checkpoint)
    weights = load_weights(checkpoint, cfg, dtype)
    graphs = [g for g, tower in GRAPHS.items() if tower in weights]
    for graph in graphs:
        export_graph(cfg, weights[GRAPHS[graph]], graph, out_dir / f"{graph}.onnx", dtype)
    manifest = {"config_sha256": config_hash(cfg.to_dict()), "dtype": dtype, "opset": OPSET,
                "graphs": {g: f"{g}.onnx" for g in graphs}}
    (out_dir / "onnx_manifest.json").write_text(json.dumps(manifest, indent=2))
    return graphs
