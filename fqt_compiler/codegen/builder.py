"""The one llvmlite.ir vocabulary every kernel generator builds with.

Types, constants, vectors, intrinsics, masked memory operations and a ``Kernel`` (one
``void`` function of a ``KernelABI`` with named arguments, mutable variables and loops).
Loop counters and loop-carried state live in allocas of the entry block: LLVM's -O3
pipeline (SROA/mem2reg) turns them into SSA registers, so the generators read like
straight-line loops without hand-written phi nodes. Intrinsics with vector types are
declared as plain functions because ``Module.declare_intrinsic`` rejects vector types.
Masked loads, stores, gathers and scatters use LLVM's current signature (no alignment
operand; the alignment is an ``align`` attribute of the pointer argument), so no call
depends on LLVM's auto-upgrader.
"""
from __future__ import annotations

from contextlib import contextmanager

from llvmlite import ir

from ..ops import rng
from .abi import KernelABI, KernelIR
from .targets import Target

I1, I8, I32, I64, F32, F64 = (ir.IntType(1), ir.IntType(8), ir.IntType(32), ir.IntType(64), ir.FloatType(),
                             ir.DoubleType())
PTR = ir.PointerType()
VOID = ir.VoidType()


def new_module(target: Target, name: str = "") -> ir.Module:
    """An empty module for ``target``'s triple."""
    m = ir.Module(name=name)
    m.triple = target.triple
    return m


def i64(v: int) -> ir.Constant:
    """An i64 constant; values in [2^63, 2^64) are taken as their two's complement."""
    return ir.Constant(I64, v - (1 << 64) if v >= 1 << 63 else v)


def vec(n: int, elem=I64) -> ir.VectorType:
    return ir.VectorType(elem, n)


def const_vec(n: int, values, elem=I64) -> ir.Constant:
    values = list(values) if hasattr(values, "__iter__") else [values] * n
    return ir.Constant(vec(n, elem), values)


def const_splat(ty: ir.VectorType, value) -> ir.Constant:
    """A constant of vector type ``ty`` with every lane ``value``."""
    return const_vec(ty.count, value, ty.element)


def intrinsic(module: ir.Module, name: str, ret, *args) -> ir.Function:
    fn = module.globals.get(name)
    if fn is None:
        fn = ir.Function(module, ir.FunctionType(ret, list(args)), name)
    return fn


def call(b: ir.IRBuilder, name: str, ret, args: list[ir.Value], *, fastmath=()) -> ir.Value:
    """Call intrinsic ``name`` (declared on first use) with ``args`` and fast-math flags."""
    return b.call(intrinsic(b.module, name, ret, *[a.type for a in args]), args, fastmath=fastmath)


def splat(b: ir.IRBuilder, value: ir.Value, n: int) -> ir.Value:
    """``<n x T>`` with every lane ``value``."""
    one = b.insert_element(ir.Constant(vec(n, value.type), ir.Undefined), value, ir.Constant(I32, 0))
    return b.shuffle_vector(one, ir.Constant(vec(n, value.type), ir.Undefined),
                            ir.Constant(vec(n, I32), [0] * n))


def gep(b: ir.IRBuilder, base, index, elem=F32, *, inbounds: bool = False) -> ir.Value:
    """``&base[index]`` for elements of type ``elem``."""
    return b.gep(base, [index], inbounds=inbounds, source_etype=elem)


def smin(b: ir.IRBuilder, x, y):
    return b.select(b.icmp_signed("<", x, y), x, y)


def mix64(b: ir.IRBuilder, z: ir.Value) -> ir.Value:
    """``rng.mix64_int`` (the SplitMix64 finalizer) of each lane of ``<n x i64>`` ``z``."""
    n = z.type.count
    z = b.xor(z, b.lshr(z, const_vec(n, 30)))
    z = b.mul(z, const_vec(n, i64(rng.MUL1).constant))
    z = b.xor(z, b.lshr(z, const_vec(n, 27)))
    z = b.mul(z, const_vec(n, i64(rng.MUL2).constant))
    return b.xor(z, b.lshr(z, const_vec(n, 31)))


