"""The Triton model on a real tritonserver (bundled in nvidia-pytriton), on CPU, on loopback.

One server for the module, on the demo checkpoint in float32. Outputs are compared with the Python
runtime called in this process with the same inputs.
"""

from __future__ import annotations

import http.client
import json
import queue
import threading
from pathlib import Path

import pytest

pytriton = pytest.importorskip("pytriton", reason="nvidia-pytriton not installed (pip install '.[triton]')")
grpcclient = pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] not installed")

import numpy as np  # noqa: E402

from trtllm_twotower.runtime import TwoTowerRuntime  # noqa: E402
from trtllm_twotower.serving.triton_launcher import DEFAULT_REPOSITORY, REPO_ROOT, TritonServer, copy_model_repository  # noqa: E402

pytestmark = pytest.mark.triton
MODEL = "twotower"


@pytest.fixture(scope="module")
def server(demo_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("triton")
    repo = copy_model_repository(DEFAULT_REPOSITORY, tmp / "repo", {
        "checkpoint_dir": str(demo_dir), "dtype": "float32", "project_root": str(REPO_ROOT), "max_tokens": "16",
        "block_size": "8", "steps_per_block": "8", "confidence_threshold": "0.05"})
    srv = TritonServer(repo, log_file=tmp / "server.log").start()
    yield srv
    srv.stop()
    assert srv.process.poll() is not None, "server still running after stop()"
    assert not list(Path("/dev/shm").glob(f"{srv.shm_prefix}*")), "shared-memory regions left behind"


@pytest.fixture(scope="module")
def runtime(demo_dir):
    return TwoTowerRuntime.from_checkpoint(demo_dir, dtype="float32")


def expected(runtime, text, **kw):
    args = dict(max_new_tokens=16, block_size=8, steps_per_block=8, confidence_threshold=0.05, seed=0)
    args.update(kw)
    return runtime.generate([text], **args)


def post(server, path: str, body: dict, timeout: float = 120):
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=timeout)
    conn.request("POST", f"/v2/models/{MODEL}/{path}", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    return resp.status, resp.read().decode()


def stream_events(server, body: dict) -> list[dict]:
    status, text = post(server, "generate_stream", body)
    assert status == 200, text
    return [json.loads(line[len("data: "):]) for line in text.splitlines() if line.startswith("data: ")]


def test_unary_generate_equals_runtime(server, runtime):
    status, text = post(server, "generate", {"text_input": "unary", "max_tokens": 24, "random_seed": 5,
                                             "temperature": 0.5})
    assert status == 200, text
    reply = json.loads(text)
    ref = expected(runtime, "unary", max_new_tokens=24, seed=5, temperature=0.5)
    assert reply["text_output"] == ref.text[0]
    assert reply["nfe"] == ref.nfe and reply["tokens_per_step"] == pytest.approx(ref.tokens_per_step, rel=1e-6)


def test_a_repeated_prefix_comes_from_the_prefix_cache(server):
    ids = np.random.default_rng(8).integers(4, 256, 300).tolist()  # one 256-token page, then the rest
    replies = []
    for _ in range(2):
        status, text = post(server, "generate", {"input_ids": ids, "max_tokens": 8})
        assert status == 200, text
        replies.append(json.loads(text))
    assert [r["cached_tokens"] for r in replies] == [0, 256]
    assert replies[1]["output_ids"] == replies[0]["output_ids"]


def test_http_stream_concatenates_to_unary(server):
    body = {"text_input": "stream", "max_tokens": 24, "random_seed": 3, "temperature": 0.5}
    _, unary = post(server, "generate", body)
    events = stream_events(server, {**body, "stream": True})
    assert len(events) == 3 + 1  # one per committed block of 8, then the stats
    assert "".join(e["text_output"] for e in events) == json.loads(unary)["text_output"]
    assert events[-1]["nfe"] == json.loads(unary)["nfe"]


def test_grpc_stream_concatenates_to_unary(server, runtime):
    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    inputs = []
    for name, value, dtype in (("text_input", np.array([[b"grpc"]], dtype=np.object_), "BYTES"),
                               ("max_tokens", np.array([[16]], dtype=np.int64), "INT64"),
                               ("stream", np.array([[True]]), "BOOL"),
                               ("mode", np.array([[b"mock-ar"]], dtype=np.object_), "BYTES")):
        tensor = grpcclient.InferInput(name, list(value.shape), dtype)
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    client.async_stream_infer(MODEL, inputs, enable_empty_final_response=True)
    pieces = []
    while True:
        result, error = responses.get(timeout=120)
        assert error is None, error
        if result.get_output("text_output") is not None:
            pieces.append(result.as_numpy("text_output")[0, 0].decode())
        if result.get_response().parameters["triton_final_response"].bool_param:
            break
    client.stop_stream()
    client.close()
    ref = expected(runtime, "grpc", mode="mock-ar")
    assert "".join(pieces) == ref.text[0]
    assert len(pieces) == 16 + 1  # mock-AR commits one token per step, then the stats


def test_32_concurrent_streaming_clients(server, runtime):
    results: dict[int, str] = {}
    errors: list = []

    def client(i: int) -> None:
        try:
            events = stream_events(server, {"text_input": f"client {i}", "random_seed": i, "temperature": 0.5,
                                            "stream": True})
            results[i] = "".join(e["text_output"] for e in events)
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append((i, err))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and len(results) == 32
    for i in range(32):
        assert results[i] == expected(runtime, f"client {i}", seed=i, temperature=0.5).text[0], i


def test_disconnect_mid_stream_does_not_disturb_others(server, runtime):
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=60)
    conn.request("POST", f"/v2/models/{MODEL}/generate_stream",
                 json.dumps({"text_input": "leaver", "max_tokens": 400, "stream": True}),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.readline().startswith(b"data: ")  # the first block arrived
    others = {}

    def client(i):
        others[i] = "".join(e["text_output"] for e in stream_events(
            server, {"text_input": f"stayer {i}", "random_seed": i, "stream": True}))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    conn.close()  # the leaver hangs up mid-stream
    for t in threads:
        t.join(timeout=300)
    for i in range(3):
        assert others[i] == expected(runtime, f"stayer {i}", seed=i).text[0]
    status, _ = post(server, "generate", {"text_input": "after", "max_tokens": 8})
    assert status == 200


def test_non_utf8_text_input_is_refused(server):
    """gRPC carries raw bytes (JSON cannot): invalid UTF-8 is refused with the byte offset, not replaced."""
    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    tensor = grpcclient.InferInput("text_input", [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[b"caf\xe9 \xff"]], dtype=np.object_))
    client.async_stream_infer(MODEL, [tensor])
    result, error = responses.get(timeout=120)
    client.stop_stream()
    client.close()
    assert result is None and error is not None
    assert "text_input: not valid UTF-8 (invalid continuation byte at byte 3" in str(error), error
    status, text = post(server, "generate", {"text_input": "still here", "max_tokens": 8})
    assert status == 200 and "text_output" in json.loads(text)


