"""Host-to-device uploads that do not synchronise.

A plain ``tensor.to("cuda")`` (or ``torch.tensor(data, device="cuda")``) copies from pageable host
memory: PyTorch waits for the copy and the driver first drains the stream, so every such upload
stalls the host until the device has finished all queued work. The runtime uploads small per-row
values (settings, row indices, lengths) between kernels; staged through pinned memory they are
queued like a kernel instead (the caching host allocator keeps the pinned block until the copy ran).
"""

from __future__ import annotations

import torch


def upload(values, device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``values`` (a list, a number or a host tensor) as a tensor on ``device``, without a sync."""
    t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
