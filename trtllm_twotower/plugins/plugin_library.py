"""The TensorRT plugin library (``libtwotower_plugins.so``): where it is, and loading it.

Built by ``trtllm_twotower/plugins/build.sh`` with TensorRT present (``TENSORRT_ROOT``); the
torch path does not use it (its kernels are the Triton ones, ``custom_ops.py``).
"""

from __future__ import annotations

import ctypes
from functools import lru_cache
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


class PluginLibraryError(RuntimeError):
    """The plugin library is missing or could not register its creators."""


def library_path(name: str = "libtwotower_plugins.so") -> Path:
    return REPO_ROOT / "build" / "plugins" / name


@lru_cache(maxsize=1)
def load_trt_plugins() -> Path:
    """Load libtwotower_plugins.so (RTLD_GLOBAL): loading it registers our IPluginV3 creators in
    TensorRT's registry under the namespace "twotower" (once: later calls return the same path)."""
    path = library_path()
    if not path.is_file():
        raise PluginLibraryError(f"{path} not built: build with TensorRT present (TENSORRT_ROOT=... "
                                 "bash trtllm_twotower/plugins/build.sh)")
    lib = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    lib.twotower_plugins_registered.restype = ctypes.c_int
    if not lib.twotower_plugins_registered():
        raise PluginLibraryError(f"{path}: its plugin creators could not be registered with TensorRT (already "
                                 "registered by another copy of the library?)")
    return path
