"""Fused gradient ops: one SCQ path of one layer, from ``G'`` to its GEMM's result.

``passes/fuse_gradient_quantizers.py`` collapses each chain
``aq_sample -> quantize_gradient -> *_grad_q`` of the backward graph into one of these, so
the kernel backend can quantize straight into bit planes (never materializing the uint8
codes) and read a conv's ``G'`` in its NCHW layout (no permute copy). The names keep ``aq``
and ``quantize`` so the dumped backward graph still shows where each path is quantized.

``aq_quantize_conv2d_grads`` and ``aq_quantize_linear_grads`` are both paths of one layer in
one op (``passes/merge_gradient_paths.py``), so the kernels read ``G'`` for them once.

Reference implementation: exactly the unfused chain (``reference.quantize_gradient``, then
the dequantized float GEMM; for the two-path op, both chains), so fusing changes no number
on the reference backend.
"""
from __future__ import annotations

import torch

from . import reference as ref
from .rng import seed_and_step
from .library import _binary_conv2d as ref_binary_conv2d
from .library import _WITH_BITS, W_BITS, _binary_conv2d_fake, _binary_linear_fake, _define
from .library import _binary_linear as ref_binary_linear
from .library import _binary_linear_packed as ref_binary_linear_packed
from .library import _binary_linear_packed_fake

_CONV = "SymInt[] x_shape, int[] stride, int[] padding, int[] dilation"
_Q = "str method, int bits, int layer, Tensor? alpha=None"


def _scaled(gprime, alpha):
    """``G' = alpha ⊙ g`` when the graph handed the op ``g`` and alpha separately."""
    if alpha is None:
        return gprime
    shape = (1, -1, 1, 1) if gprime.dim() == 4 else (-1,)
    return gprime * alpha.reshape(shape)


def _quantized(g2d, rng_state, method, path, bits, rows_per_sample, layer):
    seed, step = seed_and_step(rng_state)
    q = ref.quantize_gradient(g2d, method, path, bits, rows_per_sample=rows_per_sample,
                              seed=seed, step=step, layer=layer)
    return q.dequantize()


def _conv_path(path, grad_fn):
    def impl(gprime, rng_state, w_sign_bits, w_ste_bits, w_shape, saved_bits, x_shape, stride,
             padding, dilation, method, bits, layer, alpha=None):
        gprime = _scaled(gprime, alpha)
        hw = gprime.shape[2] * gprime.shape[3]
        g2d = _quantized(ref.conv_rows(gprime), rng_state, method, path, bits, hw, layer)
        return grad_fn(ref.conv_unrows(g2d, gprime.shape), w_sign_bits, w_ste_bits, w_shape,
                       saved_bits, x_shape, stride, padding, dilation)
    return impl


def _linear_path(path, grad_fn):
    def impl(gprime, rng_state, w_sign_bits, w_ste_bits, w_shape, saved_bits, x_shape, method, bits,
             layer, alpha=None):
        gprime = _scaled(gprime, alpha)
        g2d = _quantized(gprime.reshape(-1, gprime.shape[-1]), rng_state, method, path, bits, 1,
                         layer)
        return grad_fn(g2d.reshape(gprime.shape), w_sign_bits, w_ste_bits, w_shape, saved_bits,
                       x_shape)
    return impl


def _like_x(gprime, rng_state, w_sign_bits, w_ste_bits, w_shape, saved_bits, x_shape, *rest):
    return gprime.new_empty(x_shape)


def _like_w(gprime, rng_state, w_sign_bits, w_ste_bits, w_shape, *rest):
    return gprime.new_empty(w_shape)


_conv_input = _conv_path(ref.PATH_INPUT, ref.conv2d_input_grad_packed)
_conv_weight = _conv_path(ref.PATH_WEIGHT, ref.conv2d_weight_grad_packed)
aq_quantize_conv2d_input_grad = _define(
    f"aq_quantize_conv2d_input_grad(Tensor gprime, Tensor rng_state, {W_BITS}, "
    f"Tensor x_ste_bits, {_CONV}, {_Q}) -> Tensor", _conv_input, _like_x)
