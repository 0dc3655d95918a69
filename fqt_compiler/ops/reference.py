"""Pure-PyTorch reference of every fqt computation: the oracle the kernels must match.

docs/math.md §2-§4 are implemented here literally and slowly. Integer results (binary and
bit-plane dot products, quantization codes, keep decisions) are what kernels must
reproduce bit for bit; floating results are matched to float32 rounding.

Layout conventions shared with the kernels:

* Bits: bit 1 means +1 (``v > 0``), bit 0 means -1. ``pack_bits`` packs the last axis
  into little-endian 64-bit words (element ``k`` is bit ``k % 64`` of word ``k // 64``),
  stored as int64; tail bits past K are 0.
* A gradient matrix ``G'`` is 2-D ``[rows r, channels o]``. For a conv, row
  ``r = (n, h', w')`` in that order, i.e. ``G'.permute(0, 2, 3, 1).reshape(-1, O)``;
  for a linear layer, all leading dims are flattened into rows.
* Element ``(r, o)`` of ``G'`` has counter index ``r * O + o`` in the RNG streams of
  stochastic rounding (``fqt_compiler.ops.rng``); group ``i`` has index ``i`` in the
  sampling streams.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from . import rng

# --------------------------------------------------------------------------- bits

def sign(x: torch.Tensor) -> torch.Tensor:
    """sign(v) = +1 if v > 0 else -1 (zero maps to -1, docs/math.md §2)."""
    return torch.where(x > 0, 1.0, -1.0).to(x.dtype if x.is_floating_point() else torch.float32)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack a bool tensor ``[..., K]`` along its last axis into int64 words ``[..., ceil(K/64)]``."""
    k = bits.shape[-1]
    words = (k + 63) // 64
    padded = torch.zeros(*bits.shape[:-1], words * 64, dtype=torch.int64)
    padded[..., :k] = bits.to(torch.int64)
    padded = padded.reshape(*bits.shape[:-1], words, 64)
    shifts = torch.arange(64, dtype=torch.int64)
    # Summing distinct powers of two is an OR; int64 wraps bit 63 to the sign bit as intended.
    return (padded << shifts).sum(-1)


WORD_ALIGN = 8  # words per row are padded to whole 512-bit vectors for the kernels


