"""Popcount GEMMs on torch tensors: argument checks, blocking, threading, kernel calls.

The kernels come from ``fqt_compiler.codegen.gemm`` (one compiled function per family,
epilogue and tile, cached by ``jit.compile_ir``). Each call splits the output into one slice
per thread along M (along N when M has fewer register tiles than threads) and runs the
slices on the persistent pool of ``runtime.threads``.
"""
from __future__ import annotations

import threading
from dataclasses import replace
from functools import partial
from typing import NamedTuple

import numpy as np
import torch

from ..codegen import gemm as codegen
from ..codegen.targets import Target, get_target
from ..ops.reference import BITS
from . import buffers, jit, threads as pool
from .packed import PackedBits

# Cache sizes the blocking is chosen for (per core, conservative for Zen/Intel/Cortex-A7x):
# an A panel plus a B tile of one K block stay in L1, the B block of one N block in L2.
L1_BYTES = 32 * 1024
L2_BYTES = 512 * 1024
SINGLE_BLOCK_WORDS = 512  # up to 32768 bits of K: no K blocking, no partial-sum scratch


_GENERATORS = {"binary": codegen.binary_gemm_ir, "bitplane": codegen.bitplane_gemm_ir,
               "rowpop": codegen.row_popcount_ir}


def _kernel(family: str, target: Target, **options):
    return jit.kernel_of(family, target, _GENERATORS[family], **options)


# A panel kernel is built for K's word count when its tile takes at most this many K steps
# (words x planes): fully unrolled, more steps cost more in code size than the loop they
# save (benchmarked on Zen 3: binary GEMMs gain up to 8 words, 4-plane ones up to 2).
FIXED_K_STEPS = 8


