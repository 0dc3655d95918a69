"""The fused gradient quantizer on torch tensors (docs/math.md §4), draw for draw the reference's.

``G'`` is given either as the NCHW gradient of a conv output (read in place: element
``(n, o, h, w)`` is G' row ``r = (n*H + h)*W + w``, column ``o``, as ``reference.conv_rows``)
or as a 2-D ``[rows, O]`` matrix; ``alpha`` (per output channel), when given, is multiplied
in on the fly: ``G' = alpha ⊙ g``.

1. ``sample_groups``: the min/max kernel (which also sums the squares for ``aq_opt``), or
   for a row-major ``[rows, O]`` G' (a linear layer's) the row/column kernel, which gives
   the per-row groups of the input path and the per-column groups of the weight path in one
   pass; then the ``aq_groups`` kernel on the N groups: AQ's scores, keep probabilities
   and keep draws (``reference.aq_keep``) and each group's rounding and dequantization
   scales, in one call (as a few dozen vector operations per layer and step, dispatch
   cost more than the work). Both paths of one ``G'`` can share the statistics pass
   (``SharedStatistics``). The per-row tables around the kernels are numpy: torch's
   per-operation cost exceeds their work.
2. ``quantize_bitplanes``: stochastic rounding of the kept groups only, bit-plane packed
   along the contraction axis of the path, as ``runtime.gemm.bitplane_gemm`` consumes it:
   ``out[row_map[m], :] = row_scale[m] * dot(m) + row_zero[m] * colsum``.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from functools import lru_cache, partial

import numpy as np
import torch

from ..codegen import quantize as gen
from ..codegen.targets import get_target
from ..ops import reference, rng
from .jit import kernel_of
from . import buffers, threads as pool
from .pack import parallel_rows
from .packed import padded_words

_GENERATORS = {"minmax": gen.group_minmax_ir, "row_col_minmax": gen.row_col_minmax_ir, "aq_groups": gen.aq_groups_ir,
               "pack_rows": gen.quantize_pack_rows_ir, "pack_cols": gen.quantize_pack_cols_ir,
               "pack": gen.quantize_pack_ir}
# Pairs of one element or strided runs that are no row-major matrix's rows or columns (a
# transposed G', samples of a few rows) go to torch's reductions instead (_statistics).
MIN_KERNEL_RUN = 2
# Vector width of the min/max kernel without sums of squares (their order fixes 64 lanes):
# two accumulators, a NaN flag and the loaded vector of 16 float32 lanes fit the AVX2 and
# NEON register files; 64 lanes spill on every iteration.
MINMAX_LANES = 16


def _fn(family: str, target, **options):
    return kernel_of(family, target, _GENERATORS[family], **options)


class _View:
    """``G'`` as ``g[n, o, i]``: ``n`` samples of ``rps`` rows each (one sample of all rows
    when the grouping has no samples), ``o`` channels. The kernels read only its address
    and strides; the torch view ``g`` is made when a torch operation asks for it."""

    __slots__ = ("base", "shape", "strides", "alpha", "ptr", "_g")

    def __init__(self, base: torch.Tensor, shape: tuple, strides: tuple, alpha: torch.Tensor | None):
        self.base, self.shape, self.strides, self.alpha = base, shape, strides, alpha   # strides (sn, so, si)
        self.ptr = base.data_ptr()   # the view keeps base's storage offset
        self._g = None

    @property
    def g(self) -> torch.Tensor:
        """The float32 3-D view."""
        if self._g is None:
            self._g = self.base.as_strided(self.shape, self.strides)
        return self._g

    @property
    def n(self):
        return self.shape[0]

    @property
    def channels(self):
        return self.shape[1]

    @property
    def rps(self):
        return self.shape[2]

    def alpha_ptr(self):
        return self.alpha.data_ptr() if self.alpha is not None else None


def _view(g: torch.Tensor, kind: str, rows_per_sample: int | None, alpha) -> _View:
    if g.dtype != torch.float32:
        g = g.float()
    if g.requires_grad:
        g = g.detach()
    copy, size, stride = _view_geometry(tuple(g.shape), g.stride(), kind, rows_per_sample)
    if copy:
        g = g.contiguous()
    if alpha is not None:
        if alpha.dtype != torch.float32 or alpha.requires_grad or not alpha.is_contiguous():
            alpha = alpha.detach().float().contiguous()
        if alpha.shape != (size[1],):
            raise ValueError(f"alpha has shape {tuple(alpha.shape)}, expected ({size[1]},)")
    return _View(g, size, stride, alpha)


@lru_cache(maxsize=256)
def _view_geometry(shape: tuple, stride: tuple, kind: str, rows_per_sample: int | None):
    """``(copy first, size, strides)`` of the ``_View`` of a G' of this shape and strides:
    validated and derived once per layout (views and permutes on every call are fixed cost
    per layer and step), on a meta tensor of the same layout."""
    if kind not in ("tensor", "sample", "channel"):
        raise ValueError(f"unknown grouping {kind!r}; expected 'tensor', 'sample' or 'channel'")
    g = torch.empty_strided(shape, stride, device="meta")
    copy = False
    if g.dim() == 4:
        n, o, h, w = g.shape
        if rows_per_sample not in (None, h * w):
            raise ValueError(f"an NCHW gradient has rows_per_sample = H*W = {h * w}, got {rows_per_sample}")
        try:
            g3 = g.view(n, o, h * w)
        except RuntimeError:
            copy = True
            g3 = g.contiguous().view(n, o, h * w)
        if kind == "channel" and h * w == 1:
            # Samples of one row are one sample on the channel grouping (reference.statistics_view).
            g3 = g3.permute(2, 1, 0)
    elif g.dim() == 2:
        rows, o = g.shape
        rps = rows_per_sample if kind == "sample" else rows
        if kind == "channel" and rows_per_sample not in (None, 1):
            rps = rows_per_sample   # the (sample, channel) pairs of reference.statistics_view
        if not rps or rows % rps:
            raise ValueError(f"{rows} rows do not split into samples of {rows_per_sample} rows")
        g3 = g.view(rows // rps, rps, o).permute(0, 2, 1)
    else:
        raise ValueError(f"G' must be NCHW or [rows, O], got shape {tuple(g.shape)}")
    return copy, tuple(g3.shape), g3.stride()


class SharedStatistics:
    """The statistics pass over one ``G'``, shared by its two SCQ paths: the per-sample groups
    (input path) and the per-channel groups (weight path) are both reductions of the same
    ``(sample, channel)`` pair minima and maxima (and pair sums of squares), so the kernel
    reads ``G'`` once for both; a linear layer's rows and columns (``_row_major``) come from
    one pass of the row/column kernel; a conv G' of short maps is copied row-major once for
    both (``_row_major_copy``). Made by the op computing both paths and dropped when
    it returns, so it never outlives the ``G'`` and alpha it was made for; a pass is reused
    only for the same view of the same memory."""

    def __init__(self):
        self._passes = {}

    def get(self, v: "_View", what: tuple, compute):
        """``compute()``, or its result for the same memory and alpha of ``G'`` and the same
        ``what`` (the pass and the layout it reads)."""
        key = (v.ptr, v.alpha_ptr(), what)
        if key not in self._passes:
            self._passes[key] = compute()
        return self._passes[key]


def group_min_max(g: torch.Tensor, kind: str, *, rows_per_sample: int | None = None,
                  alpha: torch.Tensor | None = None, target="host"):
    """Per-group ``(lo, hi)`` of ``G'`` (``reference.group_min_max``) from one kernel pass,
    or torch's reductions where each group's contiguous runs are short."""
    lo, hi, _ = _statistics(g, kind, rows_per_sample, alpha, target, sum_squares=False)
    return lo, hi


def _statistics(g, kind, rows_per_sample, alpha, target, *, sum_squares: bool,
                shared: SharedStatistics | None = None):
    """Per-group ``(lo, hi)`` and, with ``sum_squares``, the ``[n, o]`` pair sums of squares
    (``reference.pair_sum_squares``), from one kernel pass (``shared``'s, when given)."""
    return _view_statistics(_view(g, kind, rows_per_sample, alpha), kind, target, sum_squares=sum_squares,
                            shared=shared)


def _view_statistics(v: _View, kind: str, target, *, sum_squares: bool, shared: SharedStatistics | None = None):
    """``_statistics`` of ``v``, the ``_view`` of G' for grouping ``kind``."""
    tname = get_target(target).name
    matrix = _row_major(v, kind)
    if matrix is not None and not (sum_squares and kind == "channel"):
        rows, ld = matrix
        run = partial(_row_col_min_max, v, rows, ld, tname)
        rlo, rhi, clo, chi = shared.get(v, ("row_col", rows, v.channels, ld), run) if shared else run()
        if kind == "channel":
            return clo, chi, None
        if not sum_squares:
            return rlo, rhi, None
        # A row's (sample, channel) pairs are single elements: their sums of squares are the
        # squares, exact in float64 (reference.pair_sum_squares adds only zeros to them).
        rows_g = v.g[:, :, 0] if v.alpha is None else v.g[:, :, 0] * v.alpha
        return rlo, rhi, rows_g.double().square()
    if not sum_squares and (v.rps < MIN_KERNEL_RUN or v.strides[2] != 1):
        # Runs of one element or strided ones (a transposed G', samples of a few rows): the
        # kernel would reduce them element by element; torch's reductions vectorize across
        # the channels. min/max are exact and amin/amax propagate NaN, so the statistics are
        # the reference's (a zero as +0.0, as there). aq_opt's sums of squares keep the
        # kernel: their summation order is part of the definition.
        g = v.g if v.alpha is None else v.g * v.alpha.view(1, -1, 1)
        dims = {"tensor": (0, 1, 2), "sample": (1, 2), "channel": (0, 2)}[kind]
        return g.amin(dims).view(-1) + 0.0, g.amax(dims).view(-1) + 0.0, None
    run = partial(_min_max, v, tname, sum_squares)
    lo, hi, ss = shared.get(v, ("pairs", v.shape, v.strides, sum_squares), run) if shared else run()
    if kind == "tensor":
        return lo.amin().view(1), hi.amax().view(1), ss
    dim = 1 if kind == "sample" else 0
    return lo.amin(dim), hi.amax(dim), ss


def _row_major(v: _View, kind: str) -> tuple[int, int] | None:
    """``(rows, row stride)`` when ``v`` is a row-major ``[rows, O]`` matrix whose groups are
    its rows (samples of one row: a linear layer's input path, a conv's 1x1 maps) or its whole
    columns (the weight path of the same), else None."""
    if v.strides[1] != 1:
        return None
    if kind == "sample" and v.rps == 1:
        return v.n, v.strides[0]
    if kind == "channel" and v.n == 1:
        return v.rps, v.strides[2]
    return None


def _row_col_min_max(v: _View, rows: int, ld: int, target: str):
    """``(row lo, row hi, column lo, column hi)`` of the row-major matrix ``v`` from one pass
    of the row/column kernel: each thread's slice of rows writes its own column partials,
    reduced here."""
    o = v.channels
    slices = _slices(rows, pool.num_threads(None))
    rlo, rhi = torch.empty(rows), torch.empty(rows)
    # [lo/hi, slice, o]; one slice writes the column results directly
    clo, chi = (torch.empty(o), torch.empty(o)) if len(slices) == 1 else torch.empty(2, len(slices), o)
    fn, step = _fn("row_col_minmax", target), 4 * o
    pool.run([partial(fn, v.ptr, ld, v.alpha_ptr(), o, rlo.data_ptr(), rhi.data_ptr(),
                      clo.data_ptr() + i * step, chi.data_ptr() + i * step, r0, r1) for i, (r0, r1) in enumerate(slices)])
    if len(slices) == 1:
        return rlo, rhi, clo, chi
    return rlo, rhi, clo.amin(0), chi.amax(0)   # the kernel's zeros are all +0.0


@lru_cache(maxsize=256)
def _slices(rows: int, threads: int) -> tuple:
    """The row/column kernel's row slices, one per thread (whole 16-row units)."""
    return tuple(pool.split(rows, threads, 16)) or ((0, 0),)


def _min_max(v: _View, target: str, sum_squares: bool):
    pairs = v.n * v.channels
    lo, hi = torch.empty(pairs), torch.empty(pairs)
    ss = torch.empty(pairs, dtype=torch.float64) if sum_squares else None
    sn, so, si = v.strides
    lanes = min(gen.LANES if sum_squares else MINMAX_LANES, 1 << max(2, (v.rps - 1).bit_length()))
    parallel_rows(_fn("minmax", target, lanes=lanes, sum_squares=sum_squares), pairs, v.ptr, sn, so, si,
                  v.alpha_ptr(), v.channels, v.rps, lo.data_ptr(), hi.data_ptr(),
                  ss.data_ptr() if sum_squares else None, min_rows=8)
    lo, hi = lo.view(v.n, v.channels), hi.view(v.n, v.channels)
    ss = ss.view(v.n, v.channels) if sum_squares else None
    return lo, hi, ss


def sample_groups(g: torch.Tensor, method: str, path: str, bits: int, *, rows_per_sample: int | None = None,
                  seed: int, step: int, layer: int, alpha: torch.Tensor | None = None, target="host",
                  shared: SharedStatistics | None = None):
    """``(lo, hi, keep, prob)`` per group, as ``reference.sample_groups``; ``shared``: the
    statistics pass of this ``G'`` that the other path may already have run."""
    kind = reference.grouping(method, path)
    lo, hi, groups = _groups(_view(g, kind, rows_per_sample, alpha), kind, method, path, bits, seed=seed, step=step,
                             layer=layer, target=target, shared=shared)
    return lo, hi, torch.from_numpy(groups.keep), torch.from_numpy(groups.prob)


@dataclass
class _Groups:
    """What the ``aq_groups`` kernel gives per group of one path (numpy views of one buffer)."""

    keep: np.ndarray       # bool
    prob: np.ndarray       # float32, the keep probability the dequantization divides by
    sr_scale: np.ndarray   # float32 B / R (0 for R = 0), stochastic rounding's scale
    scale: np.ndarray      # float32 R / (B p)
    zero: np.ndarray       # float32 z / p
    sr_scale_ptr: int      # address of sr_scale, for the packing kernels


def _groups(v: _View, kind: str, method: str, path: str, bits: int, *, seed: int, step: int, layer: int,
            target, shared: SharedStatistics | None, stats=None) -> tuple[torch.Tensor, torch.Tensor, _Groups]:
    """``(lo, hi, per group tables)`` of the view ``v`` of G' for grouping ``kind``: the
    statistics pass, then the ``aq_groups`` kernel. For an AQ method it also makes the keep
    decisions (``reference.aq_keep``, as ``reference.keep_groups`` takes it on finite
    statistics): one call, where the same work as vector operations costs more in dispatch
    per layer and step than in arithmetic. Other methods and special (non-finite) groups
    take ``reference.keep_groups``. ``stats``: the ``(lo, hi, keep, prob)`` when known."""
    tname = get_target(target).name
    if stats is not None:
        lo, hi = (t.contiguous() for t in stats[:2])
        return lo, hi, _per_group(tname, lo, hi, bits, keep=stats[2].numpy(), prob=stats[3].numpy())
    if bits not in reference.BITS:
        raise ValueError(f"bits={bits} is not supported; expected one of {reference.BITS}")
    lo, hi, pairs = _view_statistics(v, kind, target, sum_squares=method == "aq_opt", shared=shared)
    scores = None if method == "aq_scq" else reference.sampling_scores(method, bits, lo, hi, pairs, kind, v.n * v.channels * v.rps)
    if method in reference.SAMPLED:
        key = rng.stream_key(seed, step, layer, reference.sample_stream(path))
        found = _per_group(tname, lo, hi, bits, scores=scores, key=key)
        if found is not None:
            return lo, hi, found
    keep, prob = reference.keep_groups(lo, hi, method, path, bits, seed=seed, step=step, layer=layer, scores=scores)
    return lo, hi, _per_group(tname, lo, hi, bits, keep=keep.numpy(), prob=prob.numpy())


_scratch = threading.local()


def _work(words: int) -> tuple[np.ndarray, int]:
    """This thread's int64 scratch of the ``aq_groups`` kernel (at least ``words``), as numpy
    and its address: kept across calls and grown only, as nothing of it outlives a call. A
    tensor: its ``data_ptr`` is no operator call, and the cross-target capture
    (``cross.verify``) finds the buffer through it."""
    work = getattr(_scratch, "work", None)
    if work is None or work.numel() < words:
        work = _scratch.work = torch.empty(max(words, 2 * work.numel() if work is not None else 0), dtype=torch.int64)
        _scratch.array = work.numpy()
    return _scratch.array, work.data_ptr()


def _per_group(tname: str, lo, hi, bits: int, *, scores=None, key: int = 0, keep=None, prob=None) -> _Groups | None:
    """The ``aq_groups`` kernel on float32 ``lo`` and ``hi``: deciding (float64 ``scores``,
    None for AQ's range scores; None returned when a group is special) when ``keep`` and
    ``prob`` are not given."""
    n = lo.numel()
    decide = keep is None
    # The outputs in one buffer behind one pointer: float32 prob, sr_scale, scale and zero,
    # then the keep bytes.
    raw = np.empty(17 * n, np.uint8)
    floats, keep_out = raw[:16 * n].view(np.float32).reshape(4, n), raw[16 * n:].view(np.bool_)
    if not decide:
        floats[0], keep_out[:] = prob, keep
    at, row = _ptr(raw), 4 * n
    work, scratch = _work(4 * n + 2)     # the kernel's scratch, then its status
    if scores is not None:
        scores = np.ascontiguousarray(scores.numpy(), np.float64)
    _fn("aq_groups", tname)(lo.data_ptr(), hi.data_ptr(), _ptr(scores) if scores is not None else None, n, bits, key,
                            int(decide), scratch, at, at + 16 * n, at + row, at + 2 * row, at + 3 * row,
                            scratch + 8 * (4 * n + 1))
    if work[4 * n + 1]:
        return None
    return _Groups(keep_out, *floats, sr_scale_ptr=at + row)


def _group_table(name: str, doc: str) -> property:
    """A ``BitplaneGradient`` property: its ``per_group`` table ``name`` as a tensor."""
    return property(lambda self: torch.from_numpy(getattr(self.per_group, name)), doc=doc)


@dataclass
class BitplaneGradient:
    """The kept groups of ``G'`` for one path as bit planes, ready for ``bitplane_gemm``.

    ``planes[t, m]`` holds bit ``t`` of the codes of kept row ``m``, packed along the path's
    contraction axis (``k`` bits: the O channels on the input path, the R rows on the weight
    path). Row ``m`` is output row ``row_map[m]`` (a G' row on the input path, a channel on
    the weight path; ascending in ``m``) of a ``[out_rows, ...]`` result, dequantized with
    ``row_scale[m]`` and ``row_zero[m]`` (``R/(B p)`` and ``z/p`` of the row's group).

    Per-sample groups on the weight path (``psq``) vary along its contraction, so there the
    rows are segments: row ``m = s*O + o`` is channel ``o`` over the ``k`` = H'W' rows of
    sample ``s`` only (``segments`` = N), for ``runtime.gemm.segmented_bitplane_gemm``."""

    planes: torch.Tensor     # int64 [bits, rows, ld]
    k: int
    row_map: torch.Tensor    # int64 [rows]
    row_scale: torch.Tensor  # float32 [rows]
    row_zero: torch.Tensor   # float32 [rows]
    out_rows: int
    kind: str                       # grouping: "tensor" | "sample" | "channel"
    per_group: _Groups              # per group tables, as tensors below
    segments: int = 1

    @property
    def bits(self) -> int:
        return self.planes.shape[0]

    # The per-group tables as tensors when asked for: the backward ops read only the per-row
    # ones, and a tensor made of a numpy array costs more per call than the arithmetic.
    keep = _group_table("keep", "bool [groups]")
    prob = _group_table("prob", "float32 [groups]")
    scale = _group_table("scale", "float32 [groups]")
    zero = _group_table("zero", "float32 [groups]")


def quantize_bitplanes(g: torch.Tensor, method: str, path: str, bits: int, *,
                       rows_per_sample: int | None = None, seed: int, step: int, layer: int,
                       alpha: torch.Tensor | None = None, stats=None, target="host",
                       shared: SharedStatistics | None = None) -> BitplaneGradient:
    """Quantize ``G'`` for one path (``reference.quantize_gradient``, same codes and keep
    decisions) straight into bit planes of the kept groups. ``stats``: the ``(lo, hi, keep,
    prob)`` of ``sample_groups`` when already computed; ``shared``: as ``sample_groups``."""
    kind = reference.grouping(method, path)
    if path not in (reference.PATH_INPUT, reference.PATH_WEIGHT):
        raise ValueError(f"path must be {reference.PATH_INPUT!r} or {reference.PATH_WEIGHT!r}, got {path!r}")
    tname = get_target(target).name
    v = _view(g, kind, rows_per_sample, alpha)
    lo, hi, per_group = _groups(v, kind, method, path, bits, seed=seed, step=step, layer=layer, target=target,
                                shared=shared, stats=stats)
    # The small per-row tables in numpy: a few operations on vectors of at most a few
    # thousand elements, where torch's per-operation dispatch costs more; the tables a
    # kernel reads during this call are written into this thread's scratch (_tables).
    keep_np, sr_scale = per_group.keep, per_group.sr_scale_ptr
    n, channels, rps = v.n, v.channels, v.rps
    src, (sn, so, si) = v.ptr, v.strides
    if path == reference.PATH_INPUT:
        # Sample s is group s ("sample") or all samples are group 0 ("tensor").
        kept = keep_np.nonzero()[0] if kind == "sample" else np.arange(n if keep_np[0] else 0)
        rows = kept if rps == 1 else (kept[:, None] * rps + np.arange(rps)).ravel()
        samples = rows if rps == 1 else rows // rps
        groups = samples if kind == "sample" else np.zeros(rows.size, np.int64)
        k, out_rows = channels, n * rps
        key = rng.stream_key(seed, step, layer, rng.STREAM_SR_INPUT)
        if so != 1 and si == 1 and rps >= 64:
            # Rows contiguous, channels strided (NCHW): 64-row tiles, bit-transposed.
            tiles = kept.size * -(-rps // 64)
            planes = buffers.empty((bits, rows.size, padded_words(k)), torch.int64)
            table, at = _tables(2, kept.size)
            table[0] = kept
            table[1] = kept if kind == "sample" else 0
            parallel_rows(_fn("pack_rows", tname, bits=bits), tiles, src, sn, so, si, v.alpha_ptr(), key,
                          lo.data_ptr(), sr_scale, at, at + 8 * kept.size,
                          channels, rps, planes.data_ptr(), rows.size, planes.shape[2], min_rows=2)
            return _result(planes, k, rows, groups, out_rows, kind, per_group)
        if so != 1:
            # Short rows (fewer than 64 per sample): one row-major copy of these few elements
            # beats gathering every row across channel planes.
            copied = _row_major_copy(v, shared)
            src, (sn, so, si) = copied.data_ptr(), copied.stride()
        m = rows.size
        table, at = _tables(4, m)   # per row: first element, first counter, group, channel
        if rps == 1:
            np.multiply(samples, sn, out=table[0])
        else:
            table[0] = samples * sn + (rows - samples * rps) * si
        np.multiply(rows, channels, out=table[1])
        table[2], table[3] = groups, 0
        layout = (1, channels, 0, so, 0, 1, 0, 1)   # nseg, seg_len, seg_stride, elem_stride, ctrs, ...
    elif kind == "sample":
        # One segment per (sample, channel): channel o over the sample's rps rows, counters
        # r*O + o of its rows r = s*rps + j, the sample's group.
        pairs = np.arange(n * channels)
        rows, groups = pairs % channels, pairs // channels
        m = rows.size
        table, at = _tables(4, m)
        table[0], table[1] = groups * sn + rows * so, groups * rps * channels + rows
        table[2], table[3] = groups, rows
        layout = (1, rps, 0, si, 0, channels, 0, 0)
        key = rng.stream_key(seed, step, layer, rng.STREAM_SR_WEIGHT)
        planes = _pack(tname, bits, src, v, key, lo, sr_scale, m, at, layout, rps)
        return _result(planes, rps, rows, groups, channels, kind, per_group, segments=n)
    else:
        # Channel o is group o ("channel") or all channels are group 0 ("tensor").
        rows = keep_np.nonzero()[0] if kind == "channel" else np.arange(channels if keep_np[0] else 0)
        groups = rows if kind == "channel" else np.zeros(rows.size, np.int64)
        k, out_rows = n * rps, channels
        key = rng.stream_key(seed, step, layer, rng.STREAM_SR_WEIGHT)
        if n > 1 and so != 1 and sn != rps * si and rps < 64:
            # Samples shorter than a word would waste most vector lanes on runs along r:
            # the input path's row-major copy of G' (made once for both), read by columns.
            copied = _row_major_copy(v, shared)
            src, (sn, so, si) = copied.data_ptr(), copied.stride()
        m = rows.size
        if so == 1 and si > 1 and (n == 1 or sn == rps * si):
            # Row-major G' (a linear layer's, or the copy above): its columns are read along
            # the rows, 64x64 tiles bit-transposed, rather than gathered one cache line per
            # element.
            planes = buffers.empty((bits, m, padded_words(k)), torch.int64)
            if kind == "channel" and m == channels:   # all kept: the tables as they are
                alpha_rows, row_lo, row_scale = v.alpha_ptr(), lo.data_ptr(), sr_scale
                table, at = _tables(1, m)
            else:
                # Per kept column: its group's lo and rounding scale and its alpha, float32
                # tables in the int64 rows after the column indices.
                table, at = _tables(3, m)
                floats = table[1:].reshape(-1).view(np.float32)[:3 * m].reshape(3, m)
                np.take(lo.numpy(), groups, out=floats[0])
                np.take(per_group.sr_scale, groups, out=floats[1])
                row_lo, row_scale, alpha_rows = at + 8 * m, at + 12 * m, None
                if v.alpha is not None:
                    np.take(v.alpha.numpy(), rows, out=floats[2])
                    alpha_rows = at + 16 * m
            table[0] = rows
            parallel_rows(_fn("pack_cols", tname, bits=bits), -(-k // 64), src, si, alpha_rows, key, row_lo,
                          row_scale, at, channels, k, planes.data_ptr(), m, planes.shape[2])
            return _result(planes, k, rows, groups, out_rows, kind, per_group)
        if n == 1 or sn == rps * si:
            layout = (1, n * rps, 0, si, 0, channels, 0, 0)
        else:
            layout = (n, rps, sn, si, rps * channels, channels, 0, 0)
        table, at = _tables(4, m)
        np.multiply(rows, so, out=table[0])
        table[1], table[2], table[3] = rows, groups, rows
    planes = _pack(tname, bits, src, v, key, lo, sr_scale, m, at, layout, k)
    return _result(planes, k, rows, groups, out_rows, kind, per_group)


def _row_major_copy(v: _View, shared: SharedStatistics | None) -> torch.Tensor:
    """``v.g`` copied row-major (``[n, rps, o]`` memory, NHWC for a conv's G'), viewed as
    ``v.g``; one copy for both paths when they share ``shared``."""
    def copy():
        return buffers.contiguous(v.g.permute(0, 2, 1)).permute(0, 2, 1)
    return shared.get(v, ("row_major_copy", v.shape, v.strides), copy) if shared else copy()


def _ptr(a: np.ndarray) -> int:
    return torch.from_numpy(a).data_ptr()   # cheaper than numpy's ctypes attribute


def _tables(count: int, m: int) -> tuple[np.ndarray, int]:
    """``count`` int64 tables of ``m`` rows in this thread's scratch, as an int64 ``[count, m]``
    array and its address: ``_work``'s buffer, as the ``aq_groups`` kernel has returned
    before they are written and a kernel reads them during one call only."""
    work, at = _work(count * m)
    return work[:count * m].reshape(count, m), at


def _pack(tname, bits, src: int, v: _View, key, lo, sr_scale: int, m: int, tables: int, layout, k) -> torch.Tensor:
    """``fqt_quantize_pack`` of G' at address ``src`` over the ``m`` rows of the four int64
    tables at address ``tables`` (first element, first counter, group, channel per row;
    ``_tables``), with the groups' rounding scales at address ``sr_scale``: planes
    ``[bits, rows, ld]``."""
    planes = buffers.empty((bits, m, padded_words(k)), torch.int64)
    if m:
        parallel_rows(_fn("pack", tname, bits=bits), m, src, v.alpha_ptr(), key, lo.data_ptr(),
                      sr_scale, tables, tables + 8 * m, tables + 16 * m, tables + 24 * m, *layout,
                      planes.data_ptr(), m, planes.shape[2], min_rows=4)
    return planes


def _result(planes, k, rows, groups, out_rows, kind, per_group: _Groups, segments=1) -> BitplaneGradient:
    """``rows``: the row map, as numpy or already a tensor."""
    t = torch.from_numpy
    return BitplaneGradient(planes, k, t(rows) if isinstance(rows, np.ndarray) else rows, t(per_group.scale[groups]),
                            t(per_group.zero[groups]), out_rows, kind, per_group, segments)
