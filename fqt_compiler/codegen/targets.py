"""Target presets: the CPUs kernels are generated for (docs/math.md §6; the names are API).

A ``Target`` is a triple, a CPU name and an LLVM feature string, plus the few facts the
kernel generators branch on (vector width, native vector popcount, dot-product
instructions). ``host`` takes the host's feature list, not only its CPU name, because
the name reported inside a VM can be wrong.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import llvmlite.binding as llvm


@lru_cache(maxsize=None)
def _init_llvm() -> None:
    # llvmlite >= 0.45 initializes LLVM itself; only targets and printers are ours to load.
    llvm.initialize_all_targets()
    llvm.initialize_all_asmprinters()
    llvm.initialize_native_asmparser()


@dataclass(frozen=True)
class Target:
    """One code generation target. Build with ``Target("rpi4")`` style presets via ``get_target``."""

    name: str
    triple: str
    cpu: str
    features: str = ""
    vector_bits: int = 128                         # widest integer vector register
    description: str = ""
    feature_set: frozenset = field(default=frozenset(), compare=False, repr=False)

    @property
    def arch(self) -> str:
        return self.triple.split("-")[0]

    @property
    def is_x86(self) -> bool:
        return self.arch == "x86_64"

    @property
    def is_aarch64(self) -> bool:
        return self.arch == "aarch64"

    def has(self, feature: str) -> bool:
        """Whether the target enables an LLVM feature such as ``avx512vpopcntdq`` or ``dotprod``."""
        return feature in self.feature_set

    @property
    def native_vector_popcount(self) -> bool:
        """Whether ``llvm.ctpop`` on 64-bit lanes is one instruction (AVX-512 VPOPCNTDQ)."""
        return self.has("avx512vpopcntdq")

    @property
    def key(self) -> str:
        """What identifies generated code for this target in cache keys."""
        return f"{self.triple}|{self.cpu}|{self.features}"

    def create_target_machine(self, *, jit: bool = False) -> llvm.TargetMachine:
        """A new TargetMachine. An ExecutionEngine takes ownership of the one it is given,
        so every engine gets a fresh one.

        ``jit=True`` is for code loaded into this process: the large code model with static
        relocation, so every reference to a constant pool or another section is a 64-bit
        absolute address. With the small model they are 32-bit PC-relative, and once the
        process has mapped enough memory (torch does) the JIT's memory manager can place a
        module's code and data more than 2 GiB apart: RuntimeDyld then aborts the process
        on the relocation overflow instead of raising."""
        _init_llvm()
        t = llvm.Target.from_triple(self.triple)
        return t.create_target_machine(cpu=self.cpu, features=self.features, opt=3,
                                       reloc="static" if jit else "pic",
                                       codemodel="large" if jit else "small")


def _make(name, triple, cpu, features, description) -> Target:
    flags = {f[1:] for f in features.split(",") if f.startswith("+")}
    if "avx512f" in flags or "avx512bw" in flags:
        bits = 512
    elif "avx2" in flags:
        bits = 256
    else:
        bits = 128
    return Target(name, triple, cpu, features, bits, description, frozenset(flags))


_X86_V3 = "+avx,+avx2,+bmi,+bmi2,+f16c,+fma,+lzcnt,+movbe,+popcnt,+sse4.2,+xsave"
_AVX512 = _X86_V3 + ",+avx512f,+avx512bw,+avx512dq,+avx512vl,+avx512cd,+avx512vpopcntdq,+avx512bitalg"

# Feature strings are spelled out (not taken from the CPU name alone) so that an object
# built for "hygon" can never contain an AVX-512 instruction, whatever LLVM's cpu table says.
_PRESETS = {
    "x86-64-v3": ("x86_64-unknown-linux-gnu", "x86-64-v3", _X86_V3,
                  "generic x86-64 with AVX2 (Haswell and newer)"),
    "hygon": ("x86_64-unknown-linux-gnu", "znver1", _X86_V3 + ",-avx512f",
              "Hygon Dhyana (Zen 1 core): AVX2, no AVX-512"),
    "x86-avx512": ("x86_64-unknown-linux-gnu", "icelake-server", _AVX512,
                   "x86-64 with AVX-512 and VPOPCNTDQ (Ice Lake, Zen 4 and newer)"),
    "rpi4": ("aarch64-unknown-linux-gnu", "cortex-a72", "+neon",
             "Raspberry Pi 4: Cortex-A72, ARMv8.0 NEON, no dotprod"),
    "rpi5": ("aarch64-unknown-linux-gnu", "cortex-a76", "+neon,+dotprod",
             "Raspberry Pi 5: Cortex-A76, ARMv8.2 NEON with dotprod"),
    "aarch64": ("aarch64-unknown-linux-gnu", "generic", "+neon",
                "generic ARMv8.0-A with NEON"),
}

PRESET_NAMES = ("host",) + tuple(_PRESETS)


@lru_cache(maxsize=None)
def host_target() -> Target:
    _init_llvm()
    triple = llvm.get_process_triple()
    return _make("host", triple, llvm.get_host_cpu_name(), llvm.get_host_cpu_features().flatten(),
                 "this machine (CPU name and feature list read from the host)")


def get_target(name: str | Target) -> Target:
    """A preset by name (``host``, ``x86-64-v3``, ``hygon``, ``x86-avx512``, ``rpi4``, ``rpi5``, ``aarch64``)."""
    if isinstance(name, Target):
        return name
    if name == "host":
        return host_target()
    if name not in _PRESETS:
        raise ValueError(f"unknown target {name!r}; expected one of {', '.join(PRESET_NAMES)}")
    return _make(name, *_PRESETS[name])


def runs_on_host(target: Target) -> bool:
    """Whether code for ``target`` can execute on this machine (same arch, features a subset)."""
    host = host_target()
    return target.arch == host.arch and target.feature_set <= host.feature_set
