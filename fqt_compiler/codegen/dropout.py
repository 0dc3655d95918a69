"""LLVM IR for dropout with a counter-based mask (``ops/dropout.py`` defines the op).

* ``dropout_forward_ir``: ``fqt_dropout_forward(x, y, bits, n, key, keep_below, scale, b0, b1)``
  over elements ``[8*b0, min(8*b1, n))`` of contiguous float32 ``x``: draw
  ``mix64(key + (i + 1) * GOLDEN)`` of each element ``i`` (``ops.rng``), keep it when
  ``draw >> 11`` is below ``keep_below``, write ``y[i] = x[i] * (keep ? scale : 0)`` and the
  keep bit to bit ``i % 8`` of ``bits[i // 8]`` (0 past ``n``).
* ``dropout_backward_ir``: ``fqt_dropout_backward(dy, bits, dx, n, scale, b0, b1)``:
  ``dx[i] = dy[i] * (bit i ? scale : 0)``.

A thread owns whole bytes of ``bits`` (``[b0, b1)``), so no two threads write one byte, and
the draws depend on the element index only, so neither result depends on the split. Each
step covers ``max(8, lanes)`` elements, whole bytes: ``lanes`` float lanes (the target's vector
width: 8 on AVX2, 4 on NEON) at a time, their keep flags (``<lanes x i1>``) joined and
bitcast to the step's byte(s). The last partial step of a range runs with masked loads and
stores and touches only the bytes it owns. The mask draw costs two 64-bit multiplies per
element; it runs once, in the forward (the backward reads the bits).
"""
from __future__ import annotations

from llvmlite import ir

from ..ops import rng
from .abi import KernelIR
from .builder import (F32, I1, I8, I32, I64, Kernel, const_vec, gep, i64, masked_load, masked_store, mix64,
                      new_module, vec)
from .targets import Target, get_target


def lanes_of(target: Target) -> int:
    """Float lanes per vector register of ``target``."""
    return target.vector_bits // 32


def _step(lanes: int) -> int:
    """Elements per step: at least one whole byte of mask bits."""
    return max(8, lanes)


def _range(k: Kernel, step: int, body) -> None:
    """``body(e, rem)`` over the kernel's elements ``[8*b0, min(8*b1, n))``: whole steps of
    ``step`` elements with ``rem`` None, then one partial step with ``rem`` (an i64, 1 ..
    step-1) valid elements."""
    b, a = k.b, k.arg
    e0 = b.mul(a["b0"], ir.Constant(I64, 8))
    e1 = b.mul(a["b1"], ir.Constant(I64, 8))
    e1 = b.select(b.icmp_signed("<", a["n"], e1), a["n"], e1)
    span = b.sub(e1, e0)
    with b.if_then(b.icmp_signed(">", span, ir.Constant(I64, 0))):
        whole = b.add(e0, b.and_(span, ir.Constant(I64, -step)))
        with k.loop(e0, whole, step) as e:
            body(e, None)
        rem = b.sub(e1, whole)
        with b.if_then(b.icmp_signed(">", rem, ir.Constant(I64, 0))):
            body(whole, rem)


def _lane_mask(k: Kernel, n: int, rem, first: int):
    """``<n x i1>``: lane ``l`` valid when ``first + l < rem`` (None: all valid)."""
    if rem is None:
        return None
    return k.b.icmp_signed("<", const_vec(n, range(first, first + n)), k.splat(rem, n))


def _load(k: Kernel, n: int, base, at, mask):
    ptr = k.gep(base, at)
    if mask is None:
        return k.b.load(ptr, typ=vec(n, F32), align=4)
    return masked_load(k.b, ptr, mask, const_vec(n, 0.0, F32))


def _store(k: Kernel, value, base, at, mask) -> None:
    ptr = k.gep(base, at)
    if mask is None:
        k.b.store(value, ptr, align=4)
    else:
        masked_store(k.b, value, ptr, mask)


def _scaled(k: Kernel, v, keep):
    """``v * (keep ? scale : 0)`` per lane (a multiply, so NaN and Inf stay as in ATen)."""
    n = v.type.count
    factor = k.b.select(keep, k.splat(k.arg["scale"], n), const_vec(n, 0.0, F32))
    return k.b.fmul(v, factor)


