"""LLVM IR for fused regions: the float work after a layer's GEMM as one loop nest.

A ``Region`` is a small program over an NCHW tensor, rooted at a normalization:

    x -> normalize (batch statistics or given mean/invstd) -> affine (gamma, beta)
      -> optional residual add -> pointwise activation (``ACTIVATIONS``, an op table)
      -> optional pool (``POOL_MODES``: max, average, the mean of the plane)

The normalization axis is the region's ``axis``: ``"channel"`` (BatchNorm: statistics of
each channel over N, H, W, the affine per channel) or ``"row"`` (LayerNorm: statistics of
each row of the last dimension, the affine per feature; not ``centered``: RMSNorm, the
mean square and ``gamma`` alone). A row region runs as the NCHW region of a ``[1, rows, 1,
D]`` tensor (a row is a channel of one sample and one image row), so both share the
statistics, the loops and the ABI.

``region_forward_ir`` lowers it to one kernel that owns a range of channels (threads split
channels; every statistic is per channel, so no atomics and a thread-count-independent
summation order): for each channel, at most one reduction pass (sum and sum of squares in
double) and one apply pass that writes the region's output and, with a max pool, the argmax
of each window as its offset ``i * kw + j``, packed in ``offset_bits`` bits (2 for 2x2, 4 for
3x3; each channel plane starts on a byte), and with ``Region.pack_signs`` the sign and STE bits
of each output plane right after writing it, the next binarized conv's operands
(``_pack_plane``; a row region, and a linear region, writes each row's bits from the
registers it stores the row from, ``_store_row_flags``: the next binarized linear layers'
operands). ``region_backward_ir`` is the mirror image: pool
backward (a max pool scatters by the saved offsets, an average pool spreads each output's
gradient over its window), the activation's mask recomputed from the saved input (after a
residual add: read from the bits the forward wrote, ``Region.mask_bits``, or for GELU
recomputed with the residual), one reduction pass (``sum g``, ``sum g * xhat``; with a
residual it also writes ``g``, the residual's gradient) and one apply pass (the
normalization's input gradient). With ``Region.raw_bits`` the region's input is ``alpha ⊙ Y_raw`` of a binarized conv: the forward
first stores ``Y_raw`` as int16 (or int32) and every pass of both kernels recomputes ``alpha *
Y_raw`` from it in registers, so the backward keeps two bytes per input instead of a float32
copy, and returns ``alpha ⊙ dx``. Sizes are run-time
arguments: one kernel per region, not per shape. Each pass steps over a ``(n, c)`` plane
``LANES`` floats at a time with a scalar tail (``_strided``); a window pool reads its
inputs by window, one output at a time, except for the 2x2 stride-2 max pool, which has
vector paths both ways (``_pool2x2_forward``, ``_pool2x2_backward``). The math is docs/math.md (BatchNorm, the
pooled masks, LayerNorm: §4b).

A ``LinearRegion`` is the normalization-free row case: a binarized linear layer's raw GEMM
result times alpha plus the bias, then an activation, row by row, and when ``gated`` times a
second layer's output (SwiGLU) (``linear_region_forward_ir``, ``linear_region_backward_ir``;
see the section below).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from llvmlite import ir

from ..ops.fused_regions import offset_bits
from .abi import KernelIR
from .builder import F32, I8, I32, I64, Kernel, erf, exp, new_module, smin, tanh, vec, vsuffix
from .targets import Target, get_target

F64 = ir.DoubleType()
LANES = 8
# A row region's backward adds the column sums dgamma, dbeta of each block of ROW_BLOCK rows
# into its own row of partial sums; threads own whole blocks, so the sums (the blocks are
# added up afterwards, in order) do not depend on the thread count.
ROW_BLOCK = 64


@dataclass(frozen=True)
class Activation:
    """A pointwise op of the ``ACTIVATIONS`` table with its compile-time constants
    (Hardtanh: ``(min, max)``; LeakyReLU: ``(slope,)``)."""

    name: str
    params: tuple = ()


def _c(lanes: int, value: float, ty=F32):
    return ir.Constant(ty, value) if lanes == 1 else ir.Constant(vec(lanes, ty), [value] * lanes)


def _relu(b, v, p, lanes):
    # v < 0 ? 0 : v keeps NaN and -0.0 as ATen's clamp_min does.
    return b.select(b.fcmp_ordered("<", v, _c(lanes, 0.0)), _c(lanes, 0.0), v)


def _hardtanh(b, v, p, lanes):
    v = b.select(b.fcmp_ordered("<", v, _c(lanes, p[0])), _c(lanes, p[0]), v)
    return b.select(b.fcmp_ordered(">", v, _c(lanes, p[1])), _c(lanes, p[1]), v)


def _zero_else(b, m, g, p, n):
    return b.select(m, g, _c(n, 0.0))


# Activations whose derivative takes two values: name -> (the bit of the pre-activation ``v``
# that selects it, as ATen's ``*_backward`` ops decide: threshold_backward zeroes ``v <= 0``,
# so a NaN passes; hardtanh_backward zeroes ``v <= lo`` and ``v >= hi``; leaky_relu_backward
# passes ``v > 0``, else scales by the slope; the gradient given that bit). A region with a
# residual add saves this bit (``Region.mask_bits``) instead of the residual.
MASKS = {
    "relu": (lambda b, v, p, n: b.fcmp_unordered(">", v, _c(n, 0.0)), _zero_else),
    "hardtanh": (lambda b, v, p, n: b.and_(b.fcmp_ordered(">", v, _c(n, p[0])),
                                           b.fcmp_ordered("<", v, _c(n, p[1]))), _zero_else),
    "leaky_relu": (lambda b, v, p, n: b.fcmp_ordered(">", v, _c(n, 0.0)),
                   lambda b, m, g, p, n: b.select(m, g, b.fmul(g, _c(n, p[0])))),
}


def _masked_grad(name):
    bit, grad = MASKS[name]
    return lambda b, v, g, p, n: grad(b, bit(b, v, p, n), g, p, n)


# GELU as ATen's CPU kernels compute it (``GeluKernelImpl`` / ``GeluBackwardKernelImpl``).
_SQRT1_2, _INV_SQRT_2PI = 0.7071067811865476, 0.3989422804014327
_SQRT_2_PI, _KAPPA = 0.7978845608028654, 0.044715


def _gelu(b, v, p, n):
    # v/2 (1 + erf(v / sqrt 2))
    return b.fmul(b.fmul(v, _c(n, 0.5)), b.fadd(_c(n, 1.0), erf(b, b.fmul(v, _c(n, _SQRT1_2)))))


def _gelu_grad(b, v, g, p, n):
    # g (Phi(v) + v phi(v)); erf(v / sqrt 2) and phi(v) share e^{-v^2 / 2}
    e = exp(b, b.fmul(b.fmul(v, v), _c(n, -0.5)))
    cdf = b.fmul(_c(n, 0.5), b.fadd(_c(n, 1.0), erf(b, b.fmul(v, _c(n, _SQRT1_2)), e)))
    pdf = b.fmul(e, _c(n, _INV_SQRT_2PI))
    return b.fmul(g, b.fadd(cdf, b.fmul(v, pdf)))


def _gelu_tanh_inner(b, v, n):
    square = b.fmul(v, v)
    inner = b.fmul(_c(n, _SQRT_2_PI), b.fadd(v, b.fmul(_c(n, _KAPPA), b.fmul(square, v))))
    return square, tanh(b, inner)


def _gelu_tanh(b, v, p, n):
    # v/2 (1 + tanh(sqrt(2/pi) (v + 0.044715 v^3)))
    _, t = _gelu_tanh_inner(b, v, n)
    return b.fmul(b.fmul(_c(n, 0.5), v), b.fadd(_c(n, 1.0), t))


def _gelu_tanh_grad(b, v, g, p, n):
    square, t = _gelu_tanh_inner(b, v, n)
    left = b.fmul(_c(n, 0.5), b.fadd(_c(n, 1.0), t))
    inner_grad = b.fmul(_c(n, _SQRT_2_PI), b.fadd(_c(n, 1.0), b.fmul(_c(n, 3 * _KAPPA), square)))
    right = b.fmul(b.fmul(b.fmul(_c(n, 0.5), v), b.fsub(_c(n, 1.0), b.fmul(t, t))), inner_grad)
    return b.fmul(g, b.fadd(left, right))


def _silu(b, v, p, n):
    # v / (1 + e^{-v}), ATen's formula
    return b.fdiv(v, b.fadd(_c(n, 1.0), exp(b, b.fneg(v))))


def _silu_grad(b, v, g, p, n):
    # g s (1 + v (1 - s)) with s = 1 / (1 + e^{-v}), ATen's silu_backward
    s = b.fdiv(_c(n, 1.0), b.fadd(_c(n, 1.0), exp(b, b.fneg(v))))
    return b.fmul(b.fmul(g, s), b.fadd(_c(n, 1.0), b.fmul(v, b.fsub(_c(n, 1.0), s))))


# name -> (forward(b, v, params, lanes), backward(b, v, g, params, lanes)): IR on the
# pre-activation ``v``; the backward is ``g`` times the derivative as ATen's ``*_backward``
# ops pick it (``MASKS``). GELU's erf, exp and tanh and SiLU's exp are the polynomials of
# ``builder`` (no libm call).
ACTIVATIONS = {
    "none": (lambda b, v, p, n: v, lambda b, v, g, p, n: g),
    "relu": (_relu, _masked_grad("relu")),
    "hardtanh": (_hardtanh, _masked_grad("hardtanh")),
    "leaky_relu": (lambda b, v, p, n: b.select(b.fcmp_ordered(">", v, _c(n, 0.0)), v, b.fmul(v, _c(n, p[0]))),
                   _masked_grad("leaky_relu")),
    "gelu": (_gelu, _gelu_grad),
    "gelu_tanh": (_gelu_tanh, _gelu_tanh_grad),
    "silu": (_silu, _silu_grad),
}


def _act_forward(k: Kernel, act: Activation, v, lanes):
    return ACTIVATIONS[act.name][0](k.b, v, act.params, lanes)


def _act_grad(k: Kernel, act: Activation, v, g, lanes):
    return ACTIVATIONS[act.name][1](k.b, v, g, act.params, lanes)


# How a region pools after its activation: with a window ``pool``, "max" (argmax codes
# saved), "avg" (divisor: the window clipped to the padded input, count_include_pad) or
# "avg_valid" (the taps inside the input); without one, "mean" is the mean of each plane
# (adaptive average pooling to 1x1).
POOL_MODES = ("max", "avg", "avg_valid", "mean")


@dataclass(frozen=True)
class Region:
    """``batch_stats``: normalize with this batch's statistics (training BatchNorm) and
    write them; otherwise read ``mean``/``invstd`` (eval BatchNorm: a per-channel affine).
    ``pool``: ``(kh, kw, sh, sw, ph, pw)`` of a window pool after the activation, or None;
    ``pool_mode``: one of ``POOL_MODES`` ("mean" takes no ``pool``; "max" without a
    ``pool`` means no pooling). ``residual``: a tensor shaped like ``x`` (``res``) is added
    after the affine; the backward then needs the activation's derivative at that sum: for an
    activation of ``MASKS`` (``mask_bits``) the forward writes its bit per element to
    ``mask`` (``[N, C, ceil(H*W / 8)]`` bytes, each plane from its own byte, bit ``i % 8`` of
    byte ``i // 8``) and the backward reads those; "none" needs nothing; otherwise (GELU) the
    backward reads ``res`` and recomputes the sum. ``eps``: the normalization's epsilon, a
    double constant of the kernel as in ATen.
    ``raw_bits``: 0 when ``x`` is the float32 input; 16 or 32 when the input is
    ``alpha[c] * Y_raw`` of a binarized conv: the forward reads ``Y_raw`` (integers in
    float32) from ``x`` and writes them to ``raw`` as int16/int32, the backward reads that
    from its ``x`` and writes ``alpha ⊙ dx``, the gradient at ``Y_raw``.
    ``pack_signs``: the forward also writes the sign bits ``out > 0`` and the STE bits
    ``|out| < 1`` of its output to ``signs`` and ``ste`` (zeroed buffers), laid out
    as ``runtime.pack.pack_signs_and_ste(out.flatten(1))`` lays them out (one row of ``ld``
    words per sample, bit ``(c*OH + oh)*OW + ow``): the operands a binarized conv reading
    the output takes, so it needs no pass of its own over the float output. Threads must own
    whole groups of ``signs_channel_unit(OH*OW)`` channels (the bytes they write). A row
    region writes row ``c`` of ``signs``/``ste`` (``ld`` words each, bit ``w`` of the row),
    the layout of ``pack_signs_and_ste`` of its ``[rows, D]`` output: a binarized linear
    layer's operands.
    ``axis``: ``"channel"`` (BatchNorm) or ``"row"`` (LayerNorm over the last dimension,
    always with batch statistics, no pool, float input; called with ``N = H = 1``, ``C`` =
    rows, ``W`` = features, and ``dgamma``/``dbeta`` as ``[ceil(rows / ROW_BLOCK), W]`` zeroed
    partial sums). ``centered``: False for RMSNorm (a row region only): the statistic is the
    mean square of the row, ``invstd = 1/sqrt(mean(x^2) + eps)``, nothing is subtracted
    (``mean`` is written as 0 and never read), the affine is ``gamma`` alone (``beta`` and
    ``dbeta`` are not touched)."""

    batch_stats: bool
    activation: Activation = Activation("none")
    pool: tuple | None = None
    eps: float = 1e-5
    raw_bits: int = 0
    residual: bool = False
    pool_mode: str = "max"
    axis: str = "channel"
    pack_signs: bool = False
    centered: bool = True

    def __post_init__(self):
        if (self.pool_mode not in POOL_MODES or (self.pool is not None and self.pool_mode == "mean")
                or (self.pool is None and self.pool_mode.startswith("avg"))):
            raise ValueError(f"Region: pool_mode {self.pool_mode!r} with pool {self.pool}; "
                             f"modes {POOL_MODES}, 'mean' without a pool, the others with one")
        if self.axis not in ("channel", "row"):
            raise ValueError(f"Region axis {self.axis!r}: expected 'channel' or 'row'")
        if self.axis == "row" and (self.pool is not None or self.pool_mode != "max" or not self.batch_stats
                                   or self.raw_bits or self.residual):
            raise ValueError("a row region (LayerNorm) has its own statistics, a float input, "
                             "no residual and no pool")
        if not self.centered and self.axis != "row":
            raise ValueError("an uncentered region (RMSNorm) normalizes rows: axis 'row'")

    @property
    def mask_bits(self) -> bool:
        """Whether the forward writes, and the backward reads, the activation's mask bits."""
        return self.residual and self.activation.name in MASKS

    @property
    def backward_reads_residual(self) -> bool:
        """Whether the backward recomputes the activation's input with ``res`` (GELU)."""
        return self.residual and not self.mask_bits and self.activation.name != "none"


# The kernels' ABI (``abi.KernelABI``), written once: runtime, header and oracle derive from it.
FORWARD_SYMBOL = "fqt_region_forward"
FORWARD_PARAMS = (("x", "ptr"), ("res", "ptr"), ("out", "ptr"), ("arg", "ptr"), ("gamma", "ptr"), ("beta", "ptr"),
                  ("mean", "ptr"), ("var", "ptr"), ("invstd", "ptr"), ("alpha", "ptr"), ("raw", "ptr"),
                  ("mask", "ptr"), ("signs", "ptr"), ("ste", "ptr"), ("ld", "i64"), ("N", "i64"), ("C", "i64"),
                  ("H", "i64"), ("W", "i64"), ("OH", "i64"), ("OW", "i64"), ("c0", "i64"), ("c1", "i64"))
BACKWARD_SYMBOL = "fqt_region_backward"
BACKWARD_PARAMS = (("dy", "ptr"), ("x", "ptr"), ("res", "ptr"), ("arg", "ptr"), ("gamma", "ptr"),
                   ("beta", "ptr"), ("mean", "ptr"), ("invstd", "ptr"), ("alpha", "ptr"), ("mask", "ptr"),
                   ("dx", "ptr"), ("dres", "ptr"), ("dgamma", "ptr"), ("dbeta", "ptr"),
                   ("N", "i64"), ("C", "i64"), ("H", "i64"), ("W", "i64"), ("OH", "i64"), ("OW", "i64"),
                   ("c0", "i64"), ("c1", "i64"))


def signs_channel_unit(plane: int) -> int:
    """Channels whose ``plane`` output bits each fill whole bytes of a packed row: threads
    that own such groups never write the same byte of ``signs``/``ste``."""
    return 8 // math.gcd(plane, 8)


def _sign_flags(k: Kernel, value, lanes):
    """``(sign bits [value > 0], STE bits [|value| < 1])`` of ``lanes`` floats as ``i{lanes}``."""
    b = k.b
    magnitude = k.call(f"llvm.fabs.{vsuffix(value.type)}", value.type, [value])
    flags = (b.fcmp_ordered(">", value, _c(lanes, 0.0)), b.fcmp_ordered("<", magnitude, _c(lanes, 1.0)))
    return [f if lanes == 1 else b.bitcast(f, ir.IntType(lanes)) for f in flags]


def _pack_plane(k: Kernel, n, c) -> None:
    """The sign and STE bits of output plane ``(n, c)`` (just written, so read from cache) to
    row ``n`` of ``signs``/``ste`` from bit ``c*OH*OW`` on. When every plane starts on a word
    (``OH*OW`` a multiple of 64) or a byte (of 8), every 64, 32, 16 or 8 outputs (the widest
    that divides ``OH*OW``) make whole bytes of this plane's alone: stored. Otherwise each run of up to 8 bits is OR-ed into the
    byte or two it covers (bytes of this channel's group, so of this thread; the buffers
    start zeroed)."""
    a, b = k.arg, k.b
    ohw = b.mul(a["OH"], a["OW"])
    out_plane = b.mul(b.add(b.mul(n, a["C"]), c), ohw)
    first = b.mul(c, ohw)                                          # bit of output 0 in row n
    row_byte = b.shl(b.mul(n, a["ld"]), ir.Constant(I64, 3))

    def aligned(lanes):
        ty, step = ir.IntType(lanes), b.udiv(first, ir.Constant(I64, lanes))
        with k.loop(0, b.udiv(ohw, ir.Constant(I64, lanes))) as j:
            value = _load(k, a["out"], b.add(out_plane, b.mul(j, ir.Constant(I64, lanes))), lanes)
            slot = b.add(b.udiv(row_byte, ir.Constant(I64, lanes // 8)), b.add(step, j))
            for name, flags in zip(("signs", "ste"), _sign_flags(k, value, lanes)):
                b.store(flags, k.gep(a[name], slot, ty))

    def unaligned(o, lanes):
        bit = b.add(first, o)
        byte = b.add(row_byte, b.lshr(bit, ir.Constant(I64, 3)))
        at = b.and_(bit, ir.Constant(I64, 7))
        flags = _sign_flags(k, _load(k, a["out"], b.add(out_plane, o), lanes), lanes)

        def or_into(width):
            ty = ir.IntType(width)
            for name, run in zip(("signs", "ste"), flags):
                slot = k.gep(a[name], byte, I8)   # a byte address, whatever the width
                b.store(b.or_(b.load(slot, typ=ty, align=1), b.shl(b.zext(run, ty), b.trunc(at, ty))), slot,
                        align=1)
        if lanes == 1:
            or_into(8)
            return
        with b.if_else(b.icmp_unsigned("<=", b.add(at, ir.Constant(I64, lanes)), ir.Constant(I64, 8))) as (one, two):
            with one:
                or_into(8)
            with two:
                or_into(16)

    # the widest whole run a plane of OH*OW outputs is made of (a 4x4 plane: one i16 a plane)
    choices = [(lanes, b.icmp_unsigned("==", b.and_(ohw, ir.Constant(I64, lanes - 1)), ir.Constant(I64, 0)))
               for lanes in (64, 32, 16, 8)]

    def pick(choices):
        if not choices:
            _strided(k, ohw, unaligned)
            return
        (lanes, fits), *rest = choices
        with b.if_else(fits) as (yes, no):
            with yes:
                aligned(lanes)
            with no:
                pick(rest)
    pick(choices)


def _store_row_flags(k: Kernel, value, row, i, lanes) -> None:
    """The sign and STE bits of the ``lanes`` outputs ``value`` at features ``i..i+lanes`` of
    row ``row`` (``ld`` words a row of ``signs``/``ste``), from the registers the output is
    stored from: a vector step (``i`` a multiple of ``lanes``, 8 or 16) stores whole bytes,
    the scalar tail ORs its bit into its byte (after the vector steps' bytes; the buffers
    start zeroed). Threads own whole rows, so whole words."""
    a, b = k.arg, k.b
    byte = b.add(b.shl(b.mul(row, a["ld"]), ir.Constant(I64, 3)), b.lshr(i, ir.Constant(I64, 3)))
    for name, flags in zip(("signs", "ste"), _sign_flags(k, value, lanes)):
        slot = k.gep(a[name], byte, I8)
        if lanes == 1:
            at = b.trunc(b.and_(i, ir.Constant(I64, 7)), I8)
            b.store(b.or_(b.load(slot, typ=I8), b.shl(b.zext(flags, I8), at)), slot)
        else:
            b.store(flags, slot, align=1)


def _load(k: Kernel, base, index, lanes):
    ptr = k.gep(base, index)
    return k.b.load(ptr, typ=F32 if lanes == 1 else vec(lanes, F32), align=4)


def _store(k: Kernel, value, base, index):
    k.b.store(value, k.gep(base, index), align=4)


def _add_to(k: Kernel, base, index, value, lanes):
    _store(k, k.b.fadd(_load(k, base, index, lanes), value), base, index)


def _splat(k: Kernel, value, lanes):
    return value if lanes == 1 else k.splat(value, lanes)


def _lanes(ty, lanes):
    return ty if lanes == 1 else vec(lanes, ty)


def _input(k: Kernel, region: Region, base, c):
    """``load(index, lanes)``: the region's float input at ``index`` of channel ``c``, read
    from ``base``: float32, or ``alpha[c] * Y_raw`` from int ``raw_bits`` (the product
    ``binarized_conv2d`` rounds, so the same float)."""
    if not region.raw_bits:
        return lambda index, lanes: _load(k, base, index, lanes)
    b, ity = k.b, ir.IntType(region.raw_bits)
    alpha = b.load(k.gep(k.arg["alpha"], c), typ=F32)

    def load(index, lanes):
        raw = b.load(k.gep(base, index, ity), typ=_lanes(ity, lanes), align=region.raw_bits // 8)
        return b.fmul(b.sitofp(raw, _lanes(F32, lanes)), _splat(k, alpha, lanes))
    return load


def _store_raw(k: Kernel, region: Region, c, hw) -> None:
    """``raw[n, c] = int(x[n, c])`` for every sample: exact, ``|Y_raw| <= K`` fits."""
    a, b, ity = k.arg, k.b, ir.IntType(region.raw_bits)
    with k.loop(0, a["N"]) as n:
        plane = b.mul(b.add(b.mul(n, a["C"]), c), hw)

        def convert(i, lanes):
            index = b.add(plane, i)
            raw = b.fptosi(_load(k, a["x"], index, lanes), _lanes(ity, lanes))
            b.store(raw, k.gep(a["raw"], index, ity), align=region.raw_bits // 8)
        _strided(k, hw, convert)


def _affine(k: Kernel, region: Region, c, mean, invstd):
    """``(affine, scale)``: ``affine(x, i, lanes)`` is the normalized, scaled and shifted
    ``x`` at position ``i`` of channel ``c``'s plane, as ATen computes it, so that at an ``x``
    equal to the mean the sign of the result (what the next binarized layer keeps) is the
    reference's; ``scale`` is the per-channel factor of the backward's apply pass. BatchNorm:
    ``x * scale + shift`` with one rounding (ATen's vectorized ``fmadd``), ``scale = invstd *
    gamma[c]`` (``_scale_shift``); LayerNorm: ``(x * invstd + (-mean * invstd)) * gamma[i] +
    beta[i]``, ``scale = invstd`` (the backward multiplies ``gamma[i]`` into ``g``); RMSNorm:
    ``gamma[i] * (x * invstd)``, as ``transformers``' ``LlamaRMSNorm`` and ATen's ``rms_norm``
    compute it."""
    a, b = k.arg, k.b
    if not region.centered:
        return lambda x, i, lanes: b.fmul(b.fmul(x, _splat(k, invstd, lanes)), _load(k, a["gamma"], i, lanes)), invstd
    if region.axis == "row":
        shift = b.fneg(b.fmul(mean, invstd))

        def row(x, i, lanes):
            v = b.fadd(b.fmul(x, _splat(k, invstd, lanes)), _splat(k, shift, lanes))
            return b.fadd(b.fmul(v, _load(k, a["gamma"], i, lanes)), _load(k, a["beta"], i, lanes))
        return row, invstd
    scale, shift = _scale_shift(k, c, mean, invstd)

    def channel(x, i, lanes):
        ty = x.type
        return k.call(f"llvm.fma.{vsuffix(ty)}", ty, [x, _splat(k, scale, lanes), _splat(k, shift, lanes)])
    return channel, scale


def _scale_shift(k: Kernel, c, mean, invstd):
    """Channel ``c``'s ``scale = invstd * gamma`` and ``shift = beta - mean * scale``, the
    two terms ATen's BatchNorm applies ``x * scale + shift`` with; its build contracts the
    shift into one fused multiply-add, so this one does too (a separately rounded
    ``mean * scale`` flips the sign of the result at some ``x`` equal to the mean)."""
    a, b = k.arg, k.b
    scale = b.fmul(invstd, b.load(k.gep(a["gamma"], c), typ=F32))
    beta = b.load(k.gep(a["beta"], c), typ=F32)
    return scale, k.call("llvm.fma.f32", F32, [b.fneg(mean), scale, beta])


def _strided(k: Kernel, count, body, lanes: int = LANES) -> None:
    """``body(i, lanes)`` over ``[0, count)``: ``lanes``-wide steps (a power of two), then a
    scalar tail."""
    b = k.b
    main = b.and_(count, ir.Constant(I64, -lanes))
    with k.loop(0, main, lanes) as i:
        body(i, lanes)
    with k.loop(main, count) as i:
        body(i, 1)


def _accumulate(k: Kernel, acc, value, lanes):
    """``acc[lanes] += fpext(value)`` where ``acc`` is a dict ``{lanes: var}`` of doubles."""
    b = k.b
    ty = F64 if lanes == 1 else vec(lanes, F64)
    k.set(acc[lanes], b.fadd(k.get(acc[lanes], ty), b.fpext(value, ty)))


def _accumulator(k: Kernel) -> dict:
    return {LANES: k.var(vec(LANES, F64), ir.Constant(vec(LANES, F64), [0.0] * LANES)),
            1: k.var(F64, ir.Constant(F64, 0.0))}


def _channel_sum(k: Kernel, c, hw, load, term):
    """``sum over n, i of term(input[n, c, i])`` in double (``load`` as ``_input`` returns it,
    ``term`` maps float lanes to float)."""
    a, b = k.arg, k.b
    acc = _accumulator(k)
    with k.loop(0, a["N"]) as n:
        plane = b.mul(b.add(b.mul(n, a["C"]), c), hw)
        _strided(k, hw, lambda i, lanes: _accumulate(k, acc, term(load(b.add(plane, i), lanes), lanes),
                                                     lanes))
    return _total(k, acc)


def _total(k: Kernel, acc: dict):
    b = k.b
    v = k.get(acc[LANES], vec(LANES, F64))
    s = k.get(acc[1], F64)
    for lane in range(LANES):
        s = b.fadd(s, b.extract_element(v, ir.Constant(I64, lane)))
    return s


def _kernel(target, symbol, params):
    """The kernel with its ABI, and the plane sizes ``H*W``, ``OH*OW``."""
    k = Kernel(new_module(get_target(target), symbol), symbol, params)
    return k, k.b.mul(k.arg["H"], k.arg["W"]), k.b.mul(k.arg["OH"], k.arg["OW"])


def _window(region: Region, k: Kernel, oh, ow, i, j):
    """Input row/column of window tap ``(i, j)`` of output ``(oh, ow)``, and whether it is in
    range (padded taps are never the max, as in ATen)."""
    b, a = k.b, k.arg
    _, _, sh, sw, ph, pw = region.pool
    h = b.add(b.mul(oh, ir.Constant(I64, sh)), ir.Constant(I64, i - ph))
    w = b.add(b.mul(ow, ir.Constant(I64, sw)), ir.Constant(I64, j - pw))
    inside = b.and_(b.and_(b.icmp_signed(">=", h, ir.Constant(I64, 0)), b.icmp_signed("<", h, a["H"])),
                    b.and_(b.icmp_signed(">=", w, ir.Constant(I64, 0)), b.icmp_signed("<", w, a["W"])))
    return h, w, inside


def region_forward_ir(target: str | Target, region: Region) -> KernelIR:
    """``fqt_region_forward``: channels ``c0..c1`` of NCHW-contiguous float32 ``x`` ->
    ``out`` (``[N, C, OH, OW]``; ``OH, OW = H, W`` without a pool, ``1, 1`` for "mean") and
    ``arg`` (window offsets packed per channel plane, max pool only); ``res`` (like ``x``) is
    read with ``residual``, and with ``mask_bits`` the activation's mask bits go to ``mask``.
    With ``batch_stats`` it writes ``mean``, the biased ``var`` and ``invstd = 1/sqrt(var +
    eps)`` per channel, else reads
    ``mean``/``invstd``. With ``raw_bits`` it also writes ``raw``, with ``pack_signs`` the
    output's sign and STE bits (see ``Region``)."""
    k, hw, ohw = _kernel(target, FORWARD_SYMBOL, FORWARD_PARAMS)
    a, b = k.arg, k.b
    with k.loop(a["c0"], a["c1"]) as c:
        if region.raw_bits:
            _store_raw(k, region, c, hw)
        load = _input(k, region, a["raw"] if region.raw_bits else a["x"], c)
        if region.batch_stats:
            # ATen's order of operations (its contiguous-input path), so that an x equal to
            # the mean gives the same (sign of a) zero: the mean in double rounded to float;
            # the sum of the float squares (x - mean)^2 in double, rounded to float and
            # divided by the count in float; invstd = 1/sqrt(var + eps) in double. A var
            # kept in double gives an invstd one float ulp off ATen's for some inputs, and
            # then the rounding residual at x == mean can take the other sign.
            # RMSNorm: the same sum of squares about 0, the mean square that ``pow(2).mean()``
            # gives (x - 0 is x).
            count = b.mul(a["N"], hw)
            mean = (b.fptrunc(b.fdiv(_channel_sum(k, c, hw, load, lambda v, lanes: v), b.sitofp(count, F64)), F32)
                    if region.centered else ir.Constant(F32, 0.0))

            def square(v, lanes):
                d = b.fsub(v, _splat(k, mean, lanes))
                return b.fmul(d, d)
            var = b.fdiv(b.fptrunc(_channel_sum(k, c, hw, load, square), F32), b.sitofp(count, F32))
            root = k.call("llvm.sqrt.f64", F64, [b.fadd(b.fpext(var, F64), ir.Constant(F64, region.eps))])
            invstd = b.fptrunc(b.fdiv(ir.Constant(F64, 1.0), root), F32)
            b.store(mean, k.gep(a["mean"], c))
            b.store(var, k.gep(a["var"], c))
            b.store(invstd, k.gep(a["invstd"], c))
        else:
            mean, invstd = b.load(k.gep(a["mean"], c), typ=F32), b.load(k.gep(a["invstd"], c), typ=F32)
        affine, _ = _affine(k, region, c, mean, invstd)

        with k.loop(0, a["N"]) as n:
            nc = b.add(b.mul(n, a["C"]), c)
            plane = b.mul(nc, hw)

            def value(i, lanes, mask=False):
                """The activation's output at position ``i`` of the plane; with ``mask``
                (a pass over the plane in order, as ``_store_mask`` needs) it also writes
                its mask bits."""
                v = _pre_activation(region, k, load, affine, b.add(plane, i), i, lanes)
                if mask and region.mask_bits:
                    act = region.activation
                    _store_mask(k, nc, hw, i, MASKS[act.name][0](b, v, act.params, lanes), lanes)
                return _act_forward(k, region.activation, v, lanes)

            if region.pool_mode == "mean":
                acc = _accumulator(k)
                _strided(k, hw, lambda i, lanes: _accumulate(k, acc, value(i, lanes, True), lanes))
                mean_v = b.fptrunc(b.fdiv(_total(k, acc), b.sitofp(hw, F64)), F32)
                b.store(mean_v, k.gep(a["out"], b.mul(nc, ohw)))
            elif region.pool is None:
                def apply(i, lanes):
                    v = value(i, lanes, True)
                    _store(k, v, a["out"], b.add(plane, i))
                    if region.pack_signs and region.axis == "row":   # row c of the bits, as a linear layer packs it
                        _store_row_flags(k, v, c, i, lanes)
                _strided(k, hw, apply)
            else:   # a window pool reads its inputs by window: the mask bits take a pass of their own
                if region.mask_bits:
                    _strided(k, hw, lambda i, lanes: value(i, lanes, True))
                if region.pool_mode == "max":
                    _pool_forward(region, k, nc, ohw, value)
                else:
                    _avg_pool_forward(region, k, b.mul(nc, ohw), value)
            if region.pack_signs and region.axis == "channel":
                _pack_plane(k, n, c)
    return k.finish()


def _pre_activation(region: Region, k: Kernel, load, affine, index, i, lanes):
    """The activation's input at ``index`` (position ``i`` of its plane): the affine of the
    input, plus ``res`` with a residual (rounded after the affine, as the unfused ``bn(x) + r``
    is)."""
    v = affine(load(index, lanes), i, lanes)
    return k.b.fadd(v, _load(k, k.arg["res"], index, lanes)) if region.residual else v


def _avg_divisor(region: Region, k: Kernel, oh, ow):
    """ATen's divisor of average-pool output ``(oh, ow)`` (float32): the window clipped to
    the padded input ("avg", count_include_pad), or to the input ("avg_valid")."""
    a, b = k.arg, k.b
    kh, kw, sh, sw, ph, pw = region.pool

    def extent(o, kernel, stride, pad, size):
        lo = b.sub(b.mul(o, ir.Constant(I64, stride)), ir.Constant(I64, pad))
        hi = b.add(lo, ir.Constant(I64, kernel))
        padded_end = b.add(size, ir.Constant(I64, pad))
        hi = b.select(b.icmp_signed("<", hi, padded_end), hi, padded_end)
        if region.pool_mode == "avg_valid":
            zero = ir.Constant(I64, 0)
            lo = b.select(b.icmp_signed(">", lo, zero), lo, zero)
            hi = b.select(b.icmp_signed("<", hi, size), hi, size)
        return b.sub(hi, lo)
    taps = b.mul(extent(oh, kh, sh, ph, a["H"]), extent(ow, kw, sw, pw, a["W"]))
    return b.sitofp(taps, F32)


def _avg_pool_forward(region: Region, k: Kernel, out_plane, value) -> None:
    """ATen's average pool: the float sum of the window's taps inside the input in (i, j)
    order, divided by ``_avg_divisor``."""
    a, b = k.arg, k.b
    kh, kw = region.pool[:2]
    with k.loop(0, a["OH"]) as oh, k.loop(0, a["OW"]) as ow:
        total = k.var(F32, ir.Constant(F32, 0.0))
        for i in range(kh):
            for j in range(kw):
                h, w, inside = _window(region, k, oh, ow, i, j)
                with b.if_then(inside):
                    k.set(total, b.fadd(k.get(total, F32), value(b.add(b.mul(h, a["W"]), w), 1)))
        o = b.add(out_plane, b.add(b.mul(oh, a["OW"]), ow))
        b.store(b.fdiv(k.get(total, F32), _avg_divisor(region, k, oh, ow)), k.gep(a["out"], o))


def _code_slot(k: Kernel, name: str, bits: int, nc, count, o):
    """Byte address and bit shift of code ``o`` in plane ``nc`` of ``bits``-bit codes packed
    ``count`` per plane (``fused_regions.pack_codes``: each plane from its own byte) at
    argument ``name``."""
    b = k.b
    bit = b.mul(o, ir.Constant(I64, bits))
    byte = b.add(b.mul(nc, _plane_bytes(k, bits, count)), b.lshr(bit, ir.Constant(I64, 3)))
    return k.gep(k.arg[name], byte, I8), b.trunc(b.and_(bit, ir.Constant(I64, 7)), I8)


def _plane_bytes(k: Kernel, bits: int, count):
    return k.b.lshr(k.b.add(k.b.mul(count, ir.Constant(I64, bits)), ir.Constant(I64, 7)), ir.Constant(I64, 3))


def _store_mask(k: Kernel, nc, hw, i, bit, lanes) -> None:
    """Mask bits of inputs ``i..i+lanes`` of plane ``nc``: a ``LANES``-wide step starts on a
    byte and writes whole bytes (element ``j`` to bit ``j``: the little-endian layout of an
    ``<N x i1>`` bitcast); the scalar tail's first bit starts a fresh byte (its padding bits
    stay zero) and the others are OR-ed in."""
    b = k.b
    slot, at = _code_slot(k, "mask", 1, nc, hw, i)
    if lanes > 1:
        b.store(b.bitcast(bit, ir.IntType(lanes)), slot, align=1)
        return
    old = b.select(b.icmp_unsigned("==", at, ir.Constant(I8, 0)), ir.Constant(I8, 0), b.load(slot, typ=I8))
    b.store(b.or_(old, b.shl(b.zext(bit, I8), at)), slot)


def _load_mask(k: Kernel, nc, hw, i, lanes):
    """``_store_mask`` inverted: the bits of inputs ``i..i+lanes`` of plane ``nc`` as i1 lanes."""
    b = k.b
    slot, at = _code_slot(k, "mask", 1, nc, hw, i)
    if lanes > 1:
        word = b.load(slot, typ=ir.IntType(lanes), align=1)
        return b.bitcast(word, vec(lanes, ir.IntType(1)))
    return b.trunc(b.lshr(b.load(slot, typ=I8), at), ir.IntType(1))


# The common pool (2x2, stride 2, no padding) has vector paths (``_pool2x2_forward``,
# ``_pool2x2_backward``): one ``LANES``-wide access per input row covers the windows of
# ``LANES / 2`` outputs.
POOL2X2 = (2, 2, 2, 2, 0, 0)


def _max_wins(b, v, best):
    """Whether tap ``v`` replaces the window's ``best`` so far, as in ATen's max pool
    (``isnan(v) || v > best``, taps in (i, j) order): the first maximum, the first NaN,
    which no later tap replaces."""
    return b.or_(b.fcmp_ordered(">", v, best), b.fcmp_unordered("uno", v, v))


def _pool_forward(region: Region, k: Kernel, nc, ohw, value) -> None:
    a, b = k.arg, k.b
    out_plane = b.mul(nc, ohw)
    kh, kw = region.pool[:2]
    bits = offset_bits(region.pool)
    nbytes = _plane_bytes(k, bits, ohw)
    with k.loop(0, nbytes) as i:   # the codes are OR-ed into their bytes
        b.store(ir.Constant(I8, 0), k.gep(a["arg"], b.add(b.mul(nc, nbytes), i), I8))
    rows, cols = _pool2x2_forward(k, nc, ohw, value) if region.pool == POOL2X2 else (None, None)
    with k.loop(0, a["OH"]) as oh, k.loop(_first_scalar(k, rows, cols, oh), a["OW"]) as ow:
        best = k.var(F32, ir.Constant(F32, float("-inf")))
        where = k.var(I8, ir.Constant(I8, 0))
        for i in range(kh):
            for j in range(kw):
                h, w, inside = _window(region, k, oh, ow, i, j)
                with b.if_then(inside):
                    v = value(b.add(b.mul(h, a["W"]), w), 1)
                    with b.if_then(_max_wins(b, v, k.get(best, F32))):
                        k.set(best, v)
                        k.set(where, ir.Constant(I8, i * kw + j))
        o = b.add(b.mul(oh, a["OW"]), ow)
        b.store(k.get(best, F32), k.gep(a["out"], b.add(out_plane, o)))
        slot, at = _code_slot(k, "arg", bits, nc, ohw, o)
        b.store(b.or_(b.load(slot, typ=I8), b.shl(k.get(where, I8), at)), slot)


_STEP = LANES // 2   # outputs a step of the 2x2 vector paths; their 2-bit codes fill one byte


def _pool2x2_extent(k: Kernel):
    """``(rows, cols)``: the 2x2 vector paths take outputs ``oh < rows``, ``ow < cols``, the
    windows inside the input, ``cols`` a multiple of ``_STEP`` and 0 unless ``OW`` is one
    too (then each step's codes start on a byte)."""
    a, b = k.arg, k.b
    half = lambda size: b.lshr(size, ir.Constant(I64, 1))
    aligned = b.icmp_unsigned("==", b.and_(a["OW"], ir.Constant(I64, _STEP - 1)), ir.Constant(I64, 0))
    cols = b.and_(smin(b, a["OW"], half(a["W"])), ir.Constant(I64, -_STEP))
    return smin(b, a["OH"], half(a["H"])), b.select(aligned, cols, ir.Constant(I64, 0))


def _first_scalar(k: Kernel, rows, cols, oh):
    """The first output of row ``oh`` the scalar pool loops take: ``cols`` in the vector
    path's rows, else 0 (also without a vector path: ``rows`` None)."""
    zero = ir.Constant(I64, 0)
    return zero if rows is None else k.b.select(k.b.icmp_signed("<", oh, rows), cols, zero)


def _pool2x2_rows(k: Kernel, oh, ow):
    """Plane positions of the first input of output ``(oh, ow)``'s two window rows."""
    a, b = k.arg, k.b
    top = b.add(b.mul(b.mul(oh, ir.Constant(I64, 2)), a["W"]), b.mul(ow, ir.Constant(I64, 2)))
    return top, b.add(top, a["W"])


def _pool2x2_forward(k: Kernel, nc, ohw, value):
    """The outputs of a 2x2 stride-2 max pool in ``_pool2x2_extent``, ``_STEP`` at a time, as
    the scalar loop computes them (the same comparisons in the same tap order), their four
    2-bit codes stored as one byte; returns the extent (the scalar loop does the rest)."""
    a, b = k.arg, k.b
    step = _STEP
    rows, cols = _pool2x2_extent(k)
    undef = ir.Constant(vec(LANES, F32), ir.Undefined)
    pick = lambda v, first: b.shuffle_vector(v, undef, ir.Constant(vec(step, I32), list(range(first, LANES, 2))))
    with k.loop(0, rows) as oh, k.loop(0, cols, step) as ow:
        best = _c(step, float("-inf"))
        where = ir.Constant(vec(step, I8), [0] * step)
        for i, row in enumerate(_pool2x2_rows(k, oh, ow)):
            v = value(row, LANES)
            for j in range(2):
                tap = pick(v, j)
                wins = _max_wins(b, tap, best)   # in the scalar loop's tap order
                best = b.select(wins, tap, best)
                where = b.select(wins, ir.Constant(vec(step, I8), [i * 2 + j] * step), where)
        o = b.add(b.mul(oh, a["OW"]), ow)
        _store(k, best, a["out"], b.add(b.mul(nc, ohw), o))
        shifted = b.shl(where, ir.Constant(vec(step, I8), list(range(0, 2 * step, 2))))
        slot, _ = _code_slot(k, "arg", 2, nc, ohw, o)
        b.store(k.call(f"llvm.vector.reduce.or.v{step}i8", I8, [shifted]), slot)
    return rows, cols


def _zero_plane(k: Kernel, plane) -> None:
    """``dx = 0`` over the ``H*W`` inputs of the plane at ``plane``."""
    b = k.b
    hw = b.mul(k.arg["H"], k.arg["W"])
    _strided(k, hw, lambda i, lanes: _store(k, _c(lanes, 0.0), k.arg["dx"], b.add(plane, i)))


def _pool2x2_backward(k: Kernel, plane, nc, ohw, rows, cols) -> None:
    """The 2x2 stride-2 max pool's backward over its windows in ``_pool2x2_extent`` (``rows``,
    ``cols``), ``_STEP`` outputs at a time: each window input gets ``0 + dy`` at the saved
    code's tap (the scalar loop's sum into a zeroed ``dx``, so ``-0.0`` becomes ``0.0`` as
    there), else 0."""
    a, b = k.arg, k.b
    step = _STEP
    zero = _c(LANES, 0.0)
    pairs = ir.Constant(vec(LANES, I32), [lane // 2 for lane in range(LANES)])   # each output to its two columns
    shifts = ir.Constant(vec(LANES, I8), [lane // 2 * 2 for lane in range(LANES)])
    with k.loop(0, rows) as oh, k.loop(0, cols, step) as ow:
        o = b.add(b.mul(oh, a["OW"]), ow)
        dy = _load(k, a["dy"], b.add(b.mul(nc, ohw), o), step)
        dy = b.shuffle_vector(dy, ir.Constant(dy.type, ir.Undefined), pairs)
        slot, _ = _code_slot(k, "arg", 2, nc, ohw, o)
        codes = b.and_(b.lshr(k.splat(b.load(slot, typ=I8), LANES), shifts), ir.Constant(vec(LANES, I8), [3] * LANES))
        for i, row in enumerate(_pool2x2_rows(k, oh, ow)):
            taps = ir.Constant(vec(LANES, I8), [i * 2 + lane % 2 for lane in range(LANES)])
            hit = b.icmp_unsigned("==", codes, taps)
            _store(k, b.fadd(zero, b.select(hit, dy, zero)), a["dx"], b.add(plane, row))


def _max_pool_backward(region: Region, k: Kernel, plane, nc, ohw) -> None:
    """``dx[window tap of the saved code] += dy`` for each output of plane ``nc``, into a
    ``dx`` zeroed first (with the 2x2 vector path: unless its windows cover the plane)."""
    a, b = k.arg, k.b
    _, kw, sh, sw, ph, pw = region.pool
    bits = offset_bits(region.pool)
    mask = ir.Constant(I8, (1 << bits) - 1)
    rows = cols = None
    if region.pool == POOL2X2:
        rows, cols = _pool2x2_extent(k)
        two = ir.Constant(I64, 2)
        covered = b.and_(b.icmp_signed("==", b.mul(rows, two), a["H"]), b.icmp_signed("==", b.mul(cols, two), a["W"]))
        with b.if_then(b.not_(covered)):
            _zero_plane(k, plane)
        _pool2x2_backward(k, plane, nc, ohw, rows, cols)
    else:
        _zero_plane(k, plane)
    with k.loop(0, a["OH"]) as oh, k.loop(_first_scalar(k, rows, cols, oh), a["OW"]) as ow:
        o = b.add(b.mul(oh, a["OW"]), ow)
        slot, at = _code_slot(k, "arg", bits, nc, ohw, o)
        off = b.zext(b.and_(b.lshr(b.load(slot, typ=I8), at), mask), I64)
        o = b.add(b.mul(nc, ohw), o)
        i = b.udiv(off, ir.Constant(I64, kw))
        j = b.urem(off, ir.Constant(I64, kw))
        h = b.sub(b.add(b.mul(oh, ir.Constant(I64, sh)), i), ir.Constant(I64, ph))
        w = b.sub(b.add(b.mul(ow, ir.Constant(I64, sw)), j), ir.Constant(I64, pw))
        dst = k.gep(a["dx"], b.add(plane, b.add(b.mul(h, a["W"]), w)))
        b.store(b.fadd(b.load(dst, typ=F32), b.load(k.gep(a["dy"], o), typ=F32)), dst)


def _avg_pool_backward(region: Region, k: Kernel, plane, out_plane) -> None:
    """ATen's average-pool backward: ``dy / divisor`` added to each tap of the window inside
    the input, outputs in order (``dx`` zeroed)."""
    a, b = k.arg, k.b
    kh, kw = region.pool[:2]
    with k.loop(0, a["OH"]) as oh, k.loop(0, a["OW"]) as ow:
        o = b.add(out_plane, b.add(b.mul(oh, a["OW"]), ow))
        delta = b.fdiv(b.load(k.gep(a["dy"], o), typ=F32), _avg_divisor(region, k, oh, ow))
        for i in range(kh):
            for j in range(kw):
                h, w, inside = _window(region, k, oh, ow, i, j)
                with b.if_then(inside):
                    dst = k.gep(a["dx"], b.add(plane, b.add(b.mul(h, a["W"]), w)))
                    b.store(b.fadd(b.load(dst, typ=F32), delta), dst)


def region_backward_ir(target: str | Target, region: Region) -> KernelIR:
    """``fqt_region_backward``: channels ``c0..c1`` of ``dx`` (NCHW like ``x``) from ``dy``
    (``[N, C, OH, OW]``), the saved ``x``, ``arg``, ``mean``, ``invstd``; writes
    ``dgamma = sum g * xhat`` and ``dbeta = sum g`` per channel (a row region: adds them per
    feature into its block's partial sums), ``g`` being the gradient at the affine's output.
    Training BatchNorm: ``dx = gamma invstd (g - mean(g) - xhat mean(g xhat))``; eval:
    ``dx = gamma invstd g``; LayerNorm: ``dx = invstd (g' - mean(g') - xhat mean(g' xhat))``
    with ``g' = gamma g`` over the row; RMSNorm (not ``centered``): ``dx = invstd (g' - xhat
    mean(g' xhat))`` with ``xhat = x invstd``, and no ``dbeta``. ``dx`` holds ``g`` (``g'``) between the passes, or
    after a window pool (but GELU) its gradient, from which the apply pass recomputes ``g``.
    With ``residual`` it writes ``dres = g`` (the add passes its gradient to both inputs),
    reading the activation's derivative from ``mask`` (``mask_bits``) or recomputing it with
    ``res`` (GELU). With ``raw_bits``, ``x`` is the int ``raw`` the forward wrote and ``dx`` gets
    ``alpha ⊙ dx`` (see ``Region``)."""
    k, hw, ohw = _kernel(target, BACKWARD_SYMBOL, BACKWARD_PARAMS)
    a, b = k.arg, k.b
    rows = region.axis == "row"
    # The passes are bound by memory traffic. After a window pool dx holds the pool's
    # gradient, so the apply pass recomputes g from it (the same instructions, so the same
    # floats) and the reduce pass stores nothing; otherwise the reduce pass keeps g in dx
    # for the apply pass to update in place (an apply pass writing dx afresh measured
    # slower than the store it saves), as it does for GELU, whose derivative is dear.
    keep_g = region.pool is None or region.activation.name not in ("none", *MASKS)
    with k.loop(a["c0"], a["c1"]) as c:
        load = _input(k, region, a["x"], c)
        mean = b.load(k.gep(a["mean"], c), typ=F32) if region.centered else ir.Constant(F32, 0.0)
        invstd = b.load(k.gep(a["invstd"], c), typ=F32)
        affine, scale = _affine(k, region, c, mean, invstd)
        block = b.mul(b.udiv(c, ir.Constant(I64, ROW_BLOCK)), a["W"]) if rows else None

        def sample(n):
            """Plane ``(n, c)``: its index ``nc``, its first input and ``gradient(i, lanes)``,
            the gradient at the affine's output, at position ``i``."""
            nc = b.add(b.mul(n, a["C"]), c)
            plane = b.mul(nc, hw)
            if region.pool_mode == "mean":
                # mean's backward, as autograd runs it: dy / (H * W) at every input
                spread = b.fdiv(b.load(k.gep(a["dy"], nc), typ=F32), b.sitofp(hw, F32))

            def gradient(i, lanes):
                index = b.add(plane, i)
                if region.pool_mode == "mean":
                    g = _splat(k, spread, lanes)
                else:   # a window pool's gradient is in dx (its backward ran first)
                    g = _load(k, a["dx"] if region.pool is not None else a["dy"], index, lanes)
                if region.mask_bits:
                    return MASKS[region.activation.name][1](b, _load_mask(k, nc, hw, i, lanes), g,
                                                            region.activation.params, lanes)
                if region.activation.name == "none":   # the derivative is 1
                    return g
                v = _pre_activation(region, k, load, affine, index, i, lanes)
                return _act_grad(k, region.activation, v, g, lanes)
            return nc, plane, gradient

        s1, s2 = _accumulator(k), _accumulator(k)
        with k.loop(0, a["N"]) as n:
            nc, plane, gradient = sample(n)
            if region.pool_mode == "max" and region.pool is not None:
                _max_pool_backward(region, k, plane, nc, ohw)
            elif region.pool is not None:
                _zero_plane(k, plane)
                _avg_pool_backward(region, k, plane, b.mul(nc, ohw))

            def reduce(i, lanes):
                index = b.add(plane, i)
                g = gradient(i, lanes)
                if region.residual:
                    _store(k, g, a["dres"], index)
                xhat = b.fmul(b.fsub(load(index, lanes), _splat(k, mean, lanes)), _splat(k, invstd, lanes))
                if rows:
                    if region.centered:
                        _add_to(k, a["dbeta"], b.add(block, i), g, lanes)
                    _add_to(k, a["dgamma"], b.add(block, i), b.fmul(g, xhat), lanes)
                    g = b.fmul(g, _load(k, a["gamma"], i, lanes))
                if keep_g:
                    _store(k, g, a["dx"], index)
                if region.centered:
                    _accumulate(k, s1, g, lanes)
                _accumulate(k, s2, b.fmul(g, xhat), lanes)
            _strided(k, hw, reduce)
        sum_g, sum_gx = _total(k, s1), _total(k, s2)
        if not rows:
            b.store(b.fptrunc(sum_g, F32), k.gep(a["dbeta"], c))
            b.store(b.fptrunc(sum_gx, F32), k.gep(a["dgamma"], c))
        if region.batch_stats:
            count = b.sitofp(b.mul(a["N"], hw), F64)
            mean_g = b.fptrunc(b.fdiv(sum_g, count), F32)
            mean_gx = b.fptrunc(b.fdiv(sum_gx, count), F32)
        alpha = b.load(k.gep(a["alpha"], c), typ=F32) if region.raw_bits else None
        with k.loop(0, a["N"]) as n:
            _, plane, gradient = sample(n)

            def apply(i, lanes):
                index = b.add(plane, i)
                g = _load(k, a["dx"], index, lanes) if keep_g else gradient(i, lanes)   # not a row region
                if region.batch_stats:
                    xhat = b.fmul(b.fsub(load(index, lanes), _splat(k, mean, lanes)),
                                  _splat(k, invstd, lanes))
                    if region.centered:
                        g = b.fsub(g, _splat(k, mean_g, lanes))
                    g = b.fsub(g, b.fmul(xhat, _splat(k, mean_gx, lanes)))
                g = b.fmul(g, _splat(k, scale, lanes))
                if region.raw_bits:   # the gradient at Y_raw: G' = alpha ⊙ dx
                    g = b.fmul(g, _splat(k, alpha, lanes))
                _store(k, g, a["dx"], index)
            _strided(k, hw, apply)
    return k.finish()


# --------------------------------------------------------------------------- linear -> activation
# A binarized linear layer's output through an activation, row by row of a ``[rows, D]``
# tensor: the region reads the raw GEMM result ``Y_raw`` (integers in float32), forms
# ``v = alpha[i] * Y_raw (+ bias[i])`` (two roundings, as the unfused multiply and add) and
# writes ``act(v)`` plus ``Y_raw`` as int16/int32 for the backward, which recomputes ``v``
# from it and writes ``act'(v) dy`` (the gradient at ``v``; times alpha it is the layer's
# ``G'``, a multiply the gradient quantizer applies on the fly) and the bias gradient: no
# float32 copy of ``v`` is kept and no separate pass sums the bias gradient. A gated region
# (SwiGLU's ``silu(gate(x)) * up(x)``) multiplies ``act(v)`` by a second layer's output ``u =
# alpha_up[i] * Y_up (+ bias_up[i])``, read and kept the same way, and its backward writes
# both gradients: at ``v``, ``act'(v) (dy u)``, and at ``u``, ``dy act(v)``, the unfused
# product's backward.


@dataclass(frozen=True)
class LinearRegion:
    """``activation`` after ``alpha ⊙ Y_raw`` (``+ bias`` when ``bias``); ``raw_bits``: 16 or
    32, the integer type the forward stores ``Y_raw`` in (``ops.fused_regions.raw_dtype``);
    ``gated``: times ``alpha_up ⊙ Y_up`` (``+ bias_up`` when ``bias``), a second layer's
    output, whose raw result is kept in the same type; ``pack_signs``: the forward also
    writes the sign bits ``out > 0`` and STE bits ``|out| < 1`` of each output row it
    wrote to row ``r`` of ``signs``/``ste`` (zeroed buffers of ``ld`` words a row: the
    layout of ``pack_signs_and_ste`` of the ``[rows, D]`` output), the operands of the
    binarized linear layers reading the output (a thread owns whole rows, so whole words)."""

    activation: Activation
    raw_bits: int = 16
    bias: bool = True
    gated: bool = False
    pack_signs: bool = False

    def __post_init__(self):
        if self.raw_bits not in (16, 32):
            raise ValueError(f"LinearRegion raw_bits {self.raw_bits}: expected 16 or 32")
        if self.activation.name not in ACTIVATIONS:
            raise ValueError(f"LinearRegion activation {self.activation.name!r}: expected one of "
                             f"{sorted(ACTIVATIONS)}")


LINEAR_FORWARD_SYMBOL = "fqt_linear_region_forward"
LINEAR_FORWARD_PARAMS = (("y", "ptr"), ("alpha", "ptr"), ("bias", "ptr"), ("out", "ptr"), ("raw", "ptr"),
                         ("y_up", "ptr"), ("alpha_up", "ptr"), ("bias_up", "ptr"), ("raw_up", "ptr"),
                         ("signs", "ptr"), ("ste", "ptr"), ("ld", "i64"), ("D", "i64"), ("r0", "i64"),
                         ("r1", "i64"))
LINEAR_BACKWARD_SYMBOL = "fqt_linear_region_backward"
LINEAR_BACKWARD_PARAMS = (("dy", "ptr"), ("raw", "ptr"), ("alpha", "ptr"), ("bias", "ptr"), ("g", "ptr"),
                          ("dbias", "ptr"), ("raw_up", "ptr"), ("alpha_up", "ptr"), ("bias_up", "ptr"),
                          ("g_up", "ptr"), ("dbias_up", "ptr"), ("D", "i64"), ("r0", "i64"), ("r1", "i64"))


# Two 8-float vectors a step: GELU's chain (a division, two polynomials, exp) is long
# enough that one vector a step leaves the core waiting on it (ATen's vectorized loops take
# two a step too).
_LINEAR_LANES = 2 * LANES


def _linear_pre_activation(k: Kernel, region: LinearRegion, y, i, lanes, suffix=""):
    """``alpha[i] * y (+ bias[i])`` at feature ``i``, each operation rounded (``suffix``
    "_up": the gated region's second layer)."""
    v = k.b.fmul(y, _load(k, k.arg["alpha" + suffix], i, lanes))
    return k.b.fadd(v, _load(k, k.arg["bias" + suffix], i, lanes)) if region.bias else v


def _raw_pointer(k: Kernel, region: LinearRegion, index, suffix=""):
    return k.gep(k.arg["raw" + suffix], index, ir.IntType(region.raw_bits))


def _linear_inputs(k: Kernel, region: LinearRegion, index, i, lanes, forward: bool):
    """``v`` and (gated) ``u`` at ``index`` (feature ``i``): the forward reads the float raw
    results and stores their int copies, the backward reads those copies."""
    b, ity = k.b, ir.IntType(region.raw_bits)
    values = []
    for suffix in ("", "_up") if region.gated else ("",):
        ptr = _raw_pointer(k, region, index, suffix)
        if forward:
            y = _load(k, k.arg["y" + suffix], index, lanes)
            b.store(b.fptosi(y, _lanes(ity, lanes)), ptr, align=region.raw_bits // 8)
        else:
            y = b.sitofp(b.load(ptr, typ=_lanes(ity, lanes), align=region.raw_bits // 8), _lanes(F32, lanes))
        values.append(_linear_pre_activation(k, region, y, i, lanes, suffix))
    return values


def linear_region_forward_ir(target: str | Target, region: LinearRegion) -> KernelIR:
    """``fqt_linear_region_forward``: rows ``r0..r1`` of the row-major ``[rows, D]`` float32
    ``y`` (``Y_raw``) -> ``out = act(alpha ⊙ y (+ bias))`` and ``raw = int(y)`` (exact:
    ``|Y_raw| <= K`` fits ``raw_bits``); ``alpha`` and ``bias`` hold ``D`` floats. Gated:
    ``out = act(...) * (alpha_up ⊙ y_up (+ bias_up))`` and ``raw_up = int(y_up)``. With
    ``pack_signs``, the sign and STE bits of each output row as it is stored
    (``_store_row_flags``)."""
    k = Kernel(new_module(get_target(target), LINEAR_FORWARD_SYMBOL), LINEAR_FORWARD_SYMBOL,
               LINEAR_FORWARD_PARAMS)
    a, b = k.arg, k.b
    with k.loop(a["r0"], a["r1"]) as r:
        row = b.mul(r, a["D"])

        def apply(i, lanes):
            index = b.add(row, i)
            v, *up = _linear_inputs(k, region, index, i, lanes, forward=True)
            out = _act_forward(k, region.activation, v, lanes)
            out = b.fmul(out, up[0]) if region.gated else out
            _store(k, out, a["out"], index)
            if region.pack_signs:
                _store_row_flags(k, out, r, i, lanes)
        _strided(k, a["D"], apply, _LINEAR_LANES)
    return k.finish()


def linear_region_backward_ir(target: str | Target, region: LinearRegion) -> KernelIR:
    """``fqt_linear_region_backward``: rows ``r0..r1`` of ``g = act'(v) dy`` from
    ``dy`` and the forward's ``raw`` (``v`` recomputed bit for bit); with ``bias`` it adds
    ``act'(v) dy`` of each row into ``dbias``, ``[ceil(rows / ROW_BLOCK), D]`` zeroed partial
    sums, one row per block of ``ROW_BLOCK`` rows (callers split rows in whole blocks, so the
    sums do not depend on the thread count). Gated: ``g = act'(v) (dy u)`` and ``g_up = dy
    act(v)``, with ``u`` recomputed from ``raw_up``, and ``dbias_up`` summed like ``dbias``."""
    k = Kernel(new_module(get_target(target), LINEAR_BACKWARD_SYMBOL), LINEAR_BACKWARD_SYMBOL,
               LINEAR_BACKWARD_PARAMS)
    a, b = k.arg, k.b
    with k.loop(a["r0"], a["r1"]) as r:
        row = b.mul(r, a["D"])
        block = b.mul(b.udiv(r, ir.Constant(I64, ROW_BLOCK)), a["D"])

        def apply(i, lanes):
            index = b.add(row, i)
            v, *up = _linear_inputs(k, region, index, i, lanes, forward=False)
            dy = _load(k, a["dy"], index, lanes)
            if region.gated:
                du = b.fmul(dy, _act_forward(k, region.activation, v, lanes))
                if region.bias:
                    _add_to(k, a["dbias_up"], b.add(block, i), du, lanes)
                _store(k, du, a["g_up"], index)
                dy = b.fmul(dy, up[0])
            dv = _act_grad(k, region.activation, v, dy, lanes)
            if region.bias:
                _add_to(k, a["dbias"], b.add(block, i), dv, lanes)
            _store(k, dv, a["g"], index)
        _strided(k, a["D"], apply, _LINEAR_LANES)
    return k.finish()
