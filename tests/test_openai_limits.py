"""The OpenAI-compatible server in front of users: limits before work, malformed bodies, seeds and
usage, API keys, back-pressure (429), metrics, and the drain on SIGTERM. Real server processes on
loopback (demo checkpoint, CPU), driven by raw HTTP and by the official ``openai`` client."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

openai = pytest.importorskip("openai", reason="the openai client is not installed (pip install '.[test]')")
pytest.importorskip("fastapi", reason="fastapi/uvicorn not installed (pip install '.[serve]')")
parser = pytest.importorskip("prometheus_client.parser", reason="prometheus_client not installed ('.[serve]')")

from serving_process import start_openai_server, stop_server  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KNOBS = dict(block_size=8, steps_per_block=8, confidence_threshold=0.05)
KEY = "sk-test-" + os.urandom(8).hex()


def start_server(log: Path, *extra: str, env: dict | None = None):
    return start_openai_server(log, "--served-model-name", "demo", "--default-temperature", "0", *extra, env=env)


def request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
            timeout: float = 120) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request(method, path, body, {"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    return resp.status, dict(resp.getheaders()), resp.read()


def error_of(port: int, body, status: int, **kw) -> str:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    got, headers, text = request(port, "POST", "/v1/completions", raw, **kw)
    assert got == status, (got, text[:300])
    assert headers["content-type"] == "application/json"
    return json.loads(text)["error"]["message"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc, port = start_server(tmp_path_factory.mktemp("limits") / "server.log", "--max-request-bytes", "200000",
                              "--max-rows-per-request", "8")
    yield port
    stop_server(proc)


def metric(port: int, name: str, labels: dict | None = None) -> float:
    status, _, text = request(port, "GET", "/metrics")
    assert status == 200
    for family in parser.text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                return sample.value
    raise KeyError(name)


# ---- limits before work ------------------------------------------------------------------------------------

def test_a_body_over_the_limit_is_refused_on_its_content_length(server):
    start = time.perf_counter()
    message = error_of(server, {"prompt": "x" * 300_000, "max_tokens": 4}, 413)
    assert "more than this server's limit of 200000 bytes" in message and time.perf_counter() - start < 5


def test_a_chunked_body_over_the_limit_is_refused_while_it_streams(server):
    """No Content-Length, and a body that never ends: the answer comes once the limit is passed."""
    sock = socket.create_connection(("127.0.0.1", server), timeout=30)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n")
    piece = b'{"prompt": "' + b"y" * 65536
    for _ in range(4):  # 256 KiB > 200,000 bytes; the body's last chunk is never sent
        sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        piece = b"y" * 65536
    answer = b""
    while b"}}" not in answer and (part := sock.recv(65536)):
        answer += part
    sock.close()
    assert answer.startswith(b"HTTP/1.1 413") and b"limit of 200000 bytes" in answer


@pytest.mark.parametrize("prompt, message", [
    ("ab " * 10_000, "30000 characters, more than any prompt that fits the model's limit of 4096 tokens"),
    ("ab " * 60_000, "more than 147456 bytes without a string boundary"),  # refused before parsing
])
def test_a_prompt_that_cannot_fit_is_refused_before_tokenizing(server, prompt, message):
    """The demo tokenizer's longest token has 6 characters: 4096 x 6 characters at most."""
    assert message in error_of(server, {"prompt": prompt, "max_tokens": 4}, 400)


def test_rows_per_request_are_capped(server):
    message = error_of(server, {"prompt": ["a", "b", "c"], "n": 3, "max_tokens": 2}, 400)
    assert "9 rows, more than this server's limit of 8" in message


# ---- malformed bodies: OpenAI-style JSON 400, never a plain 500 --------------------------------------------

