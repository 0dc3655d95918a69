"""The fqt custom ops: opcheck on every op, and each op against the reference oracle."""
from __future__ import annotations

import pytest
import torch

import fqt_compiler as fqt
from fqt_compiler import compiler

from fqt_compiler.ops import dropout as D
from fqt_compiler.ops import fused as F
from fqt_compiler.ops import fused_regions as FR
from fqt_compiler.ops import library as L
from fqt_compiler.ops import reference as R
from fqt_compiler.ops import registry
from fqt_compiler.passes.infra import PassResult
from fqt_compiler.runtime.pack import pack_signs_and_ste
from fqt_test_models import SmallCNN

RS = torch.tensor([11, 5], dtype=torch.int64)
GEOM = ([2, 1], [1, 0], [1, 2])  # stride, padding, dilation: asymmetric on purpose


def _conv_case():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, 9) * 1.5
    w = torch.randn(4, 3, 3, 3)
    y_raw, sign_bits, ste_bits, *w_bits = L.binary_conv2d(x, w, RS, *GEOM, 3)
    assert all(torch.equal(a, b) for a, b in zip(w_bits, R.pack_weight(w)))
    return x, w, y_raw, sign_bits, ste_bits


def _linear_case():
    torch.manual_seed(1)
    x = torch.randn(2, 3, 70) * 1.5  # 70 features: a two-word row with a tail
    w = torch.randn(6, 70)
    y_raw, sign_bits, ste_bits, *w_bits = L.binary_linear(x, w, RS, 2)
    assert all(torch.equal(a, b) for a, b in zip(w_bits, R.pack_weight(w)))
    return x, w, y_raw, sign_bits, ste_bits


def _wb(w):
    """The weight as the backward ops take it: its saved bits and shape."""
    return (*R.pack_weight(w), list(w.shape))


