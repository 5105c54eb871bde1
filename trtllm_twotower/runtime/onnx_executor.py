"""The ONNX Runtime executor: the exported graphs (``onnx_export.py``) behind the sampler's interface.

The graphs' custom nodes run as onnxruntime-extensions Python ops that call the torch backend's own
CPU ops (``TorchOps``, kernels off: the references, and the same scan and expert forms as the torch
backend), so this executor checks the exported graphs against the torch backend on any CPU.
onnxruntime-extensions serves Python ops from its own domain (``ai.onnx.contrib``), so the nodes of
the ``twotower`` domain are moved there in memory when a graph is loaded; the files are unchanged.

State as in ``TrtExecutor``: the context graph outputs the chunk's K/V, appended here to the state's
buffers; the Mamba states are new tensors. Speculative rollback runs the traced graph
(``context_trace.onnx``: the Mamba states after every position) and picks states exactly as the torch
backend does (``towers.rollback``). Float32 graphs only (ONNX Runtime's CPU kernels have no bf16 GEMM).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..config import MAMBA
from ..engine_io import EngineMismatchError, config_hash, state_names
from ..network import towers
from ..network.ops import TorchOps
from ..onnx_nodes import DOMAIN, FLOAT, NODES
from .executor import RowStates, check_capacity
from .prefix_cache import PAGE_TOKENS, prefill_rows

ORT_DOMAIN = "ai.onnx.contrib"  # onnxruntime-extensions' domain for Python ops
_registered = False


def register_python_ops() -> None:
    """One onnxruntime-extensions Python op per custom node (once per process), each calling the
    torch backend's CPU op of the same name on float32 tensors."""
    global _registered
    if _registered:
        return
    from onnxruntime_extensions import PyCustomOpDef, onnx_op

    ops = TorchOps(torch.float32, "cpu", kernels=False)
    kinds = {"float": PyCustomOpDef.dt_float, "int32": PyCustomOpDef.dt_int32, "int64": PyCustomOpDef.dt_int64}
    attr_kinds = {FLOAT: PyCustomOpDef.dt_float}

    def tensors(arrays):
        return [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]

    def numpy(*outputs):
        arrays = tuple(o.contiguous().numpy() for o in outputs)
        return arrays if len(arrays) > 1 else arrays[0]

    impls = {  # inputs as tensors, then the node's attributes by name
        "rms_norm": lambda x, w, eps: numpy(ops.rms_norm(x, w, eps)),
        "modulated_rms_norm": lambda x, w, table, m, eps, modulate_first: numpy(
            ops.modulated_rms_norm(x, w, eps, table, m, bool(modulate_first))),
        "gated_residual": lambda x, h, table, m: numpy(ops.gated_residual(x, h, table, m)),
        "gated_rms_norm": lambda y, z, w, n_groups, eps: numpy(ops.gated_rms_norm(y, z, w, n_groups, eps)),
        "relu2": lambda x: numpy(ops.relu2(x)),
        "moe_route": lambda x, router, bias, top_k, normalize, scale: numpy(
            *ops.moe_route(x, router, bias, top_k, bool(normalize), scale)),
        "moe_experts": lambda x, ids, weights, up, down, shared: numpy(
            ops.moe_experts(x, ids, weights, up, down, shared)),
        "block_attention": lambda q, k, v, kc, vc, lens, num_heads, num_kv_heads, head_dim, causal: numpy(
            ops.block_attention(q, k, v, kc, vc, lens.long(), bool(causal), write_cache=False)),
        "seeded_mamba_scan": lambda xbc, dt, cw, cb, dt_bias, A_log, D, conv, ssm, n_groups, head_dim, return_steps:
            numpy(*_scan(ops, (xbc, dt, cw, cb, dt_bias, A_log, D, conv, ssm), n_groups, head_dim, bool(return_steps))),
    }
    for name, node in NODES.items():
        def run(*arrays, _impl=impls[name], **attrs):
            return _impl(*tensors(arrays), **attrs)

        onnx_op(op_type=node.op_type, inputs=[kinds[k] for _, k in node.inputs],
                outputs=[kinds[k] for _, k in node.outputs],
                attrs={n: attr_kinds.get(k, PyCustomOpDef.dt_int64) for n, k in node.attributes})(run)
    _registered = True


def _scan(ops: TorchOps, args, n_groups: int, head_dim: int, return_steps: bool):
    """The scan node's five outputs (the per-position states empty unless ``return_steps``)."""
    out = ops.mamba_scan(*args, n_groups, head_dim, per_position=return_steps)
    return out if return_steps else (*out, torch.empty(0), torch.empty(0))


