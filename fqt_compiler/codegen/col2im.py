"""LLVM IR for col2im + STE mask, the tail of the input-gradient path (SPEC §3).

``dx[n, c, ih, iw] = ste[n, c, ih, iw] * sum_{kh, kw} dcols[(n, oh, ow), (c, kh, kw)]`` over
the patch positions that cover the pixel (``ih = oh*S - P + kh*D``), cropped to the unpadded
input. It is written as a gather: each output row ``(n, c, ih)`` sums, 16 columns at a time,
the columns of at most ``KH*KW`` im2col rows, so rows are independent (threads need no
atomics) and the summation order is fixed (kh, then kw). The gathers (one cache line per
element: lanes are ``dcols`` rows apart) bound its speed; ``dcols`` itself is the large
operand (302 MB for ResNet-18 layer1 at batch 128).
``torch.nn.functional.fold`` (plus the mask multiply) measured 339 ms on that layer (3x3,
one thread, shared machine), this kernel 140 ms: it pays, so the runtime uses it.
"""
from __future__ import annotations

from llvmlite import ir

from .builder import F32, I1, I64, PTR, Kernel, const_vec, masked_load, vec
from .pack import extract64
from .targets import Target, get_target

LANES = 16


def col2im_ste_ir(target: str | Target, kernel_size, stride, padding, dilation) -> str:
    """``fqt_col2im_ste(d, ldd, ste, ste_ld, C, H, W, OH, OW, out, row0, row1)``: output rows
    ``(n*C + c)*H + ih`` of NCHW-contiguous ``out``; ``d`` is ``[N*OH*OW, C*KH*KW]`` float32
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

    with k.loop(a["row0"], a["row1"]) as row:
        ih = b.srem(row, a["H"])
        nc = b.sdiv(row, a["H"])
        c, n = b.srem(nc, a["C"]), b.sdiv(nc, a["C"])
        out_row = k.gep(a["out"], b.mul(row, a["W"]))
        with k.loop(0, a["W"], LANES) as iw0:
            iw = b.add(k.splat(iw0, LANES), lane)
            valid = b.icmp_signed("<", iw, k.splat(a["W"], LANES))
            acc = k.var(fv, zero)
            for kh in range(kh_):
                th = b.sub(b.add(ih, c64(ph)), c64(kh * dh))
                oh = b.sdiv(th, c64(sh))
                covers = b.and_(b.icmp_signed("==", b.srem(th, c64(sh)), c64(0)),
                                b.and_(b.icmp_signed(">=", th, c64(0)), b.icmp_signed("<", oh, a["OH"])))
                with b.if_then(covers):
                    first_row = b.mul(b.add(b.mul(n, a["OH"]), oh), a["OW"])
                    for kw in range(kw_):
                        tw = b.sub(b.add(iw, const_vec(LANES, pw)), const_vec(LANES, kw * dw))
                        ow = b.sdiv(tw, const_vec(LANES, sw))
                        hit = b.and_(valid, b.and_(b.icmp_signed(">=", tw, const_vec(LANES, 0)),
                                                   b.icmp_signed("<", ow, k.splat(a["OW"], LANES))))
                        if sw > 1:
                            hit = b.and_(hit, b.icmp_signed("==", b.srem(tw, const_vec(LANES, sw)), const_vec(LANES, 0)))
                        col = b.add(b.mul(c, c64(kh_ * kw_)), c64(kh * kw_ + kw))
                        index = b.add(b.mul(b.add(k.splat(first_row, LANES), ow), k.splat(a["ldd"], LANES)),
                                      k.splat(col, LANES))
                        v = masked_load(k, k.vgep(a["d"], index, 4), hit, zero, gather=True)
                        k.set(acc, b.fadd(k.get(acc, fv), v))
            total = k.get(acc, fv)
            result = k.var(fv, total)
            with b.if_then(b.icmp_unsigned("!=", b.ptrtoint(a["ste"], I64), c64(0))):
                words = k.gep(a["ste"], b.mul(n, a["ste_ld"]), I64)
                pos = b.add(b.mul(b.add(b.mul(c, a["H"]), ih), a["W"]), iw0)
                bits = b.bitcast(b.trunc(extract64(k, words, pos, a["ste_ld"]), ir.IntType(LANES)), vec(LANES, I1))
                # A multiply, as the reference's ``dx * ste_mask(x)`` (keeps -0.0 and NaN alike).
                k.set(result, b.fmul(total, b.select(bits, const_vec(LANES, 1.0, F32), zero)))
            k.call(f"llvm.masked.store.v{LANES}f32.p0", ir.VoidType(),
                   [k.get(result, fv), k.gep(out_row, iw0), ir.Constant(ir.IntType(32), 4), valid])
    k.finish()
    return str(m)
