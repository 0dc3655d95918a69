"""The fqt IR: custom ops in the ``fqt`` namespace (schema, fake, reference, autograd).

Forward (one op per binarized layer, the forward GEMM):

* ``binary_conv2d`` / ``binary_linear`` return ``Y_raw`` (the ±1×±1 GEMM, before alpha and
  bias, which stay float ops in the graph so that a learned alpha gets its gradient from
  autograd and ``alpha ⊙ dL/dY`` arrives at the backward as ``G'``) plus the layer input's
  sign bits and STE-mask bits packed as ``reference.pack_activation`` documents, then the
  weight's sign bits and STE-mask bits (``reference.pack_weight``); those four, not the
  float input or weight, are what the backward saves. ``rng_state`` (int64 ``[seed, step]``)
  is an input only so that autograd saves it for the backward quantizers.
* ``binary_conv2d_packed`` is ``binary_conv2d`` given those two bit matrices of ``x`` (written
  by the fused region that produced ``x``) instead of packing ``x``; it returns ``Y_raw``
  and the weight's two bit matrices. ``x`` stays an input so that autograd routes the input
  gradient to it. ``binary_linear_packed`` is the same for ``binary_linear`` (the bits a
  LayerNorm, RMSNorm or linear -> activation region wrote).

Backward (one op per GEMM):

* ``mark_gradient`` tags ``G'`` of a layer with its RNG state and layer index; it is the
  identity, and the ``insert_gradient_quantizers`` pass replaces it by the quantizer chain
  of the layer's method (or removes it for ``none``).
* ``{conv2d,linear}_{input,weight}_grad`` take a float ``G'``; the ``_q`` variants take the
  quantized gradient ``(codes uint8 [rows, O], scale, zero, keep)`` of one SCQ path, the
  operands of a bit-plane popcount GEMM over kept groups. All take the weight as its saved
  bits ``(w_sign_bits, w_ste_bits, w_shape)``, never the float weight.
* ``aq_sample`` (group statistics + keep decisions) and ``quantize_gradient`` (stochastic
  rounding to b-bit codes) are the two stages of ``reference.quantize_gradient``.

Every op's CPU kernel is its ``"reference"`` entry in ``registry``.
"""
from __future__ import annotations

import torch

from . import reference as ref
from . import registry
from .rng import seed_and_step


def _define(schema: str, reference_impl, fake_impl):
    name, signature = schema.split("(", 1)
    qualname = f"fqt::{name}"
    op = torch.library.custom_op(qualname, reference_impl, mutates_args=(),
                                 schema="(" + signature)
    op.register_fake(fake_impl)
    registry.register(qualname, "reference", reference_impl)
    return op


_words = ref.padded_words


# --------------------------------------------------------------------------- forward

def _binary_conv2d(x, weight, rng_state, stride, padding, dilation, layer):
    y = ref.binary_conv2d(x, weight, torch.ones(weight.shape[0]), None, stride, padding, dilation)
    # The fake says contiguous; a channels_last x makes conv2d answer channels_last, and the
    # graph after this op (e.g. flatten lowered to aten.view) relies on the fake's strides.
    return (y.contiguous(), *ref.pack_activation(x, "conv2d"), *ref.pack_weight(weight))


def _binary_conv2d_fake(x, weight, rng_state, stride, padding, dilation, layer):
    n, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    y = x.new_empty(n, o, ref.conv_output_size(h, kh, stride[0], padding[0], dilation[0]),
                    ref.conv_output_size(w, kw, stride[1], padding[1], dilation[1]))
    words = x.new_empty(n, _words(c * h * w), dtype=torch.int64)
    return (y, words, torch.empty_like(words), *_weight_bits_fake(weight))


def _weight_bits_fake(weight):
    words = weight.new_empty(weight.shape[0], _words(weight[0].numel()), dtype=torch.int64)
    return words, torch.empty_like(words)


_WITH_BITS = "(Tensor, Tensor, Tensor, Tensor, Tensor)"   # Y_raw, x sign, x STE, W sign, W STE bits

