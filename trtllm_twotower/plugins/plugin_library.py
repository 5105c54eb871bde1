"""The TensorRT plugin library (``libtwotower_plugins.so``): where it is, which model config its
kernels were compiled for, and loading it.

Built by ``trtllm_twotower/plugins/build.sh CONFIG`` with TensorRT present (``TENSORRT_ROOT``):
the Triton kernels compiled ahead of time for that config (``build/aot/``, ``aot.py``) and the
plugins over them (``build/plugins/``). The torch path does not use it (it runs the same Triton
kernels through ``custom_ops.py``).
"""

from __future__ import annotations

import ctypes
import json
from functools import lru_cache
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


class PluginLibraryError(RuntimeError):
    """The plugin library is missing, built for another model config, or could not register."""


def library_path(name: str = "libtwotower_plugins.so") -> Path:
    return REPO_ROOT / "build" / "plugins" / name


def aot_manifest_path() -> Path:
    return REPO_ROOT / "build" / "aot" / "manifest.json"


def check_config(cfg, dtype: str | None = None, path: Path | None = None) -> dict:
    """The AOT manifest of the built library, after checking that its kernels were compiled for
    ``cfg`` (and ``dtype``): a library built for another config has no kernel variant for this one's
    shapes, and would fail at the first enqueue."""
    path = path or aot_manifest_path()
    build = "bash trtllm_twotower/plugins/build.sh CONFIG (with TENSORRT_ROOT=...)"
    if not path.is_file():
        raise PluginLibraryError(f"{path} not found: build the plugin library for this model with {build}")
    manifest = json.loads(path.read_text())
    built_for = manifest.get("config", {})
    differ = sorted(k for k, v in cfg.to_dict().items() if built_for.get(k) != v)
    if differ:
        raise PluginLibraryError(f"the plugin library's kernels were compiled for another model config ({', '.join(differ[:5])}"
                                 f"{' ...' if len(differ) > 5 else ''} differ): rebuild it with {build}")
    if dtype is not None and dtype not in manifest.get("dtypes", []):
        raise PluginLibraryError(f"the plugin library has no {dtype} kernels (built for {manifest.get('dtypes')}): "
                                 f"rebuild with {build}")
    return manifest


@lru_cache(maxsize=1)
def load_trt_plugins() -> Path:
    """Load libtwotower_plugins.so (RTLD_GLOBAL): loading it registers our IPluginV3 creators in
    TensorRT's registry under the namespace "twotower" (once: later calls return the same path)."""
    path = library_path()
    if not path.is_file():
        raise PluginLibraryError(f"{path} not built: build with TensorRT present (TENSORRT_ROOT=... "
                                 "bash trtllm_twotower/plugins/build.sh CONFIG)")
    lib = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    lib.twotower_plugins_registered.restype = ctypes.c_int
    if not lib.twotower_plugins_registered():
        raise PluginLibraryError(f"{path}: its plugin creators could not be registered with TensorRT (already "
                                 "registered by another copy of the library?)")
    return path
