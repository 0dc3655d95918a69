"""Cross-target verification: replay every kernel call of a training step on the target CPU.

One training step of the model (compiled for the target, so every call uses the target's
specializations and argument convention) runs here with host builds standing in for the
target kernels. Each call is captured: its symbol, its integer and float arguments, and for
each pointer the tensor storage it points into (found by watching ``Tensor.data_ptr``), with
the storage's bytes before the call (first use) and after it. A generated C harness links
the emitted target object, replays the same calls in the same order on buffers loaded from
those bytes, and writes every pointed-to buffer after each call; it runs natively (x86
targets this CPU can run) or under ``qemu-aarch64-static -cpu cortex-a72|cortex-a76``.
Every buffer after every call must equal the host's bit for bit (integers, packed bits,
codes and float epilogues alike). The host kernels themselves are checked against the
pure-PyTorch reference by the kernel and lowering tests (tests/test_*_kernels.py,
tests/test_lowering.py).
"""
from __future__ import annotations

import contextlib
import ctypes
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .codegen import aot
from .codegen.targets import Target, get_target, runs_on_host
from .runtime import jit

QEMU_CPU = {"cortex-a72": "cortex-a72", "cortex-a76": "cortex-a76", "generic": "cortex-a72"}
PACKAGES = "qemu-user-static gcc-aarch64-linux-gnu libc6-dev-arm64-cross"


@dataclass
class Capture:
    storages: list = field(default_factory=list)     # (base, nbytes, initial bytes)
    calls: list = field(default_factory=list)        # (use index, [arg], {buffer: bytes after})
    tensors: list = field(default_factory=list)

    def buffer(self, ptr: int) -> tuple[int, int]:
        for i, (base, nbytes, _) in enumerate(self.storages):
            if base <= ptr < base + max(nbytes, 1):
                return i, ptr - base
        for t in self.tensors:
            s = t.untyped_storage()
            base, nbytes = s.data_ptr(), s.nbytes()
            if base <= ptr < base + max(nbytes, 1):
                self.storages.append((base, nbytes, ctypes.string_at(base, nbytes)))
                return len(self.storages) - 1, ptr - base
        raise LookupError(f"kernel pointer {ptr:#x} is in no tensor the wrapper passed")


@contextlib.contextmanager
def _watch_data_ptr(capture: Capture):
    original = torch.Tensor.data_ptr

    def data_ptr(self):
        capture.tensors.append(self)
        return original(self)
    torch.Tensor.data_ptr = data_ptr
    try:
        yield
    finally:
        torch.Tensor.data_ptr = original


def capture_step(model_or_compiled, example_inputs, target: Target):
    """Run one training step for ``target``, capturing every kernel call; returns (uses, capture)."""
    compiled = aot.compile_for(model_or_compiled, target)
    capture = Capture()
    uses: dict = {}

    def hook(spec, load):
        fn = aot.stand_in(spec, load)
        index = uses.setdefault(spec, len(uses))

        def call(*args):
            encoded = []
            for a, t in zip(args, spec.argtypes):
                if t is ctypes.c_void_p:
                    encoded.append(("n",) if not a else ("b", *capture.buffer(a)))
                elif t is ctypes.c_float:
                    encoded.append(("f", float(a).hex()))
                elif t is ctypes.c_uint64:
                    encoded.append(("u", a))
                else:
                    encoded.append(("i", a))
            fn(*args)
            after = {e[1]: ctypes.string_at(capture.storages[e[1]][0], capture.storages[e[1]][1])
                     for e in encoded if e[0] == "b"}
            capture.calls.append((index, encoded, after))
        return call

    threads = torch.get_num_threads()
    torch.set_num_threads(1)    # one call per kernel invocation, in program order
    try:
        with jit.kernel_hook(hook), _watch_data_ptr(capture), torch.random.fork_rng():
            torch.manual_seed(0)
            aot.training_step(compiled, example_inputs)
    finally:
        torch.set_num_threads(threads)
    ordered = sorted(uses, key=uses.get)
    return [aot.KernelUse(s.for_target(target)) for s in ordered], capture


_CAST = {"void *": "(void *)a[{j}]", "int64_t": "(int64_t)a[{j}]", "uint64_t": "(uint64_t)a[{j}]",
         "int32_t": "(int32_t)a[{j}]", "float": "f[{j}]"}


def harness_source(uses) -> str:
    cases = []
    for i, use in enumerate(uses):
        proto = aot.c_prototype(use)
        types = [p.rsplit(" ", 1)[0].rstrip("*").strip() + (" *" if "*" in p else "")
                 for p in proto[proto.index("(") + 1:-2].split(", ")]
        args = ", ".join(_CAST[t].format(j=j) for j, t in enumerate(types))
        cases.append(f"        case {i}: {use.symbol}({args}); break;")
    return HARNESS.replace("@CASES@", "\n".join(cases))


