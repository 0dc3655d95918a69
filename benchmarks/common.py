"""Shared benchmark plumbing: machine banner, median timing. Never used by tests to gate on time."""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time

import torch


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def banner(title: str) -> None:
    import llvmlite.binding as llvm
    from fqt_compiler.codegen.targets import host_target
    host = host_target()
    print(f"== {title}")
    print(f"CPU: {cpu_name()} (LLVM cpu {host.cpu}, {host.vector_bits}-bit vectors, "
          f"vpopcntq={'yes' if host.native_vector_popcount else 'no'}); "
          f"cores available: {os.cpu_count()}; torch {torch.__version__}; LLVM {'.'.join(map(str, llvm.llvm_version_info))}")


def median_time(fn, *, repeats: int = 5, warmup: int = 1, min_time: float = 0.0) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved_medians(steps: dict, *, repeats: int, warmup: int = 1) -> tuple[dict, list[dict]]:
    """Median wall time in seconds of every contender in ``steps`` (name -> zero-argument
    step), timed in ``repeats`` rounds that each run every contender once, after ``warmup``
    untimed runs of each. Interleaving puts a change in a shared host's load into every
    contender's times rather than into whichever block of steps it fell on. Also returns the
    rounds (name -> seconds), for paired ratios."""
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    rounds = []
    for _ in range(repeats):
        times = {}
        for name, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            times[name] = time.perf_counter() - t0
        rounds.append(times)
    return {name: statistics.median(r[name] for r in rounds) for name in steps}, rounds


def paired_ratios(rounds: list[dict], baseline: str) -> str:
    """``fqt vs <baseline> per round: a b c`` (the baseline's time over FQT's in each round),
    or "" when either was not timed."""
    if not rounds or "fqt" not in rounds[0] or baseline not in rounds[0]:
        return ""
    return f"fqt vs {baseline} per round: " + " ".join(f"{r[baseline] / r['fqt']:.2f}x" for r in rounds)


def contender_row(times: dict) -> str:
    """``name  t ms ...`` for every timed contender, then FQT's ratio against each other one."""
    row = "  ".join(f"{k} {t * 1e3:8.1f} ms" for k, t in times.items())
    ratios = "".join(f"   fqt vs {k} {t / times['fqt']:5.2f}x" for k, t in times.items()
                     if k != "fqt" and "fqt" in times)
    return row + ratios


# What caps float32 PyTorch at AVX2 (set before torch is imported, so in a child process).
AVX2_ENV = {"MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


def run_avx2_child(script: str, args: list[str], baseline: str = "float32 PyTorch") -> None:
    """Run ``script --avx2-child *args`` in a subprocess whose float32 PyTorch is limited to
    AVX2 (``AVX2_ENV``): the child times the ``hygon`` (AVX2) kernels against it, what this
    host would show if it had no AVX-512."""
    print(f"\n-- hygon (AVX2) kernels vs {baseline} limited to AVX2 "
          f"({' '.join(f'{k}={v}' for k, v in AVX2_ENV.items())})", flush=True)
    subprocess.run([sys.executable, os.path.abspath(script), "--avx2-child", *args],
                   env={**os.environ, **AVX2_ENV}, check=True)
