"""The OpenAI server as users start it, for tests: a subprocess on a free loopback port, ready once
``/health`` answers, stopped with SIGTERM (its drain)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from trtllm_twotower.serving.triton_launcher import free_port

ROOT = Path(__file__).resolve().parents[1]
CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}<assistant>"


def start_openai_server(log_path: Path, *args: str, env: dict | None = None, timeout: float = 120):
    """``python -m trtllm_twotower.serving.openai_server --dtype float32 --port P *args`` -> (process,
    port) once ``/health`` answers; fails the test with the server's log if it exits or times out."""
    port = free_port()
    with open(log_path, "w") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen([sys.executable, "-m", "trtllm_twotower.serving.openai_server", "--dtype", "float32",
                                 "--port", str(port), *args], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})})
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc, port
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"server did not start (exit {proc.poll()}): {Path(log_path).read_text()[-2000:]}")
            time.sleep(0.3)


def stop_server(proc, timeout: float = 60) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=timeout)


def with_chat_template(directory: Path) -> Path:
    """``directory`` (a checkpoint) with a chat template in its tokenizer config."""
    config = json.loads((directory / "tokenizer_config.json").read_text())
    (directory / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}))
    return directory