@pytest.mark.parametrize("raw, message", [
    (b'{"prompt": "\\ud800 alone", "max_tokens": 2}', "prompt: not valid Unicode (a lone surrogate U+D800"),
    (b'{"prompt": "x", "stream": true, "stream_options": "yes"}', "stream_options: expected an object"),
    (b'{"prompt": "x", "stream": "yes"}', "stream: expected true or false"),
    (b"[" * 50_000 + b"]" * 50_000, "nested deeper than 32 levels"),  # the parser's own recursion limit
    (b'{"prompt": ' + b"[" * 40 + b"1" + b"]" * 40 + b"}", "nested deeper than 32 levels"),
    (b'{"prompt": "x", "max_tokens": 0}', "max_tokens: must be >= 1"),
    (b'{"prompt": "x", "steps_per_block": 1000000000}', "steps_per_block: must be <= 1024"),
    (b"\xff\xfe{", "not valid JSON"),
])
def test_malformed_bodies_get_json_errors(server, raw, message):
    assert message in error_of(server, raw, 400)
    assert request(server, "GET", "/health")[0] == 200


def test_a_request_without_a_seed_gets_a_fresh_one(server):
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server}/v1", api_key="unused")
    texts = {client.completions.create(model="demo", prompt="Once", max_tokens=24, temperature=1.0,
                                       extra_body=KNOBS).choices[0].text for _ in range(3)}
    assert len(texts) > 1
    seeded = {client.completions.create(model="demo", prompt="Once", max_tokens=24, temperature=1.0, seed=5,
                                        extra_body=KNOBS).choices[0].text for _ in range(2)}
    assert len(seeded) == 1


def test_usage_counts_each_prompt_once(server):
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server}/v1", api_key="unused")
    one = client.completions.create(model="demo", prompt=[5, 6, 7, 8], max_tokens=3, extra_body=KNOBS)
    three = client.completions.create(model="demo", prompt=[5, 6, 7, 8], max_tokens=3, n=3, extra_body=KNOBS)
    assert one.usage.prompt_tokens == three.usage.prompt_tokens == 4
    assert three.usage.completion_tokens == 9


# ---- metrics and disconnects ----------------------------------------------------------------------------------

def test_metrics_parse_and_count(server):
    before = metric(server, "twotower_requests_total", {"endpoint": "completions", "outcome": "ok"})
    prefill = metric(server, "twotower_prompt_tokens_total")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server}/v1", api_key="unused")
    client.completions.create(model="demo", prompt=[9, 8, 7], max_tokens=16, extra_body=KNOBS)
    list(client.completions.create(model="demo", prompt=[9, 8], max_tokens=16, stream=True, extra_body=KNOBS))
    client.completions.create(model="demo", prompt=[9, 8], max_tokens=16, extra_body={**KNOBS, "mode": "speculative"})
    assert metric(server, "twotower_requests_total", {"endpoint": "completions", "outcome": "ok"}) == before + 3
    assert metric(server, "twotower_prompt_tokens_total") == prefill + 7
    assert metric(server, "twotower_time_to_first_block_seconds_count") >= 3
    assert metric(server, "twotower_block_latency_seconds_count") >= 1  # the stream's second block
    assert metric(server, "twotower_speculative_blocks_total") >= 1
    assert metric(server, "twotower_tokens_per_step_count", {"mode": "speculative"}) >= 1
    assert metric(server, "twotower_rows_running") == 0 and metric(server, "twotower_rows_waiting") == 0
    error_of(server, {"prompt": "x", "max_tokens": 0}, 400)
    assert metric(server, "twotower_requests_total", {"endpoint": "completions", "outcome": "bad_request"}) >= 1


def test_a_non_streaming_client_that_hangs_up_frees_its_rows(server):
    body = json.dumps({"prompt": [5, 6], "max_tokens": 4000, **KNOBS}).encode()
    cancelled = metric(server, "twotower_requests_total", {"endpoint": "completions", "outcome": "cancelled"})
    sock = socket.create_connection(("127.0.0.1", server))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    deadline = time.monotonic() + 60
    while metric(server, "twotower_rows_running") == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(server, "twotower_rows_running") == 1
    sock.close()
    deadline = time.monotonic() + 10
    while metric(server, "twotower_rows_running") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(server, "twotower_rows_running") == 0  # 4000 tokens would take minutes
    assert metric(server, "twotower_requests_total", {"endpoint": "completions", "outcome": "cancelled"}) \
        == cancelled + 1