def _store_bits(k: Kernel, flags, e, rem) -> None:
    """A step's ``<step x i1>`` keep flags as bytes at ``bits[e / 8]``; a partial step
    writes only the bytes holding its ``rem`` elements (the next ones are another thread's)."""
    b, step = k.b, flags.type.count
    word = b.bitcast(flags, ir.IntType(step))
    first = b.lshr(e, ir.Constant(I64, 3))
    if rem is None:
        b.store(word, gep(b, k.arg["bits"], first, I8), align=1)
        return
    for t in range(step // 8):
        with b.if_then(b.icmp_signed("<", ir.Constant(I64, 8 * t), rem)):
            byte = b.trunc(b.lshr(word, ir.Constant(word.type, 8 * t)), I8)
            b.store(byte, gep(b, k.arg["bits"], b.add(first, ir.Constant(I64, t)), I8), align=1)


def _load_bits(k: Kernel, step: int, e, rem):
    """``_store_bits`` inverted: a step's ``<step x i1>`` flags (bytes past a partial step's
    elements are not read, and read as 0)."""
    b = k.b
    ty = ir.IntType(step)
    first = b.lshr(e, ir.Constant(I64, 3))
    if rem is None:
        word = b.load(gep(b, k.arg["bits"], first, I8), typ=ty, align=1)
    else:
        acc = k.var(ty, ir.Constant(ty, 0))
        for t in range(step // 8):
            with b.if_then(b.icmp_signed("<", ir.Constant(I64, 8 * t), rem)):
                byte = b.load(gep(b, k.arg["bits"], b.add(first, ir.Constant(I64, t)), I8), typ=I8)
                k.set(acc, b.or_(k.get(acc, ty), b.shl(b.zext(byte, ty), ir.Constant(ty, 8 * t))))
        word = k.get(acc, ty)
    return b.bitcast(word, vec(step, I1))


def _join(b: ir.IRBuilder, parts: list):
    """Concatenate equal-width vectors (a power-of-two count) into one."""
    while len(parts) > 1:
        n = parts[0].type.count
        parts = [b.shuffle_vector(lo, hi, const_vec(2 * n, range(2 * n), I32))
                 for lo, hi in zip(parts[::2], parts[1::2])]
    return parts[0]


def _new_kernel(target, symbol: str, params) -> tuple[Kernel, int]:
    """The kernel and its float lanes per vector."""
    t = get_target(target)
    return Kernel(new_module(t, "fqt_dropout"), symbol, params), lanes_of(t)


def dropout_forward_ir(target: str | Target = "host") -> KernelIR:
    """``fqt_dropout_forward``: see the module docstring."""
    k, n = _new_kernel(target, "fqt_dropout_forward",
                    [("x", "ptr"), ("y", "ptr"), ("bits", "ptr"), ("n", "i64"), ("key", "u64"),
                     ("keep_below", "u64"), ("scale", "f32"), ("b0", "i64"), ("b1", "i64")])
    b, a = k.b, k.arg
    # Lane l's state is the first lane's plus l * GOLDEN (mod 2**64): one multiply per step.
    lane_states = const_vec(n, [i64(l * rng.GOLDEN % (1 << 64)).constant for l in range(n)])
    threshold = k.splat(a["keep_below"], n)

    def step(e, rem):
        flags = []
        for first in range(0, _step(n), n):
            at = b.add(e, ir.Constant(I64, first))
            mask = _lane_mask(k, n, rem, first)
            state = b.add(a["key"], b.mul(b.add(at, ir.Constant(I64, 1)), i64(rng.GOLDEN)))
            draw = mix64(b, b.add(k.splat(state, n), lane_states))
            keep = b.icmp_unsigned("<", b.lshr(draw, const_vec(n, 64 - rng.KEEP_BITS)), threshold)
            if mask is not None:
                keep = b.and_(keep, mask)
            _store(k, _scaled(k, _load(k, n, a["x"], at, mask), keep), a["y"], at, mask)
            flags.append(keep)
        _store_bits(k, _join(b, flags), e, rem)

    _range(k, _step(n), step)
    return k.finish()


def dropout_backward_ir(target: str | Target = "host") -> KernelIR:
    """``fqt_dropout_backward``: see the module docstring."""
    k, n = _new_kernel(target, "fqt_dropout_backward",
                    [("dy", "ptr"), ("bits", "ptr"), ("dx", "ptr"), ("n", "i64"), ("scale", "f32"),
                     ("b0", "i64"), ("b1", "i64")])
    b, a = k.b, k.arg

    def step(e, rem):
        flags = _load_bits(k, _step(n), e, rem)
        for first in range(0, _step(n), n):
            at = b.add(e, ir.Constant(I64, first))
            mask = _lane_mask(k, n, rem, first)
            keep = b.shuffle_vector(flags, flags, const_vec(n, range(first, first + n), I32))
            _store(k, _scaled(k, _load(k, n, a["dy"], at, mask), keep), a["dx"], at, mask)

    _range(k, _step(n), step)
    return k.finish()
