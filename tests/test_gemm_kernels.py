"""Popcount GEMM kernels against the reference (docs/math.md §3, §4): exact integers, float32 epilogues."""
import re
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings, strategies as st

from fqt_compiler.codegen import gemm as codegen
from conftest import HOST_TARGETS
from fqt_compiler.codegen.targets import get_target
from fqt_compiler.ops import reference as ref
from fqt_compiler.runtime import binary_gemm, bitplane_gemm, jit
from fqt_compiler.runtime.gemm import segmented_bitplane_gemm
from fqt_compiler.runtime.packed import PackedBits

AVX2_TARGETS = [t for t in ("hygon", "x86-64-v3") if t in HOST_TARGETS]
KS = (1, 63, 64, 65, 127, 129, 1000)
MN = ((1, 1), (1, 7), (13, 1), (7, 11), (31, 37))


def bits(rows, k, gen):
    return torch.rand(rows, k, generator=gen) > 0.5


def pack_planes(codes: torch.Tensor, nbits: int) -> torch.Tensor:
    return torch.stack([PackedBits.from_bool(((codes >> t) & 1).bool()).words for t in range(nbits)])


def pm1(b: torch.Tensor) -> torch.Tensor:
    return b.double() * 2 - 1


@pytest.mark.parametrize("target", HOST_TARGETS)
@pytest.mark.parametrize("k", KS)
def test_binary_gemm_exact(target, k):
    gen = torch.Generator().manual_seed(k)
    for m, n in MN:
        a, b = bits(m, k, gen), bits(n, k, gen)
        expect = ref.binary_gemm(a, b)
        results = [binary_gemm(PackedBits.from_bool(a), PackedBits.from_bool(b), target=target, threads=t)
                   for t in (1, 2)]
        assert results[0].dtype == torch.int32
        assert torch.equal(results[0], expect), (m, n)
        assert torch.equal(results[1], results[0])


@pytest.mark.parametrize("target", HOST_TARGETS)
def test_binary_gemm_k_blocks(target):
    """K past one cache block goes through the int32 partial-sum scratch."""
    gen = torch.Generator().manual_seed(1)
    a, b = bits(9, 40_000, gen), bits(14, 40_000, gen)
    for threads in (1, 2):
        out = binary_gemm(PackedBits.from_bool(a), PackedBits.from_bool(b), target=target, threads=threads)
        assert torch.equal(out, ref.binary_gemm(a, b))


@pytest.mark.parametrize("target", HOST_TARGETS)
@pytest.mark.parametrize("with_bias", [False, True])
def test_binary_gemm_epilogue_and_nchw_layout(target, with_bias):
    gen = torch.Generator().manual_seed(2)
    samples, hw, n, k = 3, 5, 11, 129
    a, b = bits(samples * hw, k, gen), bits(n, k, gen)
    scale = torch.rand(n, generator=gen) + 0.1
    bias = torch.randn(n, generator=gen) if with_bias else None
    dot = ref.binary_gemm(a, b).double()
    expect = dot * scale.double() + (bias.double() if with_bias else 0)
    A, B = PackedBits.from_bool(a), PackedBits.from_bool(b)
    rows = binary_gemm(A, B, scale=scale, bias=bias, target=target)
    assert rows.dtype == torch.float32 and rows.shape == (samples * hw, n)
    # Two float32 roundings: of dot * scale, then of the sum with the bias.
    tol = 2 ** -24 * (2 * (dot * scale.double()).abs() + (bias.double().abs() if with_bias else 0))
    assert ((rows.double() - expect).abs() <= tol).all()
    nchw = binary_gemm(A, B, scale=scale, bias=bias, out_hw=hw, target=target, threads=2)
    assert torch.equal(nchw, rows.reshape(samples, hw, n).permute(0, 2, 1))


def run_bitplane(codes, nbits, b, *, row_scale, row_zero, row_map, out_rows, target, threads, tile=None):
    """``bitplane_gemm`` into an output filled with NaN: the pruned rows (not in ``row_map``)
    read 0 only if the kernel wrote them."""
    out = torch.full((out_rows, b.shape[0]), float("nan"))
    return bitplane_gemm(pack_planes(codes, nbits), PackedBits.from_bool(b), row_scale=row_scale,
                         row_zero=row_zero, row_map=row_map, out_rows=out_rows, out=out, target=target,
                         threads=threads, tile=tile)


def kept_rows(rows: int, kept: int, gen) -> torch.Tensor:
    """``kept`` of ``rows`` output rows at random, ascending (as the quantizer keeps them)."""
    return torch.randperm(rows, generator=gen)[:kept].sort().values


