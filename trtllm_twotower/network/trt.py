"""TensorRT-LLM 1.2 backend of the op interface, the two PretrainedModel classes, engine build.

NOT EXECUTED: TensorRT-LLM cannot be installed where this project is developed and tested. The
module imports without it (``TrtOps``' op names are checked against ``ops.OP_NAMES`` in CI); the
classes and ``build_engines`` need ``tensorrt-llm>=1.2,<1.3`` (pip install 'trtllm-twotower[trt]').
Every ``tensorrt_llm`` / ``tensorrt`` call was checked against the upstream sources listed in
docs/tensorrt.md (the table names the file each one was read in).

The towers are the SAME functions as the torch backend (``network.towers`` / ``layers``) called with
``TrtOps``; each op maps to ``tensorrt_llm.functional`` or to one of this project's IPluginV3
plugins (plugins/csrc/plugins.cpp, over the AOT-compiled Triton kernels of the torch path):
  block_attention -> TwoTowerBlockAttention (read-only; the context engine outputs the new K/V,
                     the runtime appends them to its caches),
  mamba_scan      -> TwoTowerSeededMambaScan,
  moe_experts     -> TwoTowerMoeExperts (TensorRT-LLM 1.2's MoE plugin has no relu^2 activation;
                     int64 ids, the shared expert's output added inside),
  moe_route       -> fp32 functional ops: TensorRT has no fp64 (the reference router is fp64);
                     measure the expert flip rate against ``TorchOps`` before trusting an engine.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

try:
    import tensorrt as trt
    import tensorrt_llm
    from tensorrt_llm import functional as F
    from tensorrt_llm._common import default_net
    from tensorrt_llm._utils import str_dtype_to_trt
    from tensorrt_llm.models.modeling_utils import PretrainedConfig, PretrainedModel
    from tensorrt_llm.module import Module, ModuleList
    from tensorrt_llm.parameter import Parameter
    from tensorrt_llm.graph_rewriting import Layer

    # build() runs optimize(network), whose passes call Layer.as_layer() on every layer; the copies of
    # graph_rewriting.py read map no PLUGIN_V3 (NotImplementedError on our plugin layers): register it
    Layer.TRT_LAYER_TYPE_TO_LAYER.setdefault(trt.LayerType.PLUGIN_V3, trt.IPluginV3Layer)
except ImportError:  # the op table stays inspectable; everything else raises on use
    tensorrt_llm = None


def _require() -> None:
    if tensorrt_llm is None:
        raise ImportError("TensorRT-LLM 1.2 is not installed: pip install 'trtllm-twotower[trt]' on a GPU machine")


def _dims(x, count: int) -> list:
    """The first ``count`` dims of x as shape tensors (dynamic dims stay dynamic)."""
    return [F.shape(x, i) for i in range(count)]


class TrtOps:
    """The op interface on TensorRT-LLM tensors (one method per name in ``ops.OP_NAMES``).

    ``commit``: the network keeps the Mamba states (context engine) or drops them (denoiser).
    ``new_kv``: past_key_{i} name -> (k, v) of the new tokens, which the context engine outputs.
    Static widths come from ``cfg`` as Python ints, never from ``Tensor.size()`` / ``.shape``: after a
    reshape by shape tensors TensorRT may report -1 there (a plugin creator rejects a -1 field)."""

    def __init__(self, dtype: str, commit: bool, cfg):
        _require()
        self.dtype = dtype
        self.commit = commit
        self.cfg = cfg
        self.new_kv: dict = {}

    def embedding(self, table, ids):
        return F.embedding(ids, table)

    def linear(self, x, weight, bias=None):
        y = F.matmul(x, weight, transb=True)  # bf16 GEMM: TensorRT accumulates in fp32, one rounding
        return y if bias is None else y + bias

    def rms_norm(self, x, weight, eps):
        """bf16(w_fp32 * x_fp32 * rsqrt(mean(x_fp32^2) + eps)): one rounding, as the spec and
        TorchOps (F.rms_norm rounds before multiplying by the weight)."""
        xf = F.cast(x, "float32")
        ms = F.mean(xf * xf, dim=x.ndim() - 1, keepdim=True)
        return F.cast(xf / F.sqrt(ms + eps) * F.cast(weight, "float32"), self.dtype)

    def gated_rms_norm(self, y, z, weight, n_groups, eps):
        """Gate then norm per group of channels; the groups are split with shape tensors (two
        dynamic dims: F.rms_norm(num_groups=) cannot reshape that)."""
        v = F.cast(y, "float32") * F.silu(F.cast(z, "float32"))  # [B, L, D]
        lead = _dims(v, v.ndim() - 1)
        width = self.cfg.d_inner
        g = v.view(F.concat(lead + [n_groups, width // n_groups]))  # [B, L, G, D/G]
        ms = F.mean(g * g, dim=g.ndim() - 1, keepdim=True)
        g = g / F.sqrt(ms + eps)
        return F.cast(g.view(F.concat(lead + [width])) * F.cast(weight, "float32"), self.dtype)

    def split(self, x, sizes):
        return F.split(x, sizes, dim=x.ndim() - 1)

    def split_heads(self, x, heads, head_dim):
        return x.view(F.concat(_dims(x, x.ndim() - 1) + [heads, head_dim]))

    def merge_heads(self, x):
        """[B, L, heads, head_dim] -> [B, L, heads * head_dim]: attention heads, or the [B, 3, D]
        modulation rows (``_modulation``)."""
        return x.view(F.concat(_dims(x, x.ndim() - 2) + [-1]))

    def add(self, a, b):
        return a + b

    def silu(self, x):
        return F.silu(x)

    def relu2(self, x):
        r = F.relu(x)
        return r * r

    def _modulation(self, table, m):
        """shift, scale, gate [B, 1, D]: the rows of bf16(table + m.view(B, 3, D))."""
        D = table.size(-1)  # static: the table is a weight
        rows = table + self.split_heads(m, 3, D)  # [B, 3, D]
        return [self.split_heads(r, 1, D) for r in self.split(self.merge_heads(rows), [D] * 3)]

    def modulated_rms_norm(self, x, weight, eps, table, m, modulate_first):
        shift, scale, _ = self._modulation(table, m)
        if modulate_first:
            return self.rms_norm(x * (scale + 1.0) + shift, weight, eps)
        return self.rms_norm(x, weight, eps) * (scale + 1.0) + shift

    def gated_residual(self, x, h, table, m):
        _, _, gate = self._modulation(table, m)
        return x + gate * h

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

        if write_cache:  # the engine outputs the block's K/V; the runtime appends them
            self.new_kv[k_cache.name] = (k, v)
        cfg = self.cfg
        return block_attention_plugin(q, k, v, k_cache, v_cache, cache_lens, causal, cfg.num_attention_heads,
                                      cfg.num_key_value_heads, cfg.head_dim)

    def mamba_scan(self, xbc, dt, conv_weight, conv_bias, dt_bias, A_log, D, conv_state, ssm_state, n_groups, head_dim,
                   per_position=False):
        from ..plugins.trt_layers import seeded_mamba_scan_plugin

        if per_position:
            raise NotImplementedError("per-position states (speculative mode) are not part of the engines")
        y, new_conv, new_ssm = seeded_mamba_scan_plugin(xbc, dt, conv_weight, conv_bias, dt_bias, A_log, D, conv_state,
                                                        ssm_state, n_groups, head_dim)
        return (y, new_conv, new_ssm) if self.commit else (y, None, None)

    def moe_route(self, x, router, correction_bias, top_k, normalize, scale):
        """fp32 router (TensorRT has no fp64): x [B, L, D] -> ids [B*L, k] int64, weights [B*L, k] fp32."""
        flat = x.view(F.concat([F.shape(x, 0) * F.shape(x, 1), self.cfg.hidden_size]))  # [n, D]
        scores = F.sigmoid(F.matmul(F.cast(flat, "float32"), F.cast(router, "float32"), transb=True))  # [n, E]
        _, idx = F.topk(scores + correction_bias, top_k, dim=1, prefer_plugin=False)  # TensorRT's own top-k
        w = F.gather(scores, dim=1, indices=idx)
        if normalize:
            w = w / (F.sum(w, dim=1, keepdim=True) + 1e-20)
        return F.cast(idx, "int64"), w * scale  # the experts plugin takes int64 ids, as the torch ops

    def moe_experts(self, x, idx, weights, up, down, shared=None):
        from ..plugins.trt_layers import moe_experts_plugin

        rows = F.concat([F.shape(x, 0) * F.shape(x, 1), self.cfg.hidden_size])
        shared = None if shared is None else shared.view(rows)  # added inside the plugin
        return moe_experts_plugin(x.view(rows), idx, weights, up, down, shared).view(F.shape(x))


def _np():
    import numpy

    return numpy


def last_position(hidden):
    """hidden [B, T, D] -> [B, D] at the last position (a slice; F.gather_last_token_logits with
    padded input wants per-row lengths)."""
    B, T = F.shape(hidden, 0), F.shape(hidden, 1)
    D = hidden.size(-1)
    piece = F.slice(hidden, starts=F.concat([0, T - 1, 0]), sizes=F.concat([B, 1, D]))
    return piece.view(F.concat([B, D]))


def inspect_engine(engine_dir: Path) -> int:
    """Polygraphy listing of an engine's layers and I/O (with this project's plugin library loaded:
    the engines use no TensorRT-LLM plugin); exit code 2 without Polygraphy/TensorRT."""
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
    from ..plugins import plugin_library

    plugins = plugin_library.library_path("libtwotower_plugins.so")
    return subprocess.call([sys.executable, "-m", "polygraphy", "inspect", "model", str(engine), "--model-type",
                            "engine", "--show", "layers", "attrs", "--plugins", str(plugins)])


def build_config(limits, output_dir: Path):
    """The BuildConfig of one tower's engine, as engine_io.TRTLLM_BUILD_FLAGS: padded [B, T] inputs,
    no TensorRT-LLM KV cache (the model has its own caches); the timing cache beside the engines."""
    from tensorrt_llm.bindings import KVCacheType
    from tensorrt_llm.builder import BuildConfig

    config = BuildConfig(max_input_len=limits.max_input_len, max_seq_len=limits.max_seq_len,
                         max_batch_size=limits.max_batch_size,
                         max_num_tokens=limits.max_batch_size * limits.max_input_len, strongly_typed=True,
                         kv_cache_type=KVCacheType.DISABLED, output_timing_cache=str(output_dir / "timing.cache"))
    config.plugin_config.remove_input_padding = False
    return config


def build_engines(checkpoints: dict, out_dir: Path, cfg, limits, workers: int = 1) -> None:
    """Build ``out_dir/engines/{tower}/`` from the converted checkpoints (the Python-API equivalent of
    the trtllm-build commands) and record in the manifest what built them."""
    _require()
    from tensorrt_llm.builder import build

    from ..engine_io import write_manifest
    from ..plugins import plugin_library

    plugin_library.check_config(cfg)  # its kernels were compiled for this model's shapes
    plugin_lib = plugin_library.load_trt_plugins()  # registers the twotower creators
    for tower, ckpt in checkpoints.items():
        model = MODEL_CLASSES[tower].from_checkpoint(str(ckpt))
        engine = build(model, build_config(limits, out_dir))
        engine.save(str(out_dir / "engines" / tower))
    write_manifest(out_dir, cfg, limits, list(checkpoints), built_with={
        "tensorrt_llm": tensorrt_llm.__version__, "tensorrt": trt.__version__, "plugin_library": str(plugin_lib),
        "plugin_sha256": hashlib.sha256(Path(plugin_lib).read_bytes()).hexdigest()})


MODEL_CLASSES: dict = {}

if tensorrt_llm is not None:
    from tensorrt_llm.models import MODEL_MAP

    from ..checkpoint import CONTEXT, DENOISER, TWOTOWER
    from ..config import config_from_dict
    from ..convert import ARCHITECTURES, module_tree, trtllm_params
    from ..engine_io import BuildLimits, engine_io, profiles, state_names
    from . import towers

    class TwoTowerConfig(PretrainedConfig):
        """PretrainedConfig carrying the model's own config.json fields under ``twotower``."""

    class _Layer(Module):
        """One layer's parameters, as attributes named by their slot (``in_proj``, ``experts_up`` ...)."""

        def __init__(self, params: dict, dtype: str):
            super().__init__()
            for name, p in params.items():
                setattr(self, name, Parameter(shape=p.shape, dtype="float32" if "float32" in str(p.dtype) else dtype))

    class _TwoTowerModel(PretrainedModel):
        """Parameters declared from ``convert.module_tree`` (so ``named_parameters()`` are the
        converter's names); forward = ``network.towers``."""

        config_class = TwoTowerConfig
        tower = ""

        def __init__(self, config):
            super().__init__(config)
            self.cfg = config_from_dict(config.twotower)
            tree = module_tree(trtllm_params(self.cfg, TWOTOWER, self.tower, _torch_dtype(config.dtype)))
            self._top = [name for name in tree if name != "layers"]
            for name in self._top:
                p = tree[name]
                setattr(self, name, Parameter(shape=p.shape, dtype="float32" if "float32" in str(p.dtype)
                                              else config.dtype))
            self.layers = ModuleList([_Layer(layer, config.dtype) for layer in tree["layers"]])

        def __post_init__(self):
            return  # no quantization rewrites

        def _weights(self) -> dict:
            """The weights tree ``network.towers`` reads, as network tensors (``Parameter.value``)."""
            w = {name: getattr(self, name).value for name in self._top}
            w["layers"] = [{name: p.value for name, p in layer.named_parameters()} for layer in self.layers]
            if self.tower == DENOISER:
                w["scale_shift"] = [layer.pop("scale_shift") for layer in w["layers"]]
            return w

        def _check_plugin_config(self) -> None:
            plugin_config = default_net().plugin_config
            if plugin_config.remove_input_padding:
                raise ValueError("the TwoTower engines take padded [batch, tokens] inputs: build with "
                                 "--remove_input_padding disable (build_engine.py does)")

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
                inputs[spec.name] = F.Tensor(name=spec.name, dtype=str_dtype_to_trt(spec.dtype), shape=shape,
                                             dim_range=dims)
            return {"inputs": inputs}

        def _state(self, inputs):
            names = {kind: {i: inputs[n] for i, n in entries} for kind, entries in state_names(self.cfg).items()}
            return towers.TowerState(lengths=inputs["cache_lens"], keys=names["key"], values=names["value"],
                                     conv=names["conv"], ssm=names["ssm"])

    class TwoTowerContextForCausalLM(_TwoTowerModel):
        tower = CONTEXT

        def forward(self, inputs):
            self._check_plugin_config()
            ops = TrtOps(self.config.dtype, commit=True, cfg=self.cfg)
            weights = self._weights()
            hidden, new_state = towers.forward_layers(ops, self.cfg, weights, inputs["input_ids"], self._state(inputs),
                                                      causal=True, commit=True)
            ops.logits(last_position(hidden), weights["lm_head"]).mark_output("last_logits", "float32")
            for i in new_state.keys:
                k_new, v_new = ops.new_kv[f"past_key_{i}"]
                k_new.mark_output(f"new_key_{i}", self.config.dtype)
                v_new.mark_output(f"new_value_{i}", self.config.dtype)
            for i in new_state.conv:
                new_state.conv[i].mark_output(f"present_conv_state_{i}", self.config.dtype)
                new_state.ssm[i].mark_output(f"present_ssm_state_{i}", "float32")

    class TwoTowerDenoiser(_TwoTowerModel):
        tower = DENOISER

        def forward(self, inputs):
            self._check_plugin_config()
            ops = TrtOps(self.config.dtype, commit=False, cfg=self.cfg)
            logits = towers.denoise(ops, self.cfg, self._weights(), self._state(inputs), inputs["input_ids"],
                                    inputs["timestep"])  # [B, T, V] fp32
            logits.mark_output("logits", "float32")
            masked = logits + F.constant(_mask_row(self.cfg))  # the mask token can never be predicted
            confidence, pred = F.topk(F.softmax(masked, dim=2), 1, dim=2, prefer_plugin=False)  # [B, T, 1]
            rows = F.concat([F.shape(logits, 0), F.shape(logits, 1)])
            pred.view(rows).mark_output("pred_ids", "int32")
            confidence.view(rows).mark_output("confidence", "float32")

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