class Kernel:
    """One ``void symbol(params)`` kernel function: named arguments, entry-block variables,
    loops. ``params`` is ``[(name, kind), ...]`` (kinds of ``abi.KINDS``): the kernel's ABI,
    written once, here.

    ``k.arg["x"]`` is an argument; ``k.b`` the builder positioned in the body; ``finish()``
    closes the function and returns the module as ``KernelIR``."""

    def __init__(self, module: ir.Module, symbol: str, params):
        self.module = module
        self.abi = abi = KernelABI.of(symbol, params)
        self.fn = ir.Function(module, abi.function_type, abi.symbol)
        self.arg = {}
        for n, a in zip(abi.names, self.fn.args):
            a.name = n
            self.arg[n] = a
        for a in self.fn.args:
            if isinstance(a.type, ir.PointerType):
                a.add_attribute("noalias")
        self._entry = self.fn.append_basic_block("entry")
        self.b = ir.IRBuilder(self.fn.append_basic_block("body"))

    def var(self, ty: ir.Type, init=None, name: str = "") -> ir.Value:
        """A mutable variable (an entry-block alloca), initialized at the current position."""
        with self.b.goto_block(self._entry):
            slot = self.b.alloca(ty, name=name)
        if init is not None:
            self.b.store(init if isinstance(init, ir.Value) else ir.Constant(ty, init), slot)
        return slot

    def get(self, slot: ir.Value, ty: ir.Type = I64) -> ir.Value:
        return self.b.load(slot, typ=ty)

    def set(self, slot: ir.Value, value) -> None:
        self.b.store(value, slot)

    @contextmanager
    def loop(self, start, stop, step=1):
        """``for i in range(start, stop, step)`` (signed i64, step > 0); yields ``i``."""
        b = self.b
        start, stop, step = (v if isinstance(v, ir.Value) else ir.Constant(I64, v) for v in (start, stop, step))
        slot = self.var(I64, start)
        head = self.fn.append_basic_block("loop")
        body = self.fn.append_basic_block("loop.body")
        done = self.fn.append_basic_block("loop.end")
        b.branch(head)
        b.position_at_end(head)
        i = b.load(slot, typ=I64)
        b.cbranch(b.icmp_signed("<", i, stop), body, done)
        b.position_at_end(body)
        yield i
        b.store(b.add(i, step), slot)
        b.branch(head)
        b.position_at_end(done)

    def gep(self, base, index, elem=F32) -> ir.Value:
        return gep(self.b, base, index, elem)

    def vgep(self, base: ir.Value, index: ir.Value, elem_bytes: int) -> ir.Value:
        """A vector of pointers ``base + index * elem_bytes`` (llvmlite's ``gep`` cannot
        produce vector-of-pointer types, so this goes through integers)."""
        b, n = self.b, index.type.count
        addr = b.ptrtoint(base, I64) if not isinstance(base.type, ir.VectorType) else None
        start = self.splat(addr, n) if addr is not None else b.ptrtoint(base, vec(n))
        return b.inttoptr(b.add(start, b.mul(index, const_vec(n, elem_bytes))), vec(n, PTR))

    def splat(self, value: ir.Value, n: int) -> ir.Value:
        return splat(self.b, value, n)

    def call(self, name: str, ret, args: list[ir.Value], *, fastmath=()) -> ir.Value:
        return call(self.b, name, ret, args, fastmath=fastmath)

    def finish(self) -> KernelIR:
        self.b.ret_void()
        with self.b.goto_block(self._entry):
            self.b.branch(self.fn.basic_blocks[1])
        return KernelIR(self.abi, str(self.module))


def vsuffix(t: ir.Type) -> str:
    """LLVM's overload suffix of a type: ``v64f32``, ``i64``, ``v8p0``."""
    if isinstance(t, ir.VectorType):
        return f"v{t.count}{vsuffix(t.element)}"
    if isinstance(t, ir.PointerType):
        return "p0"
    if isinstance(t, ir.FloatType):
        return "f32"
    return f"i{t.width}"


