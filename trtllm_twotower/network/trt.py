"""TensorRT-LLM 1.2 backend of the op interface, the two PretrainedModel classes, engine build.

NOT EXECUTED: TensorRT-LLM cannot be installed where this project is developed and tested. The
module imports without it (``TrtOps``' op names are checked against ``ops.OP_NAMES`` in CI); the
classes and ``build_engines`` need ``tensorrt-llm>=1.2,<1.3`` (pip install 'trtllm-twotower[trt]').

The towers are the SAME functions as the torch backend (``network.towers`` / ``layers``) called with
``TrtOps``; each op maps to ``tensorrt_llm.functional`` or to one of this project's plugins:
  block_attention -> TwoTowerBlockAttention (IPluginV3, plugins/csrc), mamba_scan -> TwoTowerSeededMambaScan,
  moe_experts     -> TRT-LLM's MixtureOfExperts plugin with static routing (``MOE.forward_experts``;
                     relu^2 needs the kernel's Relu2 activation, see ``_moe_activation``),
  moe_route       -> fp32 functional ops: TensorRT has no fp64 (the reference router is fp64);
                     measure the expert flip rate against ``TorchOps`` before trusting an engine.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

try:
    import tensorrt as trt
    import tensorrt_llm
    from tensorrt_llm import functional as F
    from tensorrt_llm.models.modeling_utils import PretrainedConfig, PretrainedModel
    from tensorrt_llm.parameter import Parameter
except ImportError:  # the op table stays inspectable; everything else raises on use
    tensorrt_llm = None


def _require() -> None:
    if tensorrt_llm is None:
        raise ImportError("TensorRT-LLM 1.2 is not installed: pip install 'trtllm-twotower[trt]' on a GPU machine")


class TrtOps:
    """The op interface on TensorRT-LLM tensors (one method per name in ``ops.OP_NAMES``)."""

    def __init__(self, dtype: str):
        _require()
        self.dtype = dtype
        # past_key_{i} name -> (k_cache, v_cache) as written by the plugin (aliased, in place): the
        # context model marks these as present_key_{i} / present_value_{i}
        self.written_caches: dict = {}

    def embedding(self, table, ids):
        return F.embedding(ids, table)

    def linear(self, x, weight, bias=None):
        y = F.matmul(x, weight, transb=True)  # fp32 accumulation, result in the compute dtype
        return y if bias is None else y + bias

    def rms_norm(self, x, weight, eps):
        return F.rms_norm(x, normalized_shape=x.size(-1), weight=weight, eps=eps)  # fp32 inside

    def gated_rms_norm(self, y, z, weight, n_groups, eps):
        v = F.cast(y, "float32") * F.silu(F.cast(z, "float32"))
        return F.cast(F.rms_norm(v, normalized_shape=y.size(-1), num_groups=n_groups, weight=F.cast(weight, "float32"),
                                 eps=eps), self.dtype)

    def split(self, x, sizes):
        return F.split(x, sizes, dim=x.ndim() - 1)

    def split_heads(self, x, heads, head_dim):
        return x.view(F.concat([F.shape(x, i) for i in range(x.ndim() - 1)] + [heads, head_dim]))

    def merge_heads(self, x):
        return x.view(F.concat([F.shape(x, i) for i in range(x.ndim() - 2)] + [x.size(-2) * x.size(-1)]))

    def add(self, a, b):
        return a + b

    def mul(self, a, b):
        return a * b

    def silu(self, x):
        return F.silu(x)

    def relu2(self, x):
        r = F.relu(x)
        return r * r

    def modulate(self, x, shift, scale):
        return x * (scale + 1.0) + shift

    def timestep_embedding(self, t, dim):
        half = dim // 2
        steps = F.cast(F.cast(t, self.dtype) * 1000.0, "float32")  # bf16(bf16(t) * 1000), as the reference
        freqs = F.constant(_np().exp(-math.log(10000.0) * _np().arange(half, dtype="float32") / half))
        args = F.unsqueeze(steps, 1) * F.unsqueeze(freqs, 0)
        return F.cast(F.concat([F.cos(args), F.sin(args)], dim=1), self.dtype)

    def logits(self, x, head):
        return F.cast(F.matmul(x, head, transb=True), "float32")

    def block_attention(self, q, k, v, k_cache, v_cache, cache_lens, causal, write_cache):
        from ..plugins.trt_layers import block_attention_plugin

        out, k_written, v_written = block_attention_plugin(q, k, v, k_cache, v_cache, cache_lens, causal, write_cache)
        if write_cache:
            self.written_caches[k_cache.name] = (k_written, v_written)
        return out

    def mamba_scan(self, xbc, dt, conv_weight, conv_bias, dt_bias, A_log, D, conv_state, ssm_state, n_groups, head_dim,
                   per_position=False):
        from ..plugins.trt_layers import seeded_mamba_scan_plugin

        if per_position:
            raise NotImplementedError("per-position states (speculative mode) are not part of the engines yet")

        return seeded_mamba_scan_plugin(xbc, dt, conv_weight, conv_bias, dt_bias, A_log, D, conv_state, ssm_state,
                                        n_groups, head_dim)

    def moe_route(self, x, router, correction_bias, top_k, normalize, scale):
        scores = F.sigmoid(F.matmul(F.cast(x, "float32"), F.cast(router, "float32"), transb=True))
        _, idx = F.topk(scores + correction_bias, top_k, dim=scores.ndim() - 1)
        w = F.gather(scores, dim=scores.ndim() - 1, indices=idx)
        if normalize:
            w = w / (F.sum(w, dim=w.ndim() - 1, keepdim=True) + 1e-20)
        return idx, w * scale

    def moe_experts(self, x, idx, weights, up, down):
        # ``up`` is the layer's MOE module (its fc/proj hold experts_up/experts_down), see TwoTowerModel
        return up.forward_experts(x, idx, weights, None, _side_stream_disabled())


def _np():
    import numpy

    return numpy


def _side_stream_disabled():
    from tensorrt_llm.layers.moe import SideStreamIDType

    return SideStreamIDType.disable


def _moe_activation() -> str:
    """relu^2 in TRT-LLM's MoE plugin: 1.2's Python ACT2FN map has no 'relu2' while its kernels
    know Relu2; refuse to build rather than silently use another activation."""
    from tensorrt_llm.layers import moe

    names = getattr(moe, "ACTIVATION_TYPE_MAP", None) or getattr(moe, "activation_type_map", {})
    if "relu2" not in names:
        raise NotImplementedError("this TensorRT-LLM build's MoE plugin exposes no relu2 activation; "
                                  "relu^2 experts need a patched activation map (see README, engine path)")
    return "relu2"


def inspect_engine(engine_dir: Path) -> int:
    """Polygraphy listing of an engine's layers and I/O; exit code 2 without Polygraphy/TensorRT."""
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec("polygraphy") is None or importlib.util.find_spec("tensorrt") is None:
        print("error: --inspect needs polygraphy and TensorRT (pip install 'trtllm-twotower[trt]')", file=sys.stderr)
        return 2
    engine = Path(engine_dir) / "rank0.engine"
    if not engine.is_file():
        print(f"error: no rank0.engine in {engine_dir}", file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, "-m", "polygraphy", "inspect", "model", str(engine),
                            "--model-type", "engine", "--show", "layers", "attrs"])


