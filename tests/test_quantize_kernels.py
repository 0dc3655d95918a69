"""The fused gradient quantizer against reference.quantize_gradient: same keep decisions,
same codes (as bit planes, padding words included), same scale/zero, for a seed."""
import itertools

import pytest
import torch
from hypothesis import given, settings, strategies as st

from conftest import KERNEL_TARGETS, seeded_randn
from fqt_compiler.ops import reference
from fqt_compiler.runtime import quantize
from fqt_compiler.runtime.packed import PackedBits

METHODS = ("ptq", "psq", "aq_scq", "aq_opt", "topk")
PATHS = (reference.PATH_INPUT, reference.PATH_WEIGHT)
KEY = dict(seed=3, step=11, layer=2)


def expected_planes(ref: reference.QuantizedGradient, path: str, rows_per_sample: int):
    """Bit planes of the kept rows of the path's operand (codes of G' rows packed along o, of
    G' columns packed along r, or, for per-sample groups on the weight path, of each sample's
    segment of each column), the output rows they map to and their groups."""
    codes = ref.codes.long()
    _, ids = reference.group_index(ref.codes, ref.kind, rows_per_sample)
    if path == reference.PATH_INPUT:
        rows = torch.nonzero(ref.keep[ids[:, 0]]).view(-1)
        operand, groups = codes[rows], ids[rows, 0]
    elif ref.kind == "sample":
        n, channels = codes.shape[0] // rows_per_sample, codes.shape[1]
        operand = codes.view(n, rows_per_sample, channels).transpose(1, 2).reshape(n * channels, rows_per_sample)
        rows, groups = torch.arange(n * channels) % channels, torch.arange(n * channels) // channels
    else:
        rows = torch.nonzero(ref.keep.expand(codes.shape[1])).view(-1)
        operand, groups = codes.T[rows], ids[0, rows]
    planes = torch.stack([PackedBits.from_bool(((operand >> t) & 1).bool()).words
                          for t in range(ref.bits)])
    return planes, rows, groups


def check(got: quantize.BitplaneGradient, ref: reference.QuantizedGradient, path, rows_per_sample):
    assert torch.equal(got.keep, ref.keep) and torch.equal(got.prob, ref.prob)
    assert torch.equal(got.scale, ref.scale) and torch.equal(got.zero, ref.zero)
    planes, rows, groups = expected_planes(ref, path, rows_per_sample)
    assert torch.equal(got.row_map, rows)
    assert torch.equal(got.planes, planes)
    assert torch.equal(got.row_scale, ref.scale[groups]) and torch.equal(got.row_zero, ref.zero[groups])


def gradient(*shape, seed=0):
    x = seeded_randn(*shape, seed=seed)
    x.view(-1)[::5] *= 30   # uneven group ranges, so AQ keeps some groups with certainty
    return x


@pytest.mark.parametrize("target", KERNEL_TARGETS)
@pytest.mark.parametrize("shape", [(3, 5, 4, 4), (2, 70, 3, 5), (4, 1, 1, 1), (5, 130, 2, 3), (1, 64, 8, 8),
                                   (7, 3, 1, 13), (2, 130, 8, 9),    # 72 rows a sample: tiles with tails
                                   (2, 67, 7, 11), (1, 5, 13, 13)])  # tails of 13 and 41 rows: partial chunks
def test_conv_gradient_all_methods(target, shape):
    n, o, h, w = shape
    g = gradient(*shape, seed=o)
    alpha = torch.rand(o) + 0.1
    g2d = reference.conv_rows(g * alpha.view(1, -1, 1, 1))
    for method, path, bits in itertools.product(METHODS, PATHS, (1, 2, 4, 8)):
        ref = reference.quantize_gradient(g2d, method, path, bits, rows_per_sample=h * w, **KEY)
        got = quantize.quantize_bitplanes(g, method, path, bits, alpha=alpha, target=target, **KEY)
        check(got, ref, path, h * w)
        assert got.out_rows == (n * h * w if path == reference.PATH_INPUT else o)


