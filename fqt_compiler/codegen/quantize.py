"""LLVM IR for the fused gradient quantizer of docs/math.md §4 (two passes over ``G'``).

``G'`` is read in place as a strided 3-D view ``g[n, o, i]`` (sample, channel, position
within the sample): an NCHW conv gradient with ``i = h*W + w``, or a ``[rows, O]`` matrix
with ``i`` a row within its sample. Its element has G' row ``r = n*HW + i`` and counter index
``r*O + o`` in the stochastic-rounding stream (``ops.rng``). An optional per-channel
``alpha`` is multiplied in on the fly (``G' = alpha ⊙ g``, one float32 multiply, as torch does).

* ``group_minmax_ir``: min and max of every ``(n, o)`` pair over ``i``; the runtime reduces
  them to per-tensor, per-sample or per-channel groups (min/max are exact in any order).
* ``row_col_minmax_ir``: a row-major ``[rows, O]`` ``G'`` (a linear layer's), whose pairs are
  single elements: the min and max of every row and every column in one pass.
* ``quantize_pack_ir``: for each output row (a kept group's row of the path's GEMM operand),
  stochastic rounding with the SplitMix64 draws computed in the kernel and the reference's
  float32 operations in the reference's order (``t = (v - z) * s``, ``floor(t + u)``, clamp;
  no fast-math flags, so LLVM neither reassociates nor contracts them into an FMA), then
  bit-plane packing: plane ``t`` of output row ``m`` is ``out[t, m, :]``.
* ``quantize_pack_rows_ir``: the input path when rows are contiguous and channels strided
  (NCHW): codes of 64 rows per channel, then 64x64 bit transposes (see its docstring).
* ``quantize_pack_cols_ir``: the weight path of a row-major ``[rows, O]`` ``G'`` (a linear
  layer's), whose output rows are columns: codes of 64 kept columns per row read along the
  row, then 64x64 bit transposes (see its docstring).

An output row of ``quantize_pack_ir`` is ``nseg`` segments of ``seg_len`` elements, packed back to back: the
input-gradient path has one segment per row (a G' row, packed along ``o``); the
weight-gradient path has one segment per sample (a channel's ``HW`` positions of sample
``n``, packed along ``r``). Per-row tables give each row's first element, first counter,
group and channel, so the kernel never divides.
"""
from __future__ import annotations

from llvmlite import ir

from ..ops import rng
from .abi import KernelIR
from .builder import (F32, F64, I1, I8, I32, I64, BitStream, Kernel, const_vec, i64, masked_gather, masked_load, mix64,
                      masked_scatter, masked_store, new_module, smin, transpose64, vec)
from .targets import Target, get_target

LANES = 64
# Kept channels per pass of quantize_pack_cols_ir over a tile's rows, in blocks of 64: the
# tile's codes (bits x COL_BLOCKS x 64 words) stay in L1.
COL_BLOCKS = 8


def _load_strided(k: Kernel, base, first, stride, mask, passthru):
    """Lanes ``first + 0..n-1`` of a strided float run (masked); contiguous runs use a plain
    masked load, others a gather."""
    b, n = k.b, passthru.type.count
    out = k.var(passthru.type)
    with b.if_else(b.icmp_signed("==", stride, ir.Constant(I64, 1))) as (unit, strided):
        with unit:
            k.set(out, masked_load(k.b, k.gep(base, first), mask, passthru))
        with strided:
            idx = b.add(k.splat(first, n), const_vec(n, range(n)))
            ptrs = k.vgep(base, b.mul(idx, k.splat(stride, n)), 4)
            k.set(out, masked_gather(k.b, ptrs, mask, passthru))
    return k.get(out, passthru.type)


def _times_alpha(k: Kernel, v, alpha, ch, first, ch_step, mask):
    """``v * alpha[ch + lane*ch_step]`` when ``alpha`` is not null (``ch_step`` is 0 or 1)."""
    b, n = k.b, v.type.count
    out = k.var(v.type, v)
    with b.if_then(b.icmp_unsigned("!=", b.ptrtoint(alpha, I64), ir.Constant(I64, 0))):
        a0 = k.gep(alpha, ch)
        scaled = k.var(v.type)
        with b.if_else(b.icmp_signed("==", ch_step, ir.Constant(I64, 0))) as (same, along):
            with same:
                k.set(scaled, b.fmul(v, k.splat(b.load(a0, typ=F32), n)))
            with along:
                av = masked_load(k.b, k.gep(a0, first), mask, const_vec(n, 0.0, F32))
                k.set(scaled, b.fmul(v, av))
        k.set(out, k.get(scaled, v.type))
    return k.get(out, v.type)


