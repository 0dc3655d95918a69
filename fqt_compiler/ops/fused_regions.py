"""Fused float regions: BatchNorm -> residual add -> activation -> pool, LayerNorm or RMSNorm
-> activation, a binarized linear layer -> activation (times a second one's output), each as
one op (kernel backend).

``passes/fuse_regions.py`` replaces such a chain of the captured graph by
``batch_norm_region`` (below), which calls the op ``fqt::bn_region`` and then updates the
running statistics with the graph's momentum, as ``F.batch_norm`` does. The op returns the
region's output, the max pool's argmax packed as ``offset_bits(pool)`` bits per output (the
offset ``i * kw + j`` inside the window, not an int64 index: 2 bits for 2x2, 4 for 3x3;
``pack_codes``), the
per-channel ``mean``, biased ``var`` and ``invstd``, ``raw`` (below), ``mask`` and, with
``pack_signs``, the output's sign and STE bits as a binarized conv reading it would pack them
(``reference.pack_activation``; else two empty tensors): ``fuse_regions`` asks for them where
``binary_conv2d_region`` calls read the output, and those take them as ``x_bits``. Its
backward (``fqt::bn_region_backward``) keeps only the region's input, the packed argmax and
the two per-channel vectors: the activation mask is recomputed from them. With a residual
add it keeps ``mask`` too: the activation's derivative bit of each pre-activation ``bn(x) +
r`` (``ACTIVATION_MASKS``, 1 bit per element packed like the argmax), instead of the
float32 residual; no activation needs nothing, GELU keeps the residual (``keeps_mask``).
The float BatchNorm output, sum, activation output and int64 pool indices of the unfused
chain are never saved. With a residual it also returns the residual's gradient.

Pooling (``pool_mode``): "max", "avg" (``F.avg_pool2d`` with count_include_pad), "avg_valid"
(without), each with a window ``pool``, or "mean" (``F.adaptive_avg_pool2d`` to 1x1).

When a binarized conv feeds the BatchNorm (``binary_conv2d_region``), the region's input is
``alpha ⊙ Y_raw`` and the op takes ``Y_raw`` (integers in float32) and ``alpha`` instead: the
raw GEMM result is exact in int16 when its contraction length K < 32768 (``|Y_raw| <= K``,
docs/math.md §4b), so ``raw`` returns it as int16 (int32 for longer contractions) and the
backward keeps that, recomputing ``alpha * Y_raw`` bit for bit, instead of a float32 copy.
The backward then returns the gradient at ``Y_raw``, ``alpha ⊙ dL/dx``: the binarized
layer's ``G'``. When a float conv feeds it (``conv2d_region``: the first layer, kept float),
``fqt::conv2d_bn_region`` takes the conv's input and weight and recomputes the conv output
in its backward (``fqt::conv2d_bn_region_backward``, which also returns the conv's
gradients), so no float32 copy of that output is kept either.

Reference implementations: exactly the unfused chain (``F.batch_norm``, ``+ residual``, the
activation, the pool; the backward is ATen's backward formula of each link of that chain), so
the reference of a fused op is the computation it replaced. The math is docs/math.md (BatchNorm).

``fqt::ln_region`` is the row-wise counterpart (``layer_norm_region``): LayerNorm over the
last dimension (any number of leading dimensions) with weight and bias, then an activation
(GELU exact or tanh among them); it returns the output and the per-row ``mean`` and
``invstd``, and its backward (``fqt::ln_region_backward``) keeps only ``x`` and those two
per-row vectors. The math is docs/math.md §4b. ``fqt::rms_region`` (``rms_norm_region``) is
RMSNorm the same way, ``weight * (x * rsqrt(mean(x^2) + eps))`` then an activation, keeping
``x`` and the per-row ``invstd``. Both (and the linear regions below) take ``pack_signs``
and return two more tensors: with it, their output's sign and STE bits as a binarized
linear layer reading it packs them (``reference.pack_activation(out, "linear")``: a row
of words per row of the last dimension), else two empty tensors; ``fuse_regions`` asks for
them where binarized linear layers read the output, and those take them as ``x_bits``
(``library.binary_linear_packed``).

``fqt::linear_act_region`` (``binary_linear_region``) is a binarized linear layer (default
alpha, optional bias) and the activation after it: it takes the raw GEMM result ``Y_raw``,
alpha and the bias, returns ``act(alpha ⊙ Y_raw + bias)`` and ``Y_raw`` as int16 (int32 for
contractions of 32768 or more, ``raw_dtype``), which is all its backward
(``fqt::linear_act_region_backward``) keeps; that returns the gradient at ``v``,
``act'(v) dy``, and the bias gradient, and the registered autograd multiplies the former by
alpha, ``G'`` (a multiply the kernel backend's ``fold_alpha`` moves into the gradient
quantizer, as for an unfused layer). Its reference is the unfused chain (``library.binarized_linear``'s
multiply and add, the activation, ATen's backward of each). ``fqt::gated_linear_region``
(``binary_gated_linear_region``) is two such layers and ``act(v) * u`` (SwiGLU), keeping both
raw results and returning both layers' gradients.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import library
from . import reference as ref
from .library import _define

# Activation name -> the float op it fuses (params: Hardtanh (min, max), LeakyReLU (slope,)).
ACTIVATIONS = {
    "none": lambda v, p: v,
    "relu": lambda v, p: F.relu(v),
    "hardtanh": lambda v, p: F.hardtanh(v, p[0], p[1]),
    "leaky_relu": lambda v, p: F.leaky_relu(v, p[0]),
    "gelu": lambda v, p: F.gelu(v),
    "gelu_tanh": lambda v, p: F.gelu(v, approximate="tanh"),
    "silu": lambda v, p: F.silu(v),
}


def _pre_activation(x, weight, bias, mean, invstd, training, eps, residual):
    """BatchNorm (batch statistics when training, else ``mean``/``invstd``) plus the residual."""
    if training:
        v = F.batch_norm(x, None, None, weight, bias, True, 0.0, eps)
    else:
        shape = (1, -1, 1, 1)
        v = (x - mean.view(shape)) * invstd.view(shape) * weight.view(shape) + bias.view(shape)
    return v if residual is None else v + residual


def _pool(v, pool, pool_mode, ceil_mode):
    """The unfused pool after the activation: its output and, for a max pool, ATen's int64
    indices (else None)."""
    if pool_mode == "mean":
        return F.adaptive_avg_pool2d(v, 1), None
    if not pool:
        return v, None
    kh, kw, sh, sw, ph, pw = pool
    if pool_mode == "max":
        return F.max_pool2d(v, (kh, kw), (sh, sw), (ph, pw), ceil_mode=ceil_mode, return_indices=True)
    return F.avg_pool2d(v, (kh, kw), (sh, sw), (ph, pw), ceil_mode, pool_mode == "avg"), None


def _chain(x, weight, bias, mean, invstd, training, eps, activation, act_params, pool, pool_mode,
           ceil_mode, residual=None):
    """The unfused chain: BatchNorm, the residual add, the activation, the pool; returns the
    output, ATen's int64 max-pool indices (None for other pools) and the activation's input."""
    v = _pre_activation(x, weight, bias, mean, invstd, training, eps, residual)
    return (*_pool(ACTIVATIONS[activation](v, act_params), pool, pool_mode, ceil_mode), v)


def activation_mask(activation, act_params, v, has_residual) -> torch.Tensor:
    """What a region's forward saves of its pre-activation ``v`` for the backward: with a
    residual add and an activation of ``ACTIVATION_MASKS``, its derivative mask as 1-bit
    codes (``pack_codes``), else an empty tensor (no residual: ``v`` is recomputed from the
    saved input; "none": the derivative is 1; GELU: the residual is kept instead)."""
    if not has_residual or activation not in ACTIVATION_MASKS:
        return v.new_empty(0, dtype=torch.uint8)
    return pack_codes(ACTIVATION_MASKS[activation](v, act_params).to(torch.uint8), 1)


def keeps_mask(activation, has_residual) -> bool:
    """Whether the backward of such a region reads ``activation_mask`` bits (possibly none,
    for "none") instead of the residual input."""
    return has_residual and activation in MASKED_GRADS


def offset_bits(pool) -> int:
    """Bits per packed argmax code of a ``kh x kw`` window: the smallest of 1, 2, 4, 8 that
    holds ``kh * kw`` offsets, so that no code straddles a byte."""
    taps = pool[0] * pool[1]
    return next(b for b in (1, 2, 4, 8) if taps <= 1 << b)


def raw_dtype(contraction: int) -> torch.dtype:
    """The integer type that holds a ±1 GEMM result of this contraction length exactly."""
    return torch.int16 if contraction < 1 << 15 else torch.int32


def packed_codes_shape(shape, bits: int):
    """``[N, C, bytes]`` for ``bits``-bit codes of each ``[N, C, H, W]`` position: each
    channel plane's codes start on a byte, so threads that own channels never write the same
    byte."""
    n, c, h, w = shape
    return [n, c, (h * w * bits + 7) // 8]


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes ``[N, C, H, W]`` (uint8, each below ``2**bits``; ``bits`` divides 8) ->
    ``packed_codes_shape``: code ``i`` of a plane in bits ``[i*b % 8, i*b % 8 + b)`` of byte
    ``i*b // 8``, the padding bits of a plane's last byte zero."""
    per_byte = 8 // bits
    n, c = codes.shape[:2]
    flat = codes.reshape(n, c, -1).to(torch.int32)
    nbytes = packed_codes_shape(codes.shape, bits)[2]
    flat = F.pad(flat, (0, nbytes * per_byte - flat.shape[2])).view(n, c, nbytes, per_byte)
    shifts = torch.arange(per_byte, dtype=torch.int32) * bits
    return (flat << shifts).sum(3).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, h: int, w: int) -> torch.Tensor:
    """``pack_codes`` inverted: ``[N, C, H, W]`` uint8 codes."""
    per_byte = 8 // bits
    n, c, nbytes = packed.shape
    shifts = torch.arange(per_byte, dtype=torch.int32) * bits
    codes = (packed.to(torch.int32).unsqueeze(3) >> shifts) & ((1 << bits) - 1)
    return codes.view(n, c, nbytes * per_byte)[:, :, :h * w].reshape(n, c, h, w).to(torch.uint8)


