"""An OpenAI-compatible HTTP server over the runtime's in-flight scheduler (FastAPI + uvicorn).

    python -m trtllm_twotower.serving.openai_server [--checkpoint DIR] [--port 8000] [--api-key KEY]

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (when the tokenizer has a chat
template), ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus). Streaming sends one
server-sent event per committed block (per token in AR / mock-AR), then ``data: [DONE]``. Diffusion
knobs pass as extra body fields (``mode``, ``block_size``, ``steps_per_block``,
``confidence_threshold``, ``top_k``, ``seed``); ``prompt`` may be token ids, and a checkpoint without
a tokenizer answers with ids (``text`` null, ``token_ids`` in every choice). OpenAI fields the model
cannot honour (``echo``, ``best_of``, ``suffix``, penalties, ...) are refused, not ignored. ``stop``
(up to 4 strings) ends a row at the first match, checked as its tokens are committed in every mode;
the text excludes the stop string (``token_ids`` end at the token that completed it). Log-probs:
/v1/completions ``logprobs`` 0..5, /v1/chat/completions ``logprobs: true`` and ``top_logprobs``
0..20, in OpenAI's objects (``serving/logprobs.py``), streamed with the text they belong to.

Limits before work: bodies over ``--max-request-bytes`` are refused (413) before they are read in
full, text prompts that cannot fit the model are refused before tokenizing, parsing and tokenizing
run off the event loop, at most ``--max-rows-per-request`` rows (prompts x n) per request, at most
``--max-queued-requests`` requests waiting (then 429 with Retry-After). SIGTERM drains: new requests
get 503, running ones finish within ``--drain-seconds``, the rest end with an error. Binds loopback
by default.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import os
import secrets
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..runtime.sampler import MAX_TOP_LOGPROBS
from ..runtime.scheduler import ClosedError, QueueFullError
from .logprobs import RowLogprobs, TokenNames, chat_logprobs, completion_logprobs
from .metrics import ServingMetrics, outcome_of_status
from .playground import add_playground
from .relay import Relay
from .request_body import BodyError, parse_object, read_limited

UNSUPPORTED = ("echo", "best_of", "suffix", "logit_bias", "tools", "functions", "response_format")
KNOBS = ("mode", "block_size", "steps_per_block", "confidence_threshold", "top_k")
COMPLETION_FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "seed",
                     "stop", "logprobs", "user", "presence_penalty", "frequency_penalty", *UNSUPPORTED, *KNOBS}
CHAT_FIELDS = (COMPLETION_FIELDS - {"prompt", "echo", "suffix", "best_of"}) | {"messages", "max_completion_tokens",
                                                                             "top_logprobs"}
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for /v1/completions (chat: MAX_TOP_LOGPROBS)
MAX_SEED = 2**63 - 16  # a request's rows take seed + i for i < n <= 16
RETRY_AFTER_S = "1"


class ApiError(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code


@dataclass
class ServerOptions:
    defaults: dict = field(default_factory=dict)  # request defaults: max_tokens, temperature, mode, knobs
    max_block_size: int = 64
    max_request_bytes: int = 16 << 20
    max_rows_per_request: int = 256
    api_key: str | None = None  # None: no authentication

    def __post_init__(self):
        self.defaults = {"max_tokens": 64, "temperature": 1.0, "mode": "diffusion", "block_size": 16,
                         "steps_per_block": 16, "confidence_threshold": 0.8, **self.defaults}


def error_response(err: ApiError) -> JSONResponse:
    kind = "invalid_request_error" if err.status < 500 else "server_error"
    headers = {"Retry-After": RETRY_AFTER_S} if err.status in (429, 503) else None
    return JSONResponse({"error": {"message": err.message, "type": kind, "param": err.param, "code": err.code}},
                        status_code=err.status, headers=headers)


def create_app(runtime, model_name: str, options: ServerOptions | None = None) -> FastAPI:
    """The FastAPI app; ``runtime.scheduler`` must be running (``start()``)."""
    server = OpenAIServer(runtime, model_name, options or ServerOptions())
    app = FastAPI(title="trtllm-twotower", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    @app.exception_handler(ApiError)
    async def _api_error(_, err: ApiError):
        return error_response(err)

    @app.exception_handler(Exception)
    async def _unexpected(_, err: Exception):  # a bug must still answer in the API's format
        return error_response(ApiError(f"internal error: {type(err).__name__}", None, 500))

    app.add_api_route("/health", server.health, methods=["GET"])
    app.add_api_route("/metrics", server.metrics_page, methods=["GET"])
    app.add_api_route("/v1/models", server.models, methods=["GET"])
    app.add_api_route("/v1/completions", server.completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", server.chat, methods=["POST"])
    add_playground(app, server, COMPLETION_FIELDS)
    return app


class OpenAIServer:
    """The endpoints' handlers over one runtime."""

    def __init__(self, runtime, model_name: str, options: ServerOptions):
        self.runtime = runtime
        self.model_name = model_name
        self.options = options
        self.defaults = options.defaults
        self.metrics = ServingMetrics(runtime.scheduler)
        self.chat_template = runtime.tokenizer is not None and getattr(runtime.tokenizer, "chat_template", None)
        self.token_names = None if runtime.tokenizer is None else TokenNames(runtime.tokenizer)
        # bytes between two quotes beyond which neither a text prompt (at most 6 bytes per character, as
        # \uXXXX) nor a token-id list (at most 12 bytes per id) can fit the model: refused before parsing
        chars, limit = runtime.max_prompt_chars, runtime.cfg.max_position_embeddings
        self.max_run = None if chars is None else max(6 * chars, 12 * limit)

    # ---- small endpoints ------------------------------------------------------------------------
    async def health(self):
        """Open without the API key (load balancers probe it); 503 while draining or stopped."""
        scheduler = self.runtime.scheduler
        status = "draining" if scheduler.closed else "ok" if scheduler.alive else "scheduler stopped"
        cache = scheduler.prefix_cache
        return JSONResponse({"status": status, "prefix_cache": None if cache is None else cache.stats()},
                            status_code=200 if status == "ok" else 503)

    async def models(self, request: Request):
        self.authorize(request)
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": 0,
                                            "owned_by": "nvidia"}]}

    async def metrics_page(self, request: Request):
        self.authorize(request)
        return Response(self.metrics.render(), media_type=self.metrics.content_type)

    def authorize(self, request: Request) -> None:
        key = self.options.api_key
        if key is None:
            return
        scheme, _, sent = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(sent.strip().encode(), key.encode()):
            raise ApiError("Incorrect or missing API key: send 'Authorization: Bearer <key>'", None, 401,
                           "invalid_api_key")

    # ---- generation endpoints -------------------------------------------------------------------
    async def completions(self, request: Request):
        return await self.counted("completions", self._completions(request))

    async def chat(self, request: Request):
        return await self.counted("chat", self._chat(request))

    async def counted(self, endpoint: str, handler):
        """Run a handler, counting refused requests by outcome (served ones count themselves)."""
        try:
            return await handler
        except ApiError as err:
            self.metrics.request(endpoint, outcome_of_status(err.status))
            raise

    async def _completions(self, request: Request):
        body = await self.body(request, COMPLETION_FIELDS)
        prompt = body.get("prompt")
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt)):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
            prompts = prompt
        else:
            raise ApiError("prompt: expected a string, a list of strings, a list of token ids or a list of those",
                           "prompt")
        prepared = await asyncio.to_thread(self.prepare, body, prompts)
        return await self.respond(request, body, prepared, "completions")

    async def _chat(self, request: Request):
        if not self.chat_template:
            raise ApiError("this model's tokenizer has no chat template: use /v1/completions", None, 404)
        body = await self.body(request, CHAT_FIELDS)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise ApiError("messages: expected a list of {role, content} objects with string content", "messages")
        field_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        prepared = await asyncio.to_thread(self.prepare_chat, body, messages, field_name)
        return await self.respond(request, body, prepared, "chat")

    # ---- the request, checked ---------------------------------------------------------------------
    async def body(self, request: Request, allowed: set) -> dict:
        self.authorize(request)
        if self.runtime.scheduler.closed:
            raise ApiError("the server is shutting down and takes no new requests", None, 503)
        try:
            raw = await read_limited(request, self.options.max_request_bytes)
            body = await asyncio.to_thread(parse_object, raw, self.max_run)
        except BodyError as err:
            raise ApiError(str(err), None, err.status) from err
        unknown = sorted(set(body) - allowed)
        if unknown:
            raise ApiError(f"unknown field(s) {', '.join(map(repr, unknown))}", unknown[0])
        for name in UNSUPPORTED:
            if body.get(name) not in (None, False, [], 0):
                raise ApiError(f"{name}: not supported by this server", name)
        for name in ("presence_penalty", "frequency_penalty"):
            if body.get(name) not in (None, 0, 0.0):
                raise ApiError(f"{name}: not supported by this server (must be 0)", name)
        options = body.get("stream_options")
        if options is not None and not (isinstance(options, dict) and set(options) <= {"include_usage"}
                                        and isinstance(options.get("include_usage", False), bool)):
            raise ApiError("stream_options: expected an object {\"include_usage\": true|false}", "stream_options")
        if not isinstance(body.get("stream", False), bool):
            raise ApiError(f"stream: expected true or false, got {body['stream']!r}", "stream")
        if body.get("model") not in (None, self.model_name):
            raise ApiError(f"model: {body['model']!r} is not served here (this server serves {self.model_name!r})",
                           "model", 404)
        return body

    def prepare_chat(self, body: dict, messages: list, field_name: str):
        """Apply the chat template, then ``prepare`` (request-sized work: runs in a worker thread)."""
        limit = self.runtime.max_prompt_chars
        chars = sum(len(m["content"]) for m in messages)
        if limit is not None and chars > limit:
            raise ApiError(f"messages: {chars} characters, more than any prompt that fits the model's limit of "
                           f"{self.runtime.cfg.max_position_embeddings} tokens can have", "messages")
        ids = self.runtime.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):  # newer tokenizers return a BatchEncoding
            ids = ids["input_ids"]
        return self.prepare(body, [list(ids)], field_name, chat=True)

    def requested_logprobs(self, body: dict, chat: bool) -> int | None:
        """Alternatives per token the request asks for (None: no log-probs): /v1/completions
        ``logprobs`` 0..5; chat ``logprobs: true`` with ``top_logprobs`` 0..20 (default 0)."""
        if chat:
            wanted, top = body.get("logprobs"), body.get("top_logprobs")
            if wanted is not None and not isinstance(wanted, bool):
                raise ApiError(f"logprobs: expected true or false, got {wanted!r}", "logprobs")
            if top is not None:
                if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_TOP_LOGPROBS:
                    raise ApiError(f"top_logprobs: expected an integer in [0, {MAX_TOP_LOGPROBS}], got {top!r}",
                                   "top_logprobs")
                if not wanted:
                    raise ApiError("top_logprobs: needs \"logprobs\": true", "top_logprobs")
            count = (top or 0) if wanted else None
        else:
            count = body.get("logprobs")
            if count is not None and (isinstance(count, bool) or not isinstance(count, int)
                                      or not 0 <= count <= MAX_COMPLETION_LOGPROBS):
                raise ApiError(f"logprobs: expected an integer in [0, {MAX_COMPLETION_LOGPROBS}] or null, got "
                               f"{count!r}", "logprobs")
        if count is not None and self.token_names is None:
            raise ApiError(f"logprobs: token texts need a tokenizer and {self.runtime.checkpoint_dir} has none",
                           "logprobs")
        return count

    def prepare(self, body: dict, prompts: list, max_tokens_field: str = "max_tokens", chat: bool = False):
        """Validate and tokenize (request-sized work: runs in a worker thread). Without a ``seed``
        the request draws a fresh one, so two users never get the same 'random' text. ``chat``: the
        body is a chat request (its log-probs fields)."""
        logprobs = self.requested_logprobs(body, chat)
        n = body.get("n", 1)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 16:
            raise ApiError(f"n: expected an integer in [1, 16], got {n!r}", "n")
        limit = self.options.max_rows_per_request
        if len(prompts) * n > limit:
            raise ApiError(f"prompt: {len(prompts)} prompt(s) x n={n} is {len(prompts) * n} rows, more than this "
                           f"server's limit of {limit} per request (--max-rows-per-request)", "prompt")
        seed = body.get("seed")
        if seed is None:
            seed = secrets.randbelow(MAX_SEED)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < MAX_SEED:
            raise ApiError(f"seed: expected an integer in [0, 2^63 - 16), got {seed!r}", "seed")
        d = self.defaults
        block = body.get("block_size", d["block_size"])
        if isinstance(block, int) and not isinstance(block, bool) and block > self.options.max_block_size:
            raise ApiError(f"block_size: must be <= {self.options.max_block_size} on this server, got {block}",
                           "block_size")
        max_tokens = body.get(max_tokens_field)
        rows = [p for p in prompts for _ in range(n)]
        try:
            return self.runtime.prepare(
                rows, max_new_tokens=d["max_tokens"] if max_tokens is None else max_tokens,
                mode=body.get("mode", d["mode"]), block_size=block,
                steps_per_block=body.get("steps_per_block", d["steps_per_block"]),
                confidence_threshold=body.get("confidence_threshold", d["confidence_threshold"]),
                temperature=body.get("temperature", d["temperature"]), top_k=body.get("top_k", 0),
                top_p=body.get("top_p", 1.0), seed=[seed + i % n for i in range(len(rows))], stop=body.get("stop"),
                logprobs=logprobs)
        except ValueError as err:
            message = str(err).replace("max_new_tokens", max_tokens_field)
            raise ApiError(message, message.split(":", 1)[0].split("[", 1)[0]) from err

    # ---- the response -------------------------------------------------------------------------------
    async def respond(self, request: Request, body: dict, prepared, endpoint: str):
        n = body.get("n", 1)
        relay = self.submit(prepared)
        reply = Reply(self.model_name, endpoint, bool(body.get("stream", False)), prepared, n, self.token_names,
                      relay.ticket.stopped)
        if not reply.stream:
            watcher = asyncio.create_task(cancel_on_disconnect(request, relay))
            try:
                async for _ in relay.events():
                    pass
            finally:
                watcher.cancel()
            result = await asyncio.to_thread(relay_result, relay)  # decoding every row's text: off the loop
            self.finished(endpoint, relay, result)
            return await asyncio.to_thread(reply.whole, result)  # log-probs decode token by token: off the loop
        include_usage = bool((body.get("stream_options") or {}).get("include_usage", False))

        async def events():
            outcome, result = "cancelled", None
            try:
                last: dict[int, float] = {}
                async for e in relay.events():
                    if e.token_ids:  # one chunk per committed block (a cancelled row sends none)
                        now = time.perf_counter()
                        if e.row in last:
                            self.metrics.block_gap.observe(now - last[e.row])
                        last[e.row] = now
                        logprobs = reply.logprobs(e.row, e.token_ids, e.logprobs, e.text, e.finished)
                        yield reply.chunk([reply.choice(e.row, e.text, e.token_ids, None, False, logprobs)])
                result = relay_result(relay)
            except ApiError as err:
                outcome = outcome_of_status(err.status)
                yield "data: " + json.dumps({"error": {"message": err.message, "type": "server_error",
                                                       "code": err.code}}) + "\n\n"
                return
            finally:
                relay.cancel_if_running()  # the client went away mid-stream
                if result is not None:
                    outcome = self.finished(endpoint, relay, result)
                else:
                    self.metrics.request(endpoint, outcome)
            yield reply.final_chunks(result, include_usage)

        return StreamingResponse(events(), media_type="text/event-stream")

    def submit(self, prepared) -> "Relay":
        with self.admitting():
            return Relay(self.runtime, prepared)

    @contextlib.contextmanager
    def admitting(self):
        """A submission's refusals as the API's errors: a full queue 429, a draining server 503, a
        request that cannot fit even alone 400."""
        try:
            yield
        except QueueFullError as err:
            raise ApiError(f"server busy: {err}", None, 429, "queue_full") from err
        except ClosedError as err:
            raise ApiError(str(err), None, 503) from err
        except ValueError as err:  # CapacityError: it cannot fit even alone
            raise ApiError(str(err), "max_tokens") from err

    def finished(self, endpoint: str, relay: "Relay", result) -> str:
        outcome = "cancelled" if relay.ticket.cancelled else "ok"
        self.metrics.request(endpoint, outcome)
        self.metrics.finished(relay.prepared.mode, relay.ticket, result)
        return outcome