def config_hash(twotower_config: dict) -> str:
    return hashlib.sha256(json.dumps(twotower_config, sort_keys=True).encode()).hexdigest()


def build_engines(checkpoints: dict, out_dir: Path, cfg, limits, workers: int = 1) -> None:
    """Build ``out_dir/engines/{tower}/`` from the converted checkpoints and write the manifest."""
    _require()
    from tensorrt_llm.builder import BuildConfig, build

    from ..plugins import kernels

    plugin_lib = kernels.load_trt_plugins()  # registers TwoTowerBlockAttention / TwoTowerSeededMambaScan
    manifest = {"config_sha256": config_hash(cfg.to_dict()), "tensorrt_llm": tensorrt_llm.__version__,
                "tensorrt": trt.__version__, "plugin_library": str(plugin_lib),
                "plugin_sha256": hashlib.sha256(Path(plugin_lib).read_bytes()).hexdigest(),
                "limits": limits.__dict__, "engines": {}}
    for tower, ckpt in checkpoints.items():
        model = MODEL_CLASSES[tower].from_checkpoint(str(ckpt))
        build_config = BuildConfig(max_input_len=limits.max_input_len, max_seq_len=limits.max_seq_len,
                                   max_batch_size=limits.max_batch_size, max_num_tokens=limits.max_batch_size
                                   * limits.max_input_len, strongly_typed=True)
        engine = build(model, build_config)
        engine.save(str(out_dir / "engines" / tower))
        manifest["engines"][tower] = f"engines/{tower}"
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))


MODEL_CLASSES: dict = {}