def group_minmax_ir(target: str | Target = "host", *, lanes: int = LANES, sum_squares: bool = False) -> KernelIR:
    """``fqt_group_minmax(g, sn, so, si, alpha, O, HW, lo, hi, ss, p0, p1)``: for pairs
    ``p = n*O + o`` in ``p0..p1``, ``lo[p] = min_i G'[n, o, i]`` and ``hi[p] = max_i``, both
    NaN when the pair holds a NaN (as ``reference.group_min_max``: the NaN must reach the
    gradient), ``lanes`` positions at a time (few lanes for small HW: the per-pair horizontal
    reduction of a wide vector costs more than a 4x4 spatial map). With ``sum_squares``
    (aq_opt) it also writes ``ss[p] = sum_i G'[n, o, i]^2`` (float64) in
    ``reference.pair_sum_squares``' order: ``lanes`` float64 accumulators, folded in halves
    (``ss`` is ignored otherwise).

    Whole vectors run unmasked and only the last partial one is masked, so the loop body
    holds no per-lane index vector (a 64-lane one of i64 is 16 AVX2 registers and spills)."""
    t = get_target(target)
    m = new_module(t, "fqt_quantize")
    k = Kernel(m, "fqt_group_minmax", [("g", "ptr"), ("sn", "i64"), ("so", "i64"), ("si", "i64"), ("alpha", "ptr"),
                                       ("O", "i64"), ("HW", "i64"), ("lo", "ptr"), ("hi", "ptr"), ("ss", "ptr"),
                                       ("p0", "i64"), ("p1", "i64")])
    a, b = k.arg, k.b
    inf, ninf = const_vec(lanes, float("inf"), F32), const_vec(lanes, float("-inf"), F32)
    fv, dv, bv = vec(lanes, F32), vec(lanes, F64), vec(lanes, I1)
    full = const_vec(lanes, 1, I1)
    # HW rounded down to whole vectors (lanes is a power of two).
    whole = b.and_(a["HW"], ir.Constant(I64, -lanes))
    with k.loop(a["p0"], a["p1"]) as p:
        n, o = b.sdiv(p, a["O"]), b.srem(p, a["O"])
        base = k.gep(a["g"], b.add(b.mul(n, a["sn"]), b.mul(o, a["so"])))
        lo, hi = k.var(fv, inf), k.var(fv, ninf)
        nan = k.var(bv, const_vec(lanes, 0, I1))
        ss = k.var(dv, const_vec(lanes, 0.0, F64)) if sum_squares else None

        def accumulate(first, mask):
            zero = const_vec(lanes, 0.0, F32)
            v = _load_strided(k, base, first, a["si"], mask, zero)
            v = _times_alpha(k, v, a["alpha"], o, first, ir.Constant(I64, 0), mask)
            cur_lo, cur_hi = k.get(lo, fv), k.get(hi, fv)
            below, above = b.fcmp_ordered("<", v, cur_lo), b.fcmp_ordered(">", v, cur_hi)
            if mask is not full:
                # Masked-off lanes become +0.0 (times an infinite alpha they would be NaN):
                # no NaN, nothing added to the squares; the compares exclude them.
                v = b.select(mask, v, zero)
                below, above = b.and_(mask, below), b.and_(mask, above)
            # Ordered compares skip a NaN (an Inf does win them): it is tracked on the side.
            k.set(lo, b.select(below, v, cur_lo))
            k.set(hi, b.select(above, v, cur_hi))
            k.set(nan, b.or_(k.get(nan, bv), b.fcmp_unordered("uno", v, v)))
            if sum_squares:
                d = b.fpext(v, dv)
                k.set(ss, b.fadd(k.get(ss, dv), b.fmul(d, d)))

        with k.loop(0, whole, lanes) as first:
            accumulate(first, full)
        with b.if_then(b.icmp_signed("<", whole, a["HW"])):
            idx = b.add(k.splat(whole, lanes), const_vec(lanes, range(lanes)))
            accumulate(whole, b.icmp_signed("<", idx, k.splat(a["HW"], lanes)))
        any_nan = k.call(f"llvm.vector.reduce.or.v{lanes}i1", I1, [k.get(nan, bv)])
        for name, acc, red in (("lo", lo, "fmin"), ("hi", hi, "fmax")):
            # The accumulators hold no NaN (ordered compares never select one), so the
            # reduction may assume none (nnan: a plain min/max, no NaN blends).
            value = k.call(f"llvm.vector.reduce.{red}.v{lanes}f32", F32, [k.get(acc, fv)], fastmath=("nnan",))
            # The sign of a zero result is unspecified (LangRef: x86 minps returns an operand,
            # AArch64 fminnmv orders -0 < +0); + 0.0 makes it +0 on every target, as the
            # reference (codes and keep decisions never depend on it).
            value = b.fadd(value, ir.Constant(F32, 0.0))
            b.store(b.select(any_nan, ir.Constant(F32, float("nan")), value), k.gep(a[name], p))
        if sum_squares:
            b.store(_halving_sum(k, k.get(ss, dv)), k.gep(a["ss"], p, F64))
    return k.finish()


def _nan_min_max(k: Kernel, op: str, x, y):
    """``llvm.minimum``/``llvm.maximum`` (``op`` "min"/"max"): NaN when either is NaN, as
    torch's amin/amax. ``nsz``: the sign of a zero result may be either (the kernel adds +0.0
    at the end). An intrinsic, not a compare and select: a select between a new value and
    the loaded accumulator, stored back, becomes a masked store, which is slow on x86."""
    name = {"min": "minimum", "max": "maximum"}[op]
    return k.call(f"llvm.{name}.v{x.type.count}f32", x.type, [x, y], fastmath=("nsz",))


def row_col_minmax_ir(target: str | Target = "host") -> KernelIR:
    """``fqt_row_col_minmax(g, ld, alpha, O, rlo, rhi, clo, chi, r0, r1)``: one pass over rows
    ``r0..r1`` of a row-major ``[rows, O]`` matrix (row stride ``ld``; times ``alpha[o]`` when
    not null) giving both groupings of a linear layer's ``G'``: ``rlo[r]``/``rhi[r]``, the
    min/max of row ``r`` (the input path's per-row groups), and ``clo[o]``/``chi[o]``, the
    min/max of column ``o`` over these rows (the weight path's per-channel groups; a slice
    of rows per thread, each into its own ``clo``/``chi``, reduced by the caller). NaN
    propagates (``_nan_min_max``); a zero result is +0.0, as ``reference.group_min_max``.

    Vectors run along the contiguous columns: the column accumulators are one load and
    store per vector (2 x O floats, in L1 up to a few thousand columns), the row
    accumulators stay in registers and are reduced once per row; only the last partial
    vector is masked."""
    t = get_target(target)
    m = new_module(t, "fqt_quantize")
    k = Kernel(m, "fqt_row_col_minmax", [("g", "ptr"), ("ld", "i64"), ("alpha", "ptr"), ("O", "i64"), ("rlo", "ptr"),
                                         ("rhi", "ptr"), ("clo", "ptr"), ("chi", "ptr"), ("r0", "i64"), ("r1", "i64")])
    a, b = k.arg, k.b
    width = 2 * _chunk_lanes(t)   # two registers: two independent row-accumulator chains
    fv = vec(width, F32)
    inf, ninf = const_vec(width, float("inf"), F32), const_vec(width, float("-inf"), F32)
    full = const_vec(width, 1, I1)
    whole = b.and_(a["O"], ir.Constant(I64, -width))
    tail = b.icmp_signed("<", b.add(const_vec(width, range(width)), k.splat(whole, width)), k.splat(a["O"], width))
    has_tail = b.icmp_signed("<", whole, a["O"])

    def columns(body):
        with k.loop(0, whole, width) as c:
            body(c, full)
        with b.if_then(has_tail):
            body(whole, tail)

    def store(value, ptr, mask):
        if mask is full:
            b.store(value, ptr, align=4)
        else:
            masked_store(b, value, ptr, mask)

    def init(c, mask):
        store(inf, k.gep(a["clo"], c), mask)
        store(ninf, k.gep(a["chi"], c), mask)

    columns(init)
    with k.loop(a["r0"], a["r1"]) as r:
        row = k.gep(a["g"], b.mul(r, a["ld"]))
        lo, hi = k.var(fv, inf), k.var(fv, ninf)

        def accumulate(c, mask):
            if mask is full:
                v = b.load(k.gep(row, c), typ=fv, align=4)
            else:
                v = masked_load(b, k.gep(row, c), mask, const_vec(width, 0.0, F32))
            v = _times_alpha(k, v, a["alpha"], ir.Constant(I64, 0), c, ir.Constant(I64, 1), mask)
            vlo = vhi = v
            if mask is not full:   # masked lanes (after alpha: inf * 0 would be NaN) lose every compare
                vlo, vhi = b.select(mask, v, inf), b.select(mask, v, ninf)
            k.set(lo, _nan_min_max(k, "min", vlo, k.get(lo, fv)))
            k.set(hi, _nan_min_max(k, "max", vhi, k.get(hi, fv)))
            for name, op, val in (("clo", "min", vlo), ("chi", "max", vhi)):
                ptr = k.gep(a[name], c)
                cur = b.load(ptr, typ=fv, align=4) if mask is full else masked_load(b, ptr, mask, val)
                store(_nan_min_max(k, op, val, cur), ptr, mask)

        columns(accumulate)
        for name, op, acc in (("rlo", "min", lo), ("rhi", "max", hi)):
            value, n = k.get(acc, fv), width
            while n > 1:
                n //= 2
                low = b.shuffle_vector(value, value, const_vec(n, range(n), I32))
                high = b.shuffle_vector(value, value, const_vec(n, range(n, 2 * n), I32))
                value = _nan_min_max(k, op, low, high)
            value = b.fadd(b.extract_element(value, ir.Constant(I32, 0)), ir.Constant(F32, 0.0))
            b.store(value, k.gep(a[name], r))

    def positive_zero(c, mask):
        for name in ("clo", "chi"):
            ptr = k.gep(a[name], c)
            cur = b.load(ptr, typ=fv, align=4) if mask is full else masked_load(b, ptr, mask, inf)
            store(b.fadd(cur, const_vec(width, 0.0, F32)), ptr, mask)

    columns(positive_zero)
    return k.finish()