def _opcheck_cases():
    x, w, y, sb, mb = _conv_case()
    xl, wl, yl, sbl, mbl = _linear_case()
    g, gl = torch.randn_like(y), torch.randn_like(yl)
    g2d = R.conv_rows(g)
    rps = y.shape[2] * y.shape[3]
    cases = [
        (L.binary_conv2d, (x.requires_grad_(), w.requires_grad_(), RS, *GEOM, 3)),
        (L.binary_conv2d_packed, (x, sb, mb, w, RS, *GEOM, 3)),
        (L.binary_linear, (xl.requires_grad_(), wl.requires_grad_(), RS, 2)),
        (L.binary_linear_packed, (xl, sbl, mbl, wl, RS, 2)),
        (L.mark_gradient, (g, RS, 3)),
        (L.conv2d_input_grad, (g, *_wb(w), mb, list(x.shape), *GEOM)),
        (L.conv2d_weight_grad, (g, *_wb(w), sb, list(x.shape), *GEOM)),
        (L.linear_input_grad, (gl, *_wb(wl), mbl, list(xl.shape))),
        (L.linear_weight_grad, (gl, *_wb(wl), sbl, list(xl.shape))),
    ]
    lo, hi, keep, prob = L.aq_sample(g2d, RS, "aq_scq", "input", 4, rps, 3)
    codes, scale, zero = L.quantize_gradient(g2d, lo, hi, keep, prob, RS, "aq_scq", "input", 4, rps, 3)
    cases += [
        (L.aq_sample, (g2d, RS, "aq_scq", "input", 4, rps, 3)),
        (L.quantize_gradient, (g2d, lo, hi, keep, prob, RS, "aq_scq", "input", 4, rps, 3)),
        (L.conv2d_input_grad_q, (codes, scale, zero, keep, *_wb(w), mb, list(x.shape), *GEOM, "sample")),
        (L.conv2d_weight_grad_q, (codes, scale, zero, keep, *_wb(w), sb, list(x.shape), *GEOM, "sample")),
    ]
    g2dl = gl.reshape(-1, 6)
    lo, hi, keep, prob = L.aq_sample(g2dl, RS, "aq_scq", "weight", 2, 1, 2)
    codes, scale, zero = L.quantize_gradient(g2dl, lo, hi, keep, prob, RS, "aq_scq", "weight", 2, 1, 2)
    cases += [
        (L.linear_input_grad_q, (codes, scale, zero, keep, *_wb(wl), mbl, list(xl.shape), "channel")),
        (L.linear_weight_grad_q, (codes, scale, zero, keep, *_wb(wl), sbl, list(xl.shape), "channel")),
    ]
    cases += [  # the fused ops of the kernel backend (ops/fused.py)
        (F.aq_quantize_conv2d_input_grad, (g, RS, *_wb(w), mb, list(x.shape), *GEOM, "aq_scq", 4, 3)),
        (F.aq_quantize_conv2d_weight_grad, (g, RS, *_wb(w), sb, list(x.shape), *GEOM, "aq_scq", 4, 3)),
        (F.aq_quantize_linear_input_grad, (gl, RS, *_wb(wl), mbl, list(xl.shape), "psq", 1, 2)),
        (F.aq_quantize_linear_weight_grad, (gl, RS, *_wb(wl), sbl, list(xl.shape), "topk", 2, 2)),
        # alpha folded in (passes/fold_alpha.py); the scaled forward ops exist only in
        # partitioned forward graphs, after autograd, so they have no autograd formula
        (F.aq_quantize_conv2d_input_grad, (g, RS, *_wb(w), mb, list(x.shape), *GEOM, "aq_scq", 4, 3,
                                           R.default_alpha(w).view(1, -1, 1, 1))),
        # both paths of one G' (passes/merge_gradient_paths.py)
        (F.aq_quantize_conv2d_grads, (g, RS, *_wb(w), mb, sb, list(x.shape), *GEOM, "aq_opt", 2, 3,
                                      R.default_alpha(w).view(1, -1, 1, 1))),
        (F.aq_quantize_linear_grads, (gl, RS, *_wb(wl), mbl, sbl, list(xl.shape), "aq_scq", 4, 2,
                                      R.default_alpha(wl))),
        (F.binary_conv2d_scaled, (x.detach(), w.detach(), R.default_alpha(w), RS, *GEOM, 3)),
        (F.binary_linear_scaled, (xl.detach(), wl.detach(), R.default_alpha(wl), RS, 2)),
        (F.binary_linear_scaled, (xl.detach(), wl.detach(), R.default_alpha(wl), RS, 2, torch.randn(wl.shape[0]))),
        (F.binary_linear_packed_scaled, (xl.detach(), sbl, mbl, wl.detach(), R.default_alpha(wl), RS, 2,
                                         torch.randn(wl.shape[0]))),
    ]
    torch.manual_seed(2)
    xb = torch.randn(3, 5, 7, 6)
    wb, bb = torch.rand(5) + 0.5, torch.randn(5)
    rm, rv = torch.randn(5), torch.rand(5) + 0.5
    pool = [3, 2, 2, 2, 1, 0]
    y_raw = (45 - 2 * torch.randint(0, 46, xb.shape)).float()   # a raw GEMM result, K = 45
    alpha = torch.rand(5) * 0.1
    rb = torch.randn(xb.shape)   # a residual
    for training, activation, params, raw, res, pl, mode in (
            (True, "relu", [], None, None, pool, "max"), (False, "leaky_relu", [0.1], None, rb, pool, "avg_valid"),
            (True, "relu", [], (alpha, 45), rb, [], "mean"), (False, "relu", [], (alpha, 45), None, pool, "max"),
            (True, "gelu", [], None, rb, [], "max"), (True, "none", [], (alpha, 45), rb, pool, "max")):
        x_in = xb if raw is None else y_raw
        r = None if res is None else res.clone().requires_grad_()
        args = (x_in.clone().requires_grad_(), wb.clone().requires_grad_(), bb.clone().requires_grad_(),
                rm, rv, training, 1e-5, activation, params, pl, mode, True, "bn1", *(raw or (None, 0)), r)
        cases.append((FR.bn_region, args))
        cases.append((FR.bn_region, (*args, True)))   # with the output's packed sign + STE bits
        _, arg, mean, _, invstd, saved, mask = FR.bn_region(*[a.detach() if torch.is_tensor(a) else a for a in args])[:7]
        out_shape = FR.pooled_shape(xb.shape, pl, True, mode)
        # with a residual the backward takes the mask bits (none for "none"), GELU the residual
        kept = (None, mask) if FR.keeps_mask(activation, res is not None) else (res, None)
        cases.append((FR.bn_region_backward, (torch.randn(out_shape), xb if raw is None else saved, arg, wb, bb,
                                              mean, invstd, training, 1e-5, activation, params, pl, mode, True,
                                              "bn1", None if raw is None else raw[0], *kept)))
    # a float conv feeding a region (the conv output recomputed in backward)
    xc, wc, cbias = torch.randn(2, 3, 9, 8), torch.randn(5, 3, 3, 3), torch.randn(5)
    conv = ([2, 1], [1, 0], [1, 1], 1)
    for training, bias in ((True, cbias), (False, None)):
        args = (xc.clone().requires_grad_(), wc.clone().requires_grad_(),
                None if bias is None else bias.clone().requires_grad_(), *conv, wb.clone().requires_grad_(),
                bb.clone().requires_grad_(), rm, rv, training, 1e-5, "relu", [], pool, "max", True, "bn1")
        cases.append((FR.conv2d_bn_region, args))
        cases.append((FR.conv2d_bn_region, (*args, True)))
        out, arg, mean, _, invstd = FR.conv2d_bn_region(*[a.detach() if torch.is_tensor(a) else a for a in args])[:5]
        cases.append((FR.conv2d_bn_region_backward, (torch.randn(out.shape), xc, wc, bias, *conv, arg, wb, bb,
                                                     mean, invstd, training, 1e-5, "relu", [], pool, "max", True,
                                                     "bn1", training)))
    cases.append((FR.weight_scale, (wc, 3)))
    # LayerNorm regions (over the last dimension of a 3-D input), GELU both ways
    xn, wn, bn = torch.randn(2, 3, 7), torch.rand(7) + 0.5, torch.randn(7)
    for activation in ("gelu", "gelu_tanh"):
        cases.append((FR.ln_region, (xn.clone().requires_grad_(), wn.clone().requires_grad_(),
                                     bn.clone().requires_grad_(), 1e-5, activation, [], "ln")))
        cases.append((FR.ln_region, (xn, wn, bn, 1e-5, activation, [], "ln", True)))   # with the output's bits
        _, mean, invstd, _, _ = FR.ln_region(xn, wn, bn, 1e-5, activation, [], "ln")
        cases.append((FR.ln_region_backward, (torch.randn(xn.shape), xn, wn, bn, mean, invstd, 1e-5, activation,
                                              [], "ln")))
    # a binarized linear layer's raw result -> GELU (with a bias), ReLU (without)
    yl, al, bl = torch.randint(-9, 10, (2, 3, 7)).float(), torch.rand(7), torch.randn(7)
    for activation, lbias in (("gelu", bl), ("relu", None)):
        cases.append((FR.linear_act_region, (yl.clone().requires_grad_(), al,
                                             None if lbias is None else lbias.clone().requires_grad_(), 9,
                                             activation, [], "fc1")))
        cases.append((FR.linear_act_region, (yl, al, lbias, 9, activation, [], "fc1", True)))
        raw = FR.linear_act_region(yl, al, lbias, 9, activation, [], "fc1")[1]
        cases.append((FR.linear_act_region_backward, (torch.randn(yl.shape), raw, al, lbias, activation, [], "fc1")))
    # RMSNorm regions (none, SiLU) and the gated linear region (SwiGLU without biases, GEGLU with)
    for activation in ("none", "silu"):
        cases.append((FR.rms_region, (xn.clone().requires_grad_(), wn.clone().requires_grad_(), 1e-6, activation,
                                      [], "rms")))
        cases.append((FR.rms_region, (xn, wn, 1e-6, activation, [], "rms", True)))
        invstd = FR.rms_region(xn, wn, 1e-6, activation, [], "rms")[1]
        cases.append((FR.rms_region_backward, (torch.randn(xn.shape), xn, wn, invstd, 1e-6, activation, [], "rms")))
    yu, au = torch.randint(-9, 10, (2, 3, 7)).float(), torch.rand(7)
    for activation, lbias in (("silu", None), ("gelu", bl)):
        ubias = None if lbias is None else lbias.flip(0)
        grad = [t if t is None else t.clone().requires_grad_() for t in (yl, lbias, yu, ubias)]
        cases.append((FR.gated_linear_region, (grad[0], al, grad[1], grad[2], au, grad[3], 9, activation, [], "mlp")))
        cases.append((FR.gated_linear_region, (yl, al, lbias, yu, au, ubias, 9, activation, [], "mlp", True)))
        _, raw, raw_up, _, _ = FR.gated_linear_region(yl, al, lbias, yu, au, ubias, 9, activation, [], "mlp")
        cases.append((FR.gated_linear_region_backward, (torch.randn(yl.shape), raw, al, lbias, raw_up, au, ubias,
                                                        activation, [], "mlp")))
    # dropout over an odd count (a partial last mask byte)
    xd = torch.randn(3, 5, 7)
    cases.append((D.dropout, (xd.clone().requires_grad_(), RS, 0.3, 17, "drop")))
    cases.append((D.dropout_backward, (torch.randn(xd.shape), D.dropout(xd, RS, 0.3, 17, "drop")[1], 0.3, "drop")))
    return cases


