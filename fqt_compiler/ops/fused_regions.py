"""Fused float regions: BatchNorm -> activation -> max pool as one op (kernel backend).

``passes/fuse_regions.py`` replaces such a chain of the captured graph by
``batch_norm_region`` (below), which calls the op ``fqt::bn_region`` and then updates the
running statistics with the graph's momentum, as ``F.batch_norm`` does. The op returns the
region's output, the max pool's argmax as one byte per output (the offset ``i * kw + j``
inside the window, not an int64 index), and the per-channel ``mean``, biased ``var`` and
``invstd``. Its backward (``fqt::bn_region_backward``) keeps only ``x``, the argmax bytes
and the two per-channel vectors: the activation mask is recomputed from ``x``, the float
BatchNorm output, activation output and int64 pool indices of the unfused chain are never
saved.

Reference implementations: exactly the unfused chain (``F.batch_norm``, the activation,
``F.max_pool2d``; the backward is ATen's backward formula of each link of that chain), so
the reference of a fused op is the computation it replaced. The math is docs/math.md (BatchNorm).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .library import _define

# Activation name -> the float op it fuses (params: Hardtanh (min, max), LeakyReLU (slope,)).
ACTIVATIONS = {
    "none": lambda v, p: v,
    "relu": lambda v, p: F.relu(v),
    "hardtanh": lambda v, p: F.hardtanh(v, p[0], p[1]),
    "leaky_relu": lambda v, p: F.leaky_relu(v, p[0]),
}


def _chain(x, weight, bias, mean, invstd, training, eps, activation, act_params, pool, ceil_mode):
    """The unfused chain: BatchNorm (batch statistics when training, else ``mean``/``invstd``),
    the activation, the max pool; returns the output and ATen's int64 pool indices."""
    if training:
        v = F.batch_norm(x, None, None, weight, bias, True, 0.0, eps)
    else:
        shape = (1, -1, 1, 1)
        v = (x - mean.view(shape)) * invstd.view(shape) * weight.view(shape) + bias.view(shape)
    v = ACTIVATIONS[activation](v, act_params)
    if not pool:
        return v, None
    kh, kw, sh, sw, ph, pw = pool
    return F.max_pool2d(v, (kh, kw), (sh, sw), (ph, pw), ceil_mode=ceil_mode, return_indices=True)


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


def _bn_region(x, weight, bias, running_mean, running_var, training, eps, activation, act_params,
               pool, ceil_mode, region):
    if training:
        var, mean = torch.var_mean(x, (0, 2, 3), correction=0)
    else:
        mean, var = running_mean.clone(), running_var.clone()
    invstd = torch.rsqrt(var + eps)
    out, indices = _chain(x, weight, bias, mean, invstd, training, eps, activation, act_params,
                          pool, ceil_mode)
    arg = window_offsets(indices, x.shape[3], pool) if pool else x.new_empty(0, dtype=torch.uint8)
    return out.contiguous(), arg, mean, var, invstd


def pooled_shape(x_shape, pool, ceil_mode):
    if not pool:
        return list(x_shape)
    kh, kw, sh, sw, ph, pw = pool
    n, c, h, w = x_shape
    return [n, c, _pool_out(h, kh, sh, ph, ceil_mode), _pool_out(w, kw, sw, pw, ceil_mode)]


def _pool_out(size, k, s, p, ceil_mode):
    """ATen's ``pooling_output_shape`` (dilation 1): with ceil_mode the last window must
    start inside the input or the left padding."""
    out = (size + 2 * p - k + (s - 1 if ceil_mode else 0)) // s + 1
    return out - 1 if ceil_mode and (out - 1) * s >= size + p else out


def _bn_region_fake(x, weight, bias, running_mean, running_var, training, eps, activation,
                    act_params, pool, ceil_mode, region):
    shape = pooled_shape(x.shape, pool, ceil_mode)
    out = x.new_empty(shape)
    arg = x.new_empty(shape if pool else [0], dtype=torch.uint8)
    c = x.shape[1]
    return out, arg, x.new_empty(c), x.new_empty(c), x.new_empty(c)


_ARGS = "str activation, float[] act_params, int[] pool, bool ceil_mode, str region"