def _halving_sum(k: Kernel, acc: ir.Value) -> ir.Value:
    """Lane ``j`` += lane ``j + w/2`` for ``w = lanes, ..., 2``, then lane 0: the fixed order
    of ``reference.pair_sum_squares`` (no fast-math flag, so LLVM keeps it)."""
    b, width = k.b, acc.type.count
    while width > 1:
        width //= 2
        low = b.shuffle_vector(acc, acc, const_vec(width, range(width), I32))
        high = b.shuffle_vector(acc, acc, const_vec(width, range(width, 2 * width), I32))
        acc = b.fadd(low, high)
    return b.extract_element(acc, ir.Constant(I32, 0))


def _state(k: Kernel, key: ir.Value, ctr: ir.Value) -> ir.Value:
    """The SplitMix64 state ``key + (ctr + 1)*GOLDEN`` (mod 2**64) of scalar counter ``ctr``."""
    b = k.b
    return b.add(key, b.mul(b.add(ctr, ir.Constant(I64, 1)), i64(rng.GOLDEN)))


def _uniform(k: Kernel, state: ir.Value) -> ir.Value:
    """``rng.uniform`` of the lanes' SplitMix64 states (``_state`` of their counters): the mix,
    then the top 24 bits. The kernels' counters are affine in the lane, so they step the
    states by adding ``lane * step * GOLDEN`` (exact mod 2**64) instead of multiplying per
    lane: one of the draw's three 64-bit multiplies, each three 32-bit ones on AVX2 and NEON."""
    b, n = k.b, state.type.count
    z = mix64(b, state)
    top = b.trunc(b.lshr(z, const_vec(n, 40)), vec(n, I32))
    # 24-bit integers convert exactly and a power-of-two scale is exact: matches numpy.
    return b.fmul(b.sitofp(top, vec(n, F32)), const_vec(n, 2.0 ** -24, F32))


def _codes(k: Kernel, v, z, sc, state, bits: int):
    """b-bit stochastic rounding codes (``<n x i32>``), the reference's float32 operations in
    its order: ``t = (v - z) * s``, ``q = clamp(floor(t + u), 0, B)``."""
    b, n = k.b, v.type.count
    levels = const_vec(n, float(2 ** bits - 1), F32)
    zero = const_vec(n, 0.0, F32)
    tv = b.fmul(b.fsub(v, z), sc)
    q = k.call(f"llvm.floor.v{n}f32", v.type, [b.fadd(tv, _uniform(k, state))])
    q = b.select(b.fcmp_ordered("<", q, zero), zero, q)
    q = b.select(b.fcmp_ordered(">", q, levels), levels, q)
    return b.fptosi(q, vec(n, I32))