@pytest.mark.parametrize("target", KERNEL_TARGETS)
@pytest.mark.parametrize("rows,cols,rps", [(1, 1, 1), (6, 63, 1), (10, 64, 2), (9, 65, 3), (13, 127, 13), (4, 200, 1),
                                          (150, 3, 1), (141, 5, 47)])   # long columns: whole and partial blocks
def test_matrix_gradient(target, rows, cols, rps):
    g = gradient(rows, cols, seed=rows * cols)
    for method, path, bits in itertools.product(METHODS, PATHS, (1, 4)):
        ref = reference.quantize_gradient(g, method, path, bits, rows_per_sample=rps, **KEY)
        got = quantize.quantize_bitplanes(g, method, path, bits, rows_per_sample=rps, target=target, **KEY)
        check(got, ref, path, rps)
    gt = gradient(cols, rows, seed=1).T          # a transposed (non-contiguous) G'
    ref = reference.quantize_gradient(gt, "aq_scq", reference.PATH_INPUT, 2, rows_per_sample=rps, **KEY)
    got = quantize.quantize_bitplanes(gt, "aq_scq", reference.PATH_INPUT, 2, rows_per_sample=rps, **KEY)
    check(got, ref, reference.PATH_INPUT, rps)


@pytest.mark.parametrize("rows,cols,rps", [(6, 63, 1), (130, 70, 65), (64, 3, 64)])
def test_matrix_gradient_with_alpha(rows, cols, rps):
    """A linear layer's G' with alpha folded in (``G' = alpha ⊙ g`` in the statistics)."""
    g = gradient(rows, cols, seed=rows)
    alpha = torch.rand(cols) + 0.1
    for method, path in itertools.product(METHODS, PATHS):
        ref = reference.quantize_gradient(g * alpha, method, path, 4, rows_per_sample=rps, **KEY)
        got = quantize.quantize_bitplanes(g, method, path, 4, rows_per_sample=rps, alpha=alpha, **KEY)
        check(got, ref, path, rps)


@pytest.mark.parametrize("target", KERNEL_TARGETS)
@pytest.mark.parametrize("rows,cols", [(1, 70), (3, 1100), (130, 577)])
def test_linear_weight_path_many_kept_columns(target, rows, cols):
    """The weight path of a row-major G' (``quantize_pack_cols_ir``) with more kept columns
    than one pass over a tile's rows takes (ptq and 1-bit AQ keep them all), rows in one,
    partial or several 64-row blocks, with and without alpha."""
    g = gradient(rows, cols, seed=cols)
    alpha = torch.rand(cols) + 0.1
    for (method, bits), a in itertools.product([("ptq", 2), ("aq_scq", 1), ("aq_scq", 4)], (None, alpha)):
        ref = reference.quantize_gradient(g if a is None else g * a, method, reference.PATH_WEIGHT, bits,
                                          rows_per_sample=1, **KEY)
        got = quantize.quantize_bitplanes(g, method, reference.PATH_WEIGHT, bits, rows_per_sample=1, alpha=a,
                                          target=target, **KEY)
        check(got, ref, reference.PATH_WEIGHT, 1)


def test_non_contiguous_conv_gradient_and_zero_ranges():
    g = gradient(4, 6, 5, 10)[:, :, :, ::2]        # W not mergeable with H: copied once
    g[1] = 0.5                                     # a constant sample: R = 0, codes 0
    g2d = reference.conv_rows(g)
    for method, path in itertools.product(METHODS, PATHS):
        ref = reference.quantize_gradient(g2d, method, path, 4, rows_per_sample=25, **KEY)
        check(quantize.quantize_bitplanes(g, method, path, 4, **KEY), ref, path, 25)
    cl = gradient(3, 9, 4, 4).to(memory_format=torch.channels_last)   # read in place
    ref = reference.quantize_gradient(reference.conv_rows(cl), "aq_scq", reference.PATH_WEIGHT, 8,
                                      rows_per_sample=16, **KEY)
    check(quantize.quantize_bitplanes(cl, "aq_scq", reference.PATH_WEIGHT, 8, **KEY), ref,
          reference.PATH_WEIGHT, 16)