bn_region = _define(
    "bn_region(Tensor x, Tensor weight, Tensor bias, Tensor? running_mean, Tensor? running_var, "
    f"bool training, float eps, {_ARGS}) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    _bn_region, _bn_region_fake)


def _bn_region_backward(dy, x, arg, weight, bias, mean, invstd, training, eps, activation,
                        act_params, pool, ceil_mode, region):
    # The unfused chain's backward, ATen's formula for each link (what autograd runs for it),
    # written out: an op implementation runs below the autograd dispatch key, where nested
    # autograd would not record.
    shape = (1, -1, 1, 1)
    v = ((x - mean.view(shape)) * invstd.view(shape) * weight.view(shape) + bias.view(shape)
         if not training else F.batch_norm(x, None, None, weight, bias, True, 0.0, eps))
    a = ACTIVATIONS[activation](v, act_params)
    if pool:
        # The pool's gradient goes where the forward's argmax bytes say, not where a
        # recomputed max would be: at a tie within float rounding the two may differ.
        kh, kw, sh, sw, ph, pw = pool
        indices = flat_indices(arg, x.shape[3], pool)
        dy = torch.ops.aten.max_pool2d_with_indices_backward(
            dy, a, [kh, kw], [sh, sw], [ph, pw], [1, 1], ceil_mode, indices)
    dv = ACTIVATION_GRADS[activation](dy, v, act_params)
    if training:
        return torch.ops.aten.native_batch_norm_backward(
            dv, x, weight, None, None, mean, invstd, True, eps, [True, True, True])
    xhat = (x - mean.view(shape)) * invstd.view(shape)
    return (dv * (invstd * weight).view(shape), (dv * xhat).sum((0, 2, 3)), dv.sum((0, 2, 3)))


# Activation name -> ATen's backward of it, as a function of (grad, input, params).
ACTIVATION_GRADS = {
    "none": lambda d, v, p: d,
    "relu": lambda d, v, p: torch.ops.aten.threshold_backward(d, v, 0),
    "hardtanh": lambda d, v, p: torch.ops.aten.hardtanh_backward(d, v, p[0], p[1]),
    "leaky_relu": lambda d, v, p: torch.ops.aten.leaky_relu_backward(d, v, p[0], False),
}


bn_region_backward = _define(
    "bn_region_backward(Tensor dy, Tensor x, Tensor arg, Tensor weight, Tensor bias, Tensor mean, "
    f"Tensor invstd, bool training, float eps, {_ARGS}) -> (Tensor, Tensor, Tensor)",
    _bn_region_backward,
    lambda dy, x, arg, weight, *rest: (torch.empty_like(x), torch.empty_like(weight),
                                       torch.empty_like(weight)))


def _setup_context(ctx, inputs, output):
    x, weight, bias, _, _, training, eps, activation, act_params, pool, ceil_mode, region = inputs
    _, arg, mean, _, invstd = output
    ctx.save_for_backward(x, arg, weight, bias, mean, invstd)
    ctx.static = (training, eps, activation, act_params, pool, ceil_mode, region)


def _backward(ctx, dy, *_unused):
    x, arg, weight, bias, mean, invstd = ctx.saved_tensors
    dx, dweight, dbias = bn_region_backward(dy, x, arg, weight, bias, mean, invstd, *ctx.static)
    return dx, dweight, dbias, *[None] * 9


bn_region.register_autograd(_backward, setup_context=_setup_context)


def batch_norm_region(x, running_mean, running_var, weight, bias, training, momentum, eps,
                      activation, act_params, pool, ceil_mode, region):
    """What ``passes/fuse_regions.py`` puts in place of ``F.batch_norm -> activation ->
    max pool``: the fused op, then the running statistics updated in place with ``momentum``
    and the unbiased batch variance, as ``F.batch_norm`` updates them."""
    out, _, mean, var, _ = bn_region(x, weight, bias, running_mean, running_var, training, eps,
                                     activation, act_params, pool, ceil_mode, region)
    if training and running_mean is not None:
        count = x.numel() // x.shape[1]
        with torch.no_grad():
            running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
            running_var.mul_(1 - momentum).add_(var * (count / max(count - 1, 1)), alpha=momentum)
    return out