binary_conv2d = _define(
    "binary_conv2d(Tensor x, Tensor weight, Tensor rng_state, int[] stride, int[] padding, "
    f"int[] dilation, int layer) -> {_WITH_BITS}",
    _binary_conv2d, _binary_conv2d_fake)


def _binary_conv2d_packed(x, x_sign_bits, x_ste_bits, weight, rng_state, stride, padding, dilation, layer):
    # From the sign bits, not from x: the op's result is the conv of the bits it is given.
    signs = torch.where(ref.unpack_activation(x_sign_bits, x.shape, "conv2d"), 1.0, -1.0)
    y = ref.binary_conv2d(signs, weight, torch.ones(weight.shape[0]), None, stride, padding, dilation)
    return y.contiguous(), *ref.pack_weight(weight)


def _binary_conv2d_packed_fake(x, x_sign_bits, x_ste_bits, weight, *rest):
    y, _, _, *w_bits = _binary_conv2d_fake(x, weight, *rest)
    return y, *w_bits


binary_conv2d_packed = _define(
    "binary_conv2d_packed(Tensor x, Tensor x_sign_bits, Tensor x_ste_bits, Tensor weight, Tensor rng_state, "
    "int[] stride, int[] padding, int[] dilation, int layer) -> (Tensor, Tensor, Tensor)",
    _binary_conv2d_packed, _binary_conv2d_packed_fake)


def _binary_linear(x, weight, rng_state, layer):
    y = ref.binary_linear(x, weight, torch.ones(weight.shape[0]), None)
    return (y, *ref.pack_activation(x, "linear"), *ref.pack_weight(weight))


