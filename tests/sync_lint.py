"""Counts the calls that read a tensor back to the host, on any device (a CPU stand-in for CUDA's
sync debug mode, which the GPU tests use).

On CUDA each of these waits for the device to finish everything queued: the Python conversions
(``item``, ``tolist``, ``bool``/``int``/``float``), ``.cpu()``/``.numpy()``, and the ops whose output
size depends on the data (``nonzero``, boolean-mask indexing, ``unique``, ``masked_select``, and
``bincount``, which reads the ids' min and max). A step that makes none of these calls can be
queued ahead of the device (and captured in a CUDA graph). The counts are only as good as the
list: ops that synchronise inside C++ without a data-dependent size are not seen here.
"""

from __future__ import annotations

import collections
import contextlib

import torch
from torch.overrides import TorchFunctionMode, resolve_name

READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy", "nonzero",
         "argwhere", "unique", "unique_consecutive", "bincount", "masked_select"}


def _bool_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


class HostReads(TorchFunctionMode):
    """``with HostReads() as reads: ...`` then ``reads.total`` / ``reads.calls`` (name -> count).
    ``with reads.paused(): ...`` leaves out a region that reads only host-side tensors."""

    def __init__(self):
        super().__init__()
        self.calls: collections.Counter = collections.Counter()
        self._paused = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if not self._paused:
            name = resolve_name(func) or getattr(func, "__name__", repr(func))
            short = name.rsplit(".", 1)[-1]
            if short in READS or (short in ("__getitem__", "__setitem__", "index_put_") and len(args) > 1
                                  and _bool_index(args[1])):
                self.calls[name] += 1
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def paused(self):
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    @property
    def total(self) -> int:
        return sum(self.calls.values())
