"""LLVM IR for the packing kernels of docs/math.md §6: sign+pack, unpack, im2col+sign+pack.

Every kernel writes ``PackedBits`` rows (``runtime.packed``): element ``k`` at bit ``k % 64``
of word ``k // 64``, every bit past the packed length and every padding word up to ``ld``
zero. Kernels take a half-open range of rows so the runtime can split work over threads.

Sign packing compares 64 floats at once (``fcmp ogt`` gives ``<64 x i1>``, which is one
``i64`` word after a bitcast: AVX-512 mask registers, ``movmskps`` on AVX2). Rows must be
contiguous: a transposed view (``sign(W)`` packed along output channels) is packed along its
contiguous axis and then bit-transposed (``transpose_bits_ir``: 64x64 blocks in registers,
about 0.1 vector operation per bit, instead of a gather per word). ``sign`` maps 0 to bit 0
(docs/math.md §2).

im2col runs in two passes through a *padded row bitmap*: the sign bits of every input row
``(n, c, ih)`` with ``pad`` zero bits on each side (padding is -1, docs/math.md §2), in ``wpw``
words per row. From it, the ``KW`` bits of one patch row ``(c, kh)`` at output column ``ow``
are one shift (a funnel shift when the padded row spans several words), so im2col costs
about one vector operation per ``KW`` bits and 8 output rows, instead of a float compare
per bit. The bitmap is built from float ``x`` or from the per-sample packed sign bits that
the forward pass saves, which saves a pass over ``x`` in backward.

* ``im2col_pack``: rows ``r = (n, h', w')``, packed axis ``k = (c, kh, kw)``; 8 output rows
  (consecutive ``w'``) per vector.
* ``im2col_pack_t``: rows ``k = (c, kh, kw)``, packed axis ``r = (n, h', w')``, 8 output rows
  per vector: for stride 1 a run of up to 64 output bits is one funnel shift of the bitmap
  row; for stride ``s`` the bits are every ``s``-th one, compressed with ``pext`` where BMI2
  exists and is not microcoded (Zen 1/2, the ``hygon`` preset, shift and mask instead).
* ``tap_gather``: the A operand of the conv input gradient as a transposed convolution
  (``runtime.lowered.conv2d_input_grad``): whole code words of G' per tap, no bits moved.
"""
from __future__ import annotations

from llvmlite import ir

from .abi import KernelABI, KernelIR
from .builder import (F32, I1, I8, I64, BitStream, Kernel, const_vec, low_mask, masked_gather, masked_load,
                      masked_scatter, masked_store, new_module, smin, transpose64, vec)
from .targets import Target, get_target

LANES = 64      # floats per packed word
CHUNK = 8       # floats per step through a whole word (one byte of its bits) in sign pack / unpack
ROW_LANES = 8   # im2col output rows handled together (one 512-bit vector of words)


def _word_lanes(k: Kernel, first: ir.Value) -> ir.Value:
    """``<64 x i64>`` element indices ``first + 0..63``."""
    return k.b.add(k.splat(first, LANES), const_vec(LANES, range(LANES)))


def _bits(k: Kernel, flags: ir.Value) -> ir.Value:
    return k.b.bitcast(flags, I64)


def _load64(k: Kernel, base: ir.Value, first: ir.Value, count: ir.Value):
    """Elements ``first .. first+63`` of a float row and the mask of lanes before ``count``
    (the others read 0.0)."""
    mask = k.b.icmp_signed("<", _word_lanes(k, first), k.splat(count, LANES))
    return masked_load(k.b, k.gep(base, first), mask, const_vec(LANES, 0.0, F32)), mask


def _chunk(k: Kernel, row: ir.Value, w: ir.Value, c: int) -> ir.Value:
    """Address of float chunk ``c`` (``CHUNK`` floats) of word ``w``'s 64 floats in ``row``."""
    return k.gep(row, k.b.add(k.b.shl(w, ir.Constant(I64, 6)), ir.Constant(I64, c * CHUNK)))


def _byte_at(b: ir.IRBuilder, flags: ir.Value, c: int) -> ir.Value:
    """``CHUNK`` flags as byte ``c`` of an i64 word."""
    return b.shl(b.zext(b.bitcast(flags, I8), I64), ir.Constant(I64, c * CHUNK))