def test_opcheck_every_op():
    cases = _opcheck_cases()
    assert sorted({f"fqt::{op._name}" if hasattr(op, "_name") else str(op) for op, _ in cases}) \
        == registry.ops()
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_forward_ops_match_reference_layers():
    x, w, y_raw, sign_bits, ste_bits = _conv_case()
    alpha, bias = R.default_alpha(w), torch.randn(4)
    expected = R.binary_conv2d(x, w, alpha, bias, *GEOM)
    torch.testing.assert_close(y_raw * alpha.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1), expected)
    # y_raw is an integer GEMM result: an exact count of agreeing signs
    assert torch.equal(y_raw, y_raw.round())
    flat = x.reshape(2, -1)
    assert torch.equal(R.unpack_bits(sign_bits, flat.shape[1]), flat > 0)
    assert torch.equal(R.unpack_bits(ste_bits, flat.shape[1]), flat.abs() < 1)
    # the same layer from x's bits packed elsewhere (x itself is not read: it only routes dX)
    for impl in ("reference", "kernels"):
        y_packed = registry.lookup("fqt::binary_conv2d_packed", impl)(torch.full_like(x, float("nan")), sign_bits,
                                                                      ste_bits, w, RS, *GEOM, 3)
        assert torch.equal(y_packed[0], y_raw), impl
        assert all(torch.equal(a, b) for a, b in zip(y_packed[1:], R.pack_weight(w))), impl
    xl, wl, yl, sbl, mbl = _linear_case()
    for impl in ("reference", "kernels"):   # and a linear layer's
        y_packed = registry.lookup("fqt::binary_linear_packed", impl)(torch.full_like(xl, float("nan")), sbl, mbl,
                                                                      wl, RS, 2)
        assert torch.equal(y_packed[0], yl), impl
        assert all(torch.equal(a, b) for a, b in zip(y_packed[1:], R.pack_weight(wl))), impl
    torch.testing.assert_close(yl * R.default_alpha(wl), R.binary_linear(xl, wl, R.default_alpha(wl), None))
    assert sbl.shape == (6, R.padded_words(70)) and sbl.dtype == torch.int64  # per row of 70 features


