#!/usr/bin/env python3
"""Serving under load (CPU, loopback): the OpenAI-compatible server or Triton, as users start them.

Closed loop: ``--concurrency`` clients send streaming requests back to back until ``--requests``
are done; a fraction of them hang up after their first block. Recorded: requests/s, time to the
first block (p50/p95/max), the server's RSS over the run (sampled every 0.5 s; for Triton the
server plus its model process), errors, and, for Triton, how long the supervisor takes to restart
the server after its model process is killed mid-stream.

    python bench/serving_load.py --server openai --requests 10000 --out bench/results/serving_openai_cpu.json
    python bench/serving_load.py --server triton --requests 2000 --out bench/results/serving_triton_cpu.json

``--limits`` (OpenAI server) instead measures the server in front of users: a 100 MB body (413 time,
RSS growth), ``/health`` latency while a 20 MB prompt is refused, a 16-token request beside a
1,000-prompt request against alone, and SIGTERM with 8 running streams (the drain):

    python bench/serving_load.py --server openai --limits --out bench/results/serving_limits_openai_cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import platform
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_towers import git_commit  # noqa: E402
from trtllm_twotower.serving.triton_launcher import (DEFAULT_REPOSITORY, REPO_ROOT, Supervisor, TritonServer,  # noqa: E402
                                   copy_model_repository, free_port, ready, stub_processes)


def rss_bytes(pids: list[int], field: str = "VmRSS") -> int:
    """Resident bytes of the processes (``VmHWM``: their peak so far)."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