# ---- a second server: API key, a queue of one, the drain -----------------------------------------------------

@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    proc, port = start_server(tmp_path_factory.mktemp("guarded") / "server.log", "--max-batch", "1",
                              "--max-queued-requests", "1", "--drain-seconds", "3", env={"TWOTOWER_API_KEY": KEY})
    yield proc, port
    stop_server(proc)


def test_the_api_key_is_required(guarded):
    _, port = guarded
    base = f"http://127.0.0.1:{port}/v1"
    with pytest.raises(openai.AuthenticationError) as err:
        openai.OpenAI(base_url=base, api_key="wrong", max_retries=0).models.list()
    assert err.value.status_code == 401 and "API key" in err.value.message
    assert err.value.body["code"] == "invalid_api_key"
    reply = openai.OpenAI(base_url=base, api_key=KEY).completions.create(model="demo", prompt="k", max_tokens=4,
                                                                         extra_body=KNOBS)
    assert reply.choices[0].text is not None
    assert request(port, "GET", "/health")[0] == 200  # open: load balancers probe it
    assert request(port, "GET", "/metrics")[0] == 401
    assert request(port, "GET", "/metrics", headers={"Authorization": f"Bearer {KEY}"})[0] == 200


def test_a_full_queue_answers_429_with_retry_after(guarded):
    _, port = guarded
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0)
    running = client.completions.create(model="demo", prompt="long", max_tokens=4000, stream=True, extra_body=KNOBS)
    next(iter(running))  # it holds the one row of the batch
    queued = threading.Thread(target=lambda: client.completions.create(model="demo", prompt="q", max_tokens=2,
                                                                        extra_body=KNOBS))
    queued.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the second request is waiting
        headers = {"Authorization": f"Bearer {KEY}"}
        text = request(port, "GET", "/metrics", headers=headers)[2].decode()
        if "twotower_requests_queued 1.0" in text:
            break
        time.sleep(0.05)
    with pytest.raises(openai.RateLimitError) as err:
        client.completions.create(model="demo", prompt="third", max_tokens=2, extra_body=KNOBS)
    assert err.value.response.headers["retry-after"] == "1" and "requests are waiting" in err.value.message
    running.close()  # the long stream hangs up: the queued request runs
    queued.join(timeout=60)
    assert not queued.is_alive()


def test_sigterm_drains_then_ends_what_is_left(guarded):
    proc, port = guarded
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0)
    outcome: dict = {}

    def stream():
        chunks = []
        try:
            for chunk in client.completions.create(model="demo", prompt="drain", max_tokens=4000, stream=True,
                                                   extra_body=KNOBS):
                chunks.append(chunk)
                outcome["first"] = True
        except openai.APIError as err:
            outcome["error"] = err.message
        outcome["chunks"] = len(chunks)

    thread = threading.Thread(target=stream)
    thread.start()
    deadline = time.monotonic() + 60
    while "first" not in outcome and time.monotonic() < deadline:
        time.sleep(0.05)
    assert outcome.get("first"), "the stream never started"
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    with pytest.raises(openai.APIStatusError) as err:  # draining: no new requests
        client.completions.create(model="demo", prompt="late", max_tokens=2, extra_body=KNOBS)
    assert err.value.status_code == 503 and "shutting down" in err.value.message
    assert request(port, "GET", "/health")[0] == 503
    signalled = time.monotonic()
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert "3 s drain timeout" in outcome.get("error", ""), outcome  # ended with an error event, not cut
    assert proc.wait(timeout=30) == 0
    assert time.monotonic() - signalled < 15