def _chunk_lanes(t: Target) -> int:
    """Lanes computed at once by the pack kernels: one float32 vector register's worth. The
    SplitMix64 draws are i64 lanes; a 64-lane block of them is 16 AVX2 (32 NEON) registers
    per value, more than the register file, so the mix spills, while one register of float32
    lanes keeps the draw's i64 temporaries in a few registers."""
    return max(4, t.vector_bits // 32)


def _block_words(k: Kernel, width: int, bits: int, remaining: ir.Value, chunk_codes) -> list:
    """Plane words of a 64-lane block whose first ``remaining`` lanes are valid, ``width``
    lanes at a time: ``chunk_codes(at, mask)`` gives the codes (``<width x i32>``) of lanes
    ``at .. at+width-1`` under ``mask``; bit ``t`` of lane ``l``'s code (0 outside the mask)
    becomes bit ``l`` of plane word ``t``. A whole block runs with an all-true constant mask
    (plain loads, no masking), a partial one computes only the chunks holding valid lanes."""
    b = k.b
    acc = [k.var(I64, ir.Constant(I64, 0)) for _ in range(bits)]
    zero = const_vec(width, 0, I32)

    def chunk(at, mask):
        code = b.select(mask, chunk_codes(at, mask), zero)
        for p in range(bits):
            # Bit p moved to the sign: one shift and a sign-bit mask move per vector.
            bit = b.icmp_signed("<", b.shl(code, const_vec(width, 31 - p, I32)), zero)
            word = b.zext(b.bitcast(bit, ir.IntType(width)), I64)
            k.set(acc[p], b.or_(k.get(acc[p]), b.shl(word, at)))

    with b.if_else(b.icmp_signed(">=", remaining, ir.Constant(I64, LANES))) as (whole, partial):
        with whole:
            with k.loop(0, LANES, width) as at:
                chunk(at, const_vec(width, 1, I1))
        with partial:
            with k.loop(0, remaining, width) as at:
                left = b.trunc(b.sub(remaining, at), I32)   # below 64 here
                chunk(at, b.icmp_signed("<", const_vec(width, range(width), I32), k.splat(left, width)))
    return [k.get(word) for word in acc]


def quantize_pack_ir(target: str | Target = "host", *, bits: int) -> KernelIR:
    """``fqt_quantize_pack(g, alpha, key, zero, scale, row_off, row_ctr, row_group, row_ch,
    nseg, seg_len, seg_stride, elem_stride, seg_ctr, elem_ctr, seg_group, ch_step,
    out, rows, ld, m0, m1)``.

    Output row ``m``, segment ``s``, element ``j``: value ``g[row_off[m] + s*seg_stride +
    j*elem_stride]`` (times ``alpha[row_ch[m] + j*ch_step]``), counter ``row_ctr[m] +
    s*seg_ctr + j*elem_ctr``, group ``row_group[m] + s*seg_group`` whose ``zero`` (the group
    minimum z) and ``scale`` (``B / R``, 0 for R = 0) give the code; bit ``t`` of the code goes
    to packed bit ``s*seg_len + j`` of ``out[t, m]`` (planes of ``rows x ld`` words)."""
    t = get_target(target)
    m = new_module(t, "fqt_quantize")
    names = ["g", "alpha", "key", "zero", "scale", "row_off", "row_ctr", "row_group", "row_ch", "nseg",
             "seg_len", "seg_stride", "elem_stride", "seg_ctr", "elem_ctr", "seg_group", "ch_step",
             "out", "rows", "ld", "m0", "m1"]
    ptrs = {"g", "alpha", "zero", "scale", "row_off", "row_ctr", "row_group", "row_ch", "out"}
    kinds = {nm: "ptr" for nm in ptrs} | {"key": "u64"}
    k = Kernel(m, f"fqt_quantize_pack_b{bits}", [(nm, kinds.get(nm, "i64")) for nm in names])
    a, b = k.arg, k.b
    width = _chunk_lanes(t)
    lane = const_vec(width, range(width))
    # Consecutive elements of a segment have counters elem_ctr apart.
    lane_state = b.mul(lane, k.splat(b.mul(a["elem_ctr"], i64(rng.GOLDEN)), width))
    with k.loop(a["m0"], a["m1"]) as row:
        def loadi64(name):
            return b.load(k.gep(a[name], row, I64), typ=I64)

        off, ctr, group, ch = (loadi64(nm) for nm in ("row_off", "row_ctr", "row_group", "row_ch"))
        plane_rows = const_vec(bits, [p for p in range(bits)]) if bits > 1 else None

        def store(acc, word, row=row):
            if bits == 1:
                b.store(acc, k.gep(a["out"], b.add(b.mul(row, a["ld"]), word), I64))
                return
            prow = b.add(b.mul(plane_rows, k.splat(a["rows"], bits)), k.splat(row, bits))
            addr = b.add(b.mul(prow, k.splat(a["ld"], bits)), k.splat(word, bits))
            masked_scatter(k.b, acc, k.vgep(a["out"], addr, 8), const_vec(bits, 1, I1))

        stream = BitStream(k, bits, store)
        with k.loop(0, a["nseg"]) as s:
            gi = b.add(group, b.mul(s, a["seg_group"]))
            z = k.splat(b.load(k.gep(a["zero"], gi), typ=F32), width)
            sc = k.splat(b.load(k.gep(a["scale"], gi), typ=F32), width)
            base = k.gep(a["g"], b.add(off, b.mul(s, a["seg_stride"])))
            seg_ctr = b.add(ctr, b.mul(s, a["seg_ctr"]))
            with k.loop(0, a["seg_len"], LANES) as first:
                def chunk_codes(at, mask, first=first, z=z, sc=sc, base=base, seg_ctr=seg_ctr):
                    start = b.add(first, at)
                    v = _load_strided(k, base, start, a["elem_stride"], mask, const_vec(width, 0.0, F32))
                    v = _times_alpha(k, v, a["alpha"], ch, start, a["ch_step"], mask)
                    state = _state(k, a["key"], b.add(seg_ctr, b.mul(start, a["elem_ctr"])))
                    return _codes(k, v, z, sc, b.add(k.splat(state, width), lane_state), bits)

                words = _block_words(k, width, bits, b.sub(a["seg_len"], first), chunk_codes)
                if bits == 1:
                    field = words[0]
                else:
                    field = ir.Constant(vec(bits), [0] * bits)
                    for p, w in enumerate(words):
                        field = b.insert_element(field, w, ir.Constant(I32, p))
                left = b.sub(a["seg_len"], first)
                length = b.select(b.icmp_signed("<", left, ir.Constant(I64, LANES)), left, ir.Constant(I64, LANES))
                stream.append(field, length)
        stream.finish(a["ld"])
    return k.finish()


def quantize_pack_rows_ir(target: str | Target = "host", *, bits: int) -> KernelIR:
    """Input path with G' rows contiguous along ``i`` (an NCHW gradient):
    ``fqt_quantize_pack_rows_b{bits}(g, sn, so, si, alpha, key, zero, scale, samples, groups,
    O, HW, out, rows, ld, t0, t1)``.

    Tile ``t`` is 64 consecutive rows ``i0 .. i0+63`` of kept sample ``samples[t / ceil(HW/64)]``
    (group ``groups[...]``), output rows ``(t / ceil(HW/64))*HW + i``. Codes are computed 64 rows
    at a time for one channel (a contiguous load instead of a 64-way gather across channels),
    giving one word per channel and plane; each 64x64 block is then bit-transposed so that
    each output row is packed along the channels, as the input-gradient GEMM contracts."""
    t = get_target(target)
    m = new_module(t, "fqt_quantize")
    args = [("g", "ptr"), ("sn", "i64"), ("so", "i64"), ("si", "i64"), ("alpha", "ptr"), ("key", "u64"), ("zero", "ptr"),
            ("scale", "ptr"), ("samples", "ptr"), ("groups", "ptr"), ("O", "i64"), ("HW", "i64"), ("out", "ptr"),
            ("rows", "i64"), ("ld", "i64"), ("t0", "i64"), ("t1", "i64")]
    k = Kernel(m, f"fqt_quantize_pack_rows_b{bits}", args)
    a, b = k.arg, k.b
    c64 = ir.Constant(I64, LANES)
    lane = const_vec(LANES, range(LANES))
    width = _chunk_lanes(t)
    chunk_lane = const_vec(width, range(width))
    # Consecutive rows have counters O apart.
    lane_state = b.mul(chunk_lane, k.splat(b.mul(a["O"], i64(rng.GOLDEN)), width))
    with k.b.goto_block(k.fn.basic_blocks[0]):
        tile = b.alloca(ir.ArrayType(I64, bits * LANES))
    blocks_per_sample = b.sdiv(b.add(a["HW"], ir.Constant(I64, LANES - 1)), c64)
    channel_words = b.sdiv(b.add(a["O"], ir.Constant(I64, LANES - 1)), c64)
    with k.loop(a["t0"], a["t1"]) as tix:
        ks, ib = b.sdiv(tix, blocks_per_sample), b.srem(tix, blocks_per_sample)
        n = b.load(k.gep(a["samples"], ks, I64), typ=I64)
        grp = b.load(k.gep(a["groups"], ks, I64), typ=I64)
        i0 = b.mul(ib, c64)
        rows_i = b.add(k.splat(i0, LANES), lane)
        valid = b.icmp_signed("<", rows_i, k.splat(a["HW"], LANES))
        z = k.splat(b.load(k.gep(a["zero"], grp), typ=F32), width)
        sc = k.splat(b.load(k.gep(a["scale"], grp), typ=F32), width)
        base = k.gep(a["g"], b.add(b.mul(n, a["sn"]), b.mul(i0, a["si"])))
        # G' row r = n*HW + i has counters r*O + o: chunk lane l of block row i0 + at has
        # r*O = (n*HW + i0 + at)*O + l*O.
        tile_row = b.add(b.mul(n, a["HW"]), i0)
        out_row = b.add(k.splat(b.add(b.mul(ks, a["HW"]), i0), LANES), lane)
        plane_ptrs = [k.vgep(a["out"], b.mul(b.add(out_row, k.splat(b.mul(ir.Constant(I64, p), a["rows"]), LANES)),
                                             k.splat(a["ld"], LANES)), 8) for p in range(bits)]
        with k.loop(0, channel_words) as ob:
            with k.loop(0, c64) as oo:
                o = b.add(b.mul(ob, c64), oo)
                with b.if_else(b.icmp_signed("<", o, a["O"])) as (inside, past):
                    with inside:
                        def chunk_codes(at, mask, o=o, z=z, sc=sc, base=base, tile_row=tile_row):
                            v = _load_strided(k, k.gep(base, b.mul(o, a["so"])), at, a["si"], mask,
                                              const_vec(width, 0.0, F32))
                            v = _times_alpha(k, v, a["alpha"], o, at, ir.Constant(I64, 0), mask)
                            state = _state(k, a["key"], b.add(b.mul(b.add(tile_row, at), a["O"]), o))
                            return _codes(k, v, z, sc, b.add(k.splat(state, width), lane_state), bits)

                        # Prefetch the next tile's 64 rows of this channel (cache lines when the
                        # rows are contiguous): one short stream per channel, HW floats apart,
                        # which the hardware prefetchers leave to demand misses.
                        ahead = b.add(b.mul(o, a["so"]), b.mul(c64, a["si"]))
                        for line in range(0, LANES, 16):
                            # read, keep in all cache levels, data
                            flags = [ir.Constant(I32, c) for c in (0, 3, 1)]
                            k.call("llvm.prefetch.p0", ir.VoidType(),
                                   [k.gep(base, b.add(ahead, ir.Constant(I64, line))), *flags])
                        words = _block_words(k, width, bits, b.sub(a["HW"], i0), chunk_codes)
                        for p, w in enumerate(words):
                            b.store(w, b.gep(tile, [ir.Constant(I32, 0), b.add(oo, ir.Constant(I64, p * LANES))]))
                    with past:
                        for p in range(bits):
                            b.store(ir.Constant(I64, 0),
                                    b.gep(tile, [ir.Constant(I32, 0), b.add(oo, ir.Constant(I64, p * LANES))]))
            for p in range(bits):
                block = b.load(b.gep(tile, [ir.Constant(I32, 0), ir.Constant(I32, p * LANES)]), typ=vec(LANES),
                               align=8)
                masked_scatter(k.b, transpose64(k, block), k.vgep(plane_ptrs[p], k.splat(ob, LANES), 8), valid)
        with k.loop(channel_words, a["ld"]) as w:
            for p in range(bits):
                masked_scatter(k.b, const_vec(LANES, 0), k.vgep(plane_ptrs[p], k.splat(w, LANES), 8), valid)
    return k.finish()


def quantize_pack_cols_ir(target: str | Target = "host", *, bits: int) -> KernelIR:
    """Weight path of a row-major ``G'`` (row ``r`` at ``g + r*ld``, its channels contiguous):
    ``fqt_quantize_pack_cols_b{bits}(g, ld, alpha, key, zero, scale, channels, O, R, out, rows,
    ldw, t0, t1)``, the codes and planes of ``quantize_pack_ir`` with one segment of ``R``
    elements ``ld`` apart per kept channel.

    Output row ``m`` (of ``rows``) is channel ``channels[m]``, packed along ``r``, with its
    group's ``zero[m]`` and ``scale[m]`` (and ``alpha[m]`` when not null: per output row,
    not per channel); element ``(r, o)`` has counter ``r*O + o``. Tile ``t`` is rows
    ``64*t ..`` (at most 64): each row is read front to back, ``width`` kept channels at a
    time (loads within the row, so the rows stream through the caches in memory order
    rather than one cache line per element down a column), up to ``COL_BLOCKS`` x 64 kept
    channels a pass; each row's codes become one 64-bit word per plane and 64 channels, and
    each 64x64 block is bit-transposed into one word per channel and plane. The last tile
    also zeroes the planes' padding words ``ceil(R/64) .. ldw``."""
    t = get_target(target)
    m = new_module(t, "fqt_quantize")
    args = [("g", "ptr"), ("ld", "i64"), ("alpha", "ptr"), ("key", "u64"), ("zero", "ptr"), ("scale", "ptr"),
            ("channels", "ptr"), ("O", "i64"), ("R", "i64"), ("out", "ptr"), ("rows", "i64"), ("ldw", "i64"),
            ("t0", "i64"), ("t1", "i64")]
    k = Kernel(m, f"fqt_quantize_pack_cols_b{bits}", args)
    a, b = k.arg, k.b
    c64 = ir.Constant(I64, LANES)
    width = _chunk_lanes(t)
    lanes = const_vec(width, range(width))
    zero_codes = const_vec(width, 0, I32)
    with k.b.goto_block(k.fn.basic_blocks[0]):
        tile = b.alloca(ir.ArrayType(I64, bits * COL_BLOCKS * LANES))
        # channels[m] * GOLDEN of this pass's kept channels: the state of counter r*O + o,
        # key + (r*O + 1)*GOLDEN + o*GOLDEN (mod 2**64, exact), adds it to a per-row scalar
        # rather than multiplying every lane of every row.
        col_states = b.alloca(ir.ArrayType(I64, COL_BLOCKS * LANES))

    def word_at(p, block, i):   # plane p, channel block, row i of the tile
        index = b.add(b.mul(b.add(ir.Constant(I64, p * COL_BLOCKS), block), c64), i)
        return b.gep(tile, [ir.Constant(I32, 0), index])

    def per_channel(name, at, mask, passthru):
        ptr = k.gep(a[name], at, passthru.type.element)
        return masked_load(b, ptr, mask, passthru)

    row_blocks = b.sdiv(b.add(a["R"], ir.Constant(I64, LANES - 1)), c64)
    has_alpha = b.icmp_unsigned("!=", b.ptrtoint(a["alpha"], I64), ir.Constant(I64, 0))
    ones = const_vec(width, 1.0, F32)
    with k.loop(a["t0"], a["t1"]) as rb:
        r0 = b.mul(rb, c64)
        height = smin(b, b.sub(a["R"], r0), c64)
        with k.loop(0, a["rows"], COL_BLOCKS * LANES) as m0:
            in_pass = smin(b, b.sub(a["rows"], m0), ir.Constant(I64, COL_BLOCKS * LANES))
            blocks = b.sdiv(b.add(in_pass, ir.Constant(I64, LANES - 1)), c64)
            with k.loop(0, in_pass) as j:
                ch = b.load(k.gep(a["channels"], b.add(m0, j), I64), typ=I64)
                b.store(b.mul(ch, i64(rng.GOLDEN)), b.gep(col_states, [ir.Constant(I32, 0), j]))
            with k.loop(0, height) as i:
                r = b.add(r0, i)
                row = k.gep(a["g"], b.mul(r, a["ld"]))
                row_state = k.splat(_state(k, a["key"], b.mul(r, a["O"])), width)
                with k.loop(0, blocks) as blk:
                    first = b.add(m0, b.mul(blk, c64))
                    in_block = smin(b, b.sub(a["rows"], first), c64)
                    words = [k.var(I64, ir.Constant(I64, 0)) for _ in range(bits)]
                    with k.loop(0, in_block, width) as at:
                        mi = b.add(first, at)
                        valid = b.icmp_signed("<", b.add(k.splat(at, width), lanes), k.splat(in_block, width))
                        ch = per_channel("channels", mi, valid, const_vec(width, 0))
                        # Lanes past the block read lane 0's channel (their codes are
                        # discarded). One scalar load per lane rather than a gather
                        # instruction: the loads issue several per cycle where a hardware
                        # gather (microcoded on AMD) takes about a cycle per lane.
                        safe = b.select(valid, ch, k.splat(b.extract_element(ch, ir.Constant(I32, 0)), width))
                        v = const_vec(width, 0.0, F32)
                        for lane in range(width):
                            at_lane = b.extract_element(safe, ir.Constant(I32, lane))
                            v = b.insert_element(v, b.load(k.gep(row, at_lane), typ=F32), ir.Constant(I32, lane))
                        scaled = b.fmul(v, per_channel("alpha", mi, b.and_(valid, k.splat(has_alpha, width)), ones))
                        v = b.select(k.splat(has_alpha, width), scaled, v)   # no multiply without alpha
                        # _state of counter r*O + o
                        col = b.gep(col_states, [ir.Constant(I32, 0), b.sub(mi, m0)])
                        state = b.add(row_state, masked_load(b, col, valid, const_vec(width, 0)))
                        codes = _codes(k, v, per_channel("zero", mi, valid, const_vec(width, 0.0, F32)),
                                       per_channel("scale", mi, valid, const_vec(width, 0.0, F32)), state, bits)
                        code = b.select(valid, codes, zero_codes)
                        for p in range(bits):
                            bit = b.icmp_signed("<", b.shl(code, const_vec(width, 31 - p, I32)), zero_codes)
                            word = b.shl(b.zext(b.bitcast(bit, ir.IntType(width)), I64), at)
                            k.set(words[p], b.or_(k.get(words[p]), word))
                    for p in range(bits):
                        b.store(k.get(words[p]), word_at(p, blk, i))
            with k.loop(height, c64) as i:   # rows past R: codes 0
                with k.loop(0, blocks) as blk:
                    for p in range(bits):
                        b.store(ir.Constant(I64, 0), word_at(p, blk, i))
            with k.loop(0, blocks) as blk:
                first = b.add(m0, b.mul(blk, c64))
                out_rows = b.add(k.splat(first, LANES), const_vec(LANES, range(LANES)))
                keep = b.icmp_signed("<", out_rows, k.splat(a["rows"], LANES))
                plane_ptrs = [k.vgep(a["out"], b.mul(b.add(out_rows, k.splat(b.mul(ir.Constant(I64, p), a["rows"]),
                                                                             LANES)), k.splat(a["ldw"], LANES)), 8)
                              for p in range(bits)]
                for p in range(bits):
                    block = b.load(word_at(p, blk, ir.Constant(I64, 0)), typ=vec(LANES), align=8)
                    masked_scatter(b, transpose64(k, block), k.vgep(plane_ptrs[p], k.splat(rb, LANES), 8), keep)
                with b.if_then(b.icmp_signed("==", rb, b.sub(row_blocks, ir.Constant(I64, 1)))):
                    with k.loop(row_blocks, a["ldw"]) as w:
                        for p in range(bits):
                            masked_scatter(b, const_vec(LANES, 0), k.vgep(plane_ptrs[p], k.splat(w, LANES), 8), keep)
    return k.finish()


def aq_groups_ir(target: str | Target = "host") -> KernelIR:
    """``fqt_aq_groups(lo, hi, scores, n, bits, key, decide, work, prob, keep, sr_scale, scale,
    zero, status)``: the per-group half of the quantizer on the ``n`` groups of one path,
    one call in place of a few dozen vector operations per layer and step.

    With ``decide`` nonzero, the AQ keep decisions first (``reference.aq_keep``): the scores
    (float64 ``scores``, or when null AQ's ``reference.aq_scores`` of ``lo`` and ``hi`` in
    float32), the water-filling probabilities of ``reference.aq_probabilities`` with its
    float64 operations in its order (a stable merge sort, descending; the tail sums from the
    smallest score up; the first stop; ``ceil(p 2^53) / 2^53``, rounded to float32) into
    ``prob``, and the keep draws of ``rng.keep_draws`` (stream ``key``) into ``keep``
    (one byte per group). When a lo, hi or score is not finite, ``status[0] = 1`` and nothing
    else is written (the caller takes the reference's path for special groups); else
    ``status[0] = 0``. ``work``: 4n + 1 int64 of scratch.

    Then, for every group, from ``keep`` and ``prob`` (given when ``decide`` is 0): the
    rounding scale ``B / R`` (0 for R = 0) of ``reference.stochastic_codes`` and
    ``reference.dequantization``'s ``scale = R / (B p)`` and ``zero = z / p`` (p = 1 for a
    pruned group), the reference's float32 operations in its order."""
    t = get_target(target)
    m = new_module(t, "fqt_quantize")
    k = Kernel(m, "fqt_aq_groups", [("lo", "ptr"), ("hi", "ptr"), ("scores", "ptr"), ("n", "i64"), ("bits", "i64"),
                                    ("key", "u64"), ("decide", "i64"), ("work", "ptr"), ("prob", "ptr"),
                                    ("keep", "ptr"), ("sr_scale", "ptr"), ("scale", "ptr"), ("zero", "ptr"),
                                    ("status", "ptr")])
    a, b = k.arg, k.b
    n = a["n"]
    zero64, one64 = ir.Constant(I64, 0), ir.Constant(I64, 1)
    f32 = {v: ir.Constant(F32, v) for v in (0.0, 1.0)}
    levels = b.sitofp(b.sub(b.shl(one64, a["bits"]), one64), F32)
    done = k.fn.append_basic_block("done")
    affine = k.fn.append_basic_block("affine")
    b.store(zero64, a["status"])
    b.cbranch(b.icmp_signed("!=", a["decide"], zero64), k.fn.append_basic_block("decide"), affine)
    b.position_at_end(k.fn.basic_blocks[-1])
    _aq_decide(k, levels, done)
    b.branch(affine)
    b.position_at_end(affine)
    with k.loop(0, n) as i:
        lo, hi = b.load(k.gep(a["lo"], i), typ=F32), b.load(k.gep(a["hi"], i), typ=F32)
        ranges = b.fsub(hi, lo)
        positive = b.fcmp_ordered(">", ranges, f32[0.0])
        b.store(b.select(positive, b.fdiv(levels, ranges), f32[0.0]), k.gep(a["sr_scale"], i))
        kept = b.icmp_unsigned("!=", b.load(k.gep(a["keep"], i, I8), typ=I8), ir.Constant(I8, 0))
        p = b.select(kept, b.load(k.gep(a["prob"], i), typ=F32), f32[1.0])
        b.store(b.fdiv(b.fdiv(ranges, levels), p), k.gep(a["scale"], i))
        b.store(b.fdiv(lo, p), k.gep(a["zero"], i))
    b.branch(done)
    b.position_at_end(done)
    return k.finish()


def _aq_decide(k: Kernel, levels, done) -> None:
    """The keep decisions of ``aq_groups_ir`` (branches to ``done`` on a non-finite input)."""
    a, b = k.arg, k.b
    n = a["n"]
    zero64, one64 = ir.Constant(I64, 0), ir.Constant(I64, 1)
    # Scratch: two index runs, then two float64 runs of their scores (the scores of the
    # groups in order first), merged alongside the indices.
    order, spare = a["work"], k.gep(a["work"], n, I64)
    spare_scores = k.gep(a["work"], b.mul(n, ir.Constant(I64, 2)), I64)
    score = k.gep(spare_scores, n, F64)
    has_scores = b.icmp_unsigned("!=", b.ptrtoint(a["scores"], I64), zero64)
    inf = ir.Constant(F64, float("inf"))
    bad = k.var(I1, ir.Constant(I1, 0))

    def finite(x):   # |x| < inf is false for NaN and for +-inf
        return b.fcmp_ordered("<", k.call("llvm.fabs.f64", F64, [x]), inf)

    with k.loop(0, n) as i:
        lo, hi = b.load(k.gep(a["lo"], i), typ=F32), b.load(k.gep(a["hi"], i), typ=F32)
        ranges = b.fsub(hi, lo)
        aq = b.select(b.fcmp_ordered(">", ranges, ir.Constant(F32, 0.0)), ranges, k.call("llvm.fabs.f32", F32, [lo]))
        s = k.var(F64, b.fpext(aq, F64))
        with b.if_then(has_scores):
            k.set(s, b.load(k.gep(a["scores"], i, F64), typ=F64))
        sv = k.get(s, F64)
        b.store(sv, k.gep(score, i, F64))
        ok = b.and_(b.and_(finite(b.fpext(lo, F64)), finite(b.fpext(hi, F64))), finite(sv))
        k.set(bad, b.or_(k.get(bad, I1), b.not_(ok)))
        b.store(i, k.gep(order, i, I64))
    go = k.fn.append_basic_block("finite")
    b.cbranch(k.get(bad, I1), k.fn.append_basic_block("special"), go)
    b.position_at_end(k.fn.basic_blocks[-1])
    b.store(one64, a["status"])
    b.branch(done)
    b.position_at_end(go)

    def r_at(scores, j):   # the score at position j of a score run
        return b.load(k.gep(scores, j, F64), typ=F64)

    # Stable merge sort, descending (numpy's argsort(-r, kind="stable")): runs of width
    # 1, 2, 4, ... merged from src to dst, the left run first on ties. Each run's scores
    # move with its indices, so a comparison loads a score directly rather than through
    # its index (the merge's chain of dependent loads is half as long).
    src, dst = k.var(order.type, order), k.var(order.type, spare)
    src_r, dst_r = k.var(order.type, score), k.var(order.type, spare_scores)
    width = k.var(I64, one64)
    head, body, end = (k.fn.append_basic_block(nm) for nm in ("sort", "sort.pass", "sort.end"))
    b.branch(head)
    b.position_at_end(head)
    b.cbranch(b.icmp_signed("<", k.get(width), n), body, end)
    b.position_at_end(body)
    w = k.get(width)
    s_run, d_run = k.get(src, order.type), k.get(dst, order.type)
    s_sc, d_sc = k.get(src_r, order.type), k.get(dst_r, order.type)
    # Each merge runs from both ends at once, two independent chains of dependent loads:
    # the front takes the first half of the output in order (the left run's score on a
    # tie), the back the rest from the last position down (the right run's on a tie), so
    # both place every element where the stable merge does.
    with k.loop(0, n, b.mul(w, ir.Constant(I64, 2))) as first:
        mid, last = smin(b, b.add(first, w), n), smin(b, b.add(first, b.mul(w, ir.Constant(I64, 2))), n)
        count = b.sub(last, first)
        front = b.sdiv(b.add(count, one64), ir.Constant(I64, 2))
        i, j = k.var(I64, first), k.var(I64, mid)               # front heads
        bi, bj = k.var(I64, b.sub(mid, one64)), k.var(I64, b.sub(last, one64))   # back tails
        top = b.sub(n, one64)
        with k.loop(0, front) as step:
            iv, jv = k.get(i), k.get(j)
            left = b.icmp_signed("<", iv, mid)
            right = b.icmp_signed("<", jv, last)
            # Clamped positions: an exhausted run's index is never taken, but is loaded.
            ri, rj = r_at(s_sc, smin(b, iv, top)), r_at(s_sc, smin(b, jv, top))
            take = b.and_(left, b.or_(b.not_(right), b.fcmp_ordered(">=", ri, rj)))
            out = b.add(first, step)
            b.store(b.load(k.gep(s_run, b.select(take, iv, jv), I64), typ=I64), k.gep(d_run, out, I64))
            b.store(b.select(take, ri, rj), k.gep(d_sc, out, F64))
            k.set(i, b.add(iv, b.zext(take, I64)))
            k.set(j, b.add(jv, b.zext(b.not_(take), I64)))
            with b.if_then(b.icmp_signed("<", step, b.sub(count, front))):
                iv, jv = k.get(bi), k.get(bj)
                left = b.icmp_signed(">=", iv, first)
                right = b.icmp_signed(">=", jv, mid)
                li = r_at(s_sc, b.select(left, iv, zero64))   # bj stays >= mid - 1 >= 0
                rj = r_at(s_sc, jv)
                take = b.and_(left, b.or_(b.not_(right), b.fcmp_ordered("<", li, rj)))
                out = b.sub(b.sub(last, one64), step)
                b.store(b.load(k.gep(s_run, b.select(take, iv, jv), I64), typ=I64), k.gep(d_run, out, I64))
                b.store(b.select(take, li, rj), k.gep(d_sc, out, F64))
                k.set(bi, b.sub(iv, b.zext(take, I64)))
                k.set(bj, b.sub(jv, b.zext(b.not_(take), I64)))
    k.set(src, d_run)
    k.set(dst, s_run)
    k.set(src_r, d_sc)
    k.set(dst_r, s_sc)
    k.set(width, b.mul(w, ir.Constant(I64, 2)))
    b.branch(head)
    b.position_at_end(end)
    sorted_, sorted_r = k.get(src, order.type), k.get(src_r, order.type)
    tail = k.get(dst_r, order.type)     # float64 [n]: the free score run
    # tail[j] = sorted r[j] + ... + sorted r[n-1], summed from the end (numpy's cumsum of
    # the reversed scores).
    acc = k.var(F64, ir.Constant(F64, 0.0))
    with k.loop(0, n) as step:
        j = b.sub(b.sub(n, one64), step)
        rj = r_at(sorted_r, j)
        total = b.select(b.icmp_signed("==", step, zero64), rj, b.fadd(k.get(acc, F64), rj))
        k.set(acc, total)
        b.store(total, k.gep(tail, j, F64))
    budget = b.fdiv(b.sitofp(n, F64), b.sitofp(a["bits"], F64))
    first = k.var(I64, n)
    with k.loop(0, n) as j:
        left = b.fsub(budget, b.sitofp(j, F64))
        tj = b.load(k.gep(tail, j, F64), typ=F64)
        exhausted = b.or_(b.fcmp_ordered("<=", tj, ir.Constant(F64, 0.0)),
                          b.fcmp_ordered("<=", left, ir.Constant(F64, 0.0)))
        stop = b.or_(exhausted, b.fcmp_ordered("<=", b.fmul(b.fdiv(left, tj), r_at(sorted_r, j)),
                                                ir.Constant(F64, 1.0)))
        with b.if_then(b.and_(stop, b.icmp_signed("==", k.get(first), n))):
            k.set(first, j)
    f = k.get(first)
    # The stop's position (n: none, every group kept; for n = 0 the scratch's spare word).
    at = b.select(b.icmp_signed("<", f, n), f, b.select(b.icmp_signed(">", n, zero64), b.sub(n, one64), zero64))
    t_f = b.load(k.gep(tail, at, F64), typ=F64)
    left_f = b.fsub(budget, b.sitofp(f, F64))
    none_left = b.or_(b.fcmp_ordered("<=", t_f, ir.Constant(F64, 0.0)),
                      b.fcmp_ordered("<=", left_f, ir.Constant(F64, 0.0)))
    c = b.fdiv(left_f, t_f)
    grid = ir.Constant(F64, float(2 ** rng.KEEP_BITS))
    with k.loop(0, n) as j:
        g = b.load(k.gep(sorted_, j, I64), typ=I64)
        spread = b.fmul(c, r_at(sorted_r, j))
        spread = b.select(b.fcmp_ordered("<", spread, ir.Constant(F64, 1.0)), spread, ir.Constant(F64, 1.0))
        spread = b.fdiv(k.call("llvm.ceil.f64", F64, [b.fmul(spread, grid)]), grid)
        p = b.select(b.icmp_signed("<", j, f), ir.Constant(F64, 1.0),
                     b.select(none_left, ir.Constant(F64, 0.0), spread))
        p32 = b.fptrunc(p, F32)
        b.store(p32, k.gep(a["prob"], g))
        # rng.keep_draws: draw(g) = mix64(_state(key, g)); kept when its top 53 bits,
        # exact in float64, are below p * 2^53.
        state = _state(k, a["key"], g)
        draw = b.extract_element(mix64(b, b.insert_element(ir.Constant(vec(1), ir.Undefined), state,
                                                           ir.Constant(I32, 0))), ir.Constant(I32, 0))
        top = b.uitofp(b.lshr(draw, ir.Constant(I64, 64 - rng.KEEP_BITS)), F64)
        kept = b.fcmp_ordered("<", top, b.fmul(b.fpext(p32, F64), grid))
        b.store(b.zext(kept, I8), k.gep(a["keep"], g, I8))
