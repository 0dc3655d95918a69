"""col2im + STE mask on torch tensors: the input-gradient path after its GEMM.

``col2im_ste(dcols, input_shape, kernel_size, stride, padding, dilation, ste)`` takes the
im2col-layout gradient ``dcols [N*OH*OW, C*KH*KW]`` (rows ``(n, h', w')``, columns
``(c, kh, kw)``: the output of the input-gradient GEMM), sums the overlapping patches back
onto the unpadded NCHW input (the adjoint of ``im2col_pack``, padding cropped) and multiplies
by the STE mask ``1{|x| < 1}`` given as the per-sample packed mask bits of
``pack_signs_and_ste(x.flatten(1))``.
"""
from __future__ import annotations

import ctypes
from functools import lru_cache

import torch

from ..codegen.col2im import col2im_ste_ir
from ..codegen.targets import get_target
from .jit import KernelSpec, kernel
from ..ops.reference import conv_output_size
from .pack import _pair, parallel_rows
from .packed import PackedBits

_I64, _P = ctypes.c_int64, ctypes.c_void_p


def _fn(target: str, *conv):
    return kernel(_spec("col2im_ste", get_target(target), *conv))


@lru_cache(maxsize=None)
def _spec(family: str, target, *conv):
    return KernelSpec(family, target, conv, "fqt_col2im_ste", col2im_ste_ir(target, *conv),
                      (_P, _I64, _P, _I64, *[_I64] * 5, _P, _I64, _I64), _spec)


def col2im_ste(dcols: torch.Tensor, input_shape, kernel_size, stride=1, padding=0, dilation=1, *,
               ste: PackedBits | None = None, target="host") -> torch.Tensor:
    """float32 ``[N, C, H, W]``: ``ste ⊙ col2im(dcols)`` (no mask when ``ste`` is None)."""
    n, c, h, w = input_shape
    ks, st, pd, dl = map(_pair, (kernel_size, stride, padding, dilation))
    oh = conv_output_size(h, ks[0], st[0], pd[0], dl[0])
    ow = conv_output_size(w, ks[1], st[1], pd[1], dl[1])
    if dcols.dtype != torch.float32 or tuple(dcols.shape) != (n * oh * ow, c * ks[0] * ks[1]):
        raise ValueError(f"dcols must be float32 [{n * oh * ow}, {c * ks[0] * ks[1]}] for input "
                         f"{tuple(input_shape)}, got {dcols.dtype} {tuple(dcols.shape)}")
    if dcols.stride(1) != 1:
        dcols = dcols.contiguous()
    if ste is not None and (ste.rows != n or ste.k != c * h * w or not ste.words.is_contiguous()):
        raise ValueError(f"ste must hold per-sample mask bits of {tuple(input_shape)}")
    out = torch.empty(n, c, h, w, dtype=torch.float32)
    fn = _fn(get_target(target).name, ks, st, pd, dl)
    ste_ptr, ste_ld = (ste.words.data_ptr(), ste.ld) if ste is not None else (None, 0)
    parallel_rows(fn, n * h * w, dcols.data_ptr(), dcols.stride(0), ste_ptr, ste_ld,
                  c, h, w, oh, ow, out.data_ptr(), min_rows=16)
    return out
