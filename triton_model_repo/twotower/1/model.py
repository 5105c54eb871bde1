"""Triton python-backend model: Nemotron-Labs-TwoTower, both towers and the in-flight scheduler.

Decoupled. Each request is validated on its own (a bad request gets one error response; the
others are unaffected) and submitted to the runtime's scheduler, which runs in a background thread:
new requests join the running batch at the next denoiser step (each starting its first block at
its own boundary), finished or cancelled ones leave at once (``trtllm_twotower.runtime.scheduler``). Responses are sent from the scheduler's thread.

In front of users: admission is fair between requests (round robin, ``reserved_rows`` of the batch
never held by one request), at most ``max_queued_requests`` wait (then an UNAVAILABLE error: "server
busy"); the launcher's drain file (``TWOTOWER_DRAIN_FILE``) starts the drain: new requests are
refused, running ones end with an error after ``TWOTOWER_DRAIN_SECONDS``; the process exits when its
server is gone (never an orphan). Model-level figures go to Triton's metrics port (custom metrics).
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
INT64_MAX = 2**63 - 1

# The runtime's names for the inputs that tensorrtllm_backend clients call otherwise.
_INPUT_NAMES = {"max_new_tokens": "max_tokens", "seed": "random_seed"}


class RequestError(ValueError):
    """A request the model cannot serve; the message names the input and quotes its value."""


def _send(sender, response=None, flags: int = 0) -> None:
    """Send, never raising: a client that vanished must not take the scheduler thread down with it."""
    try:
        sender.send(response, flags=flags)
    except Exception as err:  # noqa: BLE001 - logged, the other requests go on
        pb_utils.Logger.log_warn(f"twotower: could not send a response ({err})")


def _error(sender, message: str, code: str = "INVALID_ARG") -> None:
    """One final error response; ``code`` names a ``pb_utils.TritonError`` code (clients see it; HTTP
    ``generate`` answers 400 whatever the code)."""
    error = pb_utils.TritonError(f"twotower: {message}", getattr(pb_utils.TritonError, code))
    _send(sender, pb_utils.InferenceResponse(error=error), FINAL)


LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
TOKENS_PER_STEP_BUCKETS = [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0, 64.0]


class ModelMetrics:
    """The model's figures on Triton's metrics port (python-backend custom metrics), named as the
    OpenAI server's ``/metrics`` names them with ``twotower_model_`` in front."""

    OUTCOMES = ("ok", "cancelled", "bad_request", "rejected", "unavailable", "error")

    def __init__(self):
        self.families = []  # a Metric lives only as long as its MetricFamily: keep them all

        def metric(name: str, text: str, kind: str, labels: dict | None = None, **kw):
            family = pb_utils.MetricFamily(f"twotower_model_{name}", text, getattr(pb_utils.MetricFamily, kind))
            self.families.append(family)
            return family.Metric(labels=labels or {}, **kw)

        requests = pb_utils.MetricFamily("twotower_model_requests_total", "Requests by outcome",
                                         pb_utils.MetricFamily.COUNTER)
        self.families.append(requests)
        self.requests = {o: requests.Metric(labels={"outcome": o}) for o in self.OUTCOMES}
        self.prompt_tokens = metric("prompt_tokens_total", "Prompt tokens prefilled", "COUNTER")
        self.generated_tokens = metric("generated_tokens_total", "Tokens generated", "COUNTER")
        self.spec_blocks = metric("speculative_blocks_total", "Speculative blocks verified", "COUNTER")
        self.spec_accepted = metric("speculative_accepted_drafts_total", "Drafted tokens accepted", "COUNTER")
        self.running = metric("rows_running", "Rows in the running batch", "GAUGE")
        self.waiting = metric("rows_waiting", "Rows waiting for admission", "GAUGE")
        self.first_block = metric("time_to_first_block_seconds", "Submission to first tokens", "HISTOGRAM",
                                  buckets=LATENCY_BUCKETS)
        self.tokens_per_step = metric("tokens_per_step", "Generated tokens per forward, per request", "HISTOGRAM",
                                      buckets=TOKENS_PER_STEP_BUCKETS)

    def rows(self, scheduler) -> None:
        self.running.set(scheduler.running)
        self.waiting.set(scheduler.waiting)

    def finished(self, ticket, result) -> None:
        self.requests["cancelled" if ticket.cancelled else "ok"].increment(1)
        self.prompt_tokens.increment(sum(len(r.prompt) for r in ticket.rows))
        self.generated_tokens.increment(sum(map(len, result.output_ids)))
        if ticket.first_tokens is not None:
            self.first_block.observe(ticket.first_tokens - ticket.submitted)
        self.tokens_per_step.observe(result.tokens_per_step)
        accepted = [a for r in ticket.rows for a in r.out.accepted]
        if accepted:
            self.spec_blocks.increment(len(accepted))
            self.spec_accepted.increment(sum(accepted))


