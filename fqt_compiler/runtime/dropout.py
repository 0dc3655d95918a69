"""Dropout on torch tensors: the kernels of ``codegen/dropout.py``, split over the mask's
bytes, and the kernel implementations of ``fqt::dropout`` / ``fqt::dropout_backward``
(``ops/dropout.py`` defines the ops and their reference).

``dropout_forward(x, key, p)`` returns ``(y, bits)`` and ``dropout_backward(dy, bits, p)``
returns ``dx``; both take any float32 tensor (a non-contiguous one is copied first: the
element index, the draw's counter, is the row-major position).
"""
from __future__ import annotations

import torch

from ..codegen import dropout as gen
from ..ops import dropout as ops
from . import buffers, kernel_stats as stats
from .jit import kernel_of
from .lowered import implements
from .pack import parallel_rows

_GENERATORS = {"dropout_forward": gen.dropout_forward_ir, "dropout_backward": gen.dropout_backward_ir}


def _fn(family: str, target):
    return kernel_of(family, target, _GENERATORS[family])


# Bytes of mask (8 elements each) a thread takes at least: below this a slice's call costs
# more than its work.
MIN_SLICE_BYTES = 4096


def _f32(t: torch.Tensor, name: str) -> torch.Tensor:
    if t.dtype != torch.float32:
        raise TypeError(f"dropout kernel: {name} must be float32, got {t.dtype}")
    return t.contiguous()


def _check_p(p: float) -> None:
    if not 0.0 < p < 1.0:
        raise ValueError(f"dropout kernel: p={p} must be in (0, 1) (p=0 is the identity and "
                         f"p=1 zeroes everything: neither needs a mask)")


def dropout_forward(x: torch.Tensor, key: int, p: float, *, target="host"):
    """``(y, bits)`` of ``ops.dropout`` for the stream ``key`` (``ops.dropout.dropout_key``)."""
    _check_p(p)
    x = _f32(x, "x")
    y = buffers.empty(x.shape, x.dtype)
    bits = torch.empty((x.numel() + 7) // 8, dtype=torch.uint8)
    parallel_rows(_fn("dropout_forward", target), bits.numel(),
                  x.data_ptr(), y.data_ptr(), bits.data_ptr(), x.numel(), key, ops.keep_below(p),
                  ops.scale_of(p), min_rows=MIN_SLICE_BYTES)
    return y, bits


def dropout_backward(dy: torch.Tensor, bits: torch.Tensor, p: float, *, target="host") -> torch.Tensor:
    """``dy * m`` for the mask the forward packed in ``bits``."""
    _check_p(p)
    dy = _f32(dy, "dy")
    if bits.dtype != torch.uint8 or bits.shape != ((dy.numel() + 7) // 8,):
        raise ValueError(f"dropout kernel backward: bits must be the forward's uint8 mask, "
                         f"[{(dy.numel() + 7) // 8}] bytes for {dy.numel()} elements, got "
                         f"{bits.dtype} {list(bits.shape)}")
    bits = bits.contiguous()
    dx = buffers.empty(dy.shape, dy.dtype)
    parallel_rows(_fn("dropout_backward", target), bits.numel(),
                  dy.data_ptr(), bits.data_ptr(), dx.data_ptr(), dy.numel(), ops.scale_of(p),
                  min_rows=MIN_SLICE_BYTES)
    return dx


@implements("dropout")
def dropout_op(x, rng_state, p, site, region, *, layer_name="?", target="host"):
    with stats.timed(layer_name, "region_forward"):
        return dropout_forward(x, ops.dropout_key(rng_state, site), p, target=target)


@implements("dropout_backward")
def dropout_backward_op(dy, bits, p, region, *, layer_name="?", target="host"):
    with stats.timed(layer_name, "region_backward"):
        return dropout_backward(dy, bits, p, target=target)
