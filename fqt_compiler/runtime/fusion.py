"""Fused regions on torch tensors: the kernels of ``codegen/fusion.py``, split over channels
(a row region: over rows, in whole ``ROW_BLOCK``s).

``region_forward(x, region, gamma, beta, ...)`` returns ``(out, argmax, mean, var, invstd,
raw, mask, signs, ste)`` and ``region_backward(dy, x, argmax, region, ...)`` returns ``(dx, dgamma, dbeta,
dres)`` (with ``Region.raw_bits``: ``x`` is the raw GEMM result, ``raw`` its int copy for
backward; with ``Region.mask_bits``: ``mask`` the activation's mask bits for backward; with
``Region.pack_signs``: ``signs``/``ste`` the output's packed sign and STE bits, the word
matrices of ``pack.pack_signs_and_ste(out.flatten(1))``, a row region's those of its
``[rows, D]`` output; the linear regions' ``_linear_forward`` likewise),
for an NCHW ``x`` (a row region's ``[1, rows, 1, D]``, split over rows in whole
``ROW_BLOCK``s); see ``ops/fused_regions.py`` for the op semantics and its reference (the
unfused chain).
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from ..codegen import fusion as gen
from ..ops import fused_regions   # also defines the ops registered below
from ..ops import reference as ref
from . import buffers, kernel_stats as stats
from .jit import kernel_of
from .lowered import implements
from .pack import parallel_rows
from .packed import padded_words

_GENERATORS = {"region_forward": gen.region_forward_ir, "region_backward": gen.region_backward_ir,
               "linear_region_forward": gen.linear_region_forward_ir,
               "linear_region_backward": gen.linear_region_backward_ir}


def _fn(family: str, target, region: gen.Region):
    return kernel_of(family, target, _GENERATORS[family], region=region)


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float().contiguous()


_INT = {16: torch.int16, 32: torch.int32}


def _alpha(alpha, region: gen.Region) -> torch.Tensor:
    """alpha as the kernels read it; an empty buffer when the region has no raw input."""
    return _f32(alpha) if region.raw_bits else torch.empty(0)


def _residual(needed: bool, residual, like: torch.Tensor) -> torch.Tensor | None:
    if not needed:
        return None
    if residual is None or residual.shape != like.shape:
        raise ValueError(f"fused region with a residual: needs a residual tensor shaped like its "
                         f"input {list(like.shape)}, got {None if residual is None else list(residual.shape)}")
    return _f32(residual)


def _mask_shape(region: gen.Region, x: torch.Tensor) -> list:
    return fused_regions.packed_codes_shape(x.shape, 1) if region.mask_bits else [0]


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _unit(region: gen.Region, out_shape) -> int:
    """Channels (rows) a thread owns as a whole."""
    if region.axis == "row":
        return gen.ROW_BLOCK
    return gen.signs_channel_unit(out_shape[2] * out_shape[3]) if region.pack_signs else 1


def region_forward(x, region: gen.Region, gamma, beta, mean=None, invstd=None, alpha=None, *,
                   residual=None, ceil_mode=False, target="host"):
    """Run ``region`` over NCHW ``x`` (with ``raw_bits``: the raw GEMM result, scaled by the
    per-channel ``alpha``; with ``Region.residual`` plus ``residual``, shaped like ``x``).
    Without batch statistics ``mean``/``invstd`` are the per-channel values to normalize with
    (they are returned unchanged)."""
    x = _f32(x)
    res = _residual(region.residual, residual, x)
    n, c, h, w = x.shape
    shape = fused_regions.pooled_shape(x.shape, region.pool, ceil_mode, region.pool_mode)
    out = buffers.empty(shape)
    arg = torch.empty(fused_regions.packed_codes_shape(shape, fused_regions.offset_bits(region.pool))
                      if region.pool and region.pool_mode == "max" else [0], dtype=torch.uint8)
    mask = torch.empty(_mask_shape(region, x), dtype=torch.uint8)
    raw = buffers.empty(x.shape if region.raw_bits else [0], _INT.get(region.raw_bits, torch.int16))
    # the kernel ORs the bits in: zeroed, padding words included; a row region packs rows
    bit_rows, bits = (c, w) if region.axis == "row" else (n, c * shape[2] * shape[3])
    signs, ste = buffers.zeros((2, bit_rows, padded_words(bits) if region.pack_signs else 0),
                               torch.int64).unbind()
    alpha = _alpha(alpha, region)
    var = torch.empty(c)
    if region.batch_stats:
        mean, invstd = torch.empty(c), torch.empty(c)
    else:
        mean, invstd = _f32(mean), _f32(invstd)
    gamma, beta = _f32(gamma), _f32(beta)
    parallel_rows(_fn("region_forward", target, region), c, x.data_ptr(), _ptr(res), out.data_ptr(),
                  arg.data_ptr(), gamma.data_ptr(), beta.data_ptr(), mean.data_ptr(),
                  var.data_ptr(), invstd.data_ptr(), alpha.data_ptr(), raw.data_ptr(), mask.data_ptr(),
                  signs.data_ptr(), ste.data_ptr(), signs.shape[1], n, c, h, w, shape[2], shape[3],
                  min_rows=_unit(region, shape))
    return out, arg, mean, var, invstd, raw, mask, signs, ste


def region_backward(dy, x, arg, region: gen.Region, gamma, beta, mean, invstd, alpha=None, *,
                    residual=None, mask=None, target="host"):
    """``(dx, dgamma, dbeta, dres)`` of ``region`` at ``x`` (with ``raw_bits``: the int raw
    GEMM result, and ``dx`` is then the gradient at it; with a residual, ``dres`` is its
    gradient, else empty) for the output gradient ``dy``. A region with a residual takes
    the forward's ``mask`` bits (``Region.mask_bits``), nothing ("none") or the
    ``residual`` itself (``Region.backward_reads_residual``)."""
    x = x.contiguous() if region.raw_bits else _f32(x)
    dy = _f32(dy)
    res = _residual(region.backward_reads_residual, residual, x)
    if region.mask_bits:
        if mask is None or list(mask.shape) != _mask_shape(region, x) or mask.dtype != torch.uint8:
            raise ValueError(f"fused region backward ({region.activation.name} after a residual add): needs the "
                             f"forward's uint8 mask bits shaped {_mask_shape(region, x)}, got "
                             f"{None if mask is None else (list(mask.shape), mask.dtype)}")
        mask = mask.contiguous()
    n, c, h, w = x.shape
    oh, ow = dy.shape[2], dy.shape[3]
    dx = buffers.empty(x.shape)
    dres = buffers.empty(x.shape if region.residual else [0])
    if region.axis == "row":   # per-block partial sums of each feature's column
        dgamma, dbeta = torch.zeros(2, -(-c // gen.ROW_BLOCK), w).unbind()
    else:
        dgamma, dbeta = torch.empty(c), torch.empty(c)
    arg = arg.contiguous()
    mean, invstd, gamma, beta = _f32(mean), _f32(invstd), _f32(gamma), _f32(beta)
    alpha = _alpha(alpha, region)
    parallel_rows(_fn("region_backward", target, region), c, dy.data_ptr(), x.data_ptr(), _ptr(res),
                  arg.data_ptr(), gamma.data_ptr(), beta.data_ptr(), mean.data_ptr(),
                  invstd.data_ptr(), alpha.data_ptr(), _ptr(mask if region.mask_bits else None), dx.data_ptr(),
                  dres.data_ptr(), dgamma.data_ptr(),
                  dbeta.data_ptr(), n, c, h, w, oh, ow, min_rows=_unit(region, dy.shape))
    if region.axis == "row":
        dgamma, dbeta = dgamma.sum(0), dbeta.sum(0)
    return dx, dgamma, dbeta, dres


# --------------------------------------------------------------------------- the fqt ops

def _region(training, activation, act_params, pool, pool_mode, eps, raw_dtype=None,
            has_residual=False, pack_signs=False) -> gen.Region:
    raw_bits = {None: 0, torch.int16: 16, torch.int32: 32}[raw_dtype]
    return gen.Region(training, gen.Activation(activation, tuple(act_params)), tuple(pool) or None,
                      float(eps), raw_bits, has_residual, pool_mode, pack_signs=pack_signs)


@implements("bn_region")
def bn_region(x, weight, bias, running_mean, running_var, training, eps, activation, act_params,
              pool, pool_mode, ceil_mode, region, alpha=None, contraction=0, residual=None, pack_signs=False, *,
              layer_name="?", target="host"):
    r = _region(training, activation, act_params, pool, pool_mode, eps,
                None if alpha is None else fused_regions.raw_dtype(contraction), residual is not None, pack_signs)
    with stats.timed(layer_name, "region_forward"):
        if training:
            return region_forward(x, r, weight, bias, alpha=alpha, residual=residual, ceil_mode=ceil_mode,
                                  target=target)
        # Eval BatchNorm is a per-channel affine of the running statistics (copied: an op's
        # outputs must not alias its inputs).
        mean, var = running_mean.detach().clone(), running_var.detach().clone()
        out, arg, _, _, invstd, *saved = region_forward(x, r, weight, bias, mean, torch.rsqrt(var + eps), alpha,
                                                        residual=residual, ceil_mode=ceil_mode, target=target)
        return out, arg, mean, var, invstd, *saved


@implements("bn_region_backward")
def bn_region_backward(dy, x, arg, weight, bias, mean, invstd, training, eps, activation,
                       act_params, pool, pool_mode, ceil_mode, region, alpha=None, residual=None, mask=None, *,
                       layer_name="?", target="host"):
    r = _region(training, activation, act_params, pool, pool_mode, eps,
                None if alpha is None else x.dtype, residual is not None or mask is not None)
    with stats.timed(layer_name, "region_backward"):
        return region_backward(dy, x, arg, r, weight, bias, mean, invstd, alpha, residual=residual, mask=mask,
                               target=target)


@implements("weight_scale", glue=True)
def weight_scale(weight, layer, *, layer_name="?", target="host"):
    """mean |w| per output channel, the reference's ops (so the same values) with |w| in a
    reused buffer: a fresh one of a large layer's weight size is mmap'ed and faulted in
    every step."""
    return ref.default_alpha(weight, abs_out=buffers.empty((weight.shape[0], weight[0].numel())))


# A float conv (run by ATen, as float layers are on both backends) feeding a region.

# Output bytes of one slice of the batch in ``_float_conv`` and ``_float_conv_backward``: a
# few MiB, which glibc serves from its heap (reused) rather than from fresh mmap'ed pages
# (buffers.py).
_CONV_SLICE_BYTES = 4 << 20


def _slice_samples(shape) -> int:
    """Samples per slice of the batch for a float32 conv output of ``shape``."""
    per_sample = math.prod(shape[1:]) * 4
    return max(1, _CONV_SLICE_BYTES // max(1, per_sample))


def _float_conv(input, weight, bias, stride, padding, dilation, groups, *, layer_name="?") -> torch.Tensor:
    """``F.conv2d`` into a reused buffer, a slice of the batch at a time. A whole batch's
    output of a first layer is as large as any tensor of the network: ATen would allocate
    it, and oneDNN its blocked-layout twin, as fresh pages every call (twice a step: forward
    and the backward's recompute), faulting them in again each time. A sample's outputs
    depend on that sample alone, so slicing the batch changes no value."""
    n, _, h, w = input.shape
    o, _, kh, kw = weight.shape
    oh, ow = (ref.conv_output_size(size, k, s, p, d)
              for size, k, s, p, d in zip((h, w), (kh, kw), stride, padding, dilation))
    with stats.timed(layer_name, "float_conv"):
        out = buffers.empty((n, o, oh, ow))
        step = _slice_samples(out.shape)
        for i in range(0, n, step):
            out[i:i + step] = F.conv2d(input[i:i + step], weight, bias, stride, padding, dilation, groups)
        return out


def _float_conv_backward(dy, input, weight, bias_sizes, stride, padding, dilation, transposed,
                         output_padding, groups, mask, *, layer_name="?"):
    """``aten.convolution_backward`` a slice of the batch at a time, for the reason of
    ``_float_conv`` (oneDNN would copy the whole ``dy`` into fresh pages every step). The
    input gradient's slices are ATen's values; the weight and bias gradients are the sums of
    the slices' (a float32 sum in another order than ATen's whole-batch reduction)."""
    with stats.timed(layer_name, "float_conv"):
        n = dy.shape[0]
        dinput = input.new_empty(input.shape) if mask[0] else None
        dweight = dbias = None
        step = _slice_samples(dy.shape)
        for i in range(0, n, step):
            di, dw, db = torch.ops.aten.convolution_backward(
                dy[i:i + step], input[i:i + step], weight, bias_sizes, stride, padding, dilation, transposed,
                output_padding, groups, mask)
            if mask[0]:
                dinput[i:i + step] = di
            dweight = dw if dweight is None else dweight.add_(dw)
            if mask[2]:
                dbias = db if dbias is None else dbias.add_(db)
        return dinput, dweight, dbias


@implements("conv2d_bn_region")
def conv2d_bn_region(input, conv_weight, conv_bias, stride, padding, dilation, groups, weight, bias, running_mean,
                     running_var, training, eps, activation, act_params, pool, pool_mode, ceil_mode, region,
                     pack_signs=False, *, layer_name="?", target="host"):
    y = _float_conv(input, conv_weight, conv_bias, stride, padding, dilation, groups, layer_name=layer_name)
    out = bn_region(y, weight, bias, running_mean, running_var, training, eps, activation, act_params, pool,
                    pool_mode, ceil_mode, region, pack_signs=pack_signs, layer_name=layer_name, target=target)
    return out[:5] + out[7:]   # no raw input, no residual: no raw copy, no mask


@implements("conv2d_bn_region_backward")
def conv2d_bn_region_backward(*args, layer_name="?", target="host"):
    *args, input_grad = args
    return fused_regions.conv2d_region_backward(bn_region_backward, *args, input_grad=input_grad,
                                                conv=functools.partial(_float_conv, layer_name=layer_name),
                                                conv_backward=functools.partial(_float_conv_backward,
                                                                                layer_name=layer_name),
                                                layer_name=layer_name, target=target)


@functools.lru_cache(maxsize=None)
def _row_region(eps, activation, act_params: tuple, centered: bool = True, pack_signs: bool = False) -> gen.Region:
    # cached: building the frozen dataclasses costs more than a small region's kernel call
    return gen.Region(True, gen.Activation(activation, act_params), eps=float(eps), axis="row", centered=centered,
                      pack_signs=pack_signs)


def _no_bits(like: torch.Tensor) -> tuple:
    """The two empty bit tensors a region returns without ``pack_signs``."""
    return (like.new_empty(0, dtype=torch.int64),) * 2


def _row_bits(signs, ste, x):
    """A row region's packed output bits as ``[rows, words]`` (empty without ``pack_signs``)."""
    return (signs, ste) if signs.numel() else _no_bits(x)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as the ``[1, rows, 1, D]`` tensor a row region runs over."""
    return t.reshape(1, -1, 1, t.shape[-1])


@implements("ln_region")
def ln_region(x, weight, bias, eps, activation, act_params, region, pack_signs=False, *, layer_name="?",
              target="host"):
    with stats.timed(layer_name, "region_forward"):
        region_ = _row_region(eps, activation, tuple(act_params), True, pack_signs)
        out, _, mean, _, invstd, _, _, signs, ste = region_forward(_rows(x), region_, weight, bias, target=target)
        return out.view(x.shape), mean.view(x.shape[:-1]), invstd.view(x.shape[:-1]), *_row_bits(signs, ste, x)


@implements("ln_region_backward")
def ln_region_backward(dy, x, weight, bias, mean, invstd, eps, activation, act_params, region, *,
                       layer_name="?", target="host"):
    with stats.timed(layer_name, "region_backward"):
        region_ = _row_region(eps, activation, tuple(act_params))
        dx, dgamma, dbeta, _ = region_backward(_rows(dy), _rows(x), torch.empty(0, dtype=torch.uint8), region_,
                                               weight, bias, mean.reshape(-1), invstd.reshape(-1), target=target)
        return dx.view(x.shape), dgamma, dbeta


@implements("rms_region")
def rms_region(x, weight, eps, activation, act_params, region, pack_signs=False, *, layer_name="?", target="host"):
    with stats.timed(layer_name, "region_forward"):
        region_ = _row_region(eps, activation, tuple(act_params), False, pack_signs)
        out, _, _, _, invstd, _, _, signs, ste = region_forward(_rows(x), region_, weight, torch.empty(0),
                                                                target=target)
        return out.view(x.shape), invstd.view(x.shape[:-1]), *_row_bits(signs, ste, x)


@implements("rms_region_backward")
def rms_region_backward(dy, x, weight, invstd, eps, activation, act_params, region, *, layer_name="?",
                        target="host"):
    with stats.timed(layer_name, "region_backward"):
        region_ = _row_region(eps, activation, tuple(act_params), False)
        invstd = invstd.reshape(-1)
        dx, dgamma, _, _ = region_backward(_rows(dy), _rows(x), torch.empty(0, dtype=torch.uint8), region_,
                                           weight, torch.empty(0), torch.empty(0), invstd, target=target)
        return dx.view(x.shape), dgamma


@functools.lru_cache(maxsize=None)
def _linear_region(activation, act_params: tuple, raw_bits: int, bias: bool, gated: bool = False,
                   pack_signs: bool = False) -> gen.LinearRegion:
    return gen.LinearRegion(gen.Activation(activation, act_params), raw_bits, bias, gated, pack_signs)


def _vector(t: torch.Tensor | None) -> torch.Tensor:
    return torch.empty(0) if t is None else _f32(t).reshape(-1)


def _layers(first, up):
    """The layers of a linear region: ``first`` and, gated, ``up`` (tuples of tensors)."""
    return [first] if up is None else [first, up]


def _linear_forward(layer_name, target, y, alpha, bias, contraction, activation, act_params, up=None,
                    pack_signs=False):
    """``(out, raw, signs, ste)`` of a linear region, or gated (``up``: ``(y_up, alpha_up,
    bias_up)``) ``(out, raw, raw_up, signs, ste)``; ``signs``/``ste``: with ``pack_signs``
    the output's packed bits ``[rows, words]``, else empty."""
    with stats.timed(layer_name, "region_forward"):
        dtype = fused_regions.raw_dtype(contraction)
        spec = _linear_region(activation, tuple(act_params), torch.iinfo(dtype).bits, bias is not None, up is not None,
                              pack_signs)
        operands = []   # per layer: y, alpha, bias, raw (the kernel's argument order)
        for y_, alpha_, bias_ in _layers((y, alpha, bias), up):
            if y_.shape != y.shape:
                raise ValueError(f"gated linear region {layer_name}: the two layers' outputs differ in shape, "
                                 f"{list(y.shape)} and {list(y_.shape)}")
            operands.append((_f32(y_), _vector(alpha_), _vector(bias_), buffers.empty(y.shape, dtype)))
        out = buffers.empty(y.shape)
        rows, d = y.numel() // max(1, y.shape[-1]), y.shape[-1]
        # the kernel ORs the bits of rows that do not fill whole bytes in: zeroed
        signs, ste = buffers.zeros((2, rows, padded_words(d)), torch.int64).unbind() if pack_signs else _no_bits(y)
        first, second = operands[0], operands[1] if up is not None else (torch.empty(0),) * 4
        parallel_rows(_fn("linear_region_forward", target, spec), rows,
                      *[t.data_ptr() for t in (*first[:3], out, first[3], *second, signs, ste)],
                      signs.shape[1] if pack_signs else 0, d)
        return (out, *[raw for *_, raw in operands], signs, ste)