def test_packed_backward_ops_match_float_input_reference():
    x, w, y, sb, mb = _conv_case()
    g = torch.randn_like(y)
    torch.testing.assert_close(L.conv2d_input_grad(g, *_wb(w), mb, list(x.shape), *GEOM),
                               R.conv2d_input_grad(g, w, x, *GEOM))
    torch.testing.assert_close(L.conv2d_weight_grad(g, *_wb(w), sb, list(x.shape), *GEOM),
                               R.conv2d_weight_grad(g, w, x, *GEOM))
    xl, wl, yl, sbl, mbl = _linear_case()
    gl = torch.randn_like(yl)
    torch.testing.assert_close(L.linear_input_grad(gl, *_wb(wl), mbl, list(xl.shape)),
                               R.linear_input_grad(gl, wl, xl))
    torch.testing.assert_close(L.linear_weight_grad(gl, *_wb(wl), sbl, list(xl.shape)),
                               R.linear_weight_grad(gl, wl, xl))


@pytest.mark.parametrize("method", ["ptq", "psq", "aq_scq", "topk"])
@pytest.mark.parametrize("path", ["input", "weight"])
def test_quantizer_ops_compose_to_reference_and_feed_gemms(method, path):
    x, w, y, sb, mb = _conv_case()
    g = torch.randn_like(y)
    g2d, rps = R.conv_rows(g), y.shape[2] * y.shape[3]
    lo, hi, keep, prob = L.aq_sample(g2d, RS, method, path, 2, rps, 3)
    codes, scale, zero = L.quantize_gradient(g2d, lo, hi, keep, prob, RS, method, path, 2, rps, 3)
    q = R.quantize_gradient(g2d, method, path, 2, rows_per_sample=rps, seed=11, step=5, layer=3)
    assert torch.equal(codes, q.codes) and torch.equal(keep, q.keep)
    assert torch.equal(scale, q.scale) and torch.equal(zero, q.zero)
    grouping = R.grouping(method, path)
    gq = R.conv_unrows(q.dequantize(), y.shape)
    if path == "input":
        got = L.conv2d_input_grad_q(codes, scale, zero, keep, *_wb(w), mb, list(x.shape), *GEOM, grouping)
        want = R.conv2d_input_grad(gq, w, x, *GEOM)
    else:
        got = L.conv2d_weight_grad_q(codes, scale, zero, keep, *_wb(w), sb, list(x.shape), *GEOM, grouping)
        want = R.conv2d_weight_grad(gq, w, x, *GEOM)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_aq_keeps_n_over_b_groups_on_average(bits):
    torch.manual_seed(bits)
    g2d = torch.randn(64, 32) * torch.rand(64, 1) * 3  # sample groups of varied range
    kept = []
    for step in range(200):
        _, _, keep, prob = L.aq_sample(g2d, torch.tensor([0, step]), "aq_scq", "input", bits, 2, 0)
        kept.append(keep.float().mean())
        assert prob.sum().item() == pytest.approx(32 / bits, rel=1e-4)
    assert torch.stack(kept).mean().item() == pytest.approx(1 / bits, abs=0.02)


