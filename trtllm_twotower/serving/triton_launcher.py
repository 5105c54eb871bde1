"""Start a Triton Inference Server on a model repository, on loopback.

Uses the ``tritonserver`` binary bundled in ``nvidia-pytriton`` (Triton 2.51, python backend only;
runs on CPU) with the environment it needs: the interpreter's own libpython first on
LD_LIBRARY_PATH, the wheel's vendored libraries, the python-backend stub for this Python next to
``libtriton_python.so``, this venv's ``bin`` first on PATH, a unique shared-memory prefix.

    python -m trtllm_twotower.serving.triton_launcher --http-port 8000 --grpc-port 8001 [--checkpoint-dir DIR]
        [--api-key KEY] [--drain-seconds 30] [--metrics-port 8002]

In front of users: ``--api-key`` (or TWOTOWER_API_KEY) restricts inference, metadata, model-config,
statistics, trace and logging to clients sending ``Authorization: Bearer KEY`` (tritonserver's
restricted-API feature, HTTP and gRPC); the shared-memory and model-repository APIs are always
restricted, to ``--admin-key`` (default: a random key nobody is told, i.e. closed); health stays open.
SIGTERM drains: the model refuses new requests, running ones finish within ``--drain-seconds``, the
rest end with an error response; then tritonserver exits. No process outlives the launcher: the
server's whole process group is killed on every exit path, tritonserver dies with the launcher
(PR_SET_PDEATHSIG), and the model's process exits when its server is gone.

In a stock Triton container use its own ``tritonserver --model-repository triton_model_repo`` instead.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_REPOSITORY = REPO_ROOT / "triton_model_repo"
DRAIN_FILE_ENV = "TWOTOWER_DRAIN_FILE"  # the model starts its drain when this file appears
# tritonserver's restricted-API groups: what an API key guards, and what only the admin key opens
USER_APIS = ("inference", "metadata", "model-config", "statistics", "trace", "logging")
ADMIN_APIS = ("shared-memory", "model-repository")
KEY_CHARACTERS = re.compile(r"^[A-Za-z0-9._~+/-]{8,256}$")


class ServeError(RuntimeError):
    """The server could not be prepared or started; the message says what is missing."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pytriton_dirs() -> tuple[Path, Path]:
    """(tritonserver dir inside the wheel, its vendored libraries)."""
    try:
        import pytriton
    except ImportError as err:
        raise ServeError("nvidia-pytriton is not installed: pip install 'trtllm-twotower[triton]'") from err
    site = Path(pytriton.__file__).resolve().parents[1]
    server_dir = site / "pytriton" / "tritonserver"
    if not (server_dir / "bin" / "tritonserver").is_file():
        raise ServeError(f"no tritonserver binary in {server_dir} (nvidia-pytriton 0.7.0 ships one)")
    return server_dir, site / "nvidia_pytriton.libs"


def copy_model_repository(source: Path, destination: Path, parameters: dict[str, str]) -> Path:
    """A copy of ``source`` with the given ``parameters`` of every model's config.pbtxt replaced
    (one ``parameters: { key: ... }`` entry per line, as the committed config writes them)."""
    shutil.copytree(source, destination, ignore=shutil.ignore_patterns("__pycache__"))
    for config in destination.glob("*/config.pbtxt"):
        text = config.read_text()
        for key, value in parameters.items():
            pattern = re.compile(r'(key: "%s" value: \{ string_value: )"[^"]*"' % re.escape(key))
            if not pattern.search(text):
                raise ServeError(f"{config}: no parameter {key!r} to set")
            text = pattern.sub(lambda m: m.group(1) + '"' + str(value).replace('"', '\\"') + '"', text)
        config.write_text(text)
    return destination