class TritonPythonModel:
    """I/O contract (also in config.pbtxt):

    inputs  text_input STRING [1,1] or input_ids INT64 [1,-1] (exactly one); optional, each [1,1]:
            max_tokens INT64, stream BOOL, temperature FP32, top_k INT64, top_p FP32, random_seed UINT64,
            mode STRING (diffusion | speculative | mock-ar | ar), block_size INT64, steps_per_block INT64,
            confidence_threshold FP32. Defaults come from the model's parameters. Unknown request
            parameters are refused (a typo must not be ignored).
    outputs text_output STRING [1,-1] (absent when the checkpoint has no tokenizer), output_ids INT32
            [1,-1], nfe INT32 [1,1], tokens_per_step FP32 [1,1], cached_tokens INT32 [1,1] (prompt tokens
            restored from the prefix cache, not prefilled).
    stream=false: one response with everything, flagged final.
    stream=true: one response per committed block (per token in AR / mock-AR) with the text and ids
            it adds, then one response with the stats (no new text) flagged final.
    Errors: one response carrying the error, flagged final.
    """

    def initialize(self, args):
        self.model_config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(self.model_config):
            raise pb_utils.TritonModelException("twotower: config.pbtxt must set model_transaction_policy { decoupled: true }")
        params = {k: v["string_value"] for k, v in self.model_config.get("parameters", {}).items()}
        root = Path(params.get("project_root") or Path(__file__).resolve().parents[3])
        if str(root) not in sys.path:  # the stub ignores the server's PYTHONPATH
            sys.path.insert(0, str(root))
        from trtllm_twotower.runtime import TwoTowerRuntime

        try:
            limits = {k: int(params[k]) for k in ("max_batch", "memory_budget", "prefix_cache_bytes") if params.get(k)}
            max_queued = int(params.get("max_queued_requests") or 1024)
            self.defaults = {
                "max_tokens": int(params.get("max_tokens", 64)), "mode": params.get("mode", "diffusion"),
                "block_size": int(params.get("block_size", 16)), "steps_per_block": int(params.get("steps_per_block", 16)),
                "confidence_threshold": float(params.get("confidence_threshold", 0.8)),
            }
            self.max_block_size = int(params.get("max_block_size", 64))
        except ValueError as err:
            raise pb_utils.TritonModelException(f"twotower: bad value in config.pbtxt parameters: {err}")
        self.runtime = TwoTowerRuntime.from_checkpoint(
            params.get("checkpoint_dir") or None, backend=params.get("backend") or "torch",
            dtype=params.get("dtype") or "bfloat16", context_device=params.get("context_device") or None,
            denoiser_device=params.get("denoiser_device") or None, engine_dir=params.get("engine_dir") or None,
            **limits)
        self.runtime.prepare([[5]], max_new_tokens=self.defaults["max_tokens"], mode=self.defaults["mode"],
                             block_size=self.defaults["block_size"], steps_per_block=self.defaults["steps_per_block"],
                             confidence_threshold=self.defaults["confidence_threshold"])
        self.inputs = {i["name"] for i in self.model_config["input"]}
        scheduler = self.runtime.scheduler
        scheduler.max_queued_requests = max_queued
        scheduler.reserved_rows = max(1, scheduler.max_batch // 8)  # a newcomer starts beside a wide request
        self.metrics = ModelMetrics()
        scheduler.start()
        self._finalizing = threading.Event()
        threading.Thread(target=self._watch, name="twotower-watch", daemon=True).start()

    def _watch(self) -> None:
        """Exit when the server is gone (a crashed or killed tritonserver must not leave this process
        behind); drain when the launcher's drain file appears; refresh the row gauges."""
        from trtllm_twotower.runtime.scheduler import ClosedError

        server, scheduler = os.getppid(), self.runtime.scheduler
        drain_file = os.environ.get("TWOTOWER_DRAIN_FILE")
        drain_seconds = float(os.environ.get("TWOTOWER_DRAIN_SECONDS", "30"))
        deadline = None
        while not self._finalizing.wait(0.1):
            if os.getppid() != server:
                os._exit(0)
            self.metrics.rows(scheduler)  # the gauges, ten times a second
            if deadline is None and drain_file and os.path.exists(drain_file):
                scheduler.close()
                deadline = time.monotonic() + drain_seconds
            if deadline is not None and time.monotonic() > deadline and (scheduler.running or scheduler.waiting):
                scheduler.abort(ClosedError(f"the server shut down: generation ended after the {drain_seconds:g} s "
                                            "drain timeout"))
                deadline = math.inf

    # ---- requests -------------------------------------------------------------------------------
    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                prepared, stream = self._parse(request)
            except ValueError as err:  # RequestError, or the runtime's own parameter check
                self.metrics.requests["bad_request"].increment(1)
                sent_ids = pb_utils.get_input_tensor_by_name(request, "input_ids") is not None
                prompt_input = "input_ids" if sent_ids else "text_input"
                _error(sender, _client_names(str(err), prompt_input))
                continue
            self._submit(prepared, stream, sender)
        return None

    def _submit(self, prepared, stream: bool, sender) -> None:
        from trtllm_twotower.runtime.scheduler import ClosedError, QueueFullError

        tokenizer = self.runtime.tokenizer
        state = {"ticket": None}

        def on_block(event):
            if sender.is_cancelled():
                state["ticket"].cancel()  # leaves the batch before the next denoiser step
                return
            if stream and event.token_ids:
                _send(sender, pb_utils.InferenceResponse(_outputs(event.text, event.token_ids, tokenizer)))

        def on_done(ticket):
            if ticket.error is not None:
                closed = isinstance(ticket.error, ClosedError)
                self.metrics.requests["unavailable" if closed else "error"].increment(1)
                _error(sender, f"generation failed: {ticket.error}",
                       "UNAVAILABLE" if closed else "INTERNAL")
                return
            result = self.runtime.result(ticket)
            self.metrics.finished(ticket, result)
            if ticket.cancelled:
                _send(sender, flags=FINAL)
                return
            tokens = result.output_ids[0]
            text = None if result.text is None else ("" if stream else result.text[0])
            outputs = _outputs(text, [] if stream else tokens, tokenizer)
            outputs += [pb_utils.Tensor("nfe", np.array([[result.nfe]], dtype=np.int32)),
                        pb_utils.Tensor("tokens_per_step", np.array([[result.tokens_per_step]], dtype=np.float32)),
                        pb_utils.Tensor("cached_tokens", np.array([[result.stats["cached_tokens"]]], dtype=np.int32))]
            _send(sender, pb_utils.InferenceResponse(outputs), FINAL)

        try:
            state["ticket"] = self.runtime.submit(prepared, on_block, on_done)
        except (QueueFullError, ClosedError) as err:
            self.metrics.requests["rejected" if isinstance(err, QueueFullError) else "unavailable"].increment(1)
            _error(sender, f"server busy: {err}" if isinstance(err, QueueFullError) else str(err),
                   "UNAVAILABLE")
            return
        except ValueError as err:  # CapacityError: it cannot fit even alone
            self.metrics.requests["bad_request"].increment(1)
            _error(sender, str(err))
            return

    def _input(self, request, name: str):
        """The one value of an optional [1, 1] input, or None."""
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is None:
            return None
        value = tensor.as_numpy()
        if value.size != 1:
            raise RequestError(f"{name}: expected one value, got shape {list(value.shape)}")
        return value.reshape(-1)[0]

    def _int(self, request, name: str, default: int, lo: int, hi: int = INT64_MAX) -> int:
        value = self._input(request, name)
        if value is None:
            return default
        value = int(value)  # INT64 / UINT64 inputs: nothing was narrowed on the way in
        if not lo <= value <= hi:
            raise RequestError(f"{name}: must be in [{lo}, {'2^63-1' if hi == INT64_MAX else hi}], got {value}")
        return value

    def _float(self, request, name: str, default: float) -> float:
        value = self._input(request, name)
        if value is None:
            return default
        value = float(value)
        if not math.isfinite(value):
            raise RequestError(f"{name}: {value} is not a finite number (FP32 input; values beyond 3.4e38 become inf)")
        return value

    def _parse(self, request):
        unknown = sorted(k for k in json.loads(request.parameters() or "{}") if not k.startswith("triton_"))
        if unknown:
            raise RequestError(f"unknown parameter(s) {', '.join(map(repr, unknown))}; the inputs are "
                               f"{', '.join(sorted(self.inputs))}")
        prompt = self._prompt(request)
        d = self.defaults
        mode = self._input(request, "mode")
        mode = d["mode"] if mode is None else _utf8(mode, "mode")
        prepared = self.runtime.prepare(
            [prompt],
            max_new_tokens=self._int(request, "max_tokens", d["max_tokens"], 1),
            mode=mode,
            block_size=self._int(request, "block_size", d["block_size"], 1, self.max_block_size),
            steps_per_block=self._int(request, "steps_per_block", d["steps_per_block"], 1, 1024),
            confidence_threshold=self._float(request, "confidence_threshold", d["confidence_threshold"]),
            temperature=self._float(request, "temperature", 0.0),
            top_k=self._int(request, "top_k", 0, 0),
            top_p=self._float(request, "top_p", 1.0),
            seed=self._int(request, "random_seed", 0, 0),
        )
        stream = self._input(request, "stream")
        return prepared, bool(stream) if stream is not None else False

    def _prompt(self, request):
        text = self._input(request, "text_input")
        ids = pb_utils.get_input_tensor_by_name(request, "input_ids")
        if (text is None) == (ids is None):
            raise RequestError("text_input or input_ids: exactly one is required")
        if ids is not None:
            values = ids.as_numpy().reshape(-1)
            if values.size == 0:
                raise RequestError("input_ids: empty")
            return [int(v) for v in values]
        if self.runtime.tokenizer is None:
            raise RequestError("text_input: this model's checkpoint has no tokenizer; send input_ids")
        return _utf8(text, "text_input")

    def finalize(self):
        self._finalizing.set()
        self.runtime.scheduler.stop()  # in-flight and queued requests finish first


def _utf8(value, name: str) -> str:
    if not isinstance(value, bytes):
        return str(value)
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RequestError(f"{name}: not valid UTF-8 ({err.reason} at byte {err.start}: {value[err.start:err.start + 4]!r})")


def _client_names(message: str, prompt_input: str) -> str:
    """The runtime's parameter names in errors, as the client called them."""
    for runtime_name, input_name in {**_INPUT_NAMES, "prompts[0]": prompt_input}.items():
        if message.startswith(runtime_name + ":"):
            return input_name + message[len(runtime_name):]
    return message


def _outputs(text, token_ids: list[int], tokenizer) -> list:
    outputs = [pb_utils.Tensor("output_ids", np.array([token_ids], dtype=np.int32).reshape(1, -1))]
    if tokenizer is not None:
        outputs.append(pb_utils.Tensor("text_output", np.array([[(text or "").encode("utf-8")]], dtype=np.object_)))
    return outputs
