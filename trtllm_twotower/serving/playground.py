"""The playground: a page at ``/`` that draws a generation step by step, and the event stream it reads.

``POST /v1/playground/events`` takes a completions body (``prompt``: one text or one list of token
ids; ``max_tokens``, ``temperature``, ``seed``, ``n``, ``mode``, ``block_size``, ``steps_per_block``,
``confidence_threshold``, ``top_k``, ``top_p``, ``stop``, ``logprobs``), validated by the completions
endpoint's own code, and answers with server-sent events, one JSON object each (``data: {...}``),
then ``data: [DONE]``:

- ``{"type": "start", "mode", "block_size", "steps_per_block", "max_new_tokens", "rows", "tokenizer"}``;
- one per forward and row, the runtime's ``StepEvent`` (``runtime/lanes.py``) with ``type`` = its
  kind ("step", "block" or "token") and ``pieces``: each token's text (null without a tokenizer;
  ``corrected_piece`` likewise); with ``logprobs``: N in the body, its "block" and "token" events
  carry ``logprobs``: per token ``{"logprob", "top": [[id, logprob], ...]}``;
- ``{"type": "result", "output_ids", "text", "nfe", "tokens_per_step", "forwards_per_token",
  "time_to_first_block", "tokens_per_second", "seconds", "stats"}``;
- or, when the generation fails, ``{"type": "error", "error": {"message", "type"}}``.

The page is plain HTML, CSS and JavaScript in ``playground/``, served from here: it makes no request
to any other host. A client that goes away cancels its rows at the next step.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path

from fastapi import Request
from fastapi.responses import FileResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles

from .relay import Relay

STATIC = Path(__file__).with_name("playground")
NOT_FIELDS = {"stream", "stream_options"}  # the events endpoint always streams


def add_playground(app, server, fields: set) -> None:
    """Register ``GET /`` (the page), its files under ``/playground/`` and ``POST
    /v1/playground/events`` on the OpenAI server's app. The events endpoint takes the completions
    endpoint's key check, validation and admission (``server.authorize`` / ``body`` / ``prepare`` /
    ``admitting``: OpenAI-style errors); ``fields`` are the completions fields."""
    runtime = server.runtime
    tokenizer = runtime.tokenizer

    @lru_cache(maxsize=None)
    def piece(token: int) -> str:
        return tokenizer.decode([token], skip_special_tokens=False)

    def pieces(tokens: list[int]) -> list[str] | None:
        return None if tokenizer is None else [piece(t) for t in tokens]

    def step_json(event) -> dict:
        data = asdict(event)
        return {"type": data.pop("kind"), **data, "pieces": pieces(event.tokens),
                "corrected_piece": None if event.corrected is None or tokenizer is None else piece(event.corrected)}

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html")

    app.mount("/playground", StaticFiles(directory=STATIC), name="playground")

    @app.post("/v1/playground/events")
    async def events(request: Request):
        server.authorize(request)
        body = await server.body(request, fields - NOT_FIELDS)
        prepared = server.prepare(body, [body.get("prompt")])  # one prompt; the runtime names a bad one
        with server.admitting():
            relay = Relay(runtime, prepared, steps=True)
        s = prepared.settings
        start = {"type": "start", "mode": prepared.mode, "block_size": s.block_size,
                 "steps_per_block": s.steps_per_block, "max_new_tokens": s.max_new_tokens,
                 "rows": len(prepared.prompt_ids), "tokenizer": tokenizer is not None}

        async def stream():
            try:
                yield sse(start)
                async for event in relay.events():
                    yield sse(step_json(event))
                yield sse(summary(relay))
            except Exception as err:  # noqa: BLE001 - a failed forward is reported to the page, not raised
                yield sse({"type": "error", "error": {"message": f"generation failed: {err}", "type": "server_error"}})
                return
            finally:
                relay.cancel_if_running()  # the client went away mid-stream
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")


def sse(data: dict) -> str:
    return "data: " + json.dumps(data) + "\n\n"


def summary(relay: Relay) -> dict:
    """The result event (raises the error of a failed generation)."""
    result = relay.runtime.result(relay.ticket)
    ticket = relay.ticket
    generated = sum(map(len, result.output_ids))
    first = None if ticket.first_tokens is None else ticket.first_tokens - ticket.submitted
    return {"type": "result", "output_ids": result.output_ids, "text": result.text, "nfe": result.nfe,
            "tokens_per_step": result.tokens_per_step, "forwards_per_token": result.stats["forwards_per_token"],
            "time_to_first_block": first, "tokens_per_second": generated / max(result.seconds, 1e-9),
            "seconds": result.seconds, "stats": result.stats}
