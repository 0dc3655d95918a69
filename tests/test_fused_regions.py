"""Fused regions (BatchNorm -> residual add -> activation -> pool): the kernels against the unfused chain,
the pass that fuses them, and whole training steps with them (issue 12)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import fqt_compiler as fqt
from fqt_compiler.ops import fused_regions as fr
from fqt_compiler.ops import registry
from fqt_compiler.codegen import fusion as gen
from fqt_compiler.runtime import fusion, pack   # fusion also registers the kernels
from fqt_compiler.zoo import vgg_small

ACTS = [("relu", []), ("hardtanh", [0.0, 6.0]), ("hardtanh", [-0.5, 0.25]), ("leaky_relu", [0.2]),
        ("none", [])]
POOLS = [([], False), ([2, 2, 2, 2, 0, 0], False), ([3, 3, 2, 2, 1, 1], False),
         ([3, 3, 2, 2, 1, 1], True), ([2, 2, 2, 2, 1, 1], True), ([3, 3, 1, 1, 1, 1], False),
         ([2, 3, 1, 2, 0, 1], True)]
# Average pools (window, ceil_mode, count_include_pad): 2x2 and 3x3, stride 1 and 2, padding.
AVG_POOLS = [([2, 2, 2, 2, 0, 0], False, True), ([3, 3, 2, 2, 1, 1], True, True),
             ([3, 3, 2, 2, 1, 1], True, False), ([3, 3, 1, 1, 1, 1], False, False),
             ([2, 2, 1, 1, 1, 1], True, True), ([2, 3, 2, 1, 1, 0], True, False)]
SHAPES = [(1, 5, 7, 9), (3, 70, 5, 3), (2, 1, 1, 1), (3, 3, 9, 8)]


def _ops(name):
    return registry.lookup(f"fqt::{name}", "kernels"), registry.lookup(f"fqt::{name}", "reference")


def _close(got, want, what, tol=1e-5):
    scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    assert got.shape == want.shape, what
    assert torch.allclose(got, want, rtol=tol, atol=tol * scale), (what, (got - want).abs().max())


def _inputs(shape, seed, contraction=0, ties=False):
    """Region inputs; with a ``contraction`` length, ``x`` is a raw ±1 GEMM result (integers
    in ``[-K, K]`` of K's parity) and ``alpha`` a per-channel scale, else ``alpha`` is None;
    with ``ties``, ``x`` is integer-valued times a scale, as a binarized GEMM's output is, so
    that many inputs equal their channel's batch mean exactly."""
    gen = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    if ties:
        x = torch.randint(-4, 5, shape, generator=gen).float() * 0.0371
    else:
        x = torch.randn(shape, generator=gen) * 2 + 0.5
    weight, bias = torch.rand(c, generator=gen) + 0.5, torch.randn(c, generator=gen) * 0.5
    rmean, rvar = torch.randn(c, generator=gen), torch.rand(c, generator=gen) + 0.2
    alpha = None
    if contraction:
        x = (contraction - 2 * torch.randint(0, contraction + 1, shape, generator=gen)).float()
        alpha = torch.rand(c, generator=gen) * 0.05 + 1e-3
        rmean = rmean * contraction * 0.05
        rvar = rvar * (contraction * 0.05) ** 2
    dy_seed = seed + 1
    return x, weight, bias, rmean, rvar, alpha, dy_seed


def _unfused_pool(v, pool, mode, ceil_mode):
    if mode == "mean":
        return F.adaptive_avg_pool2d(v, (1, 1))
    if not pool:
        return v
    if mode == "max":
        return F.max_pool2d(v, pool[:2], pool[2:4], pool[4:], ceil_mode=ceil_mode)
    return F.avg_pool2d(v, pool[:2], pool[2:4], pool[4:], ceil_mode=ceil_mode, count_include_pad=mode == "avg")


def unfused_mask(act, params, v):
    """The bit ATen's backward of ``act`` at ``v`` passes the gradient by: 1 where it gives 1
    (the derivative's other value: 0, or LeakyReLU's slope)."""
    return (fr.ACTIVATION_GRADS[act](torch.ones_like(v), v, params) == 1).to(torch.uint8)


def check_region(shape, act, params, pool, ceil_mode, training, seed=0, contraction=0, ties=False,
                 residual=False, mode="max", gamma=None):
    """Kernel == reference for one region (forward outputs, statistics, argmax bits, the
    saved raw GEMM result and activation mask bits exactly, the output's packed sign and STE
    bits exactly and equal to the packing kernel's of the kernel's own output, gradients, the
    residual's included), and reference == the literal unfused chain (with ``contraction``: the
    binarized layer's ``alpha ⊙ Y_raw`` first; then ``F.batch_norm``, ``+ residual``, the
    activation, the pool) differentiated by autograd. ``residual`` may be the residual
    tensor itself; ``gamma`` multiplies BatchNorm's weight and bias."""
    x, weight, bias, rmean, rvar, alpha, dy_seed = _inputs(shape, seed, contraction, ties)
    if gamma is not None:
        weight, bias = weight * gamma, bias * gamma
    if isinstance(residual, torch.Tensor):
        res, residual = residual, True
    else:
        res = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 2)) if residual else None
    if training and shape[0] * shape[2] * shape[3] == 1:
        return   # BatchNorm refuses one value per channel in training
    args = (x, weight, bias, rmean, rvar, training, 1e-5, act, params, pool, mode, ceil_mode, "bn", alpha,
            contraction, res)
    kern, ref = _ops("bn_region")
    got, want = kern(*args, True), ref(*args, True)
    # the bits a binarized conv reading the output would pack itself, word for word
    assert all(torch.equal(g, p.words) for g, p in zip(got[7:], pack.pack_signs_and_ste(got[0].flatten(1))))
    assert not any(t.numel() for t in kern(*args)[7:] + ref(*args)[7:])   # none unless asked for
    for name, g, w in zip(("out", "arg", "mean", "var", "invstd", "raw", "mask", "signs", "ste"), got, want):
        if name in ("arg", "raw", "mask", "signs", "ste"):
            assert g.dtype == w.dtype and torch.equal(g, w), name
        else:
            _close(g, w, name)
    raw = want[5]
    if contraction:   # the exact integer copy, as narrow as the contraction allows
        assert raw.dtype == (torch.int16 if contraction < 32768 else torch.int32)
        assert torch.equal(raw.double(), x.double())
    else:
        assert raw.numel() == 0
    if pool and mode == "max":   # offset_bits per output, each channel plane from its own byte
        bits = {4: 2, 9: 4, 6: 4}[pool[0] * pool[1]]
        assert want[1].shape == (*want[0].shape[:2], -(-want[0].shape[2] * want[0].shape[3] * bits // 8))
    # The reference is the unfused chain: [alpha * Y_raw ->] F.batch_norm -> activation -> F.max_pool2d.
    leaf = [t.clone().requires_grad_() for t in (x, weight, bias, *([res] if residual else []))]
    rm, rv = rmean.clone(), rvar.clone()
    inp = leaf[0] if alpha is None else leaf[0] * alpha.view(1, -1, 1, 1)
    v = F.batch_norm(inp, rm, rv, leaf[1], leaf[2], training, 0.1, 1e-5)
    pre = v + leaf[3] if residual else v
    v = _unfused_pool(fr.ACTIVATIONS[act](pre, params), pool, mode, ceil_mode)
    _close(want[0], v.detach(), "reference out")
    out, arg, mean, _, invstd, _, mask = want[:7]
    if residual and act in fr.ACTIVATION_MASKS:   # the bits ATen's backward of the chain selects by
        assert torch.equal(fr.unpack_codes(mask, 1, *shape[2:]), unfused_mask(act, params, pre.detach()))
        assert mask.shape == (*shape[:2], -(-shape[2] * shape[3] // 8))
    else:
        assert mask.numel() == 0
    dy = torch.randn(v.shape, generator=torch.Generator().manual_seed(dy_seed))
    v.backward(dy)
    # what the op's autograd keeps: the mask bits (none for "none") or, for GELU, the residual
    saved = dict(residual=None, mask=mask) if fr.keeps_mask(act, residual) else dict(residual=res)
    bargs = (dy, x if alpha is None else raw, arg, weight, bias, mean, invstd, training, 1e-5, act, params,
             pool, mode, ceil_mode, "bn", alpha)
    kern_b, ref_b = _ops("bn_region_backward")
    got_b, want_b = kern_b(*bargs, **saved), ref_b(*bargs, **saved)
    assert (got_b[3].numel() > 0) == residual
    if residual:   # the reference from the bits == the reference recomputing bn(x) + r, bit for bit
        for name, w, w_res in zip(("dx", "dweight", "dbias", "dresidual"), want_b, ref_b(*bargs, residual=res)):
            assert torch.equal(w, w_res), name
        if not pool and act in fr.MASKED_GRADS:   # masking (and the mean's spreading) is exact
            assert torch.equal(got_b[3], want_b[3])
    for name, g, w, chain in zip(("dx", "dweight", "dbias", "dresidual"), got_b, want_b, leaf):
        _close(g, w, name, 1e-4)
        _close(w, chain.grad, f"reference {name}", 1e-4)
    # Running statistics: the fused layer's update equals F.batch_norm's.
    rm2, rv2 = rmean.clone(), rvar.clone()
    fr.batch_norm_region(x, rm2, rv2, weight, bias, training, 0.1, 1e-5, act, params, pool, mode, ceil_mode,
                         "bn", alpha, contraction, res)
    _close(rm2, rm, "running_mean")
    _close(rv2, rv, "running_var")


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("pool,ceil_mode", POOLS)
@pytest.mark.parametrize("shape", SHAPES)
def test_region_kernels_match_the_unfused_chain(shape, pool, ceil_mode, training):
    if pool and (shape[2] + 2 * pool[4] < pool[0] or shape[3] + 2 * pool[5] < pool[1]):
        pytest.skip("window larger than the padded input")
    check_region(shape, "relu", [], pool, ceil_mode, training)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("pool,ceil_mode", POOLS[:4])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("contraction", [4608, 40000])
def test_raw_input_regions_match_the_unfused_chain(contraction, shape, pool, ceil_mode, training):
    """Regions fed a binarized conv's raw GEMM result: int16 saved below K = 32768, int32 at
    and above it (K = 40000)."""
    if pool and (shape[2] + 2 * pool[4] < pool[0] or shape[3] + 2 * pool[5] < pool[1]):
        pytest.skip("window larger than the padded input")
    check_region(shape, "relu", [], pool, ceil_mode, training, contraction=contraction)


@pytest.mark.parametrize("shape,ceil_mode", [((2, 3, 7, 15), True), ((3, 5, 6, 17), False), ((1, 2, 12, 32), False),
                                              ((2, 3, 9, 24), True)])
@pytest.mark.parametrize("ties,contraction", [(False, 0), (True, 0), (False, 4608)])
def test_two_by_two_max_pool_vector_path(shape, ceil_mode, ties, contraction):
    """The 2x2 stride-2 max pool's vector path (four outputs a step when OW is a multiple of
    four; the scalar loop takes partial windows of ceil_mode and odd widths) keeps ATen's
    first maximum at ties."""
    check_region(shape, "relu", [], [2, 2, 2, 2, 0, 0], ceil_mode, True, ties=ties, contraction=contraction)


@pytest.mark.parametrize("width", [10, 16])   # the scalar window loop (OW = 5), the vector path (OW = 8)
def test_max_pool_takes_the_first_nan_as_aten_does(width):
    """A NaN tap wins its window and no later tap replaces it (ATen: ``isnan(v) || v > best``)."""
    from fqt_compiler.runtime import fusion as rf
    gen_ = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 4, width, generator=gen_)
    x[torch.rand(x.shape, generator=gen_) < 0.3] = float("nan")
    region = gen.Region(False, gen.Activation("none"), (2, 2, 2, 2, 0, 0))
    ones, zeros = torch.ones(3), torch.zeros(3)
    out, arg = rf.region_forward(x, region, ones, zeros, zeros, ones)[:2]   # the affine is the identity
    want, index = F.max_pool2d(x, 2, return_indices=True)
    torch.testing.assert_close(out, want, rtol=0, atol=0, equal_nan=True)
    rows, cols = index // width, index % width
    oh, ow = torch.meshgrid(torch.arange(want.shape[2]), torch.arange(want.shape[3]), indexing="ij")
    codes = ((rows - 2 * oh) * 2 + cols - 2 * ow).to(torch.uint8)
    assert torch.equal(fr.unpack_codes(arg, 2, *want.shape[2:]), codes)


@pytest.mark.parametrize("pool", [[1, 1, 1, 1, 0, 0], [2, 2, 2, 2, 0, 0], [2, 3, 1, 1, 0, 0],
                                  [3, 3, 2, 2, 1, 1], [4, 4, 1, 1, 0, 0], [5, 5, 1, 1, 2, 2]])
@pytest.mark.parametrize("oh,ow", [(1, 1), (3, 5), (4, 4)])
def test_packed_window_offsets_round_trip(pool, oh, ow):
    taps = pool[0] * pool[1]
    bits = fr.offset_bits(pool)
    assert bits == {1: 1, 4: 2, 6: 4, 9: 4, 16: 4, 25: 8}[taps]
    codes = torch.randint(0, taps, (3, 5, oh, ow), dtype=torch.uint8)
    packed = fr.pack_codes(codes, bits)
    assert packed.shape == (3, 5, -(-oh * ow * bits // 8))
    assert torch.equal(fr.unpack_codes(packed, bits, oh, ow), codes)
    # planes do not share bytes: changing one plane's codes leaves the others' bytes alone
    other = codes.clone()
    other[1, 2] = (other[1, 2] + 1) % taps if taps > 1 else other[1, 2]
    changed = (fr.pack_codes(other, bits) != packed).any(2)
    assert not changed[torch.arange(3) != 1].any() and not changed[1, torch.arange(5) != 2].any()


CONVS = [((3, 3, 11, 9), (6, 3, 3, 3), True, [1, 1], [1, 1], [1, 1]),
         ((1, 2, 9, 8), (70, 2, 3, 2), False, [2, 1], [0, 1], [1, 2]),
         ((2, 3, 16, 16), (5, 3, 7, 7), False, [2, 2], [3, 3], [1, 1])]


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("pool,ceil_mode", [([], False), ([3, 3, 2, 2, 1, 1], True), ([2, 2, 2, 2, 0, 0], False)])
@pytest.mark.parametrize("x_shape,w_shape,has_bias,stride,padding,dilation", CONVS)
def test_float_conv_region_matches_the_unfused_chain(x_shape, w_shape, has_bias, stride, padding, dilation,
                                                      pool, ceil_mode, training):
    """A float conv feeding a region: the op recomputes the conv output in backward; outputs,
    statistics, argmax, the running statistics and the gradients of input, conv weight, conv
    bias and the affine equal the literal chain conv2d -> BN -> ReLU -> max pool."""
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(x_shape, generator=gen), torch.randn(w_shape, generator=gen) * 0.3
    cb = torch.randn(w_shape[0], generator=gen) if has_bias else None
    c = w_shape[0]
    weight, bias = torch.rand(c, generator=gen) + 0.5, torch.randn(c, generator=gen) * 0.5
    rmean, rvar = torch.randn(c, generator=gen), torch.rand(c, generator=gen) + 0.2
    conv = (stride, padding, dilation, 1)
    args = (x, w, cb, *conv, weight, bias, rmean, rvar, training, 1e-5, "relu", [], pool, "max", ceil_mode, "bn")
    kern, ref = _ops("conv2d_bn_region")
    got, want = kern(*args, True), ref(*args, True)
    assert torch.equal(got[1], want[1])   # argmax bits
    for bits, packed, ref_bits in zip(got[5:], pack.pack_signs_and_ste(got[0].flatten(1)), want[5:]):
        assert torch.equal(bits, packed.words) and torch.equal(bits, ref_bits)   # sign, then STE bits
    for name, g, v in zip(("out", "mean", "var", "invstd"), got[:1] + got[2:], want[:1] + want[2:]):
        _close(g, v, name)
    leaf = [t.clone().requires_grad_() for t in (x, w, weight, bias)] + ([cb.clone().requires_grad_()] if has_bias else [])
    rm, rv = rmean.clone(), rvar.clone()
    y = F.conv2d(leaf[0], leaf[1], leaf[4] if has_bias else None, stride, padding, dilation)
    v = F.relu(F.batch_norm(y, rm, rv, leaf[2], leaf[3], training, 0.1, 1e-5))
    if pool:
        v = F.max_pool2d(v, pool[:2], pool[2:4], pool[4:], ceil_mode=ceil_mode)
    _close(want[0], v.detach(), "reference out")
    dy = torch.randn(v.shape, generator=gen)
    v.backward(dy)
    out, arg, mean, _, invstd = want[:5]
    bargs = (dy, x, w, cb, *conv, arg, weight, bias, mean, invstd, training, 1e-5, "relu", [], pool, "max",
             ceil_mode, "bn", True)
    kern_b, ref_b = _ops("conv2d_bn_region_backward")
    names = ("dinput", "dconv_weight", "dconv_bias", "dweight", "dbias")
    chains = (leaf[0], leaf[1], leaf[4] if has_bias else None, leaf[2], leaf[3])
    for name, g, r, chain in zip(names, kern_b(*bargs), ref_b(*bargs), chains):
        if chain is None:
            assert g.numel() == r.numel() == 0, name
            continue
        _close(g, r, name, 1e-4)
        _close(r, chain.grad, f"reference {name}", 1e-4)
    rm2, rv2 = rmean.clone(), rvar.clone()
    fr.conv2d_region(x, w, cb, *conv, rm2, rv2, weight, bias, training, 0.1, 1e-5, "relu", [], pool, "max",
                     ceil_mode, "bn")
    _close(rm2, rm, "running_mean")
    _close(rv2, rv, "running_var")


@pytest.mark.parametrize("shape", [(1, 3, 1, 1), (70, 5, 3, 3), (300, 300, 3, 1)])
def test_weight_scale_kernel_is_the_reference_bit_for_bit(shape):
    """alpha = mean |w| per output channel (a binarized conv's in a region): the kernel's |w|
    goes to a reused buffer (the last shape is large enough to be cached), the values are the
    reference's exactly, also on a second call reusing the buffer with other weights."""
    kern, ref = _ops("weight_scale")
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        w = torch.randn(shape, generator=gen)
        got = kern(w, 0)
        assert got.shape == (shape[0],) and torch.equal(got, ref(w, 0))


def test_float_conv_region_runs_the_conv_in_batch_slices(monkeypatch):
    """The kernel runs the float conv, and its backward, a slice of the batch at a time
    (forward, the backward's recompute, then the convolution backward): with slices of 2 of
    3 samples, the last one short, the op still equals the unfused chain (the weight and
    bias gradients are then sums over the slices, equal to fp32 rounding). The three convs
    are the ``float_conv`` phase of ``fqt.runtime.stats()``, not "float ops + rest"."""
    x_shape, w_shape = CONVS[0][:2]
    fqt.runtime.reset_stats()
    batches, backward_batches = [], []
    conv2d, conv_backward = F.conv2d, torch.ops.aten.convolution_backward

    def spy(input, *args):
        batches.append(input.shape[0])
        return conv2d(input, *args)

    def backward_spy(dy, *args):
        backward_batches.append(dy.shape[0])
        return conv_backward(dy, *args)

    monkeypatch.setattr(fusion, "_CONV_SLICE_BYTES", 2 * w_shape[0] * x_shape[2] * x_shape[3] * 4)
    monkeypatch.setattr(F, "conv2d", spy)
    monkeypatch.setattr(torch.ops.aten, "convolution_backward", backward_spy)
    test_float_conv_region_matches_the_unfused_chain(*CONVS[0], [3, 3, 2, 2, 1, 1], True, True)
    assert batches.count(1) == 2 and batches.count(2) == 2, batches   # kernel forward and recompute
    assert backward_batches.count(1) == 1 and backward_batches.count(2) == 1, backward_batches
    phases = fqt.runtime.stats().by_kind()
    assert phases["float_conv"].calls == 3 and phases["float_conv"].seconds > 0


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("pool,ceil_mode,include_pad", AVG_POOLS)
@pytest.mark.parametrize("shape", [(1, 5, 7, 9), (3, 70, 5, 3), (3, 3, 2, 3)])
def test_average_pool_regions_match_the_unfused_chain(shape, pool, ceil_mode, include_pad, training):
    if shape[2] + 2 * pool[4] < pool[0] or shape[3] + 2 * pool[5] < pool[1]:
        pytest.skip("window larger than the padded input")
    check_region(shape, "relu", [], pool, ceil_mode, training, mode="avg" if include_pad else "avg_valid")


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_residual_and_mean_regions_match_the_unfused_chain(shape, training):
    """ResNet's ``relu(bn2(x) + identity)``, with and without the head's mean pool, and a
    residual before a max pool."""
    check_region(shape, "relu", [], [], False, training, residual=True)
    check_region(shape, "relu", [], [], False, training, residual=True, mode="mean")
    check_region(shape, "none", [], [], False, training, mode="mean")
    if shape[2] > 1:
        check_region(shape, "hardtanh", [0.0, 6.0], [2, 2, 2, 2, 0, 0], True, training, residual=True)


@pytest.mark.parametrize("act,params", ACTS + [("gelu", []), ("gelu_tanh", []), ("silu", [])])
def test_region_activations_match_the_unfused_chain(act, params):
    check_region((3, 70, 5, 7), act, params, [3, 3, 2, 2, 1, 1], True, True)
    check_region((2, 9, 4, 4), act, params, [], False, False)
    # after a residual add: mask bits saved (GELU, SiLU: the residual), with and without pools
    check_region((3, 70, 5, 7), act, params, [3, 3, 2, 2, 1, 1], True, True, residual=True)
    check_region((1, 65, 3, 5), act, params, [], False, True, residual=True, mode="mean")
    check_region((3, 9, 7, 3), act, params, [2, 2, 2, 2, 0, 0], False, False, residual=True)
    check_region((3, 9, 7, 3), act, params, [2, 2, 2, 2, 0, 0], False, True, residual=True, mode="avg_valid")


@pytest.mark.parametrize("shape,pool,ceil_mode", [((3, 40, 4, 4), [2, 2, 2, 2, 0, 0], False),
                                                  ((1, 70, 5, 3), [], False),
                                                  ((3, 33, 7, 9), [3, 3, 2, 2, 1, 1], True)])
def test_packed_sign_bits_at_any_thread_count(shape, pool, ceil_mode):
    """Planes of 4, 15 and 20 outputs share bytes between channels: threads own whole groups
    of channels whose bits fill whole bytes (``signs_channel_unit``), so three threads write
    the bits one does, which are the packing kernel's of the output."""
    x, weight, bias, rmean, rvar, alpha, _ = _inputs(shape, 3, contraction=45)
    args = (x, weight, bias, rmean, rvar, True, 1e-5, "relu", [], pool, "max", ceil_mode, "bn", alpha, 45, None, True)
    kern, _ = _ops("bn_region")
    one = kern(*args)
    torch.set_num_threads(3)
    three = kern(*args)
    assert torch.equal(one[0], three[0])
    assert gen.signs_channel_unit(one[0].shape[2] * one[0].shape[3]) < shape[1]   # more than one group
    for a, b, packed in zip(one[7:], three[7:], pack.pack_signs_and_ste(one[0].flatten(1))):
        assert torch.equal(a, packed.words) and torch.equal(b, packed.words)


@pytest.mark.parametrize("shape", [(2, 512, 2, 2), (3, 70, 1, 2), (1, 33, 3, 3), (2, 5, 1, 3)])
def test_batch_norm_at_ties_is_atens_bit_for_bit(shape):
    """Where an input equals its channel's batch mean, BatchNorm's output is a rounding
    residual whose sign the next ReLU or sign keeps. The kernel's mean, invstd and output are
    ATen's bit for bit (its contiguous-input path, H*W > 1: at 1x1 ATen accumulates in float
    per thread), so the fused backward masks the same ReLU inputs as the unfused chain."""
    x, weight, bias, *_ = _inputs(shape, 0, ties=True)
    out, _, mean, _, invstd = fusion.region_forward(x, gen.Region(True), weight, bias)[:5]
    want, want_mean, want_invstd = torch.ops.aten.native_batch_norm(x, weight, bias, None, None,
                                                                    True, 0.0, 1e-5)
    assert (x == mean.view(1, -1, 1, 1)).any()
    assert torch.equal(mean, want_mean) and torch.equal(invstd, want_invstd)
    assert torch.equal(out, want)
    check_region(shape, "relu", [], [], False, True, ties=True)
    check_region(shape, "relu", [], [2, 2, 2, 1, 0, 0], True, True, ties=True)


def _boundary_residual(shape, seed):
    """A residual whose values sit on the activations' boundaries (0, -0, Hardtanh's limits)
    and one float step either side of them, between random values."""
    gen = torch.Generator().manual_seed(seed)
    edges = torch.tensor([0.0, -0.0, -0.5, 0.25, 6.0])
    edges = torch.cat([edges, torch.nextafter(edges, torch.full_like(edges, float("inf"))),
                       torch.nextafter(edges, torch.full_like(edges, -float("inf")))])
    r = torch.randn(shape, generator=gen) * 4
    pick = torch.randint(0, 2 * len(edges), shape, generator=gen)
    return torch.where(pick < len(edges), edges[pick.clamp(max=len(edges) - 1)], r)


@pytest.mark.parametrize("act,params", ACTS)
@pytest.mark.parametrize("shape,pool,mode", [((1, 13, 5, 7), [], "max"), ((3, 70, 5, 3), [], "mean"),
                                             ((3, 9, 9, 9), [3, 3, 2, 2, 1, 1], "max"),
                                             ((1, 65, 7, 5), [2, 2, 2, 2, 0, 0], "avg")])
@pytest.mark.parametrize("training", [True, False])
def test_residual_mask_bits_at_the_boundaries(act, params, shape, pool, mode, training):
    """The mask bits a residual region saves equal the bits ATen's backward of the unfused
    chain selects by, where the pre-activation ``bn(x) + r`` is exactly 0, -0, Hardtanh's
    limits or one step off them: BatchNorm's weight and bias are 0 on every other channel
    (its output is then +0 and ``v = r`` exactly). Odd planes (bit tails), C not a multiple
    of 8 or 64, batch 1 and 3, with and without pools."""
    gamma = (torch.arange(shape[1]) % 2).float()
    check_region(shape, act, params, pool, True, training, residual=_boundary_residual(shape, 1), mode=mode,
                 gamma=gamma)


@pytest.mark.parametrize("act,params", [("relu", []), ("leaky_relu", [0.2])])
def test_residual_mask_bits_follow_aten_at_nan(act, params):
    """ATen's threshold_backward passes the gradient at a NaN input (``v <= 0`` is false),
    leaky_relu_backward scales it (``v > 0`` is false): the saved bits say the same."""
    shape = (2, 3, 3, 5)
    x, weight, bias, rmean, rvar, *_ = _inputs(shape, 0)
    res = torch.randn(shape)
    res[0, 1, 1] = float("nan")
    args = (x, weight, bias, rmean, rvar, False, 1e-5, act, params, [], "max", False, "bn", None, 0, res)
    kern, ref = _ops("bn_region")
    (_, _, mean, _, invstd, _, mask, *bits), want = kern(*args, True), ref(*args, True)
    pre = F.batch_norm(x, rmean, rvar, weight, bias, False, 0.1, 1e-5) + res
    assert torch.equal(fr.unpack_codes(mask, 1, 3, 5), unfused_mask(act, params, pre))
    assert torch.equal(mask, want[6])
    assert all(map(torch.equal, bits, want[7:]))   # a NaN output packs as sign bit 0, STE bit 0
    dy = torch.randn(shape)
    bargs = (dy, x, want[1], weight, bias, mean, invstd, False, 1e-5, act, params, [], "max", False, "bn")
    kern_b, _ = _ops("bn_region_backward")
    dres = kern_b(*bargs, mask=mask)[3]
    assert torch.equal(dres, fr.ACTIVATION_GRADS[act](dy, pre, params))


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 3), c=st.integers(1, 70), h=st.integers(2, 9), w=st.integers(2, 9),
       act=st.sampled_from(ACTS), pool=st.sampled_from([(*p, "max") for p in POOLS] + [
           (p, ceil, "avg" if pad else "avg_valid") for p, ceil, pad in AVG_POOLS] + [([], False, "mean")]),
       training=st.booleans(), residual=st.booleans(), seed=st.integers(0, 1000))
def test_region_kernels_property(n, c, h, w, act, pool, training, residual, seed):
    (pool, ceil_mode, mode) = pool
    if pool and (h + 2 * pool[4] < pool[0] or w + 2 * pool[5] < pool[1]):
        return
    check_region((n, c, h, w), *act, pool, ceil_mode, training, seed, residual=residual, mode=mode)


# --------------------------------------------------------------------------- the pass

def _fused_ops(cg):
    fw = {str(n.meta.get("fqt_op", n.target)) for n in cg.forward.graph.nodes}
    bw = {str(n.meta.get("fqt_op", n.target)) for n in cg.backward.graph.nodes}
    return fw, bw


def _same_direction(got, want, name):
    if want.norm() == 0:
        assert got.norm() == 0, name
    else:
        assert F.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.999, name


def _step(model, x, y, backend, **config):
    compiled = fqt.compile(model, fqt.Config(backend=backend, seed=0, **config))
    compiled.train(model.training)
    loss = F.cross_entropy(compiled(x), y)
    loss.backward()
    return compiled, loss.item()


def _step_on_both_backends(build, x, y, **config):
    """``_step`` of a freshly seeded ``build()`` on the kernels and on the reference backend:
    ``{backend: (model, compiled, loss)}``."""
    runs = {}
    for backend in ("kernels", "reference"):
        torch.manual_seed(0)
        model = build()
        runs[backend] = (model, *_step(model, x, y, backend, **config))
    return runs


def _assert_same_step(runs):
    """The kernels' step has the reference's loss and gradient directions."""
    (m_k, _, loss_k), (m_r, _, loss_r) = runs["kernels"], runs["reference"]
    assert abs(loss_k - loss_r) <= 1e-4 * abs(loss_r)
    for (name, p), q in zip(m_k.named_parameters(), m_r.parameters()):
        _same_direction(p.grad, q.grad, name)


def test_vgg_regions_are_fused_and_keep_no_float_copies():
    torch.manual_seed(0)
    model = vgg_small(in_channels=1)
    x, y = torch.randn(3, 1, 15, 15), torch.randint(0, 10, (3,))
    compiled, _ = _step(model, x, y, "kernels")
    cg = compiled.fqt_graphs[-1]
    assert len(cg.regions) == 6 and all("relu" in r for r in cg.regions)
    assert sum("max_pool2d" in r for r in cg.regions) == 3
    fw, bw = _fused_ops(cg)
    assert "fqt.bn_region.default" in fw and "fqt.bn_region_backward.default" in bw
    for unfused in ("aten._native_batch_norm_legit_functional.default", "aten.relu.default",
                    "aten.max_pool2d_with_indices.default"):
        assert unfused not in fw
    for unfused in ("aten.native_batch_norm_backward.default", "aten.threshold_backward.default",
                    "aten.max_pool2d_with_indices_backward.default"):
        assert unfused not in bw
    # no int64 pool indices are saved for backward, and no float32 activation map but the
    # model's input (which the float first conv keeps for its weight gradient): the binarized
    # convs' raw GEMM results are kept as int16, the float conv's output is recomputed
    saved = [n.meta["val"] for n in cg.backward.graph.nodes if n.op == "placeholder"]
    assert not any(v.dtype == torch.int64 and v.dim() == 4 for v in saved)
    float_maps = [tuple(v.shape) for v in saved if v.dtype == torch.float32 and v.dim() == 4 and v.shape[0] == 3]
    assert float_maps == [(3, 1, 15, 15)]
    assert sum(v.dtype == torch.int16 and v.dim() == 4 for v in saved) == 5   # one per binarized conv
    # pool argmax: 2 bits per 2x2 window output, each channel plane from its own byte
    assert (3, 32, 13) in [tuple(v.shape) for v in saved if v.dtype == torch.uint8]   # 7x7 outputs, 98 bits
    st = fqt.runtime.stats()
    assert st[("features.4", "region_forward")].calls >= 1
    assert st[("features.4", "region_backward")].calls >= 1
    summary = fqt.summary(compiled)
    assert "fused regions (6;" in summary
    assert "features.4 (train): batch_norm -> relu -> max_pool2d; input: layer 1's raw GEMM result, saved as " \
           "int16 (K=288)" in summary
    assert "features.1 (train): batch_norm -> relu; input: float conv2d features.0, recomputed in backward" in summary
    # dumps show the regions and the ops they replaced
    capture = [r.text for r in cg.records if r.stage == "capture" and r.name == "fuse_regions"][0]
    assert "fused region features.4 (train): batch_norm -> relu" in capture


@pytest.mark.parametrize("train_bn", [True, False])
def test_fused_step_matches_the_reference_backend(train_bn):
    """Loss, gradients and running statistics of a whole step: kernels with fused regions
    vs the reference backend running the unfused graph."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 1, 15, 15, generator=gen), torch.randint(0, 10, (3,), generator=gen)
    results = {}
    for backend in ("kernels", "reference"):
        torch.manual_seed(0)
        model = vgg_small(in_channels=1)
        for m in model.modules():   # non-trivial running statistics for eval mode
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
        model.train(train_bn)
        compiled, loss = _step(model, x, y, backend)
        regions = compiled.fqt_graphs[-1].regions
        assert bool(regions) == (backend == "kernels")
        # the first region's 15x15 output (planes of 225 bits, across words) is packed for the
        # binarized conv after it; the 7x7 maps after the first pool are below PACK_MIN_PLANE
        assert sum("writes the sign + STE bits" in r for r in regions) == (backend == "kernels")
        results[backend] = (loss, {n: p.grad.clone() for n, p in model.named_parameters()},
                            {n: b.clone() for n, b in model.named_buffers()})
    (loss_k, grads_k, bufs_k), (loss_r, grads_r, bufs_r) = results["kernels"], results["reference"]
    assert abs(loss_k - loss_r) <= 1e-4 * abs(loss_r)
    for name, g in grads_r.items():
        _same_direction(grads_k[name], g, name)
    for name, b in bufs_r.items():
        _close(bufs_k[name].float(), b.float(), name, 1e-4)


def test_unfusible_float_ops_still_train():
    """BatchNorm without affine, a sigmoid, GroupNorm: none is fused, the step still trains
    and agrees with the reference backend."""
    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8, affine=False), nn.ReLU(),
                             nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.Sigmoid(),
                             nn.Conv2d(8, 8, 3), nn.GroupNorm(2, 8), nn.ReLU(), nn.Flatten(),
                             nn.Linear(8 * 5 * 5, 3))
    x, y = torch.randn(2, 1, 11, 11), torch.tensor([0, 2])
    m_k, m_r = make(), make()
    compiled, loss_k = _step(m_k, x, y, "kernels")
    _, loss_r = _step(m_r, x, y, "reference")
    assert compiled.fqt_graphs[-1].regions == ["4 (train): batch_norm"]   # BN -> sigmoid: BN alone
    assert abs(loss_k - loss_r) <= 1e-4 * abs(loss_r)
    assert any(p.grad.norm() > 0 for p in m_r.parameters())
    for (name, p), q in zip(m_k.named_parameters(), m_r.parameters()):
        _same_direction(p.grad, q.grad, name)


class _Adds(nn.Module):
    """Residual adds and pools the pass must fuse, and near misses it must leave alone."""

    def __init__(self):
        super().__init__()
        # no conv bias: before a BatchNorm its gradient is zero up to rounding noise
        self.convs = nn.ModuleList(nn.Conv2d(2, 6, 3, padding=1, bias=False) for _ in range(7))
        self.bns = nn.ModuleList(nn.BatchNorm2d(6) for _ in range(7))
        self.shift = nn.Parameter(torch.randn(1, 6, 1, 1))

    def forward(self, x):
        r = self.convs[0](x)
        b = [bn(conv(x)) for conv, bn in zip(self.convs[1:], self.bns[1:])]
        fused = torch.relu(r + b[0])                              # residual, operand order r + bn
        fused_pool = F.avg_pool2d(torch.add(b[1], r), 3, 2, 1, ceil_mode=True)
        scaled = torch.add(b[2], r, alpha=2.0)                    # alpha != 1: BN alone
        mutated = r.clone()
        mutated += b[3]                                           # mutates the residual: BN alone
        broadcast = b[4] + self.shift                             # not x's shape: BN alone
        divisor = F.avg_pool2d(F.relu(b[5]), 2, divisor_override=3)   # BN -> relu only
        mean = F.adaptive_avg_pool2d(self.bns[0](r), 1)          # the plane's mean: fused
        rest = [scaled, mutated, broadcast]
        return (fused.mean((2, 3)) + fused_pool.mean((2, 3)) + sum(t.mean((2, 3)) for t in rest)
                + divisor.mean((2, 3)) + mean.flatten(1))


def test_pass_fuses_residuals_and_pools_only_where_the_kernels_compute_them():
    x, y = torch.randn(3, 2, 7, 9), torch.tensor([0, 3, 5])
    runs = _step_on_both_backends(_Adds, x, y, method="none")
    compiled = runs["kernels"][1]
    regions = compiled.fqt_graphs[-1].regions
    assert sorted(r.split(";")[0] for r in regions) == sorted([
        "bns.0 (train): batch_norm -> adaptive_avg_pool2d",
        "bns.1 (train): batch_norm -> add -> relu",
        "bns.2 (train): batch_norm -> add -> avg_pool2d",
        "bns.3 (train): batch_norm", "bns.4 (train): batch_norm", "bns.5 (train): batch_norm",
        "bns.6 (train): batch_norm -> relu"]), regions
    # fqt.summary and the dump of the pass name each region and the ops it replaced
    assert "  - bns.1 (train): batch_norm -> add -> relu" in fqt.summary(compiled)
    capture = [r.text for r in compiled.fqt_graphs[-1].records if r.stage == "capture" and r.name == "fuse_regions"][0]
    assert "fused region bns.2 (train): batch_norm -> add -> avg_pool2d" in capture
    _assert_same_step(runs)


@pytest.mark.slow
def test_resnet18_fused_step_matches_the_reference_backend():
    torchvision = pytest.importorskip("torchvision")
    gen = torch.Generator().manual_seed(0)
    # 64x64: layer4's maps are 2x2, so each BatchNorm sees 16 values per channel. At 32x32 and
    # batch 2 they see 2: an integer GEMM output then often equals the batch mean exactly, and
    # whether BN gives +0, -0 or a rounding residual there (what the next layer's sign keeps)
    # depends on ATen's code path, not on the math (see the report in ARCHITECTURE.md).
    x, y = torch.randn(4, 3, 64, 64, generator=gen), torch.randint(0, 10, (4,), generator=gen)
    # Float gradients (method "none"): the fused BatchNorm backward agrees with ATen's to
    # float32 rounding, not bit for bit, and through 20 layers of stochastic rounding such
    # differences move codes (psq b=8: conv1's gradient cosine 0.994; aq_scq: keep draws flip),
    # which would hide what this test is about. The quantized paths are the VGG test's.
    runs = _step_on_both_backends(lambda: torchvision.models.resnet18(num_classes=10), x, y, method="none")
    compiled = runs["kernels"][1]
    regions = compiled.fqt_graphs[-1].regions
    # the stem: float conv1 recomputed in backward, max pool 3x3/2 pad 1
    assert ("bn1 (train): batch_norm -> relu -> max_pool2d; input: float conv2d conv1, recomputed "
            "in backward; writes the sign + STE bits of its output for layer1.0.conv1") in regions
    # every region feeding binarized convs on maps of >= 64 outputs packs their input bits: the
    # stem's and layer1's and layer2's bn1/bn2 (16x16 and 8x8), not layer3's (4x4) and beyond
    assert sum("writes the sign + STE bits" in r for r in regions) == 9
    assert any(r.startswith("layer1.1.bn2 (train)") and r.endswith("for layer2.0.conv1, layer2.0.downsample.0")
               for r in regions)
    # every BatchNorm after a binarized conv keeps its raw GEMM result as int16
    assert sum("raw GEMM result, saved as int16" in r for r in regions) == 19
    assert len(regions) == 20
    # every block's bn2 takes the residual add and its ReLU, the last one the head's pool
    assert any(r.startswith("layer1.0.bn2 (train): batch_norm -> iadd -> relu;") for r in regions)
    assert any(r.startswith("layer2.0.downsample.1 (train): batch_norm;") for r in regions)
    assert any(r.startswith("layer4.1.bn2 (train): batch_norm -> iadd -> relu -> adaptive_avg_pool2d;")
               for r in regions)
    assert sum("iadd -> relu" in r for r in regions) == 8
    cg = compiled.fqt_graphs[-1]
    fw, bw = _fused_ops(cg)
    assert "aten.relu.default" not in fw and "aten.mean.dim" not in fw
    assert "fqt.binary_conv2d_packed.default" in fw
    assert "aten.threshold_backward.default" not in bw
    # no float add of feature maps is left (the adds left update BN's counters)
    assert not [n for n in cg.forward.graph.nodes if str(n.target) == "aten.add.Tensor"
                and n.meta["val"].dim() == 4]
    _assert_same_step(runs)


def _saved_float_maps(cg, batch):
    """Shapes of the float32 feature maps (4-D, ``batch`` samples: not a conv weight) the
    backward graph takes from the forward."""
    return [tuple(v.shape) for v in (n.meta["val"] for n in cg.backward.graph.nodes if n.op == "placeholder")
            if v.dtype == torch.float32 and v.dim() == 4 and v.shape[0] == batch]


def test_resnet18_residual_regions_keep_mask_bits_not_the_residual():
    """Each block's ``relu(bn2(conv2(x)) + identity)`` keeps the ReLU's mask as bits: the only
    float32 map a ResNet-18 step saves for backward is the model's input (the float stem conv
    keeps it for its weight gradient), not the eight identities."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 7])
    compiled, _ = _step(model, x, y, "kernels")
    cg = compiled.fqt_graphs[-1]
    residual = [r for r in cg.regions if "iadd" in r]
    assert len(residual) == 8 and all("; residual: activation mask saved as bits" in r for r in residual)
    assert _saved_float_maps(cg, 2) == [(2, 3, 32, 32)]
    # one bit per element of each block's output, each (n, c) plane from its own byte: 8x8
    # maps (layer1) take 8 bytes per plane, 2x2 and 1x1 maps (layers 3, 4) one byte; besides
    # them the stem's max-pool argmax, 4 bits per 8x8 output
    packed = sorted(tuple(n.meta["val"].shape) for n in cg.backward.graph.nodes if n.op == "placeholder"
                    and n.meta["val"].dtype == torch.uint8 and n.meta["val"].dim() == 3)
    assert packed == sorted([(2, 64, 32)] + 2 * [(2, 64, 8), (2, 128, 2), (2, 256, 1), (2, 512, 1)])


def test_gelu_after_a_residual_add_keeps_the_residual():
    """GELU's derivative needs ``bn(x) + r`` itself: the region keeps the residual (float32)
    and says why; ``none`` keeps nothing."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv0, self.conv1 = nn.Conv2d(2, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1, bias=False)
            self.bn1, self.bn2 = nn.BatchNorm2d(6), nn.BatchNorm2d(6)

        def forward(self, x):
            r = self.conv0(x)
            h = F.gelu(self.bn1(self.conv1(r)) + r)
            return (self.bn2(self.conv1(h)) + h).mean((2, 3))

    x, y = torch.randn(3, 2, 5, 7), torch.tensor([0, 3, 5])
    runs = _step_on_both_backends(Block, x, y, method="none")
    cg = runs["kernels"][1].fqt_graphs[-1]
    assert sorted(r.split("; ")[-1] for r in cg.regions) == [
        "residual: kept as float32 (gelu's derivative needs bn(x) + r itself, not a mask)",
        "residual: nothing saved (no activation)"], cg.regions
    # the GELU region keeps the residual (r, 6 channels); the other nothing but its input
    assert (3, 6, 5, 7) in _saved_float_maps(cg, 3)
    _assert_same_step(runs)


def test_residual_region_backward_names_the_missing_mask():
    x, weight, bias, *_ = _inputs((2, 3, 4, 5), 0)
    region = gen.Region(True, gen.Activation("relu"), residual=True)
    res = torch.randn(x.shape)
    _, arg, mean, _, invstd, _, mask = fusion.region_forward(x, region, weight, bias, residual=res)[:7]
    assert mask.shape == (2, 3, 3) and mask.dtype == torch.uint8
    for wrong in (None, mask[:, :, :2], mask.float()):
        with pytest.raises(ValueError, match=r"relu after a residual add.*uint8 mask bits shaped \[2, 3, 3\]"):
            fusion.region_backward(torch.randn(x.shape), x, arg, region, weight, bias, mean, invstd, mask=wrong)


def test_kernels_and_reference_save_masks_for_the_same_activations():
    assert set(gen.MASKS) == set(fr.ACTIVATION_MASKS) == set(fr.MASKED_GRADS) - {"none"}
    assert all(gen.Region(True, gen.Activation(a), residual=True).mask_bits == fr.keeps_mask(a, True)
               for a in gen.ACTIVATIONS if a != "none")
