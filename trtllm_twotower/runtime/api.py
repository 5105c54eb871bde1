"""The Python API: ``TwoTowerRuntime.from_checkpoint(...).generate(...)``.

Everything a caller passes is validated here, before any work starts; past this edge the sampler
and executors trust their inputs.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..checkpoint import CONTEXT, DENOISER, NANO, CheckpointReader, load_tower_weights, resolve_keys
from ..config import load_config
from ..demo import default_checkpoint
from . import sampler
from .executor import TorchExecutor
from .lanes import MODES, Row, StepEvent
from .scheduler import Scheduler, Ticket

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
MAX_STOP_STRINGS, MAX_STOP_CHARS = 4, 256  # OpenAI's count; a bound on the text searched per token
MAX_STEPS_PER_BLOCK = 1024  # denoiser steps one block may take (more is a typo, or an attempt to hold the batch)


@dataclass(frozen=True)
class BlockEvent:
    """Streaming: one row's newly committed tokens and the text they add."""

    row: int
    token_ids: list[int]
    text: str
    finished: bool
    logprobs: list[sampler.TokenLogprob] | None = None  # one per token id, when the request asked


@dataclass(frozen=True)
class GenerationResult:
    output_ids: list[list[int]]  # new tokens per prompt (up to and including EOS or the token completing a stop
    # string, at most max_new_tokens)
    text: list[str] | None  # their decoded text, special tokens skipped, cut before a stop string (None without
    # a tokenizer)
    nfe: int  # forwards that produced tokens, max over rows (see ``lanes.RowOutput.steps``)
    nfe_per_row: list[int]
    tokens_per_step: float  # generated tokens / forwards, over all rows
    seconds: float
    stats: dict = field(default_factory=dict)  # forwards of both towers; speculative acceptance
    finish_reasons: list[str] = field(default_factory=list)  # per row: "stop" (EOS or a stop string), "length",
    # "cancelled"
    logprobs: list[list[sampler.TokenLogprob]] | None = None  # per row, one per output id (None: not asked)


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
    """A validated, tokenized request: one row per prompt, each with its own seed."""

    mode: str
    prompt_ids: list[list[int]]
    settings: sampler.SamplerSettings
    seeds: list[int]
    stop: tuple[str, ...] = ()  # a row ends at the first of these in its text


class _TextStream:
    """Per-row incremental decoding: deltas whose concatenation is the final text. A trailing
    partial UTF-8 character (decoded as U+FFFD) is held back until its bytes arrive. With stop
    strings, a row's text ends before the first match, found as its tokens arrive (``stopped`` maps
    the row to the number of tokens that completed it), and a tail that may begin one is held back."""

    def __init__(self, tokenizer, rows: int, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.tokens: list[list[int]] = [[] for _ in range(rows)]
        self.sent = [""] * rows
        self.stop = stop
        self.stopped: dict[int, int] = {}

    def push(self, row: int, token_ids: list[int], final: bool) -> str | None:
        if self.tokenizer is None:
            return None
        if row in self.stopped:  # its text is complete
            return ""
        before = len(self.tokens[row])
        self.tokens[row].extend(token_ids)
        text = self.tokenizer.decode(self.tokens[row], skip_special_tokens=True)
        cut = self._first_stop(row, text, before) if self.stop else None
        if cut is not None:
            text = text[:cut]
        elif not final:
            text = text.rstrip("\ufffd")
            text = text[: len(text) - self._stop_prefix(text)]
        if not text.startswith(self.sent[row]):  # a held-back character resolved differently
            text = self.sent[row] + text[len(self.sent[row]):]
        delta = text[len(self.sent[row]):]
        self.sent[row] = text
        return delta

    def _stop_prefix(self, text: str) -> int:
        """Characters at the end of ``text`` that may begin a stop string: held back until the
        next tokens tell (text sent cannot be taken back)."""
        return max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)

    def _first_stop(self, row: int, text: str, before: int) -> int | None:
        """Where the first stop string starts in ``text`` (None: nowhere); records the tokens that
        completed it. Only text that can hold a new match is searched."""
        start = max(0, len(self.sent[row]) - max(map(len, self.stop)) + 1)
        found = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
        if not found:
            return None
        cut = min(found)
        tokens = self.tokens[row]
        for kept in range(before + 1, len(tokens) + 1):  # the first token at which a match is complete
            prefix = self.tokenizer.decode(tokens[:kept], skip_special_tokens=True)
            if any(prefix.find(s, start) >= 0 for s in self.stop):
                break
        self.stopped[row] = kept
        return cut


