"""Packing kernels on torch tensors: sign+pack, unpack, im2col+sign+pack (and transposed).

Layouts (``PackedBits``: bit ``k % 64`` of word ``k // 64``, zero past ``k`` and in the
padding words):

* ``pack_signs(x)``: ``x[..., K]`` -> rows = leading dims flattened, packed along K.
* ``pack_signs_and_ste(x)``: the same plus the STE mask ``|x| < 1`` in one pass; for a conv
  input pass ``x.flatten(1)`` (one row per sample, bit ``(c*H + h)*W + w``).
* ``im2col_pack(x, ...)``: rows ``r = (n, h', w')``, packed axis ``k = (c, kh, kw)``.
* ``im2col_pack_t(x, ...)``: rows ``k = (c, kh, kw)``, packed axis ``r = (n, h', w')``: the
  ``X̂ᵀ`` operand of the weight-gradient GEMM.
* ``transpose_bits(p)``: the transpose of any ``PackedBits`` matrix (64x64 blocks in registers).
* ``tap_gather(codes, ...)``: code words of G' per tap of a transposed convolution, the A
  operand of a conv's input gradient.

The im2col functions take float NCHW ``x`` or the per-sample sign bits of
``pack_signs_and_ste(x.flatten(1))`` together with ``input_shape``.
"""
from __future__ import annotations

from functools import partial

import torch

from ..codegen import pack as gen
from . import buffers, jit, threads as pool
from ..ops.reference import conv_output_size
from .jit import kernel_of
from .packed import PackedBits, padded_words

def parallel_rows(fn, rows: int, *args, min_rows: int = 1) -> None:
    """Call ``fn(*args, row0, row1)`` over ``[0, rows)``, one slice of at least ``min_rows``
    rows per thread of the shared pool."""
    slices = pool.split(rows, pool.num_threads(None), max(1, min_rows))
    pool.run([partial(fn, *args, lo, hi) for lo, hi in slices] or [partial(fn, *args, 0, 0)])


_GENERATORS = {"sign_pack": gen.sign_pack_ir, "unpack": gen.unpack_ir, "padded_rows": gen.padded_rows_ir,
               "im2col_pack": gen.im2col_pack_ir, "im2col_pack_t": gen.im2col_pack_t_ir,
               "transpose_bits": gen.transpose_bits_ir, "tap_gather": gen.tap_gather_ir}


def _fn(family: str, target, **options):
    return kernel_of(family, target, _GENERATORS[family], **options)