aq_quantize_conv2d_weight_grad = _define(
    f"aq_quantize_conv2d_weight_grad(Tensor gprime, Tensor rng_state, {W_BITS}, "
    f"Tensor x_sign_bits, {_CONV}, {_Q}) -> Tensor", _conv_weight, _like_w)


# Both paths of one layer's G' in one op (``passes/merge_gradient_paths.py``), so the kernel
# backend reads G' for them once: a conv's per-sample groups (input path) and per-channel
# groups (weight path) are reductions of the same (sample, channel) pair minima and maxima,
# and a linear layer's alpha ⊙ g is formed once for both. Reference: the two path ops, one
# after the other.

def _conv_paths(gprime, rng_state, w_sign_bits, w_ste_bits, w_shape, x_ste_bits, x_sign_bits, x_shape,
                stride, padding, dilation, method, bits, layer, alpha=None):
    w_bits = (w_sign_bits, w_ste_bits, w_shape)
    rest = (x_shape, stride, padding, dilation, method, bits, layer, alpha)
    return (_conv_input(gprime, rng_state, *w_bits, x_ste_bits, *rest),
            _conv_weight(gprime, rng_state, *w_bits, x_sign_bits, *rest))


def _like_x_and_w(gprime, rng_state, w_sign_bits, w_ste_bits, w_shape, x_ste_bits, x_sign_bits, x_shape,
                  *rest):
    return gprime.new_empty(x_shape), gprime.new_empty(w_shape)


aq_quantize_conv2d_grads = _define(
    f"aq_quantize_conv2d_grads(Tensor gprime, Tensor rng_state, {W_BITS}, Tensor x_ste_bits, "
    f"Tensor x_sign_bits, {_CONV}, {_Q}) -> (Tensor, Tensor)",
    _conv_paths, _like_x_and_w)
_linear_input = _linear_path(ref.PATH_INPUT, ref.linear_input_grad_packed)
_linear_weight = _linear_path(ref.PATH_WEIGHT, ref.linear_weight_grad_packed)
aq_quantize_linear_input_grad = _define(
    f"aq_quantize_linear_input_grad(Tensor gprime, Tensor rng_state, {W_BITS}, "
    f"Tensor x_ste_bits, SymInt[] x_shape, {_Q}) -> Tensor", _linear_input, _like_x)
aq_quantize_linear_weight_grad = _define(
    f"aq_quantize_linear_weight_grad(Tensor gprime, Tensor rng_state, {W_BITS}, "
    f"Tensor x_sign_bits, SymInt[] x_shape, {_Q}) -> Tensor", _linear_weight, _like_w)


def _linear_paths(gprime, rng_state, w_sign_bits, w_ste_bits, w_shape, x_ste_bits, x_sign_bits, x_shape,
                  method, bits, layer, alpha=None):
    w_bits = (w_sign_bits, w_ste_bits, w_shape)
    rest = (x_shape, method, bits, layer, alpha)
    return (_linear_input(gprime, rng_state, *w_bits, x_ste_bits, *rest),
            _linear_weight(gprime, rng_state, *w_bits, x_sign_bits, *rest))


aq_quantize_linear_grads = _define(
    f"aq_quantize_linear_grads(Tensor gprime, Tensor rng_state, {W_BITS}, Tensor x_ste_bits, "
    f"Tensor x_sign_bits, SymInt[] x_shape, {_Q}) -> (Tensor, Tensor)",
    _linear_paths, _like_x_and_w)


# Forward ops with the per-channel scale folded in (``passes/fold_alpha.py``): the kernel
# applies alpha in the GEMM epilogue instead of a float pass over the layer's output; a
# linear layer's bias too (``alpha * y_raw + bias``, the same two float32 roundings).

def _binary_conv2d_scaled(x, weight, alpha, rng_state, stride, padding, dilation, layer):
    y, *bits = ref_binary_conv2d(x, weight, rng_state, stride, padding, dilation, layer)
    return y * alpha.reshape(1, -1, 1, 1), *bits