@implements("linear_act_region")
def linear_act_region(y, alpha, bias, contraction, activation, act_params, region, pack_signs=False, *,
                      layer_name="?", target="host"):
    return _linear_forward(layer_name, target, y, alpha, bias, contraction, activation, act_params,
                           pack_signs=pack_signs)


@implements("gated_linear_region")
def gated_linear_region(y, alpha, bias, y_up, alpha_up, bias_up, contraction, activation, act_params, region,
                        pack_signs=False, *, layer_name="?", target="host"):
    return _linear_forward(layer_name, target, y, alpha, bias, contraction, activation, act_params,
                           up=(y_up, alpha_up, bias_up), pack_signs=pack_signs)


def _linear_backward(layer_name, target, dy, raw, alpha, bias, activation, act_params, up=None):
    """``(g, dbias)`` of a linear region, or gated (``up``: ``(raw_up, alpha_up, bias_up)``)
    ``(g, dbias, g_up, dbias_up)``; a missing bias's gradient is empty."""
    with stats.timed(layer_name, "region_backward"):
        spec = _linear_region(activation, tuple(act_params), torch.iinfo(raw.dtype).bits, bias is not None,
                              up is not None)
        dy = _f32(dy)
        rows, d = raw.numel() // raw.shape[-1], raw.shape[-1]
        operands = []   # per layer: raw, alpha, bias, g, dbias (the kernel's argument order)
        for raw_, alpha_, bias_ in _layers((raw, alpha, bias), up):
            dbias = torch.zeros(-(-rows // gen.ROW_BLOCK) if bias_ is not None else 0, d)
            operands.append((raw_.contiguous(), _vector(alpha_), _vector(bias_), buffers.empty(raw.shape), dbias))
        second = operands[1] if up is not None else (torch.empty(0),) * 5
        parallel_rows(_fn("linear_region_backward", target, spec), rows, dy.data_ptr(),
                      *[t.data_ptr() for t in (*operands[0], *second)], d, min_rows=gen.ROW_BLOCK)
        return tuple(t for _, _, bias_, g, dbias in operands
                     for t in (g, dbias.sum(0) if bias_.numel() else dbias.view(0)))


@implements("linear_act_region_backward")
def linear_act_region_backward(dy, raw, alpha, bias, activation, act_params, region, *, layer_name="?",
                               target="host"):
    return _linear_backward(layer_name, target, dy, raw, alpha, bias, activation, act_params)


@implements("gated_linear_region_backward")
def gated_linear_region_backward(dy, raw, alpha, bias, raw_up, alpha_up, bias_up, activation, act_params, region, *,
                                 layer_name="?", target="host"):
    return _linear_backward(layer_name, target, dy, raw, alpha, bias, activation, act_params,
                            up=(raw_up, alpha_up, bias_up))