class Target:
    """A running server: where to POST a streaming request, and how to read its events."""

    def __init__(self, kind: str, port: int, pids_fn):
        self.kind, self.port, self.pids = kind, port, pids_fn

    def request(self, i: int, max_tokens: int) -> tuple[str, bytes]:
        prompt = f"Request {i}: return the"
        if self.kind == "openai":
            body = {"prompt": prompt, "max_tokens": max_tokens, "stream": True, "temperature": 0.0}
            return "/v1/completions", json.dumps(body).encode()
        body = {"text_input": prompt, "max_tokens": max_tokens, "stream": True}
        return "/v2/models/twotower/generate_stream", json.dumps(body).encode()

    def stream(self, i: int, max_tokens: int, hang_up: bool) -> tuple[float | None, bool]:
        """(seconds to the first block or None, ok): ok = the stream reached its end marker (OpenAI's
        [DONE], Triton's final response with the stats), or the client hung up after its first block."""
        end_marker = b"data: [DONE]" if self.kind == "openai" else b'"nfe":'  # Triton: the stats response

        path, body = self.request(i, max_tokens)
        start = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        try:
            conn.request("POST", path, body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            if response.status != 200:
                return None, False
            first = None
            for line in response:
                if line.startswith(b"data: ") and first is None:
                    first = time.perf_counter() - start
                    if hang_up:
                        return first, True
                if b'"error"' in line:
                    return first, False
                if end_marker in line:
                    return first, first is not None
            return first, False  # the stream ended without its end marker
        except (OSError, http.client.HTTPException):
            return None, False
        finally:
            conn.close()


def load(target: Target, requests: int, concurrency: int, max_tokens: int, hang_up_every: int) -> dict:
    lock = threading.Lock()
    counter = {"next": 0}
    firsts, errors, hung_up = [], [0], [0]
    rss = []
    stop = threading.Event()

    def sample():
        while not stop.wait(0.5):
            rss.append((time.perf_counter(), rss_bytes(target.pids())))

    def client():
        while True:
            with lock:
                i = counter["next"]
                if i >= requests:
                    return
                counter["next"] += 1
            hang = hang_up_every > 0 and i % hang_up_every == hang_up_every - 1
            first, ok = target.stream(i, max_tokens, hang)
            with lock:
                if not ok:
                    errors[0] += 1
                elif first is not None:
                    firsts.append(first)
                hung_up[0] += hang

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    stop.set()
    firsts.sort()
    q = lambda f: firsts[min(len(firsts) - 1, int(f * len(firsts)))]  # noqa: E731
    return {"requests": requests, "concurrency": concurrency, "max_tokens": max_tokens, "seconds": seconds,
            "requests_per_s": requests / seconds, "errors": errors[0], "hung_up_after_first_block": hung_up[0],
            "first_block_s": {"p50": q(0.5), "p95": q(0.95), "max": firsts[-1], "mean": statistics.mean(firsts)},
            "rss_bytes": {"first": rss[0][1] if rss else None, "last": rss[-1][1] if rss else None,
                          "max": max(r for _, r in rss) if rss else None,
                          "samples": [r for _, r in rss[:: max(1, len(rss) // 50)]]}}


def openai_server(checkpoint: str | None, log: Path, *extra: str):
    port = free_port()
    cmd = [sys.executable, "-m", "trtllm_twotower.serving.openai_server", "--port", str(port), "--dtype", "float32",
           *extra]
    if checkpoint:
        cmd += ["--checkpoint", checkpoint]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc, Target("openai", port, lambda: [proc.pid])
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"the server did not start (see {log})")


def post_json(port: int, body: dict, timeout: float = 600) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def huge_body(port: int, pid: int, size: int) -> dict:
    """Send ``size`` bytes with their Content-Length; time the answer, and the server's RSS growth
    (resident and peak) across it."""
    rss, peak = rss_bytes([pid]), rss_bytes([pid], "VmHWM")
    sock = socket.create_connection(("127.0.0.1", port))
    start = time.perf_counter()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % size)
    chunk, sent, answer = b"x" * (1 << 20), 0, b""
    try:
        while sent < size and not select.select([sock], [], [], 0)[0]:
            sock.sendall(chunk)
            sent += len(chunk)
    except OSError:
        pass  # the server answered and closed
    while b"\r\n\r\n" not in answer and (part := sock.recv(65536)):
        answer += part
    seconds = time.perf_counter() - start
    sock.close()
    time.sleep(0.5)
    return {"body_bytes": size, "status": int(answer.split()[1]), "answered_after_s": seconds,
            "client_sent_bytes": sent, "rss_growth_bytes": rss_bytes([pid]) - rss,
            "peak_rss_growth_bytes": rss_bytes([pid], "VmHWM") - peak}


def health_during_big_prompt(port: int, size: int) -> dict:
    """Poll /health every 20 ms while a ``size``-character prompt is sent and refused."""
    result: dict = {}

    def big():
        start = time.perf_counter()
        result["status"], text = post_json(port, {"prompt": "a" * size, "max_tokens": 4})
        result["answered_after_s"] = time.perf_counter() - start
        result["message"] = json.loads(text)["error"]["message"][:120]

    thread = threading.Thread(target=big)
    thread.start()
    latencies = []
    while thread.is_alive():
        start = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/health")
        conn.getresponse().read()
        conn.close()
        latencies.append(time.perf_counter() - start)
        time.sleep(0.02)
    thread.join()
    return {"prompt_chars": size, "big_request": result, "health_polls": len(latencies),
            "health_max_s": max(latencies), "health_median_s": statistics.median(latencies)}


def short_beside_wide(port: int, prompts: int, max_tokens: int) -> dict:
    """A ``max_tokens`` request alone (median of 3), then beside a ``prompts``-prompt request
    (non-streaming; its client hangs up afterwards, which frees its rows)."""
    short = {"prompt": "A short request", "max_tokens": max_tokens, "temperature": 0.0}

    def timed() -> float:
        start = time.perf_counter()
        status, _ = post_json(port, short)
        assert status == 200
        return time.perf_counter() - start

    alone = statistics.median(timed() for _ in range(3))
    body = json.dumps({"prompt": [f"Wide request, prompt {i}:" for i in range(prompts)], "max_tokens": max_tokens,
                       "temperature": 0.0}).encode()
    wide = socket.create_connection(("127.0.0.1", port))
    wide.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    time.sleep(2.0)  # the wide request fills the batch
    beside = timed()
    wide.close()
    return {"max_tokens": max_tokens, "wide_prompts": prompts, "alone_s": alone, "beside_wide_s": beside,
            "ratio": beside / alone}


def drain_with_streams(proc, port: int, streams: int, drain_seconds: float) -> dict:
    """SIGTERM while ``streams`` streams run (half short enough to finish within the drain, half
    not): how each ends, and how the process ends."""
    ends: dict = {}
    started = threading.Barrier(streams + 1)

    def stream(i: int):
        body = {"prompt": f"Drain {i}", "max_tokens": 48 if i % 2 == 0 else 4000, "stream": True,
                "temperature": 0.0}
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        conn.request("POST", "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
        response = conn.getresponse()
        first = True
        for line in response:
            if line.startswith(b"data: ") and first:
                first = False
                started.wait()
            if line.startswith(b"data: [DONE]"):
                ends[i] = ("done", time.monotonic())
            elif line.startswith(b"data: ") and b'"error"' in line:
                ends[i] = ("error event", time.monotonic())
        ends.setdefault(i, ("cut", time.monotonic()))
        conn.close()

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    started.wait()
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(timeout=drain_seconds + 60)
    code = proc.wait(timeout=drain_seconds + 60)
    exited = time.monotonic() - signalled
    return {"streams": streams, "drain_seconds": drain_seconds,
            "endings": {kind: sum(1 for k, _ in ends.values() if k == kind) for kind in ("done", "error event", "cut")},
            "last_stream_end_after_s": max(t for _, t in ends.values()) - signalled,
            "exit_code": code, "exited_after_s": exited, "server_process_left": Path(f"/proc/{proc.pid}").exists()}


def limits(checkpoint: str | None, log: Path) -> dict:
    drain_seconds = 5.0
    proc, target = openai_server(checkpoint, log, "--max-request-bytes", str(32 << 20), "--max-batch", "4",
                                 "--max-rows-per-request", "1000", "--drain-seconds", str(drain_seconds))
    try:
        result = {"server_flags": "--max-request-bytes 32 MiB --max-batch 4 --max-rows-per-request 1000 "
                                  f"--drain-seconds {drain_seconds:g}",
                  "huge_body": huge_body(target.port, proc.pid, 100 << 20),
                  "health_during_20mb_prompt": health_during_big_prompt(target.port, 20 << 20),
                  "short_beside_1000_prompts": short_beside_wide(target.port, 1000, 16)}
        result["drain"] = drain_with_streams(proc, target.port, 8, drain_seconds)
        return result
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def killed_backend(server: TritonServer, supervisor: Supervisor) -> dict:
    """Kill the model process mid-stream; time the client's error and the restart."""
    target = Target("triton", server.http_port, lambda: [])
    result = {}

    def victim():
        result["first"], result["ok"] = target.stream(0, 4000, False)
        result["ended"] = time.monotonic()

    thread = threading.Thread(target=victim)
    thread.start()
    time.sleep(3.0)
    killed = time.monotonic()
    for pid in server.stubs:
        os.kill(pid, signal.SIGKILL)
    thread.join(timeout=60)
    while supervisor.restarts == 0 and time.monotonic() - killed < 180:
        time.sleep(0.05)
    return {"client_error_after_s": result.get("ended", float("nan")) - killed, "client_got_error": not result.get("ok"),
            "restarted_after_s": time.monotonic() - killed, "ready_after_restart": ready(server.url)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server", choices=["openai", "triton"], default="openai")
    p.add_argument("--checkpoint", default=None, help="default: the shipped demo model")
    p.add_argument("--requests", type=int, default=10000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--hang-up-every", type=int, default=50, help="every Nth request disconnects after its first block")
    p.add_argument("--limits", action="store_true", help="the OpenAI server in front of users (see above)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.limits and args.server != "openai":
        p.error("--limits: measured on the OpenAI server only")
    tmp = Path(tempfile.mkdtemp(prefix="twotower_load_"))
    result = {"server": args.server, "device": f"CPU ({platform.machine()}, {os.cpu_count()} cores)",
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
              "commit": git_commit(), "checkpoint": args.checkpoint or "shipped demo model",
              "load_average_at_start": os.getloadavg()}  # a shared machine: how busy it was
    if args.limits:
        result["limits"] = limits(args.checkpoint, tmp / "server.log")
    elif args.server == "openai":
        proc, target = openai_server(args.checkpoint, tmp / "server.log")
        try:
            result["load"] = load(target, args.requests, args.concurrency, args.max_tokens, args.hang_up_every)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    else:
        params = {"project_root": str(REPO_ROOT), "dtype": "float32", "max_tokens": str(args.max_tokens)}
        if args.checkpoint:
            params["checkpoint_dir"] = str(Path(args.checkpoint).resolve())
        repo = copy_model_repository(DEFAULT_REPOSITORY, tmp / "repo", params)
        server = TritonServer(repo, log_file=tmp / "server.log")
        supervisor = Supervisor(server).start()
        try:
            target = Target("triton", server.http_port, lambda: [server.pid, *stub_processes(server.pid)])
            result["load"] = load(target, args.requests, args.concurrency, args.max_tokens, args.hang_up_every)
            result["killed_backend"] = killed_backend(server, supervisor)
        finally:
            supervisor.stop()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "load"}, indent=1))
    if "load" in result:
        print(json.dumps({k: v for k, v in result["load"].items() if k != "rss_bytes"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
