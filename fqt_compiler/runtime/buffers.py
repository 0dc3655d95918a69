"""Large output and workspace tensors of the runtime, kept and reused across calls.

glibc serves each allocation of 32 MiB or more (its mmap threshold grows no further) from
fresh mmap'ed pages and returns them with munmap on free, so every such tensor is faulted in
page by page again, each step: on some machines (VMs) that costs several times the work
written into it. A training step allocates the same sizes every step, and the tensors
autograd keeps from the forward are freed during the backward, so the next step can take
their memory again. ``empty`` hands out a kept storage of the request's size class (its
bytes rounded up, ``_size_class``) that nothing else references any more (its storage's use count is the cache's own reference
alone: no tensor, view, or tensor saved for backward holds it), else a new one it keeps,
within ``max_bytes`` in all. Sizes below ``min_bytes`` are plain ``torch.empty`` (glibc
reuses its heap for those). Contents are as undefined as ``torch.empty``'s.

The process's allocator settings are not touched; ``release_buffers()`` drops the cache
(a buffer still in use stays valid and is freed with its last tensor), and
``configure(max_bytes=0)`` turns the reuse off.
"""
from __future__ import annotations

import math
import threading
from typing import NamedTuple

import torch

_lock = threading.Lock()
_min_bytes = 1 << 20
_max_bytes = 1 << 30
_kept: dict[int, list[torch.UntypedStorage]] = {}   # byte size -> storages handed out at least once
_kept_bytes = 0
_hits = _misses = 0


class CacheInfo(NamedTuple):
    hits: int         # requests served by a kept buffer
    misses: int       # requests that made a new one (kept, or plain beyond max_bytes)
    kept_bytes: int   # all buffers the cache holds, in use or free


def configure(*, min_bytes: int | None = None, max_bytes: int | None = None) -> None:
    """Set the smallest size that is cached (``min_bytes``) and the most the cache keeps in
    all (``max_bytes``; 0 turns reuse off). Free buffers beyond a smaller ``max_bytes`` are
    released now."""
    global _min_bytes, _max_bytes
    for name, value in (("min_bytes", min_bytes), ("max_bytes", max_bytes)):
        if value is not None and (not isinstance(value, int) or value < 0):
            raise ValueError(f"buffers.configure: {name}={value!r}, expected a non-negative int of bytes")
    with _lock:
        _min_bytes = _min_bytes if min_bytes is None else min_bytes
        _max_bytes = _max_bytes if max_bytes is None else max_bytes
        _evict(0)


def release_buffers() -> int:
    """Forget every kept buffer; returns the bytes the cache held (those not in use are freed
    now, the others with their last tensor)."""
    global _kept_bytes, _hits, _misses
    with _lock:
        released, _kept_bytes, _hits, _misses = _kept_bytes, 0, 0, 0
        _kept.clear()
    return released


def cache_info() -> CacheInfo:
    """Requests of cached sizes since the last ``release_buffers()``, and the bytes kept."""
    return CacheInfo(_hits, _misses, _kept_bytes)


def _free(storage: torch.UntypedStorage) -> bool:
    # 1: only the cache's storage object references it.
    return torch._C._storage_Use_Count(storage._cdata) == 1


def _evict(nbytes: int) -> None:
    """Drop free buffers, oldest size first, until ``nbytes`` more fit under ``max_bytes``."""
    global _kept_bytes
    for size in list(_kept):
        if _kept_bytes + nbytes <= _max_bytes:
            return
        keep = [s for s in _kept[size] if not _free(s)]
        _kept_bytes -= size * (len(_kept[size]) - len(keep))
        if keep:
            _kept[size] = keep
        else:
            del _kept[size]


def _storage(nbytes: int) -> torch.UntypedStorage | None:
    global _kept_bytes, _hits, _misses
    if _kept_bytes > _max_bytes:   # the bound was lowered: drop what is free first
        _evict(0)
    for storage in _kept.get(nbytes, ()):
        if _free(storage):
            _hits += 1
            return storage
    _misses += 1
    _evict(nbytes)
    if _kept_bytes + nbytes > _max_bytes:
        return None
    storage = torch.UntypedStorage(nbytes)
    _kept.setdefault(nbytes, []).append(storage)
    _kept_bytes += nbytes
    return storage


def _size_class(nbytes: int) -> int:
    """``nbytes`` rounded up to one of 8 sizes per power of two: the kept rows of a gradient
    (AQ prunes a random number of groups) vary from step to step, and a buffer of the next
    size up serves them all (wasting at most 1/8)."""
    grain = 1 << max(nbytes.bit_length() - 4, 0)
    return -(-nbytes // grain) * grain


def empty(shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A contiguous tensor like ``torch.empty(shape, dtype=dtype)``, in a reused buffer when
    it is large enough to be cached."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < _min_bytes or nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    with _lock:
        storage = _storage(_size_class(nbytes))
        if storage is None:
            return torch.empty(shape, dtype=dtype)
        # set_ under the lock: once the tensor exists the use count shows it taken.
        return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


def zeros(shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``torch.zeros`` in a reused buffer when large enough (zeroing reused pages is a
    memset; fresh ones would be faulted in first)."""
    return empty(shape, dtype).zero_()


def contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t.contiguous()``, copied into a reused buffer when it is large enough."""
    return t if t.is_contiguous() else empty(t.shape, t.dtype).copy_(t)
