"""The reference semantics (docs/math.md §2-4) checked against first principles, not against itself."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from fqt_compiler.ops import reference as ref
from fqt_compiler.ops import rng


def test_splitmix64_matches_published_sequence():
    # SplitMix64 seeded with 1234567: the first outputs of Vigna's reference generator
    # (state += GOLDEN; return mix64(state)), computed here with plain Python ints.
    state = 1234567
    expected = []
    for _ in range(3):
        state = (state + rng.GOLDEN) & rng.MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & rng.MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & rng.MASK64
        expected.append(z ^ (z >> 31))
    assert [int(v) for v in rng.draws_u64(1234567, 0, 3)] == expected
    assert expected[0] == 6457827717110365317  # Vigna's splitmix64.c, seed 1234567


def test_uniform_is_keyed_and_indexable():
    a = rng.uniform(0, 5, 3, rng.STREAM_SR_INPUT, 1000)
    assert a.dtype == torch.float32 and 0 <= a.min() and a.max() < 1
    assert torch.equal(a, rng.uniform(0, 5, 3, rng.STREAM_SR_INPUT, 1000))
    # a window of the stream equals the same slice of the whole stream (kernels draw by index)
    assert torch.equal(a[100:200], rng.uniform(0, 5, 3, rng.STREAM_SR_INPUT, 100, start=100))
    for other in [(1, 5, 3, 0), (0, 6, 3, 0), (0, 5, 4, 0), (0, 5, 3, 1)]:
        assert not torch.equal(a, rng.uniform(*other, 1000))
    # 24-bit grid and roughly uniform
    assert torch.equal(a * 2**24, torch.floor(a * 2**24))
    assert abs(a.mean().item() - 0.5) < 0.03


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 5), k=st.integers(1, 200), seed=st.integers(0, 2**31))
def test_pack_roundtrip_and_tail_is_zero(rows, k, seed):
    g = torch.Generator().manual_seed(seed)
    bits = torch.rand(rows, k, generator=g) > 0.5
    words = ref.pack_bits(bits)
    assert words.shape == (rows, (k + 63) // 64)
    assert torch.equal(ref.unpack_bits(words, k), bits)
    assert torch.equal(ref.unpack_bits(words, words.shape[1] * 64)[:, k:], torch.zeros(rows, words.shape[1] * 64 - k, dtype=torch.bool))
    # bit k%64 of word k//64
    r, c = int(torch.randint(rows, (1,), generator=g)), int(torch.randint(k, (1,), generator=g))
    assert bool((int(words[r, c // 64]) >> (c % 64)) & 1) == bool(bits[r, c])


def test_sign_maps_zero_to_minus_one():
    assert ref.sign(torch.tensor([-2.0, 0.0, 1e-30, 3.0])).tolist() == [-1, -1, 1, 1]


@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 6), n=st.integers(1, 6), k=st.integers(1, 150), seed=st.integers(0, 2**31))
def test_popcount_identities(m, n, k, seed):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.rand(m, k, generator=g) > 0.5, torch.rand(n, k, generator=g) > 0.5
    aw, bw = ref.pack_bits(a), ref.pack_bits(b)
    pop = lambda t: sum(bin(int(v) & rng.MASK64).count("1") for v in t.flatten())
    dots = ref.binary_gemm(a, b)
    codes = torch.randint(0, 16, (m, k), generator=g)
    planes = [ref.pack_bits(((codes >> t) & 1).bool()) for t in range(4)]
    planar = ref.bitplane_gemm(codes, b)
    for i in range(m):
        for j in range(n):
            assert dots[i, j] == k - 2 * pop(aw[i] ^ bw[j])
            assert planar[i, j] == sum(2**t * (2 * pop(planes[t][i] & bw[j]) - pop(planes[t][i])) for t in range(4))


def test_binary_conv_pads_with_minus_one():
    x = torch.rand(1, 1, 3, 3) + 0.5          # all positive -> all +1 inside
    w = torch.ones(1, 1, 3, 3)
    y = ref.binary_conv2d(x, w, torch.ones(1), None, (1, 1), (1, 1), (1, 1))
    # corner sees 4 inside (+1) and 5 padded (-1) positions
    assert y[0, 0, 0, 0].item() == 4 - 5
    assert y[0, 0, 1, 1].item() == 9


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_water_filling_budget_and_caps(bits):
    g = torch.Generator().manual_seed(bits)
    r = torch.rand(37, generator=g) ** 4   # skewed ranges so some groups hit p = 1
    p = ref.aq_probabilities(r, bits)
    assert p.max() <= 1 and p.min() >= 0
    assert math.isclose(p.sum().item(), 37 / bits, rel_tol=1e-5)
    free = p < 1
    if free.any() and (~free).any():
        # uncapped groups share one c; capped ones have c R >= 1
        c = (p[free] / r[free]).mean()
        assert torch.allclose(p[free], c * r[free], rtol=1e-4)
        assert (c * r[~free] >= 1 - 1e-5).all()


def _water_filling_loop(ranges, bits):
    """docs/math.md §4's water-filling as the literal loop: keep the k widest groups with
    p = 1, spread the rest of the budget N/b as c R over the others, for the first k where
    that gives the (k+1)-th widest group c R <= 1 or nothing is left to spread; each p
    then rounded up to the keep draw's grid."""
    r = [float(v) for v in ranges.double()]
    order = sorted(range(len(r)), key=lambda i: -r[i])        # stable, widest first
    grid = 2 ** rng.KEEP_BITS
    return [math.ceil(v * grid) / grid for v in _spread(r, order, len(r) / bits)]