def load_session(path: Path):
    """An ONNX Runtime session of one exported graph, its ``twotower`` nodes served by the Python ops."""
    import onnx
    import onnxruntime as ort
    from onnxruntime_extensions import get_library_path

    register_python_ops()
    model = onnx.load(str(path), load_external_data=False)
    for node in model.graph.node:
        if node.domain == DOMAIN:
            node.domain = ORT_DOMAIN
    for opset in model.opset_import:
        if opset.domain == DOMAIN:
            opset.domain = ORT_DOMAIN
    options = ort.SessionOptions()
    options.register_custom_ops_library(get_library_path())
    # the graphs are small steps between Python ops (which run torch's own threads): ORT's spinning
    # thread pool only competes with them
    options.intra_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # the model is passed as bytes: its external weights are found beside the file it came from
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.parent))
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def check_onnx_dir(onnx_dir: Path, cfg) -> dict:
    """Refuse graphs exported from another config, in another dtype than float32, or missing."""
    path = onnx_dir / "onnx_manifest.json"
    if not path.is_file():
        raise EngineMismatchError(f"{onnx_dir}: no onnx_manifest.json (export with build_engine.py --onnx)")
    manifest = json.loads(path.read_text())
    if manifest.get("config_sha256") != config_hash(cfg.to_dict()):
        raise EngineMismatchError(f"{onnx_dir}: the graphs were exported from another config.json than the "
                                  "checkpoint's")
    if manifest.get("dtype") != "float32":
        raise EngineMismatchError(f"{onnx_dir}: ONNX Runtime runs float32 graphs; these are {manifest.get('dtype')} "
                                  "(export with --dtype float32)")
    missing = [g for g, name in manifest.get("graphs", {}).items() if not (onnx_dir / name).is_file()]
    if missing or "context" not in manifest.get("graphs", {}):
        raise EngineMismatchError(f"{onnx_dir}: graph files missing: {', '.join(missing) or 'context'}")
    return manifest


class OnnxExecutor(RowStates):
    """The exported graphs under ONNX Runtime (CPU, float32), behind the executor interface."""

    def __init__(self, cfg, sessions: dict):
        self.cfg = cfg
        self.sessions = sessions
        self.dtype = torch.float32
        self.page_tokens = PAGE_TOKENS  # the prefix cache's page: prefills run in these pieces
        self.context_device = self.denoiser_device = torch.device("cpu")
        self.modes = ("diffusion", "speculative", "mock-ar", "ar") if "denoiser" in sessions else ("ar",)
        self._names = state_names(cfg)
        self._mamba = cfg.layers_of(MAMBA)

    @classmethod
    def from_onnx_dir(cls, onnx_dir, cfg) -> "OnnxExecutor":
        if onnx_dir is None:
            raise ValueError("engine_dir: required for backend='onnx' (the build_engine.py --onnx output)")
        onnx_dir = Path(onnx_dir)
        manifest = check_onnx_dir(onnx_dir, cfg)
        return cls(cfg, {g: load_session(onnx_dir / name) for g, name in manifest["graphs"].items()})

    def _run(self, graph: str, state: towers.TowerState, ids: torch.Tensor, timestep=None) -> dict:
        by_kind = {"key": state.keys, "value": state.values, "conv": state.conv, "ssm": state.ssm}
        feeds = {"input_ids": ids.to(torch.int32).numpy(), "cache_lens": state.lengths.to(torch.int32).numpy()}
        if timestep is not None:
            feeds["timestep"] = timestep.to(torch.float32).numpy()
        for kind, entries in self._names.items():
            feeds.update({name: by_kind[kind][i].contiguous().numpy() for i, name in entries})
        session = self.sessions[graph]
        names = [o.name for o in session.get_outputs()]
        return {n: torch.from_numpy(a) for n, a in zip(names, session.run(names, feeds))}

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], capacity: int, pages=None):
        """As ``TorchExecutor.prefill``: each row alone in page pieces, through the prefix cache."""
        return prefill_rows(prompts, capacity, pages,
                            lambda: towers.empty_state(self.cfg, 1, capacity, self.dtype, self.context_device),
                            self._prefill_piece, self.page_tokens)

    def _prefill_piece(self, state, ids: list[int], logits: bool):
        out, state = self.extend(state, torch.tensor([ids]), logits=logits)
        return (None if out is None else out[:, -1]), state

    @torch.inference_mode()
    def extend(self, state, tokens: torch.Tensor, logits: bool, trace: bool = False, in_place: bool = False):
        """tokens [B, L] -> (fp32 logits [B, L, V] or None, new state); ``trace`` runs the traced graph,
        whose per-position Mamba states the new state carries for ``rollback``."""
        check_capacity(state, tokens.shape[1])
        out = self._run("context_trace" if trace else "context", state, tokens)
        steps = None
        if trace:
            steps = towers.ExtendTrace(tokens.shape[1], {i: out[f"conv_state_steps_{i}"] for i in self._mamba},
                                       {i: out[f"ssm_state_steps_{i}"] for i in self._mamba})
        new_state = towers.committed(
            state, tokens.shape[1], {i: out[f"new_key_{i}"] for i in state.keys},
            {i: out[f"new_value_{i}"] for i in state.keys},
            conv={i: out[f"present_conv_state_{i}"] for i in self._mamba},
            ssm={i: out[f"present_ssm_state_{i}"] for i in self._mamba}, trace=steps)
        return (out["logits"] if logits else None), new_state

    @torch.inference_mode()
    def denoise(self, state, block: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
        """block [B, L], t [B] (None: mock-AR, the untimed graph) -> fp32 logits [B, L, V]."""
        if t is None:
            return self._run("denoiser_untimed", state, block)["logits"]
        return self._run("denoiser", state, block, t)["logits"]
