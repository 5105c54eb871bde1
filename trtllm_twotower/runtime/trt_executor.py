"""The TensorRT executor: the two engines behind the sampler's interface (prefill / extend /
denoise / select), on ``tensorrt_llm.runtime.Session``.

NOT EXECUTED (needs TensorRT-LLM 1.2 and a GPU). State buffers are ``TowerState`` tensors bound by
the names of ``engine_io``; K/V buffers are written in place by the context engine.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint import CONTEXT, DENOISER
from ..engine_io import check_manifest, state_names
from ..network import towers
from .executor import RowStates, StateMirror, check_capacity
from .prefix_cache import PAGE_TOKENS, prefill_rows


class TrtExecutor(RowStates):
    """The two engines behind the executor interface. The context engine has a prefill profile (0)
    and a step profile (1, up to one block); a second execution context runs the steps."""

    modes = ("diffusion", "ar")  # mock-AR needs an untimed denoiser, speculative per-position states
    page_tokens = PAGE_TOKENS

    def __init__(self, cfg, sessions: dict, manifest: dict, context_device, denoiser_device):
        self.cfg = cfg
        self.sessions = sessions
        self.capacity = manifest["limits"]["max_seq_len"]
        self.block_size = manifest["limits"]["block_size"]
        self.dtype = self._state_dtype(cfg, sessions[CONTEXT].engine)  # the engines' dtype (--dtype at build)
        self.context_device = context_device
        self.denoiser_device = denoiser_device
        self._mirror = StateMirror(denoiser_device) if denoiser_device != context_device else None
        with torch.cuda.device(context_device):  # profile 1 of the context engine: steps and blocks
            self._step_context = sessions[CONTEXT].engine.create_execution_context()
            self._step_context.set_optimization_profile_async(1, torch.cuda.current_stream(context_device).cuda_stream)

    @staticmethod
    def _state_dtype(cfg, engine) -> torch.dtype:
        """The dtype of the K/V and conv state buffers: the engine's own input dtype."""
        from tensorrt_llm._utils import trt_dtype_to_torch

        names = state_names(cfg)
        name = next(n for kind in ("key", "conv") for _, n in names[kind])
        return trt_dtype_to_torch(engine.get_tensor_dtype(name))

    @classmethod
    def from_engine_dir(cls, engine_dir, cfg, context_device, denoiser_device) -> "TrtExecutor":
        if engine_dir is None:
            raise ValueError("engine_dir: required for backend='trt'")
        manifest = check_manifest(Path(engine_dir), cfg)
        from tensorrt_llm.runtime.session import Session

        from ..plugins import plugin_library

        plugin_library.check_config(cfg)  # its kernels were compiled for this model's shapes
        plugin_library.load_trt_plugins()  # before deserialising: the engines contain our plugins
        sessions = {}
        for tower, device in ((CONTEXT, context_device), (DENOISER, denoiser_device)):
            with torch.cuda.device(device):
                sessions[tower] = Session.from_serialized_engine(
                    (Path(engine_dir) / manifest["engines"][tower] / "rank0.engine").read_bytes())
        return cls(cfg, sessions, manifest, context_device, denoiser_device)

    def _run(self, tower: str, device, feeds: dict, context=None) -> dict:
        from tensorrt_llm._utils import trt_dtype_to_torch
        from tensorrt_llm.runtime.session import TensorInfo

        session = self.sessions[tower]
        with torch.cuda.device(device):  # Session.run does not select the engine's device itself
            infos = session.infer_shapes([TensorInfo(n, session.engine.get_tensor_dtype(n), tuple(t.shape))
                                          for n, t in feeds.items()], context)
            outputs = {i.name: torch.empty(tuple(i.shape), dtype=trt_dtype_to_torch(i.dtype), device=device)
                       for i in infos}
            stream = torch.cuda.current_stream(device).cuda_stream
            if not session.run(inputs=feeds, outputs=outputs, stream=stream, context=context):
                raise RuntimeError(f"{tower} engine failed to run")
        return outputs

    def _feeds(self, state: towers.TowerState, ids: torch.Tensor, device) -> dict:
        feeds = {"input_ids": ids.to(device, torch.int32), "cache_lens": state.lengths.to(device, torch.int32)}
        by_kind = {"key": state.keys, "value": state.values, "conv": state.conv, "ssm": state.ssm}
        for kind, entries in state_names(self.cfg).items():
            feeds.update({name: by_kind[kind][i] for i, name in entries})
        return feeds

    def prefill(self, prompts: list[list[int]], capacity: int, pages=None):
        """As ``TorchExecutor.prefill``, with every row's buffers at the engines' capacity."""
        if capacity > self.capacity:
            raise ValueError(f"prompt + output needs {capacity} cache slots; the engines were built for "
                             f"max_seq_len {self.capacity}")
        return prefill_rows(prompts, self.capacity, pages,
                            lambda: towers.empty_state(self.cfg, 1, self.capacity, self.dtype, self.context_device),
                            self._prefill_piece, self.page_tokens)

    def _prefill_piece(self, state, ids: list[int], logits: bool):
        out, state = self.extend(state, torch.tensor([ids]), logits=logits)
        return (None if out is None else out[:, -1]), state

    def extend(self, state, tokens: torch.Tensor, logits: bool, trace: bool = False, in_place: bool = False):
        """The context engine over tokens [B, L]; its new K/V are appended to the state's buffers here.
        (``in_place`` is the torch executor's licence to reuse buffers; the engines return new states.)"""
        if trace:
            raise NotImplementedError("speculative mode needs per-position states: use the torch backend")
        check_capacity(state, tokens.shape[1])
        step = self._step_context if tokens.shape[1] <= self.block_size else None
        out = self._run(CONTEXT, self.context_device, self._feeds(state, tokens, self.context_device), step)
        new_state = towers.committed(
            state, tokens.shape[1], {i: out[f"new_key_{i}"] for i in state.keys}, {i: out[f"new_value_{i}"] for i in state.keys},
            conv={i: out[f"present_conv_state_{i}"] for i in state.conv},
            ssm={i: out[f"present_ssm_state_{i}"] for i in state.ssm})
        return (out["last_logits"][:, None] if logits else None), new_state

    def rollback(self, state, keep):
        raise NotImplementedError("speculative mode needs per-position states: use the torch backend")

    def denoise(self, state, block: torch.Tensor, t):
        if t is None:
            raise NotImplementedError("mock-AR needs the denoiser without time conditioning; its engine always "
                                      "conditions on t: use the torch backend for mock-AR")
        if self._mirror is not None:
            state = self._mirror.update(state)
        feeds = self._feeds(state, block, self.denoiser_device)
        feeds["timestep"] = t.to(self.denoiser_device, torch.float32)
        return self._run(DENOISER, self.denoiser_device, feeds)["logits"]
