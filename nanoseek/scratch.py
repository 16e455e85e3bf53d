"""Per-thread CPU scratch buffers for temporaries that live inside one op call.

glibc hands large freed blocks back to the OS, so a fresh multi-MiB CPU tensor page-faults on first touch on
every call, which can cost as much as the arithmetic that fills it. An op that needs a large temporary only
for the length of one call (never returned, never saved for backward) takes it from here instead. There is one
buffer per (thread, name): it is reused, grown as needed, and held until `release()` (the training recipes call
it when their loop ends) or the thread's end. Two temporaries alive at once need two names. CUDA has its own
caching allocator and does not need this.
"""
from __future__ import annotations

import math
import threading

import torch

_local = threading.local()


def scratch(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A contiguous CPU tensor of `shape` and `dtype`, uninitialized, valid until the next scratch(name, ...)
    call on this thread. The caller must not return it or keep it past its own call."""
    buffers = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = _local.buffers = {}
    n = math.prod(shape)
    buf = buffers.get(name)
    if buf is None or buf.dtype != dtype or buf.numel() < n:
        buf = buffers[name] = torch.empty(n, dtype=dtype, device="cpu")
    return buf[:n].view(shape)


def release() -> None:
    """Drop this thread's buffers (tens of MB after training the benchmark model: the head's gradient workspace,
    the experts' backward temporaries), so a process that trains and then goes on (the demo, a notebook) does not
    keep them."""
    _local.buffers = {}
