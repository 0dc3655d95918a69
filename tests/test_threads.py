"""The kernel thread pools (runtime/threads.py): both give the kernels' one-thread results at
any thread count, the OpenMP pool really runs compiled kernels itself, other callables fall
back to the Python pool, and bad pool names are refused naming the option."""
import ctypes
from functools import partial

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import seeded_randn
from fqt_compiler.ops import reference as ref
from fqt_compiler.runtime import binary_gemm, pack, threads
from fqt_compiler.runtime.packed import PackedBits

POOLS = ["python"] + (["openmp"] if threads._gomp_parallel() is not None else [])


@pytest.fixture
def use_pool():
    """``use_pool(name)`` for the test, the pool in use before restored after."""
    before = threads.pool_in_use()
    yield threads.set_pool
    threads.set_pool(before)


@pytest.mark.parametrize("pool", POOLS)
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(m=st.integers(1, 40), n=st.integers(1, 40), k=st.integers(1, 300), nthreads=st.integers(2, 5),
       seed=st.integers(0, 2**16))
def test_gemm_at_any_thread_count_equals_the_reference(use_pool, pool, m, n, k, nthreads, seed):
    """Slices split along M or (few rows) along N, more slices than cores: the int32 result
    and the float32 epilogue (pointer and integer arguments) equal one thread's exactly."""
    use_pool(pool)
    gen = torch.Generator().manual_seed(seed)
    a, b = torch.rand(m, k, generator=gen) > 0.5, torch.rand(n, k, generator=gen) > 0.5
    pa, pb = PackedBits.from_bool(a), PackedBits.from_bool(b)
    assert torch.equal(binary_gemm(pa, pb, threads=nthreads), ref.binary_gemm(a, b))
    scale = torch.rand(n, generator=gen) + 0.5
    one = binary_gemm(pa, pb, scale=scale, threads=1)
    assert torch.equal(binary_gemm(pa, pb, scale=scale, threads=nthreads), one)


@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize("shape", [(1, 5), (37, 65), (130, 129)])
def test_float_arguments_reach_the_kernel(use_pool, pool, shape):
    """``unpack_signs`` passes its ±1 values as f32 kernel arguments (the trampoline loads
    them as floats, not integers), over three threads' slices of 16 rows."""
    use_pool(pool)
    x = seeded_randn(*shape)
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        p = pack.pack_signs(x)
        out = pack.unpack_signs(p.words, shape[1], shape)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(out, torch.where(x > 0, 1.0, -1.0))


@pytest.mark.skipif("openmp" not in POOLS, reason="no OpenMP runtime with GOMP_parallel in this process")
def test_openmp_pool_runs_compiled_kernels_itself(use_pool, monkeypatch):
    """Kernel slices go to the OpenMP team, not to the Python executor; a task that is not a
    ``partial`` of a compiled kernel falls back to it."""
    use_pool("openmp")
    gen = torch.Generator().manual_seed(3)
    a, b = torch.rand(33, 200, generator=gen) > 0.5, torch.rand(17, 200, generator=gen) > 0.5

    def no_executor(workers):
        raise AssertionError("the Python pool ran a compiled kernel's slices")

    with monkeypatch.context() as m:
        m.setattr(threads, "_executor", no_executor)
        out = binary_gemm(PackedBits.from_bool(a), PackedBits.from_bool(b), threads=3)
    assert torch.equal(out, ref.binary_gemm(a, b))
    seen = []
    threads.run([partial(seen.append, i) for i in range(4)])
    assert sorted(seen) == [0, 1, 2, 3]


@pytest.mark.parametrize("pool", POOLS)
def test_every_task_runs_once_and_errors_propagate(use_pool, pool):
    use_pool(pool)
    out = torch.zeros(7, dtype=torch.int64)
    threads.run([partial(out.__setitem__, i, i + 1) for i in range(7)])
    assert out.tolist() == [1, 2, 3, 4, 5, 6, 7]

    def fail():
        raise KeyError("slice 2")
    with pytest.raises(KeyError, match="slice 2"):
        threads.run([lambda: None, lambda: None, fail])


def test_bad_pool_names_the_option(use_pool, monkeypatch):
    with pytest.raises(ValueError, match=r"set_pool='mpi'.*auto, openmp, python"):
        threads.set_pool("mpi")
    monkeypatch.setenv("FQT_THREAD_POOL", "tbb")
    with pytest.raises(ValueError, match=r"FQT_THREAD_POOL='tbb'"):
        threads.set_pool(None)
    monkeypatch.setenv("FQT_THREAD_POOL", "python")
    assert threads.set_pool(None) == "python" and threads.pool_in_use() == "python"
    assert threads.set_pool("auto") == POOLS[-1]


def test_openmp_pool_refused_without_an_openmp_runtime(use_pool, monkeypatch):
    monkeypatch.setattr(threads, "_gomp_parallel", lambda: None)
    with pytest.raises(RuntimeError, match="set_pool='openmp': no OpenMP runtime"):
        threads.set_pool("openmp")
    assert threads.set_pool("auto") == "python"


def test_kernel_prototypes_get_a_trampoline_per_signature():
    """Every parameter kind of the kernel ABI has a trampoline field; a return value has none."""
    from fqt_compiler.codegen.abi import KINDS
    proto = ctypes.CFUNCTYPE(None, *(kind[1] for kind in KINDS.values()))
    assert threads._signature(proto) is not None
    assert threads._signature(ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int64)) is None