def test_group_stats_match_reference():
    g = gradient(5, 7, 3, 3)
    alpha = torch.rand(7) + 0.5
    g2d = reference.conv_rows(g * alpha.view(1, -1, 1, 1))
    for method, path in itertools.product(METHODS, PATHS):
        ref = reference.sample_groups(g2d, method, path, 4, rows_per_sample=9, **KEY)
        got = quantize.sample_groups(g, method, path, 4, alpha=alpha, **KEY)
        for a, b in zip(got, ref):
            assert torch.equal(a, b)


@pytest.mark.parametrize("target", KERNEL_TARGETS)
@pytest.mark.parametrize("shape", [(3, 5, 4, 4), (3, 4, 5, 7), (3, 4, 9, 9), (3, 4, 1, 3)])
def test_statistics_propagate_nan(target, shape):
    """A NaN in a group, in a whole vector of the min/max kernel, in its masked tail, or made
    by alpha (inf * 0), makes the group's lo and hi NaN, as in the reference; others keep
    theirs (an Inf is no NaN: it wins the compares)."""
    n, o, h, w = shape
    g = gradient(*shape, seed=5)
    g[1, 2, h - 1, w - 1] = float("nan")   # the last position of a pair: the tail when HW % 16
    g[1, 1, 0, 0] = float("nan")           # the first: a whole vector when HW >= 16
    g[0, 1, 0, w - 1] = float("-inf")
    g[0, 0, 0, 0] = 0.0
    alpha = torch.rand(o) + 0.5
    alpha[0] = float("inf")                # inf * 0 = NaN at (0, 0, 0, 0) only
    g2d = reference.conv_rows(g * alpha.view(1, -1, 1, 1))
    for kind in ("sample", "channel"):
        want = reference.group_min_max(g2d, kind, h * w)
        got = quantize.group_min_max(g, kind, alpha=alpha, target=target)
        assert want[0].isnan().any() and not want[0].isnan().all()
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("target", KERNEL_TARGETS)
@pytest.mark.parametrize("rows,cols", [(5, 7), (40, 19), (6, 33)])   # a tail only; 2 thread slices; whole + tail
def test_row_col_statistics(target, rows, cols, monkeypatch):
    """A row-major G' (a linear layer's): one pass of the row/column kernel gives both paths'
    groups as the reference: NaN (in a whole vector, in the masked tail, or made by alpha
    inf * 0) propagates to its row and column, an Inf is no NaN, a zero is +0.0; the two
    paths of one G' share the pass."""
    g = gradient(rows, cols, seed=rows)
    g[1, cols - 1] = float("nan")
    g[2, 0] = float("nan")
    g[0, 1] = float("-inf")
    g[0, 0] = 0.0
    g[3, :] = -0.0                  # a row and a column of negative zeros: +0.0 statistics
    g[:, 3] = -0.0
    alpha = torch.rand(cols) + 0.5
    alpha[0] = float("inf")         # inf * 0 = NaN at (0, 0) only
    passes, one_pass = [], quantize._row_col_min_max
    monkeypatch.setattr(quantize, "_row_col_min_max", lambda *a: passes.append(a) or one_pass(*a))
    shared = quantize.SharedStatistics()
    for kind in ("sample", "channel"):
        want = reference.group_min_max(g * alpha, kind, 1)
        got = quantize._statistics(g, kind, 1, alpha, target, sum_squares=False, shared=shared)[:2]
        assert want[0].isnan().any() and not want[0].isnan().all()
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
            assert not a[a == 0].signbit().any()
    assert len(passes) == 1