class TritonServer:
    """A tritonserver process on loopback, in its own process group; stop it with ``stop()``.

    ``healthy()`` is False once the server or one of its python-backend stub processes (the
    models' own processes) has died: Triton itself keeps reporting ready and leaves the clients
    of a dead stub hanging, so the ``Supervisor`` kills and restarts the whole server instead."""

    def __init__(self, model_repository: str | Path = DEFAULT_REPOSITORY, http_port: int | None = None,
                 grpc_port: int | None = None, log_verbose: int = 0, startup_timeout: float = 180.0,
                 log_file: str | Path | None = None, api_key: str | None = None, admin_key: str | None = None,
                 metrics_port: int | None = None, drain_seconds: float = 30.0):
        self.model_repository = Path(model_repository).resolve()
        self.http_port = http_port or free_port()
        self.grpc_port = grpc_port or free_port()
        self.metrics_port = metrics_port or free_port()
        for name, key in (("api_key", api_key), ("admin_key", admin_key)):
            if key is not None and not KEY_CHARACTERS.match(key):
                raise ServeError(f"{name}: 8 to 256 characters of A-Z a-z 0-9 . _ ~ + / -")
        self.api_key = api_key
        self.admin_key = admin_key or secrets.token_urlsafe(32)  # unknown to anyone: those APIs stay closed
        self.drain_seconds = drain_seconds
        self.log_verbose = log_verbose
        self.startup_timeout = startup_timeout
        self.log_file = Path(log_file) if log_file else None  # None: the server logs to our stdout/stderr
        self.shm_prefix = ""
        self.process: subprocess.Popen | None = None
        self.stubs: set[int] = set()
        self._backend_dir: Path | None = None
        self._group: int | None = None  # the process group of the last start (outlives a crashed leader)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def _environment_and_backends(self) -> dict:
        server_dir, libs = _pytriton_dirs()
        libdir = sysconfig.get_config_var("LIBDIR")
        if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
            raise ServeError(f"{sys.executable} has no shared libpython: the python backend stub cannot embed it")
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = server_dir / "python_backend_stubs" / version / "triton_python_backend_stub"
        if not stub.is_file():
            raise ServeError(f"nvidia-pytriton has no python backend stub for Python {version}")
        self._backend_dir = Path(tempfile.mkdtemp(prefix="twotower_backends_"))
        python_backend = self._backend_dir / "python"
        python_backend.mkdir()
        for f in (server_dir / "backends" / "python" / "libtriton_python.so",
                  server_dir / "backends" / "python" / "triton_python_backend_utils.py", stub):
            shutil.copy2(f, python_backend / f.name)
        env = dict(os.environ)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, str(libs), env.get("LD_LIBRARY_PATH")) if p)
        env[DRAIN_FILE_ENV] = str(self.drain_file)
        env["TWOTOWER_DRAIN_SECONDS"] = str(self.drain_seconds)
        return env

    @property
    def drain_file(self) -> Path:
        return self._backend_dir / "drain"

    def restrictions(self) -> list[str]:
        """tritonserver's restricted-API flags: the admin APIs always, the user APIs with a key."""
        groups = [(ADMIN_APIS, self.admin_key)] + ([(USER_APIS, self.api_key)] if self.api_key else [])
        flags = []
        for apis, key in groups:
            flags += [f"--http-restricted-api={','.join(apis)}:authorization=Bearer {key}",
                      f"--grpc-restricted-protocol={','.join(apis)}:authorization=Bearer {key}"]
        return flags

    def start(self) -> "TritonServer":
        env = self._environment_and_backends()
        server_dir, _ = _pytriton_dirs()
        self.shm_prefix = f"twotower_{uuid.uuid4().hex[:12]}_"  # fresh for every start
        cmd = [str(server_dir / "bin" / "tritonserver"), f"--model-repository={self.model_repository}",
               f"--backend-directory={self._backend_dir}",
               f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
               "--http-address=127.0.0.1", f"--http-port={self.http_port}",
               "--grpc-address=127.0.0.1", f"--grpc-port={self.grpc_port}",
               "--allow-metrics=true", "--allow-gpu-metrics=false", "--metrics-address=127.0.0.1",
               f"--metrics-port={self.metrics_port}",
               f"--exit-timeout-secs={int(self.drain_seconds) + 10}", f"--log-verbose={self.log_verbose}",
               *self.restrictions()]
        log = open(self.log_file, "ab") if self.log_file else None
        try:
            self.process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT if log else None,
                                            start_new_session=True, preexec_fn=_die_with_parent)
        finally:
            if log is not None:
                log.close()
        self._group = self.process.pid
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code = self.process.returncode
                self.stop()
                where = self.log_file or "its log above"
                raise ServeError(f"tritonserver exited with code {code} while starting (see {where})")
            if ready(self.url):
                self.stubs = set(stub_processes(self.process.pid))
                return self
            time.sleep(0.5)
        self.stop()
        raise ServeError(f"tritonserver not ready after {self.startup_timeout:.0f} s")

    def healthy(self) -> bool:
        """The server and every stub it started with are still running."""
        if self.process is None or self.process.poll() is not None:
            return False
        return all(process_running(pid) for pid in self.stubs)

    def kill(self) -> None:
        """SIGKILL the whole process group, also when its leader already died (a crashed
        tritonserver leaves its model process behind otherwise): every open connection is reset at
        once (its clients get an error instead of waiting for a dead backend), then clean up."""
        self._kill_group()
        self._cleanup()

    def stop(self) -> None:
        """Drain: the model refuses new requests and ends what still runs after ``drain_seconds``
        with an error; tritonserver exits once nothing is in flight. SIGKILL of the group after
        that (or a few seconds more); clean up."""
        if self.process is not None and self.process.poll() is None:
            self.drain_file.touch()
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=self.drain_seconds + 15)
            except subprocess.TimeoutExpired:
                pass
        self._kill_group()  # what is left, stubs that outlived their server included
        self._cleanup()

    def _kill_group(self) -> None:
        if self._group is not None:
            _signal_group(self._group, signal.SIGKILL)
            self._group = None
        if self.process is not None:
            self.process.wait()

    def _cleanup(self) -> None:
        if self._backend_dir is not None:
            shutil.rmtree(self._backend_dir, ignore_errors=True)
            self._backend_dir = None
        for leftover in Path("/dev/shm").glob(f"{self.shm_prefix}*") if self.shm_prefix else ():
            leftover.unlink(missing_ok=True)

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class Supervisor:
    """Keeps a ``TritonServer`` serving: when the server or a model's backend process dies, the
    server is killed (clients of the lost requests get an error at once; readiness fails while it
    is down) and started again on the same ports. ``restarts`` counts them."""

    def __init__(self, server: TritonServer, interval: float = 0.2):
        self.server = server
        self.interval = interval
        self.restarts = 0
        self._stop = threading.Event()
        self._parked = threading.Event()  # the watcher has left its loop
        self._released = threading.Event()  # the server has stopped: the watcher may end
        self._thread: threading.Thread | None = None

    def start(self) -> "Supervisor":
        if self.server.process is None:
            self.server.start()
        self._thread = threading.Thread(target=self._watch, name="twotower-supervisor", daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            if self.server.healthy():
                continue
            print("twotower: the server or a model backend process died; restarting tritonserver", file=sys.stderr,
                  flush=True)
            self.server.kill()
            while not self._stop.is_set():
                try:
                    self.server.start()
                    self.restarts += 1
                    break
                except ServeError as err:
                    print(f"twotower: restart failed ({err}); trying again", file=sys.stderr, flush=True)
                    time.sleep(1.0)
        self._parked.set()
        self._released.wait()  # a server this thread started dies with it (PR_SET_PDEATHSIG): wait for its drain

    def stop(self) -> None:
        """Stop watching, then drain and stop the server."""
        self._stop.set()
        if self._thread is not None:
            self._parked.wait()
        try:
            self.server.stop()
        finally:
            self._released.set()
            if self._thread is not None:
                self._thread.join()


def ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{url}/v2/health/ready", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def stub_processes(server_pid: int) -> list[int]:
    """PIDs of the python-backend stubs a tritonserver process started (its children)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()  # "pid (comm) state ppid ..."
            comm, fields = text.split("(", 1)[1].rsplit(")", 1)[0], text.rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == server_pid and comm.startswith("triton_python"):
            found.append(int(stat.parent.name))
    return found


def process_running(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it when the launcher dies, however it dies."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-repository", default=str(DEFAULT_REPOSITORY))
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--checkpoint-dir", default=None, help="sets the twotower model's checkpoint_dir parameter")
    p.add_argument("--engine-dir", default=None, help="sets engine_dir and backend=trt")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None)
    p.add_argument("--prefix-cache-bytes", type=int, default=None, help="sets prefix_cache_bytes (0: off)")
    p.add_argument("--log-verbose", type=int, default=0)
    p.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics on 127.0.0.1 (default 8002)")
    p.add_argument("--drain-seconds", type=float, default=30.0,
                   help="on SIGTERM: how long running requests may take to finish before they are ended (default 30)")
    p.add_argument("--api-key", default=os.environ.get("TWOTOWER_API_KEY"),
                   help="require 'Authorization: Bearer KEY' for inference and metadata (default: $TWOTOWER_API_KEY)")
    p.add_argument("--admin-key", default=os.environ.get("TWOTOWER_ADMIN_KEY"),
                   help="opens the shared-memory and model-repository APIs (default: closed)")
    args = p.parse_args(argv)
    if args.drain_seconds < 0:
        p.error("--drain-seconds: must be >= 0")
    overrides = {"project_root": str(REPO_ROOT)}
    if args.checkpoint_dir:
        overrides["checkpoint_dir"] = str(Path(args.checkpoint_dir).resolve())
    if args.engine_dir:
        overrides.update(engine_dir=str(Path(args.engine_dir).resolve()), backend="trt")
    if args.dtype:
        overrides["dtype"] = args.dtype
    if args.prefix_cache_bytes is not None:
        overrides["prefix_cache_bytes"] = str(args.prefix_cache_bytes)
    with tempfile.TemporaryDirectory(prefix="twotower_repo_") as tmp:
        try:
            repo = copy_model_repository(Path(args.model_repository), Path(tmp) / "repo", overrides)
            server = TritonServer(repo, args.http_port, args.grpc_port, args.log_verbose, api_key=args.api_key,
                                  admin_key=args.admin_key, metrics_port=args.metrics_port,
                                  drain_seconds=args.drain_seconds).start()
        except ServeError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        supervisor = Supervisor(server)
        try:
            supervisor.start()
            print(f"tritonserver ready: http://{server.url}  grpc {server.grpc_url}  metrics "
                  f"http://127.0.0.1:{server.metrics_port}/metrics  (pid {server.pid}); restarted if it or its "
                  "model's process dies; SIGTERM / Ctrl-C drains and stops it", flush=True)
            stop.wait()
        finally:
            supervisor.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