def _spread(r, order, budget):
    p = [0.0] * len(r)
    for k in range(len(r)):
        tail = math.fsum(r[i] for i in order[k:])
        for i in order[:k]:
            p[i] = 1.0
        if tail <= 0 or budget - k <= 0:
            return p
        c = (budget - k) / tail
        if c * r[order[k]] <= 1.0:
            for i in order[k:]:
                p[i] = min(1.0, c * r[i])
            return p
    return [1.0] * len(r)


@settings(max_examples=60, deadline=None)
@given(ranges=st.lists(st.sampled_from([0.0, 1e-3, 0.5, 1.0, 2.0, 30.0, 1e4]) | st.floats(0, 100),
                       min_size=1, max_size=40),
       bits=st.sampled_from(ref.BITS))
def test_water_filling_equals_the_literal_loop(ranges, bits):
    r = torch.tensor(ranges, dtype=torch.float32)
    want = torch.tensor(_water_filling_loop(r, bits), dtype=torch.float64).float()
    torch.testing.assert_close(ref.aq_probabilities(r, bits), want, rtol=1e-6, atol=1e-7)


def test_water_filling_keeps_all_nonzero_when_budget_suffices():
    p = ref.aq_probabilities(torch.tensor([3.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]), 4)
    assert p.tolist() == [1.0] + [0.0] * 7


def test_stochastic_rounding_codes_in_range_and_exact_for_endpoints():
    g = torch.tensor([[-1.0, 0.0, 3.0], [2.0, 2.0, 2.0]])
    q = ref.quantize_gradient(g, "ptq", "input", 2, rows_per_sample=1, seed=0, step=0, layer=0)
    assert q.codes.max() <= 3
    assert q.codes[0, 0] == 0 and q.codes[0, 2] == 3   # min and max are exact levels
    assert torch.allclose(q.dequantize()[0, [0, 2]], torch.tensor([-1.0, 3.0]))


@pytest.mark.parametrize("method", ["aq_scq", "aq_opt"])
@pytest.mark.parametrize("path,rows", [("input", 4), ("weight", 4)])
def test_aq_is_unbiased_and_keeps_n_over_b(method, path, rows):
    g = torch.randn(32, 12, generator=torch.Generator().manual_seed(1))
    draws, kept = 3000, []
    total = torch.zeros_like(g, dtype=torch.float64)
    for s in range(draws):
        q = ref.quantize_gradient(g, method, path, 4, rows_per_sample=rows, seed=3, step=s, layer=2)
        total += q.dequantize().double()
        kept.append(q.keep.float().mean().item())
    assert abs(np.mean(kept) - 1 / 4) < 0.02, "kept fraction must average N/b groups"
    # E[Q(G)] = G: error of the mean shrinks like 1/sqrt(draws); bound with a 5-sigma margin
    # from the per-element standard deviation estimated on fresh draws.
    sq = torch.zeros_like(total)
    for s in range(draws, draws + 300):
        d = ref.quantize_gradient(g, method, path, 4, rows_per_sample=rows, seed=3, step=s, layer=2).dequantize().double()
        sq += (d - g.double()) ** 2
    sigma = (sq / 300).sqrt() / math.sqrt(draws)
    err = (total / draws - g.double()).abs()
    assert (err <= 5 * sigma + 1e-6).float().mean() > 0.995


def _bound(sq, d, r, p, bits):
    """docs/math.md's variance bound of one path, from first principles."""
    levels = 2 ** bits - 1
    return float(((1 / p - 1) * sq + d * r ** 2 / (4 * levels ** 2 * p)).sum())