@pytest.mark.parametrize("shape", [(3, 70, 4, 5), (5, 1, 2, 3), (2, 9, 1, 1)])   # 60 rows; one channel; 1x1
def test_conv_pair_shares_one_row_major_copy(shape, monkeypatch):
    """Both paths of a conv G' of short maps (fewer than 64 rows a sample) with alpha, as
    ``aq_quantize_conv2d_grads`` runs them: the input path's row-major copy is made once and
    the weight path reads its columns; codes, keep draws, scales as the reference for
    per-sample groups with pruning (aq_scq), one group (ptq, all kept) and zero ranges."""
    n, o, h, w = shape
    g, alpha = gradient(*shape, seed=o), torch.rand(o) + 0.1
    g[0] = 0.25                     # a constant sample: R = 0 in its group
    copies, contiguous = [], quantize.buffers.contiguous
    monkeypatch.setattr(quantize.buffers, "contiguous", lambda t: copies.append(t) or contiguous(t))
    g2d = reference.conv_rows(g * alpha.view(1, -1, 1, 1))
    for method, bits in (("aq_scq", 4), ("ptq", 2)):
        shared, copies[:] = quantize.SharedStatistics(), []
        for path in PATHS:
            ref = reference.quantize_gradient(g2d, method, path, bits, rows_per_sample=h * w, **KEY)
            got = quantize.quantize_bitplanes(g, method, path, bits, alpha=alpha, shared=shared, **KEY)
            check(got, ref, path, h * w)
        assert len(copies) == (1 if h * w > 1 else 0)


def test_view_layout_is_derived_per_shape_and_strides():
    """The per-layout view geometry is cached by shape and strides: the same memory read
    as different shapes, or as a transposed view, gives each layout's own reference codes."""
    base = gradient(6 * 10 * 4 * 3, seed=9)
    for g, rps in ((base.view(6, 10, 4, 3), 12), (base.view(12, 10, 2, 3), 6), (base.view(6, 120), 1),
                   (base.view(120, 6).T, 1), (base.view(72, 10), 8)):
        g2d = reference.conv_rows(g) if g.dim() == 4 else g
        for path in PATHS:
            ref = reference.quantize_gradient(g2d, "aq_scq", path, 4, rows_per_sample=rps, **KEY)
            got = quantize.quantize_bitplanes(g, "aq_scq", path, 4, rows_per_sample=rps, **KEY)
            check(got, ref, path, rps)


def test_different_seeds_give_different_codes():
    g = gradient(2, 64, 4, 4)
    a = quantize.quantize_bitplanes(g, "psq", reference.PATH_INPUT, 4, seed=0, step=0, layer=0)
    b = quantize.quantize_bitplanes(g, "psq", reference.PATH_INPUT, 4, seed=0, step=1, layer=0)
    assert not torch.equal(a.planes, b.planes)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 5), o=st.integers(1, 80), h=st.integers(1, 6), w=st.integers(1, 6),
       method=st.sampled_from(METHODS), path=st.sampled_from(PATHS), bits=st.sampled_from((1, 2, 4, 8)),
       seed=st.integers(0, 2**31))
def test_quantize_property(n, o, h, w, method, path, bits, seed):
    g = gradient(n, o, h, w, seed=seed)
    ref = reference.quantize_gradient(reference.conv_rows(g), method, path, bits, rows_per_sample=h * w,
                                      seed=seed, step=1, layer=0)
    got = quantize.quantize_bitplanes(g, method, path, bits, seed=seed, step=1, layer=0)
    check(got, ref, path, h * w)