@pytest.mark.parametrize("target", HOST_TARGETS)
@pytest.mark.parametrize("nbits", ref.BITS)
def test_bitplane_gemm_exact_dot(target, nbits):
    """Scale 1 and zero-point 0 expose the integer dot product (exact in float32 below 2^24)."""
    gen = torch.Generator().manual_seed(nbits)
    for k in KS:
        for m, n in MN:
            codes = torch.randint(0, 2 ** nbits, (m, k), generator=gen)
            b = bits(n, k, gen)
            row_map = kept_rows(m + 2, m, gen)
            outs = [run_bitplane(codes, nbits, b, row_scale=torch.ones(m), row_zero=torch.zeros(m),
                                 row_map=row_map, out_rows=m + 2, target=target, threads=t)
                    for t in (1, 2)]
            expect = torch.zeros(m + 2, n)
            expect[row_map] = ref.bitplane_gemm(codes, b).float()
            assert torch.equal(outs[0], expect), (k, m, n)
            assert torch.equal(outs[1], outs[0])


@pytest.mark.parametrize("target", HOST_TARGETS)
@pytest.mark.parametrize("out_rows,kept", [(1, [0]), (70, [0]), (70, [69]), (70, [3, 4, 5, 40, 66]),
                                           (130, list(range(1, 129, 2)))])
def test_bitplane_gemm_zeroes_pruned_rows(target, out_rows, kept):
    """Pruned rows before, between and after the kept ones read 0 in an output that held NaN,
    whether the threads split the rows or (few rows, wide N) the columns."""
    gen = torch.Generator().manual_seed(out_rows + len(kept))
    row_map = torch.tensor(kept)
    for n, k in ((3, 65), (200, 192)):
        codes, b = torch.randint(0, 16, (len(kept), k), generator=gen), bits(n, k, gen)
        expect = torch.zeros(out_rows, n)
        expect[row_map] = ref.bitplane_gemm(codes, b).float()
        for threads in (1, 2, 3):
            out = run_bitplane(codes, 4, b, row_scale=torch.ones(len(kept)), row_zero=torch.zeros(len(kept)),
                               row_map=row_map, out_rows=out_rows, target=target, threads=threads)
            assert torch.equal(out, expect), (n, threads)


@pytest.mark.parametrize("target", HOST_TARGETS)
def test_bitplane_gemm_dequantization_epilogue(target):
    """A quantized gradient from the reference quantizer, dequantized in the epilogue, equals the
    float matmul of the dequantized gradient with the ±1 operand, to float32 rounding."""
    gen = torch.Generator().manual_seed(3)
    rows_per_sample, samples, channels, k = 4, 6, 70, 77
    g = torch.randn(samples * rows_per_sample, channels, generator=gen)
    q = ref.quantize_gradient(g, "aq_scq", ref.PATH_INPUT, 4, rows_per_sample=rows_per_sample,
                              seed=0, step=0, layer=0)
    w = bits(k, channels, gen)  # input path: contracts over channels; B rows = the K outputs
    kept = q.keep.repeat_interleave(rows_per_sample)
    row_map = kept.nonzero().flatten()
    sample = row_map // rows_per_sample
    out = run_bitplane(q.codes[row_map].long(), 4, w, row_scale=q.scale[sample],
                       row_zero=q.zero[sample], row_map=row_map, out_rows=g.shape[0],
                       target=target, threads=2)
    group = torch.arange(g.shape[0]) // rows_per_sample
    dequantized = torch.where(kept[:, None], q.scale.double()[group, None] * q.codes.double()
                              + q.zero.double()[group, None], 0)  # q.dequantize() in float64
    expect = dequantized @ pm1(w).T
    scale_dot = (q.scale[sample].double()[:, None] * ref.bitplane_gemm(q.codes[row_map], w).double()).abs()
    zero_col = (q.zero[sample].double()[:, None] * pm1(w).sum(1)[None]).abs()
    tol = torch.zeros_like(expect)
    tol[row_map] = 3 * 2 ** -24 * (scale_dot + zero_col) + 1e-30
    assert ((out.double() - expect).abs() <= tol).all()
    assert (out[~kept] == 0).all()