def _aligned(instr, index: int, align: int | None, elem: ir.Type):
    """Mark pointer argument ``index`` of a masked memory intrinsic call as ``align``-aligned
    (default: the element size, what every tensor's data pointer guarantees)."""
    attrs = ir.values.ArgumentAttributes()
    attrs.align = align or (4 if isinstance(elem, ir.FloatType) else elem.width // 8)
    instr.arg_attributes[index] = attrs
    return instr


def masked_load(b: ir.IRBuilder, ptr: ir.Value, mask: ir.Value, passthru: ir.Value, *,
                align: int | None = None) -> ir.Value:
    """The lanes of ``mask`` of a contiguous vector at ``ptr``, ``passthru`` elsewhere."""
    t = passthru.type
    return _aligned(call(b, f"llvm.masked.load.{vsuffix(t)}.p0", t, [ptr, mask, passthru]), 0, align, t.element)


def masked_gather(b: ir.IRBuilder, ptrs: ir.Value, mask: ir.Value, passthru: ir.Value, *,
                  align: int | None = None) -> ir.Value:
    """The lanes of ``mask`` loaded through a vector of pointers, ``passthru`` elsewhere."""
    t = passthru.type
    name = f"llvm.masked.gather.{vsuffix(t)}.{vsuffix(ptrs.type)}"
    return _aligned(call(b, name, t, [ptrs, mask, passthru]), 0, align, t.element)


def masked_store(b: ir.IRBuilder, value: ir.Value, ptr: ir.Value, mask: ir.Value, *,
                 align: int | None = None) -> None:
    t = value.type
    _aligned(call(b, f"llvm.masked.store.{vsuffix(t)}.p0", VOID, [value, ptr, mask]), 1, align, t.element)


def masked_scatter(b: ir.IRBuilder, value: ir.Value, ptrs: ir.Value, mask: ir.Value, *,
                   align: int | None = None) -> None:
    t = value.type
    name = f"llvm.masked.scatter.{vsuffix(t)}.{vsuffix(ptrs.type)}"
    _aligned(call(b, name, VOID, [value, ptrs, mask]), 1, align, t.element)


def low_mask(k: Kernel, nbits: ir.Value) -> ir.Value:
    """``(1 << nbits) - 1`` for ``nbits`` in 0..64 (a 64-bit shift is poison in LLVM)."""
    b = k.b
    full = b.icmp_unsigned(">=", nbits, ir.Constant(I64, 64))
    part = b.sub(b.shl(ir.Constant(I64, 1), b.and_(nbits, ir.Constant(I64, 63))), ir.Constant(I64, 1))
    return b.select(full, ir.Constant(I64, -1), part)


def transpose64(k: Kernel, words: ir.Value) -> ir.Value:
    """Transpose a 64x64 bit matrix held as ``<64 x i64>`` (bit ``c`` of lane ``r`` -> bit ``r``
    of lane ``c``): six stages that swap the off-diagonal ``j x j`` blocks of each ``2j x 2j``
    block, lanes paired by a shuffle; about 0.1 vector operation per bit."""
    b, n = k.b, 64
    for j in (32, 16, 8, 4, 2, 1):
        keep = sum(1 << c for c in range(64) if not c & j)
        low = const_vec(n, [not r & j for r in range(n)], I1)
        partner = b.shuffle_vector(words, words, const_vec(n, [r ^ j for r in range(n)], I32))
        lo_row, hi_row = b.select(low, words, partner), b.select(low, partner, words)
        keep_vec = const_vec(n, keep - (1 << 64) if keep >= 1 << 63 else keep)
        t = b.and_(b.xor(b.lshr(lo_row, const_vec(n, j)), hi_row), keep_vec)
        words = b.xor(words, b.select(low, b.shl(t, const_vec(n, j)), t))
    return words


class BitStream:
    """Appends variable-length bit fields to a row of 64-bit words (``lanes`` rows at once).

    State: ``lanes`` accumulators, the number of bits in them and the next word index.
    ``store(acc, word_index)`` is called by the owner whenever a word is complete."""

    def __init__(self, k: Kernel, lanes: int, store):
        self.k, self.lanes, self.store = k, lanes, store
        self.ty = I64 if lanes == 1 else vec(lanes)
        self.acc = k.var(self.ty, ir.Constant(self.ty, 0 if lanes == 1 else [0] * lanes))
        self.nbits = k.var(I64, 0)
        self.word = k.var(I64, 0)

    def _bcast(self, v):
        return v if self.lanes == 1 else self.k.splat(v, self.lanes)

    def append(self, field: ir.Value, length) -> None:
        """Append ``length`` (1..64) bits; ``field`` must be zero above them."""
        k, b = self.k, self.k.b
        length = length if isinstance(length, ir.Value) else ir.Constant(I64, length)
        nb = k.get(self.nbits)
        acc = b.or_(k.get(self.acc, self.ty), b.shl(field, self._bcast(nb)))
        total = b.add(nb, length)
        with b.if_else(b.icmp_unsigned(">=", total, ir.Constant(I64, 64))) as (full, partial):
            with full:
                word = k.get(self.word)
                self.store(acc, word)
                k.set(self.word, b.add(word, ir.Constant(I64, 1)))
                left = b.sub(total, ir.Constant(I64, 64))
                # Bits of ``field`` that did not fit: field >> (length - left); none when left = 0.
                shift = b.and_(b.sub(length, left), ir.Constant(I64, 63))
                rest = b.lshr(field, self._bcast(shift))
                zero = ir.Constant(self.ty, 0 if self.lanes == 1 else [0] * self.lanes)
                k.set(self.acc, b.select(b.icmp_unsigned("==", left, ir.Constant(I64, 0)), zero, rest))
                k.set(self.nbits, left)
            with partial:
                k.set(self.acc, acc)
                k.set(self.nbits, total)

    def skip(self, length: ir.Value) -> None:
        """Append ``length`` zero bits (any length)."""
        k, b = self.k, self.k.b
        total = b.add(k.get(self.nbits), length)
        with k.loop(0, b.lshr(total, ir.Constant(I64, 6))):
            word = k.get(self.word)
            self.store(k.get(self.acc, self.ty), word)
            k.set(self.word, b.add(word, ir.Constant(I64, 1)))
            k.set(self.acc, ir.Constant(self.ty, 0 if self.lanes == 1 else [0] * self.lanes))
        k.set(self.nbits, b.and_(total, ir.Constant(I64, 63)))

    def finish(self, ld: ir.Value) -> None:
        """Store the partial word and zero every word up to ``ld``."""
        k, b = self.k, self.k.b
        with b.if_then(b.icmp_unsigned(">", k.get(self.nbits), ir.Constant(I64, 0))):
            word = k.get(self.word)
            self.store(k.get(self.acc, self.ty), word)
            k.set(self.word, b.add(word, ir.Constant(I64, 1)))
        zero = ir.Constant(self.ty, 0 if self.lanes == 1 else [0] * self.lanes)
        with k.loop(k.get(self.word), ld) as w:
            self.store(zero, w)


# --------------------------------------------------------------------------- float math
# exp, erf and tanh of float32 lanes from arithmetic, floor, fabs and copysign only: LLVM has
# no erf intrinsic, and llvm.exp/llvm.tanh become libm calls that the JIT or a cross-target
# link may not resolve (and that do not vectorize).

def fconst(ty: ir.Type, value) -> ir.Constant:
    """A constant of scalar or vector type ``ty`` (every lane ``value``)."""
    return const_splat(ty, value) if isinstance(ty, ir.VectorType) else ir.Constant(ty, value)


def _clamp(b: ir.IRBuilder, x, lo: float, hi: float):
    x = b.select(b.fcmp_ordered("<", x, fconst(x.type, lo)), fconst(x.type, lo), x)
    return b.select(b.fcmp_ordered(">", x, fconst(x.type, hi)), fconst(x.type, hi), x)


def _poly(b: ir.IRBuilder, x, coefficients):
    """``c[0] x^(n-1) + ... + c[n-1]`` by Horner's rule, each step one fused multiply-add (as
    ATen's vectorized ``erf`` evaluates its polynomial: half the instructions and latency of
    a separately rounded multiply and add)."""
    fma = f"llvm.fma.{vsuffix(x.type)}"
    acc = fconst(x.type, coefficients[0])
    for c in coefficients[1:]:
        acc = call(b, fma, x.type, [acc, x, fconst(x.type, c)])
    return acc


def exp(b: ir.IRBuilder, x):
    """``e^x`` (Cephes ``expf``: ``x = n ln2 + r`` with ln2 split in two, a degree-7
    polynomial in ``r``, ``2^n`` built in the exponent bits; relative error about 2e-7).
    Below -87 it returns 0 (the true value is below 1.6e-38); from about 88.38 up it returns
    +inf (``n`` reaches 128, whose ``2^n`` is the infinity encoding; ``expf`` overflows from
    88.72), so callers such as SiLU's ``x / (1 + e^-x)`` get ``-0`` for very negative inputs."""
    ty = x.type
    ity = vec(ty.count, I32) if isinstance(ty, ir.VectorType) else I32
    underflow = b.fcmp_ordered("<", x, fconst(ty, -87.0))
    x = _clamp(b, x, -87.0, 88.7)
    n = call(b, f"llvm.floor.{vsuffix(ty)}", ty, [b.fadd(b.fmul(x, fconst(ty, 1.44269504088896341)),
                                                        fconst(ty, 0.5))])
    r = b.fsub(b.fsub(x, b.fmul(n, fconst(ty, 0.693359375))), b.fmul(n, fconst(ty, -2.12194440e-4)))
    p = _poly(b, r, (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2,
                     1.6666665459e-1, 5.0000001201e-1))
    y = b.fadd(b.fadd(b.fmul(p, b.fmul(r, r)), r), fconst(ty, 1.0))
    scale = b.shl(b.add(b.fptosi(n, ity), fconst(ity, 127)), fconst(ity, 23))
    return b.select(underflow, fconst(ty, 0.0), b.fmul(y, b.bitcast(scale, ty)))


def erf(b: ir.IRBuilder, x, exp_neg_square=None):
    """``erf(x)`` by Abramowitz & Stegun 7.1.26 (``1 - t P(t) e^{-x^2}``, ``t = 1/(1 + p|x|)``;
    absolute error at most 1.5e-7, plus float32 rounding), the formula ATen's vectorized
    ``erf`` uses too. ``exp_neg_square``: ``e^{-x^2}`` when the caller has it (GELU's
    derivative needs it for its density term too)."""
    ty = x.type
    a = call(b, f"llvm.fabs.{vsuffix(ty)}", ty, [x])
    t = b.fdiv(fconst(ty, 1.0), b.fadd(b.fmul(a, fconst(ty, 0.3275911)), fconst(ty, 1.0)))
    p = b.fmul(_poly(b, t, (1.061405429, -1.453152027, 1.421413741, -0.284496736, 0.254829592)), t)
    if exp_neg_square is None:
        exp_neg_square = exp(b, b.fneg(b.fmul(a, a)))
    y = b.fsub(fconst(ty, 1.0), b.fmul(p, exp_neg_square))
    return call(b, f"llvm.copysign.{vsuffix(ty)}", ty, [y, x])


def tanh(b: ir.IRBuilder, x):
    """``tanh(x) = 1 - 2 / (e^{2x} + 1)``, ``x`` clamped to [-10, 10] (beyond 9.01 tanh rounds
    to +-1 in float32, and so does this formula); absolute error a few float32 ulps of 1."""
    ty = x.type
    e = exp(b, b.fmul(_clamp(b, x, -10.0, 10.0), fconst(ty, 2.0)))
    return b.fsub(fconst(ty, 1.0), b.fdiv(fconst(ty, 2.0), b.fadd(e, fconst(ty, 1.0))))
