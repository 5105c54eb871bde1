#!/usr/bin/env python3
"""Serving under load (CPU, loopback): the OpenAI-compatible server or Triton, as users start them.

Closed loop: ``--concurrency`` clients send streaming requests back to back until ``--requests``
are done; a fraction of them hang up after their first block. Recorded: requests/s, time to the
first block (p50/p95/max), the server's RSS over the run (sampled every 0.5 s; for Triton the
server plus its model process), errors, and, for Triton, how long the supervisor takes to restart
the server after its model process is killed mid-stream.

    python bench/serving_load.py --server openai --requests 10000 --out bench/results/serving_openai_cpu.json
    python bench/serving_load.py --server triton --requests 2000 --out bench/results/serving_triton_cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import platform
import signal
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


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
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


def openai_server(checkpoint: str | None, log: Path):
    port = free_port()
    cmd = [sys.executable, "-m", "trtllm_twotower.serving.openai_server", "--port", str(port), "--dtype", "float32"]
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
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="twotower_load_"))
    result = {"server": args.server, "device": f"CPU ({platform.machine()}, {os.cpu_count()} cores)",
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
              "commit": git_commit(), "checkpoint": args.checkpoint or "shipped demo model"}
    if args.server == "openai":
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
    print(json.dumps({k: v for k, v in result["load"].items() if k != "rss_bytes"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