@pytest.mark.parametrize("target", HOST_TARGETS)
def test_bitplane_gemm_empty_and_k_blocks(target):
    gen = torch.Generator().manual_seed(4)
    b = bits(5, 40_000, gen)
    empty = torch.empty(0, dtype=torch.int64)
    out = run_bitplane(torch.zeros(0, 40_000, dtype=torch.int64), 2, b, row_scale=torch.ones(0),
                       row_zero=torch.ones(0), row_map=empty, out_rows=3, target=target, threads=2)
    assert torch.equal(out, torch.zeros(3, 5))
    codes = torch.randint(0, 4, (6, 40_000), generator=gen)
    out = run_bitplane(codes, 2, b, row_scale=torch.ones(6), row_zero=torch.zeros(6),
                       row_map=torch.arange(6), out_rows=6, target=target, threads=2)
    assert torch.equal(out, ref.bitplane_gemm(codes, b).float())


PANEL_NS = (1, 7, 8, 9, 64, 65, 130)


@pytest.mark.parametrize("target", HOST_TARGETS)
def test_panel_kernel_exact(target):
    """The across-N kernel (runtime.gemm._use_panel) at N around its vector widths and K of
    1..40 words, with edge rows (M not a multiple of mr), both families."""
    gen = torch.Generator().manual_seed(6)
    tile = codegen.default_panel_tile(target)
    for i, n in enumerate(PANEL_NS):
        for words in (1, 2, 3, 5, 9, 17, 31, 32, 33, 40)[i % 3::3] + (i + 1,):
            k = 64 * words - (i % 2) * 13
            m = 2 * tile.mr + 1 + i
            a, b = bits(m, k, gen), bits(n, k, gen)
            A, B = PackedBits.from_bool(a), PackedBits.from_bool(b)
            expect = ref.binary_gemm(a, b)
            for threads in (1, 2):
                assert torch.equal(binary_gemm(A, B, target=target, threads=threads), expect), (n, k)
                assert torch.equal(binary_gemm(A, B, target=target, threads=threads, tile=tile), expect)
            codes = torch.randint(0, 16, (m, k), generator=gen)
            row_map = kept_rows(m + 1, m, gen)
            out = run_bitplane(codes, 4, b, row_scale=torch.ones(m), row_zero=torch.zeros(m),
                               row_map=row_map, out_rows=m + 1, target=target, threads=2, tile=tile)
            expect = torch.zeros(m + 1, n)
            expect[row_map] = ref.bitplane_gemm(codes, b).float()
            assert torch.equal(out, expect), (n, k)


@pytest.mark.parametrize("target", HOST_TARGETS)
def test_panel_kernel_nchw_tiles(target):
    """NCHW output of the panel kernel: tiles inside one sample are stored transposed (hw a
    multiple of mr), tiles across samples or past M row by row; every epilogue."""
    gen = torch.Generator().manual_seed(7)
    tile = codegen.default_panel_tile(target)
    cases = ((9, 4 * tile.mr, 3, 200), (64, 16, 5, 576), (130, 5, 3, 64), (7, 2 * tile.mr, 1, 1),
             (70, 3 * tile.mr, 3, 130))
    for n, hw, samples, k in cases:
        a, b = bits(samples * hw, k, gen), bits(n, k, gen)
        A, B = PackedBits.from_bool(a), PackedBits.from_bool(b)
        dot = ref.binary_gemm(a, b)
        scale, bias = torch.rand(n, generator=gen) + 0.1, torch.randn(n, generator=gen)
        for threads in (1, 2):
            out = binary_gemm(A, B, out_hw=hw, target=target, threads=threads, tile=tile)
            assert torch.equal(out, dot.reshape(samples, hw, n).permute(0, 2, 1)), (n, hw)
            rows = binary_gemm(A, B, scale=scale, bias=bias, target=target, threads=threads, tile=tile)
            nchw = binary_gemm(A, B, scale=scale, bias=bias, out_hw=hw, target=target, threads=threads, tile=tile)
            assert torch.equal(nchw, rows.reshape(samples, hw, n).permute(0, 2, 1)), (n, hw)


