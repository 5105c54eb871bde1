"""The custom ONNX nodes of the exported towers: one table for the exporter and the runtimes.

Every kernel of ``plugins/custom_ops.py`` becomes one node in the domain ``twotower`` whose op type
is its plugin's name. TensorRT's ONNX parser imports a node it has no importer for as a plugin:
creator = registry lookup of (op type, attribute ``plugin_version``, attribute ``plugin_namespace``),
fields = the node's attributes named in the creator's ``getFieldNames()`` (INT -> kINT32,
FLOAT -> kFLOAT32; onnx-tensorrt ``onnxOpImporters.cpp``: ``FallbackPluginImporter``, ``loadFields``).
So each node carries those two attributes. ONNX Runtime runs the nodes as Python ops
(``runtime/onnx_executor.py``).

Attention is read-only (the node of the TensorRT-LLM engines' plugin: same inputs and fields);
the context graph outputs the chunk's K/V and the runtime appends them to its caches.
"""

from __future__ import annotations

from dataclasses import dataclass

DOMAIN = "twotower"
PLUGIN_VERSION, PLUGIN_NAMESPACE = "1", "twotower"
FLOAT, INT = "float", "int"  # attribute kinds


@dataclass(frozen=True)
class Node:
    op_type: str
    inputs: tuple  # (name, "float" | "int32" | "int64")
    outputs: tuple
    attributes: tuple  # (name, FLOAT | INT)
    fp32: tuple = ()  # the "float" inputs and outputs that are fp32 in every engine; the others take the
    #                   activation dtype (fp32 or bf16), that of the first input
    optional: tuple = ()  # trailing inputs that may be left out


_F, _I32, _I64 = "float", "int32", "int64"


def _floats(*names):
    return tuple((n, _F) for n in names)


NODES = {
    "rms_norm": Node("TwoTowerRmsNorm", _floats("x", "weight"), _floats("y"), (("eps", FLOAT),)),
    "modulated_rms_norm": Node("TwoTowerModulatedRmsNorm", _floats("x", "weight", "table", "m"), _floats("y"),
                               (("eps", FLOAT), ("modulate_first", INT))),
    "gated_residual": Node("TwoTowerGatedResidual", _floats("x", "h", "table", "m"), _floats("y"), ()),
    "gated_rms_norm": Node("TwoTowerGatedRmsNorm", _floats("y", "z", "weight"), _floats("out"),
                           (("n_groups", INT), ("eps", FLOAT))),
    "relu2": Node("TwoTowerRelu2", _floats("x"), _floats("y"), ()),
    "moe_route": Node("TwoTowerMoeRoute", _floats("x", "router", "correction_bias"),
                      (("expert_ids", _I64), ("expert_weights", _F)),
                      (("top_k", INT), ("normalize", INT), ("scale", FLOAT)), fp32=("correction_bias", "expert_weights")),
    "moe_experts": Node("TwoTowerMoeExperts", (*_floats("x"), ("expert_ids", _I64), *_floats("expert_weights", "up",
                                                                                               "down", "shared")),
                        _floats("out"), (), fp32=("expert_weights",), optional=("shared",)),
    "block_attention": Node("TwoTowerBlockAttention", (*_floats("q", "k", "v", "k_cache", "v_cache"),
                                                       ("cache_lens", _I32)), _floats("out"),
                            (("num_heads", INT), ("num_kv_heads", INT), ("head_dim", INT), ("causal", INT))),
    "seeded_mamba_scan": Node("TwoTowerSeededMambaScan",
                              _floats("xbc", "dt", "conv_weight", "conv_bias", "dt_bias", "A_log", "D", "conv_state",
                                      "ssm_state"),
                              _floats("y", "conv_state_out", "ssm_state_out", "conv_steps", "ssm_steps"),
                              (("n_groups", INT), ("head_dim", INT), ("return_steps", INT)),
                              fp32=("dt_bias", "A_log", "D", "ssm_state", "ssm_state_out", "ssm_steps")),
}


def plugin_attributes() -> dict:
    """The attributes TensorRT's ONNX parser reads to find a node's plugin creator."""
    return {"plugin_version": PLUGIN_VERSION, "plugin_namespace": PLUGIN_NAMESPACE}


def register_schemas() -> None:
    """Register the nodes' schemas with ``onnx.defs`` (once per process): onnxscript, and so the
    exporter's translation functions, builds nodes only of ops it has a schema for."""
    import onnx
    from onnx.defs import OpSchema

    if onnx.defs.has(NODES["rms_norm"].op_type, DOMAIN):
        return
    kinds = {FLOAT: OpSchema.AttrType.FLOAT, INT: OpSchema.AttrType.INT}
    types = ["tensor(float)", "tensor(bfloat16)", "tensor(float16)", "tensor(int32)", "tensor(int64)"]
    for node in NODES.values():
        params = [("I", n) for n, _ in node.inputs] + [("O", n) for n, _ in node.outputs]
        attributes = [OpSchema.Attribute(n, kinds[k], "") for n, k in node.attributes]
        attributes += [OpSchema.Attribute(n, OpSchema.AttrType.STRING, "") for n in plugin_attributes()]
        onnx.defs.register_schema(OpSchema(
            node.op_type, DOMAIN, 1, doc=f"TwoTower plugin {node.op_type}",
            inputs=[OpSchema.FormalParameter(n, f"{p}{j}") for j, (p, n) in enumerate(params) if p == "I"],
            outputs=[OpSchema.FormalParameter(n, f"{p}{j}") for j, (p, n) in enumerate(params) if p == "O"],
            type_constraints=[(f"{p}{j}", types, "") for j, (p, _) in enumerate(params)],
            attributes=attributes))