def _linear_epilogue(y, alpha, bias):
    """``alpha * y (+ bias)``: what a scaled linear op's GEMM epilogue computes."""
    y = y * alpha.reshape(-1)
    return y if bias is None else y + bias


def _binary_linear_scaled(x, weight, alpha, rng_state, layer, bias=None):
    y, *bits = ref_binary_linear(x, weight, rng_state, layer)
    return _linear_epilogue(y, alpha, bias), *bits


def _binary_conv2d_scaled_fake(x, weight, alpha, rng_state, *geometry_and_layer):
    return _binary_conv2d_fake(x, weight, rng_state, *geometry_and_layer)


def _binary_linear_scaled_fake(x, weight, alpha, rng_state, layer, bias=None):
    return _binary_linear_fake(x, weight, rng_state, layer)


binary_conv2d_scaled = _define(
    "binary_conv2d_scaled(Tensor x, Tensor weight, Tensor alpha, Tensor rng_state, int[] stride, "
    f"int[] padding, int[] dilation, int layer) -> {_WITH_BITS}",
    _binary_conv2d_scaled, _binary_conv2d_scaled_fake)
binary_linear_scaled = _define(
    "binary_linear_scaled(Tensor x, Tensor weight, Tensor alpha, Tensor rng_state, int layer, "
    f"Tensor? bias=None) -> {_WITH_BITS}",
    _binary_linear_scaled, _binary_linear_scaled_fake)


def _binary_linear_packed_scaled(x, x_sign_bits, x_ste_bits, weight, alpha, rng_state, layer, bias=None):
    y, *bits = ref_binary_linear_packed(x, x_sign_bits, x_ste_bits, weight, rng_state, layer)
    return _linear_epilogue(y, alpha, bias), *bits


def _binary_linear_packed_scaled_fake(x, x_sign_bits, x_ste_bits, weight, alpha, rng_state, layer, bias=None):
    return _binary_linear_packed_fake(x, x_sign_bits, x_ste_bits, weight, rng_state, layer)


binary_linear_packed_scaled = _define(
    "binary_linear_packed_scaled(Tensor x, Tensor x_sign_bits, Tensor x_ste_bits, Tensor weight, Tensor alpha, "
    "Tensor rng_state, int layer, Tensor? bias=None) -> (Tensor, Tensor, Tensor)",
    _binary_linear_packed_scaled, _binary_linear_packed_scaled_fake)

# forward op -> its alpha-folded op (which takes alpha right after the weight)
SCALED = {
    torch.ops.fqt.binary_conv2d.default: torch.ops.fqt.binary_conv2d_scaled.default,
    torch.ops.fqt.binary_linear.default: torch.ops.fqt.binary_linear_scaled.default,
    torch.ops.fqt.binary_linear_packed.default: torch.ops.fqt.binary_linear_packed_scaled.default,
}
# where a forward op takes its weight, when not second
WEIGHT_INPUT = {torch.ops.fqt.binary_linear_packed.default: 3}

# quantized-G' GEMM op -> its fused op
FUSED = {
    torch.ops.fqt.conv2d_input_grad_q.default: torch.ops.fqt.aq_quantize_conv2d_input_grad.default,
    torch.ops.fqt.conv2d_weight_grad_q.default: torch.ops.fqt.aq_quantize_conv2d_weight_grad.default,
    torch.ops.fqt.linear_input_grad_q.default: torch.ops.fqt.aq_quantize_linear_input_grad.default,
    torch.ops.fqt.linear_weight_grad_q.default: torch.ops.fqt.aq_quantize_linear_weight_grad.default,
}

# (input-path op, weight-path op) of one layer -> the op computing both with one statistics pass
MERGED = {
    (torch.ops.fqt.aq_quantize_conv2d_input_grad.default, torch.ops.fqt.aq_quantize_conv2d_weight_grad.default):
        torch.ops.fqt.aq_quantize_conv2d_grads.default,
    (torch.ops.fqt.aq_quantize_linear_input_grad.default, torch.ops.fqt.aq_quantize_linear_weight_grad.default):
        torch.ops.fqt.aq_quantize_linear_grads.default,
}
