"""Cross-target verification: replay every kernel call of a training step on the target CPU.

One training step of the model (compiled for the target, so every call uses the target's
specializations and argument convention) runs here with host builds standing in for the
target kernels. Each call is captured: its symbol, its integer and float arguments, and for
each pointer the tensor storage it points into (found by watching ``Tensor.data_ptr``), with
the storage's bytes before the call (first use) and after it. A C harness links the emitted
target object, replays the same calls in the same order on buffers loaded from
those bytes, and writes every pointed-to buffer after each call; it runs natively (x86
targets this CPU can run) or under ``qemu-aarch64-static -cpu cortex-a72|cortex-a76``.
Two comparisons per call, both bit for bit (integers, packed bits, codes and float
epilogues alike): every buffer after the call against the host's, and against what the
pure-PyTorch reference says the call must write given the buffers as the target had them
before it (``oracle``; the GEMMs' scratch matrix is compared with neither: its layout is the
kernel's own, and a host build of an AVX2 panel kernel keeps broadcast A words there that a
NEON one does not). The harness is
``harness.c`` (package data) plus a generated ``harness_cases.h`` that calls each kernel with
the argument types of its ABI.

Besides model steps, ``odd_shapes`` runs kernels at the shapes tails hide in: K = 1, 63, 64,
65, M or N = 1, and conv layers with stride 2, padding 1 and 2, dilation 2.
"""
from __future__ import annotations

import contextlib
import ctypes
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from ..codegen.targets import Target, get_target, runs_on_host
from ..compiler import compile
from ..config import Config
from ..runtime import binary_gemm, jit, pack_signs
from . import oracle
from .emit import linker, write_kernels
from .record import KernelUse, compile_for, stand_in, training_step

QEMU_CPU = {"cortex-a72": "cortex-a72", "cortex-a76": "cortex-a76", "generic": "cortex-a72"}
PACKAGES = "qemu-user-static gcc-aarch64-linux-gnu libc6-dev-arm64-cross"


@dataclass
class Capture:
    storages: list = field(default_factory=list)     # (base, nbytes, initial bytes)
    calls: list = field(default_factory=list)        # (use index, [arg], {buffer: bytes after})
    tensors: list = field(default_factory=list)
    known: dict = field(default_factory=dict)        # buffer: bytes the last kernel call left

    def buffer(self, ptr: int) -> tuple[int, int]:
        for i in reversed(range(len(self.storages))):
            base, nbytes, _ = self.storages[i]
            if base <= ptr < base + max(nbytes, 1):
                return self._current(i), ptr - base
        for t in self.tensors:
            s = t.untyped_storage()
            base, nbytes = s.data_ptr(), s.nbytes()
            if base <= ptr < base + max(nbytes, 1):
                self.storages.append((base, nbytes, ctypes.string_at(base, nbytes)))
                return len(self.storages) - 1, ptr - base
        raise LookupError(f"kernel pointer {ptr:#x} is in no tensor the wrapper passed")

    def _current(self, i: int) -> int:
        """Buffer ``i``, or a new buffer holding the storage's bytes now if torch wrote into it
        since a kernel last did (an in-place STE mask between the GEMM that wrote a gradient
        and the region kernel that reads it): the harness replays kernel calls only."""
        base, nbytes, initial = self.storages[i]
        now = ctypes.string_at(base, nbytes)
        if now == self.known.get(i, initial):
            return i
        self.storages.append((base, nbytes, now))
        return len(self.storages) - 1


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
    compiled = compile_for(model_or_compiled, target)
    return capture_calls(lambda: training_step(compiled, example_inputs), target)


