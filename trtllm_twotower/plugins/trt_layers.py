"""Add the project's IPluginV3 layers to a TensorRT-LLM network (NOT EXECUTED here: needs
TensorRT-LLM 1.2). The plugins are the ONNX nodes of ``onnx_nodes.NODES`` (same tensors, same
fields), over the AOT-compiled Triton kernels; the plugin library must be loaded first
(``plugin_library.load_trt_plugins``). Follows TensorRT-LLM's own V3 pattern (functional.py ``dora_plugin``):
registry creator -> ``create_plugin(..., TensorRTPhase.BUILD)`` -> ``add_plugin_v3`` -> ``_create_tensor``.
Every input is a network Tensor (weights as ``Parameter.value``).
"""

from __future__ import annotations

NAMESPACE, VERSION = "twotower", "1"


def _add_plugin(name: str, fields: dict[str, int], inputs: list, layer_name: str):
    try:
        import numpy as np
        import tensorrt as trt
        from tensorrt_llm._common import default_trtnet
        from tensorrt_llm.functional import _add_plugin_info, _create_tensor
    except ImportError as err:
        raise ImportError("TensorRT-LLM 1.2 is needed to add TwoTower plugin layers: pip install "
                          "'trtllm-twotower[trt]'") from err
    creator = trt.get_plugin_registry().get_creator(name, VERSION, NAMESPACE)
    if creator is None:
        raise RuntimeError(f"plugin {NAMESPACE}::{name} v{VERSION} is not registered: call "
                           "trtllm_twotower.plugins.plugin_library.load_trt_plugins() first")
    collection = trt.PluginFieldCollection([trt.PluginField(k, np.array([v], np.float64), trt.PluginFieldType.FLOAT64)
                                            for k, v in fields.items()])  # the plugins read any numeric field
    plugin = creator.create_plugin(layer_name, collection, trt.TensorRTPhase.BUILD)
    if plugin is None:
        raise ValueError(f"{name}: the plugin rejected its fields {fields}")
    layer = default_trtnet().add_plugin_v3([t.trt_tensor for t in inputs], [], plugin)
    _add_plugin_info(layer, creator, layer_name, collection)  # as dora_plugin does (graph-rewriting records)
    return [_create_tensor(layer.get_output(i), layer) for i in range(layer.num_outputs)]


def block_attention_plugin(q, k, v, k_cache, v_cache, cache_lens, causal: bool, H: int, K: int, P: int):
    """q [B, L, H, P], k/v [B, L, K, P], caches [B, S, K, P] (read only), cache_lens [B] int32 ->
    out [B, L, H, P]. H, K, P: the config's integers (a tensor's static dims may read -1 here)."""
    (out,) = _add_plugin("TwoTowerBlockAttention", {"num_heads": H, "num_kv_heads": K, "head_dim": P,
                                                    "causal": int(causal)},
                         [q, k, v, k_cache, v_cache, cache_lens], "twotower_block_attention")
    return out


def seeded_mamba_scan_plugin(xbc, dt, conv_weight, conv_bias, dt_bias, A_log, D, conv_state, ssm_state,
                             n_groups: int, head_dim: int):
    """-> (y [B, L, H*P], new conv state [B, C, W], new fp32 ssm state [B, H, P, N]); the node's two
    per-prefix outputs are empty (return_steps 0) and left unused."""
    outputs = _add_plugin("TwoTowerSeededMambaScan", {"n_groups": n_groups, "head_dim": head_dim, "return_steps": 0},
                          [xbc, dt, conv_weight, conv_bias, dt_bias, A_log, D, conv_state, ssm_state],
                          "twotower_seeded_mamba_scan")
    return outputs[0], outputs[1], outputs[2]


def moe_experts_plugin(x, expert_ids, expert_weights, up, down, shared=None):
    """x [n, D], expert_ids [n, k] int64, expert_weights [n, k] fp32, up [E, I, D], down [E, D, I],
    shared [n, D] or None (the shared expert's output, added inside) -> [n, D]."""
    inputs = [x, expert_ids, expert_weights, up, down] + ([] if shared is None else [shared])
    (out,) = _add_plugin("TwoTowerMoeExperts", {}, inputs, "twotower_moe_experts")
    return out
