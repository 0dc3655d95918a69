"""The gradient quantizer at its edges (docs/math.md §4): AQ stays unbiased for constant
groups (batch-1 layers, a constant row) on both backends, and a keep probability below 2**-24
is resolved by the keep draw itself."""
import numpy as np
import pytest
import torch
import torch.nn as nn

import fqt_compiler as fqt
from fqt_compiler.ops import reference as ref
from fqt_compiler.ops import registry, rng

BACKENDS = ("reference", "kernels")
DRAWS = 400


def assert_unbiased(draws: torch.Tensor, expected: torch.Tensor):
    """The mean of ``draws`` (``[DRAWS, ...]``) is within 4 standard errors of ``expected``,
    elementwise; where every draw is equal the mean must be the expected value itself."""
    mean, se = draws.double().mean(0), draws.double().std(0) / draws.shape[0] ** 0.5
    tol = 4 * se + 1e-5 * expected.double().abs().clamp(min=1)
    bad = (mean - expected.double()).abs() > tol
    assert int(bad.sum()) == 0, (f"{int(bad.sum())} of {bad.numel()} elements biased: mean "
                           f"{mean[bad][:4].tolist()} vs expected {expected[bad][:4].tolist()}")


def gradients(model, x, method, backend, draws):
    """``[draws, ...]`` gradients of every parameter and of ``x`` (flattened, concatenated) from
    one compiled model over ``draws`` training steps, each drawing from its own (seed, step)
    streams, with the forward unchanged (no optimizer step)."""
    compiled = fqt.compile(model, fqt.Config(method=method, bits=4, backend=backend, seed=7))
    out = []
    compiled(x)
    assert [layer.binarize for layer in compiled.fqt_graphs[0].plan] == [False, True, False]
    for _ in range(draws):
        model.zero_grad()
        xg = x.clone().requires_grad_()
        compiled(xg).square().sum().backward()
        out.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()] + [xg.grad.reshape(-1)]))
    return torch.stack(out)


def batch1_linear():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 16), nn.Linear(16, 12), nn.Linear(12, 3)), torch.randn(1, 6)


def batch1_conv_1x1_map():
    torch.manual_seed(2)
    # the middle conv (binarized) maps 1x5x3x3 to a 1x1 map: every channel group is one element
    return nn.Sequential(nn.Conv2d(3, 5, 1), nn.Conv2d(5, 8, 3), nn.Flatten(), nn.Linear(8, 3)), \
        torch.randn(1, 3, 3, 3)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [batch1_linear, batch1_conv_1x1_map])
def test_batch1_model_gradients_are_unbiased(case, backend):
    model, x = case()
    expected = gradients(model, x, "none", backend, 1)[0]
    draws = gradients(model, x, "aq_scq", backend, DRAWS)
    assert expected.abs().sum() > 0
    assert_unbiased(draws, expected)


def linear_case(rows, constant_row=None):
    torch.manual_seed(rows)
    g, x, w = torch.randn(rows, 10), torch.randn(rows, 9), torch.randn(10, 9)
    if constant_row is not None:
        g[constant_row] = 0.7   # its per-sample group is constant: R = 0, |z| = 0.7
    signs, ste = ref.pack_activation(x, "linear")
    return ("linear", g, w, (ste, signs), [list(x.shape)],
            (ref.linear_input_grad(g, w, x), ref.linear_weight_grad(g, w, x)))


def conv_1x1_map_case():
    torch.manual_seed(4)
    x, w = torch.randn(1, 5, 3, 3), torch.randn(8, 5, 3, 3)
    g = torch.randn(1, 8, 1, 1)
    geometry = ([1, 1], [0, 0], [1, 1])
    signs, ste = ref.pack_activation(x, "conv2d")
    return ("conv2d", g, w, (ste, signs), [list(x.shape), *geometry],
            (ref.conv2d_input_grad(g, w, x, *geometry), ref.conv2d_weight_grad(g, w, x, *geometry)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [lambda: linear_case(1), conv_1x1_map_case, lambda: linear_case(6, 2)],
                         ids=["batch1-linear", "batch1-conv-1x1-map", "constant-row"])
def test_both_paths_are_unbiased_for_constant_groups(case, backend):
    """The fused path ops (quantize G', then the path's GEMM) of one layer, averaged over
    400 seeds, against the float-G' gradients."""
    kind, g, w, saved, geometry, expected = case()
    kw = {"layer_name": "layer", "target": "host"} if backend == "kernels" else {}
    for path, bits_saved, want in zip(("input", "weight"), saved, expected):
        op = registry.lookup(f"fqt::aq_quantize_{kind}_{path}_grad", backend)
        draws = torch.stack([op(g, torch.tensor([seed, 0]), *ref.pack_weight(w), list(w.shape), bits_saved,
                                *geometry, "aq_scq", 4, 0, **kw)
                             for seed in range(DRAWS)])
        assert want.abs().sum() > 0
        assert_unbiased(draws, want)


def test_only_all_zero_groups_score_zero():
    lo = torch.tensor([0.7, -0.3, 0.0, -1.0, -0.0])
    hi = torch.tensor([0.7, -0.3, 0.0, 2.0, 0.0])
    assert ref.aq_scores(lo, hi).tolist() == pytest.approx([0.7, 0.3, 0.0, 3.0, 0.0])
    p = ref.aq_probabilities(ref.aq_scores(lo, hi), 4)
    assert (p[[0, 1, 3]] > 0).all() and (p[[2, 4]] == 0).all()


def test_tiny_keep_probability_survives_float32_on_the_draw_grid():
    # c * s is about 1e-45 / 25: below float32's smallest subnormal, so it must not round to 0
    p = ref.aq_probabilities(torch.tensor([1.0] * 99 + [1e-45]), 4)
    assert p[-1] > 0 and p.dtype == torch.float32
    grid = p.double() * 2.0 ** rng.KEEP_BITS
    assert torch.equal(grid, grid.round()), "p must lie on the keep draw's 2**-53 grid"


@pytest.mark.parametrize("p", [3 * 2.0 ** -40, 2.0 ** -25, 2.0 ** -53])
def test_keep_decision_resolves_p_below_2_pow_24(p):
    """The keep decision as a function of the 64-bit draw: exactly ``p * 2**53`` of the 2**53
    values of its top bits keep the group, i.e. rate p (a 24-bit uniform would keep every
    draw below 2**40, rate 2**-24)."""
    threshold = int(p * 2 ** rng.KEEP_BITS)
    assert threshold == p * 2 ** rng.KEEP_BITS
    low_bits = (1 << (64 - rng.KEEP_BITS)) - 1
    draws = np.array([0, (threshold - 1) << 11 | low_bits, threshold << 11, (threshold + 1) << 11,
                      1 << 40, 2 ** 64 - 1], dtype=np.uint64)
    keep = rng.bernoulli(draws, torch.full((len(draws),), p))
    assert keep.tolist() == [True, True, False, False, False, False]