def capture_calls(run, target: Target):
    """Call ``run()`` (which requests kernels for ``target``), capturing every kernel call."""
    capture = Capture()
    uses: dict = {}

    def hook(spec, load):
        fn = stand_in(spec, load)
        index = uses.setdefault(spec, len(uses))

        def call(*args):
            encoded = []
            for a, p in zip(args, spec.abi.params):
                if p.kind == "ptr":
                    encoded.append(("n",) if not a else ("b", *capture.buffer(a)))
                elif p.kind == "f32":
                    encoded.append(("f", float(a).hex()))
                elif p.kind == "u64":
                    encoded.append(("u", a))
                else:
                    encoded.append(("i", a))
            fn(*args)
            after = {e[1]: ctypes.string_at(capture.storages[e[1]][0], capture.storages[e[1]][1])
                     for e in encoded if e[0] == "b"}
            capture.known.update(after)
            capture.calls.append((index, encoded, after))
        return call

    threads = torch.get_num_threads()
    torch.set_num_threads(1)    # one call per kernel invocation, in program order
    try:
        with jit.kernel_hook(hook), _watch_data_ptr(capture), torch.random.fork_rng():
            torch.manual_seed(0)
            run()
    finally:
        torch.set_num_threads(threads)
    ordered = sorted(uses, key=uses.get)
    return [KernelUse(s.for_target(target)) for s in ordered], capture


_CAST = {"ptr": "(void *)a[{j}]", "i64": "(int64_t)a[{j}]", "u64": "(uint64_t)a[{j}]", "f32": "f[{j}]"}


def harness_cases(uses) -> str:
    """``harness_cases.h``: ``call_kernel(sym, a, f)`` calls kernel ``sym`` (the index of its
    use) with each argument cast to the C type of its ABI parameter."""
    cases = []
    for i, use in enumerate(uses):
        args = ", ".join(_CAST[p.kind].format(j=j) for j, p in enumerate(use.spec.abi.params))
        cases.append(f"    case {i}: {use.symbol}({args}); return 0;")
    return ("static int call_kernel(int sym, const uint64_t *a, const float *f) {\n"
            "    (void)a; (void)f;\n    switch (sym) {\n" + "\n".join(cases)
            + "\n    default: return 3;\n    }\n}\n")


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
    mismatches: int = 0              # buffers differing from the host's
    reference_mismatches: int = 0    # buffers differing from the reference's
    has_reference: bool = True

    @property
    def passed(self) -> bool:
        return self.calls > 0 and self.mismatches == 0 and self.reference_mismatches == 0


def verify(model_or_compiled, example_inputs, target, work_dir=None) -> list[Result]:
    """Replay one training step's kernel calls on ``target``; one ``Result`` per kernel."""
    target = get_target(target)
    compiled = compile_for(model_or_compiled, target)
    return verify_calls(lambda: training_step(compiled, example_inputs), target, work_dir)


def verify_calls(run, target, work_dir=None) -> list[Result]:
    """Replay on ``target`` the kernel calls ``run()`` makes (kernels requested for ``target``)."""
    target = get_target(target)
    gcc, runner_cmd = linker(target), runner(target)
    if gcc is None or runner_cmd is None:
        raise RuntimeError(f"cannot build or run {target.name} code here: install {PACKAGES}")
    uses, capture = capture_calls(run, target)
    work = Path(work_dir or tempfile.mkdtemp(prefix=f"fqt-verify-{target.name}-"))
    write_kernels(uses, target, work)
    (work / "harness.c").write_text(resources.files(__package__).joinpath("harness.c").read_text())
    (work / "harness_cases.h").write_text(harness_cases(uses))
    subprocess.run([gcc, "-static", "-O1", "-o", str(work / "harness"), str(work / "harness.c"),
                    str(work / "fqt_kernels.o")], check=True, capture_output=True, text=True)
    lines = [str(len(capture.storages))] + [str(n) for _, n, _ in capture.storages]
    for i, (_, _, initial) in enumerate(capture.storages):
        (work / f"buf_{i}.bin").write_bytes(initial)
    for index, encoded, _ in capture.calls:
        lines.append(f"{index} {len(encoded)} " + " ".join(" ".join(map(str, e)) for e in encoded))
    (work / "script.txt").write_text("\n".join(lines) + "\n")
    proc = subprocess.run(runner_cmd + ["./harness"], cwd=work, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"harness failed on {target.name} ({' '.join(runner_cmd) or 'native'}): "
                           f"{proc.returncode} {proc.stderr[-2000:]}")
    results = [Result(u.symbol, u.spec.family) for u in uses]
    state = {i: initial for i, (_, _, initial) in enumerate(capture.storages)}   # as the target has them
    for c, (index, encoded, host_after) in enumerate(capture.calls):
        r = results[index]
        r.calls += 1
        after = {b: (work / f"out_{c}_{b}.bin").read_bytes() for b in host_after}
        spec = uses[index].spec
        args = dict(zip(spec.abi.names, map(call_argument, encoded)))
        # A kernel's scratch is its own business: the host build's layout may differ.
        scratch = {args[name][0] for name in oracle.SCRATCH.get(spec.family, ()) if args.get(name) is not None}
        for b, host_bytes in host_after.items():
            r.buffers += 1
            r.mismatches += b not in scratch and after[b] != host_bytes
        wrong = oracle.check_call(spec, args, {b: state[b] for b in after}, after)
        if wrong is None:
            r.has_reference = False
        else:
            r.reference_mismatches += wrong
        state.update(after)
    return results