class TextTicket(Ticket):
    """A ticket of the Python API: it also carries its request's stop strings."""

    def __init__(self, on_done: Callable[[Ticket], None] | None, stop: tuple[str, ...]):
        super().__init__(None, on_done)
        self.stop = stop


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(directory: Path):
    """The checkpoint's tokenizer, or None when it ships no tokenizer files (ids in, ids out)."""
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError, TypeError) as err:
        raise ValueError(f"tokenizer: the files in {directory} do not load ({err})") from err


class TwoTowerRuntime:
    """Both towers on their devices plus the tokenizer; ``generate`` runs any mode on a batch.

    Requests go through one in-flight-batching ``Scheduler`` (``runtime.scheduler``): the Python
    API drives it in the caller's thread; a server starts it in the background (``serve``)."""

    def __init__(self, cfg, executor, tokenizer, checkpoint_dir: Path, has_denoiser: bool,
                 max_batch: int | None = None, memory_budget: int | None = None,
                 prefix_cache_bytes: int | None = None):
        self.cfg = cfg
        self.executor = executor
        self.tokenizer = tokenizer
        self.checkpoint_dir = checkpoint_dir
        self.has_denoiser = has_denoiser
        self.scheduler = Scheduler(executor, cfg, max_batch=max_batch, memory_budget=memory_budget,
                                   prefix_cache_bytes=prefix_cache_bytes)

    @classmethod
    def from_checkpoint(cls, path: str | Path | None = None, backend: str = "torch", dtype: str = "bfloat16",
                        context_device: str | None = None, denoiser_device: str | None = None,
                        engine_dir: str | Path | None = None, max_batch: int | None = None,
                        memory_budget: int | None = None,
                        prefix_cache_bytes: int | None = None) -> "TwoTowerRuntime":
        """Load an official checkpoint (TwoTower, or a Nano base for AR only). ``path=None`` uses the
        built-in demo checkpoint. backend 'torch' runs the eager towers; 'trt' runs built engines
        from ``engine_dir`` (needs TensorRT-LLM 1.2 and a GPU); 'onnx' runs the exported graphs in
        ``engine_dir`` (``build_engine.py --onnx``) under ONNX Runtime on the CPU, float32 only.
        ``max_batch`` / ``memory_budget`` (bytes of context state) bound the scheduler's running batch;
        ``prefix_cache_bytes`` bounds the prefix cache inside that budget (default: all of it, yielding
        to running rows; 0: off)."""
        if backend not in ("torch", "trt", "onnx"):
            raise ValueError(f"backend: expected 'torch', 'trt' or 'onnx', got {backend!r}")
        if backend == "onnx" and (
                dtype != "float32" or any(d not in (None, "cpu") for d in (context_device, denoiser_device))):
            raise ValueError("backend 'onnx': ONNX Runtime runs the float32 graphs on the CPU (dtype='float32', "
                             "no devices)")
        if dtype not in DTYPES:
            raise ValueError(f"dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
        for name, value in (("max_batch", max_batch), ("memory_budget", memory_budget)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if prefix_cache_bytes is not None and (isinstance(prefix_cache_bytes, bool)
                                               or not isinstance(prefix_cache_bytes, int) or prefix_cache_bytes < 0):
            raise ValueError(f"prefix_cache_bytes: expected an integer >= 0 (0 = off), got {prefix_cache_bytes!r}")
        default_ctx, default_den = default_devices()
        ctx_dev = parse_device(context_device or default_ctx, "context_device")
        # the denoiser follows an explicit context device unless given its own
        den_dev = parse_device(denoiser_device or context_device or default_den, "denoiser_device")
        directory = Path(path) if path else default_checkpoint()
        cfg = load_config(directory)
        reader = CheckpointReader(directory)
        layout, on_disk = resolve_keys(reader, cfg, (CONTEXT, DENOISER))
        if backend == "trt":
            from .trt_executor import TrtExecutor  # needs TensorRT-LLM

            executor = TrtExecutor.from_engine_dir(engine_dir, cfg, ctx_dev, den_dev)
        elif backend == "onnx":
            from .onnx_executor import OnnxExecutor  # needs the onnx extra

            executor = OnnxExecutor.from_onnx_dir(engine_dir, cfg)
        else:
            torch_dtype = DTYPES[dtype]
            ctx = load_tower_weights(reader, cfg, CONTEXT, torch_dtype, ctx_dev, layout, on_disk)
            den = None if layout == NANO else load_tower_weights(reader, cfg, DENOISER, torch_dtype, den_dev,
                                                                 layout, on_disk)
            executor = TorchExecutor(cfg, ctx, den, torch_dtype, ctx_dev, den_dev)
        return cls(cfg, executor, load_tokenizer(directory), directory, has_denoiser=layout != NANO,
                   max_batch=max_batch, memory_budget=memory_budget, prefix_cache_bytes=prefix_cache_bytes)

    # ---- generation -------------------------------------------------------------------------
    @functools.cached_property
    def max_prompt_chars(self) -> int | None:
        """Characters beyond which a text prompt cannot fit the model's context whatever it
        tokenizes to (the limit times the longest token's text), so it is refused before tokenizing."""
        if self.tokenizer is None:
            return None
        longest = max(map(len, self.tokenizer.get_vocab()))
        return self.cfg.max_position_embeddings * longest

    def _prompt_ids(self, prompts) -> list[list[int]]:
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, Sequence) or isinstance(prompts, (bytes, bytearray)) or len(prompts) == 0:
            raise ValueError("prompts: expected a string, a non-empty list of strings, or a list of token-id lists")
        ids = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise ValueError(f"prompts[{i}]: text needs a tokenizer and {self.checkpoint_dir} has none; "
                                     "pass token ids")
                if len(p) > self.max_prompt_chars:
                    raise ValueError(f"prompts[{i}]: {len(p)} characters, more than any prompt that fits the model's "
                                     f"limit of {self.cfg.max_position_embeddings} tokens can have")
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
                eos_token_id: int | None = -1, mask_token_id: int | None = None,
                stop: str | Sequence[str] | None = None, logprobs: int | None = None) -> "PreparedRequest":
        """Validate and tokenize; raises ValueError naming the bad parameter. See ``generate``."""
        stop = self._stop_strings(stop)
        prompt_ids = self._prompt_ids(prompts)
        eos = self.cfg.eos_token_id if eos_token_id == -1 else eos_token_id
        mask = self.cfg.mask_token_id if mask_token_id is None else mask_token_id
        settings = sampler.SamplerSettings(max_new_tokens, block_size, steps_per_block, confidence_threshold,
                                           temperature, top_k, top_p, mask, eos, logprobs)
        self._validate(mode, settings, prompt_ids)
        seeds = [seed] * len(prompt_ids) if isinstance(seed, int) and not isinstance(seed, bool) else seed
        if (not isinstance(seeds, Sequence) or len(seeds) != len(prompt_ids)
                or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2 ** 63 for s in seeds)):
            raise ValueError(f"seed: expected an int in [0, 2^63) or one per prompt ({len(prompt_ids)}), got {seed!r}")
        return PreparedRequest(mode, prompt_ids, settings, list(seeds), stop)

    def _stop_strings(self, stop) -> tuple[str, ...]:
        if stop is None:
            return ()
        stop = [stop] if isinstance(stop, str) else stop
        if (not isinstance(stop, Sequence) or not 1 <= len(stop) <= MAX_STOP_STRINGS
                or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stop)):
            raise ValueError(f"stop: expected a string or a list of 1 to {MAX_STOP_STRINGS} non-empty strings of at "
                             f"most {MAX_STOP_CHARS} characters, got {stop!r:.200}")
        if self.tokenizer is None:
            raise ValueError(f"stop: stop strings need a tokenizer and {self.checkpoint_dir} has none")
        return tuple(stop)

    def submit(self, request: "PreparedRequest", on_block: Callable[[BlockEvent], None] | None = None,
               on_done: Callable[[Ticket], None] | None = None,
               on_step: Callable[[StepEvent], None] | None = None) -> Ticket:
        """Queue a prepared request on the scheduler; returns its ticket (``done``, ``cancel()``,
        ``result(ticket)``). ``on_block``, ``on_step`` and ``on_done`` run on the scheduler's thread."""
        stream = _TextStream(self.tokenizer, len(request.prompt_ids), request.stop)
        ticket = TextTicket(on_done, request.stop)
        asked = request.settings.logprobs is not None
        if on_block is not None or request.stop:
            def on_event(row: int, tokens: list[int], finished: bool) -> None:
                before = len(stream.tokens[row])
                text = stream.push(row, tokens, finished)
                if row in stream.stopped and row not in ticket.stopped:  # this event completed a stop string
                    ticket.stop_row(row, stream.stopped[row])
                    tokens = tokens[: stream.stopped[row] - before]
                elif row in ticket.stopped:
                    tokens = []
                if on_block is not None:
                    # the row's output so far ends with these tokens: their entries are the last ones
                    logprobs = ticket.rows[row].out.logprobs[before: before + len(tokens)] if asked else None
                    on_block(BlockEvent(row, tokens, text, finished or row in ticket.stopped, logprobs))

            ticket.on_event = on_event
        return self.scheduler.submit(request.mode, request.prompt_ids, request.settings, request.seeds,
                                     on_step=on_step, ticket=ticket)

    def result(self, ticket: Ticket) -> GenerationResult:
        """The finished ticket's outputs (raises the error of a failed one)."""
        if ticket.error is not None:
            raise ticket.error
        outs = [r.out for r in ticket.rows]
        tokens = [o.tokens[: ticket.stopped.get(i, len(o.tokens))] for i, o in enumerate(outs)]
        logprobs = None if ticket.rows[0].settings.logprobs is None else \
            [o.logprobs[: len(t)] for o, t in zip(outs, tokens)]
        steps = [o.steps for o in outs]
        generated = sum(map(len, tokens))
        den, ctx = sum(o.denoiser_forwards for o in outs), sum(o.context_forwards for o in outs)
        stats = {"denoiser_forwards": den, "context_forwards": ctx,
                 "forwards_per_token": (den + ctx) / max(1, generated),
                 "cached_tokens": sum(o.cached_tokens for o in outs)}
        blocks = [a for o in outs for a in o.accepted]
        if blocks:
            tries = [sum(col) for col in zip(*(o.attempts_by_position for o in outs if o.attempts_by_position))]
            hits = [sum(col) for col in zip(*(o.accepts_by_position for o in outs if o.accepts_by_position))]
            stats.update(blocks=len(blocks), accepted_per_block=sum(blocks) / len(blocks),
                         tokens_per_block=generated / len(blocks),
                         acceptance_by_position=[h / t if t else None for h, t in zip(hits, tries)])
        eos = [r.settings.eos_token_id for r in ticket.rows]
        reasons = ["stop" if i in ticket.stopped or (t and t[-1] == eos[i]) else
                   "cancelled" if outs[i].cancelled else "length" for i, t in enumerate(tokens)]
        text = None if self.tokenizer is None else [self.tokenizer.decode(t, skip_special_tokens=True)
                                                    for t in tokens]
        for i in ticket.stopped:  # only a TextTicket stops rows
            text[i] = text[i][: min(j for j in (text[i].find(s) for s in ticket.stop) if j >= 0)]
        return GenerationResult(
            output_ids=tokens, text=text, finish_reasons=reasons, logprobs=logprobs,
            nfe=max(steps), nfe_per_row=steps, tokens_per_step=generated / max(1, sum(steps)),
            seconds=(ticket.finished or time.perf_counter()) - ticket.submitted, stats=stats)

    def run(self, request: "PreparedRequest", on_block: Callable[[BlockEvent], None] | None = None,
            on_step: Callable[[StepEvent], None] | None = None) -> GenerationResult:
        """Generate for a prepared (validated) request, waiting for it."""
        ticket = self.submit(request, on_block, on_step=on_step)
        self.scheduler.run_until(ticket)
        return self.result(ticket)

    def generate(self, prompts, max_new_tokens: int = 64, mode: str = "diffusion", block_size: int = 16,
                 steps_per_block: int = 16, confidence_threshold: float = 0.8, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int | Sequence[int] = 0,
                 eos_token_id: int | None = -1, mask_token_id: int | None = None,
                 on_block: Callable[[BlockEvent], None] | None = None,
                 on_step: Callable[[StepEvent], None] | None = None,
                 stop: str | Sequence[str] | None = None, logprobs: int | None = None) -> GenerationResult:
        """Generate for one prompt or a batch. ``eos_token_id=-1`` (default) takes the checkpoint's;
        None never stops early. ``seed``: one for every row, or one per row (each row has its own
        generator, so a row's tokens do not depend on the rest of the batch). ``on_block`` receives
        a BlockEvent per committed block and row (per token in AR / mock-AR). ``on_step`` receives a
        ``StepEvent`` per forward and row: each denoiser step's commits (positions, tokens,
        confidences), each block as it joins the output (speculative: drafts accepted, the
        corrected token), each AR / mock-AR token. Without it nothing extra is read back from the
        device; with it a step reads its commits back (a few small reads per step). ``stop``: a row
        ends at the first of these strings in its text (checked as its tokens are committed, in
        every mode); its text stops before it, its ids at the token that completed it.
        ``logprobs``: None (default) computes none; N in 0..20 gives ``result.logprobs``, one
        ``TokenLogprob`` per output id (and in ``on_block`` / ``on_step`` events): the token's
        log-probability and the N most likely tokens under log_softmax(logits / T), T the
        temperature (1 when greedy), before top_k / top_p, of the forward that chose it: AR and
        mock-AR their own forward, speculative the AR distribution at that position (the context
        tower's verifying logits), diffusion the denoiser step that committed it (mask token
        excluded). The tokens are the same with and without."""
        request = self.prepare(prompts, max_new_tokens, mode, block_size, steps_per_block, confidence_threshold,
                               temperature, top_k, top_p, seed, eos_token_id, mask_token_id, stop, logprobs)
        return self.run(request, on_block, on_step)

    def _validate(self, mode: str, s: sampler.SamplerSettings, prompt_ids: list[list[int]]) -> None:
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {list(MODES)}, got {mode!r}")
        if mode != "ar" and not self.has_denoiser:
            raise ValueError(f"mode: {mode!r} needs a denoiser tower; this checkpoint ({self.checkpoint_dir}) "
                             "is a single-tower Nano base, use mode='ar'")
        if mode not in self.executor.modes:
            raise ValueError(f"mode: {mode!r} is not available with this backend (it runs {list(self.executor.modes)})")
        ints = {"max_new_tokens": s.max_new_tokens, "block_size": s.block_size,
                "steps_per_block": s.steps_per_block, "top_k": s.top_k}
        for name, value in ints.items():
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name}: expected an integer, got {value!r}")
        for name in ("max_new_tokens", "block_size", "steps_per_block"):
            if ints[name] < 1:
                raise ValueError(f"{name}: must be >= 1, got {ints[name]}")
        if s.steps_per_block > MAX_STEPS_PER_BLOCK:
            raise ValueError(f"steps_per_block: must be <= {MAX_STEPS_PER_BLOCK}, got {s.steps_per_block}")
        if mode == "speculative" and s.block_size < 2:
            raise ValueError(f"block_size: speculative mode drafts at least one token after the known one; "
                             f"must be >= 2, got {s.block_size}")
        if s.top_k < 0:
            raise ValueError(f"top_k: must be >= 0 (0 = off), got {s.top_k}")
        top = sampler.MAX_TOP_LOGPROBS
        if s.logprobs is not None and (isinstance(s.logprobs, bool) or not isinstance(s.logprobs, int)
                                       or not 0 <= s.logprobs <= top):
            raise ValueError(f"logprobs: expected None or an integer in [0, {top}] (alternatives per token), "
                             f"got {s.logprobs!r}")
        for name, value, lo, hi in (("confidence_threshold", s.confidence_threshold, 0.0, 1.0),
                                    ("top_p", s.top_p, 0.0, 1.0)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
                raise ValueError(f"{name}: expected a number in [{lo}, {hi}], got {value!r}")
        if s.top_p == 0:
            raise ValueError("top_p: must be > 0")
        if (isinstance(s.temperature, bool) or not isinstance(s.temperature, (int, float))
                or not 0 <= s.temperature < float("inf")):
            raise ValueError(f"temperature: expected a finite number >= 0, got {s.temperature!r}")
        V = self.cfg.vocab_size
        if isinstance(s.mask_token_id, bool) or not isinstance(s.mask_token_id, int) or not 0 <= s.mask_token_id < V:
            raise ValueError(f"mask_token_id: {s.mask_token_id!r} is outside the vocabulary [0, {V})")
        if s.eos_token_id is not None:
            if isinstance(s.eos_token_id, bool) or not isinstance(s.eos_token_id, int) or not 0 <= s.eos_token_id < V:
                raise ValueError(f"eos_token_id: {s.eos_token_id!r} is outside the vocabulary [0, {V})")
            if s.eos_token_id == s.mask_token_id:
                raise ValueError(f"mask_token_id: equals eos_token_id ({s.eos_token_id})")
        longest = max(map(len, prompt_ids))
        probe = Row(mode, [0] * longest, s, 0, None, None)
        limit = self.cfg.max_position_embeddings
        if probe.tokens_needed > limit:
            raise ValueError(f"max_new_tokens: prompt + output too long: {longest} prompt tokens + {s.max_new_tokens} new tokens need "
                             f"{probe.tokens_needed} cache slots in {mode} mode, more than the model's limit of "
                             f"{limit} tokens")