@pytest.mark.parametrize("body, message", [
    ({"max_tokens": 8}, "text_input"),
    ({"text_input": "x", "max_tokens": -4}, "max_tokens: must be in [1, 2^63-1], got -4"),
    ({"text_input": "x", "max_tokens": "many"}, None),  # JSON type errors: Triton rejects them itself
    ({"text_input": 17}, None),
    ({"text_input": "x", "confidence_threshold": 1.5}, "confidence_threshold"),
    ({"text_input": "x", "mode": "beam"}, "mode"),
    ({"text_input": "x", "block_size": 0}, "block_size"),
    ({"text_input": "x", "stream": "yes"}, None),
    # each of these was accepted, wrapped or replaced before (issue 14)
    ({"text_input": "x", "max_tokens": 2**32 + 8}, "max_tokens: prompt + output too long: 1 prompt tokens + 4294967304"),
    ({"text_input": "x", "block_size": 2**32 + 16}, "block_size: must be in [1, 64], got 4294967312"),
    ({"text_input": "x", "block_size": 1000}, "block_size: must be in [1, 64], got 1000"),
    ({"text_input": "x", "max_tokens": 10**10}, "+ 10000000000 new tokens"),
    ({"text_input": "x", "temperature": 1e39}, "temperature: inf is not a finite number"),
    ({"text_input": "x", "max_token": 8}, "unknown parameter(s) 'max_token'"),
    ({"text_input": "x", "random_seed": 2**63}, "random_seed: must be in [0, 2^63-1], got 9223372036854775808"),
    ({"text_input": "x", "input_ids": [5, 6]}, "exactly one is required"),
    ({"input_ids": [5, 999]}, "outside the vocabulary"),
])
def test_malformed_requests_get_errors_and_server_keeps_serving(server, body, message):
    status, text = post(server, "generate", body)
    assert status >= 400
    error = json.loads(text)["error"]
    assert error and (message is None or message in error), error
    status, text = post(server, "generate", {"text_input": "still here", "max_tokens": 8})
    assert status == 200 and "text_output" in json.loads(text)


def test_listens_on_loopback_only(server):
    listening = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            local, state = row.split()[1], row.split()[3]
            if state == "0A":  # LISTEN
                address, port = local.split(":")
                listening.add((address, int(port, 16)))
    ours = {(a, p) for a, p in listening if p in (server.http_port, server.grpc_port)}
    assert {p for _, p in ours} == {server.http_port, server.grpc_port}
    loopback = {"0100007F", "0000000000000000FFFF00000100007F"}  # 127.0.0.1, and as ::ffff:127.0.0.1 (gRPC)
    assert all(a in loopback for a, _ in ours), ours