class Reply:
    """The OpenAI objects of one request: choices, chunks, the whole reply, usage."""

    def __init__(self, model_name: str, endpoint: str, stream: bool, prepared, n: int,
                 token_names: TokenNames | None, stopped: dict[int, int]):
        self.model_name, self.stream, self.prepared, self.n = model_name, stream, prepared, n
        self.chat = endpoint == "chat"
        self.ident = f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.object = "chat.completion" if self.chat else "text_completion"
        self.token_names = token_names
        self.stopped = stopped  # the ticket's rows ended by a stop string (filled as they end)
        self.logprob_rows: dict[int, RowLogprobs] = {}

    def choice(self, index: int, text, token_ids, reason, final: bool, logprobs: dict | None = None) -> dict:
        if self.chat:
            content = {"role": "assistant", "content": text} if final and not self.stream else {"content": text}
            key = "message" if final and not self.stream else "delta"
            return {"index": index, key: content, "finish_reason": reason, "logprobs": logprobs, "token_ids": token_ids}
        return {"index": index, "text": text, "finish_reason": reason, "logprobs": logprobs, "token_ids": token_ids}

    def logprobs(self, row: int, token_ids: list[int], entries, text: str, final: bool) -> dict | None:
        """The ``logprobs`` object of a row's next tokens (a chunk's, or the whole row's), holding
        back those whose text has not gone out yet (``RowLogprobs``); None when not asked."""
        if entries is None:
            return None
        rows = self.logprob_rows.setdefault(row, RowLogprobs(self.token_names.tokenizer))
        items = rows.push(token_ids, entries, text, final, row in self.stopped)
        return (chat_logprobs if self.chat else completion_logprobs)(items, self.token_names)

    def chunk(self, choices: list, **extra) -> str:
        obj = self.object + ".chunk" if self.chat else self.object
        return "data: " + json.dumps({"id": self.ident, "object": obj, "created": self.created,
                                      "model": self.model_name, "choices": choices, **extra}) + "\n\n"

    def finish_reason(self, result, row: int) -> str:
        """EOS or a stop string: "stop"; otherwise "length" (a cancelled row's client is gone)."""
        return "stop" if result.finish_reasons[row] == "stop" else "length"

    def usage(self, result) -> dict:
        prompt = sum(map(len, self.prepared.prompt_ids[:: self.n]))  # each prompt once, not once per choice
        completion = sum(map(len, result.output_ids))
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": result.stats["cached_tokens"]}}

    def final_chunks(self, result, include_usage: bool) -> str:
        """A stream's end: the finish chunks, the usage chunk when asked for, and [DONE]."""
        empty = None if result.text is None else ""
        chunks = [self.chunk([self.choice(i, empty, [], self.finish_reason(result, i), False)])
                  for i in range(len(result.output_ids))]
        if include_usage:
            chunks.append(self.chunk([], usage=self.usage(result)))
        return "".join(chunks) + "data: [DONE]\n\n"

    def whole(self, result) -> dict:
        texts = [None] * len(result.output_ids) if result.text is None else result.text
        entries = [None] * len(result.output_ids) if result.logprobs is None else result.logprobs
        choices = [self.choice(i, texts[i], ids, self.finish_reason(result, i), True,
                               self.logprobs(i, ids, entries[i], texts[i], True))
                   for i, ids in enumerate(result.output_ids)]
        return {"id": self.ident, "object": self.object, "created": self.created, "model": self.model_name,
                "choices": choices, "usage": self.usage(result), "nfe": result.nfe,
                "tokens_per_step": result.tokens_per_step}


