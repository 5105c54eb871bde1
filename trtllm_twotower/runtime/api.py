"""The Python API: ``TwoTowerRuntime.from_checkpoint(...).generate(...)``.

Everything a caller passes is validated here, before any work starts; past this edge the sampler
and executors trust their inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..checkpoint import CONTEXT, DENOISER, NANO, CheckpointReader, load_tower_weights, resolve_keys
from ..config import load_config
from ..demo import ensure_demo_checkpoint
from . import sampler
from .executor import TorchExecutor

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class BlockEvent:
    """Streaming: one row's newly committed tokens and the text they add."""

    row: int
    token_ids: list[int]
    text: str
    finished: bool


@dataclass(frozen=True)
class GenerationResult:
    output_ids: list[list[int]]  # new tokens per prompt (up to and including EOS, at most max_new_tokens)
    text: list[str]  # their decoded text, special tokens skipped
    nfe: int  # forwards that produced tokens: denoiser steps (diffusion, mock-AR), decode steps (AR); max over rows
    nfe_per_row: list[int]
    tokens_per_step: float  # generated tokens / forwards, over all rows
    seconds: float


def default_devices() -> tuple[str, str]:
    """Two GPUs: one tower each; one GPU: both on it; none: CPU."""
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n >= 2:
        return "cuda:0", "cuda:1"
    if n == 1:
        return "cuda:0", "cuda:0"
    return "cpu", "cpu"


def parse_device(name: str, argument: str) -> torch.device:
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"{argument}: unknown device {name!r}") from err
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = device.index if device.index is not None else 0
        if index >= count:
            raise ValueError(f"{argument}: {name!r} is not available ({count} CUDA device(s) visible)")
        return torch.device("cuda", index)
    if device.type != "cpu":
        raise ValueError(f"{argument}: unsupported device type {name!r} (cpu or cuda[:N])")
    return device


@dataclass(frozen=True)
class PreparedRequest:
    """A validated, tokenized request. Requests with equal ``mode`` and ``settings`` can run as one
    batch (``merge``): every row keeps its own seed, so its tokens do not change."""

    mode: str
    prompt_ids: list[list[int]]
    settings: sampler.SamplerSettings
    seeds: list[int]

    @property
    def batch_key(self) -> tuple:
        return (self.mode, self.settings)

    @staticmethod
    def merge(requests: list["PreparedRequest"]) -> "PreparedRequest":
        first = requests[0]
        if any(r.batch_key != first.batch_key for r in requests):
            raise ValueError("merge: requests differ in mode or sampler settings")
        return PreparedRequest(first.mode, [p for r in requests for p in r.prompt_ids], first.settings,
                               [s for r in requests for s in r.seeds])


class _TextStream:
    """Per-row incremental decoding: deltas whose concatenation is the final text. A trailing
    partial UTF-8 character (decoded as U+FFFD) is held back until its bytes arrive."""

    def __init__(self, tokenizer, rows: int):
        self.tokenizer = tokenizer
        self.tokens: list[list[int]] = [[] for _ in range(rows)]
        self.sent = [""] * rows

    def push(self, row: int, token_ids: list[int], final: bool) -> str:
        self.tokens[row].extend(token_ids)
        text = self.tokenizer.decode(self.tokens[row], skip_special_tokens=True)
        if not final:
            text = text.rstrip("\ufffd")
        if not text.startswith(self.sent[row]):  # a held-back character resolved differently
            text = self.sent[row] + text[len(self.sent[row]):]
        delta = text[len(self.sent[row]):]
        self.sent[row] = text
        return delta