if tensorrt_llm is not None:
    from tensorrt_llm.models import MODEL_MAP

    from ..checkpoint import CONTEXT, DENOISER, TWOTOWER
    from ..config import MOE, config_from_dict
    from ..convert import ARCHITECTURES, trtllm_params
    from ..engine_io import BuildLimits, engine_io, profiles
    from . import towers

    class TwoTowerConfig(PretrainedConfig):
        """PretrainedConfig carrying the model's own config.json fields under ``twotower``."""

    class _TwoTowerModel(PretrainedModel):
        """Parameters declared from ``convert.trtllm_params``; forward = ``network.towers``."""

        config_class = TwoTowerConfig
        tower = ""

        def __init__(self, config):
            super().__init__(config)
            self.cfg = config_from_dict(config.twotower)
            self.weights = {"layers": [dict() for _ in range(self.cfg.num_layers)]}
            for p in trtllm_params(self.cfg, TWOTOWER, self.tower, _torch_dtype(config.dtype)):
                param = Parameter(shape=p.shape, dtype="float32" if "float32" in str(p.dtype) else config.dtype)
                setattr(self, p.name.replace(".", "__"), param)  # flat, unique module attributes
                parts = p.name.split(".")
                node = self.weights["layers"][int(parts[1])] if parts[0] == "layers" else self.weights
                node[parts[-1]] = param
            from tensorrt_llm.layers.moe import MOE as TrtMoe
            from tensorrt_llm.layers.moe import MoeConfig

            for i in self.cfg.layers_of(MOE):  # the pattern's 'E' layers
                moe = TrtMoe(moe_config=MoeConfig(num_experts=self.cfg.n_routed_experts,
                                               top_k=self.cfg.num_experts_per_tok),
                          hidden_size=self.cfg.hidden_size, ffn_hidden_size=self.cfg.moe_intermediate_size,
                          hidden_act=_moe_activation(), dtype=config.dtype, bias=False)
                setattr(self, f"moe_{i}", moe)
                self.weights["layers"][i]["experts_up"] = moe  # TrtOps.moe_experts takes the module

        def __post_init__(self):
            return  # no quantization rewrites

        def prepare_inputs(self, max_batch_size, max_input_len, max_seq_len, **kwargs):
            from collections import OrderedDict

            limits = BuildLimits(max_batch_size, max_input_len, max_seq_len, self.config.block_size)
            ranges = profiles(self.tower, limits)
            inputs = {}
            for spec in engine_io(self.cfg, self.tower, self.config.dtype):
                if not spec.is_input:
                    continue
                dims = OrderedDict()
                for j, d in enumerate(spec.dims):
                    if d in ("batch", "tokens"):
                        dims[d] = [r[d] for r in ranges]
                    else:
                        value = max_seq_len if d == "max_seq_len" else d
                        dims[f"{spec.name}_{j}"] = [value] * len(ranges)
                shape = [-1 if d in ("batch", "tokens") else (max_seq_len if d == "max_seq_len" else d)
                         for d in spec.dims]
                inputs[spec.name] = F.Tensor(name=spec.name, dtype=spec.dtype, shape=shape, dim_range=dims)
            return {"inputs": inputs}

        def _state(self, inputs):
            names = {kind: {i: inputs[n] for i, n in entries} for kind, entries in _state_names(self.cfg).items()}
            return towers.TowerState(lengths=inputs["cache_lens"], keys=names["key"], values=names["value"],
                                     conv=names["conv"], ssm=names["ssm"])

    class TwoTowerContextForCausalLM(_TwoTowerModel):
        tower = CONTEXT

        def forward(self, inputs):
            ops = TrtOps(self.config.dtype)
            state = self._state(inputs)
            hidden, new_state = towers.forward_layers(ops, self.cfg, self.weights, inputs["input_ids"], state,
                                                      causal=True, commit=True)
            last = F.gather_last_token_logits(hidden, F.shape(hidden, 1), False)
            ops.logits(last, self.weights["lm_head"]).mark_output("last_logits", "float32")
            for i in new_state.keys:
                k_written, v_written = ops.written_caches[f"past_key_{i}"]
                k_written.mark_output(f"present_key_{i}")
                v_written.mark_output(f"present_value_{i}")
            for i in new_state.conv:
                new_state.conv[i].mark_output(f"present_conv_state_{i}")
                new_state.ssm[i].mark_output(f"present_ssm_state_{i}", "float32")

    class TwoTowerDenoiser(_TwoTowerModel):
        tower = DENOISER

        def forward(self, inputs):
            ops = TrtOps(self.config.dtype)
            logits = towers.denoise(ops, self.cfg, self.weights, self._state(inputs), inputs["input_ids"],
                                    inputs["timestep"])
            logits.mark_output("logits", "float32")
            masked = logits + F.constant(_mask_row(self.cfg))  # the mask token can never be predicted
            probs = F.softmax(masked, dim=2)
            confidence, pred = F.topk(probs, 1, dim=2)
            F.cast(pred, "int32").mark_output("pred_ids", "int32")
            confidence.mark_output("confidence", "float32")

    def _state_names(cfg):
        from ..engine_io import state_names

        return state_names(cfg)

    def _mask_row(cfg):
        row = _np().zeros((1, 1, cfg.vocab_size), dtype="float32")
        row[..., cfg.mask_token_id] = -1e12
        return row

    def _torch_dtype(name):
        import torch

        return {"bfloat16": torch.bfloat16, "float32": torch.float32}[name]

    MODEL_CLASSES = {CONTEXT: TwoTowerContextForCausalLM, DENOISER: TwoTowerDenoiser}
    for _tower, _cls in MODEL_CLASSES.items():
        MODEL_MAP[ARCHITECTURES[_tower]] = _cls  # trtllm-build --model_cls_file finds them by name
