"""Kernel implementations of the fqt ops: the ``"kernels"`` backend of ``ops/registry``.

Each function has its op's schema (plus the keywords ``layer_name``, for statistics, and
``target``, the Config's kernel target, that ``passes/bind_implementations`` adds) and chains
the JIT kernels:

forward      pack signs + STE bits of x (unless the region that wrote x packed them) -> im2col
             from the packed bits (a conv) -> binary GEMM; returns W's sign + STE bits for the
             backward
input grad   quantize G' per sample into bit planes (kept samples only) -> gather the code
             words of each tap (a transposed convolution) -> bit-plane GEMM with sign(W)
             packed along (tap, output channel), from the saved sign(W) bits -> zero-point
             term + STE mask
weight grad  quantize G' per channel into bit planes (kept channels only) -> bit-plane
             GEMM with sign(X) packed along im2col rows (from the saved bits) -> STE mask
             of W from its saved bits
both paths   the two above on one G': a conv's statistics pass, a linear layer's alpha ⊙ g
             run once for both

Nothing here calls a float GEMM. ``psq`` on the weight path (a per-sample scale varies
along that path's contraction, docs/math.md §4) runs a segmented bit-plane GEMM: one per sample
segment of the rows, against that sample's sign(X), each with its own scale, summed.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from ..ops import reference as ref
from ..ops import registry
from ..ops.rng import seed_and_step
from ..ops import fused  # noqa: F401  (defines the fused ops registered below)
from . import buffers, kernel_stats as stats
from .gemm import binary_gemm, bitplane_gemm, segmented_bitplane_gemm, signed_row_sums
from .pack import im2col_pack, im2col_pack_t, mask_in_place, pack_signs_and_ste, tap_gather, transpose_bits
from .packed import PackedBits, padded_words
from .quantize import SharedStatistics, quantize_bitplanes


def implements(op: str, *, glue: bool = False):
    """Register the decorated function as ``fqt::op``'s implementation on the "kernels"
    backend (``jit.kernel``, by contrast, turns one kernel spec into a callable).

    ``glue=True``: each call's time outside its timed phases is recorded as ``glue`` (the
    binarized layers' ops below, whose bodies are kernel phases and the Python and small
    torch ops between them; not the region ops, which run float convs untimed). The
    decorated name stays the bare function, so an op calling another counts once."""
    def wrap(fn):
        impl = stats.op_timed(fn) if glue else fn
        impl.takes_layer_name = True
        registry.register(f"fqt::{op}", "kernels", impl)
        return fn
    return wrap


def _float32(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous() if x.dtype == torch.float32 else x.float().contiguous()


@lru_cache(maxsize=64)
def _ones(n: int) -> torch.Tensor:
    """float32 ones [n], the scale of an unscaled layer's GEMM (which only reads it): one
    tensor per width, not one per call."""
    return torch.ones(n, dtype=torch.float32)


def _channels(alpha: torch.Tensor | None) -> torch.Tensor | None:
    """A per-channel scale as the contiguous float32 vector the kernels read: ``alpha``
    itself when it is one already (as when a backward op passes it on to ``_quantize``)."""
    if alpha is None or (alpha.dim() == 1 and alpha.dtype == torch.float32 and alpha.is_contiguous()
                         and not alpha.requires_grad):
        return alpha
    return alpha.detach().reshape(-1).float().contiguous()


# --------------------------------------------------------------------------- sign(W) operands

@dataclass
class _WeightSigns:
    """sign(W) of one conv or linear weight packed along its input axis per output channel
    (a conv's ``(c, kh, kw)``, a linear layer's features: the forward GEMM's B operand and the
    ``reference.pack_weight`` layout), its STE mask ``|W| < 1`` in the same layout, and the
    operands the backward derives from sign(W) (``derived``, keyed by what else they depend
    on), kept while no sign of W flips."""

    target: str
    signs: PackedBits
    ste: PackedBits
    derived: dict = field(default_factory=dict)


# id(weight) -> (weak reference to it, its _WeightSigns); an entry goes when its weight does.
_weight_signs_of: dict[int, tuple[weakref.ref, _WeightSigns]] = {}
# data_ptr of an entry's sign words -> the entry: how the backward, given those words (saved
# by the forward, which returned them), finds the operands derived from them.
_entry_of_signs: dict[int, _WeightSigns] = {}


def _weight_signs(weight: torch.Tensor, target) -> _WeightSigns:
    """sign(W) and STE bits of a conv or linear weight, packed by every forward (an edit
    through ``weight.data`` leaves no trace to check); when the sign bits equal the last
    entry's (no sign flipped since, as after an optimizer step that moved no weight across 0)
    that entry, its sign words and its derived operands stay."""
    key = id(weight)
    ref, entry = _weight_signs_of.get(key, (None, None))
    if ref is not None and ref() is not weight:
        ref, entry = None, None
    w = weight.detach()
    signs, ste = pack_signs_and_ste(w.reshape(w.shape[0], -1), target=target)
    if w.is_inference():               # no backward will read it: nothing is kept
        return _WeightSigns(target, signs, ste)
    if entry is not None and entry.target == target and torch.equal(entry.signs.words, signs.words):
        entry.ste = ste
        return entry
    if entry is not None:
        _entry_of_signs.pop(entry.signs.words.data_ptr(), None)
    entry = _WeightSigns(target, signs, ste)
    _entry_of_signs[signs.words.data_ptr()] = entry
    if ref is None:
        def forget(dead, key=key):
            if _weight_signs_of.get(key, (None,))[0] is dead:
                _entry_of_signs.pop(_weight_signs_of.pop(key)[1].signs.words.data_ptr(), None)
        ref = weakref.ref(weight, forget)
    _weight_signs_of[key] = (ref, entry)
    return entry


def _derived(w_sign_bits: torch.Tensor, target) -> dict:
    """The cache of operands derived from the sign words a forward returned (its entry's
    ``derived``, shared by the steps until a sign flips), or a fresh dict for other words."""
    entry = _entry_of_signs.get(w_sign_bits.data_ptr())
    if entry is not None and entry.target == target and entry.signs.words.shape == w_sign_bits.shape:
        return entry.derived
    return {}


# --------------------------------------------------------------------------- forward

def _conv_forward(x, weight, scale, stride, padding, dilation, layer_name, target, x_bits=None):
    """``(Y, x sign words, x STE words, W sign words, W STE words)``; ``x_bits``: x's words,
    already packed (then x's values are not read)."""
    n, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    oh = ref.conv_output_size(h, kh, stride[0], padding[0], dilation[0])
    ow = ref.conv_output_size(w, kw, stride[1], padding[1], dilation[1])
    with stats.timed(layer_name, "pack"):
        if x_bits is None:
            signs, mask = pack_signs_and_ste(_float32(x).view(n, -1), target=target, reuse=True)
        else:
            signs, mask = (_packed(words, x.shape, layer_name, "input") for words in x_bits)
        a = im2col_pack(signs, (kh, kw), stride, padding, dilation, input_shape=(n, c, h, w),
                        target=target)
        w_bits = _weight_signs(weight, target)
    with stats.timed(layer_name, "forward", binary_macs=n * oh * ow * o * c * kh * kw,
                     saved_bytes=signs.nbytes + mask.nbytes):
        y = binary_gemm(a, w_bits.signs, scale=scale, out_hw=oh * ow, target=target)
    return y.view(n, o, oh, ow), signs.words, mask.words, w_bits.signs.words, w_bits.ste.words


@implements("binary_conv2d", glue=True)
def binary_conv2d(x, weight, rng_state, stride, padding, dilation, layer, *, layer_name="?",
                  target="host"):
    return _conv_forward(x, weight, _ones(weight.shape[0]), stride, padding, dilation, layer_name,
                         target)


def _packed(words: torch.Tensor, shape, layer_name, what: str) -> PackedBits:
    """``words`` as the bits of the layer's ``what`` ("input" x or "weight" W) of ``shape``,
    packed row by row over all but the first dimension, checked."""
    n, k = shape[0], torch.Size(shape[1:]).numel()
    if words.dtype != torch.int64 or tuple(words.shape) != (n, padded_words(k)) or not words.is_contiguous():
        raise ValueError(f"layer {layer_name!r}: packed {what} bits must be contiguous int64 words of shape "
                         f"{(n, padded_words(k))} (pack_signs_and_ste of the {what} {tuple(shape)} flattened "
                         f"per row), got {words.dtype} {tuple(words.shape)}")
    return PackedBits(words, k)


@implements("binary_conv2d_packed", glue=True)
def binary_conv2d_packed(x, x_sign_bits, x_ste_bits, weight, rng_state, stride, padding, dilation, layer, *,
                         layer_name="?", target="host"):
    y, _, _, *w_bits = _conv_forward(x, weight, _ones(weight.shape[0]), stride, padding, dilation, layer_name,
                                     target, (x_sign_bits, x_ste_bits))
    return y, *w_bits


@implements("binary_conv2d_scaled", glue=True)
def binary_conv2d_scaled(x, weight, alpha, rng_state, stride, padding, dilation, layer, *,
                         layer_name="?", target="host"):
    return _conv_forward(x, weight, _channels(alpha), stride, padding, dilation, layer_name, target)


def _linear_forward(x, weight, scale, layer_name, target, bias=None, x_bits=None):
    """``(Y, x sign words, x STE words, W sign words, W STE words)``; ``x_bits``: x's words,
    already packed (then x's values are not read)."""
    o, f = weight.shape
    with stats.timed(layer_name, "pack"):
        if x_bits is None:
            x2 = _float32(x).reshape(-1, x.shape[-1])
            signs, mask = pack_signs_and_ste(x2, target=target, reuse=True)
        else:
            shape = (x.numel() // max(1, x.shape[-1]), x.shape[-1])
            signs, mask = (_packed(words, shape, layer_name, "input") for words in x_bits)
        w_bits = _weight_signs(weight, target)
    with stats.timed(layer_name, "forward", binary_macs=signs.rows * o * f,
                     saved_bytes=signs.nbytes + mask.nbytes):
        y = binary_gemm(signs, w_bits.signs, scale=scale, bias=_channels(bias), target=target)
    return y.view(*x.shape[:-1], o), signs.words, mask.words, w_bits.signs.words, w_bits.ste.words


@implements("binary_linear", glue=True)
def binary_linear(x, weight, rng_state, layer, *, layer_name="?", target="host"):
    return _linear_forward(x, weight, _ones(weight.shape[0]), layer_name, target)


@implements("binary_linear_scaled", glue=True)
def binary_linear_scaled(x, weight, alpha, rng_state, layer, bias=None, *, layer_name="?", target="host"):
    return _linear_forward(x, weight, _channels(alpha), layer_name, target, bias)


@implements("binary_linear_packed", glue=True)
def binary_linear_packed(x, x_sign_bits, x_ste_bits, weight, rng_state, layer, *, layer_name="?", target="host"):
    y, _, _, *w_bits = _linear_forward(x, weight, _ones(weight.shape[0]), layer_name, target,
                                       x_bits=(x_sign_bits, x_ste_bits))
    return y, *w_bits


@implements("binary_linear_packed_scaled", glue=True)
def binary_linear_packed_scaled(x, x_sign_bits, x_ste_bits, weight, alpha, rng_state, layer, bias=None, *,
                                layer_name="?", target="host"):
    y, _, _, *w_bits = _linear_forward(x, weight, _channels(alpha), layer_name, target, bias,
                                       x_bits=(x_sign_bits, x_ste_bits))
    return y, *w_bits


# --------------------------------------------------------------------------- backward

def _quantize(layer_name, g, method, path, bits, rows_per_sample, rng_state, layer, target, alpha,
              shared=None):
    seed, step = seed_and_step(rng_state)
    with stats.timed(layer_name, "quantize"):
        return quantize_bitplanes(_float32(g), method, path, bits, rows_per_sample=rows_per_sample,
                                  seed=seed, step=step, layer=layer, alpha=_channels(alpha),
                                  target=target, shared=shared)


def _planar_gemm(layer_name, kind, q, b: PackedBits, out_rows: int, target, colsum=None):
    m = q.planes.shape[1]
    with stats.timed(layer_name, kind, binary_macs=q.bits * m * b.rows * b.k):
        # The kernel writes the pruned rows' zeros too: no memset of the output first.
        return bitplane_gemm(q.planes, b, row_scale=q.row_scale, row_zero=q.row_zero,
                             row_map=q.row_map, out_rows=out_rows, colsum=colsum, target=target)


def _weight_gemm(layer_name, q, segments: list[PackedBits], w_ste_bits, w_shape, target):
    """The weight-gradient GEMM of ``q`` against sign(X) packed along the rows: ``segments``
    holds one operand, or one per sample segment when ``q`` is segmented (``psq``); then
    the weight's STE mask from its saved bits ``w_ste_bits``."""
    o = w_shape[0]
    ste = _packed(w_ste_bits, w_shape, layer_name, "weight STE")
    if q.segments == 1:
        dw = _planar_gemm(layer_name, "weight_grad", q, segments[0], o, target)
    else:
        b = segments[0]
        with stats.timed(layer_name, "weight_grad", binary_macs=q.bits * q.planes.shape[1] * b.rows * b.k):
            dw = segmented_bitplane_gemm(q.planes, segments, row_scale=q.row_scale, row_zero=q.row_zero,
                                         target=target)
    with stats.timed(layer_name, "ste_mask"):
        # One pass over dW reading 1 bit per weight, instead of |W| < 1 as float (a pass
        # that writes a weight-sized tensor) and a product; pruned rows are 0 either way, and
        # a NaN in dW stays NaN (times 0 or 1), as in the reference.
        return mask_in_place(ste, ste.k, dw, target=target).view(w_shape)


@lru_cache(maxsize=64)
def _taps_reading(geometry) -> torch.Tensor:
    """float32 ``[H*W, KH*KW]``: 1 where the tap reads an output position at the input position
    (not padding or a stride hole); per geometry, since a sign flip rebuilds the operand below."""
    h, w, oh, ow, *conv = geometry
    return (ref.transposed_conv_taps((h, w), (oh, ow), *conv) >= 0).float()


def _weight_input_grad_operand(w_sign_bits, w_shape, geometry, layer_name, target) -> tuple[PackedBits, torch.Tensor]:
    """``(B, T)`` of the input gradient below, built from the sign(W) bits the forward saved
    and kept with them (per geometry) until a sign flips (``_derived``): sign(W) bits along
    (c, i, j), bit-transposed to rows (c, i, j) along o; the first ``chunk`` words of each row,
    C rows of kh*kw taps, are the B operand [C, (i, j, o)]. ``T[c, y*w + x]`` sums
    ``sum_o sign(W)`` of the taps that read input position (y, x)."""
    derived = _derived(w_sign_bits, target)
    found = derived.get(("input_grad", geometry))
    if found is not None:
        return found
    if len(derived) >= 8:              # input sizes that vary from step to step: keep the latest
        derived.clear()
    o, c, kh, kw = w_shape
    chunk = (o + 63) // 64
    wt = transpose_bits(_packed(w_sign_bits, w_shape, layer_name, "weight sign"), target=target)
    b_words = torch.zeros(c, padded_words(kh * kw * chunk * 64), dtype=torch.int64)
    b_words[:, :kh * kw * chunk] = wt.words[:, :chunk].reshape(c, kh * kw * chunk)
    tap_sums = signed_row_sums(wt, target=target).view(c, kh * kw)   # sum_o sign(W) per tap
    t_term = (tap_sums.unsqueeze(1) * _taps_reading(geometry).unsqueeze(0)).sum(2)
    found = derived[("input_grad", geometry)] = PackedBits(b_words, kh * kw * chunk * 64), t_term
    return found


@implements("aq_quantize_conv2d_input_grad", glue=True)
def conv2d_input_grad(gprime, rng_state, w_sign_bits, w_ste_bits, w_shape, x_ste_bits, x_shape, stride, padding,
                      dilation, method, bits, layer, alpha=None, *, layer_name="?", target="host", shared=None):
    """dX as a transposed convolution: rows ``(n, y, x)`` of the input, contraction over the
    taps ``(i, j, o)``, columns ``c``. G' codes are gathered per tap as whole words (the
    channel run of one output position), so no im2col-layout gradient (kh kw times the size
    of dX) and no col2im exist. Dequantization: ``dX = s_n dot + z_n T[c, y, x]`` with
    ``T = sum over valid taps of sum_o sign(W)`` (padding and stride holes have code 0 and
    are not in T), then the STE mask; pruned samples are 0. ``shared``: the
    ``SharedStatistics`` of this G' when the weight path reads it too."""
    n, c, h, w = x_shape
    o, _, kh, kw = w_shape
    oh, ow = gprime.shape[2], gprime.shape[3]
    q = _quantize(layer_name, gprime, method, ref.PATH_INPUT, bits, oh * ow, rng_state, layer, target,
                  alpha, shared)
    geometry = (h, w, oh, ow, (kh, kw), tuple(stride), tuple(padding), tuple(dilation))
    samples = q.row_map.view(-1, oh * ow)[:, 0] // (oh * ow) if q.row_map.numel() else q.row_map
    kept = samples.numel()
    chunk = (o + 63) // 64                       # words of one tap's channel run
    with stats.timed(layer_name, "pack"):
        b, t_term = _weight_input_grad_operand(w_sign_bits, w_shape, geometry, layer_name, target)
        rows = kept * h * w
        planes = tap_gather(q.planes, chunk, (h, w), (oh, ow), (kh, kw), stride, padding, dilation,
                            target=target)
    scale = q.row_scale.view(-1, oh * ow)[:, 0] if kept else q.row_scale
    zero = q.row_zero.view(-1, oh * ow)[:, 0] if kept else q.row_zero
    with stats.timed(layer_name, "input_grad", binary_macs=bits * rows * c * b.k):
        dot = bitplane_gemm(planes, b, row_scale=scale.repeat_interleave(h * w), row_zero=torch.zeros(rows),
                            row_map=torch.arange(rows), out_rows=rows, colsum=torch.zeros(c),
                            out=buffers.empty((rows, c)), target=target)
    with stats.timed(layer_name, "dequantize"):
        # addcmul reads the (kept, h*w, c) GEMM result through a transposed view and writes
        # NCHW (out= fixes the layout): the transpose costs no pass of its own.
        dx_kept = torch.addcmul(dot.view(kept, h * w, c).transpose(1, 2), zero.view(-1, 1, 1),
                                t_term.view(1, c, h * w), out=buffers.empty((kept, c, h * w))).view(kept, c, h, w)
        ste = x_ste_bits if kept == n else x_ste_bits.index_select(0, samples)
        mask_in_place(ste, c * h * w, dx_kept, target=target)
        if kept == n:
            return dx_kept
        return buffers.zeros((n, c, h, w)).index_copy_(0, samples, dx_kept)   # pruned samples are 0


@implements("aq_quantize_conv2d_weight_grad", glue=True)
def conv2d_weight_grad(gprime, rng_state, w_sign_bits, w_ste_bits, w_shape, x_sign_bits, x_shape, stride, padding,
                       dilation, method, bits, layer, alpha=None, *, layer_name="?", target="host", shared=None):
    n, c, h, w = x_shape
    o, _, kh, kw = w_shape
    q = _quantize(layer_name, gprime, method, ref.PATH_WEIGHT, bits, gprime.shape[2] * gprime.shape[3],
                  rng_state, layer, target, alpha, shared)
    samples = [(x_sign_bits, n)] if q.segments == 1 else [(x_sign_bits[i:i + 1], 1) for i in range(n)]
    with stats.timed(layer_name, "pack"):
        xt = [im2col_pack_t(PackedBits(bits_, c * h * w), (kh, kw), stride, padding, dilation,
                            input_shape=(count, c, h, w), target=target) for bits_, count in samples]
    return _weight_gemm(layer_name, q, xt, w_ste_bits, w_shape, target)


@implements("aq_quantize_conv2d_grads", glue=True)
def conv2d_grads(gprime, rng_state, w_sign_bits, w_ste_bits, w_shape, x_ste_bits, x_sign_bits, x_shape, stride,
                 padding, dilation, method, bits, layer, alpha=None, *, layer_name="?", target="host"):
    """``(dX, dW)``: both paths above on one G', whose statistics pass runs once."""
    g, alpha, shared = _float32(gprime), _channels(alpha), SharedStatistics()
    w_bits = (w_sign_bits, w_ste_bits, w_shape)
    rest = (x_shape, stride, padding, dilation, method, bits, layer, alpha)
    return (conv2d_input_grad(g, rng_state, *w_bits, x_ste_bits, *rest, layer_name=layer_name, target=target,
                              shared=shared),
            conv2d_weight_grad(g, rng_state, *w_bits, x_sign_bits, *rest, layer_name=layer_name, target=target,
                               shared=shared))


def _linear_input_grad_operand(w_sign_bits, w_shape, layer_name, target) -> tuple[PackedBits, torch.Tensor]:
    """``(sign(W)ᵀ, its ±1 row sums)``: the input gradient's B operand, packed along the
    output channels, and its dequantization column sums; bit-transposed from the sign(W)
    bits the forward saved and kept with them until a sign flips (``_derived``)."""
    derived = _derived(w_sign_bits, target)
    found = derived.get("linear_input_grad")
    if found is None:
        wt = transpose_bits(_packed(w_sign_bits, w_shape, layer_name, "weight sign"), target=target)
        found = derived["linear_input_grad"] = wt, signed_row_sums(wt, target=target)
    return found


@implements("aq_quantize_linear_input_grad", glue=True)
def linear_input_grad(gprime, rng_state, w_sign_bits, w_ste_bits, w_shape, x_ste_bits, x_shape, method, bits,
                      layer, alpha=None, *, layer_name="?", target="host", shared=None):
    o, f = w_shape
    g2 = gprime.reshape(-1, o)
    q = _quantize(layer_name, g2, method, ref.PATH_INPUT, bits, 1, rng_state, layer, target, alpha, shared)
    with stats.timed(layer_name, "pack"):
        wt, colsum = _linear_input_grad_operand(w_sign_bits, w_shape, layer_name, target)
    dx = _planar_gemm(layer_name, "input_grad", q, wt, q.out_rows, target, colsum)
    with stats.timed(layer_name, "ste_mask"):
        mask_in_place(x_ste_bits, f, dx, target=target)
    return dx.view(x_shape)


@implements("aq_quantize_linear_weight_grad", glue=True)
def linear_weight_grad(gprime, rng_state, w_sign_bits, w_ste_bits, w_shape, x_sign_bits, x_shape, method, bits,
                       layer, alpha=None, *, layer_name="?", target="host", shared=None):
    o, f = w_shape
    g2 = gprime.reshape(-1, o)
    q = _quantize(layer_name, g2, method, ref.PATH_WEIGHT, bits, 1, rng_state, layer, target, alpha, shared)
    rows = [x_sign_bits] if q.segments == 1 else x_sign_bits.split(1)
    with stats.timed(layer_name, "pack"):   # sign(X) along the rows
        xt = [transpose_bits(PackedBits(r, f), target=target) for r in rows]
    return _weight_gemm(layer_name, q, xt, w_ste_bits, w_shape, target)


@implements("aq_quantize_linear_grads", glue=True)
def linear_grads(gprime, rng_state, w_sign_bits, w_ste_bits, w_shape, x_ste_bits, x_sign_bits, x_shape, method,
                 bits, layer, alpha=None, *, layer_name="?", target="host"):
    """``(dX, dW)``: both paths above on one G', whose groups (its rows for dX, its
    columns for dW) come from one pass of the row/column statistics kernel; alpha is
    multiplied in on the fly by that kernel and the quantizers, so no ``alpha ⊙ g`` is
    written."""
    g, alpha, shared = _float32(gprime), _channels(alpha), SharedStatistics()
    w_bits = (w_sign_bits, w_ste_bits, w_shape)
    rest = (x_shape, method, bits, layer, alpha)
    return (linear_input_grad(g, rng_state, *w_bits, x_ste_bits, *rest, layer_name=layer_name, target=target,
                              shared=shared),
            linear_weight_grad(g, rng_state, *w_bits, x_sign_bits, *rest, layer_name=layer_name, target=target,
                               shared=shared))
