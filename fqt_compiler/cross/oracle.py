"""The kernel oracle: what one kernel call must write, computed with the pure-PyTorch
reference (``ops.reference``).

``check_call(spec, args, before, after)`` takes a call as the verification harness replayed
it: the kernel's spec, its arguments by parameter name (integers, floats, and ``(buffer,
byte offset)`` for pointers, None for null), the bytes of every buffer it was given before
the call and after it; argument names and specialization options come from the spec (its
ABI and its named options). It decodes the inputs from ``before``, computes what the call must
write with the reference (``pack_bits``, ``binary_gemm``, ``bitplane_gemm``,
``rounded_codes`` with ``rng`` draws, ``F.unfold``, ``group_min_max``, the dropout
keep draws, ...), writes that into
a copy of ``before`` and compares every buffer with ``after`` bit for bit, so a kernel that
writes a wrong value, a nonzero padding bit or outside its rows fails. Float epilogues are
computed with the kernels' float32 operations in their order (no contraction into FMAs), so
they are compared bit for bit too.

Checked this way: every kernel family but the fused regions (``CLOSE_CHECKS``: compared
with the unfused chain to float32 rounding, argmax bits and raw copies exactly; the
LayerNorm and RMSNorm row regions, the linear -> activation and gated linear regions too);
only the
GEMMs' scratch matrix ``partial`` (int32 partial sums between K blocks, internal) is not
compared.
The GEMMs take ``colsum`` (B's ±1 row sums) and ``rowpop`` as the call's inputs: those come
from the ``rowpop`` kernel, which is checked on its own.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch
import torch.nn.functional as F

from ..ops import dropout, reference, rng

SCRATCH = {"binary": {"partial"}, "bitplane": {"partial"}, "aq_groups": {"work"}}


class Memory:
    """Mutable copies of a call's buffers, viewed as tensors at pointer arguments."""

    def __init__(self, before: dict):
        self.bytes = {b: bytearray(data) for b, data in before.items()}

    def at(self, ptr, dtype, count: int | None = None) -> torch.Tensor:
        """A 1-D ``dtype`` view from a pointer argument ``(buffer, byte offset)`` (empty for
        null: the data pointer of an empty tensor, in a call over an empty range)."""
        if ptr is None:
            return torch.empty(0, dtype=dtype)
        buf, off = ptr
        data = self.bytes[buf]
        raw = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
        size = torch.empty((), dtype=dtype).element_size()
        n = (len(raw) - off) // size if count is None else count
        return raw[off:off + n * size].view(dtype)

    def rows(self, ptr, ld: int, rows: int, width: int, dtype=torch.int64) -> torch.Tensor:
        """``rows x width`` of a row-major matrix with leading dimension ``ld`` (elements)."""
        flat = self.at(ptr, dtype, (rows - 1) * ld + width if rows else 0)
        return flat.as_strided((rows, width), (ld, 1))


def _packed(bits: torch.Tensor, ld: int) -> torch.Tensor:
    """``reference.pack_bits`` padded with zero words to ``ld`` words per row."""
    words = reference.pack_bits(bits)
    return F.pad(words, (0, ld - words.shape[-1]))