HARNESS = r"""
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include "fqt_kernels.h"

static char *buf[1 << 16];
static long size[1 << 16];

static void dump(const char *path, const char *p, long n) {
    FILE *o = fopen(path, "wb");
    if (!o || fwrite(p, 1, n, o) != (size_t)n) { perror(path); exit(2); }
    fclose(o);
}

int main(void) {
    FILE *s = fopen("script.txt", "r");
    int nbuf;
    if (!s || fscanf(s, "%d", &nbuf) != 1) return 2;
    for (int i = 0; i < nbuf; i++) {
        char path[64];
        if (fscanf(s, "%ld", &size[i]) != 1) return 2;
        buf[i] = aligned_alloc(64, (size[i] + 64) / 64 * 64);
        snprintf(path, sizeof path, "buf_%d.bin", i);
        FILE *in = fopen(path, "rb");
        if (!in || fread(buf[i], 1, size[i], in) != (size_t)size[i]) { perror(path); return 2; }
        fclose(in);
    }
    int sym, nargs, call = 0;
    while (fscanf(s, "%d %d", &sym, &nargs) == 2) {
        uint64_t a[32] = {0};
        float f[32] = {0};
        int bi[32];
        for (int j = 0; j < nargs; j++) {
            char t, tok[64];
            bi[j] = -1;
            if (fscanf(s, " %c", &t) != 1) return 2;
            if (t == 'b') {
                long off;
                if (fscanf(s, "%d %ld", &bi[j], &off) != 2) return 2;
                a[j] = (uint64_t)(uintptr_t)(buf[bi[j]] + off);
            } else if (t == 'i') {
                long long v;
                if (fscanf(s, "%lld", &v) != 1) return 2;
                a[j] = (uint64_t)v;
            } else if (t == 'u') {
                unsigned long long v;
                if (fscanf(s, "%llu", &v) != 1) return 2;
                a[j] = v;
            } else if (t == 'f') {
                if (fscanf(s, "%63s", tok) != 1) return 2;
                f[j] = strtof(tok, NULL);
            }
        }
        switch (sym) {
@CASES@
        default: return 3;
        }
        for (int j = 0; j < nargs; j++) {
            if (bi[j] < 0) continue;
            char path[64];
            snprintf(path, sizeof path, "out_%d_%d.bin", call, bi[j]);
            dump(path, buf[bi[j]], size[bi[j]]);
        }
        call++;
    }
    printf("%d calls\n", call);
    return 0;
}
"""


def runner(target: Target) -> list[str] | None:
    """How to execute a target binary here, or None when it cannot run."""
    if runs_on_host(target):
        return []
    if target.is_aarch64 and shutil.which("qemu-aarch64-static"):
        return ["qemu-aarch64-static", "-cpu", QEMU_CPU.get(target.cpu, target.cpu)]
    return None


@dataclass
class Result:
    symbol: str
    family: str
    calls: int = 0
    buffers: int = 0
    mismatches: int = 0

    @property
    def passed(self) -> bool:
        return self.calls > 0 and self.mismatches == 0


def verify(model_or_compiled, example_inputs, target, work_dir=None) -> list[Result]:
    """Replay one training step's kernel calls on ``target``; one ``Result`` per kernel."""
    target = get_target(target)
    gcc, run = aot.linker(target), runner(target)
    if gcc is None or run is None:
        raise RuntimeError(f"cannot build or run {target.name} code here: install {PACKAGES}")
    uses, capture = capture_step(model_or_compiled, example_inputs, target)
    work = Path(work_dir or tempfile.mkdtemp(prefix=f"fqt-verify-{target.name}-"))
    aot.write_kernels(uses, target, work)
    (work / "harness.c").write_text(harness_source(uses))
    subprocess.run([gcc, "-static", "-O1", "-o", str(work / "harness"), str(work / "harness.c"),
                    str(work / "fqt_kernels.o")], check=True, capture_output=True, text=True)
    lines = [str(len(capture.storages))] + [str(n) for _, n, _ in capture.storages]
    for i, (_, _, initial) in enumerate(capture.storages):
        (work / f"buf_{i}.bin").write_bytes(initial)
    for index, encoded, _ in capture.calls:
        lines.append(f"{index} {len(encoded)} " + " ".join(" ".join(map(str, e)) for e in encoded))
    (work / "script.txt").write_text("\n".join(lines) + "\n")
    proc = subprocess.run(run + ["./harness"], cwd=work, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"harness failed on {target.name} ({' '.join(run) or 'native'}): "
                           f"{proc.returncode} {proc.stderr[-2000:]}")
    results = [Result(u.symbol, u.spec.family) for u in uses]
    for c, (index, _, after) in enumerate(capture.calls):
        r = results[index]
        r.calls += 1
        for b, host_bytes in after.items():
            r.buffers += 1
            r.mismatches += (work / f"out_{c}_{b}.bin").read_bytes() != host_bytes
    return results


def table(results: list[Result], target: Target) -> str:
    lines = [f"verify {target.name} ({target.cpu}): every buffer after every call vs the host, bit for bit",
             f"{'kernel':44s} {'family':14s} {'calls':>5s} {'buffers':>7s}  result"]
    for r in results:
        lines.append(f"{r.symbol:44s} {r.family:14s} {r.calls:5d} {r.buffers:7d}  "
                     f"{'PASS' if r.passed else 'FAIL'}")
    ok = all(r.passed for r in results)
    lines.append(f"{'PASS' if ok else 'FAIL'}: {sum(r.passed for r in results)}/{len(results)} kernels")
    return "\n".join(lines)
