"""LLVM IR for the two popcount GEMM families of docs/math.md §3 (one generator per family).

Both families share one register-blocked micro-kernel: an ``mr x nr`` tile of output
elements, each with its own vector accumulator held in a register across the K loop, over
operands packed as ``PackedBits`` (rows of 64-bit words, zero past ``k``). The zero padding
is what makes the K tail exact without masks: the loop always runs over whole vectors.

* ``binary_gemm_ir``: ±1 x ±1, ``dot = K - 2 popcount(a XOR b)``; epilogue ``int32``
  (the dot product) or ``scale``/``scale_bias`` (float32 ``dot * scale[n] (+ bias[n])``)
  stored through an affine output layout, so a conv can write NCHW directly.
* ``bitplane_gemm_ir``: ``bits`` planes of {0,1} codes x ±1,
  ``dot = 2 sum_t 2^t popcount(a_t AND b) - rowpop[m]``, with the dequantization epilogue of
  docs/math.md §4 writing float32 row ``row_map[m]`` of the output (``row_map`` ascending)
  and zeros to the rows between (the pruned groups'), so the output needs no memset first.
* ``row_popcount_ir``: ``sum_t 2^t popcount(row of plane t)``, the ``rowpop`` / column-sum
  input of the bit-plane epilogue.

Kernel loop nest (all bounds are arguments, so one compiled kernel serves every shape and
every thread's slice of the output): K blocks of ``kc`` words (partial sums go through an
int32 scratch matrix between blocks) > blocks of ``nc`` B rows (kept hot in L2) > ``mr`` rows
of A (kept hot in L1) > ``nr`` rows of B. Tiles at the M/N edge clamp their row pointers to the
last valid row and mask the stores that fall outside, so there is no remainder kernel. At the
end of a tile a shuffle tree turns each row's ``nr`` accumulators into vectors of per-column
totals, so the epilogue runs on whole vectors (a short K leaves few steps per tile to
amortize it). The vector width is a parameter: x86 kernels for a short K use 128- or 256-bit
vectors instead of padding K to 512 bits.

Across-N kernel (``PanelTile``, same signatures, same families): for narrow N and short K
the vectors hold one K word of several output *columns* instead of several words of one
column: B's rows are transposed into a small panel in the ``partial`` scratch, each A word
is broadcast (on AVX2 once per row tile, into the same scratch), and the accumulators end as
per-column 64-bit lane sums with no reduction and no K padding (see ``_panel_body``); a row's
``nv`` column vectors then go through the epilogue as one vector. A panel tile may fix K's
word count at build time (``PanelTile.words``, up to ``FIXED_WORDS_MAX``): the K loop is
unrolled and each plane's byte sums are flushed once, for the K of a few words (ViT's 192
features) where the loop, its flushes and their spills cost as much as the popcounts.

How one vector of words is popcounted and accumulated depends on the target (``_Popcount``):
a 64-bit lane popcount where it is one instruction (AVX-512 VPOPCNTDQ); byte popcounts
summed in byte lanes for up to 31 steps and then widened (``vpsadbw`` on x86, ``uaddlp`` on
NEON) where the lane popcount is a multi-instruction lookup; ``udot`` against ones on NEON
with dotprod.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from llvmlite import ir

from ..ops.reference import BITS
from .abi import KernelIR
from .builder import (F32, I1, I8, I32, I64, PTR, Kernel, call, const_splat, gep, i64, intrinsic, masked_load,
                      masked_scatter, masked_store, new_module, smin, splat, vec)
from .targets import Target, get_target

EPILOGUES = ("int32", "scale", "scale_bias")


@dataclass(frozen=True)
class Tile:
    """Register tile: ``mr`` rows of A by ``nr`` rows of B, one accumulator each."""

    mr: int
    nr: int

    def __post_init__(self):
        if not (1 <= self.mr <= 16 and 1 <= self.nr <= 16):
            raise ValueError(f"tile {self.mr}x{self.nr}: mr and nr must be in 1..16")

    def __str__(self) -> str:
        return f"{self.mr}x{self.nr}"


def default_tile(target: str | Target) -> Tile:
    """The tile that fits the target's register file without spilling accumulators.

    AVX-512 has 32 vector registers: 24 accumulators + 4 A vectors + temporaries. AVX2 has
    16, and its byte-lookup popcount needs a table, a nibble mask and temporaries, leaving
    room for 8 byte accumulators. NEON has 32 128-bit registers."""
    t = get_target(target)
    if t.is_x86:
        return Tile(3, 8) if t.vector_bits == 512 else Tile(2, 4)
    return Tile(4, 4)


@dataclass(frozen=True)
class PanelTile:
    """Register tile of the across-N kernel: ``mr`` rows of A by ``nv`` vectors of columns
    (``nv * lanes`` outputs, one 64-bit lane per output column). ``words``: 0 for a kernel
    taking the K word count at run time; 1..``FIXED_WORDS_MAX`` for one built for exactly that
    many words, its K loop unrolled (a K of a few words leaves the loop control, the chunked
    byte-accumulator flushes and their spills as much work as the popcounts)."""

    mr: int
    nv: int
    words: int = 0

    def __post_init__(self):
        if not (1 <= self.mr <= 16 and 1 <= self.nv <= 8):
            raise ValueError(f"panel tile {self.mr}x{self.nv}: mr in 1..16, nv in 1..8")
        if not 0 <= self.words <= FIXED_WORDS_MAX:
            raise ValueError(f"panel tile words={self.words}: 0 (K at run time) or 1..{FIXED_WORDS_MAX}")

    def __str__(self) -> str:
        return f"p{self.mr}x{self.nv}" + (f"k{self.words}" if self.words else "")


# The widest K a fixed-K panel kernel is built for: below the byte accumulators' 31 steps, so
# each plane's sums need one flush.
FIXED_WORDS_MAX = 8


def default_panel_tile(target: str | Target) -> PanelTile:
    """Tile of the across-N kernel. ``mr`` is a power of two so that a conv's h' w' (a power
    of two in VGG/ResNet) holds whole tiles and NCHW tiles are stored as transposed runs of
    ``mr`` rows (8 floats = one 256-bit store on AVX-512). AVX-512: 8x2 (16 accumulators),
    chosen with benchmarks/bench_gemm.py on conv training shapes for its NCHW stores; AVX2
    4x2 (16 registers: the 8 byte accumulators, the B vectors, the broadcast A word and
    the lookup table and nibble mask; the wide accumulators, touched once per 31 steps,
    live on the stack), chosen the same way on Zen 3 over 4x1, 8x1 and 2x2; NEON
    (32 registers) 4x4."""
    t = get_target(target)
    if t.is_x86:
        return PanelTile(8, 2) if t.vector_bits == 512 else PanelTile(4, 2)
    return PanelTile(4, 4)


# --------------------------------------------------------------------------- popcount schemes

def vector_word_choices(target: str | Target) -> tuple[int, ...]:
    """Vector widths (in 64-bit words) a kernel can use on the target. x86 has 128, 256 and
    (AVX-512) 512-bit forms of every instruction used, so a short K need not pad to 512 bits;
    the NEON schemes are written for 128-bit registers."""
    t = get_target(target)
    if not t.is_x86:
        return (2,)
    return tuple(w for w in (2, 4, 8) if w * 64 <= max(128, t.vector_bits))


def _broadcast_once(target: Target) -> bool:
    """Whether the panel kernel broadcasts A words once per row tile into scratch instead of
    once per K step of every column tile. AVX2 has no broadcast memory operand, and Zen runs
    a broadcast load on the vector shuffle pipes the nibble lookup saturates (llvm-mca
    -mcpu=znver3: a p4x2 panel step 23.7 -> 16.1 cycles with plain loads). AVX-512 folds the
    broadcast into the XOR/AND; NEON's ``ld1r`` runs on the load pipes."""
    return target.is_x86 and target.vector_bits < 512