def _unpacked(mem: Memory, ptr, ld: int, rows: int, k: int) -> torch.Tensor:
    if rows == 0:
        return torch.zeros(0, k, dtype=torch.bool)
    return reference.unpack_bits(mem.rows(ptr, ld, rows, (k + 63) // 64).clone(), k)


def _epilogue_index(a, m, n):
    return (m // a["hw"]) * a["s_blk"] + (m % a["hw"]) * a["s_row"] + n * a["s_col"]


def _binary(mem: Memory, a: dict, opts: dict) -> None:
    m = torch.arange(a["m0"], a["m1"])
    n = torch.arange(a["n0"], a["n1"])
    abits = _unpacked(mem, a["a"], a["lda"], a["m1"], a["k"])[a["m0"]:]
    bbits = _unpacked(mem, a["b"], a["ldb"], a["n1"], a["k"])[a["n0"]:]
    dot = reference.binary_gemm(abits, bbits)
    index = _epilogue_index(a, m.view(-1, 1), n.view(1, -1))
    if opts["epilogue"] == "int32":
        mem.at(a["out"], torch.int32)[index] = dot
        return
    value = dot.float() * mem.at(a["scale"], torch.float32)[n]
    if opts["epilogue"] == "scale_bias":
        value = value + mem.at(a["bias"], torch.float32)[n]
    mem.at(a["out"], torch.float32)[index] = value


def _codes_of_planes(mem: Memory, ptr, plane_stride: int, ld: int, planes: int, rows: int, k: int):
    codes = torch.zeros(rows, k, dtype=torch.int64)
    words = mem.at(ptr, torch.int64)
    for t in range(planes):
        plane = words[t * plane_stride:].as_strided((rows, (k + 63) // 64), (ld, 1))
        codes += reference.unpack_bits(plane.clone(), k).to(torch.int64) << t
    return codes


def _bitplane(mem: Memory, a: dict, opts: dict) -> None:
    bits, k = opts["bits"], a["words"] * 64       # codes are 0 past K, so every word may count
    codes = _codes_of_planes(mem, a["planes"], a["plane_stride"], a["lda"], bits, a["m1"], k)[a["m0"]:]
    bbits = _unpacked(mem, a["b"], a["ldb"], a["n1"], k)[a["n0"]:]
    dot = reference.bitplane_gemm(codes, bbits)
    m = slice(a["m0"], a["m1"])
    n = torch.arange(a["n0"], a["n1"])
    row_map = mem.at(a["row_map"], torch.int64, a["m1"])[m]
    scale = mem.at(a["row_scale"], torch.float32, a["m1"])[m].view(-1, 1)
    zero = mem.at(a["row_zero"], torch.float32, a["m1"])[m].view(-1, 1)
    colsum = mem.at(a["colsum"], torch.float32)[n].view(1, -1)
    out = mem.at(a["out"], torch.float32)
    # The pruned rows the slice zeroes: those before each of its rows (after the previous
    # kept row), and those after the last kept row when the slice ends at the last row.
    kept = mem.at(a["row_map"], torch.int64, a["rows"])
    first = kept[a["m0"] - 1] + 1 if a["m0"] else 0
    last = a["out_rows"] if a["m1"] == a["rows"] else kept[a["m1"] - 1] + 1
    pruned = torch.tensor(sorted(set(range(int(first), int(last))) - set(row_map.tolist())), dtype=torch.int64)
    out[pruned.view(-1, 1) * a["ldo"] + n.view(1, -1)] = 0.0
    out[row_map.view(-1, 1) * a["ldo"] + n.view(1, -1)] = scale * dot.float() + zero * colsum


def _rowpop(mem: Memory, a: dict, opts: dict) -> None:
    k = a["words"] * 64
    codes = _codes_of_planes(mem, a["planes"], a["plane_stride"], a["ld"], a["nplanes"], a["rows"], k)
    mem.at(a["out"], torch.int32, a["rows"])[:] = codes.sum(1).to(torch.int32)


def _sign_pack(mem: Memory, a: dict, opts: dict) -> None:
    r0, r1, k = a["row0"], a["row1"], a["k"]
    x = mem.rows(a["x"], a["srow"], r1, k, torch.float32)[r0:]
    mem.rows(a["out"], a["ld"], r1, a["ld"])[r0:] = _packed(x > 0, a["ld"])
    if opts["with_ste"]:
        mem.rows(a["ste_out"], a["ld"], r1, a["ld"])[r0:] = _packed(x.abs() < 1, a["ld"])


def _unpack(mem: Memory, a: dict, opts: dict) -> None:
    r0, r1, k = a["row0"], a["row1"], a["k"]
    bits = _unpacked(mem, a["words"], a["ld"], r1, k)[r0:]
    values = torch.where(bits, torch.tensor(a["one"]), torch.tensor(a["zero"]))
    out = mem.rows(a["out"], a["sout"], r1, k, torch.float32)
    out[r0:] = out[r0:] * values if opts.get("multiply") else values


def _padded_rows(mem: Memory, a: dict, opts: dict) -> None:
    r0, r1, c, h, w, pad = a["row0"], a["row1"], a["C"], a["H"], a["W"], a["pad"]
    r = torch.arange(r0, r1)
    n, ch, ih = r // (c * h), r // h % c, r % h
    if opts["source"] == "float":
        x = mem.at(a["x"], torch.float32)
        elems = (n * a["sn"] + ch * a["sc"] + ih * a["sh"]).view(-1, 1) + torch.arange(w)
        bits = x[elems] > 0
    else:
        src = _unpacked(mem, a["src"], a["src_ld"], int(n.max()) + 1 if len(r) else 0, c * h * w)
        bits = src[n.view(-1, 1), ((ch * h + ih) * w).view(-1, 1) + torch.arange(w)]
    mem.rows(a["bm"], a["wpw"], r1, a["wpw"])[r0:] = _packed(F.pad(bits, (pad, pad)), a["wpw"])


def _unfolded(mem: Memory, a: dict, opts: dict, samples: int) -> torch.Tensor:
    """Bool ``[N, C*KH*KW, OH*OW]``: ``F.unfold`` of the ±1 signs the bitmap holds, the rows
    padded above and below (padding is -1, docs/math.md §2)."""
    (kh, kw), (sh, sw), (ph, _), (dh, dw) = (opts[n] for n in ("kernel_size", "stride", "padding", "dilation"))
    c, h, oh, ow = a["C"], a["H"], a["OH"], a["OW"]
    width = (ow - 1) * sw + (kw - 1) * dw + 1     # the bitmap columns any patch reads
    bm = _unpacked(mem, a["bm"], a["wpw"], samples * c * h, width).view(samples, c, h, width)
    signs = F.pad(bm.float() * 2 - 1, (0, 0, ph, ph), value=-1.0)
    cols = F.unfold(signs, (kh, kw), dilation=(dh, dw), stride=(sh, sw))
    assert cols.shape[-1] == oh * ow
    return cols > 0


def _im2col_pack(mem: Memory, a: dict, opts: dict) -> None:
    oh, ow = a["OH"], a["OW"]
    samples = -(-a["blk1"] // oh)
    rows = _unfolded(mem, a, opts, samples).permute(0, 2, 1).reshape(samples * oh * ow, -1)
    r0, r1 = a["blk0"] * ow, a["blk1"] * ow
    mem.rows(a["out"], a["ld"], r1, a["ld"])[r0:] = _packed(rows[r0:r1], a["ld"])


def _im2col_pack_t(mem: Memory, a: dict, opts: dict) -> None:
    cols = _unfolded(mem, a, opts, a["N"]).permute(1, 0, 2).reshape(-1, a["N"] * a["OH"] * a["OW"])
    r0, r1 = a["row0"], a["row1"]
    mem.rows(a["out"], a["ld"], r1, a["ld"])[r0:] = _packed(cols[r0:r1], a["ld"])


def _transpose_bits(mem: Memory, a: dict, opts: dict) -> None:
    r0, r1 = 64 * a["w0"], min(64 * a["w1"], a["K"])
    src = _unpacked(mem, a["src"], a["ld"], a["R"], a["K"])
    mem.rows(a["dst"], a["ld_out"], r1, a["ld_out"])[r0:] = _packed(src.T[r0:r1], a["ld_out"])


def _tap_gather(mem: Memory, a: dict, opts: dict) -> None:
    (r0, r1, h, w, oh, ow), chunk = (a[n] for n in ("row0", "row1", "H", "W", "OH", "OW")), opts["chunk"]
    if r1 <= r0:
        return
    images = -(-r1 // h)
    taps = reference.transposed_conv_taps((h, w), (oh, ow), *(opts[n] for n in ("kernel_size", "stride", "padding",
                                                                             "dilation")))
    src = mem.rows(a["src"], a["src_ld"], images * oh * ow, chunk)
    src = torch.cat([src, torch.zeros(1, chunk, dtype=torch.int64)])     # the row an invalid tap reads
    first = (torch.arange(images) * oh * ow).view(-1, 1, 1)
    words = src[torch.where(taps >= 0, taps + first, images * oh * ow)].reshape(images * h * w, -1)
    mem.rows(a["dst"], a["dst_ld"], r1 * w, a["dst_ld"])[r0 * w:] = F.pad(words[r0 * w:r1 * w],
                                                                          (0, a["dst_ld"] - words.shape[1]))


def _times_alpha(mem: Memory, a: dict, v, channels):
    return v if a["alpha"] is None else v * mem.at(a["alpha"], torch.float32)[channels]


def _minmax(mem: Memory, a: dict, opts: dict) -> None:
    p = torch.arange(a["p0"], a["p1"])
    n, o = p // a["O"], p % a["O"]
    elems = (n * a["sn"] + o * a["so"]).view(-1, 1) + torch.arange(a["HW"]) * a["si"]
    v = _times_alpha(mem, a, mem.at(a["g"], torch.float32)[elems], o.view(-1, 1))
    lo, hi = reference.group_min_max(v.T.contiguous(), "channel")   # one group per (n, o) pair
    mem.at(a["lo"], torch.float32)[p] = lo
    mem.at(a["hi"], torch.float32)[p] = hi
    if opts.get("sum_squares"):
        mem.at(a["ss"], torch.float64)[p] = reference.pair_sum_squares(v.unsqueeze(0))[0]


def _row_col_minmax(mem: Memory, a: dict, opts: dict) -> None:
    r0, r1, o = a["r0"], a["r1"], a["O"]
    v = _times_alpha(mem, a, mem.rows(a["g"], a["ld"], r1, o, torch.float32)[r0:], torch.arange(o))
    for kind, lo_name, hi_name in (("sample", "rlo", "rhi"), ("channel", "clo", "chi")):
        lo, hi = reference.group_min_max(v, kind)
        if kind == "sample":
            mem.at(a[lo_name], torch.float32)[r0:r1] = lo
            mem.at(a[hi_name], torch.float32)[r0:r1] = hi
        else:   # this slice's partial minima and maxima
            mem.at(a[lo_name], torch.float32, o)[:] = lo
            mem.at(a[hi_name], torch.float32, o)[:] = hi


def _codes(mem: Memory, a: dict, v, ctr, group, bits: int):
    """Stochastic rounding codes of ``v`` at counters ``ctr`` in groups ``group``
    (``reference.rounded_codes`` with the stream's uniforms)."""
    u = rng.uniform_of_key(a["key"], int(ctr.max()) + 1 if ctr.numel() else 0)[ctr]
    z = mem.at(a["zero"], torch.float32)[group]
    s = mem.at(a["scale"], torch.float32)[group]
    return reference.rounded_codes(v, z, s, bits, u).to(torch.int64)


def _store_planes(mem: Memory, a: dict, codes, valid, out_rows, bits: int) -> None:
    """Bit ``t`` of ``codes [rows, k]`` (``valid`` lanes only) to plane ``t`` of ``out``."""
    planes = mem.at(a["out"], torch.int64).view(-1)
    for t in range(bits):
        words = _packed(((codes >> t) & 1).bool() & valid, a["ld"])
        planes[(t * a["rows"] + out_rows).view(-1, 1) * a["ld"] + torch.arange(a["ld"])] = words


def _quantize_pack(mem: Memory, a: dict, opts: dict) -> None:
    bits = opts["bits"]
    m = torch.arange(a["m0"], a["m1"]).view(-1, 1, 1)
    s = torch.arange(a["nseg"]).view(1, -1, 1)
    j = torch.arange(a["seg_len"]).view(1, 1, -1)
    table = {nm: mem.at(a[nm], torch.int64)[m] for nm in ("row_off", "row_ctr", "row_group", "row_ch")}
    v = mem.at(a["g"], torch.float32)[table["row_off"] + s * a["seg_stride"] + j * a["elem_stride"]]
    v = _times_alpha(mem, a, v, table["row_ch"] + j * a["ch_step"])
    ctr = table["row_ctr"] + s * a["seg_ctr"] + j * a["elem_ctr"]
    codes = _codes(mem, a, v, ctr, table["row_group"] + s * a["seg_group"], bits)
    codes = codes.reshape(m.shape[0], -1)
    _store_planes(mem, a, codes, torch.ones_like(codes, dtype=torch.bool), m.view(-1), bits)


def _quantize_pack_rows(mem: Memory, a: dict, opts: dict) -> None:
    bits, hw, channels = opts["bits"], a["HW"], a["O"]
    per_sample = -(-hw // 64)
    tiles = torch.arange(a["t0"], a["t1"])
    ks = tiles // per_sample
    i = ((tiles % per_sample) * 64).view(-1, 1) + torch.arange(64)      # [tiles, 64] rows
    valid = i < hw
    i = torch.where(valid, i, 0)
    n = mem.at(a["samples"], torch.int64)[ks].view(-1, 1)
    group = mem.at(a["groups"], torch.int64)[ks].view(-1, 1, 1)
    o = torch.arange(channels).view(1, 1, -1)
    v = mem.at(a["g"], torch.float32)[(n * a["sn"] + i * a["si"]).unsqueeze(-1) + o * a["so"]]
    v = _times_alpha(mem, a, v, o)
    codes = _codes(mem, a, v, ((n * hw + i).unsqueeze(-1)) * channels + o, group, bits)
    out_rows = (ks.view(-1, 1) * hw + i)[valid]
    _store_planes(mem, a, codes[valid], torch.ones(out_rows.numel(), channels, dtype=torch.bool), out_rows, bits)


def _quantize_pack_cols(mem: Memory, a: dict, opts: dict) -> None:
    bits, kept, rows = opts["bits"], a["rows"], a["R"]
    r = torch.arange(64 * a["t0"], min(64 * a["t1"], rows)).view(-1, 1)
    m = torch.arange(kept)
    ch = mem.at(a["channels"], torch.int64)[:kept]
    v = _times_alpha(mem, a, mem.at(a["g"], torch.float32)[r * a["ld"] + ch], m)   # alpha per output row
    codes = _codes(mem, a, v, r * a["O"] + ch, m, bits).T                          # [kept, tile rows]
    last = a["t1"] == -(-rows // 64)
    words = range(a["t0"], a["ldw"] if last else a["t1"])
    planes = mem.at(a["out"], torch.int64).view(-1)
    for t in range(bits):
        packed = _packed(((codes >> t) & 1).bool(), len(words))
        planes[(t * kept + m).view(-1, 1) * a["ldw"] + torch.tensor(list(words))] = packed


def _aq_groups(mem: Memory, a: dict, opts: dict) -> None:
    """The AQ keep decisions (when ``decide``) and the per-group scales: ``aq_scores`` or the
    given float64 scores, ``aq_probabilities``, the keep draws of the stream ``key``, then the
    rounding scale of ``stochastic_codes`` and ``dequantization``'s scale and zero point.
    Special (non-finite) statistics leave everything but the status (in the scratch) as it was."""
    n, bits = a["n"], a["bits"]
    lo, hi = mem.at(a["lo"], torch.float32, n).clone(), mem.at(a["hi"], torch.float32, n).clone()
    prob_out, keep_out = mem.at(a["prob"], torch.float32, n), mem.at(a["keep"], torch.bool, n)
    if a["decide"]:
        scores = (mem.at(a["scores"], torch.float64, n).clone() if a["scores"] is not None
                  else reference.aq_scores(lo, hi).double())
        if not (torch.isfinite(lo).all() and torch.isfinite(hi).all() and torch.isfinite(scores).all()):
            return
        prob_out[:] = reference.aq_probabilities(scores, bits)
        keep_out[:] = rng.bernoulli(rng.draws_u64(a["key"], 0, n), prob_out)
    keep, prob = keep_out.clone(), prob_out.clone()
    mem.at(a["sr_scale"], torch.float32, n)[:] = reference.rounding_scale(lo, hi, bits)
    scale, zero = reference.dequantization(lo, hi, keep, prob, bits)
    mem.at(a["scale"], torch.float32, n)[:] = scale
    mem.at(a["zero"], torch.float32, n)[:] = zero


def _dropout_elements(a: dict) -> tuple[int, int]:
    """The call's elements ``[8*b0, min(8*b1, n))`` (empty when past ``n``)."""
    e0 = 8 * a["b0"]
    return e0, max(e0, min(8 * a["b1"], a["n"]))


def _times_factor(mem: Memory, a: dict, src: str, dst: str, keep: torch.Tensor, e0: int, e1: int) -> None:
    factor = torch.where(keep, torch.tensor(a["scale"], dtype=torch.float32), torch.tensor(0.0))
    mem.at(a[dst], torch.float32, a["n"])[e0:e1] = mem.at(a[src], torch.float32, a["n"])[e0:e1] * factor


def _dropout_forward(mem: Memory, a: dict, opts: dict) -> None:
    e0, e1 = _dropout_elements(a)
    if e1 == e0:
        return
    draws = rng.draws_u64(a["key"], e0, e1 - e0)
    keep = torch.from_numpy((draws >> np.uint64(64 - rng.KEEP_BITS)) < np.uint64(a["keep_below"]))
    _times_factor(mem, a, "x", "y", keep, e0, e1)
    bits = dropout.keep_bits(keep)
    mem.at(a["bits"], torch.uint8)[e0 // 8:e0 // 8 + bits.numel()] = bits


def _dropout_backward(mem: Memory, a: dict, opts: dict) -> None:
    e0, e1 = _dropout_elements(a)
    if e1 == e0:
        return
    bits = mem.at(a["bits"], torch.uint8)[e0 // 8:(e1 + 7) // 8]
    _times_factor(mem, a, "dy", "dx", dropout.unpacked_keep(bits.clone(), e1 - e0), e0, e1)


CHECKS = {"binary": _binary, "bitplane": _bitplane, "rowpop": _rowpop, "sign_pack": _sign_pack,
          "padded_rows": _padded_rows, "im2col_pack": _im2col_pack, "im2col_pack_t": _im2col_pack_t,
          "transpose_bits": _transpose_bits, "tap_gather": _tap_gather, "minmax": _minmax, "row_col_minmax": _row_col_minmax,
          "pack": _quantize_pack, "pack_rows": _quantize_pack_rows, "pack_cols": _quantize_pack_cols, "unpack": _unpack,
          "aq_groups": _aq_groups,
          "dropout_forward": _dropout_forward, "dropout_backward": _dropout_backward}


# Digests of what calls must write, by a digest of their inputs: targets whose kernels make
# the same calls (rpi4 and rpi5 share tiles and vector widths, every target shares most
# preprocessing calls) compute each reference once per process.
_expected: dict = {}


def _digest(data) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def check_call(spec, args: dict, before: dict, after: dict) -> int | None:
    """Buffers of one call of ``spec`` (a ``jit.KernelSpec``) that differ from the reference
    (0: all exact; fused regions: beyond float32 rounding); None when the family has no
    reference here."""
    family, opts = spec.family, dict(spec.options)
    if family in CLOSE_CHECKS:
        return CLOSE_CHECKS[family](family, opts, args, before, after)
    check = CHECKS.get(family)
    if check is None:
        return None
    key = _digest(repr((family, spec.options, sorted(args.items()))).encode()
                  + b"".join(_digest(before[b]) for b in sorted(before)))
    if key not in _expected:
        mem = Memory(before)
        check(mem, args, opts)
        scratch = {args[name][0] for name in SCRATCH.get(family, ()) if args.get(name) is not None}
        _expected[key] = {b: _digest(data) for b, data in mem.bytes.items() if b not in scratch}
    expected = _expected[key]
    return sum(_digest(after[b]) != digest for b, digest in expected.items())


# --------------------------------------------------------------------------- fused regions
# A region's statistics are double sums in a lane order of the kernel's own; the reference
# (``ops.fused_regions``: the unfused chain in ATen) agrees to float32 rounding, not bit for
# bit, so these families are compared with a tolerance (argmax bits, raw copies,
# activation mask bits and the output's packed sign and STE bits exactly). A
# row region (LayerNorm over ``W`` features of ``C`` rows) has per-feature gamma/beta and
# per-block partial sums ``dgamma``/``dbeta`` (``fusion.ROW_BLOCK`` rows each).

def _region_tensors(mem: Memory, a: dict, names, dtypes=None, region=None):
    from ..codegen.fusion import ROW_BLOCK
    n, c, h, w, oh, ow = (a[k] for k in ("N", "C", "H", "W", "OH", "OW"))
    shapes = {"x": (n, c, h, w), "dx": (n, c, h, w), "raw": (n, c, h, w), "res": (n, c, h, w),
              "dres": (n, c, h, w), "out": (n, c, oh, ow), "dy": (n, c, oh, ow), "mask": (n, c, (h * w + 7) // 8)}
    if region is not None and region.axis == "row":
        blocks = (-(-c // ROW_BLOCK), w)
        shapes.update(gamma=(w,), beta=(w,), dgamma=blocks, dbeta=blocks)
    dtypes = dtypes or {}
    return [mem.at(a[name], dtypes.get(name, torch.float32), int(torch.Size(shapes.get(name, (c,))).numel()))
            .view(shapes.get(name, (c,))) for name in names]


def _row_reference(region, gamma, beta=None):
    """``(forward(x) -> (out, mean, invstd), backward(dy, x, mean, invstd) -> (dx, dgamma[,
    dbeta]))``: the row region's reference, LayerNorm's or (not ``centered``) RMSNorm's, whose
    mean is 0 and which has no beta."""
    from ..ops.fused_regions import _ln_region, _ln_region_backward, _rms_region, _rms_region_backward
    act = (region.eps, region.activation.name, list(region.activation.params), "")
    if region.centered:
        return (lambda x: _ln_region(x, gamma, beta, *act)[:3],
                lambda dy, x, mean, invstd: _ln_region_backward(dy, x, gamma, beta, mean, invstd, *act))

    def forward(x):
        out, invstd = _rms_region(x, gamma, *act)[:2]
        return out, torch.zeros_like(invstd), invstd
    return forward, lambda dy, x, mean, invstd: _rms_region_backward(dy, x, gamma, invstd, *act)


def check_row_region(family: str, region, a: dict, mem_b: Memory, mem_a: Memory) -> int:
    """``check_region`` for a row region (LayerNorm, RMSNorm): rows ``c0..c1`` (whole blocks)."""
    from ..codegen.fusion import ROW_BLOCK
    rows = slice(a["c0"], a["c1"])
    x, gamma, *beta = _region_tensors(mem_b, a, ("x", "gamma", "beta")[:3 if region.centered else 2], region=region)
    x = x.view(a["C"], a["W"])[rows]
    forward, backward = _row_reference(region, gamma, *beta)
    out, mean, invstd = forward(x)
    if family == "region_forward":
        got = _region_tensors(mem_a, a, ("out", "mean", "invstd"), region=region)
        return (sum(_differs(g.reshape(-1, *w.shape[1:])[rows], w, (0, len(w)), 0)
                    for g, w in zip(got, (out, mean, invstd)))
                + _packed_rows_wrong(region, mem_a, a, got[0].view(a["C"], a["W"])[rows], a["c0"]))
    dy, = _region_tensors(mem_b, a, ("dy",), region=region)
    dy = dy.view(a["C"], a["W"])[rows]
    names = ("dx", "dgamma", "dbeta") if region.centered else ("dx", "dgamma")
    dx, *partials = _region_tensors(mem_a, a, names, region=region)
    wrong = _differs(dx.view(a["C"], a["W"])[rows], backward(dy, x, mean, invstd)[0], (0, a["c1"] - a["c0"]), 0)
    for block in range(a["c0"] // ROW_BLOCK, -(-a["c1"] // ROW_BLOCK)):
        part = slice(block * ROW_BLOCK - a["c0"], (block + 1) * ROW_BLOCK - a["c0"])
        _, *want = backward(dy[part], x[part], mean[part], invstd[part])
        wrong += sum(_differs(got[block], w, (0, a["W"]), 0) for got, w in zip(partials, want))
    return wrong


def _packed_rows_wrong(region, mem_a: Memory, a: dict, out: torch.Tensor, first: int) -> int:
    """With ``pack_signs``: how many of the sign and STE bit matrices a row kernel wrote for
    rows ``first..first + len(out)`` differ from the packer's bits (``pack_activation``,
    padding included) of the output rows ``out`` it wrote."""
    if not region.pack_signs:
        return 0
    end = first + out.shape[0]
    return sum(not torch.equal(mem_a.at(a[name], torch.int64, end * a["ld"]).view(end, a["ld"])[first:], want)
               for name, want in zip(("signs", "ste"), reference.pack_activation(out, "linear")))


def _region_expected(region, family, a, before: Memory):
    """The reference's view of one call: the saved input (float ``x``, or with ``raw_bits``
    the raw GEMM result: float in the forward, int in the backward), ``alpha`` (None without
    ``raw_bits``), the residual (None unless the call reads it), and what the forward writes
    (``arg`` packed, ``raw`` and ``mask`` None without)."""
    from ..ops.fused_regions import (_chain, _region_input, activation_mask, batch_statistics, offset_bits,
                                     pack_codes, window_offsets)
    raw_dtype = {16: torch.int16, 32: torch.int32}.get(region.raw_bits)
    saved = raw_dtype if raw_dtype and family == "region_backward" else torch.float32
    x, gamma, beta, mean, invstd = _region_tensors(before, a, ("x", "gamma", "beta", "mean", "invstd"),
                                                   {"x": saved})
    alpha = _region_tensors(before, a, ("alpha",))[0] if raw_dtype else None
    reads_res = region.backward_reads_residual if family == "region_backward" else region.residual
    res = _region_tensors(before, a, ("res",))[0] if reads_res else None
    inp = _region_input(x, alpha)
    ceil_mode = bool(region.pool) and a["OH"] != reference.conv_output_size(a["H"], region.pool[0], region.pool[2],
                                                                            region.pool[4], 1)
    pool = list(region.pool or ())
    if region.batch_stats:
        mean, _, invstd = batch_statistics(inp, region.eps)
    out, indices, v = _chain(inp, gamma, beta, mean, invstd, region.batch_stats, region.eps,
                             region.activation.name, list(region.activation.params), pool, region.pool_mode,
                             ceil_mode, res)
    arg = pack_codes(window_offsets(indices, a["W"], pool), offset_bits(pool)) if indices is not None else None
    raw = x.to(raw_dtype) if raw_dtype else None
    mask = None
    if region.mask_bits and family == "region_forward":
        mask = activation_mask(region.activation.name, list(region.activation.params), v, True)
    return x, res, gamma, beta, mean, invstd, alpha, out, arg, raw, mask, pool, ceil_mode


def _differs(got, want, channels, dim=1) -> bool:
    got, want = (t.narrow(dim, channels[0], channels[1] - channels[0]) for t in (got, want))
    scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
    return not torch.allclose(got, want, rtol=1e-4, atol=1e-4 * scale)


def _unequal(got, want, channels) -> bool:
    return not torch.equal(*(t.narrow(1, channels[0], channels[1] - channels[0]) for t in (got, want)))


def check_region(family: str, opts: dict, args: dict, before: dict, after: dict) -> int:
    """Buffers of one fused-region call that differ from the reference beyond float32
    rounding (channels ``c0..c1``, the ones the call owns; argmax bits and raw exactly)."""
    from ..ops.fused_regions import _bn_region_backward
    region, a = opts["region"], args
    mem_b, mem_a = Memory(before), Memory(after)
    if region.axis == "row":
        return check_row_region(family, region, a, mem_b, mem_a)
    channels = (a["c0"], a["c1"])
    x, res, gamma, beta, mean, invstd, alpha, out, arg, raw, mask, pool, ceil_mode = _region_expected(
        region, family, a, mem_b)
    if family == "region_forward":
        wrong = _differs(_region_tensors(mem_a, a, ("out",))[0], out, channels)
        if arg is not None:
            wrong += _unequal(mem_a.at(a["arg"], torch.uint8, arg.numel()).view(arg.shape), arg, channels)
        if raw is not None:
            wrong += _unequal(_region_tensors(mem_a, a, ("raw",), {"raw": raw.dtype})[0], raw, channels)
        if mask is not None:
            wrong += _unequal(_region_tensors(mem_a, a, ("mask",), {"mask": torch.uint8})[0], mask, channels)
        if region.batch_stats:
            wrong += sum(_differs(_region_tensors(mem_a, a, (name,))[0], want, channels, 0)
                         for name, want in (("mean", mean), ("invstd", invstd)))
        if region.pack_signs:   # the bits of the output it wrote, exactly as the packer gives them
            got_out = _region_tensors(mem_a, a, ("out",))[0]
            for name, want in zip(("signs", "ste"), reference.pack_activation(got_out, "conv2d")):
                got = mem_a.at(a[name], torch.int64, want.numel()).view(want.shape)
                wrong += _unequal(*(reference.unpack_activation(t, got_out.shape, "conv2d") for t in (got, want)),
                                  channels)
        return wrong
    dy, = _region_tensors(mem_b, a, ("dy",))
    arg = mem_b.at(a["arg"], torch.uint8, arg.numel()).view(arg.shape) if arg is not None else None
    # a residual region's backward reads the forward's mask bits, nothing ("none") or the residual
    mask = (_region_tensors(mem_b, a, ("mask",), {"mask": torch.uint8})[0] if region.mask_bits
            else torch.empty(0, dtype=torch.uint8) if region.residual and res is None else None)
    want = _bn_region_backward(dy, x, arg, gamma, beta, mean, invstd, region.batch_stats, region.eps,
                               region.activation.name, list(region.activation.params), pool, region.pool_mode,
                               ceil_mode, "", alpha, res, mask)
    names, dims = ("dx", "dgamma", "dbeta", "dres"), (1, 0, 0, 1)
    if not region.residual:
        names, dims = names[:3], dims[:3]
    got = _region_tensors(mem_a, a, names)
    return sum(_differs(g, w, channels, dim) for g, w, dim in zip(got, want, dims))


def check_linear_region(family: str, opts: dict, args: dict, before: dict, after: dict) -> int:
    """Buffers of one linear-region call (rows ``r0..r1`` of ``[rows, D]``) that differ from
    the reference (``ops.fused_regions``' linear -> activation chain): the raw copy exactly,
    and so the output and the gradient ``g`` but after GELU and SiLU (their polynomials round
    differently from ATen's), which agree to float32 rounding, as ``dbias`` (the partial sums
    of the blocks the call owns, summed in another order than ATen's)."""
    region = opts["region"]
    if region.gated:
        return check_gated_linear_region(family, region, args, Memory(before), Memory(after))
    from ..codegen.fusion import ROW_BLOCK
    from ..ops.fused_regions import _linear_act_region, _linear_act_region_backward
    a = args
    mem_b, mem_a = Memory(before), Memory(after)
    r0, r1, d = a["r0"], a["r1"], a["D"]
    raw_dtype = {16: torch.int16, 32: torch.int32}[region.raw_bits]
    contraction = 1 if region.raw_bits == 16 else 1 << 15     # selects raw_dtype
    alpha = mem_b.at(a["alpha"], torch.float32, d)
    bias = mem_b.at(a["bias"], torch.float32, d) if region.bias else None
    act = (region.activation.name, list(region.activation.params), "")

    def rows(mem, name, dtype=torch.float32):
        return mem.at(a[name], dtype, r1 * d).view(r1, d)[r0:r1]

    def differs(got, want) -> bool:
        return not torch.equal(got, want) if _exact(region) else _differs(got, want, (0, d))
    if family == "linear_region_forward":
        out, raw = _linear_act_region(rows(mem_b, "y"), alpha, bias, contraction, *act)[:2]
        return (differs(rows(mem_a, "out"), out) + (not torch.equal(rows(mem_a, "raw", raw_dtype), raw))
                + _packed_rows_wrong(region, mem_a, a, rows(mem_a, "out"), r0))
    raw, dy = rows(mem_b, "raw", raw_dtype), rows(mem_b, "dy")
    g, _ = _linear_act_region_backward(dy, raw, alpha, bias, *act)
    wrong = differs(rows(mem_a, "g"), g)
    if region.bias:
        dbias = mem_a.at(a["dbias"], torch.float32, -(-r1 // ROW_BLOCK) * d).view(-1, d)
        for block in range(r0 // ROW_BLOCK, -(-r1 // ROW_BLOCK)):
            part = slice(block * ROW_BLOCK - r0, min(r1, (block + 1) * ROW_BLOCK) - r0)
            want = _linear_act_region_backward(dy[part], raw[part], alpha, bias, *act)[1]
            wrong += _differs(dbias[block], want, (0, d), 0)
    return wrong


def _exact(region) -> bool:
    """Whether a linear region computes ATen's float32 operations in ATen's order (no
    polynomial activation, no product with a second layer)."""
    return not region.gated and region.activation.name not in ("gelu", "gelu_tanh", "silu")


def check_gated_linear_region(family: str, region, a: dict, mem_b: Memory, mem_a: Memory) -> int:
    """``check_linear_region`` for a gated region (``act(v) * u``): both raw copies exactly,
    the output and both gradients to float32 rounding, the bias gradients per block."""
    from ..codegen.fusion import ROW_BLOCK
    from ..ops.fused_regions import _gated_linear_region, _gated_linear_region_backward
    r0, r1, d = a["r0"], a["r1"], a["D"]
    raw_dtype = {16: torch.int16, 32: torch.int32}[region.raw_bits]
    contraction = 1 if region.raw_bits == 16 else 1 << 15     # selects raw_dtype
    scales = [(mem_b.at(a["alpha" + s], torch.float32, d), mem_b.at(a["bias" + s], torch.float32, d)
               if region.bias else None) for s in ("", "_up")]
    (alpha, bias), (alpha_up, bias_up) = scales
    act = (region.activation.name, list(region.activation.params), "")

    def rows(mem, name, dtype=torch.float32):
        return mem.at(a[name], dtype, r1 * d).view(r1, d)[r0:r1]
    if family == "linear_region_forward":
        want = _gated_linear_region(rows(mem_b, "y"), alpha, bias, rows(mem_b, "y_up"), alpha_up, bias_up,
                                    contraction, *act)
        return (_differs(rows(mem_a, "out"), want[0], (0, d))
                + sum(not torch.equal(rows(mem_a, name, raw_dtype), w) for name, w in zip(("raw", "raw_up"), want[1:3]))
                + _packed_rows_wrong(region, mem_a, a, rows(mem_a, "out"), r0))
    dy, raw, raw_up = rows(mem_b, "dy"), rows(mem_b, "raw", raw_dtype), rows(mem_b, "raw_up", raw_dtype)
    g, _, g_up, _ = _gated_linear_region_backward(dy, raw, alpha, bias, raw_up, alpha_up, bias_up, *act)
    wrong = _differs(rows(mem_a, "g"), g, (0, d)) + _differs(rows(mem_a, "g_up"), g_up, (0, d))
    if region.bias:
        for block in range(r0 // ROW_BLOCK, -(-r1 // ROW_BLOCK)):
            part = slice(block * ROW_BLOCK - r0, min(r1, (block + 1) * ROW_BLOCK) - r0)
            want = _gated_linear_region_backward(dy[part], raw[part], alpha, bias, raw_up[part], alpha_up, bias_up,
                                                 *act)
            for name, w in (("dbias", want[1]), ("dbias_up", want[3])):
                got = mem_a.at(a[name], torch.float32, -(-r1 // ROW_BLOCK) * d).view(-1, d)[block]
                wrong += _differs(got, w, (0, d), 0)
    return wrong


CLOSE_CHECKS = {"region_forward": check_region, "region_backward": check_region,
                "linear_region_forward": check_linear_region, "linear_region_backward": check_linear_region}
