"""Running a kernel call's slices in parallel (ctypes releases the GIL during each call).

Kernels split their output into slices (``split``: whole blocks, rows or channels, so the
results never depend on which thread runs a slice) and ``run`` executes them and returns
when all are done. Two pools can run them, chosen by ``FQT_THREAD_POOL`` or ``set_pool``:

* ``openmp`` (the default where available): the OpenMP runtime torch already runs its
  parallel regions on (``GOMP_parallel``, which libgomp, LLVM's libomp and Intel's libiomp5
  all export). A small generated trampoline per kernel signature lets each team thread
  claim slices from a shared counter and call the kernel directly, with no Python and no GIL
  in between. Torch's OpenMP threads spin for a while after each parallel region (unless
  ``OMP_WAIT_POLICY=passive``), so a slice usually finds one awake, and no second set of
  threads competes with them for the cores.
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

from ..codegen.abi import KINDS, KernelABI
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
_POINTER = KINDS["ptr"][1]
# ctypes argument type of a kernel parameter -> its LLVM type (both from the kernel ABI)
_IR_TYPES = {ctype: str(ir_type) for ir_type, ctype, _ in KINDS.values()}
# The entry a call goes through: the slice records, their count, GOMP_parallel's address.
_ENTRY = [("records", "ptr"), ("count", "i64"), ("gomp_parallel", "ptr")]


@lru_cache(maxsize=None)
def _gomp_parallel() -> int | None:
    """The address of ``GOMP_parallel(fn, data, num_threads, flags)`` in the OpenMP runtime
    loaded in this process (torch's), or None. Looked up in the libraries already mapped,
    never loaded."""
    candidates = [None]
    try:
        with open("/proc/self/maps") as f:
            candidates += sorted({line.split()[-1] for line in f if _OPENMP_LIBRARY.search(line.strip())})
    except OSError:
        pass
    for path in candidates:
        try:
            lib = ctypes.CDLL(path, mode=getattr(os, "RTLD_NOLOAD", 0) | ctypes.RTLD_LOCAL) if path else ctypes.CDLL(None)
            return ctypes.cast(lib.GOMP_parallel, _POINTER).value
        except (OSError, AttributeError):
            continue
    return None


def _trampoline_ir(symbol: str, record: type, argtypes: tuple) -> str:
    """``void symbol(records, count, GOMP_parallel)``: runs ``GOMP_parallel(claim, &job,
    count, 0)``, where every team thread (the caller's too) runs ``claim``: take the next slice
    index from ``job.next`` until none is left and call that record's kernel on its
    arguments, read at ctypes' own field offsets."""
    types = [_IR_TYPES[t] for t in argtypes]
    fields = [getattr(record, f"a{i}").offset for i in range(len(types))]
    loads = "\n".join(f"  %p{i} = getelementptr i8, ptr %rec, i64 {off}\n  %a{i} = load {t}, ptr %p{i}"
                      for i, (t, off) in enumerate(zip(types, fields)))
    args = ", ".join(f"{t} %a{i}" for i, t in enumerate(types))
    return f"""
%job = type {{ i64, i64, ptr }}

define internal void @claim(ptr %job) {{
entry:
  %count_p = getelementptr %job, ptr %job, i32 0, i32 1
  %count = load i64, ptr %count_p
  %records_p = getelementptr %job, ptr %job, i32 0, i32 2
  %records = load ptr, ptr %records_p
  br label %next
next:
  %i = atomicrmw add ptr %job, i64 1 monotonic
  %more = icmp slt i64 %i, %count
  br i1 %more, label %call, label %done
call:
  %offset = mul i64 %i, {ctypes.sizeof(record)}
  %rec = getelementptr i8, ptr %records, i64 %offset
  %fn = load ptr, ptr %rec
{loads}
  call void %fn({args})
  br label %next
done:
  ret void
}}

define void @{symbol}(ptr %records, i64 %count, ptr %gomp_parallel) {{
entry:
  %job = alloca %job
  store i64 0, ptr %job
  %count_p = getelementptr %job, ptr %job, i32 0, i32 1
  store i64 %count, ptr %count_p
  %records_p = getelementptr %job, ptr %job, i32 0, i32 2
  store ptr %records, ptr %records_p
  %threads = trunc i64 %count to i32
  call void %gomp_parallel(ptr @claim, ptr %job, i32 %threads, i32 0)
  ret void
}}
"""


@lru_cache(maxsize=None)
def _signature(prototype: type):
    """``(record struct, entry)`` for kernels of ctypes ``prototype``, or None when it returns
    a value or takes an argument type outside the kernel ABI (then the Python pool runs it)."""
    argtypes = prototype._argtypes_
    if prototype._restype_ is not None or any(t not in _IR_TYPES for t in argtypes):
        return None
    record = type("_Record", (ctypes.Structure,),
                  {"_fields_": [("fn", prototype)] + [(f"a{i}", t) for i, t in enumerate(argtypes)]})
    symbol = "fqt_parallel_" + "_".join(_IR_TYPES[t] for t in argtypes)
    entry = KernelABI.of(symbol, _ENTRY)
    library = jit.compile_ir(_trampoline_ir(symbol, record, argtypes), "host")
    return record, library.function(symbol, None, *entry.argtypes)


def _run_openmp(tasks: list) -> bool:
    """Run ``tasks`` on the OpenMP team and return True, or return False when they are not
    all ``partial(kernel, *args)`` of one ctypes kernel (a hook's stand-in, say)."""
    fn = getattr(tasks[0], "func", None)
    if not isinstance(fn, ctypes._CFuncPtr) or any(type(t) is not partial or t.func is not fn or t.keywords
                                                   for t in tasks):
        return False
    sig = _signature(type(fn))
    if sig is None:
        return False
    record, entry = sig
    records = (record * len(tasks))(*[record(fn, *t.args) for t in tasks])
    entry(ctypes.addressof(records), len(tasks), _gomp_parallel())
    return True
