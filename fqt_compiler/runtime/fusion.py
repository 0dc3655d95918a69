"""Fused regions on torch tensors: the kernels of ``codegen/fusion.py``, split over channels.

``region_forward(x, region, gamma, beta, ...)`` returns ``(out, argmax, mean, var, invstd)``
and ``region_backward(dy, x, argmax, region, ...)`` returns ``(dx, dgamma, dbeta)``; see
``ops/fused_regions.py`` for the op semantics and its reference (the unfused chain).
"""
from __future__ import annotations

import torch

from ..codegen import fusion as gen
from ..codegen.targets import get_target
from ..ops import fused_regions   # also defines the ops registered below
from . import kernel_stats as stats
from .jit import kernel, spec
from .lowered import implements
from .pack import parallel_rows

_GENERATORS = {"region_forward": gen.region_forward_ir, "region_backward": gen.region_backward_ir}


def _fn(family: str, target, region: gen.Region):
    return kernel(spec(family, get_target(target), _GENERATORS[family], region=region))


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float().contiguous()


def region_forward(x, region: gen.Region, gamma, beta, mean=None, invstd=None, *,
                   ceil_mode=False, target="host"):
    """Run ``region`` over NCHW ``x``. Without batch statistics ``mean``/``invstd`` are the
    per-channel values to normalize with (they are returned unchanged)."""
    x = _f32(x)
    n, c, h, w = x.shape
    oh, ow = fused_regions.pooled_shape(x.shape, region.pool, ceil_mode)[2:]
    out = torch.empty(n, c, oh, ow)
    arg = torch.empty(n, c, oh, ow, dtype=torch.uint8) if region.pool else torch.empty(0, dtype=torch.uint8)
    var = torch.empty(c)
    if region.batch_stats:
        mean, invstd = torch.empty(c), torch.empty(c)
    else:
        mean, invstd = _f32(mean), _f32(invstd)
    gamma, beta = _f32(gamma), _f32(beta)
    parallel_rows(_fn("region_forward", target, region), c, x.data_ptr(), out.data_ptr(),
                  arg.data_ptr(), gamma.data_ptr(), beta.data_ptr(), mean.data_ptr(),
                  var.data_ptr(), invstd.data_ptr(), n, c, h, w, oh, ow)
    return out, arg, mean, var, invstd


def region_backward(dy, x, arg, region: gen.Region, gamma, beta, mean, invstd, *, target="host"):
    """``(dx, dgamma, dbeta)`` of ``region`` at ``x`` for the output gradient ``dy``."""
    x, dy = _f32(x), _f32(dy)
    n, c, h, w = x.shape
    oh, ow = dy.shape[2], dy.shape[3]
    dx = torch.empty_like(x)
    dgamma, dbeta = torch.empty(c), torch.empty(c)
    arg = arg.contiguous()
    mean, invstd, gamma, beta = _f32(mean), _f32(invstd), _f32(gamma), _f32(beta)
    parallel_rows(_fn("region_backward", target, region), c, dy.data_ptr(), x.data_ptr(),
                  arg.data_ptr(), gamma.data_ptr(), beta.data_ptr(), mean.data_ptr(),
                  invstd.data_ptr(), dx.data_ptr(), dgamma.data_ptr(), dbeta.data_ptr(),
                  n, c, h, w, oh, ow)
    return dx, dgamma, dbeta


# --------------------------------------------------------------------------- the fqt ops

def _region(training, activation, act_params, pool, eps) -> gen.Region:
    return gen.Region(training, gen.Activation(activation, tuple(act_params)), tuple(pool) or None,
                      float(eps))


@implements("bn_region")
def bn_region(x, weight, bias, running_mean, running_var, training, eps, activation, act_params,
              pool, ceil_mode, region, *, layer_name="?", target="host"):
    r = _region(training, activation, act_params, pool, eps)
    with stats.timed(layer_name, "region_forward"):
        if training:
            return region_forward(x, r, weight, bias, ceil_mode=ceil_mode, target=target)
        # Eval BatchNorm is a per-channel affine of the running statistics (copied: an op's
        # outputs must not alias its inputs).
        mean, var = running_mean.detach().clone(), running_var.detach().clone()
        out, arg, _, _, invstd = region_forward(x, r, weight, bias, mean, torch.rsqrt(var + eps),
                                                ceil_mode=ceil_mode, target=target)
        return out, arg, mean, var, invstd


@implements("bn_region_backward")
def bn_region_backward(dy, x, arg, weight, bias, mean, invstd, training, eps, activation,
                       act_params, pool, ceil_mode, region, *, layer_name="?", target="host"):
    with stats.timed(layer_name, "region_backward"):
        return region_backward(dy, x, arg, _region(training, activation, act_params, pool, eps),
                               weight, bias, mean, invstd, target=target)