async def cancel_on_disconnect(request: Request, relay: "Relay") -> None:
    """A non-streaming client that hangs up frees its rows (the body is read: the next message
    is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    relay.cancel_if_running()


def relay_result(relay: Relay):
    """The request's result, its failures as the API's errors."""
    try:
        return relay.runtime.result(relay.ticket)
    except ClosedError as err:  # the drain timeout ended it
        raise ApiError(str(err), None, 503, "shutting_down") from err
    except Exception as err:  # noqa: BLE001 - a failed forward is the server's error, reported as such
        raise ApiError(f"generation failed: {err}", None, 500) from err


# ---- the process ------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="HF checkpoint dir; default: the demo model")
    p.add_argument("--engine-dir", default=None, help="run built engines (TensorRT-LLM 1.2) instead of torch")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--context-device", default=None)
    p.add_argument("--denoiser-device", default=None)
    p.add_argument("--host", default="127.0.0.1", help="bind address (loopback by default)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: the directory name)")
    p.add_argument("--max-batch", type=int, default=None, help="rows running at once (default 256, within memory)")
    p.add_argument("--memory-budget", type=int, default=None, help="bytes of context state for running rows")
    p.add_argument("--prefix-cache-bytes", type=int, default=None,
                   help="bytes of cached prompt-prefix states (default: what running rows leave of the budget; 0: off)")
    p.add_argument("--max-block-size", type=int, default=64)
    p.add_argument("--default-temperature", type=float, default=1.0, help="when a request sends none (OpenAI's 1.0)")
    p.add_argument("--default-mode", default="diffusion")
    p.add_argument("--max-request-bytes", type=int, default=16 << 20, help="larger bodies get 413 (default 16 MiB)")
    p.add_argument("--max-rows-per-request", type=int, default=256, help="prompts x n of one request (default 256)")
    p.add_argument("--max-queued-requests", type=int, default=1024,
                   help="requests waiting for admission before new ones get 429 (default 1024)")
    p.add_argument("--drain-seconds", type=float, default=30.0,
                   help="on SIGTERM: how long running requests may take to finish before they are ended (default 30)")
    p.add_argument("--api-key", default=os.environ.get("TWOTOWER_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $TWOTOWER_API_KEY; unset: no key)")
    args = p.parse_args(argv)
    for name in ("max_request_bytes", "max_rows_per_request", "max_queued_requests"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: must be >= 1")
    if args.drain_seconds < 0:
        p.error("--drain-seconds: must be >= 0")
    return args


def drain(server, scheduler, seconds: float) -> None:
    """Refuse new requests, let running ones finish for ``seconds``, end the rest with an error,
    then let uvicorn close the connections (runs in its own thread)."""
    scheduler.close()
    deadline = time.monotonic() + seconds
    while (scheduler.running or scheduler.waiting) and time.monotonic() < deadline:
        time.sleep(0.05)
    if scheduler.running or scheduler.waiting:
        scheduler.abort(ClosedError(f"the server shut down: generation ended after the {seconds:g} s drain timeout"))
    while scheduler.running or scheduler.waiting:  # the aborted rows leave at the next unit
        time.sleep(0.02)
    server.should_exit = True


def main(argv=None) -> int:
    args = parse_args(argv)
    import uvicorn

    from ..runtime import TwoTowerRuntime

    try:
        runtime = TwoTowerRuntime.from_checkpoint(
            args.checkpoint, backend="trt" if args.engine_dir else "torch", dtype=args.dtype,
            context_device=args.context_device, denoiser_device=args.denoiser_device, engine_dir=args.engine_dir,
            max_batch=args.max_batch, memory_budget=args.memory_budget, prefix_cache_bytes=args.prefix_cache_bytes)
        runtime.prepare([[5]], mode=args.default_mode, temperature=args.default_temperature)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    name = args.served_model_name or runtime.checkpoint_dir.name
    scheduler = runtime.scheduler
    scheduler.max_queued_requests = args.max_queued_requests
    scheduler.reserved_rows = max(1, scheduler.max_batch // 8)  # a newcomer starts beside a wide request
    scheduler.start()
    options = ServerOptions({"temperature": args.default_temperature, "mode": args.default_mode},
                            args.max_block_size, args.max_request_bytes, args.max_rows_per_request, args.api_key)
    app = create_app(runtime, name, options)

    class DrainingServer(uvicorn.Server):
        """SIGTERM / SIGINT start the drain; a second one exits at once."""

        def handle_exit(self, sig, frame) -> None:
            if scheduler.closed:
                self.should_exit = self.force_exit = True
                return
            threading.Thread(target=drain, args=(self, scheduler, args.drain_seconds), name="twotower-drain",
                             daemon=True).start()

    server = DrainingServer(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                           timeout_graceful_shutdown=5))
    try:
        server.run()
    finally:
        scheduler.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
