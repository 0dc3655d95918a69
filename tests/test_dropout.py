"""Dropout with a counter-based mask: the kernels equal the reference draw for draw, the mask
keeps 1 - p of the elements, sites and steps draw different masks, and compiled models
(a small MLP on both backends, a transformers BERT) run the fqt op in place of torch's."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import fqt_compiler as fqt
from fqt_compiler.codegen import dropout as gen
from fqt_compiler.codegen.targets import get_target
from fqt_compiler.ops import dropout as ops
from fqt_compiler.ops import rng
from fqt_compiler.runtime import dropout as kernels
from fqt_compiler.cross.verify import verify
from fqt_compiler.runtime.jit import compile_assembly, compile_object
from conftest import KERNEL_TARGETS, needs_cross, seeded_randn

KEY = rng.stream_key(7, 3, ops.site_id("encoder.layer.0.output.dropout", 0), rng.STREAM_DROPOUT)


def _reference(x, dy, key, p):
    """``(y, bits, dx)`` from the op's reference definitions."""
    keep = ops.keep_mask(key, x.numel(), p)
    return ops.apply_mask(x, keep, p), ops.keep_bits(keep), ops.apply_mask(dy, keep, p)


def _check(shape, p, target, seed=0, key=KEY):
    x, dy = seeded_randn(*shape, seed=seed), seeded_randn(*shape, seed=seed + 1)
    y, bits = kernels.dropout_forward(x, key, p, target=target)
    dx = kernels.dropout_backward(dy, bits, p, target=target)
    want_y, want_bits, want_dx = _reference(x, dy, key, p)
    assert torch.equal(bits, want_bits)
    assert torch.equal(y, want_y) and torch.equal(dx, want_dx)
    return bits


@pytest.mark.parametrize("target", KERNEL_TARGETS)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("shape", [(1,), (7,), (63,), (65,), (1037,), (3, 5, 37)])
def test_kernels_equal_the_reference_bit_for_bit(shape, p, target):
    _check(shape, p, target)


@pytest.mark.parametrize("threads", [1, 3])
def test_results_do_not_depend_on_the_split(monkeypatch, threads):
    """Slices of one byte each over three threads (a step of 8 lanes then straddles slices)
    write what one thread writes: the draw's counter is the element index."""
    monkeypatch.setattr(kernels, "MIN_SLICE_BYTES", 1)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _check((101,), 0.5, "host")
    finally:
        torch.set_num_threads(before)


def test_a_non_contiguous_input_draws_in_row_major_order():
    x = seeded_randn(37, 9).t()
    y, bits = kernels.dropout_forward(x, KEY, 0.3)
    keep = ops.keep_mask(KEY, x.numel(), 0.3)
    assert torch.equal(y, ops.apply_mask(x.contiguous(), keep, 0.3)) and torch.equal(bits, ops.keep_bits(keep))


def test_nan_and_inf_stay_as_in_torch():
    """``x * m``: a dropped NaN or Inf is NaN, as ATen's ``x * mask * scale`` gives."""
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0] * 16)
    y, bits = kernels.dropout_forward(x, KEY, 0.5)
    keep = ops.unpacked_keep(bits, x.numel())
    assert 0 < keep.sum() < x.numel()
    want = x * keep.float() * ops.scale_of(0.5)
    assert torch.equal(y.isnan(), want.isnan()) and torch.equal(y[~want.isnan()], want[~want.isnan()])


@settings(max_examples=8, deadline=None)
@given(n=st.integers(1, 300), p=st.floats(0.01, 0.99), seed=st.integers(0, 2 ** 62))
def test_kernels_property(n, p, seed):
    _check((n,), p, "host", key=rng.stream_key(seed, 1, 2, rng.STREAM_DROPOUT))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_is_one_minus_p(p):
    """The kept count of n Bernoulli(1 - p) draws is within 6 standard deviations of its mean."""
    n = 1 << 18
    bits = kernels.dropout_forward(torch.ones(n), KEY, p)[1]
    kept = int(ops.unpacked_keep(bits, n).sum())
    assert abs(kept - n * (1 - p)) < 6 * (n * p * (1 - p)) ** 0.5, (kept, n * (1 - p))


def _mask(seed, step, site, n=4096, p=0.5):
    state = torch.tensor([seed, step], dtype=torch.int64)
    return ops.dropout(torch.ones(n), state, p, site, "test")[1]


