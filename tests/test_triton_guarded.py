"""The Triton launcher in front of users, started as users start it (a real subprocess): input_ids
refused out of range, the API key through tritonserver's restricted APIs, the model's custom
metrics, the drain on SIGTERM, and no process left behind when the launcher is killed."""

from __future__ import annotations

import http.client
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("pytriton", reason="nvidia-pytriton not installed (pip install '.[triton]')")
grpcclient = pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] not installed")
parser = pytest.importorskip("prometheus_client.parser", reason="prometheus_client not installed ('.[serve]')")

import numpy as np  # noqa: E402

from trtllm_twotower.runtime import TwoTowerRuntime  # noqa: E402
from trtllm_twotower.serving.triton_launcher import (DEFAULT_REPOSITORY, REPO_ROOT, TritonServer,  # noqa: E402
                                                   copy_model_repository, free_port, process_running,
                                                   stub_processes)

pytestmark = pytest.mark.triton
ROOT = Path(__file__).resolve().parents[1]
KEY = "key-" + os.urandom(8).hex()
AUTH = {"Authorization": f"Bearer {KEY}"}


class Launcher:
    """``python -m trtllm_twotower.serving.triton_launcher`` in a subprocess, and what it started."""

    def __init__(self, checkpoint: Path, log: Path, *extra: str):
        self.http, self.grpc, self.metrics = free_port(), free_port(), free_port()
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "trtllm_twotower.serving.triton_launcher", "--checkpoint-dir", str(checkpoint),
             "--dtype", "float32", "--http-port", str(self.http), "--grpc-port", str(self.grpc),
             "--metrics-port", str(self.metrics), *extra],
            cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT, env={**os.environ, "TWOTOWER_API_KEY": KEY})
        deadline = time.monotonic() + 240
        while not (found := re.search(r"\(pid (\d+)\)", log.read_text())):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                pytest.fail(f"launcher did not start: {log.read_text()[-3000:]}")
            time.sleep(0.3)
        self.server = int(found.group(1))
        self.stubs = stub_processes(self.server)
        assert self.stubs, "no model process found"

    def post(self, path: str, body: dict, headers: dict | None = None, timeout: float = 120):
        conn = http.client.HTTPConnection("127.0.0.1", self.http, timeout=timeout)
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, resp.read().decode()

    def get(self, path: str, headers: dict | None = None, port: int | None = None):
        conn = http.client.HTTPConnection("127.0.0.1", port or self.http, timeout=30)
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read().decode()

    def all_gone(self, within: float) -> bool:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if not any(process_running(pid) for pid in [self.server, *self.stubs]):
                return True
            time.sleep(0.1)
        return False


@pytest.fixture(scope="module")
def launcher(demo_dir, tmp_path_factory):
    started = Launcher(demo_dir, tmp_path_factory.mktemp("guarded") / "launcher.log", "--drain-seconds", "3")
    yield started
    if started.proc.poll() is None:
        started.proc.send_signal(signal.SIGTERM)
        started.proc.wait(timeout=60)
    assert started.all_gone(10)


@pytest.fixture(scope="module")
def runtime(demo_dir):
    return TwoTowerRuntime.from_checkpoint(demo_dir, dtype="float32")


def test_input_ids_beyond_int32_reach_the_model_whole_and_are_refused(launcher):
    status, text = launcher.post("/v2/models/twotower/generate", {"input_ids": [5, 2**32 + 72]}, AUTH)
    assert status == 400 and "input_ids: token ids [4294967368] outside the vocabulary" in text, text


def test_ids_in_the_documented_shapes(launcher, runtime):
    """HTTP generate takes a flat list; gRPC takes the [1, N] INT64 tensor; one token comes back as
    a one-element [1, 1] tensor over gRPC (generate writes one-element outputs as JSON scalars)."""
    ref = runtime.generate([[5, 6, 7]], max_new_tokens=1, seed=3).output_ids[0]
    status, text = launcher.post("/v2/models/twotower/generate", {"input_ids": [5, 6, 7], "max_tokens": 1,
                                                                  "random_seed": 3}, AUTH)
    assert status == 200 and json.loads(text)["output_ids"] == ref[0], text
    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{launcher.grpc}")
    client.start_stream(callback=lambda result, error: responses.put((result, error)),
                        headers={"triton-grpc-protocol-authorization": AUTH["Authorization"]})  # Triton's gRPC key
    inputs = []
    for name, value, dtype in (("input_ids", [[5, 6, 7]], "INT64"), ("max_tokens", [[1]], "INT64"),
                               ("random_seed", [[3]], "UINT64")):
        tensor = grpcclient.InferInput(name, [1, len(value[0])], dtype)
        tensor.set_data_from_numpy(np.array(value, dtype=np.int64 if dtype == "INT64" else np.uint64))
        inputs.append(tensor)
    client.async_stream_infer("twotower", inputs)
    result, error = responses.get(timeout=120)
    client.stop_stream()
    client.close()
    assert error is None, error.message()
    assert result.as_numpy("output_ids").tolist() == [ref]


