"""Running a kernel call's slices in parallel (ctypes releases the GIL during each call).

Kernels split their output into slices (``split``: whole blocks, rows or channels, so the
results never depend on which thread runs a slice) and ``run`` executes them and returns
when all are done. Two pools can run them, chosen by ``FQT_THREAD_POOL`` or ``set_pool``:

* ``openmp`` (the default where available): the OpenMP runtime torch already runs its
  parallel regions on (``GOMP_parallel``, which libgomp, LLVM's libomp and Intel's libiomp5
  all export). A small generated trampoline per kernel signature lets each team thread
  claim slices from a shared counter and call the kernel directly, with no Python and no GIL
  in between. Torch's OpenMP threads spin for a while after each parallel region, so they
  pick a slice up within microseconds, and no second set of threads competes with them for
  the cores.
* ``python``: a persistent ``ThreadPoolExecutor`` (the first slice runs on the calling
  thread). It serves any callable, and is what ``openmp`` falls back to for a task that is
  not a ``functools.partial`` of a compiled kernel (a ``jit.kernel_hook`` stand-in, say) or
  when no OpenMP runtime is loaded.

``auto`` (the default) picks ``openmp`` when torch's OpenMP runtime is found, else ``python``.
"""
from __future__ import annotations

import ctypes
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache, partial

import torch

from . import jit

POOLS = ("auto", "openmp", "python")
_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_choice: list = []          # [pool name] once chosen: "openmp" or "python"