def test_sites_and_steps_draw_different_masks():
    a, b = ops.site_id("h.0.drop", 0), ops.site_id("h.1.drop", 0)
    assert a != b != ops.site_id("h.0.drop", 1)
    first = _mask(0, 0, a)
    assert torch.equal(first, _mask(0, 0, a))            # same (seed, step, site): same mask
    others = [_mask(0, 1, a), _mask(0, 0, b), _mask(1, 0, a)]
    # independent masks of 4096 fair draws agree on about half the elements, not all
    for other in others:
        agree = (ops.unpacked_keep(first, 4096) == ops.unpacked_keep(other, 4096)).float().mean()
        assert 0.4 < agree < 0.6


@pytest.mark.parametrize("target", ["rpi4", "rpi5", "hygon"])
def test_kernels_emit_for_every_cross_target(target):
    """Both kernels compile to object code for the target, vectorized with its registers."""
    t = get_target(target)
    for ir in (gen.dropout_forward_ir(t), gen.dropout_backward_ir(t)):
        assert compile_object(ir.text, t)
        asm = compile_assembly(ir.text, t)
        if t.is_aarch64:
            assert ".4s" in asm and "zmm" not in asm
        else:
            assert "ymm" in asm and "zmm" not in asm and "{%k" not in asm


@pytest.mark.parametrize("mask", [None, "float", "bool", "causal"])
def test_attention_dropout_is_atens_math_path_with_the_counted_mask(mask):
    """``attention_dropout`` equals ATen's math attention given the same keep mask (ATen
    scales ``value`` instead of the probabilities: equal to float32 rounding)."""
    q, k, v = seeded_randn(2, 3, 5, 8), seeded_randn(2, 3, 7, 8, seed=1), seeded_randn(2, 3, 7, 8, seed=2)
    attn_mask = {None: None, "causal": None, "float": seeded_randn(2, 1, 5, 7, seed=3),
                 "bool": seeded_randn(2, 1, 5, 7, seed=3) > -1}[mask]
    state, site, p = torch.tensor([4, 2]), ops.site_id("attn", 0), 0.3
    got = ops.attention_dropout(q, k, v, attn_mask, p, mask == "causal", 0.4, state, site, "attn")
    keep = ops.keep_mask(ops.dropout_key(state, site), 2 * 3 * 5 * 7, p).view(2, 3, 5, 7)
    want, _ = torch.ops.aten._scaled_dot_product_attention_math(
        q, k, v, None if mask != "float" else attn_mask, p, mask == "causal", keep, scale=0.4) \
        if mask != "bool" else torch.ops.aten._scaled_dot_product_attention_math(
            q, k, v, torch.zeros(2, 1, 5, 7).masked_fill(~attn_mask, float("-inf")), p, False, keep, scale=0.4)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert 0 < keep.sum() < keep.numel()


class _Net(nn.Module):
    def __init__(self, p=0.3, inplace=False):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(16, 33), nn.Linear(33, 32), nn.Linear(32, 4)
        self.drop, self.p, self.inplace = nn.Dropout(p, inplace=inplace), p, inplace

    def forward(self, x):
        h = F.relu(self.drop(self.fc1(x)))
        h = F.dropout(self.fc2(h), 0.5, self.training)
        return self.fc3(F.relu(self.drop(h)))   # the same module twice: two sites


def _steps(backend, steps=2, **net):
    torch.manual_seed(0)
    model = _Net(**net)
    compiled = fqt.compile(model, fqt.Config(backend=backend, seed=5))
    x = seeded_randn(5, 16)
    runs = []
    for _ in range(steps):
        loss = compiled(x).square().mean()
        loss.backward()
        runs.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
        model.zero_grad()
    return compiled, runs


def test_both_backends_draw_the_same_masks():
    """The reference and the kernels give the same loss and gradients step by step; a float
    dropout's mask would differ between the two runs and the losses with it."""
    compiled, kernel_runs = _steps("kernels")
    _, reference_runs = _steps("reference")
    for (loss_k, grads_k), (loss_r, grads_r) in zip(kernel_runs, reference_runs):
        assert abs(loss_k - loss_r) <= 1e-5 * abs(loss_r)
        for g_k, g_r in zip(grads_k, grads_r):
            torch.testing.assert_close(g_k, g_r, rtol=1e-4, atol=1e-6)
    assert kernel_runs[0][0] != kernel_runs[1][0]          # step 1 draws new masks
    cg = compiled.fqt_graphs[-1]
    assert [r.split(" (p=")[0] for r in cg.regions] == ["dropout drop#0", "dropout (model)#0", "dropout drop#1"]
    fw, bw = ([str(n.meta.get("fqt_op", n.target)) for n in g.graph.nodes] for g in (cg.forward, cg.backward))
    assert fw.count("fqt.dropout.default") == 3 and bw.count("fqt.dropout_backward.default") == 3
    assert not [op for op in fw + bw if "bernoulli" in op or "native_dropout" in op]