def _binary_linear_fake(x, weight, rng_state, layer):
    y = x.new_empty(*x.shape[:-1], weight.shape[0])
    words = x.new_empty(x.numel() // x.shape[-1], _words(x.shape[-1]), dtype=torch.int64)
    return (y, words, torch.empty_like(words), *_weight_bits_fake(weight))


binary_linear = _define(
    f"binary_linear(Tensor x, Tensor weight, Tensor rng_state, int layer) -> {_WITH_BITS}",
    _binary_linear, _binary_linear_fake)


def _binary_linear_packed(x, x_sign_bits, x_ste_bits, weight, rng_state, layer):
    # From the sign bits, not from x, as _binary_conv2d_packed.
    signs = torch.where(ref.unpack_activation(x_sign_bits, x.shape, "linear"), 1.0, -1.0)
    return ref.binary_linear(signs, weight, torch.ones(weight.shape[0]), None), *ref.pack_weight(weight)


def _binary_linear_packed_fake(x, x_sign_bits, x_ste_bits, weight, rng_state, layer):
    y, _, _, *w_bits = _binary_linear_fake(x, weight, rng_state, layer)
    return y, *w_bits


binary_linear_packed = _define(
    "binary_linear_packed(Tensor x, Tensor x_sign_bits, Tensor x_ste_bits, Tensor weight, Tensor rng_state, "
    "int layer) -> (Tensor, Tensor, Tensor)",
    _binary_linear_packed, _binary_linear_packed_fake)


def binarized_conv2d(x, weight, bias, alpha, rng_state, stride, padding, dilation, layer):
    """The whole binarized layer the rewrite pass emits at the torch level: the forward op,
    then ``alpha`` (``mean |w|`` of the detached weight unless a learned alpha is given) and
    bias as float ops, so AOTAutograd derives ``G' = alpha ⊙ dL/dY`` for the backward."""
    y = binary_conv2d(x, weight, rng_state, stride, padding, dilation, layer)[0]
    alpha = ref.default_alpha(weight) if alpha is None else alpha
    y = y * alpha.view(1, -1, 1, 1)
    return y if bias is None else y + bias.view(1, -1, 1, 1)


def binary_linear_raw(x, weight, rng_state, layer, x_bits=None):
    """The raw GEMM result of a binarized linear layer: ``binary_linear``, or given ``x``'s
    packed ``x_bits`` (``(sign words, STE words)`` from the region that wrote ``x``),
    ``binary_linear_packed``, which reads them instead of packing ``x``."""
    if x_bits is None:
        return binary_linear(x, weight, rng_state, layer)[0]
    return binary_linear_packed(x, *x_bits, weight, rng_state, layer)[0]


def binarized_linear(x, weight, bias, alpha, rng_state, layer, x_bits=None):
    """Linear counterpart of ``binarized_conv2d``; ``x_bits`` as in ``binary_linear_raw``."""
    y = binary_linear_raw(x, weight, rng_state, layer, x_bits)
    y = y * (ref.default_alpha(weight) if alpha is None else alpha)
    return y if bias is None else y + bias


# --------------------------------------------------------------------------- float-G' GEMMs

def _mark_gradient(gprime, rng_state, layer):
    return gprime.clone()


mark_gradient = _define(
    "mark_gradient(Tensor gprime, Tensor rng_state, int layer) -> Tensor",
    _mark_gradient, lambda gprime, rng_state, layer: torch.empty_like(gprime))


def _grad_like_x(gprime, w_sign_bits, w_ste_bits, w_shape, saved_bits, x_shape, *conv_args):
    return gprime.new_empty(x_shape)


def _grad_like_w(gprime, w_sign_bits, w_ste_bits, w_shape, *rest):
    return gprime.new_empty(w_shape)


# The weight as the backward sees it: its ``reference.pack_weight`` bits and its shape.
W_BITS = "Tensor w_sign_bits, Tensor w_ste_bits, SymInt[] w_shape"
_CONV_GRAD_ARGS = "SymInt[] x_shape, int[] stride, int[] padding, int[] dilation"

conv2d_input_grad = _define(
    f"conv2d_input_grad(Tensor gprime, {W_BITS}, Tensor x_ste_bits, {_CONV_GRAD_ARGS}) "
    "-> Tensor", ref.conv2d_input_grad_packed, _grad_like_x)
conv2d_weight_grad = _define(
    f"conv2d_weight_grad(Tensor gprime, {W_BITS}, Tensor x_sign_bits, {_CONV_GRAD_ARGS}) "
    "-> Tensor", ref.conv2d_weight_grad_packed, _grad_like_w)
linear_input_grad = _define(
    f"linear_input_grad(Tensor gprime, {W_BITS}, Tensor x_ste_bits, SymInt[] x_shape) "
    "-> Tensor", ref.linear_input_grad_packed, _grad_like_x)
linear_weight_grad = _define(
    f"linear_weight_grad(Tensor gprime, {W_BITS}, Tensor x_sign_bits, SymInt[] x_shape) "
    "-> Tensor", ref.linear_weight_grad_packed, _grad_like_w)


# --------------------------------------------------------------------------- quantizers

def _n_groups(g2d, method, path, rows_per_sample):
    kind = ref.grouping(method, path)
    rows, cols = g2d.shape
    return {"tensor": 1, "sample": rows // rows_per_sample, "channel": cols}[kind]


def _aq_sample(g2d, rng_state, method, path, bits, rows_per_sample, layer):
    seed, step = seed_and_step(rng_state)
    return ref.sample_groups(g2d, method, path, bits, rows_per_sample=rows_per_sample,
                             seed=seed, step=step, layer=layer)


def _aq_sample_fake(g2d, rng_state, method, path, bits, rows_per_sample, layer):
    n = _n_groups(g2d, method, path, rows_per_sample)
    lo = g2d.new_empty(n)
    return lo, torch.empty_like(lo), g2d.new_empty(n, dtype=torch.bool), torch.empty_like(lo)


aq_sample = _define(
    "aq_sample(Tensor g2d, Tensor rng_state, str method, str path, int bits, "
    "SymInt rows_per_sample, int layer) -> (Tensor, Tensor, Tensor, Tensor)",
    _aq_sample, _aq_sample_fake)


def _quantize_gradient(g2d, lo, hi, keep, prob, rng_state, method, path, bits,
                       rows_per_sample, layer):
    seed, step = seed_and_step(rng_state)
    return ref.quantize_groups(g2d, lo, hi, keep, prob, method, path, bits,
                               rows_per_sample=rows_per_sample, seed=seed, step=step,
                               layer=layer)


def _quantize_gradient_fake(g2d, lo, hi, keep, prob, rng_state, method, path, bits,
                            rows_per_sample, layer):
    return g2d.new_empty(g2d.shape, dtype=torch.uint8), torch.empty_like(lo), torch.empty_like(lo)


quantize_gradient = _define(
    "quantize_gradient(Tensor g2d, Tensor lo, Tensor hi, Tensor keep, Tensor prob, "
    "Tensor rng_state, str method, str path, int bits, SymInt rows_per_sample, int layer) "
    "-> (Tensor, Tensor, Tensor)",
    _quantize_gradient, _quantize_gradient_fake)


# --------------------------------------------------------------------------- quantized-G' GEMMs

def _conv_gprime(codes, scale, zero, keep, grouping, x_shape, w_shape, stride, padding, dilation):
    n, _, h, w = x_shape
    o, _, kh, kw = w_shape
    ho = ref.conv_output_size(h, kh, stride[0], padding[0], dilation[0])
    wo = ref.conv_output_size(w, kw, stride[1], padding[1], dilation[1])
    g2d = ref.dequantize(codes, scale, zero, keep, grouping, ho * wo)
    return ref.conv_unrows(g2d, (n, o, ho, wo))


def _linear_gprime(codes, scale, zero, keep, grouping, x_shape, w_shape):
    g2d = ref.dequantize(codes, scale, zero, keep, grouping, 1)
    return g2d.reshape(*x_shape[:-1], w_shape[0])


def _conv_path_q(grad_fn):
    """A conv ``_q`` op: ``grad_fn`` (a float-G' reference) on the dequantized gradient."""
    def impl(codes, scale, zero, keep, w_sign_bits, w_ste_bits, w_shape, x_bits, x_shape, stride,
             padding, dilation, grouping):
        g = _conv_gprime(codes, scale, zero, keep, grouping, x_shape, w_shape, stride, padding,
                         dilation)
        return grad_fn(g, w_sign_bits, w_ste_bits, w_shape, x_bits, x_shape, stride, padding, dilation)
    return impl


def _linear_path_q(grad_fn):
    def impl(codes, scale, zero, keep, w_sign_bits, w_ste_bits, w_shape, x_bits, x_shape, grouping):
        g = _linear_gprime(codes, scale, zero, keep, grouping, x_shape, w_shape)
        return grad_fn(g, w_sign_bits, w_ste_bits, w_shape, x_bits, x_shape)
    return impl


def _q_like_x(codes, scale, zero, keep, w_sign_bits, w_ste_bits, w_shape, saved_bits, x_shape, *rest):
    return scale.new_empty(x_shape)


def _q_like_w(codes, scale, zero, keep, w_sign_bits, w_ste_bits, w_shape, *rest):
    return scale.new_empty(w_shape)


_QG = f"Tensor codes, Tensor scale, Tensor zero, Tensor keep, {W_BITS}"

conv2d_input_grad_q = _define(
    f"conv2d_input_grad_q({_QG}, Tensor x_ste_bits, {_CONV_GRAD_ARGS}, str grouping) -> Tensor",
    _conv_path_q(ref.conv2d_input_grad_packed), _q_like_x)
conv2d_weight_grad_q = _define(
    f"conv2d_weight_grad_q({_QG}, Tensor x_sign_bits, {_CONV_GRAD_ARGS}, str grouping) -> Tensor",
    _conv_path_q(ref.conv2d_weight_grad_packed), _q_like_w)
linear_input_grad_q = _define(
    f"linear_input_grad_q({_QG}, Tensor x_ste_bits, SymInt[] x_shape, str grouping) -> Tensor",
    _linear_path_q(ref.linear_input_grad_packed), _q_like_x)
linear_weight_grad_q = _define(
    f"linear_weight_grad_q({_QG}, Tensor x_sign_bits, SymInt[] x_shape, str grouping) -> Tensor",
    _linear_path_q(ref.linear_weight_grad_packed), _q_like_w)


# --------------------------------------------------------------------------- autograd

def _register_autograd(forward_op, input_grad, weight_grad, *, packed_input=False):
    """Backward of a binarized layer: the two GEMMs on ``G'`` (which autograd already scaled by
    alpha, a float op after the forward op), with the packed activations saved by the forward:
    its outputs, or with ``packed_input`` its inputs (``binary_{conv2d,linear}_packed``)."""

    def setup_context(ctx, inputs, output):
        if packed_input:
            x, sign_bits, ste_bits, weight, rng_state, *conv_args, layer = inputs
            _, w_sign_bits, w_ste_bits = output
        else:
            x, weight, rng_state, *conv_args, layer = inputs
            _, sign_bits, ste_bits, w_sign_bits, w_ste_bits = output
        # The weight's bits, not the weight: the backward needs sign(W) and |W| < 1 only.
        ctx.save_for_backward(w_sign_bits, w_ste_bits, sign_bits, ste_bits, rng_state)
        ctx.w_shape = list(weight.shape)
        ctx.gemm_args = (list(x.shape), *conv_args)
        ctx.layer = layer
        ctx.weight_input = 3 if packed_input else 1

    def backward(ctx, grad_y, *_grad_bits):
        w_sign_bits, w_ste_bits, sign_bits, ste_bits, rng_state = ctx.saved_tensors
        w_bits = (w_sign_bits, w_ste_bits, ctx.w_shape)
        gprime = mark_gradient(grad_y, rng_state, ctx.layer)
        grads = [None] * len(ctx.needs_input_grad)
        if ctx.needs_input_grad[0]:
            grads[0] = input_grad(gprime, *w_bits, ste_bits, *ctx.gemm_args)
        if ctx.needs_input_grad[ctx.weight_input]:
            grads[ctx.weight_input] = weight_grad(gprime, *w_bits, sign_bits, *ctx.gemm_args)
        return tuple(grads)

    forward_op.register_autograd(backward, setup_context=setup_context)


_register_autograd(binary_conv2d, conv2d_input_grad, conv2d_weight_grad)
_register_autograd(binary_conv2d_packed, conv2d_input_grad, conv2d_weight_grad, packed_input=True)
_register_autograd(binary_linear, linear_input_grad, linear_weight_grad)
_register_autograd(binary_linear_packed, linear_input_grad, linear_weight_grad, packed_input=True)

# Ops the passes look up by role.
FORWARD_OPS = {"conv2d": torch.ops.fqt.binary_conv2d.default,
               "linear": torch.ops.fqt.binary_linear.default}
# the saved x bits are inputs 1, 2
PACKED_INPUT_OPS = {torch.ops.fqt.binary_conv2d_packed.default, torch.ops.fqt.binary_linear_packed.default}
GRAD_OPS = {  # float-G' GEMM -> (layer kind, SCQ path, quantized-G' GEMM)
    torch.ops.fqt.conv2d_input_grad.default:
        ("conv2d", ref.PATH_INPUT, torch.ops.fqt.conv2d_input_grad_q.default),
    torch.ops.fqt.conv2d_weight_grad.default:
        ("conv2d", ref.PATH_WEIGHT, torch.ops.fqt.conv2d_weight_grad_q.default),
    torch.ops.fqt.linear_input_grad.default:
        ("linear", ref.PATH_INPUT, torch.ops.fqt.linear_input_grad_q.default),
    torch.ops.fqt.linear_weight_grad.default:
        ("linear", ref.PATH_WEIGHT, torch.ops.fqt.linear_weight_grad_q.default),
}