@pytest.mark.parametrize("target", HOST_TARGETS)
def test_panel_kernel_stays_in_its_scratch(target, monkeypatch):
    """The panel kernel writes B's panel and (AVX2) the broadcast A words of a row tile only
    inside ``panel_scratch_words``: each slice gets exactly that many words followed by a
    canary, at odd N (two threads splitting N or M), odd word counts and 8 planes."""
    import fqt_compiler.runtime.gemm as rgemm
    canary, given = -0x5A5A5A5A5A5A5A5B, []

    def exact(need):
        given.extend(torch.full((2 * words + 64,), canary, dtype=torch.int64) for words in need)
        return [t[:words] for t, words in zip(given[-len(need):], need)]

    monkeypatch.setattr(rgemm, "_panel_scratch", exact)
    gen = torch.Generator().manual_seed(9)
    tile = codegen.default_panel_tile(target)
    for m, n, k in ((3, 13, 5 * 64 - 7), (2 * tile.mr + 3, 130, 9 * 64), (1, 37, 17 * 64 - 1),
                    (8 * tile.mr + 3, 20, 3 * 64)):
        codes, b = torch.randint(0, 256, (m, k), generator=gen), bits(n, k, gen)
        for threads in (1, 2):
            out = run_bitplane(codes, 8, b, row_scale=torch.ones(m), row_zero=torch.zeros(m),
                               row_map=torch.arange(m), out_rows=m, target=target, threads=threads, tile=tile)
            assert torch.equal(out, ref.bitplane_gemm(codes, b).float()), (m, n, k)
            a = bits(m, k, gen)
            out = binary_gemm(PackedBits.from_bool(a), PackedBits.from_bool(b), out_hw=m, target=target,
                              threads=threads, tile=tile)
            assert torch.equal(out, ref.binary_gemm(a, b).T.unsqueeze(0)), (m, n, k)
    assert given and all(bool((t[(t.numel() - 64) // 2:] == canary).all()) for t in given)


@pytest.mark.parametrize("target", HOST_TARGETS)
@pytest.mark.parametrize("words", (1, 3, codegen.FIXED_WORDS_MAX))
def test_fixed_k_panel_kernels_exact(target, words):
    """Panel kernels built for one K word count (the runtime's choice up to FIXED_WORDS_MAX
    words): K with a full last word, a tail and a single bit in it; edge row tiles; N of 1,
    inside one column tile and across two; every binary epilogue, the NCHW layout, and
    bit planes with pruned rows (rows outside ``row_map`` stay 0)."""
    from fqt_compiler.runtime.gemm import _default_tile
    gen = torch.Generator().manual_seed(10 + words)
    tile = replace(codegen.default_panel_tile(target), words=words)
    for k, m, n in ((64 * words, tile.mr + 1, 1), (64 * words - 13, 1, 9), (64 * words - 63, 2 * tile.mr + 3, 37)):
        assert _default_tile(max(m, 256), n, k, get_target(target)) == tile
        a, b = bits(m, k, gen), bits(n, k, gen)
        A, B = PackedBits.from_bool(a), PackedBits.from_bool(b)
        dot = ref.binary_gemm(a, b)
        scale, bias = torch.rand(n, generator=gen) + 0.1, torch.randn(n, generator=gen)
        for threads in (1, 2):
            assert torch.equal(binary_gemm(A, B, target=target, threads=threads, tile=tile), dot), (k, m, n)
            rows = binary_gemm(A, B, scale=scale, bias=bias, target=target, threads=threads, tile=tile)
            assert torch.equal(rows, dot.float() * scale + bias), (k, m, n)
            nchw = binary_gemm(A, B, scale=scale, out_hw=m, target=target, threads=threads, tile=tile)
            assert torch.equal(nchw, (dot.float() * scale).T.unsqueeze(0)), (k, m, n)
        for nbits in (1, 4):
            codes = torch.randint(0, 2 ** nbits, (m, k), generator=gen)
            row_map = kept_rows(m + 2, m, gen)
            out = run_bitplane(codes, nbits, b, row_scale=torch.ones(m), row_zero=torch.zeros(m),
                               row_map=row_map, out_rows=m + 2, target=target, threads=2, tile=tile)
            expect = torch.zeros(m + 2, n)
            expect[row_map] = ref.bitplane_gemm(codes, b).float()
            assert torch.equal(out, expect), (k, m, n, nbits)


def test_fixed_k_panel_tile_errors():
    with pytest.raises(ValueError, match="words=9"):
        codegen.PanelTile(4, 2, codegen.FIXED_WORDS_MAX + 1)
    gen = torch.Generator().manual_seed(11)
    a, b = PackedBits.from_bool(bits(3, 130, gen)), PackedBits.from_bool(bits(4, 130, gen))
    with pytest.raises(ValueError, match=r"built for K of 2 words; K=130 takes 3.*words=3"):
        binary_gemm(a, b, tile=codegen.PanelTile(4, 2, 2))


@settings(max_examples=10, deadline=None)
@given(words=st.integers(1, codegen.FIXED_WORDS_MAX), tail=st.integers(0, 63), m=st.integers(1, 20),
       n=st.integers(1, 40), nbits=st.sampled_from(ref.BITS), kept=st.floats(0.2, 1.0),
       target=st.sampled_from(HOST_TARGETS), threads=st.integers(1, 3), seed=st.integers(0, 2 ** 31))
def test_fixed_k_panel_kernels_property(words, tail, m, n, nbits, kept, target, threads, seed):
    """Fixed-K panel kernels at random shapes: any tail in the last word, any M and N,
    pruned bit-plane rows with their own scales and zero points."""
    gen = torch.Generator().manual_seed(seed)
    k = 64 * words - tail
    tile = replace(codegen.default_panel_tile(target), words=words)
    a, b = bits(m, k, gen), bits(n, k, gen)
    out = binary_gemm(PackedBits.from_bool(a), PackedBits.from_bool(b), target=target, threads=threads, tile=tile)
    assert torch.equal(out, ref.binary_gemm(a, b))
    rows = max(1, int(kept * m))
    codes = torch.randint(0, 2 ** nbits, (rows, k), generator=gen)
    row_map = kept_rows(m, rows, gen)
    scale, zero = torch.rand(rows, generator=gen), torch.randn(rows, generator=gen)
    out = run_bitplane(codes, nbits, b, row_scale=scale, row_zero=zero, row_map=row_map, out_rows=m,
                       target=target, threads=threads, tile=tile)
    expect = torch.zeros(m, n)
    colsum = pm1(b).sum(1).float()
    expect[row_map] = scale[:, None] * ref.bitplane_gemm(codes, b).float() + zero[:, None] * colsum
    assert torch.allclose(out, expect, rtol=1e-6, atol=1e-4)


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 40), n=st.integers(1, 40), k=st.integers(0, 700), nbits=st.sampled_from(ref.BITS),
       target=st.sampled_from(HOST_TARGETS), threads=st.integers(1, 3), seed=st.integers(0, 2 ** 31))
def test_gemms_match_reference_property(m, n, k, nbits, target, threads, seed):
    gen = torch.Generator().manual_seed(seed)
    density = torch.rand((), generator=gen).item()
    a = torch.rand(m, k, generator=gen) < density
    b = torch.rand(n, k, generator=gen) < density
    out = binary_gemm(PackedBits.from_bool(a), PackedBits.from_bool(b), target=target, threads=threads)
    assert torch.equal(out, ref.binary_gemm(a, b))
    codes = torch.randint(0, 2 ** nbits, (m, k), generator=gen)
    out = run_bitplane(codes, nbits, b, row_scale=torch.ones(m), row_zero=torch.zeros(m),
                       row_map=torch.arange(m), out_rows=m, target=target, threads=threads)
    assert torch.equal(out, ref.bitplane_gemm(codes, b).float())


def test_panel_rule():
    """Narrow N and short K take the across-N kernel; the square case and few-row long-K
    GEMMs (where packing B's panel per call does not pay) the along-K one."""
    from fqt_compiler.runtime.gemm import _use_panel
    assert _use_panel(131072, 64, 576) and _use_panel(512, 512, 4608) and _use_panel(128, 512, 256)
    assert not _use_panel(1024, 1024, 4096) and not _use_panel(128, 512, 4608)
    assert not _use_panel(4096, 64, 81 * 64)
    # Past N = 512 only a short K whose panel fits in L2 (the last stage's weight gradients).
    assert _use_panel(128, 4608, 512) and _use_panel(1, 600, 16 * 64 - 13)
    assert not _use_panel(128, 4608, 17 * 64) and not _use_panel(128, 9216, 16 * 64)


def test_fixed_k_rule():
    """A panel kernel is built for K's word count when its K steps (words x planes) are few:
    ViT-tiny's 192 features in the forward GEMMs, not in its 4-plane gradient GEMMs."""
    from fqt_compiler.runtime.gemm import FIXED_K_STEPS, _default_tile
    host = get_target("host")
    assert _default_tile(544, 768, 192, host).words == 3
    assert _default_tile(544, 192, 64 * FIXED_K_STEPS, host).words == FIXED_K_STEPS
    assert _default_tile(544, 192, 64 * FIXED_K_STEPS + 1, host).words == 0
    assert _default_tile(150, 768, 192, host, planes=4).words == 0
    assert _default_tile(150, 768, 128, host, planes=4).words == 2
    assert _default_tile(150, 768, 64, host, planes=8).words == 1
    assert isinstance(_default_tile(1024, 1024, 4096, host), codegen.Tile)


@pytest.mark.parametrize("target", HOST_TARGETS)
def test_panel_kernel_wide_n_short_k(target):
    """The runtime's choice for a short K at N > 512: the across-N kernel (one row or a few,
    so two threads split N), exact for both families on either side of the short-K bound."""
    from fqt_compiler.runtime.gemm import _default_tile
    gen = torch.Generator().manual_seed(8)
    n = 600
    for m, k in ((1, 51), (9, 8 * 64 - 13), (5, 16 * 64 - 13), (3, 16 * 64 + 1)):
        panel = isinstance(_default_tile(m, n, k, get_target(target)), codegen.PanelTile)
        assert panel == (k <= 16 * 64), (m, k)
        a, b = bits(m, k, gen), bits(n, k, gen)
        expect = ref.binary_gemm(a, b)
        codes = torch.randint(0, 16, (m, k), generator=gen)
        for threads in (1, 2):
            assert torch.equal(binary_gemm(PackedBits.from_bool(a), PackedBits.from_bool(b), target=target,
                                           threads=threads), expect), (m, k)
            out = run_bitplane(codes, 4, b, row_scale=torch.ones(m), row_zero=torch.zeros(m),
                               row_map=torch.arange(m), out_rows=m, target=target, threads=threads)
            assert torch.equal(out, ref.bitplane_gemm(codes, b).float()), (m, k)


def test_argument_errors_name_the_argument():
    gen = torch.Generator().manual_seed(5)
    a, b = PackedBits.from_bool(bits(3, 70, gen)), PackedBits.from_bool(bits(4, 70, gen))
    with pytest.raises(ValueError, match="a.k=70 and b.k=69"):
        binary_gemm(a, PackedBits.from_bool(bits(4, 69, gen)))
    with pytest.raises(TypeError, match="PackedBits"):
        binary_gemm(a.words, b)
    with pytest.raises(ValueError, match=r"scale must have shape \(4,\) and dtype torch.float32"):
        binary_gemm(a, b, scale=torch.ones(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="bias needs scale"):
        binary_gemm(a, b, bias=torch.ones(4))
    with pytest.raises(ValueError, match="out_hw=2 must"):
        binary_gemm(a, b, out_hw=2)
    with pytest.raises(ValueError, match="out must be a contiguous torch.int32"):
        binary_gemm(a, b, out=torch.empty(4, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="words per row"):  # the along-K kernel reads whole vectors
        binary_gemm(PackedBits(a.words[:, :1].contiguous(), 64), PackedBits(b.words[:, :1].contiguous(), 64),
                    tile=codegen.Tile(1, 8), target="x86-64-v3" if "x86-64-v3" in HOST_TARGETS else "host")
    with pytest.raises(ValueError, match="words per row"):
        binary_gemm(PackedBits(a.words[:, :1].contiguous(), 65), PackedBits(b.words[:, :1].contiguous(), 65))
    planes = pack_planes(torch.zeros(3, 70, dtype=torch.int64), 2)
    kw = dict(row_scale=torch.ones(3), row_zero=torch.zeros(3), row_map=torch.arange(3), out_rows=3)
    with pytest.raises(ValueError, match=r"row_map values must ascend strictly within \[0, out_rows=3\)"):
        bitplane_gemm(planes, b, **{**kw, "row_map": torch.tensor([0, 1, 3])})
    with pytest.raises(ValueError, match=r"ascend strictly.*got \[0, 2, 1\]"):
        bitplane_gemm(planes, b, **{**kw, "row_map": torch.tensor([0, 2, 1])})
    with pytest.raises(ValueError, match=r"ascend strictly.*got \[0, 1, 1\]"):
        bitplane_gemm(planes, b, **{**kw, "row_map": torch.tensor([0, 1, 1])})
    with pytest.raises(ValueError, match="row_zero must have shape"):
        bitplane_gemm(planes, b, **{**kw, "row_zero": torch.zeros(2)})
    with pytest.raises(ValueError, match="3 planes"):
        bitplane_gemm(torch.cat([planes, planes[:1]]), b, **kw)
    with pytest.raises(TypeError, match=r"int64 tensor \[bits, M, ld\]"):
        bitplane_gemm(planes.int(), b, **kw)
    with pytest.raises(ValueError, match="threads=0"):
        binary_gemm(a, b, threads=0)


# --------------------------------------------------------------------------- generated code

def assembly(target, ir_fn=codegen.binary_gemm_ir, **kw):
    return jit.compile_assembly(ir_fn(target, **kw).text, get_target(target))


def innermost_popcount_loop(asm: str) -> str:
    """The shortest basic block that branches back to its own label and popcounts."""
    loops = [m.group(2) for m in re.finditer(r"^(\.LBB\w+):\n((?:(?!^\.LBB).)*?^\s+j\w+\s+\1)$",
                                             asm, re.M | re.S) if "popcnt" in m.group(2)]
    assert loops, "no popcount loop found"
    return min(loops, key=len)


@pytest.mark.parametrize("target", ["hygon", "x86-64-v3"])
def test_avx2_targets_emit_no_avx512(target):
    for ir_fn, kw in ((codegen.binary_gemm_ir, {"epilogue": "scale_bias"}),
                      (codegen.bitplane_gemm_ir, {"bits": 4}), (codegen.row_popcount_ir, {})):
        asm = assembly(target, ir_fn, **kw)
        assert not re.search(r"zmm|%k[0-7]|vpopcnt|vpternlog|\{1to", asm), ir_fn.__name__
        assert "vpshufb" in asm and "vpsadbw" in asm
    panel = codegen.default_panel_tile(target)
    for ir_fn, kw in ((codegen.binary_gemm_ir, {"epilogue": "scale_bias"}), (codegen.bitplane_gemm_ir, {"bits": 4})):
        asm = assembly(target, ir_fn, tile=panel, **kw)
        assert not re.search(r"zmm|%k[0-7]|vpopcnt|vpternlog|\{1to", asm), ir_fn.__name__
        assert "vpshufb" in asm and "vpsadbw" in asm


@pytest.mark.parametrize("target", ["hygon", "x86-64-v3"])
def test_avx2_panel_inner_loop_loads_broadcast_words(target):
    """The AVX2 panel kernel's K loop takes A words already broadcast from its scratch: two
    nibble lookups per accumulator, no broadcast (a shuffle-pipe uop on Zen) and no spill."""
    from fqt_compiler.cross.mca import innermost_popcount_loop as k_loop
    tile = codegen.default_panel_tile(target)
    for ir_fn, kw in ((codegen.binary_gemm_ir, {"epilogue": "scale"}), (codegen.bitplane_gemm_ir, {"bits": 4})):
        kernel = ir_fn(target, tile=tile, **kw)
        loop = k_loop(jit.compile_assembly(kernel.text, get_target(target)), kernel.symbol)
        assert sum("vpshufb" in line for line in loop) == 2 * tile.mr * tile.nv, ir_fn.__name__
        assert not [line for line in loop if "broadcast" in line or "(%rsp)" in line], loop


@pytest.mark.skipif(not get_target("host").native_vector_popcount, reason="host has no VPOPCNTDQ")
@pytest.mark.parametrize("ir_fn,kw,op", [(codegen.binary_gemm_ir, {}, "vpxorq"),
                                         (codegen.bitplane_gemm_ir, {"bits": 4}, "vpandq")])
def test_host_avx512_inner_loop_is_vpopcntq_without_spills(ir_fn, kw, op):
    loop = innermost_popcount_loop(assembly("host", ir_fn, **kw))
    tile = codegen.default_tile("host")
    assert loop.count("vpopcntq") % (tile.mr * tile.nr) == 0 and loop.count("vpopcntq") > 0
    assert op in loop
    spills = [line for line in loop.splitlines() if "(%rsp)" in line and "mm" in line]
    assert not spills, f"vector spill or reload in the inner loop: {spills}"


@pytest.mark.skipif(not get_target("host").native_vector_popcount, reason="host has no VPOPCNTDQ")
@pytest.mark.parametrize("ir_fn,kw,op", [(codegen.binary_gemm_ir, {}, "vpxorq"),
                                         (codegen.bitplane_gemm_ir, {"bits": 4}, "vpandq")])
def test_host_panel_inner_loop_broadcasts_without_reduction_or_spills(ir_fn, kw, op):
    """Across N: one vpopcntq per accumulator and K word, A words broadcast, no shuffles."""
    tile = codegen.default_panel_tile("host")
    loop = innermost_popcount_loop(assembly("host", ir_fn, tile=tile, **kw))
    assert loop.count("vpopcntq") == tile.mr * tile.nv
    assert op in loop and "zmm" in loop
    assert not re.search(r"vperm|vshuf|vpunpck|valign", loop)
    spills = [line for line in loop.splitlines() if "(%rsp)" in line and "mm" in line]
    assert not spills, f"vector spill or reload in the inner loop: {spills}"


def test_aarch64_udot_only_with_dotprod():
    """Emitting a dotprod instruction for a CPU without it kills the process: guard on the target."""
    for tile in (None, codegen.default_panel_tile("rpi5")):
        assert "udot" in assembly("rpi5", tile=tile)
        for target in ("rpi4", "aarch64"):
            asm = assembly(target, tile=tile)
            assert "udot" not in asm and "cnt" in asm and "uaddlp" in asm


@pytest.mark.parametrize("target", HOST_TARGETS)
@settings(max_examples=15, deadline=None)
@given(segments=st.integers(1, 5), o=st.integers(1, 9), n=st.integers(1, 70), k=st.sampled_from(KS[:5]),
       nbits=st.sampled_from(codegen.BITS), seed=st.integers(0, 2**16))
def test_segmented_bitplane_gemm_scales_each_segment(target, segments, o, n, k, nbits, seed):
    """Segment s of the contraction (rows s*O.. of the planes against its own B) has its own
    scale and zero point, as per-sample groups on the weight path need."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2 ** nbits, (segments * o, k), generator=gen)
    bs = [bits(n, k, gen) for _ in range(segments)]
    scale, zero = torch.rand(segments * o, generator=gen) + 0.1, torch.randn(segments * o, generator=gen)
    expect = torch.zeros(o, n, dtype=torch.float64)
    for s, b in enumerate(bs):
        rows = slice(s * o, (s + 1) * o)
        dot = codes[rows].double() @ pm1(b).T
        expect += scale[rows].double().view(-1, 1) * dot + zero[rows].double().view(-1, 1) * pm1(b).sum(1)
    got = segmented_bitplane_gemm(pack_planes(codes, nbits), [PackedBits.from_bool(b) for b in bs],
                                  row_scale=scale, row_zero=zero, target=target)
    torch.testing.assert_close(got.double(), expect, rtol=1e-5, atol=1e-6 * segments * k * 2 ** nbits)


def test_cached_plans_follow_shape_threads_tile_and_family():
    """A call's tile, blocking, slices and kernel are cached per shape: calls that alternate
    shapes (across the panel rule's bounds), thread counts, tiles and the two families, each
    twice so the second comes from the cache, stay exact, and the cache holds one plan per
    distinct call."""
    import fqt_compiler.runtime.gemm as rgemm
    gen = torch.Generator().manual_seed(12)
    rgemm._plans.clear()
    tiles = (None, codegen.Tile(1, 2), codegen.PanelTile(2, 1))
    calls = [(m, n, k, threads, tile) for m, n, k in ((300, 9, 100), (3, 700, 2000), (1, 1, 65))
             for threads in (1, 2) for tile in tiles]
    for _ in range(2):
        for m, n, k, threads, tile in calls:
            a, b = bits(m, k, gen), bits(n, k, gen)
            out = binary_gemm(PackedBits.from_bool(a), PackedBits.from_bool(b), threads=threads, tile=tile)
            assert torch.equal(out, ref.binary_gemm(a, b)), (m, n, k, threads, tile)
            codes = torch.randint(0, 4, (m, k), generator=gen)
            out = run_bitplane(codes, 2, b, row_scale=torch.ones(m), row_zero=torch.zeros(m),
                               row_map=torch.arange(m), out_rows=m, target="host", threads=threads, tile=tile)
            assert torch.equal(out, ref.bitplane_gemm(codes, b).float()), (m, n, k, threads, tile)
    families = {key[0] for key in rgemm._plans}
    assert families == {"binary", "bitplane", "rowpop"}
    assert sum(key[0] != "rowpop" for key in rgemm._plans) == 2 * len(calls)


def test_a_kernel_hook_sees_calls_of_cached_shapes():
    """Ahead-of-time emission and cross-target checks route every kernel request through a
    hook: a shape whose plan is cached still asks the hook, and the cache is not filled
    with the hook's kernels."""
    import fqt_compiler.runtime.gemm as rgemm
    gen = torch.Generator().manual_seed(13)
    a, b = bits(5, 130, gen), bits(6, 130, gen)
    pa, pb = PackedBits.from_bool(a), PackedBits.from_bool(b)
    binary_gemm(pa, pb)
    cached = dict(rgemm._plans)
    seen = []

    def hook(spec, load):
        seen.append(spec.family)
        return load(spec)

    with jit.kernel_hook(hook):
        assert torch.equal(binary_gemm(pa, pb), ref.binary_gemm(a, b))
        assert torch.equal(binary_gemm(pa, pb), ref.binary_gemm(a, b))
    assert seen == ["binary", "binary"]
    assert rgemm._plans == cached
