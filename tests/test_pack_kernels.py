"""Packing kernels against the reference, bit for bit (padding words included)."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings, strategies as st

from conftest import KERNEL_TARGETS, seeded_randn
from fqt_compiler.codegen import pack as gen
from fqt_compiler.codegen.targets import get_target
from fqt_compiler.ops import reference
from fqt_compiler.runtime import jit, pack
from fqt_compiler.runtime.packed import PackedBits, padded_words



def ref_words(bits: torch.Tensor) -> torch.Tensor:
    return PackedBits.from_bool(bits).words


def data(*shape, seed=0):
    x = seeded_randn(*shape, seed=seed) * 1.5
    x.view(-1)[::7] = 0.0   # zero maps to bit 0 (docs/math.md §2)
    return x


def ref_im2col(x, ks, stride, padding, dilation):
    """Rows (n, h', w'), columns (c, kh, kw) of sign(pad(x, 0)), from F.unfold."""
    xp = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    cols = F.unfold(reference.sign(xp), ks, dilation=dilation, stride=stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1]) > 0


@pytest.mark.parametrize("target", KERNEL_TARGETS)
@pytest.mark.parametrize("rows,k", [(1, 1), (5, 1), (3, 63), (7, 64), (2, 65), (1, 200), (13, 127), (31, 513)])
def test_pack_signs_and_unpack(target, rows, k):
    x = data(rows, k)
    got = pack.pack_signs(x, target=target)
    assert got.k == k and got.ld % 8 == 0
    assert torch.equal(got.words, ref_words(x > 0))
    signs, mask = pack.pack_signs_and_ste(x, target=target)
    assert torch.equal(signs.words, got.words)
    assert torch.equal(mask.words, ref_words(x.abs() < 1))
    assert torch.equal(pack.unpack_signs(signs.words, k, (rows, k), target=target), reference.sign(x))
    assert torch.equal(pack.unpack_mask(mask.words, k, (rows, k), target=target), reference.ste_mask(x))


@pytest.mark.parametrize("target", KERNEL_TARGETS)
@pytest.mark.parametrize("rows,k", [(1, 1), (3, 63), (2, 65), (13, 127), (31, 513)])
def test_mask_in_place_is_the_reference_product(target, rows, k):
    """``dx * ste_mask(x)`` bit for bit, NaN/inf times 0 and -0.0 included; the row tails'
    padding bits never reach ``dx``."""
    x, dx = data(rows, k), data(rows, k) * 3
    dx.view(-1)[::7] = float("nan")
    dx.view(-1)[1::11] = float("-inf")
    want = dx * reference.ste_mask(x)
    _, mask = pack.pack_signs_and_ste(x, target=target)
    if k % 64:                                         # a set padding bit must be ignored
        mask.words[:, (k - 1) // 64] |= torch.tensor(1) << (k % 64)
    got = pack.mask_in_place(mask.words, k, dx.clone(), target=target)
    assert torch.equal(got.view(-1).view(torch.int32), want.view(-1).view(torch.int32))


@pytest.mark.parametrize("target", KERNEL_TARGETS)
def test_pack_signs_views(target):
    w = data(37, 70)
    assert torch.equal(pack.pack_signs(w.T, target=target).words, ref_words(w.T > 0))   # via transpose_bits
    assert torch.equal(pack.pack_signs(w[:, ::3], target=target).words, ref_words(w[:, ::3] > 0))
    x = data(3, 5, 67)
    assert torch.equal(pack.pack_signs(x, target=target).words, ref_words(x.reshape(-1, 67) > 0))
    xt = x.transpose(0, 1)     # leading dims that do not merge into one stride
    assert torch.equal(pack.pack_signs(xt, target=target).words, ref_words(xt.reshape(-1, 67) > 0))


def conv_id(n, c, h, w, ks, stride, padding, dilation):
    return f"{n}x{c}x{h}x{w}-k{ks[0]}{ks[1]}s{stride[0]}{stride[1]}p{padding[0]}{padding[1]}d{dilation[0]}{dilation[1]}"


CONVS = [  # (N, C, H, W, kernel, stride, padding, dilation)
    (2, 3, 5, 5, (3, 3), (1, 1), (1, 1), (1, 1)),
    (1, 1, 1, 1, (1, 1), (1, 1), (0, 0), (1, 1)),
    (3, 5, 6, 6, (1, 1), (2, 2), (0, 0), (1, 1)),
    (2, 3, 9, 11, (3, 3), (2, 2), (1, 1), (1, 1)),
    (2, 4, 7, 9, (3, 3), (2, 2), (2, 2), (2, 2)),
    (1, 2, 13, 7, (5, 5), (1, 1), (2, 2), (1, 1)),
    (1, 3, 8, 70, (5, 3), (1, 2), (2, 1), (1, 1)),   # padded rows span two words
    (2, 2, 5, 130, (3, 3), (3, 1), (1, 2), (1, 2)),
    (1, 7, 4, 4, (3, 3), (1, 1), (1, 1), (1, 1)),    # K = 63
]


def split_calls(call, rows: int) -> None:
    """``call(lo, hi)`` over ranges that cut ``rows`` at odd points (as threads do), last
    range first, so a write past a range's end would spoil its successor's rows."""
    cuts = sorted({0, rows, rows // 3 + 1, 2 * rows // 3})
    for lo, hi in reversed(list(zip(cuts, cuts[1:]))):
        call(lo, hi)


@pytest.mark.parametrize("target", KERNEL_TARGETS)
@pytest.mark.parametrize("conv", CONVS, ids=lambda c: conv_id(*c))
def test_im2col_pack(target, conv, monkeypatch):
    """Both layouts from float x and from packed bits; the transposed one both ways (the
    direct kernel, also over split row ranges, and im2col + bit transpose)."""
    n, c, h, w, ks, stride, padding, dilation = conv
    x = data(n, c, h, w, seed=h * w)
    ref = ref_im2col(x, ks, stride, padding, dilation)
    signs, _ = pack.pack_signs_and_ste(x.flatten(1), target=target)
    args = (ks, stride, padding, dilation)
    for source, kw in ((x, {}), (signs, {"input_shape": x.shape})):
        got = pack.im2col_pack(source, *args, target=target, **kw)
        assert got.k == ref.shape[1] and torch.equal(got.words, ref_words(ref))
        for direct_from in (0, pack.DIRECT_TRANSPOSE_MIN_WIDTH):
            monkeypatch.setattr(pack, "DIRECT_TRANSPOSE_MIN_WIDTH", direct_from)
            got_t = pack.im2col_pack_t(source, *args, target=target, **kw)
            assert got_t.k == ref.shape[0] and torch.equal(got_t.words, ref_words(ref.T.contiguous()))
    bm, wpw, (n, c, h, _, oh, ow), conv_options = pack._conv_args(x, *args, None, target)
    want = ref_words(ref.T.contiguous())
    out = torch.full((want.shape[0] + 3, want.shape[1]), -1, dtype=torch.int64)
    fn = pack._fn("im2col_pack_t", target, **conv_options)
    split_calls(lambda lo, hi: fn(bm.data_ptr(), wpw, n, c, h, oh, ow, out.data_ptr(), out.shape[1], lo, hi),
                want.shape[0])
    assert torch.equal(out[:-3], want) and (out[-3:] == -1).all()


def test_im2col_non_contiguous_input():
    base = data(2, 9, 6, 3)
    x = base.permute(0, 3, 2, 1)          # NCHW view with stride 1 along C, not W
    ref = ref_im2col(x, (3, 3), (1, 1), (1, 1), (1, 1))
    assert torch.equal(pack.im2col_pack(x, 3, 1, 1).words, ref_words(ref))
    y = data(2, 3, 8, 16)[:, :, 1:7, ::2]  # strided H and W
    ref = ref_im2col(y, (3, 3), (2, 2), (2, 2), (1, 1))
    assert torch.equal(pack.im2col_pack_t(y, 3, 2, 2).words, ref_words(ref.T.contiguous()))


def ref_bitmap(x, pad, wpw):
    """Padded row bitmap rows (n, c, ih): bit pad + iw = x[n, c, ih, iw] > 0, ``wpw`` words."""
    n, c, h, w = x.shape
    bits = torch.zeros(n * c * h, wpw * 64, dtype=torch.bool)
    bits[:, pad:pad + w] = (x > 0).reshape(-1, w)
    return ref_words(bits)[:, :wpw]


@pytest.mark.parametrize("target", KERNEL_TARGETS)
@pytest.mark.parametrize("n,c,hw,pad,pieces", [(1, 1, 1, 1, 1), (3, 67, 1, 1, 3), (1, 5, 2, 1, 2), (3, 131, 2, 0, 4),
                                               (3, 7, 3, 2, 5), (2, 67, 8, 1, 3), (3, 9, 13, 3, 2), (2, 3, 64, 0, 3),
                                               (1, 3, 40, 20, 2)])
def test_padded_rows_from_bits(target, n, c, hw, pad, pieces):
    """The bitmap from packed sign bits, built over row ranges that split samples at odd
    points (as threads do; last range first, so a write past a range's end would spoil its
    successor's rows), equals the reference and writes nothing past its rows; both sources
    agree."""
    x = data(n, c, hw, hw, seed=c * hw)
    signs, _ = pack.pack_signs_and_ste(x.flatten(1), target=target)
    wpw = gen.bitmap_words(hw, pad)
    rows = n * c * hw
    bm = torch.full((rows + 16, wpw), -1, dtype=torch.int64)
    fn = pack._fn("padded_rows", target, source="bits")
    cuts = sorted({0, rows, *(rows * i // pieces + i % 2 for i in range(1, pieces))})
    for lo, hi in reversed(list(zip(cuts, cuts[1:]))):
        fn(signs.words.data_ptr(), signs.ld, c, hw, hw, pad, bm.data_ptr(), wpw, lo, hi)
    assert torch.equal(bm[:rows], ref_bitmap(x, pad, wpw)) and (bm[rows:] == -1).all()
    assert torch.equal(pack._bitmap(x, None, (pad, pad), target)[0], bm[:rows])


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 3), c=st.integers(1, 6), h=st.integers(1, 9), w=st.integers(1, 75),
       kh=st.integers(1, 5), kw=st.integers(1, 5), s=st.integers(1, 3), p=st.integers(0, 2),
       d=st.integers(1, 2), seed=st.integers(0, 2**16))
def test_im2col_property(n, c, h, w, kh, kw, s, p, d, seed):
    assume(h + 2 * p >= d * (kh - 1) + 1 and w + 2 * p >= d * (kw - 1) + 1)
    x = data(n, c, h, w, seed=seed)
    ref = ref_im2col(x, (kh, kw), (s, s), (p, p), (d, d))
    signs, _ = pack.pack_signs_and_ste(x.flatten(1))
    got = pack.im2col_pack(signs, (kh, kw), s, p, d, input_shape=x.shape)
    assert torch.equal(got.words, ref_words(ref))
    got_t = pack.im2col_pack_t(x, (kh, kw), s, p, d)
    assert torch.equal(got_t.words, ref_words(ref.T.contiguous()))


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 40), k=st.integers(1, 300), seed=st.integers(0, 2**16))
def test_pack_property(rows, k, seed):
    x = data(rows, k, seed=seed)
    signs, mask = pack.pack_signs_and_ste(x)
    assert torch.equal(signs.words, ref_words(x > 0))
    assert torch.equal(pack.unpack_mask(mask.words, k, (rows * k,)), reference.ste_mask(x).view(-1))


def test_errors():
    with pytest.raises(ValueError, match="input_shape"):
        pack.im2col_pack(pack.pack_signs(data(2, 12)), 3)
    with pytest.raises(ValueError, match="does not hold"):
        pack.unpack_signs(pack.pack_signs(data(2, 12)).words, 12, (5, 5))
    with pytest.raises(TypeError, match="float32"):
        pack.pack_signs(torch.ones(3, 3, dtype=torch.float64))


def test_preprocessing_kernels_build_for_aarch64():
    """Every preprocessing generator emits an object for a NEON target (no x86-only intrinsic
    leaks out of its Target.has guard); tests/test_cross.py runs them under qemu."""
    from fqt_compiler.codegen import pack as pack_gen, quantize as quantize_gen
    from fqt_compiler.runtime.jit import compile_object
    t = get_target("rpi4")
    conv = ((3, 3), (2, 2), (1, 1), (2, 2))
    irs = [pack_gen.sign_pack_ir(t, with_ste=True), pack_gen.unpack_ir(t), pack_gen.unpack_ir(t, multiply=True),
           pack_gen.padded_rows_ir(t, source="bits"),
           pack_gen.im2col_pack_ir(t, *conv, one_word=False), pack_gen.im2col_pack_t_ir(t, *conv, one_word=True),
           quantize_gen.group_minmax_ir(t, lanes=16), quantize_gen.quantize_pack_ir(t, bits=4),
           quantize_gen.quantize_pack_rows_ir(t, bits=2), pack_gen.transpose_bits_ir(t), pack_gen.tap_gather_ir(t, *conv, chunk=2)]
    for kernel in irs:
        assert compile_object(kernel.text, t).startswith(b"\x7fELF")


@pytest.mark.parametrize("target", KERNEL_TARGETS)
@pytest.mark.parametrize("rows,k", [(1, 1), (1, 65), (64, 64), (63, 130), (65, 1), (130, 257)])
def test_transpose_bits(target, rows, k):
    x = data(rows, k, seed=rows + k)
    got = pack.transpose_bits(pack.pack_signs(x, target=target), target=target)
    assert got.k == rows and torch.equal(got.words, ref_words(x.T > 0))


def ref_tap_gather(codes, chunk, hw, ohw, conv):
    """The input-gradient A operand from ``reference.transposed_conv_taps``: tap t of row
    (plane, s, y, x) is the first ``chunk`` words of the output position it reads, or zeros."""
    planes, rows, _ = codes.shape
    taps = reference.transposed_conv_taps(hw, ohw, *conv)            # [H*W, KH*KW]
    images = rows // (ohw[0] * ohw[1])
    src = torch.cat([codes[:, :, :chunk], torch.zeros(planes, 1, chunk, dtype=torch.int64)], 1)
    first = (torch.arange(images) * ohw[0] * ohw[1]).view(-1, 1, 1)
    words = src[:, torch.where(taps >= 0, taps + first, rows)].reshape(planes, images * hw[0] * hw[1], -1)
    return F.pad(words, (0, padded_words(words.shape[2] * 64) - words.shape[2]))


@pytest.mark.parametrize("target", KERNEL_TARGETS)
@pytest.mark.parametrize("conv", CONVS, ids=lambda c: conv_id(*c))
def test_tap_gather(target, conv):
    """Code words per tap of a transposed convolution equal the reference's taps (stride
    holes and padding read zero words; one- and two-word channel runs of codes whose rows
    have more words), also when rows are split at odd points, last range first, so a write
    past a range's end would spoil the next; no write past the last row."""
    n, c, h, w, ks, stride, padding, dilation = conv
    chunk = 1 + c % 2
    oh, ow = (reference.conv_output_size(*v) for v in zip((h, w), ks, stride, padding, dilation))
    codes = torch.randint(-2**62, 2**62, (2, n * oh * ow, 8), generator=torch.Generator().manual_seed(h * w))
    args = (chunk, (h, w), (oh, ow), ks, stride, padding, dilation)
    want = ref_tap_gather(codes, *args[:3], args[3:])
    assert torch.equal(pack.tap_gather(codes, *args, target=target), want)
    fn = pack._fn("tap_gather", target, kernel_size=ks, stride=stride, padding=padding, dilation=dilation,
                  chunk=chunk)
    planes = torch.full((2 * want.shape[1] + 3, want.shape[2]), -1, dtype=torch.int64)
    split_calls(lambda lo, hi: fn(codes.data_ptr(), codes.shape[2], h, w, oh, ow, planes.data_ptr(), planes.shape[1],
                                  lo, hi), 2 * n * h)
    assert torch.equal(planes[:-3], want.reshape(-1, want.shape[2])) and (planes[-3:] == -1).all()
    empty = pack.tap_gather(codes[:, :0].contiguous(), *args, target=target)   # every sample pruned
    assert empty.shape == (2, 0, want.shape[2])


