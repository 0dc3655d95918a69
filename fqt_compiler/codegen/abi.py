"""The kernel ABI: one object per kernel names its symbol and its typed parameters, once.

Every generator builds its function from a ``KernelABI`` (``builder.Kernel``) and returns it
with the IR as a ``KernelIR``; everything else is derived from that object: the LLVM function
type, the ctypes argument types the runtime calls the kernel with, the C prototype of the
ahead-of-time header and manifest, and the parameter names the kernel oracle reads a call's
arguments by. Numba's ``CodeLibrary`` is the model: one object per compiled kernel.

Parameter kinds are the few a kernel signature holds: ``ptr`` (a tensor's data pointer, or
null), ``i64`` (sizes, strides, indices), ``u64`` (a random-stream key: LLVM integers carry no
sign, so the ABI says which ones the caller passes unsigned) and ``f32`` (a float constant).
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

from llvmlite import ir

# kind -> (LLVM type, ctypes type, C type)
KINDS = {
    "ptr": (ir.PointerType(), ctypes.c_void_p, "void *"),
    "i64": (ir.IntType(64), ctypes.c_int64, "int64_t"),
    "u64": (ir.IntType(64), ctypes.c_uint64, "uint64_t"),
    "f32": (ir.FloatType(), ctypes.c_float, "float"),
}


@dataclass(frozen=True)
class Param:
    name: str
    kind: str

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"parameter {self.name!r}: kind {self.kind!r} is not one of {', '.join(KINDS)}")

    @property
    def ir_type(self) -> ir.Type:
        return KINDS[self.kind][0]

    @property
    def ctype(self):
        return KINDS[self.kind][1]

    @property
    def c_type(self) -> str:
        return KINDS[self.kind][2]


@dataclass(frozen=True)
class KernelABI:
    """``void symbol(params)``: the contract between a generator and its callers."""

    symbol: str
    params: tuple[Param, ...]

    @classmethod
    def of(cls, symbol: str, params) -> "KernelABI":
        """From ``[(name, kind), ...]``."""
        return cls(symbol, tuple(Param(n, k) for n, k in params))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    @property
    def argtypes(self) -> tuple:
        """ctypes argument types, as the runtime calls the kernel."""
        return tuple(p.ctype for p in self.params)

    @property
    def function_type(self) -> ir.FunctionType:
        return ir.FunctionType(ir.VoidType(), [p.ir_type for p in self.params])

    def c_prototype(self, symbol: str | None = None) -> str:
        """The C declaration, optionally under another exported name."""
        params = ", ".join(f"{p.c_type}{'' if p.c_type.endswith('*') else ' '}{p.name}" for p in self.params)
        return f"void {symbol or self.symbol}({params});"


@dataclass(frozen=True)
class KernelIR:
    """What a generator returns: one kernel's ABI and the LLVM IR module defining it."""

    abi: KernelABI
    text: str

    @property
    def symbol(self) -> str:
        return self.abi.symbol