def window_offsets(indices: torch.Tensor, width: int, pool) -> torch.Tensor:
    """ATen's flat argmax ``h * W + w`` as the offset ``i * kw + j`` inside its window."""
    kh, kw, sh, sw, ph, pw = pool
    oh = torch.arange(indices.shape[2]).view(-1, 1)
    ow = torch.arange(indices.shape[3]).view(1, -1)
    i = indices // width - (oh * sh - ph)
    j = indices % width - (ow * sw - pw)
    return (i * kw + j).to(torch.uint8)


def flat_indices(arg: torch.Tensor, width: int, pool) -> torch.Tensor:
    """``window_offsets`` inverted: the offset ``i * kw + j`` inside each window back to
    ATen's flat index ``h * W + w`` (int64)."""
    kh, kw, sh, sw, ph, pw = pool
    oh = torch.arange(arg.shape[2]).view(-1, 1)
    ow = torch.arange(arg.shape[3]).view(1, -1)
    offset = arg.long()
    return (offset // kw + oh * sh - ph) * width + (offset % kw + ow * sw - pw)


def _region_input(x, alpha):
    """The region's float input: ``x`` itself, or ``alpha ⊙ Y_raw`` when ``x`` is the raw GEMM
    result (float or integer), the product ``binarized_conv2d`` computes."""
    return x if alpha is None else x.float() * alpha.view(1, -1, 1, 1)


def batch_statistics(x: torch.Tensor, eps: float):
    """Training BatchNorm's per-channel ``mean``, biased ``var`` and ``invstd``; ``mean`` and
    ``invstd`` are the ones ATen's BatchNorm normalizes with (``torch.rsqrt(var + eps)`` can
    be one ulp off them, and at an ``x`` equal to the mean that can flip the sign of the
    normalized value, so the reference's backward would mask another ReLU input)."""
    _, mean, invstd = torch.ops.aten.native_batch_norm(x, None, None, None, None, True, 0.0, eps)
    return mean, torch.var(x, (0, 2, 3), correction=0), invstd


def _packed_output(out, pack_signs, kind="conv2d"):
    """The region output's ``(sign words, STE words)`` as a binarized conv (``kind``
    "conv2d") or linear layer ("linear") reading it packs them (``reference.pack_activation``),
    or two empty tensors."""
    if pack_signs:
        return ref.pack_activation(out, kind)
    return out.new_empty(0, dtype=torch.int64), out.new_empty(0, dtype=torch.int64)


def _bn_region(x, weight, bias, running_mean, running_var, training, eps, activation, act_params,
               pool, pool_mode, ceil_mode, region, alpha=None, contraction=0, residual=None, pack_signs=False):
    raw = x.to(raw_dtype(contraction)) if alpha is not None else x.new_empty(0, dtype=torch.int16)
    x = _region_input(x, alpha)
    if training:
        mean, var, invstd = batch_statistics(x, eps)
    else:
        mean, var = running_mean.clone(), running_var.clone()
        invstd = torch.rsqrt(var + eps)
    out, indices, v = _chain(x, weight, bias, mean, invstd, training, eps, activation, act_params,
                             pool, pool_mode, ceil_mode, residual)
    arg = (pack_codes(window_offsets(indices, x.shape[3], pool), offset_bits(pool)) if indices is not None
           else x.new_empty(0, dtype=torch.uint8))
    mask = activation_mask(activation, act_params, v, residual is not None)
    return out.contiguous(), arg, mean, var, invstd, raw, mask, *_packed_output(out, pack_signs)


def pooled_shape(x_shape, pool, ceil_mode, pool_mode="max"):
    n, c, h, w = x_shape
    if pool_mode == "mean":
        return [n, c, 1, 1]
    if not pool:
        return list(x_shape)
    kh, kw, sh, sw, ph, pw = pool
    return [n, c, _pool_out(h, kh, sh, ph, ceil_mode), _pool_out(w, kw, sw, pw, ceil_mode)]


def _pool_out(size, k, s, p, ceil_mode):
    """ATen's ``pooling_output_shape`` (dilation 1): with ceil_mode the last window must
    start inside the input or the left padding."""
    out = (size + 2 * p - k + (s - 1 if ceil_mode else 0)) // s + 1
    return out - 1 if ceil_mode and (out - 1) * s >= size + p else out


def _bn_region_fake(x, weight, bias, running_mean, running_var, training, eps, activation,
                    act_params, pool, pool_mode, ceil_mode, region, alpha=None, contraction=0,
                    residual=None, pack_signs=False):
    shape = pooled_shape(x.shape, pool, ceil_mode, pool_mode)
    out = x.new_empty(shape)
    arg = x.new_empty(packed_codes_shape(shape, offset_bits(pool)) if pool and pool_mode == "max" else [0],
                      dtype=torch.uint8)
    raw = (x.new_empty(x.shape, dtype=raw_dtype(contraction)) if alpha is not None
           else x.new_empty(0, dtype=torch.int16))
    saves_mask = residual is not None and activation in ACTIVATION_MASKS
    mask = x.new_empty(packed_codes_shape(x.shape, 1) if saves_mask else [0], dtype=torch.uint8)
    c = x.shape[1]
    words = [shape[0], ref.padded_words(c * shape[2] * shape[3])] if pack_signs else [0]
    signs = x.new_empty(words, dtype=torch.int64)
    return out, arg, x.new_empty(c), x.new_empty(c), x.new_empty(c), raw, mask, signs, torch.empty_like(signs)


_ARGS = "str activation, float[] act_params, int[] pool, str pool_mode, bool ceil_mode, str region"

bn_region = _define(
    "bn_region(Tensor x, Tensor weight, Tensor bias, Tensor? running_mean, Tensor? running_var, "
    f"bool training, float eps, {_ARGS}, Tensor? alpha=None, int contraction=0, Tensor? residual=None, "
    "bool pack_signs=False) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    _bn_region, _bn_region_fake)


def _pool_backward(dy, a, arg, pool, pool_mode, ceil_mode):
    """ATen's backward of ``_pool`` at an input shaped like ``a`` (its values do not matter)."""
    if pool_mode == "mean":
        return dy.expand(a.shape) / (a.shape[2] * a.shape[3])
    if not pool:
        return dy
    kh, kw, sh, sw, ph, pw = pool
    if pool_mode != "max":
        return torch.ops.aten.avg_pool2d_backward(dy, a, [kh, kw], [sh, sw], [ph, pw], ceil_mode,
                                                  pool_mode == "avg", None)
    # The pool's gradient goes where the forward's saved argmax says, not where a recomputed
    # max would be: at a tie within float rounding the two may differ.
    indices = flat_indices(unpack_codes(arg, offset_bits(pool), *dy.shape[2:]), a.shape[3], pool)
    return torch.ops.aten.max_pool2d_with_indices_backward(
        dy, a, [kh, kw], [sh, sw], [ph, pw], [1, 1], ceil_mode, indices)


def _bn_region_backward(dy, x, arg, weight, bias, mean, invstd, training, eps, activation,
                        act_params, pool, pool_mode, ceil_mode, region, alpha=None, residual=None,
                        mask=None):
    # The unfused chain's backward, ATen's formula for each link (what autograd runs for it),
    # written out: an op implementation runs below the autograd dispatch key, where nested
    # autograd would not record. With alpha, x is the saved raw GEMM result. A region with a
    # residual add passes either the residual (v recomputed) or the forward's mask bits.
    if alpha is not None:
        dx, dweight, dbias, dres = _bn_region_backward(
            dy, _region_input(x, alpha), arg, weight, bias, mean, invstd, training, eps, activation,
            act_params, pool, pool_mode, ceil_mode, region, residual=residual, mask=mask)
        return dx * alpha.view(1, -1, 1, 1), dweight, dbias, dres
    shape = (1, -1, 1, 1)
    dy = _pool_backward(dy, x, arg, pool, pool_mode, ceil_mode)
    if mask is None:
        v = _pre_activation(x, weight, bias, mean, invstd, training, eps, residual)
        dv = ACTIVATION_GRADS[activation](dy, v, act_params)
    else:
        bits = unpack_codes(mask, 1, *x.shape[2:]).bool() if mask.numel() else None
        dv = MASKED_GRADS[activation](dy, bits, act_params)
    has_residual = residual is not None or mask is not None
    dres = dv.clone() if has_residual else x.new_empty(0, dtype=torch.float32)
    if training:
        return (*torch.ops.aten.native_batch_norm_backward(
            dv, x, weight, None, None, mean, invstd, True, eps, [True, True, True]), dres)
    xhat = (x - mean.view(shape)) * invstd.view(shape)
    return dv * (invstd * weight).view(shape), (dv * xhat).sum((0, 2, 3)), dv.sum((0, 2, 3)), dres


# Activation name -> ATen's backward of it, as a function of (grad, input, params).
ACTIVATION_GRADS = {
    "none": lambda d, v, p: d,
    "relu": lambda d, v, p: torch.ops.aten.threshold_backward(d, v, 0),
    "hardtanh": lambda d, v, p: torch.ops.aten.hardtanh_backward(d, v, p[0], p[1]),
    "leaky_relu": lambda d, v, p: torch.ops.aten.leaky_relu_backward(d, v, p[0], False),
    "gelu": lambda d, v, p: torch.ops.aten.gelu_backward(d, v),
    "gelu_tanh": lambda d, v, p: torch.ops.aten.gelu_backward(d, v, approximate="tanh"),
    "silu": lambda d, v, p: torch.ops.aten.silu_backward(d, v),
}

# Activations whose derivative takes two values: name -> the bit of the pre-activation ``v``
# that selects it, exactly as ATen's backward above decides (threshold_backward: ``v <= 0``
# gives 0, so a NaN passes; hardtanh_backward: ``v <= min`` or ``v >= max`` gives 0, the
# boundaries included; at a NaN its vectorized loop gives 0 and its scalar tail the gradient,
# the bit follows the former; leaky_relu_backward: ``v > 0`` gives 1, else the slope).
ACTIVATION_MASKS = {
    "relu": lambda v, p: ~(v <= 0),
    "hardtanh": lambda v, p: (v > p[0]) & (v < p[1]),
    "leaky_relu": lambda v, p: v > 0,
}
# ... and ATen's backward as a function of (grad, that bit, params): the same floats (tested).
# "none" needs no bit.
MASKED_GRADS = {
    "none": lambda d, m, p: d,
    "relu": lambda d, m, p: torch.where(m, d, 0.0),
    "hardtanh": lambda d, m, p: torch.where(m, d, 0.0),
    "leaky_relu": lambda d, m, p: torch.where(m, d, d * p[0]),
}


def _bn_region_backward_fake(dy, x, arg, weight, bias, mean, invstd, training, eps, activation, act_params,
                             pool, pool_mode, ceil_mode, region, alpha=None, residual=None, mask=None):
    has_residual = residual is not None or mask is not None
    return (dy.new_empty(x.shape), torch.empty_like(weight), torch.empty_like(weight),
            dy.new_empty(x.shape if has_residual else [0]))


bn_region_backward = _define(
    "bn_region_backward(Tensor dy, Tensor x, Tensor arg, Tensor weight, Tensor bias, Tensor mean, "
    f"Tensor invstd, bool training, float eps, {_ARGS}, Tensor? alpha=None, Tensor? residual=None, "
    "Tensor? mask=None) -> (Tensor, Tensor, Tensor, Tensor)",
    _bn_region_backward, _bn_region_backward_fake)


def _setup_context(ctx, inputs, output):
    x, weight, bias, _, _, *static, alpha, _, residual, _ = inputs
    _, arg, mean, _, invstd, raw, mask, _, _ = output
    # With a residual add the backward needs the activation's derivative at bn(x) + r: the
    # mask bits (1 bit per element instead of the float32 residual) where they decide it.
    ctx.has_residual = residual is not None
    if keeps_mask(static[2], ctx.has_residual):
        residual = None
    else:
        mask = None
    ctx.save_for_backward(x if alpha is None else raw, arg, weight, bias, mean, invstd, alpha, residual, mask)
    ctx.static = tuple(static)


def _backward(ctx, dy, *_unused):
    x, arg, weight, bias, mean, invstd, alpha, residual, mask = ctx.saved_tensors
    dx, dweight, dbias, dres = bn_region_backward(dy, x, arg, weight, bias, mean, invstd, *ctx.static,
                                                  alpha=alpha, residual=residual, mask=mask)
    return dx, dweight, dbias, *[None] * 12, dres if ctx.has_residual else None, None


bn_region.register_autograd(_backward, setup_context=_setup_context)


def batch_norm_region(x, running_mean, running_var, weight, bias, training, momentum, eps,
                      activation, act_params, pool, pool_mode, ceil_mode, region, alpha=None,
                      contraction=0, residual=None, pack_signs=False):
    """What ``passes/fuse_regions.py`` puts in place of ``F.batch_norm -> (+ residual) ->
    activation -> pool``: the fused op, then the running statistics updated in place with
    ``momentum`` and the unbiased batch variance, as ``F.batch_norm`` updates them. With
    ``alpha``, ``x`` is a raw GEMM result of that ``contraction`` length (see
    ``binary_conv2d_region``). Returns the output, or with ``pack_signs`` ``(output, its
    sign words, its STE words)``: the ``x_bits`` of ``binary_conv2d_region``."""
    out, _, mean, var, _, _, _, signs, ste = bn_region(x, weight, bias, running_mean, running_var, training, eps,
                                                       activation, act_params, pool, pool_mode, ceil_mode, region,
                                                       alpha, contraction, residual, pack_signs)
    _update_running_stats(x.numel() // x.shape[1], running_mean, running_var, mean, var, training, momentum)
    return (out, signs, ste) if pack_signs else out


def _update_running_stats(count, running_mean, running_var, mean, var, training, momentum):
    """``F.batch_norm``'s in-place update from the batch statistics of ``count`` values per
    channel (the running variance takes the unbiased variance)."""
    if training and running_mean is not None:
        with torch.no_grad():
            running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
            running_var.mul_(1 - momentum).add_(var * (count / max(count - 1, 1)), alpha=momentum)


def _weight_scale(weight, layer):
    return ref.default_alpha(weight)


# The binarized conv's default alpha (mean |w| per output channel) as one op, so the kernel
# backend computes it without a fresh weight-sized |w| temporary every step.
weight_scale = _define("weight_scale(Tensor weight, int layer) -> Tensor", _weight_scale,
                       lambda weight, layer: weight.new_empty(weight.shape[0]))


def binary_conv2d_region(x, conv_weight, rng_state, stride, padding, dilation, layer, running_mean,
                         running_var, weight, bias, training, momentum, eps, activation, act_params,
                         pool, pool_mode, ceil_mode, region, residual=None, x_bits=None, pack_signs=False):
    """``library.binarized_conv2d`` (default alpha, no bias) followed by ``batch_norm_region``,
    with the multiply by alpha moved into the region: the region gets the raw GEMM result and
    keeps it for backward as int16 (``raw_dtype``) instead of the float32 ``alpha ⊙ Y_raw``.
    ``x_bits``: ``x``'s packed ``(sign words, STE words)`` from the region that wrote ``x``
    (``pack_signs`` there), read by ``library.binary_conv2d_packed`` instead of packing ``x``."""
    if x_bits is None:
        y = library.binary_conv2d(x, conv_weight, rng_state, stride, padding, dilation, layer)[0]
    else:
        y = library.binary_conv2d_packed(x, *x_bits, conv_weight, rng_state, stride, padding, dilation, layer)[0]
    alpha = weight_scale(conv_weight.detach(), layer)
    return batch_norm_region(y, running_mean, running_var, weight, bias, training, momentum, eps,
                             activation, act_params, pool, pool_mode, ceil_mode, region, alpha,
                             conv_weight[0].numel(), residual, pack_signs)


# --------------------------------------------------------------------------- float conv -> region
# A float conv (the first layer, kept float by the plan) feeding a region: its output is the
# BatchNorm input the backward needs, a float32 tensor as large as any in the network. The op
# below takes the conv's input and weight instead, which the conv's own backward keeps anyway,
# and recomputes the conv output in backward: one more float conv per step, no float32 copy.

_CONV = "int[] stride, int[] padding, int[] dilation, int groups"


def _conv_then(bn_region_impl):
    """``conv2d_bn_region`` from a ``bn_region`` implementation (reference or fake): the float
    conv, then the region, whose outputs lose ``raw`` and ``mask`` (a float input, no residual)."""
    def conv2d_bn_region(input, conv_weight, conv_bias, stride, padding, dilation, groups, weight, bias,
                         running_mean, running_var, training, eps, activation, act_params, pool, pool_mode,
                         ceil_mode, region, pack_signs=False):
        y = F.conv2d(input, conv_weight, conv_bias, stride, padding, dilation, groups)
        out = bn_region_impl(y, weight, bias, running_mean, running_var, training, eps, activation, act_params,
                             pool, pool_mode, ceil_mode, region, pack_signs=pack_signs)
        return out[:5] + out[7:]
    return conv2d_bn_region


_conv2d_bn_region, _conv2d_bn_region_fake = _conv_then(_bn_region), _conv_then(_bn_region_fake)


conv2d_bn_region = _define(
    f"conv2d_bn_region(Tensor input, Tensor conv_weight, Tensor? conv_bias, {_CONV}, Tensor weight, "
    "Tensor bias, Tensor? running_mean, Tensor? running_var, bool training, float eps, "
    f"{_ARGS}, bool pack_signs=False) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    _conv2d_bn_region, _conv2d_bn_region_fake)


def conv2d_region_backward(region_backward, dy, input, conv_weight, conv_bias, stride, padding, dilation,
                           groups, arg, weight, bias, mean, invstd, *static, input_grad=True, conv=F.conv2d,
                           conv_backward=torch.ops.aten.convolution_backward, **kw):
    """``(d input, d conv_weight, d conv_bias, d weight, d bias)``: the conv output recomputed
    (by ``conv``, ``F.conv2d``'s signature), ``region_backward`` (``bn_region_backward``'s
    reference or kernel) at it, then the convolution backward (``conv_backward``, ATen's
    signature); gradients not asked for (input, a missing bias) are empty."""
    y = conv(input, conv_weight, conv_bias, stride, padding, dilation, groups)
    dy, dweight, dbias, _ = region_backward(dy, y, arg, weight, bias, mean, invstd, *static, **kw)
    mask = [input_grad, True, conv_bias is not None]
    dinput, dconv_weight, dconv_bias = conv_backward(
        dy, input, conv_weight, None if conv_bias is None else list(conv_bias.shape), stride, padding,
        dilation, False, [0, 0], groups, mask)
    return (input.new_empty(0) if dinput is None else dinput, dconv_weight,
            input.new_empty(0) if dconv_bias is None else dconv_bias, dweight, dbias)


def _conv2d_bn_region_backward(dy, input, conv_weight, conv_bias, stride, padding, dilation, groups, arg,
                               weight, bias, mean, invstd, training, eps, activation, act_params, pool,
                               pool_mode, ceil_mode, region, input_grad):
    return conv2d_region_backward(_bn_region_backward, dy, input, conv_weight, conv_bias, stride, padding,
                                  dilation, groups, arg, weight, bias, mean, invstd, training, eps,
                                  activation, act_params, pool, pool_mode, ceil_mode, region,
                                  input_grad=input_grad)


def _conv2d_bn_region_backward_fake(dy, input, conv_weight, conv_bias, *rest):
    input_grad, weight = rest[-1], rest[5]
    return (torch.empty_like(input) if input_grad else input.new_empty(0), torch.empty_like(conv_weight),
            input.new_empty(0) if conv_bias is None else torch.empty_like(conv_bias),
            torch.empty_like(weight), torch.empty_like(weight))


conv2d_bn_region_backward = _define(
    f"conv2d_bn_region_backward(Tensor dy, Tensor input, Tensor conv_weight, Tensor? conv_bias, {_CONV}, "
    "Tensor arg, Tensor weight, Tensor bias, Tensor mean, Tensor invstd, bool training, float eps, "
    f"{_ARGS}, bool input_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    _conv2d_bn_region_backward, _conv2d_bn_region_backward_fake)


def _conv_setup_context(ctx, inputs, output):
    input, conv_weight, conv_bias, stride, padding, dilation, groups, weight, bias, _, _, *static, _ = inputs
    _, arg, mean, _, invstd, _, _ = output
    ctx.save_for_backward(input, conv_weight, conv_bias, arg, weight, bias, mean, invstd)
    ctx.conv = (stride, padding, dilation, groups)
    ctx.static = tuple(static)


def _conv_backward(ctx, dy, *_unused):
    input, conv_weight, conv_bias, arg, weight, bias, mean, invstd = ctx.saved_tensors
    grads = conv2d_bn_region_backward(dy, input, conv_weight, conv_bias, *ctx.conv, arg, weight, bias,
                                      mean, invstd, *ctx.static, ctx.needs_input_grad[0])
    dinput, dconv_weight, dconv_bias, dweight, dbias = grads
    return (dinput if ctx.needs_input_grad[0] else None, dconv_weight,
            None if conv_bias is None else dconv_bias, *[None] * 4, dweight, dbias, *[None] * 11)


conv2d_bn_region.register_autograd(_conv_backward, setup_context=_conv_setup_context)


def conv2d_region(input, conv_weight, conv_bias, stride, padding, dilation, groups, running_mean,
                  running_var, weight, bias, training, momentum, eps, activation, act_params, pool,
                  pool_mode, ceil_mode, region, pack_signs=False):
    """A float ``F.conv2d`` followed by ``batch_norm_region``, as one op that recomputes the
    conv output in backward instead of keeping it; ``pack_signs`` as there."""
    out, _, mean, var, _, signs, ste = conv2d_bn_region(input, conv_weight, conv_bias, stride, padding, dilation,
                                                        groups, weight, bias, running_mean, running_var, training,
                                                        eps, activation, act_params, pool, pool_mode, ceil_mode,
                                                        region, pack_signs)
    n, _, h, w = input.shape
    kh, kw = conv_weight.shape[2:]
    count = (n * ref.conv_output_size(h, kh, stride[0], padding[0], dilation[0])
             * ref.conv_output_size(w, kw, stride[1], padding[1], dilation[1]))
    _update_running_stats(count, running_mean, running_var, mean, var, training, momentum)
    return (out, signs, ste) if pack_signs else out


# --------------------------------------------------------------------------- LayerNorm regions

def _ln_normalized(x, weight, bias, mean, invstd):
    """LayerNorm's output from its per-row statistics, in ATen's order of operations
    (``(x * rstd + (-rstd * mean)) * gamma + beta``)."""
    m, r = mean.unsqueeze(-1), invstd.unsqueeze(-1)
    return (x * r + (-r * m)) * weight + bias


def _ln_region(x, weight, bias, eps, activation, act_params, region, pack_signs=False):
    v, mean, rstd = torch.ops.aten.native_layer_norm(x, [x.shape[-1]], weight, bias, eps)
    out = ACTIVATIONS[activation](v, act_params).contiguous()
    return out, mean.squeeze(-1), rstd.squeeze(-1), *_packed_output(out, pack_signs, "linear")


def _row_bits_fake(x, pack_signs):
    """Fakes of a row region's ``(sign words, STE words)``: ``[rows, padded_words(D)]``
    each with ``pack_signs``, else empty."""
    shape = [x.numel() // x.shape[-1], ref.padded_words(x.shape[-1])] if pack_signs else [0]
    signs = x.new_empty(shape, dtype=torch.int64)
    return signs, torch.empty_like(signs)


_LN_ARGS = "float eps, str activation, float[] act_params, str region"

ln_region = _define(
    f"ln_region(Tensor x, Tensor weight, Tensor bias, {_LN_ARGS}, bool pack_signs=False) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    _ln_region,
    lambda x, weight, bias, eps, activation, act_params, region, pack_signs=False: (
        x.new_empty(x.shape), x.new_empty(x.shape[:-1]), x.new_empty(x.shape[:-1]), *_row_bits_fake(x, pack_signs)))


def _ln_region_backward(dy, x, weight, bias, mean, invstd, eps, activation, act_params, region):
    # ATen's backward of each link of the unfused chain, as autograd would run it.
    dv = ACTIVATION_GRADS[activation](dy, _ln_normalized(x, weight, bias, mean, invstd), act_params)
    return torch.ops.aten.native_layer_norm_backward(
        dv, x, [x.shape[-1]], mean.unsqueeze(-1), invstd.unsqueeze(-1), weight, bias, [True, True, True])


ln_region_backward = _define(
    "ln_region_backward(Tensor dy, Tensor x, Tensor weight, Tensor bias, Tensor mean, "
    f"Tensor invstd, {_LN_ARGS}) -> (Tensor, Tensor, Tensor)",
    _ln_region_backward,
    lambda dy, x, weight, *rest: (torch.empty_like(x), torch.empty_like(weight),
                                  torch.empty_like(weight)))


def _ln_setup_context(ctx, inputs, output):
    x, weight, bias, *static, _pack_signs = inputs
    _, mean, invstd, _, _ = output
    ctx.save_for_backward(x, weight, bias, mean, invstd)
    ctx.static = static


def _ln_backward(ctx, dy, *_unused):
    dx, dweight, dbias = ln_region_backward(dy, *ctx.saved_tensors, *ctx.static)
    return dx, dweight, dbias, None, None, None, None, None


ln_region.register_autograd(_ln_backward, setup_context=_ln_setup_context)


def layer_norm_region(x, weight, bias, eps, activation, act_params, region, pack_signs=False):
    """What ``passes/fuse_regions.py`` puts in place of ``F.layer_norm -> activation``.
    Returns the output, or with ``pack_signs`` ``(output, its sign words, its STE words)``
    as a binarized linear layer packs them (``reference.pack_activation``): the ``x_bits``
    of the layers reading it."""
    out, _, _, signs, ste = ln_region(x, weight, bias, eps, activation, act_params, region, pack_signs)
    return (out, signs, ste) if pack_signs else out


# --------------------------------------------------------------------------- RMSNorm regions
# RMSNorm over the last dimension: ``weight * (x * rsqrt(mean(x^2) + eps))``, the chain
# ``transformers``' LlamaRMSNorm runs and ATen's ``rms_norm`` decomposes into; the region keeps
# ``x`` and the per-row ``invstd`` for backward, not the normalized float copy.

def _rms_pre_activation(x, weight, invstd):
    return weight * (x * invstd.unsqueeze(-1))


def _rms_region(x, weight, eps, activation, act_params, region, pack_signs=False):
    invstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    out = ACTIVATIONS[activation](_rms_pre_activation(x, weight, invstd.squeeze(-1)), act_params).contiguous()
    return out, invstd.squeeze(-1), *_packed_output(out, pack_signs, "linear")


rms_region = _define(
    f"rms_region(Tensor x, Tensor weight, {_LN_ARGS}, bool pack_signs=False) -> (Tensor, Tensor, Tensor, Tensor)",
    _rms_region,
    lambda x, weight, eps, activation, act_params, region, pack_signs=False: (
        x.new_empty(x.shape), x.new_empty(x.shape[:-1]), *_row_bits_fake(x, pack_signs)))


def _rms_region_backward(dy, x, weight, invstd, eps, activation, act_params, region):
    # ATen's backward of each link of the unfused chain, as autograd runs it (pow, mean,
    # add, rsqrt, the two multiplies).
    r = invstd.unsqueeze(-1)
    normalized = x * r
    dv = ACTIVATION_GRADS[activation](dy, weight * normalized, act_params)
    dweight = (dv * normalized).reshape(-1, x.shape[-1]).sum(0)
    dnormalized = dv * weight
    dr = (dnormalized * x).sum(-1, keepdim=True)
    dsquare = (-0.5 * dr * r.pow(3)).expand(x.shape) / x.shape[-1]
    return dnormalized * r + dsquare * (2.0 * x), dweight


rms_region_backward = _define(
    f"rms_region_backward(Tensor dy, Tensor x, Tensor weight, Tensor invstd, {_LN_ARGS}) -> (Tensor, Tensor)",
    _rms_region_backward,
    lambda dy, x, weight, *rest: (torch.empty_like(x), torch.empty_like(weight)))


def _rms_setup_context(ctx, inputs, output):
    x, weight, *static, _pack_signs = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.static = static


def _rms_backward(ctx, dy, *_unused):
    dx, dweight = rms_region_backward(dy, *ctx.saved_tensors, *ctx.static)
    return dx, dweight, None, None, None, None, None


rms_region.register_autograd(_rms_backward, setup_context=_rms_setup_context)


def rms_norm_region(x, weight, eps, activation, act_params, region, pack_signs=False):
    """What ``passes/fuse_regions.py`` puts in place of an RMSNorm chain (-> activation);
    ``pack_signs`` as in ``layer_norm_region``."""
    out, _, signs, ste = rms_region(x, weight, eps, activation, act_params, region, pack_signs)
    return (out, signs, ste) if pack_signs else out


# --------------------------------------------------------------------------- linear -> activation

def _linear_pre_activation(raw, alpha, bias):
    """``alpha ⊙ Y_raw (+ bias)`` as ``library.binarized_linear`` computes it (two roundings)."""
    v = raw.float() * alpha
    return v if bias is None else v + bias


def _linear_act_region(y, alpha, bias, contraction, activation, act_params, region, pack_signs=False):
    out = ACTIVATIONS[activation](_linear_pre_activation(y, alpha, bias), act_params).contiguous()
    return out, y.to(raw_dtype(contraction)), *_packed_output(out, pack_signs, "linear")


_LINEAR_ARGS = "str activation, float[] act_params, str region"

linear_act_region = _define(
    f"linear_act_region(Tensor y, Tensor alpha, Tensor? bias, int contraction, {_LINEAR_ARGS}, "
    "bool pack_signs=False) -> (Tensor, Tensor, Tensor, Tensor)",
    _linear_act_region,
    lambda y, alpha, bias, contraction, activation, act_params, region, pack_signs=False: (
        y.new_empty(y.shape), y.new_empty(y.shape, dtype=raw_dtype(contraction)), *_row_bits_fake(y, pack_signs)))


def _bias_grad(d, bias):
    return d.reshape(-1, d.shape[-1]).sum(0) if bias is not None else d.new_empty(0)


def _linear_act_region_backward(dy, raw, alpha, bias, activation, act_params, region):
    # ATen's backward of each link of the unfused chain (alpha is a constant: the default
    # alpha of the detached weight, docs/math.md §2).
    dv = ACTIVATION_GRADS[activation](dy, _linear_pre_activation(raw, alpha, bias), act_params)
    return dv, _bias_grad(dv, bias)


linear_act_region_backward = _define(
    "linear_act_region_backward(Tensor dy, Tensor raw, Tensor alpha, Tensor? bias, "
    f"{_LINEAR_ARGS}) -> (Tensor, Tensor)",
    _linear_act_region_backward,
    lambda dy, raw, alpha, bias, *rest: (dy.new_empty(raw.shape),
                                         dy.new_empty(alpha.shape if bias is not None else [0])))


def _linear_setup_context(ctx, inputs, output):
    _, alpha, bias, _, *static, _pack_signs = inputs
    ctx.save_for_backward(output[1], alpha, bias)
    ctx.static = static


def _linear_backward(ctx, dy, *_unused):
    raw, alpha, bias = ctx.saved_tensors
    dv, dbias = linear_act_region_backward(dy, raw, alpha, bias, *ctx.static)
    # G' = alpha ⊙ dv as its own multiply, which fold_alpha folds into the quantizer
    return dv * alpha, None, dbias if bias is not None else None, None, None, None, None, None


linear_act_region.register_autograd(_linear_backward, setup_context=_linear_setup_context)


def binary_linear_region(x, weight, bias, rng_state, layer, activation, act_params, region, x_bits=None,
                         pack_signs=False):
    """``library.binarized_linear`` (default alpha) followed by ``activation``, with the
    multiply by alpha and the bias add moved into the region: it gets the raw GEMM result and
    keeps it for backward as int16 (``raw_dtype``) instead of the float32 activation input.
    ``x_bits``: ``x``'s packed ``(sign words, STE words)`` (``library.binary_linear_raw``);
    ``pack_signs``: returns ``(output, its sign words, its STE words)`` as
    ``layer_norm_region`` does."""
    y = library.binary_linear_raw(x, weight, rng_state, layer, x_bits)
    alpha = weight_scale(weight.detach(), layer)
    out, _, signs, ste = linear_act_region(y, alpha, bias, weight.shape[1], activation, act_params, region,
                                           pack_signs)
    return (out, signs, ste) if pack_signs else out


# --------------------------------------------------------------------------- gated linear regions
# ``act(gate(x)) * up(x)`` of two binarized linear layers (SwiGLU with SiLU, GEGLU with GELU):
# one region takes both raw GEMM results, keeps both as int16 (``raw_dtype``) and returns
# the gradients at both layers' outputs.

def _gated_linear_region(y, alpha, bias, y_up, alpha_up, bias_up, contraction, activation, act_params, region,
                         pack_signs=False):
    dtype = raw_dtype(contraction)
    out = ACTIVATIONS[activation](_linear_pre_activation(y, alpha, bias), act_params)
    out = (out * _linear_pre_activation(y_up, alpha_up, bias_up)).contiguous()
    return out, y.to(dtype), y_up.to(dtype), *_packed_output(out, pack_signs, "linear")


gated_linear_region = _define(
    "gated_linear_region(Tensor y, Tensor alpha, Tensor? bias, Tensor y_up, Tensor alpha_up, Tensor? bias_up, "
    f"int contraction, {_LINEAR_ARGS}, bool pack_signs=False) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    _gated_linear_region,
    lambda y, alpha, bias, y_up, alpha_up, bias_up, contraction, activation, act_params, region, pack_signs=False: (
        y.new_empty(y.shape), y.new_empty(y.shape, dtype=raw_dtype(contraction)),
        y.new_empty(y.shape, dtype=raw_dtype(contraction)), *_row_bits_fake(y, pack_signs)))


def _gated_linear_region_backward(dy, raw, alpha, bias, raw_up, alpha_up, bias_up, activation, act_params,
                                  region):
    # ATen's backward of each link of the unfused chain: the product's (each factor's
    # gradient is dy times the other), then the activation's.
    v = _linear_pre_activation(raw, alpha, bias)
    du = dy * ACTIVATIONS[activation](v, act_params)
    dv = ACTIVATION_GRADS[activation](dy * _linear_pre_activation(raw_up, alpha_up, bias_up), v, act_params)
    return dv, _bias_grad(dv, bias), du, _bias_grad(du, bias_up)


gated_linear_region_backward = _define(
    "gated_linear_region_backward(Tensor dy, Tensor raw, Tensor alpha, Tensor? bias, Tensor raw_up, "
    f"Tensor alpha_up, Tensor? bias_up, {_LINEAR_ARGS}) -> (Tensor, Tensor, Tensor, Tensor)",
    _gated_linear_region_backward,
    lambda dy, raw, alpha, bias, raw_up, alpha_up, bias_up, *rest: (
        dy.new_empty(raw.shape), dy.new_empty(alpha.shape if bias is not None else [0]),
        dy.new_empty(raw.shape), dy.new_empty(alpha_up.shape if bias_up is not None else [0])))


def _gated_setup_context(ctx, inputs, output):
    _, alpha, bias, _, alpha_up, bias_up, _, *static, _pack_signs = inputs
    ctx.save_for_backward(output[1], alpha, bias, output[2], alpha_up, bias_up)
    ctx.static = static


def _gated_backward(ctx, dy, *_unused):
    raw, alpha, bias, raw_up, alpha_up, bias_up = ctx.saved_tensors
    dv, dbias, du, dbias_up = gated_linear_region_backward(dy, raw, alpha, bias, raw_up, alpha_up, bias_up,
                                                           *ctx.static)
    # G' of each layer as its own multiply by alpha, which fold_alpha folds into the quantizer
    return (dv * alpha, None, dbias if bias is not None else None, du * alpha_up, None,
            dbias_up if bias_up is not None else None, None, None, None, None, None)


gated_linear_region.register_autograd(_gated_backward, setup_context=_gated_setup_context)


def binary_gated_linear_region(x, weight, bias, x_up, weight_up, bias_up, rng_state, layer, layer_up, activation,
                               act_params, region, x_bits=None, x_up_bits=None, pack_signs=False):
    """Two ``library.binarized_linear`` calls (default alpha), ``activation`` after the first
    and their product, with both multiplies by alpha and bias adds moved into one region
    that keeps both raw GEMM results for backward (``raw_dtype`` of the longer contraction).
    ``x_bits``/``x_up_bits`` and ``pack_signs`` as in ``binary_linear_region``."""
    y = library.binary_linear_raw(x, weight, rng_state, layer, x_bits)
    y_up = library.binary_linear_raw(x_up, weight_up, rng_state, layer_up, x_up_bits)
    alpha, alpha_up = weight_scale(weight.detach(), layer), weight_scale(weight_up.detach(), layer_up)
    contraction = max(weight.shape[1], weight_up.shape[1])
    out, _, _, signs, ste = gated_linear_region(y, alpha, bias, y_up, alpha_up, bias_up, contraction, activation,
                                                act_params, region, pack_signs)
    return (out, signs, ste) if pack_signs else out