def test_aq_opt_probabilities_minimize_the_bound():
    # Channel groups of very different energy at equal range: the range score cannot tell
    # them apart, the bound can.
    gen = torch.Generator().manual_seed(4)
    g = torch.randn(40, 16, generator=gen).clamp(-2, 2)
    g[:, :8] = torch.sign(g[:, :8]) * 2.0            # same range 4, 4x the energy
    g[0, 8:], g[1, 8:] = 2.0, -2.0
    bits = 4
    sq = g.double().pow(2).sum(0)
    r = (g.max(0).values - g.min(0).values).double()
    d = torch.full((16,), 40.0, dtype=torch.float64)
    _, _, _, p_opt = ref.sample_groups(g, "aq_opt", "weight", bits, rows_per_sample=1, seed=0, step=0, layer=0)
    _, _, _, p_scq = ref.sample_groups(g, "aq_scq", "weight", bits, rows_per_sample=1, seed=0, step=0, layer=0)
    p_opt, p_scq = p_opt.double(), p_scq.double()
    assert abs(p_opt.sum() - 16 / bits) < 1e-5 and p_opt.max() <= 1
    score = torch.sqrt(sq + d * r ** 2 / (4 * (2 ** bits - 1) ** 2))
    assert torch.allclose(p_opt, score / score.sum() * (16 / bits), rtol=1e-6)   # no cap active here
    best = _bound(sq, d, r, p_opt, bits)
    assert best < 0.97 * _bound(sq, d, r, p_scq, bits)
    # Any other feasible p (same budget, within (0, 1]) is no better.
    for seed in range(50):
        step = torch.randn(16, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        step -= step.mean()
        p = p_opt + 0.02 * step
        assert _bound(sq, d, r, p, bits) >= best


def test_aq_opt_keeps_constant_nonzero_groups():
    g = torch.zeros(8, 6)
    g[:, 0] = 0.5                                   # R = 0, z != 0: its error would be biased
    g[:, 1] = torch.linspace(-1, 1, 8)
    _, _, _, prob = ref.sample_groups(g, "aq_opt", "weight", 4, rows_per_sample=1, seed=0, step=0, layer=0)
    assert prob[0] > 0 and prob[1] > 0 and (prob[2:] == 0).all()


def test_sum_of_squares_order_is_fixed():
    # Magnitudes far apart: float64 sums in different orders round differently, so only a
    # fixed order lets a kernel match bit for bit; the value still is the sum of squares.
    g = torch.tensor([1e8, 1.0, 3e-4, 1.0] * 40, dtype=torch.float32).view(1, 1, -1)
    got = ref.pair_sum_squares(g)
    assert torch.allclose(got, g.double().pow(2).sum(-1), rtol=1e-15)
    lanes = torch.zeros(64, dtype=torch.float64)
    for i, v in enumerate(g.view(-1).double().tolist()):
        lanes[i % 64] += v * v
    while lanes.numel() > 1:
        lanes = lanes[:lanes.numel() // 2] + lanes[lanes.numel() // 2:]
    assert got.item() == lanes.item()
    assert ref.halving_sum(torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64), 0).item() == 7.0


def test_topk_is_deterministic_and_biased():
    g = torch.randn(16, 6, generator=torch.Generator().manual_seed(0))
    a = ref.quantize_gradient(g, "topk", "weight", 4, rows_per_sample=1, seed=0, step=0, layer=0)
    b = ref.quantize_gradient(g, "topk", "weight", 4, rows_per_sample=1, seed=9, step=7, layer=0)
    assert torch.equal(a.keep, b.keep) and a.keep.sum() == 2      # ceil(6 / 4)
    widest = torch.argsort(g.max(0).values - g.min(0).values, descending=True)[:2]
    assert set(torch.nonzero(a.keep).flatten().tolist()) == set(widest.tolist())
    assert torch.equal(a.prob, torch.ones(6))                       # no 1/p rescale


def test_groupings_follow_scq():
    assert ref.grouping("aq_scq", "input") == "sample"
    assert ref.grouping("aq_scq", "weight") == "channel"
    assert ref.grouping("aq_opt", "input") == "sample"
    assert ref.grouping("aq_opt", "weight") == "channel"
    assert ref.grouping("psq", "weight") == "sample"
    with pytest.raises(ValueError, match="method 'none'"):
        ref.grouping("none", "input")
    with pytest.raises(ValueError, match="bits=3"):
        ref.quantize_gradient(torch.zeros(2, 2), "psq", "input", 3, rows_per_sample=1, seed=0, step=0, layer=0)
