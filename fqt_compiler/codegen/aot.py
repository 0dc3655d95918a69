"""Ahead-of-time kernels for another CPU: exactly the kernels one training step requests.

``record_kernels`` runs one compiled training step on this machine with the model compiled
for the *target* (``Config(target=...)``), so every runtime wrapper picks the target's tile,
vector width and blocking; the ``jit.kernel`` hook records each request (family, params,
layer, the integer arguments of its first call per layer) and, when the target cannot run
here, runs the same family and parameters compiled for the host in its place.
``emit_kernels`` regenerates each recorded kernel's IR for the target and writes one object
and one assembly file, a C header, a JSON manifest and, where a linker for the target is
installed, a shared library.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import llvmlite.binding as llvm
import torch

from ..runtime import jit
from ..runtime import kernel_stats as stats
from .targets import Target, get_target, host_target, runs_on_host

# gcc that links shared libraries / static executables for a target architecture.
LINKERS = {"aarch64": "aarch64-linux-gnu-gcc", "x86_64": "gcc"}


@dataclass
class KernelUse:
    """One kernel a step requested: its spec for the target and where it was used."""

    spec: jit.KernelSpec
    layers: list = field(default_factory=list)
    calls: dict = field(default_factory=dict)       # layer -> {parameter name: int} of the first call

    @property
    def symbol(self) -> str:
        """Unique exported name: specializations of one family share the generator's symbol."""
        return f"{self.spec.symbol}_{hashlib.sha256(self.spec.ir_text.encode()).hexdigest()[:10]}"


def stand_in(spec: jit.KernelSpec, load):
    """The callable for ``spec``: itself where it runs here, else the host build of the same
    family and parameters (the computation a kernel performs does not depend on its target)."""
    return load(spec if runs_on_host(spec.target) else spec.for_target(host_target()))


def compile_for(model_or_compiled, target: Target):
    """An ``FQTModule`` of the model whose kernels are requested for ``target``."""
    import fqt_compiler as fqt
    if isinstance(model_or_compiled, fqt.FQTModule):
        config = dataclasses.replace(model_or_compiled.fqt_config, target=target.name)
        return fqt.compile(model_or_compiled.module, config)
    return fqt.compile(model_or_compiled, fqt.Config(target=target.name))


def training_step(compiled, example_inputs) -> None:
    compiled.train()
    out = compiled(*example_inputs)
    out.float().sum().backward()


def record_kernels(model_or_compiled, example_inputs, target) -> list[KernelUse]:
    """Every kernel one training step of the model on ``example_inputs`` requests for ``target``."""
    target = get_target(target)
    compiled = compile_for(model_or_compiled, target)
    uses: dict[jit.KernelSpec, KernelUse] = {}

    def hook(spec, load):
        fn = stand_in(spec, load)
        layer = stats.current_layer.get() or "?"
        use = uses.setdefault(spec, KernelUse(spec))
        if layer not in use.layers:
            use.layers.append(layer)
        if layer in use.calls:
            return fn
        def first_call(*args):
            use.calls.setdefault(layer, {p.name: a for p, a in zip(spec.abi.params, args)
                                         if p.kind in ("i64", "f32")})
            return fn(*args)
        return first_call

    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    with jit.kernel_hook(hook), torch.random.fork_rng():
        training_step(compiled, example_inputs)
    return list(uses.values())


def c_prototype(use: KernelUse) -> str:
    """The C declaration of a kernel under its unique exported symbol."""
    return use.spec.abi.c_prototype(use.symbol)


def combined_module(uses: list[KernelUse], target: Target) -> str:
    """One IR module with every kernel renamed to its unique symbol; helpers and tables get
    internal linkage so modules of different specializations link without clashes."""
    main = llvm.parse_assembly("")
    main.triple = target.triple
    for use in uses:
        mod = llvm.parse_assembly(use.spec.for_target(target).ir_text)
        for fn in mod.functions:
            if fn.is_declaration:
                continue
            if fn.name == use.spec.symbol:
                fn.name = use.symbol
            else:
                fn.linkage = llvm.Linkage.internal
        for g in mod.global_variables:
            if not g.is_declaration:
                g.linkage = llvm.Linkage.internal
        main.link_in(mod)
    return str(main)


def linker(target: Target) -> str | None:
    return shutil.which(LINKERS.get(target.arch, ""))


@dataclass
class Emitted:
    out_dir: Path
    target: Target
    uses: list
    files: dict
    linker_message: str

    def summary(self) -> str:
        lines = [f"{len(self.uses)} kernels for {self.target.name} ({self.target.triple}, "
                 f"cpu {self.target.cpu}, {self.target.features}) in {self.out_dir}"]
        lines += [f"  {kind:9s} {path}" for kind, path in self.files.items()]
        lines.append(self.linker_message)
        return "\n".join(lines)


