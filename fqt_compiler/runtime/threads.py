"""A persistent worker pool for kernel calls (ctypes releases the GIL during each call).

Kernels split their output into one slice per thread; ``run`` executes the slices, the
first on the calling thread, and returns when all are done. The pool lives for the process
so a GEMM does not pay thread start-up.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import torch

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_size = 0


def num_threads(threads: int | None) -> int:
    """``threads`` validated, or ``torch.get_num_threads()`` when None."""
    if threads is None:
        return max(1, torch.get_num_threads())
    if not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads={threads!r}: expected a positive int or None (torch's thread count)")
    return threads


def _executor(workers: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _lock:
        if _pool is None or _pool_size < workers:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool_size = max(workers, os.cpu_count() or 1)
            _pool = ThreadPoolExecutor(_pool_size, thread_name_prefix="fqt-kernel")
        return _pool


def run(tasks: list) -> None:
    """Call every zero-argument callable in ``tasks``, in parallel; re-raise the first error."""
    if len(tasks) == 1:
        tasks[0]()
        return
    futures = [_executor(len(tasks) - 1).submit(t) for t in tasks[1:]]
    tasks[0]()
    for f in futures:
        f.result()


@lru_cache(maxsize=4096)
def split(total: int, parts: int, unit: int) -> tuple[tuple[int, int], ...]:
    """``[0, total)`` cut into at most ``parts`` ranges of whole ``unit``s, balanced (cached:
    every kernel call of a step splits the same few shapes)."""
    units = -(-total // unit)
    parts = max(1, min(parts, units))
    bounds = [min(total, (units * p // parts) * unit) for p in range(parts + 1)]
    return tuple((lo, hi) for lo, hi in zip(bounds, bounds[1:]) if hi > lo)