def num_threads(threads: int | None) -> int:
    """``threads`` validated, or ``torch.get_num_threads()`` when None."""
    if threads is None:
        return max(1, torch.get_num_threads())
    if not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads={threads!r}: expected a positive int or None (torch's thread count)")
    return threads


def set_pool(name: str | None) -> str:
    """Choose the pool ``run`` uses: ``"auto"``, ``"openmp"`` or ``"python"`` (None: the
    ``FQT_THREAD_POOL`` environment variable, ``auto`` when unset). Returns the pool now in
    use; ``"openmp"`` raises when no OpenMP runtime with ``GOMP_parallel`` is loaded."""
    source = "set_pool"
    if name is None:
        name, source = os.environ.get("FQT_THREAD_POOL", "auto") or "auto", "FQT_THREAD_POOL"
    if name not in POOLS:
        raise ValueError(f"{source}={name!r}: expected one of {', '.join(POOLS)}")
    if name != "python" and _gomp_parallel() is None:
        if name == "openmp":
            raise RuntimeError(f"{source}='openmp': no OpenMP runtime exporting GOMP_parallel is loaded in "
                               f"this process (torch built without OpenMP?); use 'python' or 'auto'")
        name = "python"
    _choice[:] = ["python" if name == "python" else "openmp"]
    return _choice[0]


def pool_in_use() -> str:
    """``"openmp"`` or ``"python"``: the pool ``run`` uses (chosen on first use)."""
    return _choice[0] if _choice else set_pool(None)


def run(tasks: list) -> None:
    """Call every zero-argument callable in ``tasks``, in parallel; re-raise the first error.
    Tasks that are ``functools.partial(kernel, *args)`` of one compiled kernel run on the
    OpenMP pool when it is in use."""
    if len(tasks) == 1:
        tasks[0]()
        return
    if pool_in_use() == "openmp" and _run_openmp(tasks):
        return
    futures = [_executor(len(tasks) - 1).submit(t) for t in tasks[1:]]
    tasks[0]()
    for f in futures:
        f.result()


def _executor(workers: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _lock:
        if _pool is None or _pool_size < workers:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool_size = max(workers, os.cpu_count() or 1)
            _pool = ThreadPoolExecutor(_pool_size, thread_name_prefix="fqt-kernel")
        return _pool


@lru_cache(maxsize=4096)
def split(total: int, parts: int, unit: int) -> tuple[tuple[int, int], ...]:
    """``[0, total)`` cut into at most ``parts`` ranges of whole ``unit``s, balanced (cached:
    every kernel call of a step splits the same few shapes)."""
    units = -(-total // unit)
    parts = max(1, min(parts, units))
    bounds = [min(total, (units * p // parts) * unit) for p in range(parts + 1)]
    return tuple((lo, hi) for lo, hi in zip(bounds, bounds[1:]) if hi > lo)


# --- the OpenMP pool -----------------------------------------------------------------------

_OPENMP_LIBRARY = re.compile(r"/lib(gomp|iomp5|omp)[^/]*\.(so|dylib)[.\d]*$")


@lru_cache(maxsize=None)
def _gomp_parallel():
    """``GOMP_parallel(fn, data, num_threads, flags)`` of the OpenMP runtime loaded in this
    process (torch's), or None. Looked up in the libraries already mapped, never loaded."""
    candidates = [None]
    try:
        with open("/proc/self/maps") as f:
            candidates += sorted({line.split()[-1] for line in f if _OPENMP_LIBRARY.search(line.strip())})
    except OSError:
        pass
    for path in candidates:
        try:
            lib = ctypes.CDLL(path, mode=getattr(os, "RTLD_NOLOAD", 0) | ctypes.RTLD_LOCAL) if path else ctypes.CDLL(None)
            fn = lib.GOMP_parallel
        except (OSError, AttributeError):
            continue
        fn.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint)
        fn.restype = None
        return fn
    return None


class _Job(ctypes.Structure):
    """What every team thread reads: the next unclaimed slice, the slice count, the records."""
    _fields_ = [("next", ctypes.c_int64), ("count", ctypes.c_int64), ("records", ctypes.c_void_p)]


_IR_TYPES = {ctypes.c_void_p: "ptr", ctypes.c_int64: "i64", ctypes.c_uint64: "i64", ctypes.c_float: "float"}


def _trampoline_ir(symbol: str, record: type, argtypes: tuple) -> str:
    """``void symbol(_Job *job)``: claim slice indices from ``job->next`` until none is left,
    and call each record's kernel on its arguments (at ctypes' own field offsets)."""
    types = [_IR_TYPES[t] for t in argtypes]
    fields = [getattr(record, f"a{i}").offset for i in range(len(types))]
    loads = "\n".join(f"  %p{i} = getelementptr i8, ptr %rec, i64 {off}\n  %a{i} = load {t}, ptr %p{i}"
                      for i, (t, off) in enumerate(zip(types, fields)))
    args = ", ".join(f"{t} %a{i}" for i, t in enumerate(types))
    return f"""
define void @{symbol}(ptr %job) {{
entry:
  %count_p = getelementptr i8, ptr %job, i64 {_Job.count.offset}
  %count = load i64, ptr %count_p
  %records_p = getelementptr i8, ptr %job, i64 {_Job.records.offset}
  %records = load ptr, ptr %records_p
  br label %claim
claim:
  %i = atomicrmw add ptr %job, i64 1 monotonic
  %more = icmp slt i64 %i, %count
  br i1 %more, label %call, label %done
call:
  %offset = mul i64 %i, {ctypes.sizeof(record)}
  %rec = getelementptr i8, ptr %records, i64 %offset
  %fn = load ptr, ptr %rec
{loads}
  call void %fn({args})
  br label %claim
done:
  ret void
}}
"""


@lru_cache(maxsize=None)
def _signature(prototype: type):
    """``(record struct, trampoline address)`` for kernels of ctypes ``prototype``, or None
    when an argument type has no trampoline (then the Python pool runs the call)."""
    argtypes = prototype._argtypes_
    if prototype._restype_ is not None or any(t not in _IR_TYPES for t in argtypes):
        return None
    record = type("_Record", (ctypes.Structure,),
                  {"_fields_": [("fn", prototype)] + [(f"a{i}", t) for i, t in enumerate(argtypes)]})
    symbol = "fqt_parallel_" + "_".join(_IR_TYPES[t] for t in argtypes)
    library = jit.compile_ir(_trampoline_ir(symbol, record, argtypes), "host")
    return record, library.engine.get_function_address(symbol), library


def _run_openmp(tasks: list) -> bool:
    """Run ``tasks`` on the OpenMP team and return True, or return False when they are not
    all ``partial(kernel, *args)`` of one ctypes kernel (a hook's stand-in, say)."""
    first = tasks[0]
    if type(first) is not partial or not isinstance(first.func, ctypes._CFuncPtr):
        return False
    fn = first.func
    if any(type(t) is not partial or t.func is not fn or t.keywords for t in tasks):
        return False
    sig = _signature(type(fn))
    if sig is None:
        return False
    record, trampoline, _ = sig
    records = (record * len(tasks))(*[record(fn, *t.args) for t in tasks])
    job = _Job(0, len(tasks), ctypes.addressof(records))
    _gomp_parallel()(trampoline, ctypes.addressof(job), len(tasks), 0)
    return True