def sign_pack_ir(target: str | Target = "host", *, with_ste: bool = False) -> KernelIR:
    """``fqt_sign_pack(x, srow, k, out, ld, [ste_out,] row0, row1)``.

    Row ``i`` of the float matrix ``x`` (element ``(i, j)`` at ``x[i*srow + j]``) becomes
    row ``i`` of ``out`` (bit = ``x > 0``); with ``with_ste`` the same pass also
    writes the straight-through mask ``|x| < 1`` to ``ste_out`` (same layout)."""
    t = get_target(target)
    m = new_module(t, "fqt_pack")
    args = [("x", "ptr"), ("srow", "i64"), ("k", "i64"), ("out", "ptr"), ("ld", "i64")]
    if with_ste:
        args.append(("ste_out", "ptr"))
    k = Kernel(m, "fqt_sign_ste_pack" if with_ste else "fqt_sign_pack", args + [("row0", "i64"), ("row1", "i64")])
    a, b = k.arg, k.b
    zero, one = const_vec(LANES, 0.0, F32), const_vec(LANES, 1.0, F32)
    zero_c, one_c = const_vec(CHUNK, 0.0, F32), const_vec(CHUNK, 1.0, F32)
    whole = b.lshr(a["k"], ir.Constant(I64, 6))
    with k.loop(a["row0"], a["row1"]) as row:
        base = k.gep(a["x"], b.mul(row, a["srow"]))
        out_row = b.mul(row, a["ld"])
        nwords = b.lshr(b.add(a["k"], ir.Constant(I64, 63)), ir.Constant(I64, 6))
        with k.loop(0, whole) as w:
            # A whole word: CHUNK floats a step, unmasked, each step's flags one byte of it.
            signs, small = ir.Constant(I64, 0), ir.Constant(I64, 0)
            for c in range(LANES // CHUNK):
                ptr = _chunk(k, base, w, c)
                v = b.load(ptr, typ=vec(CHUNK, F32), align=4)
                signs = b.or_(signs, _byte_at(b, b.fcmp_ordered(">", v, zero_c), c))
                if with_ste:
                    mag = k.call(f"llvm.fabs.v{CHUNK}f32", v.type, [v])
                    small = b.or_(small, _byte_at(b, b.fcmp_ordered("<", mag, one_c), c))
            b.store(signs, k.gep(a["out"], b.add(out_row, w), I64))
            if with_ste:
                b.store(small, k.gep(a["ste_out"], b.add(out_row, w), I64))
        with k.loop(whole, nwords) as w:     # the partial last word, masked
            v, valid = _load64(k, base, b.shl(w, ir.Constant(I64, 6)), a["k"])
            b.store(_bits(k, b.fcmp_ordered(">", v, zero)), k.gep(a["out"], b.add(out_row, w), I64))
            if with_ste:
                mag = k.call("llvm.fabs.v64f32", v.type, [v])
                small = _bits(k, b.and_(b.fcmp_ordered("<", mag, one), valid))
                b.store(small, k.gep(a["ste_out"], b.add(out_row, w), I64))
        with k.loop(nwords, a["ld"]) as w:
            b.store(ir.Constant(I64, 0), k.gep(a["out"], b.add(out_row, w), I64))
            if with_ste:
                b.store(ir.Constant(I64, 0), k.gep(a["ste_out"], b.add(out_row, w), I64))
    return k.finish()


def unpack_ir(target: str | Target = "host", *, multiply: bool = False) -> KernelIR:
    """``fqt_unpack_bits(words, ld, k, out, sout, one, zero, row0, row1)``: float row ``i`` of
    ``out`` (row stride ``sout``) gets ``one`` where bit ``j`` of packed row ``i`` is set, else ``zero``.

    ``multiply=True``: ``fqt_unpack_bits_mul`` (same arguments) multiplies ``out`` by that
    value in place instead, e.g. a gradient by its STE mask bits: a product, not a select, so
    a NaN or an infinity times 0 is NaN as in the reference's ``dx * ste_mask(x)``, with no
    float mask tensor written and read back.

    Whole words go ``CHUNK`` floats at a time (one byte of the word a step, unmasked); only
    the row's last partial word takes the masked 64-lane path."""
    t = get_target(target)
    m = new_module(t, "fqt_pack")
    k = Kernel(m, "fqt_unpack_bits_mul" if multiply else "fqt_unpack_bits",
               [("words", "ptr"), ("ld", "i64"), ("k", "i64"), ("out", "ptr"), ("sout", "i64"),
                ("one", "f32"), ("zero", "f32"), ("row0", "i64"), ("row1", "i64")])
    a, b = k.arg, k.b
    ones, zeros = k.splat(a["one"], LANES), k.splat(a["zero"], LANES)
    ones_c, zeros_c = k.splat(a["one"], CHUNK), k.splat(a["zero"], CHUNK)
    whole = b.lshr(a["k"], ir.Constant(I64, 6))
    nwords = b.lshr(b.add(a["k"], ir.Constant(I64, 63)), ir.Constant(I64, 6))
    with k.loop(a["row0"], a["row1"]) as row:
        src = k.gep(a["words"], b.mul(row, a["ld"]), I64)
        dst = k.gep(a["out"], b.mul(row, a["sout"]))
        with k.loop(0, whole) as w:
            word = b.load(k.gep(src, w, I64), typ=I64)
            for c in range(LANES // CHUNK):
                flags = b.bitcast(b.trunc(b.lshr(word, ir.Constant(I64, c * CHUNK)), I8), vec(CHUNK, I1))
                ptr = _chunk(k, dst, w, c)
                value = b.select(flags, ones_c, zeros_c)
                if multiply:
                    value = b.fmul(b.load(ptr, typ=vec(CHUNK, F32), align=4), value)
                b.store(value, ptr, align=4)
        with k.loop(whole, nwords) as w:
            first = b.shl(w, ir.Constant(I64, 6))
            bits = b.bitcast(b.load(k.gep(src, w, I64), typ=I64), vec(LANES, I1))
            mask = b.icmp_signed("<", _word_lanes(k, first), k.splat(a["k"], LANES))
            value = b.select(bits, ones, zeros)
            if multiply:
                value = b.fmul(masked_load(b, k.gep(dst, first), mask, zeros), value)
            masked_store(b, value, k.gep(dst, first), mask)
    return k.finish()


def bitmap_words(width: int, pad: int) -> int:
    """Words per padded bitmap row: one when the padded row fits a word (a plain shift reads
    any span), else enough for a funnel shift at the last position to read a second word."""
    wp = width + 2 * pad
    return 1 if wp <= 64 else (wp - 1) // 64 + 2


def padded_rows_ir(target: str | Target = "host", *, source: str = "float") -> KernelIR:
    """The padded row bitmap ``bm[(n*C + c)*H + ih, 0:wpw]`` (bit ``pad + iw`` = sign bit of
    ``x[n, c, ih, iw]``), for rows ``row0..row1`` of ``N*C*H``.

    ``source="float"``: ``fqt_padded_rows_f32(x, sn, sc, sh, C, H, W, pad, bm, wpw, row0, row1)``
    from float NCHW ``x`` with unit stride along W. ``source="bits"``:
    ``fqt_padded_rows_bits(src, src_ld, C, H, W, pad, bm, wpw, row0, row1)`` from per-sample
    packed sign bits (sample ``n`` is row ``n`` of ``src``, bit index ``(c*H + ih)*W + iw``).
    From bits, one-word rows (small maps) take ``_narrow_rows_from_bits``."""
    if source not in ("float", "bits"):
        raise ValueError(f"source must be 'float' or 'bits', got {source!r}")
    t = get_target(target)
    m = new_module(t, "fqt_pack")
    head = ([("x", "ptr"), ("sn", "i64"), ("sc", "i64"), ("sh", "i64")] if source == "float"
            else [("src", "ptr"), ("src_ld", "i64")])
    k = Kernel(m, f"fqt_padded_rows_{'f32' if source == 'float' else 'bits'}",
               head + [("C", "i64"), ("H", "i64"), ("W", "i64"), ("pad", "i64"), ("bm", "ptr"), ("wpw", "i64"),
                       ("row0", "i64"), ("row1", "i64")])
    if source == "float":
        _padded_rows_by_row(k, source)
        return k.finish()
    with k.b.if_else(k.b.icmp_signed("==", k.arg["wpw"], ir.Constant(I64, 1))) as (narrow, wide):
        with narrow:
            _narrow_rows_from_bits(k, 2 * t.vector_bits // 64)
        with wide:
            _padded_rows_by_row(k, source)
    return k.finish()


def _padded_rows_by_row(k: Kernel, source: str) -> None:
    """The bitmap one row ``(n, c, ih)`` at a time, one word after the other."""
    a, b = k.arg, k.b
    c64 = ir.Constant(I64, 64)
    # (n, c, ih) of the current row, advanced by carries: a few cycles of work per row on
    # small maps would otherwise wait on three 64-bit divisions.
    rows_per_sample = b.mul(a["C"], a["H"])
    first_c = b.sdiv(b.srem(a["row0"], rows_per_sample), a["H"])
    n_v, c_v = k.var(I64, b.sdiv(a["row0"], rows_per_sample)), k.var(I64, first_c)
    ih_v = k.var(I64, b.srem(a["row0"], a["H"]))
    one = ir.Constant(I64, 1)
    with k.loop(a["row0"], a["row1"]) as row:
        n, c, ih = k.get(n_v), k.get(c_v), k.get(ih_v)
        with k.loop(0, a["wpw"]) as w:
            first = b.sub(b.mul(w, c64), a["pad"])          # input column of bit 0 of this word
            # Bits of this word that hold columns 0 <= iw < W: [-first, W - first) within 0..64.
            below, upto = (b.select(b.icmp_signed("<", v, ir.Constant(I64, 0)), ir.Constant(I64, 0), v)
                           for v in (b.neg(first), b.sub(a["W"], first)))
            valid_bits = b.and_(low_mask(k, upto), b.not_(low_mask(k, below)))
            valid = b.bitcast(valid_bits, vec(LANES, I1))
            if source == "float":
                base = k.gep(a["x"], b.add(b.add(b.mul(n, a["sn"]), b.mul(c, a["sc"])), b.mul(ih, a["sh"])))
                v = masked_load(k.b, k.gep(base, first), valid, const_vec(LANES, 0.0, F32))
                word = _bits(k, b.fcmp_ordered(">", v, const_vec(LANES, 0.0, F32)))
            else:
                src = k.gep(a["src"], b.mul(n, a["src_ld"]), I64)
                pos = b.add(b.mul(b.add(b.mul(c, a["H"]), ih), a["W"]), first)
                word = b.and_(_extract64(k, src, pos, a["src_ld"]), valid_bits)
            b.store(word, k.gep(a["bm"], b.add(b.mul(row, a["wpw"]), w), I64))
        next_row = b.icmp_signed("==", b.add(ih, one), a["H"])
        next_c = b.select(next_row, b.add(c, one), c)
        next_n = b.icmp_signed("==", next_c, a["C"])
        k.set(ih_v, b.select(next_row, ir.Constant(I64, 0), b.add(ih, one)))
        k.set(c_v, b.select(next_n, ir.Constant(I64, 0), next_c))
        k.set(n_v, b.select(next_n, b.add(n, one), n))


def _narrow_rows_from_bits(k: Kernel, lanes: int) -> None:
    """One-word bitmap rows (``W + 2 pad <= 64``) from packed sign bits, ``lanes`` rows a step.

    A sample's rows ``(c, ih)`` are consecutive ``W``-bit fields of its packed row, so the
    next ``min(lanes, 64 // W)`` of them are inside one 64-bit extract: each lane shifts its
    field down, masks it and moves it up by ``pad``, and the words go out as one contiguous
    vector store (masked only at the end of the range). On 8x8..1x1 maps this replaces one extract per row by one per step.
    Steps never cross a sample (its packed row ends there)."""
    a, b = k.arg, k.b
    one = ir.Constant(I64, 1)
    lane = const_vec(lanes, range(lanes))
    rows_per_sample = b.mul(a["C"], a["H"])
    fits = b.sdiv(ir.Constant(I64, 64), a["W"])
    step = smin(b, fits, ir.Constant(I64, lanes))
    field = k.splat(low_mask(k, a["W"]), lanes)
    shifts = b.and_(b.mul(lane, k.splat(a["W"], lanes)), const_vec(lanes, 63))   # no poison past `step`
    pad = k.splat(a["pad"], lanes)
    last = b.sdiv(b.sub(a["row1"], one), rows_per_sample)
    with k.loop(b.sdiv(a["row0"], rows_per_sample), b.add(last, one)) as n:
        start = b.mul(n, rows_per_sample)
        lo = b.select(b.icmp_signed(">", a["row0"], start), a["row0"], start)
        hi = smin(b, a["row1"], b.add(start, rows_per_sample))
        src = k.gep(a["src"], b.mul(n, a["src_ld"]), I64)
        with k.loop(lo, hi, step) as row:
            bits = _extract64(k, src, b.mul(b.sub(row, start), a["W"]), a["src_ld"])
            words = b.shl(b.and_(b.lshr(k.splat(bits, lanes), shifts), field), pad)
            out = k.gep(a["bm"], row, I64)
            # Lanes from `step` on hold other rows' garbage: a plain store may write them while
            # they are below `hi` (later steps overwrite them; masked stores are slow on AMD).
            with b.if_else(b.icmp_signed("<=", b.add(row, ir.Constant(I64, lanes)), hi)) as (whole, tail):
                with whole:
                    b.store(words, out, align=8)
                with tail:
                    inside = b.icmp_signed("<", lane, k.splat(smin(b, b.sub(hi, row), step), lanes))
                    masked_store(b, words, out, inside)


def _extract64(k: Kernel, src: ir.Value, pos: ir.Value, nwords: ir.Value) -> ir.Value:
    """64 bits of a packed row starting at bit ``pos`` (``pos >= -63``); bits outside the
    row's ``nwords`` words read as 0."""
    b = k.b
    idx = b.ashr(pos, ir.Constant(I64, 6))
    words = []
    for i in (idx, b.add(idx, ir.Constant(I64, 1))):
        inside = b.and_(b.icmp_signed(">=", i, ir.Constant(I64, 0)), b.icmp_signed("<", i, nwords))
        safe = b.select(inside, i, ir.Constant(I64, 0))
        words.append(b.select(inside, b.load(k.gep(src, safe, I64), typ=I64), ir.Constant(I64, 0)))
    return k.call("llvm.fshr.i64", I64, [words[1], words[0], b.and_(pos, ir.Constant(I64, 63))])


def _span(k: Kernel, row: ir.Value, q: ir.Value, one_word: bool) -> ir.Value:
    """The 64 bits of a padded bitmap row from bit ``q`` on (scalar or per lane; ``row`` is one
    pointer, or one per lane)."""
    b = k.b
    lanes = q.type.count if isinstance(q.type, ir.VectorType) else 1
    every, none = const_vec(lanes, 1, I1), const_vec(lanes, 0)
    if one_word:
        if isinstance(row.type, ir.VectorType):
            return b.lshr(masked_gather(k.b, row, every, none), q)
        w = b.load(row, typ=I64)
        return b.lshr(w if lanes == 1 else k.splat(w, lanes), q)
    c6 = ir.Constant(I64, 6) if lanes == 1 else const_vec(lanes, 6)
    idx = b.lshr(q, c6)
    if lanes == 1:
        lo = b.load(k.gep(row, idx, I64), typ=I64)
        hi = b.load(k.gep(row, b.add(idx, ir.Constant(I64, 1)), I64), typ=I64)
    else:
        ptrs = k.vgep(row, idx, 8)
        lo = masked_gather(k.b, ptrs, every, none)
        hi = masked_gather(k.b, k.vgep(ptrs, const_vec(lanes, 1), 8), every, none)
    sh = b.and_(q, ir.Constant(I64, 63) if lanes == 1 else const_vec(lanes, 63))
    suffix = "i64" if lanes == 1 else f"v{lanes}i64"
    return k.call(f"llvm.fshr.{suffix}", q.type, [hi, lo, sh])


_MICROCODED_PEXT = ("znver1", "znver2")


def _every_nth(k: Kernel, t: Target, span: ir.Value, step: int, count: int) -> ir.Value:
    """Bits ``0, step, 2 step, ...`` (``count`` of them) of ``span``, packed to the bottom:
    ``pext`` (per lane) where BMI2 exists, else one shift and mask per bit. Zen 1 and 2
    (``hygon``'s cpu) run ``pext`` in microcode, tens of cycles per set bit of the pattern,
    slower than the shifts."""
    b = k.b
    lanes = span.type.count if isinstance(span.type, ir.VectorType) else 1

    def c(v):
        return ir.Constant(I64, v) if lanes == 1 else const_vec(lanes, v)

    if step == 1:
        return b.and_(span, c((1 << count) - 1 if count < 64 else -1))
    if t.has("bmi2") and t.cpu not in _MICROCODED_PEXT:
        pattern = sum(1 << (i * step) for i in range(count))
        pattern = ir.Constant(I64, pattern - (1 << 64) if pattern >= 1 << 63 else pattern)
        if lanes == 1:
            return k.call("llvm.x86.bmi.pext.64", I64, [span, pattern])
        out = span
        for i in range(lanes):
            lane = ir.Constant(I64, i)
            out = b.insert_element(out, k.call("llvm.x86.bmi.pext.64", I64, [b.extract_element(span, lane), pattern]),
                                   lane)
        return out
    out = None
    for i in range(count):
        bit = b.and_(b.lshr(span, c(i * step)), c(1))
        bit = b.shl(bit, c(i)) if i else bit
        out = bit if out is None else b.or_(out, bit)
    return out


def _check_patch(kernel_size, stride, dilation) -> None:
    kh, kw = kernel_size
    if (kw - 1) * dilation[1] + 1 > 64:
        raise ValueError(f"a patch row spans {(kw - 1) * dilation[1] + 1} input columns; at most 64 supported")
    if min(kh, kw, *stride, *dilation) < 1:
        raise ValueError(f"kernel_size {kernel_size}, stride {stride}, dilation {dilation} must be >= 1")


def im2col_pack_ir(target: str | Target, kernel_size, stride, padding, dilation, *, one_word: bool) -> KernelIR:
    """``fqt_im2col_pack(bm, wpw, C, H, OH, OW, out, ld, blk0, blk1)``: output rows
    ``(n*OH + oh)*OW + ow`` for blocks ``n*OH + oh`` in ``blk0..blk1``; packed axis
    ``(c, kh, kw)`` (weight.flatten(1) order). ``one_word``: bitmap rows are one word.

    A channel's ``KH*KW`` bits are one append to the bit stream when they fit a word (else one
    append per patch row); a patch row that reads padding is selected to zero bits, and
    whether it does is decided once per block, not per channel."""
    t = get_target(target)
    _check_patch(kernel_size, stride, dilation)
    (kh_, kw_), (sh, sw), (ph, _), (dh, dw) = kernel_size, stride, padding, dilation
    appends = [range(kh_)] if kh_ * kw_ <= 64 else [range(i, i + 1) for i in range(kh_)]
    m = new_module(t, "fqt_pack")
    k = Kernel(m, "fqt_im2col_pack", [("bm", "ptr"), ("wpw", "i64"), ("C", "i64"), ("H", "i64"), ("OH", "i64"),
                                      ("OW", "i64"), ("out", "ptr"), ("ld", "i64"), ("blk0", "i64"), ("blk1", "i64")])
    a, b = k.arg, k.b
    L = ROW_LANES
    lane = const_vec(L, range(L))
    zero = ir.Constant(I64, 0)
    with k.loop(a["blk0"], a["blk1"]) as blk:
        oh, n = b.srem(blk, a["OH"]), b.sdiv(blk, a["OH"])
        # Per patch row: all ones or zero (padding), and the word offset of its bitmap row in
        # channel 0 (a padding row reads row 0 of the sample and is masked off).
        masks, offsets = [], []
        for kh in range(kh_):
            ih = b.add(b.sub(b.mul(oh, ir.Constant(I64, sh)), ir.Constant(I64, ph)), ir.Constant(I64, kh * dh))
            inside = b.and_(b.icmp_signed(">=", ih, zero), b.icmp_signed("<", ih, a["H"]))
            masks.append(k.splat(b.select(inside, ir.Constant(I64, -1), zero), L))
            offsets.append(b.mul(b.add(b.mul(b.mul(n, a["C"]), a["H"]), b.select(inside, ih, zero)), a["wpw"]))
        channel_words = b.mul(a["H"], a["wpw"])
        with k.loop(0, a["OW"], L) as ow0:
            ow = b.add(k.splat(ow0, L), lane)
            valid = b.icmp_signed("<", ow, k.splat(a["OW"], L))
            last = k.splat(b.sub(a["OW"], ir.Constant(I64, 1)), L)
            q = b.mul(b.select(valid, ow, last), const_vec(L, sw))
            rows = b.add(k.splat(b.mul(blk, a["OW"]), L), ow)
            row_ptrs = k.vgep(a["out"], b.mul(rows, k.splat(a["ld"], L)), 8)

            def store(acc, word, row_ptrs=row_ptrs, valid=valid):
                masked_scatter(k.b, acc, k.vgep(row_ptrs, k.splat(word, L), 8), valid)

            stream = BitStream(k, L, store)
            with k.loop(0, a["C"]) as c:
                channel = b.mul(c, channel_words)
                for group in appends:
                    field = None
                    for kh in group:
                        row = k.gep(a["bm"], b.add(offsets[kh], channel), I64)
                        bits = b.and_(_every_nth(k, t, _span(k, row, q, one_word), dw, kw_), masks[kh])
                        bits = b.shl(bits, const_vec(L, (kh - group[0]) * kw_)) if kh > group[0] else bits
                        field = bits if field is None else b.or_(field, bits)
                    stream.append(field, len(group) * kw_)
            stream.finish(a["ld"])
    return k.finish()


def im2col_pack_t_ir(target: str | Target, kernel_size, stride, padding, dilation, *, one_word: bool) -> KernelIR:
    """``fqt_im2col_pack_t(bm, wpw, N, C, H, OH, OW, out, ld, row0, row1)``: output rows
    ``(c*KH + kh)*KW + kw`` in ``row0..row1``, packed axis ``r = (n, oh, ow)``.

    ``ROW_LANES`` output rows at a time, one per lane: every row appends its bits of one
    ``(n, oh)`` at the same bit offset, so the lanes share one bit stream; each lane reads its
    own bitmap row ``(n, c, oh*sh - ph + kh*dh)`` (a gather) shifted by its ``kw*dw``, and a
    lane whose ``kh`` reads padding gets zero bits (a select, no branch)."""
    t = get_target(target)
    _check_patch(kernel_size, stride, dilation)
    (kh_, kw_), (sh, sw), (ph, _), (dh, dw) = kernel_size, stride, padding, dilation
    chunk = 64 if sw == 1 else 63 // sw + 1     # output bits per 64-bit span of the bitmap
    m = new_module(t, "fqt_pack")
    k = Kernel(m, "fqt_im2col_pack_t", [("bm", "ptr"), ("wpw", "i64"), ("N", "i64"), ("C", "i64"), ("H", "i64"),
                                        ("OH", "i64"), ("OW", "i64"), ("out", "ptr"), ("ld", "i64"),
                                        ("row0", "i64"), ("row1", "i64")])
    a, b = k.arg, k.b
    L = ROW_LANES
    lane = const_vec(L, range(L))
    with k.loop(a["row0"], a["row1"], L) as first:
        rows = b.add(k.splat(first, L), lane)
        valid = b.icmp_signed("<", rows, k.splat(a["row1"], L))
        safe = b.select(valid, rows, k.splat(first, L))     # lanes past the range compute as the first
        kw = b.srem(safe, const_vec(L, kw_))
        kh = b.srem(b.sdiv(safe, const_vec(L, kw_)), const_vec(L, kh_))
        c = b.sdiv(safe, const_vec(L, kh_ * kw_))
        row_ptrs = k.vgep(a["out"], b.mul(rows, k.splat(a["ld"], L)), 8)

        def store(acc, word, row_ptrs=row_ptrs, valid=valid):
            masked_scatter(k.b, acc, k.vgep(row_ptrs, k.splat(word, L), 8), valid)

        stream = BitStream(k, L, store)
        q0 = b.mul(kw, const_vec(L, dw))
        ih0 = b.sub(b.mul(kh, const_vec(L, dh)), const_vec(L, ph))
        zeros = const_vec(L, 0)
        # Word offsets of the lanes' bitmap rows, advanced by adds: 64-bit vector multiplies
        # are several instructions each on AVX2.
        wpw = k.splat(a["wpw"], L)
        channel_words, ih0_words = b.mul(b.mul(c, k.splat(a["H"], L)), wpw), b.mul(ih0, wpw)
        sample_words = b.mul(b.mul(a["C"], a["H"]), a["wpw"])
        with k.loop(0, a["N"]) as n:
            sample = b.add(channel_words, k.splat(b.mul(n, sample_words), L))
            with k.loop(0, a["OH"]) as oh:
                ih = b.add(k.splat(b.mul(oh, ir.Constant(I64, sh)), L), ih0)
                inside = b.and_(b.icmp_signed(">=", ih, zeros), b.icmp_signed("<", ih, k.splat(a["H"], L)))
                row_words = b.add(k.splat(b.mul(b.mul(oh, ir.Constant(I64, sh)), a["wpw"]), L), ih0_words)
                bm_rows = k.vgep(a["bm"], b.add(sample, b.select(inside, row_words, zeros)), 8)
                with k.loop(0, a["OW"], chunk) as ow0:
                    length = smin(b, b.sub(a["OW"], ow0), ir.Constant(I64, chunk))
                    span = _span(k, bm_rows, b.add(q0, k.splat(b.mul(ow0, ir.Constant(I64, sw)), L)), one_word)
                    bits = b.and_(_every_nth(k, t, span, sw, chunk), k.splat(low_mask(k, length), L))
                    stream.append(b.select(inside, bits, zeros), length)
        stream.finish(a["ld"])
    return k.finish()


def transpose_bits_ir(target: str | Target = "host") -> KernelIR:
    """``fqt_transpose_bits(src, ld, R, K, dst, ld_out, w0, w1)``: the ``K x R`` transpose of a
    packed ``R x K`` bit matrix, for source word columns ``w0..w1`` (output rows ``64 w ..``).
    Each 64x64 block is gathered (64 rows, one word each), bit-transposed in registers and
    scattered as one word of 64 output rows."""
    t = get_target(target)
    m = new_module(t, "fqt_pack")
    k = Kernel(m, "fqt_transpose_bits", [("src", "ptr"), ("ld", "i64"), ("R", "i64"), ("K", "i64"), ("dst", "ptr"),
                                         ("ld_out", "i64"), ("w0", "i64"), ("w1", "i64")])
    a, b = k.arg, k.b
    lane = const_vec(LANES, range(LANES))
    c64 = ir.Constant(I64, LANES)
    blocks = b.sdiv(b.add(a["R"], ir.Constant(I64, LANES - 1)), c64)
    with k.loop(a["w0"], a["w1"]) as w:
        out_rows = b.add(k.splat(b.mul(w, c64), LANES), lane)
        out_valid = b.icmp_signed("<", out_rows, k.splat(a["K"], LANES))
        out_ptrs = k.vgep(a["dst"], b.mul(out_rows, k.splat(a["ld_out"], LANES)), 8)
        with k.loop(0, blocks) as rb:
            rows = b.add(k.splat(b.mul(rb, c64), LANES), lane)
            inside = b.icmp_signed("<", rows, k.splat(a["R"], LANES))
            ptrs = k.vgep(a["src"], b.add(b.mul(rows, k.splat(a["ld"], LANES)), k.splat(w, LANES)), 8)
            block = masked_gather(k.b, ptrs, inside, const_vec(LANES, 0))
            masked_scatter(k.b, transpose64(k, block), k.vgep(out_ptrs, k.splat(rb, LANES), 8), out_valid)
        with k.loop(blocks, a["ld_out"]) as pad:
            masked_scatter(k.b, const_vec(LANES, 0), k.vgep(out_ptrs, k.splat(pad, LANES), 8), out_valid)
    return k.finish()


def tap_gather_ir(target: str | Target, kernel_size, stride, padding, dilation, chunk: int) -> KernelIR:
    """``fqt_tap_gather(src, src_ld, H, W, OH, OW, dst, dst_ld, row0, row1)``: for each image
    ``s`` (a bit plane of one sample) and input position ``(y, x)``, the ``chunk`` code words
    of the output position that tap ``(i, j)`` reads in a transposed convolution,
    ``((y + ph - i dh) / sh, (x + pw - j dw) / sw)`` when both are whole and in range, else
    zero words. Source: row ``s*OH*OW + oy*OW + ox`` of ``src`` (``src_ld`` words a row);
    destination: row ``s*H*W + y*W + x`` of ``dst``, tap ``t = i*KW + j`` at words
    ``t*chunk ..``, zero words after the last tap up to ``dst_ld``. Work rows ``s*H + y`` in
    ``row0..row1``. Tap positions are computed per row and column from the geometry's
    constants (no index table), and a tap's words are one ``chunk``-word vector: an invalid
    tap loads the image's first row and selects zeros, so there is no branch per tap."""
    t = get_target(target)
    (kh_, kw_), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    if min(kh_, kw_, sh, sw, dh, dw, chunk) < 1 or min(ph, pw) < 0:
        raise ValueError(f"kernel_size {kernel_size}, stride {stride}, dilation {dilation}, chunk {chunk} must be "
                         f">= 1 and padding {padding} >= 0")
    m = new_module(t, "fqt_pack")
    k = Kernel(m, "fqt_tap_gather", [("src", "ptr"), ("src_ld", "i64"), ("H", "i64"), ("W", "i64"), ("OH", "i64"),
                                     ("OW", "i64"), ("dst", "ptr"), ("dst_ld", "i64"), ("row0", "i64"),
                                     ("row1", "i64")])
    a, b = k.arg, k.b
    zero = ir.Constant(I64, 0)
    run = vec(chunk)

    def tap(pos, offset: int, s: int, size):
        """(valid, position // s) of ``pos + offset`` for the stride ``s``."""
        n = b.add(pos, ir.Constant(I64, offset))
        q = b.sdiv(n, ir.Constant(I64, s)) if s > 1 else n
        valid = b.and_(b.icmp_signed(">=", n, zero), b.icmp_signed("<", q, size))
        if s > 1:
            valid = b.and_(valid, b.icmp_signed("==", b.srem(n, ir.Constant(I64, s)), zero))
        return valid, q

    with k.loop(a["row0"], a["row1"]) as row:
        s, y = b.sdiv(row, a["H"]), b.srem(row, a["H"])
        image = k.gep(a["src"], b.mul(b.mul(s, b.mul(a["OH"], a["OW"])), a["src_ld"]), I64)
        rows_y = [tap(y, ph - i * dh, sh, a["OH"]) for i in range(kh_)]
        with k.loop(0, a["W"]) as x:
            out = k.gep(a["dst"], b.mul(b.add(b.mul(row, a["W"]), x), a["dst_ld"]), I64)
            for j in range(kw_):
                valid_x, ox = tap(x, pw - j * dw, sw, a["OW"])
                for i, (valid_y, oy) in enumerate(rows_y):
                    valid = b.and_(valid_y, valid_x)
                    first = b.select(valid, b.mul(b.add(b.mul(oy, a["OW"]), ox), a["src_ld"]), zero)
                    words = b.load(k.gep(image, first, I64), typ=run, align=8)
                    b.store(b.select(valid, words, ir.Constant(run, [0] * chunk)),
                            k.gep(out, ir.Constant(I64, (i * kw_ + j) * chunk), I64), align=8)
            with k.loop(kh_ * kw_ * chunk, a["dst_ld"]) as w:
                b.store(zero, k.gep(out, w, I64))
    return k.finish()