def _rows2d(x: torch.Tensor) -> torch.Tensor:
    if x.dtype != torch.float32:
        raise TypeError(f"expected a float32 tensor, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError("cannot pack a 0-d tensor")
    return x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x


def transpose_bits(p: PackedBits, *, target="host") -> PackedBits:
    """The ``k x rows`` transpose of a packed ``rows x k`` bit matrix (same layout rules)."""
    words = p.words if p.words.is_contiguous() else p.words.contiguous()
    out = buffers.empty((p.k, padded_words(p.rows)), torch.int64)
    parallel_rows(_fn("transpose_bits", target), (p.k + 63) // 64, words.data_ptr(), p.ld, p.rows, p.k,
                  out.data_ptr(), out.shape[1])
    return PackedBits(out, p.rows)


def pack_signs(x: torch.Tensor, *, target="host") -> PackedBits:
    """Sign bits of ``x[..., K]`` (any strides): rows = leading dims flattened, bit = ``x > 0``.
    ``pack_signs(w2d.T)`` packs ``sign(W)`` along output channels."""
    x2 = _rows2d(x)
    if x2.stride(1) != 1 and x2.shape[1] > 1:
        if x2.stride(0) == 1:
            # A transposed view: packing the contiguous rows, then a bit transpose, reads x once.
            return transpose_bits(pack_signs(x2.T, target=target), target=target)
        x2 = x2.contiguous()
    rows, k = x2.shape
    words = buffers.empty((rows, padded_words(k)), torch.int64)
    fn = _fn("sign_pack", target, with_ste=False)
    parallel_rows(fn, rows, x2.data_ptr(), x2.stride(0), k, words.data_ptr(), words.shape[1],
                  min_rows=16)
    return PackedBits(words, k)


# The last input packed with ``reuse=True``: (that tensor, its key, the packed bits). The
# tensor is held so that no other tensor (a freed and reallocated one, a recycled buffer) can
# occupy its memory while the entry lives; an in-place write bumps its version counter, which
# is part of the key.
_last_reused: tuple | None = None


def _reuse_key(x: torch.Tensor, target):
    if x.is_inference():          # inference tensors have no version counter
        return None
    return x.data_ptr(), x.shape, x.stride(), x._version, target


def pack_signs_and_ste(x: torch.Tensor, *, target="host", reuse=False) -> tuple[PackedBits, PackedBits]:
    """``(sign bits, STE mask bits |x| < 1)`` of ``x[..., K]`` in one pass, same layout as ``pack_signs``.

    ``reuse=True``: when ``x`` is the very tensor (same memory, shape, strides, unmodified) that
    the previous ``reuse=True`` call packed, return that call's bits instead of packing again.
    Several binarized layers reading one activation (attention's Q, K and V projections, a gated
    MLP's gate and up projections) then pack it once and save the same bits for backward. The
    bits are shared, so callers must not write into them. Off while a kernel hook is active, so
    that emission and verification see every request."""
    global _last_reused
    key = _reuse_key(x, target) if reuse and not jit.hooked() else None
    last = _last_reused
    if key is not None and last is not None and last[1] == key:
        return last[2]
    x2 = _rows2d(x)
    if x2.stride(1) != 1 and x2.shape[1] > 1:
        x2 = x2.contiguous()
    rows, k = x2.shape
    signs = buffers.empty((rows, padded_words(k)), torch.int64)
    mask = buffers.empty(signs.shape, torch.int64)
    fn = _fn("sign_pack", target, with_ste=True)
    parallel_rows(fn, rows, x2.data_ptr(), x2.stride(0), k, signs.data_ptr(), signs.shape[1],
                  mask.data_ptr(), min_rows=16)
    packed = PackedBits(signs, k), PackedBits(mask, k)
    if key is not None:
        _last_reused = x, key, packed
    return packed


def _words(words) -> torch.Tensor:
    """The word matrix of packed bits (``PackedBits`` or its ``words``), checked."""
    if isinstance(words, PackedBits):
        words = words.words
    if words.dtype != torch.int64 or words.dim() != 2 or not words.is_contiguous():
        raise TypeError("words must be a contiguous 2-D int64 tensor (PackedBits.words)")
    return words


def _unpack(words: torch.Tensor, k: int, shape, one: float, zero: float, target) -> torch.Tensor:
    words = _words(words)
    rows = words.shape[0]
    shape = tuple(shape)
    if torch.Size(shape).numel() != rows * k:
        raise ValueError(f"shape {shape} does not hold {rows} rows of {k} elements")
    out = buffers.empty((rows, k))
    fn = _fn("unpack", target)
    parallel_rows(fn, rows, words.data_ptr(), words.shape[1], k, out.data_ptr(), k, one, zero, min_rows=16)
    return out.view(shape)


def mask_in_place(words: torch.Tensor, k: int, x: torch.Tensor, *, target="host") -> torch.Tensor:
    """``x *= `` the float32 {0, 1} of packed mask bits ``words [rows, ld]`` (``k`` bits per
    row), in place and in one pass; ``x``: a contiguous float32 tensor of ``rows * k``
    elements. Equal to ``x.mul_(unpack_mask(words, k, x.shape))``."""
    words = _words(words)
    if x.dtype != torch.float32 or not x.is_contiguous() or x.numel() != words.shape[0] * k:
        raise ValueError(f"x must be a contiguous float32 tensor of {words.shape[0]} x {k} elements, "
                         f"got {x.dtype} {tuple(x.shape)}")
    parallel_rows(_fn("unpack", target, multiply=True), words.shape[0], words.data_ptr(), words.shape[1], k,
                  x.data_ptr(), k, 1.0, 0.0, min_rows=16)
    return x


def unpack_signs(words: torch.Tensor, k: int, shape, *, target="host") -> torch.Tensor:
    """float32 ±1 of packed sign bits ``words [rows, ld]`` (``k`` bits per row), viewed as ``shape``."""
    return _unpack(words, k, shape, 1.0, -1.0, target)


def unpack_mask(words: torch.Tensor, k: int, shape, *, target="host") -> torch.Tensor:
    """float32 {0, 1} of packed mask bits, viewed as ``shape`` (the STE mask of ``pack_signs_and_ste``)."""
    return _unpack(words, k, shape, 1.0, 0.0, target)


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _bitmap(x, input_shape, pad: tuple[int, int], target):
    """The padded row bitmap of docs/math.md §2's ``sign(pad(x, 0))`` (see ``codegen.pack``)."""
    if isinstance(x, PackedBits):
        if input_shape is None:
            raise ValueError("im2col from packed sign bits needs input_shape=(N, C, H, W)")
        n, c, h, w = input_shape
        if x.rows != n or x.k != c * h * w:
            raise ValueError(f"packed bits {x.rows}x{x.k} are not per-sample sign bits of {tuple(input_shape)}")
    else:
        if x.dim() != 4 or x.dtype != torch.float32:
            raise ValueError(f"expected a float32 NCHW tensor, got {x.dtype} {tuple(x.shape)}")
        if x.stride(3) != 1:
            x = x.contiguous()
        n, c, h, w = x.shape
    ph, pw = pad
    if ph > 63 or pw > 63:
        raise ValueError(f"padding {pad}: at most 63 supported")
    wpw = gen.bitmap_words(w, pw)
    bm = buffers.empty((n * c * h, wpw), torch.int64)
    if isinstance(x, PackedBits):
        parallel_rows(_fn("padded_rows", target, source="bits"), n * c * h, x.words.data_ptr(), x.ld, c, h, w, pw,
                      bm.data_ptr(), wpw, min_rows=64)
    else:
        parallel_rows(_fn("padded_rows", target, source="float"), n * c * h, x.data_ptr(), x.stride(0), x.stride(1),
                      x.stride(2), c, h, w, pw, bm.data_ptr(), wpw, min_rows=64)
    return bm, wpw, (n, c, h, w)


def _conv_args(x, kernel_size, stride, padding, dilation, input_shape, target):
    ks, st, pd, dl = map(_pair, (kernel_size, stride, padding, dilation))
    bm, wpw, (n, c, h, w) = _bitmap(x, input_shape, pd, target)
    oh = conv_output_size(h, ks[0], st[0], pd[0], dl[0])
    ow = conv_output_size(w, ks[1], st[1], pd[1], dl[1])
    if oh < 1 or ow < 1:
        raise ValueError(f"kernel {ks} with dilation {dl} does not fit the padded input {h}x{w}")
    conv = {"kernel_size": ks, "stride": st, "padding": pd, "dilation": dl, "one_word": wpw == 1}
    return bm, wpw, (n, c, h, w, oh, ow), conv


def im2col_pack(x, kernel_size, stride=1, padding=0, dilation=1, *, input_shape=None,
                target="host") -> PackedBits:
    """``sign(pad(x))`` unfolded and packed: rows ``r = (n, h', w')``, packed axis
    ``k = (c, kh, kw)`` (= ``weight.flatten(1)`` order); padding is bit 0 (-1)."""
    return _im2col_rows(*_conv_args(x, kernel_size, stride, padding, dilation, input_shape, target), target)


def _im2col_rows(bm, wpw, dims, conv, target) -> PackedBits:
    n, c, _, _, oh, ow = dims
    k = c * conv["kernel_size"][0] * conv["kernel_size"][1]
    out = buffers.empty((n * oh * ow, padded_words(k)), torch.int64)
    fn = _fn("im2col_pack", target, **conv)
    parallel_rows(fn, n * oh, bm.data_ptr(), wpw, dims[1], dims[2], oh, ow, out.data_ptr(), out.shape[1])
    return PackedBits(out, k)


# Output rows narrower than this append too few bits per step for the direct kernel; packing
# the rows and transposing 64x64 bit blocks is then faster (the crossover, measured on
# ResNet-18/VGG-16 layers at batch 128, lies between 8 and 16).
DIRECT_TRANSPOSE_MIN_WIDTH = 16


def im2col_pack_t(x, kernel_size, stride=1, padding=0, dilation=1, *, input_shape=None,
                  target="host") -> PackedBits:
    """The transpose of ``im2col_pack``: rows ``k = (c, kh, kw)``, packed axis ``r = (n, h', w')``."""
    bm, wpw, dims, conv = _conv_args(x, kernel_size, stride, padding, dilation, input_shape, target)
    n, c, h, _, oh, ow = dims
    if ow < DIRECT_TRANSPOSE_MIN_WIDTH:
        return transpose_bits(_im2col_rows(bm, wpw, dims, conv, target), target=target)
    k = c * conv["kernel_size"][0] * conv["kernel_size"][1]
    m = n * oh * ow
    out = buffers.empty((k, padded_words(m)), torch.int64)
    fn = _fn("im2col_pack_t", target, **conv)
    parallel_rows(fn, k, bm.data_ptr(), wpw, n, c, h, oh, ow, out.data_ptr(), out.shape[1])
    return PackedBits(out, m)


def tap_gather(codes: torch.Tensor, chunk: int, input_hw, output_hw, kernel_size, stride=1, padding=0,
               dilation=1, *, target="host") -> torch.Tensor:
    """Rows ``(plane, s, y, x)`` of int64 ``[P, S*H*W, padded_words(KH*KW*chunk*64)]``: per tap
    ``t = i*KW + j`` the first ``chunk`` words of the row of ``codes [P, S*OH*OW, ld]`` (``P``
    bit planes of ``S`` samples' output positions) that a transposed convolution's tap reads
    at input position ``(y, x)``, zero words where it reads padding or a stride hole
    (``codegen.pack.tap_gather_ir``)."""
    if codes.dtype != torch.int64 or codes.dim() != 3 or not codes.is_contiguous():
        raise TypeError(f"codes must be a contiguous int64 [planes, rows, words] tensor, got {codes.dtype} "
                        f"{tuple(codes.shape)}")
    (h, w), (oh, ow) = input_hw, output_hw
    ks, st, pd, dl = map(_pair, (kernel_size, stride, padding, dilation))
    planes, rows, ld = codes.shape
    if rows % (oh * ow) or not 1 <= chunk <= ld:
        raise ValueError(f"codes of {rows} rows x {ld} words are not {chunk}-word channel runs of "
                         f"{oh}x{ow} output maps")
    images = planes * rows // (oh * ow)
    out = buffers.empty((planes, images // planes * h * w, padded_words(ks[0] * ks[1] * chunk * 64)),
                        torch.int64)
    fn = _fn("tap_gather", target, kernel_size=ks, stride=st, padding=pd, dilation=dl, chunk=chunk)
    parallel_rows(fn, images * h, codes.data_ptr(), ld, h, w, oh, ow, out.data_ptr(), out.shape[2], min_rows=4)
    return out