def test_the_api_key_guards_inference_and_the_admin_apis_stay_closed(launcher):
    status, text = launcher.post("/v2/models/twotower/generate", {"text_input": "x", "max_tokens": 2})
    assert status == 403 and "restricted" in text
    status, _ = launcher.post("/v2/models/twotower/generate", {"text_input": "x", "max_tokens": 2},
                              {"Authorization": "Bearer wrong-key-0000"})
    assert status == 403
    assert launcher.post("/v2/models/twotower/generate", {"text_input": "x", "max_tokens": 2}, AUTH)[0] == 200
    assert launcher.get("/v2/health/ready")[0] == 200  # open: load balancers probe it
    assert launcher.get("/v2/models/twotower", AUTH)[0] == 200
    assert launcher.get("/v2/systemsharedmemory/status", AUTH)[0] == 403  # the admin key is not the API key
    assert launcher.post("/v2/repository/index", {}, AUTH)[0] == 403


def test_model_metrics_on_the_metrics_port(launcher):
    def samples() -> dict:
        status, text = launcher.get("/metrics", port=launcher.metrics)
        assert status == 200
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in parser.text_string_to_metric_families(text) for s in family.samples}

    before = samples()
    ok = ("twotower_model_requests_total", (("outcome", "ok"),))
    assert launcher.post("/v2/models/twotower/generate", {"input_ids": [9, 8, 7], "max_tokens": 4}, AUTH)[0] == 200
    after = samples()
    assert after[ok] == before[ok] + 1
    assert after[("twotower_model_prompt_tokens_total", ())] == before[("twotower_model_prompt_tokens_total", ())] + 3
    assert after[("twotower_model_time_to_first_block_seconds_count", ())] >= 1
    assert ("twotower_model_rows_running", ()) in after  # beside Triton's own figures
    assert after[("nv_inference_request_success_total", (("model", "twotower"), ("version", "1")))] >= 1


def test_sigterm_drains_then_ends_what_is_left(launcher):
    """Runs last in the module: it stops the launcher."""
    outcome: dict = {}
    streaming = threading.Event()

    def stream():
        conn = http.client.HTTPConnection("127.0.0.1", launcher.http, timeout=60)
        conn.request("POST", "/v2/models/twotower/generate_stream",
                     json.dumps({"text_input": "drain", "max_tokens": 4000, "stream": True}),
                     {"Content-Type": "application/json", **AUTH})
        lines = []
        for line in conn.getresponse():
            if line.startswith(b"data: "):
                lines.append(json.loads(line[6:]))
                streaming.set()
        conn.close()  # tritonserver waits for open connections before it exits
        outcome["events"] = lines

    thread = threading.Thread(target=stream)
    thread.start()
    assert streaming.wait(timeout=120), "the stream never started"
    launcher.proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    time.sleep(0.5)
    try:  # draining: tritonserver takes no new connections
        status, text = launcher.post("/v2/models/twotower/generate", {"text_input": "late", "max_tokens": 2}, AUTH)
        assert status >= 400, text  # (or the model refuses it)
    except OSError:
        pass
    thread.join(timeout=60)
    assert not thread.is_alive()
    events = outcome["events"]
    assert len(events) > 1 and "text_output" in events[0], events
    assert "3 s drain timeout" in events[-1].get("error", ""), events[-1]  # an error event, not a cut stream
    assert launcher.proc.wait(timeout=60) == 0
    assert launcher.all_gone(5)
    assert time.monotonic() - signalled < 30


def test_a_killed_launcher_leaves_no_process_behind(demo_dir, tmp_path):
    started = Launcher(demo_dir, tmp_path / "launcher.log")
    started.proc.kill()  # SIGKILL: the launcher runs no cleanup at all
    started.proc.wait()
    assert started.all_gone(15), "tritonserver or its model process outlived the launcher"


def test_a_full_queue_answers_server_busy(demo_dir, tmp_path):
    """HTTP generate answers the model's errors with 400 whatever their code (UNAVAILABLE here)."""
    repo = copy_model_repository(DEFAULT_REPOSITORY, tmp_path / "repo", {
        "checkpoint_dir": str(demo_dir), "dtype": "float32", "project_root": str(REPO_ROOT), "max_batch": "1",
        "max_queued_requests": "1"})
    with TritonServer(repo, log_file=tmp_path / "server.log", drain_seconds=0) as server:
        def post(body: dict):
            conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=120)
            conn.request("POST", "/v2/models/twotower/generate", json.dumps(body), {"Content-Type": "application/json"})
            response = conn.getresponse()
            return response.status, response.read().decode()

        long = threading.Thread(target=post, args=({"input_ids": [5, 6], "max_tokens": 4000},))
        long.start()  # holds the one row of the batch
        time.sleep(2)
        waiting = threading.Thread(target=post, args=({"input_ids": [7], "max_tokens": 2},))
        waiting.start()  # waits in the queue
        time.sleep(1)
        status, text = post({"input_ids": [8], "max_tokens": 2})
        assert status == 400 and "server busy: 1 requests are waiting" in text, (status, text)
    long.join(timeout=30)
    waiting.join(timeout=30)
