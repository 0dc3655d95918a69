"""Static performance report: llvm-mca on the inner loop of each emitted GEMM micro-kernel.

Estimates only (llvm-mca's scheduling model of the target CPU, the innermost popcount loop,
no memory effects), reported as binary MACs per cycle against the CPU's fp32 FMA peak. For a
panel kernel built for a fixed K (``PanelTile.words``), whose K steps are unrolled, that
loop is the loop over column tiles: a whole tile with its epilogue and its untaken edge
paths, so its rate is not comparable with a K loop's.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

from ..codegen.targets import Target
from .emit import Emitted

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
        rows.append(McaRow(use.symbol, use.spec.family, use.options, len(loop), cycles, block, macs, dropped))
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
