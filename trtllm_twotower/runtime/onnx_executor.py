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
from .executor import check_capacity

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
    # the model is passed as bytes: its external weights are found beside the file it came from
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.parent))
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