def padded_words(k: int) -> int:
    """Words per packed row of ``k`` bits, padded to a multiple of ``WORD_ALIGN`` (the padding
    words are zero, so popcount identities stay exact)."""
    words = max(1, (k + 63) // 64)
    return (words + WORD_ALIGN - 1) // WORD_ALIGN * WORD_ALIGN


def unpack_bits(words: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: int64 words ``[..., W]`` to bool ``[..., k]``."""
    shifts = torch.arange(64, dtype=torch.int64)
    bits = (words.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(*words.shape[:-1], -1)[..., :k].bool()


def binary_gemm(a_bits: torch.Tensor, b_bits: torch.Tensor) -> torch.Tensor:
    """±1×±1 GEMM: ``a`` M×K, ``b`` N×K bool (bit = +1) -> int32 M×N, ``K - 2 popcount(a ^ b)``."""
    a = a_bits.to(torch.int64) * 2 - 1
    b = b_bits.to(torch.int64) * 2 - 1
    return (a @ b.T).to(torch.int32)


def bitplane_gemm(codes: torch.Tensor, b_bits: torch.Tensor) -> torch.Tensor:
    """b-bit codes × ±1 GEMM: ``codes`` M×K in {0..2^b-1}, ``b`` N×K bool -> int32 M×N.

    The kernels compute it plane by plane, ``sum_t 2^t (2 popcount(a_t & w) - popcount(a_t))``;
    the value is the plain integer dot product below."""
    b = b_bits.to(torch.int64) * 2 - 1
    return (codes.to(torch.int64) @ b.T).to(torch.int32)


# --------------------------------------------------------------------------- forward

def default_alpha(weight: torch.Tensor, abs_out: torch.Tensor | None = None) -> torch.Tensor:
    """XNOR-Net scale: mean |w| over each output channel's weights; ``abs_out``: where to
    write the weight-sized |w| (the kernel backend passes a reused buffer)."""
    w = weight.detach().flatten(1)
    # |w| then a sum: ATen's vectorized sum runs several times faster than the fused
    # vector_norm(ord=1) despite the weight-sized temporary (this runs every training step)
    return torch.abs(w, out=abs_out).sum(1) / w.shape[1]


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """Output length of a convolution along one axis (PyTorch's formula)."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def binary_conv2d(x, weight, alpha, bias, stride, padding, dilation):
    """Binarized conv2d forward (docs/math.md §2): pad with zeros, then sign, so padding is -1."""
    xp = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    y = F.conv2d(sign(xp), sign(weight), None, stride, 0, dilation)
    y = y * alpha.view(1, -1, 1, 1)
    if bias is not None:
        y = y + bias.view(1, -1, 1, 1)
    return y


def binary_linear(x, weight, alpha, bias):
    """Binarized linear forward: ``alpha ⊙ (sign(x) sign(w)ᵀ) + bias``."""
    y = F.linear(sign(x), sign(weight)) * alpha
    if bias is not None:
        y = y + bias
    return y


def ste_mask(v: torch.Tensor) -> torch.Tensor:
    """Straight-through estimator of sign: ``1{|v| < 1}``."""
    return (v.abs() < 1).to(v.dtype)


# --------------------------------------------------------------------------- quantizers

METHODS = ("none", "ptq", "psq", "aq_scq", "aq_opt", "topk")
SAMPLED = ("aq_scq", "aq_opt")   # AQ methods: random keep draws, kept groups rescaled by 1/p
BITS = (1, 2, 4, 8)
PATH_INPUT = "input"    # gradient w.r.t. the layer input: contracts over channels o
PATH_WEIGHT = "weight"  # gradient w.r.t. the weight: contracts over rows r


def grouping(method: str, path: str) -> str:
    """Which groups a method quantizes on one path: ``"tensor"``, ``"sample"`` or ``"channel"``.

    SCQ (aq_scq, aq_opt, topk) uses per-sample groups for the input path and per-channel groups for
    the weight path, the only groupings whose scale factors out of that path's contraction."""
    if method == "ptq":
        return "tensor"
    if method == "psq":
        return "sample"
    if method in (*SAMPLED, "topk"):
        return "sample" if path == PATH_INPUT else "channel"
    raise ValueError(f"method {method!r} quantizes no groups; expected one of {METHODS[1:]}")


def group_index(g2d: torch.Tensor, kind: str, rows_per_sample: int) -> tuple[int, torch.Tensor]:
    """(number of groups, group id of every element of ``g2d``)."""
    rows, cols = g2d.shape
    if kind == "tensor":
        return 1, torch.zeros(rows, cols, dtype=torch.int64)
    if kind == "sample":
        if rows % rows_per_sample:
            raise ValueError(f"{rows} rows do not split into samples of {rows_per_sample} rows")
        ids = torch.arange(rows, dtype=torch.int64) // rows_per_sample
        return rows // rows_per_sample, ids.view(-1, 1).expand(rows, cols)
    if kind == "channel":
        return cols, torch.arange(cols, dtype=torch.int64).view(1, -1).expand(rows, cols)
    raise ValueError(f"unknown grouping {kind!r}; expected 'tensor', 'sample' or 'channel'")


def group_min_max(g2d: torch.Tensor, kind: str, rows_per_sample: int = 1):
    """Per-group minimum and maximum (float32), the statistics pass of the quantizer. A zero
    result is +0.0: amin/amax keep whichever signed zero they meet first, so kernels on
    different CPUs could not match it bit for bit otherwise."""
    n, ids = group_index(g2d, kind, rows_per_sample)
    flat, ids = g2d.reshape(-1), ids.reshape(-1)
    lo = torch.full((n,), float("inf")).scatter_reduce(0, ids, flat, "amin")
    hi = torch.full((n,), float("-inf")).scatter_reduce(0, ids, flat, "amax")
    return lo + 0.0, hi + 0.0


def aq_scores(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """AQ's per-group score (docs/math.md §4): the range ``R = hi - lo``, or ``|z|`` (z = lo)
    for a constant group, so that only an all-zero group scores 0 and may be dropped for sure
    (a nonzero constant group, e.g. every channel group of a batch-1 Linear layer, would
    otherwise never be kept and its gradient would be lost)."""
    ranges = hi - lo
    return torch.where(ranges > 0, ranges, lo.abs())


LANES = 64   # lanes of the sum-of-squares accumulator (``pair_sum_squares``)


def statistics_view(g2d: torch.Tensor, kind: str, rows_per_sample: int) -> torch.Tensor:
    """``G'`` as ``[n, o, i]`` (sample, channel, row within the sample): the pairs the
    statistics pass reduces. Samples have ``rows_per_sample`` rows, except that on the channel
    grouping samples of one row (a Linear layer's) are merged into one sample of all rows,
    so that a pair is a long run, not a single element."""
    rows, cols = g2d.shape
    rps = rows if kind == "channel" and rows_per_sample == 1 else rows_per_sample
    if kind not in ("sample", "channel") or rows % rps:
        raise ValueError(f"no (sample, channel) pairs for grouping {kind!r} with {rows} rows in "
                         f"samples of {rows_per_sample}")
    return g2d.view(rows // rps, rps, cols).permute(0, 2, 1)


def pair_sum_squares(g3: torch.Tensor) -> torch.Tensor:
    """``sum_i g3[n, o, i]^2`` per pair ``(n, o)`` as float64, in the one order a vector
    kernel also follows, so the two agree bit for bit: squares in float64 (exact for a
    float32), accumulated in ``LANES`` lanes (position ``i`` goes to lane ``i % LANES``,
    chunks of ``LANES`` positions added in order), then the lanes folded in halves
    (lane ``j`` += lane ``j + w/2`` for ``w = LANES, ..., 2``). Padding with zeros changes no
    sum, so a kernel using fewer lanes for short pairs (all of whose positions fit) agrees."""
    n, o, hw = g3.shape
    chunks = max(1, -(-hw // LANES))
    sq = torch.zeros(n, o, chunks * LANES, dtype=torch.float64)
    sq[:, :, :hw] = g3.double() ** 2
    sq = sq.view(n, o, chunks, LANES)
    acc = sq[:, :, 0]
    for c in range(1, chunks):
        acc = acc + sq[:, :, c]
    return halving_sum(acc, 2)


def halving_sum(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum over ``dim`` as a fixed binary tree (padded with zeros to a power of two, then
    the lower half plus the upper half, repeatedly): one order, whatever the hardware."""
    width = 1 << max(0, (x.shape[dim] - 1).bit_length())
    pad = list(x.shape)
    pad[dim] = width - x.shape[dim]
    x = torch.cat([x, x.new_zeros(pad)], dim)
    while width > 1:
        width //= 2
        x = x.narrow(dim, 0, width) + x.narrow(dim, width, width)
    return x.squeeze(dim)


def group_sum_squares(pairs: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-group ``||G_i||^2`` (float64) from the ``[n, o]`` pair sums of ``pair_sum_squares``:
    a sample group sums its channels, a channel group its samples (``halving_sum``)."""
    return halving_sum(pairs, 1 if kind == "sample" else 0)


def opt_scores(ranges: torch.Tensor, sum_squares: torch.Tensor, sizes: int, bits: int) -> torch.Tensor:
    """``aq_opt``'s sampling score ``sqrt(||G_i||^2 + d_i R_i^2 / (4 B^2))`` (float64).

    docs/math.md: the variance bound ``sum_i (1/p_i - 1) ||G_i||^2 + d_i R_i^2 / (4 B^2 p_i)``
    under ``sum p_i = N/b``, ``p_i <= 1`` is minimized by ``p_i`` proportional to this score
    (Lagrange), water-filled like AQ's range score (``aq_probabilities``)."""
    levels = float(2 ** bits - 1)
    r = ranges.double()
    return torch.sqrt(sum_squares + sizes * r * r / (4.0 * levels * levels))


def aq_probabilities(scores: torch.Tensor, bits: int) -> torch.Tensor:
    """Water-filling keep probabilities ``p_i = min(1, c s_i)`` with ``sum p = N / bits``.

    Groups whose ``c s_i`` would exceed 1 are kept with certainty and the budget is
    re-spread over the rest. A zero score gets p = 0; when the budget covers every group
    with a nonzero score they are all kept. Every nonzero p is rounded up to a multiple of
    ``2**-rng.KEEP_BITS``, the resolution of the keep draw (``rng.bernoulli``), so the
    draw keeps the group at exactly rate p and the ``1/p`` rescale stays unbiased however
    small p is (in float32, too: the rounded p is exactly representable)."""
    # numpy, not torch: these are a dozen ops on at most a few thousand groups, run per
    # layer and path every step, where torch's per-op dispatch would cost more than the work.
    # Same float64 arithmetic in the same order (cumsum is a sequential scan in both).
    r = scores.detach().double().numpy()
    n = r.size
    budget = n / bits
    p = np.zeros(n)
    order = np.argsort(-r, kind="stable")   # descending; equal scores keep their order
    sorted_r = r[order]
    tail = np.cumsum(sorted_r[::-1])[::-1]   # sum of sorted_r[k:]
    # Keeping the k widest groups with certainty leaves budget - k for the rest, spread as
    # c_k R with c_k = (budget - k) / tail[k]. The first k where nothing is left to spread,
    # or where c_k R of the next group is at most 1, decides (all k at once, not a loop).
    left = budget - np.arange(n, dtype=np.float64)
    exhausted = (tail <= 0) | (left <= 0)
    with np.errstate(divide="ignore", invalid="ignore"):   # 0/0 and inf*0 where exhausted
        c = left / tail
        stops = np.flatnonzero(exhausted | (c * sorted_r <= 1.0))
    if not stops.size:
        p[:] = 1.0
    else:
        first = int(stops[0])
        p[order[:first]] = 1.0
        if not exhausted[first]:
            p[order[first:]] = np.minimum(c[first] * sorted_r[first:], 1.0)
    grid = float(2 ** rng.KEEP_BITS)
    return torch.from_numpy(np.ceil(p * grid) / grid).float()


def topk_probabilities(ranges: torch.Tensor, bits: int) -> torch.Tensor:
    """The authors' deterministic variant: keep the ``ceil(N / bits)`` widest groups (p = 1)."""
    n = ranges.numel()
    keep = -(-n // bits)
    p = torch.zeros(n)
    p[torch.argsort(ranges.double(), descending=True, stable=True)[:keep]] = 1.0
    return p


@dataclass
class QuantizedGradient:
    """A b-bit quantized gradient matrix ``[rows, cols]`` with per-group affine parameters.

    ``codes`` holds every element's code (0 in pruned groups); ``group_ids`` maps each
    element to its group. Dequantized value: ``scale[g] * code + zero[g]`` for kept groups,
    0 for pruned ones, where ``scale = R / (B p)`` and ``zero = z / p`` (docs/math.md §4)."""

    codes: torch.Tensor      # uint8 [rows, cols]
    kind: str                # "tensor" | "sample" | "channel"
    rows_per_sample: int
    bits: int
    keep: torch.Tensor       # bool [groups]
    prob: torch.Tensor       # float32 [groups], 1 where kept deterministically
    scale: torch.Tensor      # float32 [groups]
    zero: torch.Tensor       # float32 [groups]

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.codes, self.scale, self.zero, self.keep, self.kind,
                          self.rows_per_sample)


def dequantize(codes, scale, zero, keep, kind: str, rows_per_sample: int) -> torch.Tensor:
    """``scale[g] * code + zero[g]`` in kept groups, 0 in pruned ones (float32 ``[rows, cols]``)."""
    _, ids = group_index(codes, kind, rows_per_sample)
    value = scale[ids] * codes.float() + zero[ids]
    return torch.where(keep[ids], value, torch.zeros(()))


def stochastic_codes(g2d, lo, hi, ids, bits, u):
    """Stochastic rounding of ``B (v - z) / R`` with exactly these float32 operations, in
    this order, so that a kernel can match bit for bit: ``s = B / R`` (0 where R = 0),
    ``t = (v - z) * s``, ``q = clamp(floor(t + u), 0, B)``."""
    s = rounding_scale(lo, hi, bits)
    return rounded_codes(g2d, lo[ids], s[ids], bits, u.view_as(g2d))


def rounding_scale(lo, hi, bits: int) -> torch.Tensor:
    """Per group ``s = B / R`` in float32, 0 where R = 0 (``stochastic_codes``)."""
    rng_ = hi - lo
    # A float32 tensor divided, not a Python float: torch computes ``x / t`` as ``x * (1/t)``.
    return torch.where(rng_ > 0, torch.tensor(float(2 ** bits - 1), dtype=torch.float32) / rng_, torch.zeros(()))


def rounded_codes(v, z, s, bits: int, u):
    """The rounding step of ``stochastic_codes`` for elementwise zero points ``z``, scales
    ``s = B / R`` and uniforms ``u``: ``clamp(floor((v - z) * s + u), 0, B)`` as uint8."""
    q = torch.floor((v - z) * s + u)
    return q.clamp_(0, float(2 ** bits - 1)).to(torch.uint8)


def quantize_gradient(g2d: torch.Tensor, method: str, path: str, bits: int, *,
                      rows_per_sample: int, seed: int, step: int, layer: int) -> QuantizedGradient:
    """Quantize ``G'`` for one SCQ path with one method (docs/math.md §4).

    Two stages, each an op of the backward graph: ``sample_groups`` (statistics and AQ
    keep decisions) then ``quantize_groups`` (stochastic rounding of the kept groups)."""
    g2d = g2d.detach().float().contiguous()
    lo, hi, keep, prob = sample_groups(g2d, method, path, bits, rows_per_sample=rows_per_sample,
                                       seed=seed, step=step, layer=layer)
    codes, scale, zero = quantize_groups(g2d, lo, hi, keep, prob, method, path, bits,
                                         rows_per_sample=rows_per_sample, seed=seed, step=step,
                                         layer=layer)
    return QuantizedGradient(codes, grouping(method, path), rows_per_sample, bits, keep, prob,
                             scale, zero)


def sample_groups(g2d: torch.Tensor, method: str, path: str, bits: int, *,
                  rows_per_sample: int, seed: int, step: int, layer: int):
    """Group statistics and keep decisions: ``(lo, hi, keep, prob)`` per group.

    ``prob`` is the probability the dequantization divides by: the AQ keep probability for
    ``aq_scq`` and ``aq_opt``, 1 for every other method (``topk`` is biased on purpose, as in the authors'
    code; ``ptq``/``psq`` keep every group)."""
    if bits not in BITS:
        raise ValueError(f"bits={bits} is not supported; expected one of {BITS}")
    g2d = g2d.detach().float().contiguous()
    kind = grouping(method, path)
    lo, hi = group_min_max(g2d, kind, rows_per_sample)
    pairs = pair_sum_squares(statistics_view(g2d, kind, rows_per_sample)) if method == "aq_opt" else None
    scores = sampling_scores(method, bits, lo, hi, pairs, kind, g2d.numel())
    keep, prob = keep_groups(lo, hi, method, path, bits, seed=seed, step=step, layer=layer, scores=scores)
    return lo, hi, keep, prob


def expected_kept(method: str, bits: int, groups: int) -> float:
    """Expected fraction of ``groups`` groups an SCQ path keeps (docs/math.md §4): ``1/b`` for
    aq_scq and aq_opt (capped at all), ``ceil(N/b)`` of ``N`` for topk, all for the other methods."""
    if method in SAMPLED:
        return min(1.0, 1.0 / bits)
    if method == "topk":
        return -(-groups // bits) / groups
    return 1.0


def sampling_scores(method: str, bits: int, lo, hi, pair_sums, kind: str, elements: int) -> torch.Tensor:
    """What the keep probabilities are proportional to: ``aq_scores`` (the paper's range, or
    ``|z|`` for a constant group), or for ``aq_opt`` the ``opt_scores`` of the ranges and of the
    group sums of squares, reduced from the statistics pass's ``[n, o]`` pair sums
    (``pair_sum_squares``)."""
    if method != "aq_opt":
        return aq_scores(lo, hi)
    return opt_scores(hi - lo, group_sum_squares(pair_sums, kind), elements // lo.numel(), bits)


def aq_keep(scores: torch.Tensor, path: str, bits: int, *, seed: int, step: int, layer: int):
    """``(keep, prob)`` of an AQ method's groups of one path from finite ``scores``: the keep
    probabilities and the path's counter-based keep draws."""
    prob = aq_probabilities(scores, bits)
    return rng.keep_draws(seed, step, layer, sample_stream(path), prob), prob


def sample_stream(path: str) -> int:
    """The stream of one path's AQ keep draws."""
    return rng.STREAM_SAMPLE_INPUT if path == PATH_INPUT else rng.STREAM_SAMPLE_WEIGHT


def keep_groups(lo: torch.Tensor, hi: torch.Tensor, method: str, path: str, bits: int, *,
                seed: int, step: int, layer: int, scores: torch.Tensor | None = None):
    """``(keep, prob)`` of the groups of one path from their minima and maxima and their
    ``sampling_scores`` (default: ``aq_scores(lo, hi)``; see ``sample_groups``).

    A group whose score is NaN or Inf (its G' holds one) is always kept with p = 1, so the
    non-finite value reaches the gradients through its scale and zero point, as it would in
    float training, instead of being pruned away (the other groups draw as if it were all
    zero)."""
    ranges = hi - lo
    if scores is None:
        scores = aq_scores(lo, hi)
    bad = ~torch.isfinite(ranges) | ~torch.isfinite(scores)
    if bad.any():
        keep, prob = keep_groups(torch.where(bad, 0.0, lo), torch.where(bad, 0.0, hi), method,
                                 path, bits, seed=seed, step=step, layer=layer,
                                 scores=torch.where(bad, 0.0, scores))
        return keep | bad, torch.where(bad, 1.0, prob)
    n = ranges.numel()
    if method in SAMPLED:
        keep, prob = aq_keep(scores, path, bits, seed=seed, step=step, layer=layer)
    elif method == "topk":
        keep = topk_probabilities(ranges, bits) > 0
        prob = torch.ones(n)
    else:
        prob = torch.ones(n)
        keep = torch.ones(n, dtype=torch.bool)
    return keep, prob


def quantize_groups(g2d, lo, hi, keep, prob, method: str, path: str, bits: int, *,
                    rows_per_sample: int, seed: int, step: int, layer: int):
    """Stochastic b-bit codes of every element (0 in pruned groups) and the per-group
    dequantization ``scale = R / (B p)``, ``zero = z / p``: ``(codes, scale, zero)``."""
    g2d = g2d.detach().float().contiguous()
    _, ids = group_index(g2d, grouping(method, path), rows_per_sample)
    sr_stream = rng.STREAM_SR_INPUT if path == PATH_INPUT else rng.STREAM_SR_WEIGHT
    u = rng.uniform(seed, step, layer, sr_stream, g2d.numel())
    codes = stochastic_codes(g2d, lo, hi, ids, bits, u)
    codes = torch.where(keep[ids], codes, torch.zeros((), dtype=torch.uint8))
    scale, zero = dequantization(lo, hi, keep, prob, bits)
    return codes, scale, zero


def dequantization(lo, hi, keep, prob, bits: int):
    """Per-group ``scale = R / (B p)`` and ``zero = z / p`` (p = 1 for pruned groups)."""
    safe_p = torch.where(keep, prob, torch.ones(()))
    return (hi - lo) / float(2 ** bits - 1) / safe_p, lo / safe_p


# --------------------------------------------------------------------------- backward GEMMs

def conv_rows(g: torch.Tensor) -> torch.Tensor:
    """NCHW gradient -> ``G'`` layout ``[(n, h', w'), o]``."""
    return g.permute(0, 2, 3, 1).reshape(-1, g.shape[1])


def conv_unrows(g2d: torch.Tensor, shape) -> torch.Tensor:
    n, o, h, w = shape
    return g2d.reshape(n, h, w, o).permute(0, 3, 1, 2)


def conv2d_input_grad(gprime, weight, x, stride, padding, dilation):
    """``dX = STE(x) ⊙ crop(col2im(G' Ŵ))``; ``gprime`` is NCHW (already scaled by alpha)."""
    n, c, h, w = x.shape
    padded = (n, c, h + 2 * padding[0], w + 2 * padding[1])
    dxp = torch.nn.grad.conv2d_input(padded, sign(weight), gprime, stride, 0, dilation)
    dx = dxp[:, :, padding[0]:padding[0] + h, padding[1]:padding[1] + w]
    return dx * ste_mask(x)


def transposed_conv_taps(input_hw, output_hw, kernel_size, stride, padding, dilation) -> torch.Tensor:
    """int64 ``[H*W, KH*KW]``: the output position ``oy*OW + ox`` that tap ``(i, j)`` of a
    transposed convolution reads at input position ``(y, x)``, -1 where it reads padding or a
    stride hole. Computed as the convolution sees it: output positions numbered in a map,
    zeros inserted between them (stride), padded by ``(K-1) d - p`` and unfolded with the
    flipped kernel, so tap ``(i, j)`` at ``(y, x)`` is patch element ``(KH-1-i, KW-1-j)``."""
    (h, w), (oh, ow) = input_hw, output_hw
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    ids = torch.zeros((oh - 1) * sh + 1, (ow - 1) * sw + 1, dtype=torch.float64)
    ids[::sh, ::sw] = torch.arange(1, oh * ow + 1, dtype=torch.float64).view(oh, ow)
    top, left = (kh - 1) * dh - ph, (kw - 1) * dw - pw
    bottom, right = h + (kh - 1) * dh - top - ids.shape[0], w + (kw - 1) * dw - left - ids.shape[1]
    grid = F.pad(ids, (left, right, top, bottom))          # negative pads crop
    cols = F.unfold(grid.view(1, 1, *grid.shape), (kh, kw), dilation=(dh, dw))[0]
    return cols.view(kh, kw, h * w).flip(0, 1).reshape(kh * kw, h * w).T.contiguous().long() - 1


def conv2d_weight_grad(gprime, weight, x, stride, padding, dilation):
    """``dW = STE(w) ⊙ (G'ᵀ X̂)`` over im2col rows of the padded, binarized input."""
    xp = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    dw = torch.nn.grad.conv2d_weight(sign(xp), weight.shape, gprime, stride, 0, dilation)
    return dw * ste_mask(weight)


def linear_input_grad(gprime, weight, x):
    return (gprime @ sign(weight)) * ste_mask(x)


def linear_weight_grad(gprime, weight, x):
    g2 = gprime.reshape(-1, gprime.shape[-1])
    x2 = sign(x).reshape(-1, x.shape[-1])
    return (g2.T @ x2) * ste_mask(weight)


# --------------------------------------------------------------------------- saved activations
#
# The forward op saves, instead of the float input x, two bit sets packed with ``pack_bits``:
# its signs (bit = x > 0) and its STE mask (bit = |x| < 1). Layout, chosen so each row is one
# contiguous run of words for the backward GEMMs:
#   conv2d: one row per sample over the flattened (c, h, w) of the *unpadded* input
#           -> int64 [N, padded_words(C*H*W)]; padded positions are -1 by definition (docs/math.md §2);
#   linear: one row per input row over the features -> int64 [prod(leading dims), padded_words(F)].
# Rows are padded with zero words to whole 512-bit vectors, the kernels' PackedBits layout.
# A binarized layer's weight is saved the same way (``pack_weight``): one row per output channel.

def activation_rows(x: torch.Tensor, kind: str) -> torch.Tensor:
    """The 2-D view of an activation that ``pack_activation`` packs row by row."""
    if kind == "conv2d":
        return x.reshape(x.shape[0], -1)
    if kind == "linear":
        return x.reshape(-1, x.shape[-1])
    raise ValueError(f"unknown layer kind {kind!r}; expected 'conv2d' or 'linear'")


def pack_activation(x: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(sign words, STE-mask words) of a layer input in the saved-activation layout."""
    rows = activation_rows(x.detach(), kind)
    return _padded(pack_bits(rows > 0)), _padded(pack_bits(rows.abs() < 1))


def _padded(words: torch.Tensor) -> torch.Tensor:
    out = words.new_zeros(words.shape[0], padded_words(words.shape[1] * 64))
    out[:, :words.shape[1]] = words
    return out


def unpack_activation(words: torch.Tensor, x_shape, kind: str) -> torch.Tensor:
    """Inverse of one half of ``pack_activation``: bool tensor of ``x_shape``."""
    x_shape = tuple(x_shape)
    k = x_shape[-1] if kind == "linear" else int(torch.Size(x_shape[1:]).numel())
    return unpack_bits(words, k).reshape(x_shape)


def pack_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sign words, STE-mask words) of a conv or linear weight: what a binarized layer's
    backward reads instead of the float weight, sign(W) for the input gradient and
    ``|W| < 1`` for the weight gradient (2 bits per weight). Layout of ``pack_activation``
    with one row per output channel over the flattened input axis (a conv's ``(c, kh, kw)``,
    a linear layer's features): int64 ``[O, padded_words(K)]`` each."""
    return pack_activation(weight.reshape(weight.shape[0], -1), "linear")


def unpack_weight(words: torch.Tensor, w_shape) -> torch.Tensor:
    """Inverse of one half of ``pack_weight``: bool tensor of ``w_shape``."""
    w_shape = tuple(w_shape)
    rows = (w_shape[0], int(torch.Size(w_shape[1:]).numel()))
    return unpack_activation(words, rows, "linear").reshape(w_shape)


def _signs(words, x_shape, kind):
    return torch.where(unpack_activation(words, x_shape, kind), 1.0, -1.0)


def _ste_stand_in(words, x_shape, kind):
    # An input whose STE mask is the saved one (0 inside |x| < 1, 1 outside), so the
    # packed-operand references run exactly the arithmetic of the float-input ones above.
    return torch.where(unpack_activation(words, x_shape, kind), 0.0, 1.0)


def _weight_stand_in(sign_words, ste_words, w_shape):
    # A weight with the saved sign(W) and STE mask (±0.5 inside |w| < 1, ±1 outside): the
    # float-weight references above read nothing else of it, so their arithmetic is unchanged.
    signs = torch.where(unpack_weight(sign_words, w_shape), 1.0, -1.0)
    return signs * torch.where(unpack_weight(ste_words, w_shape), 0.5, 1.0)


def conv2d_input_grad_packed(gprime, w_sign_words, w_ste_words, w_shape, ste_words, x_shape, stride,
                             padding, dilation):
    return conv2d_input_grad(gprime, _weight_stand_in(w_sign_words, w_ste_words, w_shape),
                             _ste_stand_in(ste_words, x_shape, "conv2d"), stride, padding, dilation)


def conv2d_weight_grad_packed(gprime, w_sign_words, w_ste_words, w_shape, sign_words, x_shape, stride,
                              padding, dilation):
    return conv2d_weight_grad(gprime, _weight_stand_in(w_sign_words, w_ste_words, w_shape),
                              _signs(sign_words, x_shape, "conv2d"), stride, padding, dilation)


def linear_input_grad_packed(gprime, w_sign_words, w_ste_words, w_shape, ste_words, x_shape):
    return linear_input_grad(gprime, _weight_stand_in(w_sign_words, w_ste_words, w_shape),
                             _ste_stand_in(ste_words, x_shape, "linear"))


def linear_weight_grad_packed(gprime, w_sign_words, w_ste_words, w_shape, sign_words, x_shape):
    return linear_weight_grad(gprime, _weight_stand_in(w_sign_words, w_ste_words, w_shape),
                              _signs(sign_words, x_shape, "linear"))