def emit_kernels(model_or_compiled, example_inputs, target="rpi4", out_dir="build/kernels") -> Emitted:
    """Emit every kernel one training step of the model needs, built for ``target``, into
    ``out_dir``: ``fqt_kernels.o``/``.s``, ``fqt_kernels.h``, ``manifest.json`` and
    ``libfqt_kernels.so`` where the target's gcc is installed."""
    target = get_target(target)
    uses = record_kernels(model_or_compiled, example_inputs, target)
    # The spec recorded is the target's own (the step ran with Config(target=...)).
    uses = [KernelUse(u.spec.for_target(target), u.layers, u.calls) for u in uses]
    return write_kernels(uses, target, out_dir)


def write_kernels(uses: list[KernelUse], target: Target, out_dir) -> Emitted:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = combined_module(uses, target)
    files = {"object": out / "fqt_kernels.o", "assembly": out / "fqt_kernels.s",
             "header": out / "fqt_kernels.h", "manifest": out / "manifest.json"}
    optimized = jit.optimize(text, target)   # once: -O3 over every kernel is most of the time
    files["assembly"].write_text(target.create_target_machine().emit_assembly(optimized.clone()))
    files["object"].write_bytes(target.create_target_machine().emit_object(optimized))
    guard = "FQT_KERNELS_H"
    header = [f"/* fqt-compiler kernels for {target.name}: {target.triple}, cpu {target.cpu}, "
              f"features {target.features}. Generated; see manifest.json for shapes. */",
              f"#ifndef {guard}", f"#define {guard}", "#include <stdint.h>", "",
              '#ifdef __cplusplus\nextern "C" {\n#endif']
    for use in uses:
        header.append(f"/* {use.spec.family} {_params(use.spec)}; layers: {', '.join(use.layers)} */")
        header.append(c_prototype(use))
    header += ["#ifdef __cplusplus\n}\n#endif", f"#endif  /* {guard} */", ""]
    files["header"].write_text("\n".join(header))
    manifest = {"target": target.name, "triple": target.triple, "cpu": target.cpu,
                "features": target.features, "kernels": [
                    {"symbol": u.symbol, "kernel": u.spec.family, "generator_symbol": u.spec.symbol,
                     "params": _params(u.spec), "layers": u.layers, "shapes": u.calls,
                     "prototype": c_prototype(u)} for u in uses]}
    files["manifest"].write_text(json.dumps(manifest, indent=1))
    gcc = linker(target)
    if gcc is None:
        message = (f"no linker for {target.arch} found ({LINKERS.get(target.arch)}): shared library "
                   f"not built (Debian: apt-get install gcc-aarch64-linux-gnu)")
    else:
        lib = out / "libfqt_kernels.so"
        subprocess.run([gcc, "-shared", "-o", str(lib), str(files["object"])], check=True,
                       capture_output=True, text=True)
        files["library"] = lib
        message = f"linked {lib} with {gcc}"
    return Emitted(out, target, uses, files, message)


def _params(spec: jit.KernelSpec) -> str:
    return ", ".join(f"{name}={value}" for name, value in spec.options)


# --------------------------------------------------------------------------- static performance report

LLVM_MCA = next((n for n in ("llvm-mca", "llvm-mca-22", "llvm-mca-18", "llvm-mca-14") if shutil.which(n)), "llvm-mca")

# Single-precision peak, FLOPs per cycle with an FMA counted as 2 (fp32 MACs/cycle = half):
# Cortex-A72 sustains one 128-bit FMA per cycle, Cortex-A76 two, Zen 1 two 128-bit FMA pipes
# (256-bit AVX2 FMAs issue as two halves). Vendor optimization guides; an assumption, not a
# measurement.
FMA_PEAK = {"cortex-a72": (8, "1 x 128-bit FMA/cycle"), "cortex-a76": (16, "2 x 128-bit FMA/cycle"),
            "znver1": (16, "2 x 128-bit FMA pipes, 256-bit ops as two halves")}

_POPCOUNT = re.compile(r"^\s*(cnt\s+v\d+\.(16b|8b)|vpshufb\s|vpopcntq\s)")
_LABEL = re.compile(r"^(\.L\w+):")
_BRANCH = re.compile(r"^\s*(b(\.\w+)?|cbn?z|tbn?z|j\w+)\s.*?(\.L\w+)\s*$")


def _popcount_bits(line: str) -> int:
    """Bits one popcount instruction counts: NEON ``cnt`` per byte lane; AVX2's nibble lookup
    takes two ``vpshufb`` per vector (low and high nibbles), so each counts half a register."""
    if "cnt" in line:
        return 128 if ".16b" in line else 64
    width = 512 if "zmm" in line else 256 if "ymm" in line else 128
    return width // 2 if "vpshufb" in line else width


