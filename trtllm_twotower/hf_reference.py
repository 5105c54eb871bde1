"""transformers' NemotronHForCausalLM on our context-tower weights: the external reference
(tests) and the AR baseline (bench). Needs transformers >= 5 (NemotronH)."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def transformers_context_model(checkpoint_dir: Path, ctx_weights: dict, dtype: torch.dtype = torch.float32):
    """A transformers NemotronH holding the context tower of ``checkpoint_dir``.

    The mixers' dt clamp is lifted to (0, inf): transformers 5.x clamps dt at time_step_min in its
    multi-token path only (spec §9.7); R3, which we follow, does not clamp."""
    raw = json.loads((Path(checkpoint_dir) / "config.json").read_text())
    return transformers_model_from_config(raw, ctx_weights, dtype)


def transformers_model_from_config(raw: dict, ctx_weights: dict, dtype: torch.dtype = torch.float32):
    """Same, from a parsed config.json (official form). The model's parameters ARE our tensors
    (``assign=True``, no copy) when ``dtype`` matches theirs, so a 63 GB tower is not held twice."""
    from transformers import NemotronHConfig, NemotronHForCausalLM

    raw = {k: v for k, v in raw.items() if k != "architectures"}
    config = NemotronHConfig(**raw)
    config._attn_implementation = "eager"
    with torch.device("meta"):
        model = NemotronHForCausalLM(config)
    for layer in model.model.layers:
        if hasattr(layer.mixer, "time_step_limit"):
            layer.mixer.time_step_limit = (0.0, float("inf"))
    state = {"model.embeddings.weight": ctx_weights["embeddings"], "model.norm_f.weight": ctx_weights["norm_f"],
             "lm_head.weight": ctx_weights["lm_head"]}
    names = {  # our slot -> transformers name under model.layers.{i}.
        "norm": "norm.weight", "in_proj": "mixer.in_proj.weight", "conv_bias": "mixer.conv1d.bias",
        "dt_bias": "mixer.dt_bias", "A_log": "mixer.A_log", "D": "mixer.D", "gated_norm": "mixer.norm.weight",
        "out_proj": "mixer.out_proj.weight", "q_proj": "mixer.q_proj.weight", "k_proj": "mixer.k_proj.weight",
        "v_proj": "mixer.v_proj.weight", "o_proj": "mixer.o_proj.weight", "router": "mixer.gate.weight",
        "router_bias": "mixer.gate.e_score_correction_bias", "experts_up": "mixer.experts.up_proj",
        "experts_down": "mixer.experts.down_proj", "shared_up": "mixer.shared_experts.up_proj.weight",
        "shared_down": "mixer.shared_experts.down_proj.weight", "up_proj": "mixer.up_proj.weight",
        "down_proj": "mixer.down_proj.weight",
    }
    for i, layer in enumerate(ctx_weights["layers"]):
        for slot, tensor in layer.items():
            if slot == "conv_weight":
                state[f"model.layers.{i}.mixer.conv1d.weight"] = tensor.unsqueeze(1)
            else:
                state[f"model.layers.{i}.{names[slot]}"] = tensor
    missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False,
                                                 assign=True)
    if missing or unexpected:
        raise KeyError(f"transformers NemotronH weight map: missing {missing}, unexpected {unexpected}")
    meta = [name for name, b in model.named_buffers() if b.is_meta]
    if meta:
        raise KeyError(f"transformers NemotronH buffers left uninitialised: {meta}")
    return model.eval()