class OddShapes(nn.Module):
    """Binarized layers at the shapes tails hide in, between a float first conv and a float
    last linear (the default plan keeps those float). On a 13x17 input: padding 2 with
    dilation 2 (K = 72, 221 output rows: three 64-row tiles and a tail), stride 2 with
    padding 1 (K = 45, a 7x9 map), 1x1 convs with N = 1 and K = 1, linears with K = 63, 64
    and 65 and one with N = 1; at batch 1 the linears have M = 1 and their weight-gradient
    GEMMs contract over K = 1."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
            nn.Conv2d(8, 5, 3, padding=2, dilation=2), nn.ReLU(),
            nn.Conv2d(5, 7, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(7, 1, 1), nn.ReLU(),
            nn.Conv2d(1, 63, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(63, 64), nn.ReLU(), nn.Linear(64, 65), nn.ReLU(),
                                  nn.Linear(65, 1), nn.Linear(1, 10))

    def forward(self, x):
        return self.head(self.features(x))


def odd_shapes(target):
    """A callable running kernels for ``target`` at odd shapes: binary GEMMs (int32 and float
    epilogues) with K in 1, 63, 64, 65 and M or N = 1, then training steps of ``OddShapes``
    at batch 3 (``aq_scq``, and ``aq_opt`` for the statistics kernel's sums of squares) and
    batch 1 (``psq``, which prunes no group, so every GEMM runs)."""
    target = get_target(target)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        steps = [(compile(OddShapes(), Config(method=method, target=target.name)),
                  (torch.randn(batch, 3, 13, 17),))
                 for method, batch in (("aq_scq", 3), ("aq_opt", 3), ("psq", 1))]

    def run():
        for k in (1, 63, 64, 65):
            for m, n in ((1, 5), (3, 1), (4, 7)):
                a = pack_signs(torch.randn(m, k), target=target)
                b = pack_signs(torch.randn(k, n).T, target=target)
                binary_gemm(a, b, target=target)
                binary_gemm(a, b, scale=torch.rand(n), bias=torch.randn(n), target=target)
        for compiled, inputs in steps:
            training_step(compiled, inputs)
    return run


def call_argument(encoded):
    """A captured argument as ``oracle.check_call`` takes it."""
    kind, *value = encoded
    if kind == "b":
        return tuple(value)
    if kind == "n":
        return None
    return float.fromhex(value[0]) if kind == "f" else value[0]


def table(results: list[Result], target: Target, title: str = "") -> str:
    lines = [f"verify {target.name} ({target.cpu}){': ' + title if title else ''}: every buffer after every "
             f"call vs the host and vs the reference, bit for bit (fused regions vs the reference: "
             f"to float32 rounding)",
             f"{'kernel':44s} {'family':14s} {'calls':>5s} {'buffers':>7s} {'host':>5s}  reference"]
    for r in results:
        agree = "close" if r.family in oracle.CLOSE_CHECKS else "exact"
        ref = ((agree if not r.reference_mismatches else f"FAIL ({r.reference_mismatches})")
               if r.has_reference else "none (no reference for this family)")
        lines.append(f"{r.symbol:44s} {r.family:14s} {r.calls:5d} {r.buffers:7d} "
                     f"{'exact' if not r.mismatches else 'FAIL':>5s}  {ref}")
    ok = all(r.passed for r in results)
    lines.append(f"{'PASS' if ok else 'FAIL'}: {sum(r.passed for r in results)}/{len(results)} kernels")
    return "\n".join(lines)