def innermost_popcount_loop(asm: str, symbol: str) -> list[str]:
    """The instructions of the smallest loop of ``symbol`` that popcounts: a label and the
    last backward branch to it, taken from the emitted assembly."""
    body = asm[asm.index(f"\n{symbol}:") + 1:]
    lines = body[:body.index(".Lfunc_end")].splitlines()
    labels, best = {}, None
    for j, line in enumerate(lines):
        if m := _LABEL.match(line):
            labels[m.group(1)] = j
        elif (m := _BRANCH.match(line)) and m.group(3) in labels:
            loop = lines[labels[m.group(3)] + 1:j + 1]
            if any(_POPCOUNT.match(x) for x in loop) and (best is None or len(loop) < len(best)):
                best = loop
    if best is None:
        raise LookupError(f"no popcount loop in {symbol}")
    return [x for x in best if x.strip() and not x.strip().startswith((".", "//", "#", ";"))
            and not _LABEL.match(x)]


def llvm_mca(instructions: list[str], target: Target) -> tuple[float, float, int]:
    """``(cycles per iteration, block reciprocal throughput, lines dropped)`` from llvm-mca.
    An older llvm-mca (LLVM 14) may reject syntax LLVM 22 prints: lines it reports as errors
    are dropped and counted."""
    lines, dropped = list(instructions), 0
    for _ in range(8):
        proc = subprocess.run([LLVM_MCA, f"-mtriple={target.triple}", f"-mcpu={target.cpu}",
                               "-iterations=100"], input="\n".join(lines) + "\n", capture_output=True, text=True)
        bad = {int(n) - 1 for n in re.findall(r"<stdin>:(\d+):\d+: error", proc.stderr)}
        if proc.returncode == 0 and not bad:
            total = int(re.search(r"Total Cycles:\s+(\d+)", proc.stdout).group(1))
            iterations = int(re.search(r"Iterations:\s+(\d+)", proc.stdout).group(1))
            block = float(re.search(r"Block RThroughput:\s+([\d.]+)", proc.stdout).group(1))
            return total / iterations, block, dropped
        if not bad:
            raise RuntimeError(f"{LLVM_MCA} failed: {proc.stderr[-1000:]}")
        lines = [x for i, x in enumerate(lines) if i not in bad]
        dropped += len(bad)
    raise RuntimeError(f"{LLVM_MCA} keeps rejecting the loop of {target.name}")


@dataclass
class McaRow:
    symbol: str
    family: str
    params: str
    instructions: int
    cycles_per_iteration: float
    block_rthroughput: float
    binary_macs_per_iteration: int
    dropped: int

    @property
    def binary_macs_per_cycle(self) -> float:
        return self.binary_macs_per_iteration / self.cycles_per_iteration


def mca_report(emitted: Emitted) -> list[McaRow]:
    """llvm-mca estimates for the inner loop of every GEMM micro-kernel of ``emitted``. A
    binary MAC is one 1-bit x ±1 product: the bit-plane GEMM counts each of a code's planes."""
    asm = emitted.files["assembly"].read_text()
    rows = []
    for use in emitted.uses:
        if use.spec.family not in ("binary", "bitplane"):
            continue
        loop = innermost_popcount_loop(asm, use.symbol)
        cycles, block, dropped = llvm_mca(loop, emitted.target)
        macs = sum(_popcount_bits(x) for x in loop if _POPCOUNT.match(x))
        rows.append(McaRow(use.symbol, use.spec.family, _params(use.spec), len(loop), cycles, block, macs, dropped))
    return rows


def format_report(rows: list[McaRow], target: Target) -> str:
    flops, why = FMA_PEAK.get(target.cpu, (None, "unknown"))
    lines = [f"llvm-mca ({LLVM_MCA}, -mcpu={target.cpu}, 100 iterations) on the innermost popcount loop of each "
             f"GEMM micro-kernel for {target.name}",
             f"fp32 peak assumed: {flops or '?'} FLOPs/cycle ({why}) = {flops / 2 if flops else '?'} fp32 MACs/cycle",
             f"{'kernel':44s} {'family':8s} {'instrs':>6s} {'cycles/iter':>11s} {'bin MACs/iter':>13s} "
             f"{'binary MACs/cycle':>17s} {'vs fp32 MAC':>11s}"]
    for r in rows:
        ratio = f"{r.binary_macs_per_cycle / (flops / 2):10.1f}x" if flops else "          ?"
        lines.append(f"{r.symbol:44s} {r.family:8s} {r.instructions:6d} {r.cycles_per_iteration:11.2f} "
                     f"{r.binary_macs_per_iteration:13d} {r.binary_macs_per_cycle:17.1f} {ratio}"
                     + (f"  ({r.dropped} lines llvm-mca rejected, dropped)" if r.dropped else ""))
    lines.append("A bit-plane GEMM with b-bit codes needs b binary MACs per code x ±1 MAC.")
    return "\n".join(lines)