def panel_scratch_words(tile: PanelTile, words: int, columns: int, planes: int) -> int:
    """int64 words of ``partial`` scratch the panel kernel takes for ``columns`` outputs
    ``[n0, n1)``: B's transposed panel, then the broadcast A words of one row tile. Sized for
    8-word vectors whatever the target: a host build may stand in for a target kernel
    (``cross.verify``), and its vectors and broadcast scheme are the host's."""
    return words * (-(-columns // 8) * 8 + planes * tile.mr * 8)


class _Popcount:
    """Accumulates popcounts of ``words``-word vectors.

    ``step`` adds the popcount of one vector into a narrow accumulator that may only take
    ``chunk`` steps (None: unbounded) before ``flush`` adds it into a wide accumulator;
    ``total`` reduces a wide accumulator to an i64 scalar."""

    def __init__(self, target: Target, module: ir.Module, words: int | None):
        self.module = module
        self.x86 = target.is_x86
        allowed = vector_word_choices(target)
        self.words = words or allowed[-1]
        if self.words not in allowed:
            raise ValueError(f"vector_words={words}: target {target.name!r} takes one of {allowed}")
        self.word_vec = vec(self.words)
        self.broadcast_once = _broadcast_once(target)
        nbytes = self.words * 8
        self.byte_vec = vec(nbytes, I8)
        if target.native_vector_popcount:
            # vpopcntq: one instruction per 64-bit lane, accumulate lanes directly.
            self.kind, self.chunk = "lanes", None
            self.narrow = self.wide = self.word_vec
        elif target.is_aarch64 and target.has("dotprod"):
            self.kind, self.chunk = "udot", None
            self.narrow = self.wide = vec(4, I32)
        else:
            # A byte lane holds at most 255: 31 steps of at most 8 set bits.
            self.kind, self.chunk = "bytes", 31
            self.narrow = self.byte_vec
            self.wide = self.word_vec if self.x86 else vec(4, I32)

    def zero(self, ty):
        return ir.Constant(ty, None)

    def step(self, b: ir.IRBuilder, acc, x):
        if self.kind == "lanes":
            pop = b.call(intrinsic(self.module, f"llvm.ctpop.v{self.words}i64", self.word_vec,
                                    self.word_vec), [x])
            return b.add(acc, pop)
        bytes_ = b.bitcast(x, self.byte_vec)
        pop = b.call(intrinsic(self.module, f"llvm.ctpop.v{self.byte_vec.count}i8", self.byte_vec,
                                self.byte_vec), [bytes_])
        if self.kind == "udot":
            udot = intrinsic(self.module, "llvm.aarch64.neon.udot.v4i32.v16i8", self.narrow,
                              self.narrow, self.byte_vec, self.byte_vec)
            return b.call(udot, [acc, pop, const_splat(self.byte_vec, 1)])
        return b.add(acc, pop)

    def flush(self, b: ir.IRBuilder, wide, narrow):
        if self.kind != "bytes":
            return b.add(wide, narrow)
        if self.x86:
            n = self.byte_vec.count
            name = {16: "llvm.x86.sse2.psad.bw", 32: "llvm.x86.avx2.psad.bw",
                    64: "llvm.x86.avx512.psad.bw.512"}[n]
            sad = b.call(intrinsic(self.module, name, self.word_vec, self.byte_vec, self.byte_vec),
                         [narrow, self.zero(self.byte_vec)])
            return b.add(wide, sad)
        v8i16 = vec(8, ir.IntType(16))
        l1 = b.call(intrinsic(self.module, "llvm.aarch64.neon.uaddlp.v8i16.v16i8", v8i16,
                               self.byte_vec), [narrow])
        l2 = b.call(intrinsic(self.module, "llvm.aarch64.neon.uaddlp.v4i32.v8i16", self.wide,
                               v8i16), [l1])
        return b.add(wide, l2)

    def per_word(self, b: ir.IRBuilder, wide):
        """A wide accumulator as one i64 lane per 64-bit word lane (NEON's i32 lanes hold the
        halves of a word: one more pairwise widening add)."""
        if wide.type == self.word_vec:
            return wide
        fn = intrinsic(self.module, "llvm.aarch64.neon.uaddlp.v2i64.v4i32", self.word_vec, self.wide)
        return b.call(fn, [wide])

    def total(self, b: ir.IRBuilder, wide):
        et = self.wide.element
        red = b.call(intrinsic(self.module, f"llvm.vector.reduce.add.v{self.wide.count}{et}", et,
                                self.wide), [wide])
        return red if et == I64 else b.zext(red, I64)


def _load_words(b, pop: _Popcount, base, row, ld, word):
    """The vector of words ``[word, word + V)`` of row ``row`` of a ``[*, ld]`` int64 matrix."""
    idx = b.add(b.mul(row, ld), word)
    ptr = b.gep(base, [idx], inbounds=True, source_etype=I64)
    return b.load(ptr, typ=pop.word_vec, align=8)


def _at(b, base, idx, elem):
    return gep(b, base, idx, elem, inbounds=True)


def _store(b: ir.IRBuilder, value, ptr, mask):
    """``masked_store``, as a plain store when every lane is kept (all tiles but the edge
    ones): AVX2's masked stores (``vmaskmov``/``vpmaskmov``) are slow on AMD cores (Zen 3
    included), and NEON, which has none, stores lane by lane."""
    whole = call(b, f"llvm.vector.reduce.and.v{mask.type.count}i1", I1, [mask])
    with b.if_else(whole, likely=True) as (then, otherwise):
        with then:
            b.store(value, ptr, align=4)
        with otherwise:
            masked_store(b, value, ptr, mask)


def _if(b: ir.IRBuilder, cond):
    return b.if_then(cond, likely=True)


# --------------------------------------------------------------------------- shared kernel body

@dataclass
class _Operands:
    a: ir.Value            # base of plane 0 of A
    plane_stride: ir.Value  # words between planes of A
    lda: ir.Value
    b: ir.Value
    ldb: ir.Value
    m0: ir.Value
    m1: ir.Value
    n0: ir.Value
    n1: ir.Value
    words: ir.Value        # words to contract, a multiple of the vector width
    kc: ir.Value           # words per K block, a multiple of the vector width
    nc: ir.Value           # B rows per N block, a multiple of nr
    partial: ir.Value      # int32 [*, ldp] partial sums between K blocks
    ldp: ir.Value


@dataclass
class _Epilogue:
    """``row(b, m)`` emits the per-row part once per tile row; ``store(b, row, n, acc, mask)``
    gets its result and the int32 vector of final accumulators (``sum_t 2^t popcount``) of
    outputs ``(m, n + lane)``, lanes with a false ``mask`` bit being outside the output.
    ``tile``, if given, stores a whole panel tile itself (calling ``by_rows`` where it cannot)."""

    row: object
    store: object
    tile: object = None     # panel kernel: ``tile(b, m, ns, totals, masks, by_rows)`` stores a
                            # whole tile (``totals[i][j]``: row m + i, columns ns[j] + lane)


def _gemm_body(kern: Kernel, pop: _Popcount, tile: Tile, ops: _Operands, *, planes: int,
               combine: str, epilogue: _Epilogue):
    """Emit the blocked loop nest; ``combine`` is ``xor`` or ``and``."""
    b = kern.b
    V = i64(pop.words)
    with kern.loop(i64(0), ops.words, ops.kc) as k0:
        k1 = smin(b, b.add(k0, ops.kc), ops.words)
        first = b.icmp_signed("==", k0, i64(0))
        last = b.icmp_signed("==", k1, ops.words)
        with kern.loop(ops.n0, ops.n1, ops.nc) as nb:
            nb1 = smin(b, b.add(nb, ops.nc), ops.n1)
            with kern.loop(ops.m0, ops.m1, i64(tile.mr)) as m:
                rows = [smin(b, b.add(m, i64(i)), b.sub(ops.m1, i64(1))) for i in range(tile.mr)]
                with kern.loop(nb, nb1, i64(tile.nr)) as n:
                    cols = [smin(b, b.add(n, i64(j)), b.sub(ops.n1, i64(1)))
                            for j in range(tile.nr)]
                    totals = _tile_kernel(kern, pop, tile, ops, rows, cols, k0, k1, V, planes, combine)
                    _tile_store(b, tile, ops, m, n, totals, first, last, epilogue)


def _plane(b: ir.IRBuilder, ops: _Operands, t: int):
    """The first word of plane ``t`` of A."""
    return b.gep(ops.a, [b.mul(ops.plane_stride, i64(t))], inbounds=True, source_etype=I64)


def _plane_sums(kern: Kernel, pop: _Popcount, ops: _Operands, rows: int, cols: int, planes: int, k0, k1,
                words_per_step: int, k_steps, one_chunk: bool = False):
    """``rows x cols`` wide accumulators (allocas) of ``sum_t 2^t popcount`` over words
    ``[k0, k1)``; ``k_steps(t, a_base, c0, c1, accs)`` emits the K loop over plane ``t``
    (starting at ``a_base``) into ``accs``, narrow ones flushed every ``pop.chunk`` steps
    where the scheme needs it (``one_chunk``: the caller knows ``[k0, k1)`` takes at most
    ``pop.chunk`` steps, so there is no loop over chunks)."""
    b = kern.b
    wide = [[kern.var(pop.wide, name=f"acc{i}_{j}") for j in range(cols)] for i in range(rows)]
    for row in wide:
        for w in row:
            b.store(pop.zero(pop.wide), w)
    # Planes from the most significant down: doubling the sums before each plane weights
    # plane t by 2^t with one shift per accumulator per plane, not per step.
    for t in reversed(range(planes)):
        if t != planes - 1:
            for row in wide:
                for w in row:
                    b.store(b.shl(b.load(w), const_splat(pop.wide, 1)), w)
        a_base = _plane(b, ops, t)
        if pop.chunk is None:
            k_steps(t, a_base, k0, k1, wide)
            continue
        narrow = [[kern.var(pop.narrow, name=f"nacc{i}_{j}") for j in range(cols)] for i in range(rows)]

        def chunk(c0, c1):
            for row in narrow:
                for w in row:
                    b.store(pop.zero(pop.narrow), w)
            k_steps(t, a_base, c0, c1, narrow)
            for i in range(rows):
                for j in range(cols):
                    b.store(pop.flush(b, b.load(wide[i][j]), b.load(narrow[i][j])), wide[i][j])

        if one_chunk:
            chunk(k0, k1)
            continue
        span = i64(pop.chunk * words_per_step)
        with kern.loop(k0, k1, span) as c0:
            chunk(c0, smin(b, b.add(c0, span), k1))
    return wide


def _tile_kernel(kern: Kernel, pop: _Popcount, tile: Tile, ops: _Operands, rows, cols, k0, k1, V, planes,
                 combine):
    b = kern.b

    def k_steps(_, a_base, c0, c1, accs):
        _k_steps(kern, pop, tile, ops, a_base, rows, cols, c0, c1, V, combine, accs)

    wide = _plane_sums(kern, pop, ops, tile.mr, tile.nr, planes, k0, k1, pop.words, k_steps)
    lanes = pop.wide.count
    zero = pop.zero(pop.wide)
    totals = []
    for row in wide:
        accs = [b.load(w) for w in row]
        accs += [zero] * (-len(accs) % lanes)
        totals.append([_to_i32(b, _transpose_sum(b, accs[g:g + lanes]))
                       for g in range(0, len(accs), lanes)])
    return totals


def _transpose_sum(b: ir.IRBuilder, vecs: list):
    """One vector whose lane ``l`` is the sum of all lanes of ``vecs[l]`` (``len(vecs)`` = lanes).

    A shuffle tree: each level adds pairs of vectors after interleaving blocks of ``h`` lanes,
    so L vectors cost 2(L-1) shuffles and L-1 adds instead of L separate horizontal sums."""
    lanes = vecs[0].type.count
    h = 1
    while len(vecs) > 1:
        first, second = [], []
        for lane in range(lanes):
            base, off = lane - lane % (2 * h), lane % (2 * h)
            if off < h:
                first.append(base + off)
                second.append(base + h + off)
            else:
                first.append(lanes + base + off - h)
                second.append(lanes + base + off)
        mask_a, mask_b = (ir.Constant(vec(lanes, I32), m) for m in (first, second))
        vecs = [b.add(b.shuffle_vector(x, y, mask_a), b.shuffle_vector(x, y, mask_b))
                for x, y in zip(vecs[0::2], vecs[1::2])]
        h *= 2
    return vecs[0]


def _concat(b: ir.IRBuilder, vecs: list):
    """The vectors of ``vecs`` (one element type, lanes not increasing) end to end, as one vector."""
    out = vecs[0]
    for y in vecs[1:]:
        p, q = out.type.count, y.type.count
        if q < p:   # shufflevector takes operands of one type: widen y (extra lanes unused)
            y = b.shuffle_vector(y, y, ir.Constant(vec(p, I32), [i % q for i in range(p)]))
        out = b.shuffle_vector(out, y, ir.Constant(vec(p + q, I32), list(range(p + q))))
    return out


def _to_i32(b, v):
    return v if v.type.element == I32 else b.trunc(v, vec(v.type.count, I32))


def _k_steps(kern: Kernel, pop, tile, ops, a_base, rows, cols, k0, k1, V, combine, accs):
    b = kern.b
    with kern.loop(k0, k1, V) as k:
        av = [_load_words(b, pop, a_base, r, ops.lda, k) for r in rows]
        for j, c in enumerate(cols):
            bv = _load_words(b, pop, ops.b, c, ops.ldb, k)
            for i in range(tile.mr):
                x = b.xor(av[i], bv) if combine == "xor" else b.and_(av[i], bv)
                b.store(pop.step(b, b.load(accs[i][j]), x), accs[i][j])


def _tile_store(b, tile, ops, m, n, totals, first, last, epilogue):
    """Store the tile a vector of ``lanes`` outputs of a row at a time; masks drop the lanes
    past the tile's ``nr`` columns or past ``n1``; rows past ``m1`` are skipped."""
    lanes = totals[0][0].type.count
    v32 = vec(lanes, I32)
    lane_ids = ir.Constant(v32, list(range(lanes)))
    n1 = splat(b, b.trunc(ops.n1, I32), lanes)
    for i in range(tile.mr):
        mi = b.add(m, i64(i))
        with _if(b, b.icmp_signed("<", mi, ops.m1)):
            row = epilogue.row(b, mi)
            for g, total in enumerate(totals[i]):
                ng = b.add(n, i64(g * lanes))
                in_tile = b.icmp_signed("<", lane_ids, const_splat(v32, tile.nr - g * lanes))
                cols = b.add(splat(b, b.trunc(ng, I32), lanes), lane_ids)
                mask = b.and_(in_tile, b.icmp_signed("<", cols, n1))
                ptr = _at(b, ops.partial, b.add(b.mul(mi, ops.ldp), ng), I32)
                with b.if_else(first) as (then, otherwise):
                    with then:
                        first_block = b.block
                    with otherwise:
                        with_partial = b.add(total, masked_load(b, ptr, mask, ir.Constant(v32, None)))
                        later_block = b.block
                full = b.phi(v32)
                full.add_incoming(total, first_block)
                full.add_incoming(with_partial, later_block)
                with b.if_else(last) as (then, otherwise):
                    with then:
                        epilogue.store(b, row, ng, full, mask)
                    with otherwise:
                        _store(b, full, ptr, mask)


def _panel_body(kern: Kernel, pop: _Popcount, tile: PanelTile, ops: _Operands, *, planes: int,
                combine: str, epilogue: _Epilogue):
    """The across-N kernel: vectors hold ``L`` output columns (one 64-bit lane each) instead
    of ``L`` words of one column, so a tile needs no horizontal reduction and a K of a few
    words costs no padding. B's rows ``[n0, n1)`` are first transposed into the ``partial``
    scratch as a panel ``[words][NP]`` (NP = ``n1 - n0`` rounded up to whole vectors, zero
    columns past ``n1``): one contiguous vector load per K word and column vector. Each K
    step broadcasts one word of each of the ``mr`` A rows (AVX-512 folds it into the
    XOR/AND as a ``{1to8}`` memory operand) against ``nv`` B vectors. ``kc``, ``nc`` and
    ``ldp`` are unused; ``words`` need not be a multiple of the vector width. Where
    ``pop.broadcast_once``, each row tile first writes its A words already broadcast
    (``[planes][words][mr]`` vectors) after the panel, and the K steps load them as vectors:
    ``panel_scratch_words`` is the scratch this takes."""
    b = kern.b
    if tile.words:
        ops = replace(ops, words=i64(tile.words))
    L = pop.words
    lanes = i64(L)
    panel = ops.partial
    width = b.sub(ops.n1, ops.n0)
    NP = b.mul(b.sdiv(b.add(width, i64(L - 1)), lanes), lanes)
    spread = b.gep(panel, [b.mul(ops.words, NP)], inbounds=True, source_etype=I64)
    plane_words = b.mul(ops.words, i64(tile.mr * L))
    with kern.loop(i64(0), NP, i64(1)) as j:
        inside = b.icmp_signed("<", j, width)
        src_row = b.add(ops.n0, smin(b, j, b.sub(width, i64(1))))
        with kern.loop(i64(0), ops.words, i64(1)) as k:
            word = b.load(_at(b, ops.b, b.add(b.mul(src_row, ops.ldb), k), I64), typ=I64)
            b.store(b.select(inside, word, i64(0)), _at(b, panel, b.add(b.mul(k, NP), j), I64))
    step = i64(tile.mr)
    lane_ids = ir.Constant(vec(tile.nv * L, I32), list(range(tile.nv * L)))
    with kern.loop(ops.m0, ops.m1, step) as m:
        rows = [smin(b, b.add(m, i64(i)), b.sub(ops.m1, i64(1))) for i in range(tile.mr)]

        def a_word(a_base, r, k):
            return b.load(_at(b, a_base, b.add(b.mul(r, ops.lda), k), I64), typ=I64)

        def spread_at(t, k, i):
            return _at(b, spread, b.add(b.add(b.mul(plane_words, i64(t)), b.mul(k, i64(tile.mr * L))),
                                        i64(i * L)), I64)

        if pop.broadcast_once:
            for t in range(planes):
                with kern.loop(i64(0), ops.words, i64(1)) as k:
                    for i, r in enumerate(rows):
                        b.store(splat(b, a_word(_plane(b, ops, t), r, k), L), spread_at(t, k, i), align=8)

        def a_vector(t, a_base, i, r, k):
            if pop.broadcast_once:
                return b.load(spread_at(t, k, i), typ=pop.word_vec, align=8)
            return splat(b, a_word(a_base, r, k), L)

        with kern.loop(i64(0), NP, i64(tile.nv * L)) as nb:
            # Column vectors past NP are clamped onto the last one: recomputed, stored twice.
            cols = [smin(b, b.add(nb, i64(j * L)), b.sub(NP, lanes)) for j in range(tile.nv)]

            def k_steps(t, a_base, c0, c1, accs):
                for k in _word_steps(kern, c0, c1, tile.words):
                    row_k = b.mul(k, NP)
                    bv = [b.load(_at(b, panel, b.add(row_k, c), I64), typ=pop.word_vec, align=8)
                          for c in cols]
                    for i, r in enumerate(rows):
                        av = a_vector(t, a_base, i, r, k)
                        for j in range(tile.nv):
                            x = b.xor(av, bv[j]) if combine == "xor" else b.and_(av, bv[j])
                            b.store(pop.step(b, b.load(accs[i][j]), x), accs[i][j])

            wide = _plane_sums(kern, pop, ops, tile.mr, tile.nv, planes, i64(0), ops.words, 1, k_steps,
                               one_chunk=bool(tile.words))
            # One vector per row for the tile's nv * L columns [n, n + nv L): one epilogue and
            # store per row, not per column vector. A column vector clamped above sits past NP
            # >= n1 - n0 in this vector, so the mask drops it.
            totals = [[_concat(b, [_to_i32(b, pop.per_word(b, b.load(w))) for w in row])] for row in wide]
            ns = [b.add(ops.n0, nb)]
            masks = [b.icmp_signed("<", lane_ids, splat(b, b.trunc(b.sub(ops.n1, ns[0]), I32), tile.nv * L))]

            def by_rows():
                for i in range(tile.mr):
                    mi = b.add(m, i64(i))
                    with _if(b, b.icmp_signed("<", mi, ops.m1)):
                        row = epilogue.row(b, mi)
                        for j, n in enumerate(ns):
                            epilogue.store(b, row, n, totals[i][j], masks[j])

            if epilogue.tile is None:
                by_rows()
            else:
                epilogue.tile(b, m, ns, totals, masks, by_rows)


def _word_steps(kern: Kernel, k0, k1, fixed: int):
    """The K word indices ``[k0, k1)`` of a panel K loop: a loop, or for a fixed-K kernel
    (``fixed`` words, ``[k0, k1) = [0, fixed)``) each index as a constant, the body unrolled."""
    if fixed:
        yield from (i64(k) for k in range(fixed))
        return
    with kern.loop(k0, k1, i64(1)) as k:
        yield k


def _define(target: Target, name: str, params: list[tuple[str, str]], vector_words: int | None):
    """One ``void name(params)`` kernel in a new module: ``(kernel, popcount scheme, builder,
    {param name: argument})``."""
    kern = Kernel(new_module(target), name, params)
    return kern, _Popcount(target, kern.module, vector_words), kern.b, kern.arg


def _operands(p: dict, a, plane_stride) -> _Operands:
    return _Operands(a, plane_stride, p["lda"], p["b"], p["ldb"], p["m0"], p["m1"], p["n0"],
                     p["n1"], p["words"], p["kc"], p["nc"], p["partial"], p["ldp"])


_BLOCKING = [("words", "i64"), ("kc", "i64"), ("nc", "i64"), ("partial", "ptr"), ("ldp", "i64")]
_RANGE = [("m0", "i64"), ("m1", "i64"), ("n0", "i64"), ("n1", "i64")]


# --------------------------------------------------------------------------- kernel families

def _body(tile):
    return _panel_body if isinstance(tile, PanelTile) else _gemm_body


def binary_gemm_ir(target: str | Target = "host", *, tile: Tile | PanelTile | None = None,
                   epilogue: str = "int32", vector_words: int | None = None) -> KernelIR:
    """IR of the ±1 x ±1 GEMM kernel; returns its ``KernelIR``.

    ``void symbol(a, lda, b, ldb, m0, m1, n0, n1, words, kc, nc, partial, ldp, k,
    out, hw, s_blk, s_row, s_col, scale, bias)`` computes outputs ``[m0, m1) x [n0, n1)`` of
    ``dot[m, n] = k - 2 popcount(a[m] XOR b[n])`` and stores ``dot`` (int32, epilogue
    ``int32``) or ``dot * scale[n] (+ bias[n])`` (float32) at element
    ``(m / hw) * s_blk + (m % hw) * s_row + n * s_col`` of ``out``. ``hw = 1, s_blk = ldo,
    s_col = 1`` is a row-major matrix; ``hw = H'W', s_blk = N hw, s_row = 1, s_col = hw`` is
    the NCHW output of a conv whose rows are ``(n, h', w')``. ``words`` is a multiple of
    ``vector_words`` (default: the widest of ``vector_word_choices``)."""
    target = get_target(target)
    tile = tile or default_tile(target)
    if epilogue not in EPILOGUES:
        raise ValueError(f"epilogue {epilogue!r}: expected one of {EPILOGUES}")
    name = f"fqt_binary_gemm_{epilogue}_{tile}_v{vector_words or vector_word_choices(target)[-1]}"
    params = ([("a", "ptr"), ("lda", "i64"), ("b", "ptr"), ("ldb", "i64")] + _RANGE + _BLOCKING
              + [("k", "i64"), ("out", "ptr"), ("hw", "i64"), ("s_blk", "i64"), ("s_row", "i64"),
                 ("s_col", "i64"), ("scale", "ptr"), ("bias", "ptr")])
    kern, pop, b, p = _define(target, name, params, vector_words)
    ops = _operands(p, p["a"], i64(0))

    def divmod_hw(b, m):
        """``(m / hw, m % hw)``, with no division for a row-major output (``hw = 1``): an
        integer division per tile row costs as much as the popcounts of a K of a few words."""
        with b.if_else(b.icmp_signed("==", p["hw"], i64(1)), likely=True) as (rows, nchw):
            with rows:
                rows_block = b.block
            with nchw:
                q, r = b.sdiv(m, p["hw"]), b.srem(m, p["hw"])
                nchw_block = b.block
        out = []
        for rows_value, nchw_value in ((m, q), (i64(0), r)):
            phi = b.phi(I64)
            phi.add_incoming(rows_value, rows_block)
            phi.add_incoming(nchw_value, nchw_block)
            out.append(phi)
        return out

    def offset(b, q, r):
        return b.add(b.mul(q, p["s_blk"]), b.mul(r, p["s_row"]))

    def row(b, m):
        return offset(b, *divmod_hw(b, m))

    def value(b, n, pop_sum, mask):
        lanes = pop_sum.type.count
        k = splat(b, b.trunc(p["k"], I32), lanes)
        dot = b.sub(k, b.shl(pop_sum, const_splat(pop_sum.type, 1)))
        if epilogue == "int32":
            return dot
        ftype = vec(lanes, F32)
        none = ir.Constant(ftype, None)
        value = b.fmul(b.sitofp(dot, ftype), masked_load(b, _at(b, p["scale"], n, F32), mask, none))
        if epilogue == "scale_bias":
            value = b.fadd(value, masked_load(b, _at(b, p["bias"], n, F32), mask, none))
        return value

    def store(b, row_at, n, pop_sum, mask):
        value_ = value(b, n, pop_sum, mask)
        lanes, elem = pop_sum.type.count, value_.type.element
        first = _at(b, p["out"], b.add(row_at, b.mul(n, p["s_col"])), elem)
        # Row-major outputs are contiguous along n; the NCHW layout strides by h' w'.
        with b.if_else(b.icmp_signed("==", p["s_col"], i64(1))) as (contiguous, strided):
            with contiguous:
                _store(b, value_, first, mask)
            with strided:
                v64 = vec(lanes, I64)
                stride = splat(b, b.mul(p["s_col"], i64(4)), lanes)  # int32 and float32
                addr = b.add(splat(b, b.ptrtoint(first, I64), lanes),
                             b.mul(ir.Constant(v64, list(range(lanes))), stride))
                masked_scatter(b, value_, b.inttoptr(addr, vec(lanes, PTR)), mask)

    def nchw_tile(b, m, ns, totals, masks, by_rows):
        """NCHW: the tile's rows are consecutive h' w' positions of one sample, contiguous in
        each output channel, so the mr x lanes block of each column vector is transposed in
        registers and stored as lanes runs of mr elements instead of mr scatters (a scatter
        writes one element per cycle at best). Rows crossing a sample or past m1: by rows."""
        mr = len(totals)
        hw = p["hw"]
        q, r = divmod_hw(b, m)
        fast = b.and_(b.and_(b.icmp_signed("!=", p["s_col"], i64(1)), b.icmp_signed("==", p["s_row"], i64(1))),
                      b.and_(b.icmp_signed("<=", b.add(m, i64(mr)), p["m1"]),
                             b.icmp_signed("<=", b.add(r, i64(mr)), hw)))
        with b.if_else(fast) as (then, otherwise):
            with then:
                row_at = offset(b, q, r)
                for j, n in enumerate(ns):
                    values = [value(b, n, totals[i][j], masks[j]) for i in range(mr)]
                    lanes, elem = values[0].type.count, values[0].type.element
                    for lane in range(lanes):
                        run = ir.Constant(vec(mr, elem), None)
                        for i in range(mr):
                            run = b.insert_element(run, b.extract_element(values[i], ir.Constant(I32, lane)),
                                                   ir.Constant(I32, i))
                        column = b.add(n, i64(lane))
                        # The run is one column's: stored whole or not at all, no mask.
                        with _if(b, b.icmp_signed("<", column, p["n1"])):
                            b.store(run, _at(b, p["out"], b.add(row_at, b.mul(column, p["s_col"])), elem), align=4)
            with otherwise:
                by_rows()

    _body(tile)(kern, pop, tile, ops, planes=1, combine="xor", epilogue=_Epilogue(row, store, nchw_tile))
    return kern.finish()


def bitplane_gemm_ir(target: str | Target = "host", *, bits: int, tile: Tile | PanelTile | None = None,
                     vector_words: int | None = None) -> KernelIR:
    """IR of the ``bits``-plane x ±1 GEMM with the dequantization epilogue (``KernelIR``).

    ``void symbol(planes, plane_stride, lda, b, ldb, m0, m1, n0, n1, words, kc, nc, partial,
    ldp, out, ldo, row_map, row_scale, row_zero, rowpop, colsum, rows, out_rows)``: A's plane
    ``t`` starts ``t * plane_stride`` words after ``planes``; for output ``(m, n)``,
    ``dot = 2 sum_t 2^t popcount(a_t[m] AND b[n]) - rowpop[m]`` (int32 ``rowpop`` =
    ``sum_t 2^t popcount(a_t[m])``, the row's code sum) and float32
    ``out[row_map[m] * ldo + n] = row_scale[m] * dot + row_zero[m] * colsum[n]``
    (``row_map`` int64, strictly ascending, of all ``rows`` rows of A; ``colsum`` float32 =
    B's ±1 row sums). Columns ``[n0, n1)`` of the output rows between ``row_map[m - 1]`` and
    ``row_map[m]`` for ``m`` in ``[m0, m1)`` (from row 0 for ``m = 0``; for ``m1 = rows`` also
    those after ``row_map[rows - 1]``, up to ``out_rows``) are written 0: every slice zeroes
    the pruned rows before its own, so the slices of one call write every output element
    once. ``words`` and ``vector_words`` as in ``binary_gemm_ir``."""
    target = get_target(target)
    tile = tile or default_tile(target)
    if bits not in BITS:
        raise ValueError(f"bits={bits}: expected one of {BITS}")
    name = f"fqt_bitplane_gemm_{bits}b_{tile}_v{vector_words or vector_word_choices(target)[-1]}"
    params = ([("planes", "ptr"), ("plane_stride", "i64"), ("lda", "i64"), ("b", "ptr"), ("ldb", "i64")]
              + _RANGE + _BLOCKING
              + [("out", "ptr"), ("ldo", "i64"), ("row_map", "ptr"), ("row_scale", "ptr"),
                 ("row_zero", "ptr"), ("rowpop", "ptr"), ("colsum", "ptr"), ("rows", "i64"), ("out_rows", "i64")])
    kern, pop, b, p = _define(target, name, params, vector_words)
    ops = _operands(p, p["planes"], p["plane_stride"])

    def load(base, idx, ty):
        return b.load(_at(b, base, idx, ty), typ=ty)

    _zero_pruned_rows(kern, p, lambda m: load(p["row_map"], m, I64))

    def row(b, m):
        return (load(p["rowpop"], m, I32), load(p["row_scale"], m, F32), load(p["row_zero"], m, F32),
                b.mul(load(p["row_map"], m, I64), p["ldo"]))

    def store(b, row, n, pop_sum, mask):
        lanes = pop_sum.type.count
        rowpop, scale, zero, row_at = [splat(b, x, lanes) for x in row[:3]] + [row[3]]
        ftype = vec(lanes, F32)
        dot = b.sitofp(b.sub(b.shl(pop_sum, const_splat(pop_sum.type, 1)), rowpop), ftype)
        colsum = masked_load(b, _at(b, p["colsum"], n, F32), mask, ir.Constant(ftype, None))
        value = b.fadd(b.fmul(scale, dot), b.fmul(zero, colsum))
        _store(b, value, _at(b, p["out"], b.add(row_at, n), F32), mask)

    _body(tile)(kern, pop, tile, ops, planes=bits, combine="and", epilogue=_Epilogue(row, store))
    return kern.finish()


def _zero_pruned_rows(kern: Kernel, p: dict, row_of) -> None:
    """Zero columns ``[n0, n1)`` of the output rows that no row of ``[m0, m1)`` writes and
    that lie before them (``row_of(m)``: output row of A row ``m``, ascending), and after the
    last row when the slice ends at ``rows``: one memset per pruned row."""
    b = kern.b
    width = b.mul(b.sub(p["n1"], p["n0"]), i64(4))

    def zero(first, last):
        with kern.loop(first, last, i64(1)) as r:
            dst = _at(b, p["out"], b.add(b.mul(r, p["ldo"]), p["n0"]), F32)
            kern.call("llvm.memset.p0.i64", ir.VoidType(), [dst, ir.Constant(I8, 0), width, ir.Constant(I1, 0)])

    with kern.loop(p["m0"], p["m1"], i64(1)) as m:
        previous = row_of(b.select(b.icmp_signed(">", m, i64(0)), b.sub(m, i64(1)), m))
        zero(b.select(b.icmp_signed(">", m, i64(0)), b.add(previous, i64(1)), i64(0)), row_of(m))
    with b.if_then(b.and_(b.icmp_signed("==", p["m1"], p["rows"]), b.icmp_signed(">", p["rows"], i64(0)))):
        zero(b.add(row_of(b.sub(p["rows"], i64(1))), i64(1)), p["out_rows"])


def row_popcount_ir(target: str | Target = "host", *, vector_words: int | None = None) -> KernelIR:
    """IR of ``void symbol(planes, plane_stride, nplanes, ld, rows, words, out)``:
    int32 ``out[r] = sum_t 2^t popcount(plane t, row r)`` over ``words`` words (a multiple of
    the vector width); with one plane of ±1 bits, ``2 out[r] - k`` is the row's ±1 sum."""
    target = get_target(target)
    name = f"fqt_row_popcount_v{vector_words or vector_word_choices(target)[-1]}"
    params = [("planes", "ptr"), ("plane_stride", "i64"), ("nplanes", "i64"), ("ld", "i64"),
              ("rows", "i64"), ("words", "i64"), ("out", "ptr")]
    kern, pop, b, p = _define(target, name, params, vector_words)
    V = i64(pop.words)
    with kern.loop(i64(0), p["rows"], i64(1)) as r:
        total = kern.var(I64, name="total")
        b.store(i64(0), total)
        with kern.loop(i64(0), p["nplanes"], i64(1)) as t:
            base = b.gep(p["planes"], [b.mul(t, p["plane_stride"])], inbounds=True, source_etype=I64)
            wide = kern.var(pop.wide, name="wide")
            b.store(pop.zero(pop.wide), wide)
            span = i64((pop.chunk or 1 << 20) * pop.words)
            with kern.loop(i64(0), p["words"], span) as c0:
                acc = kern.var(pop.narrow, name="acc")
                b.store(pop.zero(pop.narrow), acc)
                with kern.loop(c0, smin(b, b.add(c0, span), p["words"]), V) as k:
                    x = _load_words(b, pop, base, r, p["ld"], k)
                    b.store(pop.step(b, b.load(acc), x), acc)
                b.store(pop.flush(b, b.load(wide), b.load(acc)), wide)
            b.store(b.add(b.load(total), b.shl(pop.total(b, b.load(wide)), t)), total)
        b.store(b.trunc(b.load(total), I32), b.gep(p["out"], [r], inbounds=True, source_etype=I32))
    return kern.finish()
