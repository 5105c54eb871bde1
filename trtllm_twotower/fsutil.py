"""Output directories that appear whole or not at all."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


class Terminated(BaseException):
    """SIGTERM arrived while an output was being written (raised so that it is cleaned up)."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(target: Path) -> list[Path]:
    """Remove what killed runs (SIGKILL, power loss) left beside ``target``: temporary directories
    whose writing process no longer exists. Returns what was removed."""
    removed = []
    for tmp in target.parent.glob(f".{target.name}.tmp-*"):
        try:
            pid = int(tmp.name[len(f".{target.name}.tmp-"):].split("-", 1)[0])
        except ValueError:
            continue
        if tmp.is_dir() and not _alive(pid):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises ``Terminated`` (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated("terminated by SIGTERM")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield a temporary directory beside ``target``; when the block succeeds it replaces ``target``
    (a rename on the same filesystem), when it fails, is interrupted (Ctrl-C) or terminated
    (SIGTERM) it is removed and ``target`` is left as it was. Temporaries of killed runs are
    removed first. The directory gets the usual permissions (not mkdtemp's 0700)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    with _sigterm_raises():  # installed before the temporary is made
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
        try:
            umask = os.umask(0)
            os.umask(umask)
            tmp.chmod(0o777 & ~umask)
            yield tmp
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
