"""The ``aq_groups`` kernel (AQ keep decisions and per-group scales in one call) against the
reference: ``aq_scores`` / ``opt_scores``, ``aq_probabilities``, ``rng.keep_draws`` and
``dequantization`` with the stochastic-rounding scale, bit for bit."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from conftest import KERNEL_TARGETS
from fqt_compiler.codegen.targets import get_target
from fqt_compiler.ops import reference, rng
from fqt_compiler.runtime import quantize

KEY = dict(seed=5, step=9, layer=4)


def expected(lo, hi, bits, path, scores=None):
    """``(keep, prob, sr_scale, scale, zero)`` of the reference for finite statistics."""
    keep, prob = reference.keep_groups(lo, hi, "aq_scq" if scores is None else "aq_opt", path, bits,
                                       scores=scores, **KEY)
    return (keep, prob, reference.rounding_scale(lo, hi, bits), *reference.dequantization(lo, hi, keep, prob, bits))


def decide(lo, hi, bits, path, target="host", scores=None):
    key = rng.stream_key(KEY["seed"], KEY["step"], KEY["layer"], reference.sample_stream(path))
    return quantize._per_group(get_target(target).name, lo, hi, bits, scores=scores, key=key)


def assert_bitwise(got: quantize._Groups, want):
    for name, a, b in zip(("keep", "prob", "sr_scale", "scale", "zero"),
                          (got.keep, got.prob, got.sr_scale, got.scale, got.zero), want):
        assert np.array_equal(torch.from_numpy(a).view(torch.int8 if name == "keep" else torch.int32),
                              b.view(torch.int8 if name == "keep" else torch.int32)), name


def statistics(n, seed, *, zero_every=0, constant_every=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    lo = torch.randn(n, generator=g) * scale
    hi = lo + torch.rand(n, generator=g) * scale
    if zero_every:
        lo[::zero_every], hi[::zero_every] = 0.0, 0.0
    if constant_every:
        hi[1::constant_every] = lo[1::constant_every]
    return lo, hi


@pytest.mark.parametrize("target", KERNEL_TARGETS)
@pytest.mark.parametrize("n, bits, kwargs", [
    (1, 4, {}),                                  # one group: p = 1/4 of a budget below one group
    (65, 4, dict(zero_every=3)),                 # zero ranges score 0: p = 0, never kept
    (130, 2, dict(constant_every=4)),            # constant groups score |z|
    (7, 1, {}),                                  # bits = 1: the budget covers every group
    (544, 8, dict(scale=1e-3)),
    (300, 4, dict(zero_every=1)),                # every group zero: the budget is never spread
])
@pytest.mark.parametrize("path", [reference.PATH_INPUT, reference.PATH_WEIGHT])
def test_decisions_equal_the_reference(target, n, bits, kwargs, path):
    lo, hi = statistics(n, n + bits, **kwargs)
    assert_bitwise(decide(lo, hi, bits, path, target), expected(lo, hi, bits, path))


def test_ties_and_tiny_scores_keep_the_stable_order():
    """Many equal scores (taken in index order, numpy's stable argsort of -scores) and a
    score of the smallest float32, whose p is still rounded up to the draw's grid."""
    lo = torch.zeros(200)
    hi = torch.tensor([1.0, 2.0, 1.0, 1e-45] * 50)
    assert_bitwise(decide(lo, hi, 4, "input"), expected(lo, hi, 4, "input"))


@pytest.mark.parametrize("target", KERNEL_TARGETS)
def test_stable_order_at_every_size(target):
    """Every group count up to a few merge widths (odd, powers of two and one past them), with
    three score values repeating out of phase with the runs, so ties meet across every run
    boundary of the sort and the budget's stop falls inside a run of equal scores."""
    for n in range(1, 140):
        lo = torch.zeros(n)
        hi = torch.tensor([1.0, 3.0, 1.0, 2.0, 3.0])[torch.arange(n) % 5]
        for bits in (2, 8):
            assert_bitwise(decide(lo, hi, bits, "weight", target), expected(lo, hi, bits, "weight"))


def test_float64_scores_of_aq_opt():
    lo, hi = statistics(97, 1)
    scores = torch.rand(97, dtype=torch.float64) * torch.tensor([1.0, 1e-300, 1e30]).repeat(33)[:97]
    assert_bitwise(decide(lo, hi, 4, "weight", scores=scores), expected(lo, hi, 4, "weight", scores))


@pytest.mark.parametrize("where", ["lo", "hi", "scores"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_special_groups_are_left_to_the_reference(where, value):
    """A non-finite lo, hi or score (or a range overflowing float32) makes the kernel decline
    (the runtime then takes ``reference.keep_groups``), writing nothing but its status."""
    lo, hi = statistics(10, 2)
    scores = torch.rand(10, dtype=torch.float64)
    {"lo": lo, "hi": hi, "scores": scores}[where][3] = value
    assert decide(lo, hi, 4, "input", scores=scores) is None
    assert decide(torch.tensor([-3e38, 0.0]), torch.tensor([3e38, 1.0]), 4, "input") is None


def test_given_decisions_only_get_scales():
    """With keep and prob given (other methods, special groups) only the scales are
    computed, for non-finite groups too, as the reference's float32 operations."""
    lo = torch.tensor([0.0, -1.0, float("nan"), 2.0, -float("inf")])
    hi = torch.tensor([0.0, 3.0, 1.0, 2.0, 1.0])
    keep = torch.tensor([True, False, True, True, True])
    prob = torch.tensor([0.5, 0.25, 1.0, 1.0, 1.0])
    got = quantize._per_group("host", lo, hi, 4, keep=keep.numpy(), prob=prob.numpy())
    want = (keep, prob, reference.rounding_scale(lo, hi, 4), *reference.dequantization(lo, hi, keep, prob, 4))
    for a, b in zip((got.keep, got.prob, got.sr_scale, got.scale, got.zero), want):
        torch.testing.assert_close(torch.from_numpy(a), b, rtol=0, atol=0, equal_nan=True)


def test_scratch_kept_across_calls_of_other_sizes():
    """The kernel's per-thread scratch grows for more groups and serves fewer after: each
    call's decisions are the reference's, whatever an earlier call left in it."""
    for n in (5, 700, 5, 64, 1):
        lo, hi = statistics(n, n, zero_every=3)
        assert_bitwise(decide(lo, hi, 4, "weight"), expected(lo, hi, 4, "weight"))


def test_no_groups():
    got = decide(torch.empty(0), torch.empty(0), 4, "input")
    assert got.keep.shape == got.prob.shape == (0,)


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 300), bits=st.sampled_from((1, 2, 4, 8)), seed=st.integers(0, 2**31),
       zero_every=st.integers(0, 5), constant_every=st.integers(0, 5), scale=st.sampled_from((1e-6, 1.0, 1e6)))
def test_decisions_property(n, bits, seed, zero_every, constant_every, scale):
    lo, hi = statistics(n, seed, zero_every=zero_every, constant_every=constant_every, scale=scale)
    assert_bitwise(decide(lo, hi, bits, "input"), expected(lo, hi, bits, "input"))
