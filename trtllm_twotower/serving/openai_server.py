"""An OpenAI-compatible HTTP server over the runtime's in-flight scheduler (FastAPI + uvicorn).

    python -m trtllm_twotower.serving.openai_server [--checkpoint DIR] [--port 8000]

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (when the tokenizer has a chat
template), ``GET /v1/models``, ``GET /health``. Streaming sends one server-sent event per committed
block (per token in AR / mock-AR), then ``data: [DONE]``. Diffusion knobs pass as extra body fields
(``mode``, ``block_size``, ``steps_per_block``, ``confidence_threshold``, ``top_k``, ``seed``);
``prompt`` may be token ids, and a checkpoint without a tokenizer answers with ids (``text`` null,
``token_ids`` in every choice). OpenAI fields the model cannot honour (``stop``, ``logprobs``,
``echo``, ``best_of``, ``suffix``, penalties) are refused, not ignored. Binds loopback by default.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

UNSUPPORTED = ("stop", "logprobs", "top_logprobs", "echo", "best_of", "suffix", "logit_bias", "tools", "functions",
               "response_format")
KNOBS = ("mode", "block_size", "steps_per_block", "confidence_threshold", "top_k")
COMPLETION_FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "seed",
                     "user", "presence_penalty", "frequency_penalty", *UNSUPPORTED, *KNOBS}
CHAT_FIELDS = (COMPLETION_FIELDS - {"prompt", "echo", "suffix", "best_of"}) | {"messages", "max_completion_tokens"}


class ApiError(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.status = message, param, status


def create_app(runtime, model_name: str, defaults: dict | None = None, max_block_size: int = 64):
    """The FastAPI app; ``runtime.scheduler`` must be running (``start()``)."""
    defaults = {"max_tokens": 64, "temperature": 1.0, "mode": "diffusion", "block_size": 16, "steps_per_block": 16,
                "confidence_threshold": 0.8, **(defaults or {})}
    app = FastAPI(title="trtllm-twotower", docs_url=None, redoc_url=None)
    chat_template = runtime.tokenizer is not None and getattr(runtime.tokenizer, "chat_template", None)

    def error_response(err: ApiError):
        kind = "invalid_request_error" if err.status < 500 else "server_error"
        return JSONResponse({"error": {"message": err.message, "type": kind, "param": err.param, "code": None}},
                            status_code=err.status)

    @app.exception_handler(ApiError)
    async def _api_error(_, err: ApiError):
        return error_response(err)

    @app.get("/health")
    async def health():
        alive = runtime.scheduler.alive
        return JSONResponse({"status": "ok" if alive else "scheduler stopped"}, status_code=200 if alive else 503)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "nvidia"}]}

    async def body_of(request: Request, allowed: set) -> dict:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ApiError(f"request body: not valid JSON ({err})") from err
        if not isinstance(body, dict):
            raise ApiError("request body: expected a JSON object")
        unknown = sorted(set(body) - allowed)
        if unknown:
            raise ApiError(f"unknown field(s) {', '.join(map(repr, unknown))}", unknown[0])
        for name in UNSUPPORTED:
            if body.get(name) not in (None, False, [], 0):
                raise ApiError(f"{name}: not supported by this server", name)
        for name in ("presence_penalty", "frequency_penalty"):
            if body.get(name) not in (None, 0, 0.0):
                raise ApiError(f"{name}: not supported by this server (must be 0)", name)
        if body.get("model") not in (None, model_name):
            raise ApiError(f"model: {body['model']!r} is not served here (this server serves {model_name!r})",
                           "model", 404)
        return body

    def prepare(body: dict, prompts: list, max_tokens_field: str = "max_tokens"):
        n = body.get("n", 1)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 16:
            raise ApiError(f"n: expected an integer in [1, 16], got {n!r}", "n")
        seed = body.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63 - 16:
            raise ApiError(f"seed: expected an integer in [0, 2^63 - 16), got {seed!r}", "seed")
        block = body.get("block_size", defaults["block_size"])
        if isinstance(block, int) and not isinstance(block, bool) and block > max_block_size:
            raise ApiError(f"block_size: must be <= {max_block_size} on this server, got {block}", "block_size")
        rows = [p for p in prompts for _ in range(n)]
        try:
            return runtime.prepare(
                rows, max_new_tokens=body.get(max_tokens_field) or defaults["max_tokens"],
                mode=body.get("mode", defaults["mode"]), block_size=block,
                steps_per_block=body.get("steps_per_block", defaults["steps_per_block"]),
                confidence_threshold=body.get("confidence_threshold", defaults["confidence_threshold"]),
                temperature=body.get("temperature", defaults["temperature"]), top_k=body.get("top_k", 0),
                top_p=body.get("top_p", 1.0), seed=[seed + i % n for i in range(len(rows))])
        except ValueError as err:
            message = str(err)
            param = message.split(":", 1)[0].replace("max_new_tokens", max_tokens_field)
            raise ApiError(message.replace("max_new_tokens", max_tokens_field), param) from err

    def finish_reason(result, row: int, prepared) -> str:
        tokens = result.output_ids[row]
        eos = prepared.settings.eos_token_id
        return "stop" if eos is not None and tokens and tokens[-1] == eos else "length"

    def usage(prepared, result) -> dict:
        prompt = sum(map(len, prepared.prompt_ids))
        completion = sum(map(len, result.output_ids))
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def respond(body: dict, prepared, kind: str):
        stream = bool(body.get("stream", False))
        include_usage = bool((body.get("stream_options") or {}).get("include_usage", False))
        ident = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        obj = "chat.completion" if kind == "chat" else "text_completion"

        def choice(index: int, text, token_ids, reason, final: bool) -> dict:
            if kind == "chat":
                content = {"role": "assistant", "content": text} if final and not stream else {"content": text}
                key = "message" if final and not stream else "delta"
                return {"index": index, key: content, "finish_reason": reason, "token_ids": token_ids}
            return {"index": index, "text": text, "finish_reason": reason, "logprobs": None, "token_ids": token_ids}

        relay = _Relay(runtime, prepared)
        if not stream:
            async for _ in relay.events():
                pass
            result = relay.result()
            choices = [choice(i, None if result.text is None else result.text[i], result.output_ids[i],
                              finish_reason(result, i, prepared), True) for i in range(len(result.output_ids))]
            return {"id": ident, "object": obj, "created": created, "model": model_name, "choices": choices,
                    "usage": usage(prepared, result), "nfe": result.nfe, "tokens_per_step": result.tokens_per_step}
        chunk_obj = obj + ".chunk" if kind == "chat" else obj

        def chunk(choices: list, **extra) -> str:
            return "data: " + json.dumps({"id": ident, "object": chunk_obj, "created": created, "model": model_name,
                                          "choices": choices, **extra}) + "\n\n"

        async def events():
            try:
                async for e in relay.events():
                    if e.token_ids:  # one chunk per committed block (a cancelled row sends none)
                        yield chunk([choice(e.row, e.text, e.token_ids, None, False)])
                result = relay.result()
            except ApiError as err:
                yield "data: " + json.dumps({"error": {"message": err.message, "type": "server_error"}}) + "\n\n"
                return
            finally:
                relay.cancel_if_running()  # the client went away mid-stream
            empty = None if result.text is None else ""
            for i in range(len(result.output_ids)):
                yield chunk([choice(i, empty, [], finish_reason(result, i, prepared), False)])
            if include_usage:
                yield chunk([], usage=usage(prepared, result))
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await body_of(request, COMPLETION_FIELDS)
        prompt = body.get("prompt")
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt)):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
            prompts = prompt
        else:
            raise ApiError("prompt: expected a string, a list of strings, a list of token ids or a list of those", "prompt")
        return await respond(body, prepare(body, prompts), "completion")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        if not chat_template:
            raise ApiError("this model's tokenizer has no chat template: use /v1/completions", None, 404)
        body = await body_of(request, CHAT_FIELDS)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise ApiError("messages: expected a list of {role, content} objects with string content", "messages")
        ids = runtime.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):  # newer tokenizers return a BatchEncoding
            ids = ids["input_ids"]
        field = "max_completion_tokens" if body.get("max_completion_tokens") else "max_tokens"
        return await respond(body, prepare(body, [list(ids)], field), "chat")

    return app


class _Relay:
    """One submitted request's events, moved from the scheduler's thread to the event loop."""

    def __init__(self, runtime, prepared):
        self.runtime = runtime
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.ticket = runtime.submit(prepared, self._put, lambda _: self._put(None))

    def _put(self, item) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    async def events(self):
        while (event := await self.queue.get()) is not None:
            yield event

    def result(self):
        try:
            return self.runtime.result(self.ticket)
        except Exception as err:  # noqa: BLE001 - a failed forward is the server's error, reported as such
            raise ApiError(f"generation failed: {err}", None, 500) from err

    def cancel_if_running(self) -> None:
        if not self.ticket.done.is_set():
            self.ticket.cancel()  # its rows leave the batch before the next denoiser step


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
    p.add_argument("--max-block-size", type=int, default=64)
    p.add_argument("--default-temperature", type=float, default=1.0, help="when a request sends none (OpenAI's 1.0)")
    p.add_argument("--default-mode", default="diffusion")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import uvicorn

    from ..runtime import TwoTowerRuntime

    try:
        runtime = TwoTowerRuntime.from_checkpoint(
            args.checkpoint, backend="trt" if args.engine_dir else "torch", dtype=args.dtype,
            context_device=args.context_device, denoiser_device=args.denoiser_device, engine_dir=args.engine_dir,
            max_batch=args.max_batch, memory_budget=args.memory_budget)
        runtime.prepare([[5]], mode=args.default_mode, temperature=args.default_temperature)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    name = args.served_model_name or runtime.checkpoint_dir.name
    runtime.scheduler.start()
    app = create_app(runtime, name, {"temperature": args.default_temperature, "mode": args.default_mode},
                     args.max_block_size)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        runtime.scheduler.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