def test_eval_mode_and_unfusible_dropout():
    """Eval mode is the identity (nothing to replace); inplace=True and p=1 stay torch's
    dropout with the reason in the summary."""
    compiled, _ = _steps("kernels", steps=1, inplace=True)
    text = fqt.summary(compiled)
    assert "drop: dropout x2: inplace=True" in text
    assert sum("dropout" in r for r in compiled.fqt_graphs[-1].regions) == 1   # F.dropout is fused
    compiled.eval()
    with torch.no_grad():
        compiled(seeded_randn(5, 16))
    assert not compiled.fqt_last.regions
    compiled, _ = _steps("reference", steps=1, p=1.0)
    assert "p=1 zeroes every element" in fqt.summary(compiled)


class _Checkpointed(nn.Module):
    def __init__(self, checkpointed=True):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 2)
        self.drop, self.checkpointed = nn.Dropout(0.4), checkpointed

    def block(self, h):
        return self.drop(F.relu(self.b(h)))

    def forward(self, x):
        h = self.drop(self.a(x))
        h = torch.utils.checkpoint.checkpoint(self.block, h, use_reentrant=False) if self.checkpointed \
            else self.block(h)
        return self.c(h)


def test_dropout_inside_activation_checkpointing_replays_its_mask():
    """A checkpointed block's dropout, replayed in backward, draws the mask of its forward:
    loss and gradients equal those of the same model without checkpointing (same sites).
    With torch's dropout there, compiling failed (the checkpoint's RNG-state op)."""
    runs = []
    for checkpointed in (True, False):
        torch.manual_seed(0)
        model = _Checkpointed(checkpointed)
        # every layer float: a layer inside a checkpoint stays float (annotate_layers)
        compiled = fqt.compile(model, fqt.Config(seed=1, rules=[{"name": "b", "binarize": False}]))
        loss = compiled(seeded_randn(6, 8)).square().sum()
        loss.backward()
        runs.append((loss.item(), [p.grad for p in model.parameters()], compiled.fqt_graphs[-1].regions))
    (loss_c, grads_c, regions_c), (loss_p, grads_p, regions_p) = runs
    assert regions_c == regions_p and len(regions_c) == 2
    assert loss_c == loss_p
    for g_c, g_p in zip(grads_c, grads_p):
        torch.testing.assert_close(g_c, g_p, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_bert_trains_with_the_dropout_op(tmp_path):
    pytest.importorskip("transformers")
    from test_transformers import _train, bert
    compiled, losses, _ = _train(bert, steps=6)
    assert losses[-1] < losses[0]
    fqt.dump(compiled, tmp_path)
    forward = (tmp_path / "forward.txt").read_text()
    layers = compiled.module.config.num_hidden_layers
    # embeddings, then each layer's attention probabilities (inside
    # scaled_dot_product_attention(dropout_p=...)), attention output and FFN output
    assert forward.count("fqt.dropout") == 1 + 3 * layers, forward
    assert "bernoulli" not in forward and "native_dropout" not in forward
    assert "fqt.dropout_backward" in (tmp_path / "backward.txt").read_text()


@needs_cross
@pytest.mark.slow
@pytest.mark.parametrize("target", ["rpi4", "hygon"])
def test_dropout_kernels_verify_on_target(target, tmp_path):
    """A step's dropout kernels replayed on the target equal the host's and the oracle's
    draws bit for bit (odd sizes: 3 x 29 x 24 and x 40 elements)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 24), nn.Dropout(0.3), nn.Linear(24, 40), nn.ReLU(), nn.Dropout(0.5),
                          nn.Linear(40, 3))
    results = verify(model, (seeded_randn(3, 29, 24),), target, tmp_path)
    assert all(r.passed and r.has_reference for r in results), results
    assert {"dropout_forward", "dropout_backward"} <= {r.family for r in results}