def _default_tile(m: int, n: int, k: int, target: Target, planes: int = 1):
    """The register tile for an ``M x N x K`` GEMM over ``planes`` bit planes of A: the
    across-N kernel where ``_use_panel``, built for K's word count where that is short."""
    if not _use_panel(m, n, k):
        return codegen.default_tile(target)
    words = max(1, (k + 63) // 64)
    return replace(codegen.default_panel_tile(target), words=words if words * planes <= FIXED_K_STEPS else 0)


class _Plan(NamedTuple):
    """What a GEMM call derives from its shape, target and options alone, made once per
    shape (``_plan``): a layer calls the same three GEMMs every step, and choosing the
    tile, blocking and slices and looking up the kernel each time is fixed cost that small
    layers notice."""

    kernel: object
    words: int                   # words contracted per row
    kc: int                      # along-K kernel: words per K block, B rows per N block
    nc: int
    slices: tuple                # ((m0, m1, n0, n1), ...): one per thread
    scratch: tuple | None        # panel kernel: int64 scratch words per slice


_plans: dict = {}
MAX_PLANS = 4096                 # shapes that vary from step to step: start afresh past this
_NO_PARTIAL = torch.empty(0, dtype=torch.int32)   # the along-K kernel without K blocking


def _cached(key: tuple, make):
    """``_plans[key]``, made by ``make()`` on a miss. While a ``jit.kernel_hook`` is active
    nothing is cached or served from the cache: the hook sees every kernel request."""
    hooked = jit.hooked()
    plan = None if hooked else _plans.get(key)
    if plan is None:
        plan = make()
        if not hooked:
            if len(_plans) >= MAX_PLANS:
                _plans.clear()
            _plans[key] = plan
    return plan


def _plan(family: str, m: int, n: int, k: int, target, tile, threads: int, **options) -> _Plan:
    """The ``_Plan`` of one call of a GEMM family, cached on its arguments as given (the
    target's name or ``Target``)."""
    return _cached((family, m, n, k, target, tile, threads, *options.items()),
                   lambda: _make_plan(family, m, n, k, get_target(target), tile, threads, options))


def _make_plan(family: str, m: int, n: int, k: int, target: Target, tile, threads: int, options: dict) -> _Plan:
    tile = tile or _default_tile(m, n, k, target, options.get("bits", 1))
    vector_words = _vector_words(k, target, tile)
    words = _contract_words(k, vector_words, tile)
    kernel = _kernel(family, target, tile=tile, vector_words=vector_words, **options)
    slices = tuple(_slices(m, n, tile, threads))
    if isinstance(tile, codegen.PanelTile):
        planes = options.get("bits", 1)
        scratch = tuple(codegen.panel_scratch_words(tile, words, n1 - n0, planes) for _, _, n0, n1 in slices)
        return _Plan(kernel, words, 0, 0, slices, scratch)
    return _Plan(kernel, words, *_blocking(words, tile), slices, None)


def _workspace(plan: _Plan, m: int, n: int) -> list[torch.Tensor]:
    """Per slice: the panel kernel's scratch, or the along-K kernel's int32 partial-sum
    matrix (shared: slices are disjoint), empty when K needs no blocking."""
    if plan.scratch is not None:
        return _panel_scratch(list(plan.scratch))
    partial = buffers.empty((m, n), torch.int32) if plan.kc < plan.words else _NO_PARTIAL
    return [partial] * len(plan.slices)


def _vector_words(k: int, target: Target, tile=None) -> int:
    """The vector width that contracts ``k`` bits in the fewest datapath cycles, widest on ties.

    K is padded to whole vectors, so a short contraction (the input gradient contracts over
    64..512 channels; 576 bits is 9 words) can be mostly padding at 512 bits. Cost model: a
    step of ``w`` words takes ``max(w, 4) / 4`` cycles, as on 256-bit datapaths (AVX2 cores,
    Zen 4 running 512-bit ops in two halves), where 128-bit ops waste half the pipe.
    The panel kernel's vectors run across N: always the widest."""
    words = max(1, (k + 63) // 64)
    choices = codegen.vector_word_choices(target)
    if isinstance(tile, codegen.PanelTile):
        return choices[-1]
    return min(reversed(choices), key=lambda w: -(-words // w) * max(w, 4))


def _contract_words(k: int, vector_words: int, tile=None) -> int:
    """Words the kernels contract over: all words holding bits of ``k``, rounded up to whole
    vectors for the along-K kernel (the padding words are zero, so they add nothing)."""
    if isinstance(tile, codegen.PanelTile):
        words = max(1, (k + 63) // 64)
        if tile.words not in (0, words):
            raise ValueError(f"tile {tile} is built for K of {tile.words} words; K={k} takes {words}: pass "
                             f"PanelTile({tile.mr}, {tile.nv}, words={words}) or words=0 (K at run time)")
        return words
    return max(vector_words, -(-((k + 63) // 64) // vector_words) * vector_words)


def _check_words(name: str, words: torch.Tensor, need: int) -> None:
    if words.device.type != "cpu":
        raise ValueError(f"{name} is on {words.device}; the kernels run on CPU tensors")
    if words.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous along its words (call .contiguous())")
    if words.shape[-1] < need:
        raise ValueError(f"{name} has {words.shape[-1]} words per row, the kernel reads {need}; "
                         f"pad rows to packed.padded_words(k) words (PackedBits.from_bool does)")


def _check_vector(name: str, t, n: int, dtype) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape ({n},) and dtype {dtype}, got {type(t).__name__}")
    if t.shape != (n,) or t.dtype != dtype:
        raise ValueError(f"{name} must have shape ({n},) and dtype {dtype}, got {tuple(t.shape)} {t.dtype}")
    return t.contiguous()


def _blocking(words: int, tile: codegen.Tile) -> tuple[int, int]:
    """``(kc, nc)``: words per K block and B rows per N block."""
    kc = words if words <= SINGLE_BLOCK_WORDS else 256
    nc = max(tile.nr, L2_BYTES // (kc * 8) // tile.nr * tile.nr)
    return kc, nc


# Across-N ("panel") kernel rule. Every row tile streams B's transposed panel (words x N
# int64, at most 80 x 512 x 8 = 320 KiB: within L2), and the along-K kernel's per-tile
# shuffle-tree reduction and K padding cost most at narrow N and short K. Each call first
# transposes B into the panel (scalar, about N x words cycles), which a GEMM of few rows does
# not amortize. The thresholds come from benchmarks/bench_gemm.py on conv training shapes:
# the panel kernel wins at narrow N and short K for many rows, and at few rows only when K is
# short enough for the pack to be cheap. A short K also lets it serve a wide N as long as
# the panel fits in L2: the last stage's weight gradients (K = batch x 2 x 2 positions, N =
# 9 C_in up to 4608), where the along-K kernel runs a K of two vectors per tile.
PANEL_MAX_N = 512             # unless K is short and the panel fits in L2
PANEL_MAX_WORDS = 80
PANEL_MIN_ROWS = 256          # unless K is short
PANEL_SHORT_WORDS = 16


def _use_panel(m: int, n: int, k: int) -> bool:
    """Whether the across-N kernel serves an ``M x N x K`` GEMM: K <= 80 words (5120 bits),
    N <= 512 outputs (or K <= 16 words with the ``words x N`` int64 panel within L2) and
    M >= 256 rows or K <= 16 words: every conv GEMM of VGG-16 and ResNet-18 training at
    batch 128 but the last stage's few-row, long-K ones, and not the M = N = 1024,
    K = 4096 case the along-K kernel is tuned for."""
    words = (k + 63) // 64
    short = words <= PANEL_SHORT_WORDS
    narrow = n <= PANEL_MAX_N or (short and words * n * 8 <= L2_BYTES)
    return narrow and words <= PANEL_MAX_WORDS and (m >= PANEL_MIN_ROWS or short)


_scratch = threading.local()


def _panel_scratch(need: list[int]) -> list[torch.Tensor]:
    """One int64 scratch of ``need[i]`` words per slice (each thread packs its own panel).
    The buffers persist per calling thread and grow only: no allocation per call, and a
    call's scratch never takes the address of a tensor freed during the step."""
    buffers = getattr(_scratch, "panels", None)
    if buffers is None:
        buffers = _scratch.panels = []
    out = []
    for i, words in enumerate(need):
        if i == len(buffers):
            buffers.append(torch.empty(0, dtype=torch.int64))
        if buffers[i].numel() < words:
            buffers[i] = torch.empty(max(words, 2 * buffers[i].numel()), dtype=torch.int64)
        out.append(buffers[i])
    return out


def _slices(m: int, n: int, tile, threads: int) -> list[tuple[int, int, int, int]]:
    nr = tile.nr if isinstance(tile, codegen.Tile) else tile.nv * 8
    if -(-m // tile.mr) >= threads or -(-n // nr) < threads:
        return [(lo, hi, 0, n) for lo, hi in pool.split(m, threads, tile.mr)]
    return [(0, m, lo, hi) for lo, hi in pool.split(n, threads, nr)]


def _popcount_plan(k: int, target) -> tuple[object, int]:
    """``(row popcount kernel, words it reads per row)`` for rows of ``k`` bits, cached. The
    kernel is the target's widest one for every ``k`` (rows are padded to whole 512-bit vectors,
    so the words it reads past ``k`` exist and are zero): a row popcount is a small pass next to
    the GEMM it serves, and a width chosen per ``k`` would make a new batch size, which changes a
    weight gradient's K, request a new kernel."""
    def make():
        t = get_target(target)
        vector_words = codegen.vector_word_choices(t)[-1]
        return _kernel("rowpop", t, vector_words=vector_words), _contract_words(k, vector_words)
    return _cached(("rowpop", k, target), make)


def _row_popcounts(planes: torch.Tensor, words: int, kernel) -> torch.Tensor:
    """int32 ``sum_t 2^t popcount(planes[t, r, :words])`` per row ``r``."""
    nplanes, rows, _ = planes.shape
    out = torch.empty(rows, dtype=torch.int32)
    if rows:
        kernel(planes.data_ptr(), planes.stride(0), nplanes, planes.stride(1), rows, words, out.data_ptr())
    return out


def signed_row_sums(b: PackedBits, *, target: str | Target = "host") -> torch.Tensor:
    """float32 ``sum_k (±1)[r, k]`` of each row of a packed ±1 matrix: ``2 popcount - k``
    (the column sums of the dequantization epilogue, docs/math.md §4)."""
    kernel, words = _popcount_plan(b.k, target)
    _check_words("b.words", b.words, words)
    pop = _row_popcounts(b.words.unsqueeze(0), words, kernel).numpy()
    # In numpy: three torch ops on a vector of a few hundred elements cost more in dispatch.
    return torch.from_numpy((2 * pop - b.k).astype(np.float32))


def binary_gemm(a: PackedBits, b: PackedBits, *, scale: torch.Tensor | None = None,
                bias: torch.Tensor | None = None, out_hw: int | None = None,
                out: torch.Tensor | None = None, target: str | Target = "host",
                threads: int | None = None, tile: codegen.Tile | None = None) -> torch.Tensor:
    """±1 x ±1 GEMM of packed operands: ``a`` M x K, ``b`` N x K -> ``dot[m, n] = sum_k a b``.

    Without ``scale`` the result is int32 M x N (exactly ``reference.binary_gemm``). With
    ``scale`` (float32 [N], the per-output-channel alpha) it is float32
    ``dot * scale[n] (+ bias[n])``. ``out_hw``: the rows are ``(sample, h', w')`` of a conv
    with ``h' w' = out_hw``; the result is laid out ``[M / out_hw, N, out_hw]`` (NCHW with the
    spatial dims flattened) instead of M x N, with no extra permute. ``out``: a contiguous
    tensor of the result's shape and dtype to write into. ``threads`` defaults to
    ``torch.get_num_threads()``; ``tile`` overrides the target's register tile."""
    if not isinstance(a, PackedBits) or not isinstance(b, PackedBits):
        raise TypeError(f"a and b must be PackedBits (pack with PackedBits.from_bool or "
                        f"fqt.runtime.pack_signs), got {type(a).__name__} and {type(b).__name__}")
    if a.k != b.k:
        raise ValueError(f"a.k={a.k} and b.k={b.k} differ: both operands must be packed along the "
                         f"same contraction axis (a: M x K, b: N x K)")
    if bias is not None and scale is None:
        raise ValueError("bias needs scale (pass scale=torch.ones(N) for a bias alone)")
    m, n, k = a.rows, b.rows, a.k
    if scale is not None:
        scale = _check_vector("scale", scale, n, torch.float32)
    if bias is not None:
        bias = _check_vector("bias", bias, n, torch.float32)
    dtype = torch.int32 if scale is None else torch.float32
    if out_hw is None:
        shape, hw, s_blk, s_row, s_col = (m, n), 1, n, 0, 1
    else:
        if out_hw < 1 or m % out_hw:
            raise ValueError(f"out_hw={out_hw} must be positive and divide M={m} (rows = samples x h' w')")
        shape, hw, s_blk, s_row, s_col = (m // out_hw, n, out_hw), out_hw, n * out_hw, 1, out_hw
    if out is None:
        out = buffers.empty(shape, dtype)
    elif out.shape != shape or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {dtype} tensor of shape {shape}, got "
                         f"{tuple(out.shape)} {out.dtype}{'' if out.is_contiguous() else ' (strided)'}")
    if m == 0 or n == 0:
        return out
    epilogue = "int32" if scale is None else ("scale" if bias is None else "scale_bias")
    plan = _plan("binary", m, n, k, target, tile, pool.num_threads(threads), epilogue=epilogue)
    _check_words("a.words", a.words, plan.words)
    _check_words("b.words", b.words, plan.words)
    kernel, words, kc, nc = plan.kernel, plan.words, plan.kc, plan.nc
    args = (a.words.data_ptr(), a.words.stride(0), b.words.data_ptr(), b.words.stride(0))
    tail = (n, k, out.data_ptr(), hw, s_blk, s_row, s_col, scale.data_ptr() if scale is not None else None,
            bias.data_ptr() if bias is not None else None)

    workspace = _workspace(plan, m, n)     # alive until the kernels are done
    pool.run([partial(kernel, *args, *s, words, kc, nc, w.data_ptr(), *tail) for s, w in zip(plan.slices, workspace)])
    return out


def bitplane_gemm(planes: torch.Tensor, b: PackedBits, *, row_scale: torch.Tensor,
                  row_zero: torch.Tensor, row_map: torch.Tensor, out_rows: int,
                  colsum: torch.Tensor | None = None, out: torch.Tensor | None = None,
                  target: str | Target = "host", threads: int | None = None,
                  tile: codegen.Tile | None = None) -> torch.Tensor:
    """Bit-plane GEMM with the dequantization epilogue of docs/math.md §4, over kept groups only.

    ``planes``: int64 ``[bits, M, ld]`` (bits in 1, 2, 4, 8), plane ``t`` holding bit ``t`` of
    the b-bit codes of the M kept rows, packed along K like ``b`` (N x K, ±1 bits). Writes
    float32 ``out[row_map[m], n] = row_scale[m] * dot[m, n] + row_zero[m] * colsum[n]`` with
    ``dot = sum_k code[m, k] * (±1)[n, k]``, and 0 to the rows not in ``row_map`` (the pruned
    groups; the kernel writes them, so ``out`` needs no zeroing first), and returns ``out``
    ``[out_rows, N]`` (a new tensor when None). ``row_map`` int64 [M], strictly ascending
    values in ``[0, out_rows)``; ``row_scale``/``row_zero`` float32 [M] (``R/(B p)`` and ``z/p``);
    ``colsum``: float32 [N], the ±1 row sums of ``b``, computed when None.

    Input-gradient path: rows = rows of kept samples, ``b`` = binarized weights packed along
    output channels. Weight-gradient path: rows = kept channels, ``b`` = binarized inputs
    packed along im2col rows."""
    if not isinstance(b, PackedBits):
        raise TypeError(f"b must be PackedBits, got {type(b).__name__}")
    if not isinstance(planes, torch.Tensor) or planes.dtype != torch.int64 or planes.dim() != 3:
        raise TypeError(f"planes must be an int64 tensor [bits, M, ld], got "
                        f"{getattr(planes, 'dtype', type(planes).__name__)} {tuple(getattr(planes, 'shape', ()))}")
    bits, m, _ = planes.shape
    if bits not in BITS:
        raise ValueError(f"planes has {bits} planes; expected one of {BITS}")
    n, k = b.rows, b.k
    row_scale = _check_vector("row_scale", row_scale, m, torch.float32)
    row_zero = _check_vector("row_zero", row_zero, m, torch.float32)
    row_map = _check_vector("row_map", row_map, m, torch.int64)
    _check_row_map(row_map.numpy(), out_rows)
    if out is None:
        out = buffers.empty((out_rows, n))
    elif out.shape != (out_rows, n) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 tensor of shape ({out_rows}, {n}), got "
                         f"{tuple(out.shape)} {out.dtype}")
    if colsum is not None:
        colsum = _check_vector("colsum", colsum, n, torch.float32)
    if m == 0 or n == 0:
        return out.zero_()
    plan = _plan("bitplane", m, n, k, target, tile, pool.num_threads(threads), bits=bits)
    _check_words("planes", planes, plan.words)
    _check_words("b.words", b.words, plan.words)
    if colsum is None:
        colsum = signed_row_sums(b, target=target)
    pop_kernel, pop_words = _popcount_plan(k, target)
    rowpop = _row_popcounts(planes, pop_words, pop_kernel)
    kernel, words, kc, nc = plan.kernel, plan.words, plan.kc, plan.nc
    args = (planes.data_ptr(), planes.stride(0), planes.stride(1), b.words.data_ptr(), b.words.stride(0))
    tail = (n, out.data_ptr(), n, row_map.data_ptr(), row_scale.data_ptr(), row_zero.data_ptr(),
            rowpop.data_ptr(), colsum.data_ptr(), m, out_rows)

    workspace = _workspace(plan, m, n)     # alive until the kernels are done
    pool.run([partial(kernel, *args, *s, words, kc, nc, w.data_ptr(), *tail) for s, w in zip(plan.slices, workspace)])
    return out


def _check_row_map(rows: np.ndarray, out_rows: int) -> None:
    """``row_map`` must ascend strictly within ``[0, out_rows)``: the kernel zeroes the
    output rows between consecutive entries (numpy: a few operations on a short vector)."""
    if rows.size and (rows[0] < 0 or rows[-1] >= out_rows or (rows[1:] <= rows[:-1]).any()):
        raise ValueError(f"row_map values must ascend strictly within [0, out_rows={out_rows}) (the kept "
                         f"rows in order, as quantize_bitplanes gives them), got {rows.tolist()[:8]}"
                         f"{' ...' if rows.size > 8 else ''}")


def segmented_bitplane_gemm(planes: torch.Tensor, segments: list[PackedBits], *, row_scale: torch.Tensor,
                            row_zero: torch.Tensor, target: str | Target = "host",
                            threads: int | None = None) -> torch.Tensor:
    """A bit-plane GEMM whose contraction is split into segments, each with its own
    dequantization: float32 ``out[o, n] = sum_s row_scale[s*O + o] * dot_s[o, n] +
    row_zero[s*O + o] * colsum_s[n]``, where ``dot_s`` contracts rows ``s*O .. s*O + O - 1`` of
    ``planes`` (``[bits, S*O, ld]``) with ``segments[s]`` (N x k_s ±1 bits) and ``colsum_s``
    is that segment's ±1 row sums. This is the weight gradient of per-sample groups (``psq``),
    whose scale varies along the contraction over rows r and so cannot leave a single GEMM
    (docs/math.md §3-4): one ``bitplane_gemm`` per sample segment, summed."""
    if not segments or planes.shape[1] % len(segments):
        raise ValueError(f"planes has {planes.shape[1]} rows, not a whole number of rows for each of "
                         f"{len(segments)} segments")
    o = planes.shape[1] // len(segments)
    n = segments[0].rows
    out, part = torch.zeros(o, n), torch.empty(o, n)
    row_map = torch.arange(o)
    for s, b in enumerate(segments):
        rows = slice(s * o, (s + 1) * o)
        bitplane_gemm(planes[:, rows], b, row_scale=row_scale[rows], row_zero=row_zero[rows], row_map=row_map,
                      out_rows=o, out=part, target=target, threads=threads)
        out += part
    return out