@pytest.mark.parametrize("method", ["aq_scq", "aq_opt"])
@pytest.mark.parametrize("shape", [(9, 20), (6, 5, 2, 3)])
@pytest.mark.parametrize("values", ["nan_inf", "overflow"])
def test_non_finite_groups_keep_the_reference_decisions(method, shape, values):
    """A NaN and an Inf in G', or finite values whose range overflows float32: their groups
    are kept with p = 1 and the others draw as in the reference (the quantizer's shortcut
    for finite statistics does not apply)."""
    g = gradient(*shape, seed=2)
    if values == "nan_inf":
        g.view(-1)[3] = float("nan")
        g.view(-1)[-1] = float("inf")
    else:   # one row (sample) and one channel; a 2-D G' needs a second row for its column
        g.view(-1)[:2] = torch.tensor([-3e38, 3e38])
        g.view(-1)[g.shape[-1] if g.dim() == 2 else 2] = 3e38
        assert torch.isfinite(g).all()
    rps = 1 if g.dim() == 2 else shape[2] * shape[3]
    g2d = g if g.dim() == 2 else reference.conv_rows(g)
    for path in PATHS:
        want = reference.sample_groups(g2d, method, path, 4, rows_per_sample=rps, **KEY)
        got = quantize.sample_groups(g, method, path, 4, rows_per_sample=rps, **KEY)
        assert not torch.isfinite(want[1] - want[0]).all()
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@settings(max_examples=15, deadline=None)
@given(rows=st.integers(1, 70), cols=st.integers(1, 80), method=st.sampled_from(METHODS),
       bits=st.sampled_from((1, 2, 4, 8)), seed=st.integers(0, 2**31))
def test_linear_pair_property(rows, cols, method, bits, seed):
    """Both paths of a linear layer's G' with alpha, sharing one statistics pass (as
    ``aq_quantize_linear_grads``), equal the reference."""
    g, alpha = gradient(rows, cols, seed=seed), torch.rand(cols) + 0.1
    shared = quantize.SharedStatistics()
    for path in PATHS:
        ref = reference.quantize_gradient(g * alpha, method, path, bits, rows_per_sample=1, seed=seed, step=1,
                                          layer=0)
        got = quantize.quantize_bitplanes(g, method, path, bits, rows_per_sample=1, alpha=alpha, seed=seed,
                                          step=1, layer=0, shared=shared)
        check(got, ref, path, 1)


def test_errors():
    with pytest.raises(ValueError, match="bits"):
        quantize.quantize_bitplanes(gradient(2, 3, 2, 2), "psq", "input", 3, **KEY)
    with pytest.raises(ValueError, match="do not split"):
        quantize.quantize_bitplanes(gradient(5, 3), "psq", "input", 4, rows_per_sample=2, **KEY)
    with pytest.raises(ValueError, match="rows_per_sample"):
        quantize.quantize_bitplanes(gradient(2, 3, 2, 2), "psq", "input", 4, rows_per_sample=3, **KEY)
    with pytest.raises(ValueError, match="quantizes no groups"):
        quantize.quantize_bitplanes(gradient(2, 3, 2, 2), "none", "input", 4, **KEY)


@pytest.mark.parametrize("target", KERNEL_TARGETS)
@pytest.mark.parametrize("shape", [(3, 5, 4, 4), (2, 3, 9, 15), (4, 6, 1, 1), (2, 4, 1, 3)])
def test_sum_of_squares_in_the_reference_order(target, shape):
    # Magnitudes 1e-3..1e4 mixed: float64 sums taken in another order round differently, so
    # only the reference's order (lanes, then halving) matches bit for bit.
    n, o, h, w = shape
    g = gradient(*shape, seed=7) * 10.0 ** torch.randint(-3, 5, shape, generator=torch.Generator().manual_seed(1))
    alpha = torch.rand(o) + 0.5
    g2d = reference.conv_rows(g * alpha.view(1, -1, 1, 1))
    for path in PATHS:
        kind = reference.grouping("aq_opt", path)
        want = reference.pair_sum_squares(reference.statistics_view(g2d, kind, h * w))
        _, _, got = quantize._statistics(g, kind, None, alpha, target, sum_squares=True)
        assert torch.equal(got, want)
    assert not torch.equal(want, reference.statistics_view(g2d, kind, h * w).double().pow(2).sum(2)) \
        or h * w < 4, "the data should tell summation orders apart"
