"""LLVM IR for col2im + STE mask, the tail of the input-gradient path (SPEC §3).

``dx[n, c, ih, iw] = ste[n, c, ih, iw] * sum_{kh, kw} dcols[(n, oh, ow), (c, kh, kw)]`` over
the patch positions that cover the pixel (``ih = oh*S - P + kh*D``), cropped to the unpadded
input. It is written as a gather: 16 consecutive elements of a sample at a time (they may
span rows and channels, so small maps still fill the vector) each sum the ``KH*KW`` columns
that cover them, so chunks are independent (threads need no atomics) and the summation
order is fixed (kh, then kw). The gathers (one cache line per
element: lanes are ``dcols`` rows apart) bound its speed; ``dcols`` itself is the large
operand (302 MB for ResNet-18 layer1 at batch 128).
``torch.nn.functional.fold`` (plus the mask multiply) measured 339 ms on that layer (3x3,
one thread, shared machine), this kernel about 100 ms, and 2x-18x faster on the small maps
of the deeper layers (benchmarks/bench_preprocess.py): it pays, so the runtime uses it.
"""
from __future__ import annotations

from llvmlite import ir

from .builder import F32, I1, I64, PTR, Kernel, const_vec, floor_div, masked_load, vec
from .pack import extract64
from .targets import Target, get_target

LANES = 16


def col2im_ste_ir(target: str | Target, kernel_size, stride, padding, dilation) -> str:
    """``fqt_col2im_ste(d, ldd, ste, ste_ld, C, H, W, OH, OW, out, row0, row1)``: chunks
    ``row0..row1`` of 16 consecutive elements of a sample of NCHW-contiguous ``out``;
    ``d`` is ``[N*OH*OW, C*KH*KW]`` float32
    with row stride ``ldd``; ``ste`` (nullable) holds per-sample packed mask bits
    (bit ``(c*H + ih)*W + iw`` of row ``n``, ``ste_ld`` words per row)."""
    t = get_target(target)
    (kh_, kw_), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    m = ir.Module(name="fqt_col2im")
    m.triple = t.triple
    k = Kernel(m, "fqt_col2im_ste", [("d", PTR), ("ldd", I64), ("ste", PTR), ("ste_ld", I64), ("C", I64),
                                     ("H", I64), ("W", I64), ("OH", I64), ("OW", I64), ("out", PTR),
                                     ("row0", I64), ("row1", I64)])
    a, b = k.arg, k.b
    fv = vec(LANES, F32)
    zero = const_vec(LANES, 0.0, F32)
    lane = const_vec(LANES, range(LANES))

    def c64(v):
        return ir.Constant(I64, v)

    def const(v):
        return const_vec(LANES, v)

    def inside(t, size, step):
        """Lanes where input offset ``t`` is a patch position ``t / step`` in ``[0, size)``."""
        ok = b.and_(b.icmp_signed(">=", t, const(0)), b.icmp_signed("<", b.sdiv(t, const(step)), k.splat(size, LANES)))
        return b.and_(ok, b.icmp_signed("==", b.srem(t, const(step)), const(0))) if step > 1 else ok

    plane = b.mul(a["H"], a["W"])
    sample = b.mul(a["C"], plane)
    chunks = b.sdiv(b.add(sample, c64(LANES - 1)), c64(LANES))
    inv_plane = b.fdiv(ir.Constant(F32, 1.0), b.sitofp(plane, F32))
    inv_w = b.fdiv(ir.Constant(F32, 1.0), b.sitofp(a["W"], F32))
    with k.loop(a["row0"], a["row1"]) as chunk:
        n = b.sdiv(chunk, chunks)
        q0 = b.mul(b.srem(chunk, chunks), c64(LANES))          # first (c, ih, iw) of the chunk
        valid = b.icmp_signed("<", b.add(k.splat(q0, LANES), lane), k.splat(sample, LANES))
        rel = b.add(k.splat(b.srem(q0, plane), LANES), lane)
        wraps = floor_div(k, rel, inv_plane)
        c = b.add(k.splat(b.sdiv(q0, plane), LANES), wraps)
        p = b.sub(rel, b.mul(wraps, k.splat(plane, LANES)))
        ih = floor_div(k, p, inv_w)
        iw = b.sub(p, b.mul(ih, k.splat(a["W"], LANES)))
        acc = zero
        for kh in range(kh_):
            th = b.add(ih, const(ph - kh * dh))
            rows_h = b.mul(b.add(k.splat(b.mul(n, a["OH"]), LANES), b.sdiv(th, const(sh))), k.splat(a["OW"], LANES))
            hit_h = b.and_(valid, inside(th, a["OH"], sh))
            for kw in range(kw_):
                tw = b.add(iw, const(pw - kw * dw))
                hit = b.and_(hit_h, inside(tw, a["OW"], sw))
                col = b.add(b.mul(c, const(kh_ * kw_)), const(kh * kw_ + kw))
                index = b.add(b.mul(b.add(rows_h, b.sdiv(tw, const(sw))), k.splat(a["ldd"], LANES)), col)
                acc = b.fadd(acc, masked_load(k, k.vgep(a["d"], index, 4), hit, zero, gather=True))
        result = k.var(fv, acc)
        with b.if_then(b.icmp_unsigned("!=", b.ptrtoint(a["ste"], I64), c64(0))):
            words = k.gep(a["ste"], b.mul(n, a["ste_ld"]), I64)
            bits = b.bitcast(b.trunc(extract64(k, words, q0, a["ste_ld"]), ir.IntType(LANES)), vec(LANES, I1))
            # A multiply, as the reference's ``dx * ste_mask(x)`` (keeps -0.0 and NaN alike).
            k.set(result, b.fmul(acc, b.select(bits, const_vec(LANES, 1.0, F32), zero)))
        k.call(f"llvm.masked.store.v{LANES}f32.p0", ir.VoidType(),
               [k.get(result, fv), k.gep(a["out"], b.add(b.mul(n, sample), q0)), ir.Constant(ir.IntType(32), 4), valid])
    k.finish()
    return str(m)
