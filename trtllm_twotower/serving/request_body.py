"""A request body read within a size limit and parsed into a checked JSON object.

The size is refused before the body is read in full: on ``Content-Length`` when the client sends
one, and while the body streams in otherwise. Parsing runs off the event loop (the caller's
``asyncio.to_thread``), so a large body does not stall other requests.
"""

from __future__ import annotations

import json

MAX_DEPTH = 32  # a completion request nests three levels (messages[i].content); anything deeper is not ours


class BodyError(ValueError):
    """A body this server does not read; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


async def read_limited(request, limit: int) -> bytes:
    """The body of a Starlette ``request``, refused (413) once it exceeds ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise BodyError(f"Content-Length: not a byte count ({declared[:40]!r})")
        if int(declared) > limit:
            raise BodyError(f"request body: {int(declared)} bytes, more than this server's limit of {limit} bytes "
                            "(--max-request-bytes)", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyError(f"request body: more than this server's limit of {limit} bytes (--max-request-bytes)", 413)
        chunks.append(chunk)
    return b"".join(chunks)


def parse_object(raw: bytes, max_run: int | None = None) -> dict:
    """The body as a JSON object whose strings are valid Unicode, nested at most ``MAX_DEPTH`` deep.
    ``max_run``: refuse, before parsing, a body with more bytes than that between two double quotes
    (no useful string or token list is that long; the parser would hold the GIL over all of it)."""
    if max_run is not None and _longest_run_exceeds(raw, max_run):
        raise BodyError(f"request body: more than {max_run} bytes without a string boundary; no prompt that fits "
                        "the model is that long")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BodyError(f"request body: not valid JSON ({err})") from err
    except RecursionError as err:  # the parser's own recursion limit (about a thousand levels)
        raise BodyError(f"request body: JSON nested deeper than {MAX_DEPTH} levels") from err
    if not isinstance(body, dict):
        raise BodyError("request body: expected a JSON object")
    check_values(body)
    return body


def _longest_run_exceeds(raw: bytes, limit: int) -> bool:
    """Whether ``raw`` has more than ``limit`` bytes without a double quote (one ``bytes.find`` per
    quote: a Python loop, so other threads get their turns)."""
    start = 0
    while (end := raw.find(b'"', start)) >= 0:
        if end - start > limit:
            return True
        start = end + 1
    return len(raw) - start > limit


def check_values(body: dict) -> None:
    """Walk the parsed body without recursion: a depth bound, and no lone surrogates (JSON's
    ``\\ud800`` escapes parse into strings that cannot be encoded, tokenized or echoed back)."""
    pending = [(body, "", 1)]
    while pending:
        value, path, depth = pending.pop()
        if depth > MAX_DEPTH:
            raise BodyError(f"request body: JSON nested deeper than {MAX_DEPTH} levels")
        if isinstance(value, dict):
            for key, item in value.items():
                _check_string(key, f"{path}.{key}" if path else "field name")
                pending.append((item, f"{path}.{key}" if path else key, depth + 1))
        elif isinstance(value, list):
            pending.extend((item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value))
        elif isinstance(value, str):
            _check_string(value, path)


def _check_string(value: str, path: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise BodyError(f"{path}: not valid Unicode (a lone surrogate U+{ord(value[err.start]):04X} at character "
                        f"{err.start})") from err