def test_registry_never_falls_back():
    kernel = registry.lookup("fqt::binary_conv2d", "kernels")
    assert kernel is not registry.lookup("fqt::binary_conv2d", "reference")
    with pytest.raises(KeyError, match=r"no 'kernels' implementation of fqt::aq_sample .*'reference'"):
        registry.lookup("fqt::aq_sample", "kernels")
    with pytest.raises(ValueError, match="backend"):
        registry.register("fqt::binary_conv2d", "gpu", kernel)


def _train_step(method="aq_scq"):
    torch.manual_seed(0)
    compiled = fqt.compile(SmallCNN(), fqt.Config(backend="kernels", method=method))
    compiled(torch.randn(2, 3, 8, 8)).sum().backward()
    return compiled


@pytest.mark.parametrize("op,layer", [("binary_linear", "fc1"),
                                      ("aq_quantize_conv2d_grads", "conv[12]")])
def test_missing_kernel_raises_at_compile_time_naming_op_and_layer(monkeypatch, op, layer):
    monkeypatch.delitem(registry._IMPLS, (f"fqt::{op}", "kernels"))
    with pytest.raises(Exception, match=rf"fqt::{op} \(of layer '{layer}'\) has no 'kernels' implementation"):
        _train_step()


def test_unfused_quantizer_chain_raises_on_the_kernel_backend(monkeypatch):
    monkeypatch.setattr(compiler, "fuse_gradient_quantizers", lambda gm: PassResult(gm, False))
    with pytest.raises(RuntimeError, match=r"fqt::aq_sample \(of layer '(conv1|conv2|fc1)'\) has no 'kernels'"):
        _train_step()