def test_pack_reuse_only_for_the_same_unmodified_tensor():
    """``reuse=True`` hands back the previous call's bits only for the same memory, shape and
    strides, unmodified since; anything else is packed anew (and equals a plain pack)."""
    x = torch.randn(5, 70)
    first = pack.pack_signs_and_ste(x, reuse=True)
    assert pack.pack_signs_and_ste(x, reuse=True) is first
    assert pack.pack_signs_and_ste(x.view(5, 70), reuse=True) is first      # another view, same memory
    assert pack.pack_signs_and_ste(x) is not first                            # reuse is opt-in

    def fresh(t):
        got, want = pack.pack_signs_and_ste(t, reuse=True), pack.pack_signs_and_ste(t)
        assert got is not first
        for a, b in zip(got, want):
            assert torch.equal(a.words, b.words) and a.k == b.k

    fresh(x[:, :64])                 # same data pointer, other shape
    x.neg_()                         # an in-place write bumps the version counter
    fresh(x)
    assert not torch.equal(pack.pack_signs_and_ste(x, reuse=True)[0].words, first[0].words)
    fresh(x.clone())
    with jit.kernel_hook(lambda spec, load: load(spec)):
        again = pack.pack_signs_and_ste(x, reuse=True)
        assert pack.pack_signs_and_ste(x, reuse=True) is not again
