"""Dropout with a counter-based mask: ``fqt::dropout`` and its backward.

``y = x * m`` with ``m[i] = keep[i] ? scale : 0``, ``scale = float32(1 / (1 - p))`` and

    keep[i] = (draw(i) >> 11) < (1 - p) * 2**53

the Bernoulli(1 - p) draw of ``rng.bernoulli`` (53 random bits: the keep rate is ``1 - p``
rounded up to the 2**-53 grid) on the stream ``rng.stream_key(seed, step, site,
STREAM_DROPOUT)``, ``i`` the element's index in ``x``'s row-major order. The kernels draw the
same numbers from the same counter, so reference and kernels agree draw for draw and ``y``
is the same bits whatever the thread count or blocking. ``x * m`` rather than a select
keeps torch's semantics for a NaN or Inf input: it stays NaN where dropped, as
``x * mask * scale`` does in ATen.

``site`` identifies the dropout call (``site_id``: the module path and the occurrence of that
module's dropout in the graph), so sites and steps draw different masks and the same
``(seed, step)`` draws the same ones.

The op returns ``y`` and ``keep`` packed 1 bit per element (``keep_bits``: bit ``i % 8`` of
byte ``i // 8``, the padding bits of the last byte zero), and its backward
(``fqt::dropout_backward``: ``dx = dy * m``) keeps those bits. Saving them rather than
redrawing the mask in backward: 1/32 of ``x``'s bytes to keep, and reading one byte per
eight elements costs less than redrawing, which is two 64-bit multiplies per element (no
64-bit vector multiply on AVX2 or NEON: three 32-bit ones each); the backward then needs
neither the RNG state nor the site.
"""
from __future__ import annotations

import hashlib
import math

import torch

from . import rng
from .fused_regions import pack_codes, unpack_codes
from .library import _define


def scale_of(p: float) -> float:
    """``1 / (1 - p)`` rounded to float32: the kept elements' factor."""
    return float(torch.tensor(1.0 / (1.0 - p), dtype=torch.float32))


def keep_below(p: float) -> int:
    """The integer threshold of the keep test: ``draw >> 11`` is below it with probability
    ``1 - p`` (rounded up to the 2**-53 grid), as ``rng.bernoulli`` with prob ``1 - p``."""
    return math.ceil((1.0 - p) * 2.0 ** rng.KEEP_BITS)


def site_id(module_path: str, occurrence: int) -> int:
    """A dropout site's stream field: a 63-bit hash of the module path and the occurrence of
    that module's dropout in the graph (a module may apply one nn.Dropout several times),
    stable across processes and independent of the layers' indices."""
    digest = hashlib.blake2b(f"{module_path}#{occurrence}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def dropout_key(rng_state: torch.Tensor, site: int) -> int:
    """The 64-bit key of a site's stream for the ``[seed, step]`` of this call."""
    seed, step = rng.seed_and_step(rng_state)
    return rng.stream_key(seed, step, site, rng.STREAM_DROPOUT)


def keep_mask(key: int, count: int, p: float) -> torch.Tensor:
    """``keep[i]`` for ``i < count`` (bool)."""
    return rng.bernoulli(rng.draws_u64(key, 0, count), torch.tensor(1.0 - p, dtype=torch.float64))


def keep_bits(keep: torch.Tensor) -> torch.Tensor:
    """``keep`` (bool, any shape, row-major) packed: ``[ceil(n / 8)]`` uint8."""
    return pack_codes(keep.reshape(1, 1, 1, -1).to(torch.uint8), 1).view(-1)


def unpacked_keep(bits: torch.Tensor, count: int) -> torch.Tensor:
    """``keep_bits`` inverted: ``[count]`` bool."""
    return unpack_codes(bits.view(1, 1, -1), 1, 1, count).view(-1).bool()


def _factors(keep: torch.Tensor, p: float) -> torch.Tensor:
    """``m``: ``scale`` where kept, 0 elsewhere (float32)."""
    return torch.where(keep, torch.tensor(scale_of(p)), torch.tensor(0.0))


def apply_mask(x: torch.Tensor, keep: torch.Tensor, p: float) -> torch.Tensor:
    """``x * m`` (``keep`` flat, in ``x``'s row-major order), shaped like ``x``."""
    return (x.contiguous().view(-1) * _factors(keep, p)).view(x.shape)


def _dropout(x, rng_state, p, site, region):
    keep = keep_mask(dropout_key(rng_state, site), x.numel(), p)
    return apply_mask(x, keep, p), keep_bits(keep)


def _bits_shape(numel):
    return [(numel + 7) // 8]


dropout = _define(
    "dropout(Tensor x, Tensor rng_state, float p, int site, str region) -> (Tensor, Tensor)",
    _dropout,
    lambda x, rng_state, p, site, region: (x.new_empty(x.shape),
                                           x.new_empty(_bits_shape(x.numel()), dtype=torch.uint8)))


def _dropout_backward(dy, bits, p, region):
    return apply_mask(dy, unpacked_keep(bits, dy.numel()), p)


dropout_backward = _define(
    "dropout_backward(Tensor dy, Tensor bits, float p, str region) -> Tensor",
    _dropout_backward, lambda dy, bits, p, region: dy.new_empty(dy.shape))


def _setup_context(ctx, inputs, output):
    _, _, p, _, region = inputs
    ctx.save_for_backward(output[1])
    ctx.static = (p, region)


def _backward(ctx, dy, _dbits):
    (bits,) = ctx.saved_tensors
    return dropout_backward(dy, bits, *ctx.static), None, None, None, None


dropout.register_autograd(_backward, setup_context=_setup_context)


def counted_dropout(x, rng_state, p, site, region):
    """What ``passes/fuse_dropout.py`` puts in place of a training-mode ``F.dropout``."""
    return dropout(x, rng_state, p, site, region)[0]


def attention_dropout(query, key, value, attn_mask, p, is_causal, scale, rng_state, site, region):
    """What ``passes/fuse_dropout.py`` puts in place of ``F.scaled_dot_product_attention(...,
    dropout_p=p)`` (without grouped-query heads): ATen's math path, which is what the CPU runs
    whenever ``dropout_p > 0`` (its fused attention kernel takes no dropout), with
    ``fqt::dropout`` on the attention probabilities in place of ``at::dropout``. A boolean
    mask becomes 0 / -inf first, as ``scaled_dot_product_attention`` converts it before the
    math path."""
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros_like(attn_mask, dtype=query.dtype).masked_fill(attn_mask.logical_not(),
                                                                               float("-inf"))
    _, probs = torch.ops.aten._scaled_dot_product_attention_math(query, key, value, attn_mask, 0.0, is_causal,
                                                                 scale=scale)
    return torch.matmul(counted_dropout(probs, rng_state, p, site, region), value)