def test_float_gradients_by_plan_run_on_the_reference_and_say_so():
    ran = _train_step(method="none").fqt_last.ran
    assert ran["fqt::binary_conv2d_scaled"] == "kernels"
    assert ran["fqt::conv2d_input_grad"] == ran["fqt::linear_weight_grad"] == "reference"


@pytest.mark.parametrize("shape", [(1, 3, 3, 3), (5, 70), (3, 2, 5, 7), (2, 64), (1, 1)],
                         ids=["O1-K27", "K70", "conv-K70", "K64", "O1-K1"])
def test_pack_weight_round_trips_against_sign_and_ste_mask(shape):
    """The saved-weight layout: a row per output channel over the flattened input axis, padded
    to whole vectors with zero words, read back as sign(W) and |W| < 1 (0, ±1 on the edges);
    the kernels' packer writes the same words."""
    torch.manual_seed(5)
    w = torch.randn(*shape) * 1.2
    edges = torch.tensor([0.0, 1.0, -1.0, 0.999, -0.0])
    w.view(-1)[:edges.numel()] = edges[:w.numel()]
    o, k = shape[0], w[0].numel()
    sign_words, ste_words = R.pack_weight(w)
    for words in (sign_words, ste_words):
        assert words.dtype == torch.int64 and tuple(words.shape) == (o, R.padded_words(k))
        assert not R.unpack_bits(words, words.shape[1] * 64)[:, k:].any()   # padding bits are 0
    assert torch.equal(R.unpack_weight(sign_words, shape), R.sign(w) > 0)
    assert torch.equal(R.unpack_weight(ste_words, shape), R.ste_mask(w).bool())
    kernel_bits = pack_signs_and_ste(w.reshape(o, -1))
    assert all(torch.equal(got.words, want) for got, want in zip(kernel_bits, (sign_words, ste_words)))


@pytest.mark.parametrize("o", [1, 5])
def test_backward_ops_on_weight_bits_equal_the_float_weight_references_exactly(o):
    """The backward ops read W only through its saved bits and still compute, bit for bit,
    the float-weight reference (weights on the STE window's edges included)."""
    torch.manual_seed(6)
    x, w = torch.randn(2, 3, 5, 7) * 1.5, torch.randn(o, 3, 3, 3)
    xl, wl = torch.randn(4, 70) * 1.5, torch.randn(o, 70)
    for t in (w, wl):
        t.view(-1)[:3] = torch.tensor([1.0, -1.0, 0.0])
    y, sb, mb, *w_bits = L.binary_conv2d(x, w, RS, *GEOM, 3)
    g, wb = torch.randn_like(y), (*w_bits, list(w.shape))
    assert torch.equal(L.conv2d_input_grad(g, *wb, mb, list(x.shape), *GEOM), R.conv2d_input_grad(g, w, x, *GEOM))
    assert torch.equal(L.conv2d_weight_grad(g, *wb, sb, list(x.shape), *GEOM), R.conv2d_weight_grad(g, w, x, *GEOM))
    yl, sbl, mbl, *wl_bits = L.binary_linear(xl, wl, RS, 2)
    gl, wbl = torch.randn_like(yl), (*wl_bits, list(wl.shape))
    assert torch.equal(L.linear_input_grad(gl, *wbl, mbl, list(xl.shape)), R.linear_input_grad(gl, wl, xl))
    assert torch.equal(L.linear_weight_grad(gl, *wbl, sbl, list(xl.shape)), R.linear_weight_grad(gl, wl, xl))