class TwoTowerRuntime:
    """Both towers on their devices plus the tokenizer; ``generate`` runs any mode on a batch."""

    def __init__(self, cfg, executor, tokenizer, checkpoint_dir: Path, has_denoiser: bool):
        self.cfg = cfg
        self.executor = executor
        self.tokenizer = tokenizer
        self.checkpoint_dir = checkpoint_dir
        self.has_denoiser = has_denoiser

    @classmethod
    def from_checkpoint(cls, path: str | Path | None = None, backend: str = "torch", dtype: str = "bfloat16",
                        context_device: str | None = None, denoiser_device: str | None = None,
                        engine_dir: str | Path | None = None) -> "TwoTowerRuntime":
        """Load an official checkpoint (TwoTower, or a Nano base for AR only). ``path=None`` uses the
        built-in demo checkpoint, generated on first use. backend 'torch' runs the eager towers;
        'trt' runs built engines from ``engine_dir`` (needs TensorRT-LLM 1.2 and a GPU)."""
        if backend not in ("torch", "trt"):
            raise ValueError(f"backend: expected 'torch' or 'trt', got {backend!r}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
        default_ctx, default_den = default_devices()
        ctx_dev = parse_device(context_device or default_ctx, "context_device")
        # the denoiser follows an explicit context device unless given its own
        den_dev = parse_device(denoiser_device or context_device or default_den, "denoiser_device")
        directory = Path(path) if path else ensure_demo_checkpoint()
        cfg = load_config(directory)
        reader = CheckpointReader(directory)
        layout, on_disk = resolve_keys(reader, cfg, (CONTEXT, DENOISER))
        if backend == "trt":
            from .trt_executor import TrtExecutor  # needs TensorRT-LLM

            executor = TrtExecutor.from_engine_dir(engine_dir, cfg, ctx_dev, den_dev)
        else:
            torch_dtype = DTYPES[dtype]
            ctx = load_tower_weights(reader, cfg, CONTEXT, torch_dtype, ctx_dev, layout, on_disk)
            den = None if layout == NANO else load_tower_weights(reader, cfg, DENOISER, torch_dtype, den_dev,
                                                                 layout, on_disk)
            executor = TorchExecutor(cfg, ctx, den, torch_dtype, ctx_dev, den_dev)
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(directory)
        except (OSError, ValueError) as err:
            raise ValueError(f"tokenizer: cannot load one from {directory} ({err})") from err
        return cls(cfg, executor, tokenizer, directory, has_denoiser=layout != NANO)

    # ---- generation -------------------------------------------------------------------------
    def _prompt_ids(self, prompts) -> list[list[int]]:
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, Sequence) or isinstance(prompts, (bytes, bytearray)) or len(prompts) == 0:
            raise ValueError("prompts: expected a string, a non-empty list of strings, or a list of token-id lists")
        ids = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                tokens = self.tokenizer.encode(p)
            elif isinstance(p, Sequence) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
                tokens = list(p)
            else:
                raise ValueError(f"prompts[{i}]: expected a string or a list of ints, got {type(p).__name__}")
            if not tokens:
                raise ValueError(f"prompts[{i}]: empty prompt")
            bad = [t for t in tokens if not 0 <= t < self.cfg.vocab_size]
            if bad:
                raise ValueError(f"prompts[{i}]: token ids {bad[:5]} outside the vocabulary of {self.cfg.vocab_size}")
            ids.append(tokens)
        return ids

    def prepare(self, prompts, max_new_tokens: int = 64, mode: str = "diffusion", block_size: int = 16,
                steps_per_block: int = 16, confidence_threshold: float = 0.8, temperature: float = 0.0,
                top_k: int = 0, top_p: float = 1.0, seed: int | Sequence[int] = 0,
                eos_token_id: int | None = -1, mask_token_id: int | None = None) -> "PreparedRequest":
        """Validate and tokenize; raises ValueError naming the bad parameter. See ``generate``."""
        prompt_ids = self._prompt_ids(prompts)
        eos = self.cfg.eos_token_id if eos_token_id == -1 else eos_token_id
        mask = self.cfg.mask_token_id if mask_token_id is None else mask_token_id
        settings = sampler.SamplerSettings(max_new_tokens, block_size, steps_per_block, confidence_threshold,
                                           temperature, top_k, top_p, mask, eos)
        self._validate(mode, settings, prompt_ids)
        seeds = [seed] * len(prompt_ids) if isinstance(seed, int) and not isinstance(seed, bool) else seed
        if (not isinstance(seeds, Sequence) or len(seeds) != len(prompt_ids)
                or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)):
            raise ValueError(f"seed: expected a non-negative int or one per prompt ({len(prompt_ids)}), got {seed!r}")
        return PreparedRequest(mode, prompt_ids, settings, list(seeds))

    def run(self, request: "PreparedRequest", on_block: Callable[[BlockEvent], None] | None = None) -> GenerationResult:
        """Generate for a prepared (validated) request."""
        # draws happen where the logits are: the context device in AR mode, the denoiser's otherwise
        device = self.executor.context_device if request.mode == "ar" else self.executor.denoiser_device
        generators = [torch.Generator(device=device).manual_seed(s) for s in request.seeds]
        stream = _TextStream(self.tokenizer, len(request.prompt_ids))
        on_commit = None
        if on_block is not None:
            def on_commit(c: sampler.BlockCommit) -> None:
                on_block(BlockEvent(c.row, c.token_ids, stream.push(c.row, c.token_ids, c.finished), c.finished))

        outputs, seconds = sampler.run(request.mode, self.executor, request.prompt_ids, request.settings,
                                       generators, on_commit)
        tokens = [o.tokens for o in outputs]
        steps = [o.steps for o in outputs]
        return GenerationResult(
            output_ids=tokens,
            text=[self.tokenizer.decode(t, skip_special_tokens=True) for t in tokens],
            nfe=max(steps), nfe_per_row=steps,
            tokens_per_step=sum(map(len, tokens)) / max(1, sum(steps)),
            seconds=seconds,
        )

    def generate(self, prompts, max_new_tokens: int = 64, mode: str = "diffusion", block_size: int = 16,
                 steps_per_block: int = 16, confidence_threshold: float = 0.8, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int | Sequence[int] = 0,
                 eos_token_id: int | None = -1, mask_token_id: int | None = None,
                 on_block: Callable[[BlockEvent], None] | None = None) -> GenerationResult:
        """Generate for one prompt or a batch. ``eos_token_id=-1`` (default) takes the checkpoint's;
        None never stops early. ``seed``: one for every row, or one per row (each row has its own
        generator, so a row's tokens do not depend on the rest of the batch). ``on_block`` receives
        a BlockEvent per committed block and row (per token in AR / mock-AR)."""
        request = self.prepare(prompts, max_new_tokens, mode, block_size, steps_per_block, confidence_threshold,
                               temperature, top_k, top_p, seed, eos_token_id, mask_token_id)
        return self.run(request, on_block)

    def _validate(self, mode: str, s: sampler.SamplerSettings, prompt_ids: list[list[int]]) -> None:
        if mode not in sampler.MODES:
            raise ValueError(f"mode: expected one of {sorted(sampler.MODES)}, got {mode!r}")
        if mode != "ar" and not self.has_denoiser:
            raise ValueError(f"mode: {mode!r} needs a denoiser tower; this checkpoint ({self.checkpoint_dir}) "
                             "is a single-tower Nano base, use mode='ar'")
        ints = {"max_new_tokens": s.max_new_tokens, "block_size": s.block_size,
                "steps_per_block": s.steps_per_block, "top_k": s.top_k}
        for name, value in ints.items():
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name}: expected an integer, got {value!r}")
        for name in ("max_new_tokens", "block_size", "steps_per_block"):
            if ints[name] < 1:
                raise ValueError(f"{name}: must be >= 1, got {ints[name]}")
        if s.top_k < 0:
            raise ValueError(f"top_k: must be >= 0 (0 = off), got {s.top_k}")
        for name, value, lo, hi in (("confidence_threshold", s.confidence_threshold, 0.0, 1.0),
                                    ("top_p", s.top_p, 0.0, 1.0)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
                raise ValueError(f"{name}: expected a number in [{lo}, {hi}], got {value!r}")
        if s.top_p == 0:
            raise ValueError("top_p: must be > 0")
        if isinstance(s.temperature, bool) or not isinstance(s.temperature, (int, float)) or not s.temperature >= 0:
            raise ValueError(f"temperature: expected a number >= 0, got {s.temperature!r}")
        V = self.cfg.vocab_size
        if isinstance(s.mask_token_id, bool) or not isinstance(s.mask_token_id, int) or not 0 <= s.mask_token_id < V:
            raise ValueError(f"mask_token_id: {s.mask_token_id!r} is outside the vocabulary [0, {V})")
        if s.eos_token_id is not None:
            if isinstance(s.eos_token_id, bool) or not isinstance(s.eos_token_id, int) or not 0 <= s.eos_token_id < V:
                raise ValueError(f"eos_token_id: {s.eos_token_id!r} is outside the vocabulary [0, {V})")
            if s.eos_token_id == s.mask_token_id:
                raise ValueError(f"mask_token_id: equals eos_token_id ({s.eos_token_id})")
        generated = -(-s.max_new_tokens // s.block_size) * s.block_size if mode == "diffusion" else s.max_new_tokens
        longest = max(map(len, prompt_ids))
        limit = self.cfg.max_position_embeddings
        if longest + generated > limit:
            raise ValueError(f"prompt + output too long: {longest} prompt tokens + {generated} generated "
                             f"> the model's limit of {limit} tokens")
