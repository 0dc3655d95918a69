"""Counter-based random numbers shared by the reference ops and the kernels (docs/math.md §4).

Every stochastic choice (stochastic rounding, AQ group sampling) draws from a
SplitMix64 stream keyed by ``(seed, step, layer, stream)`` and indexed by the
element's position, so a kernel can reproduce the reference draw for draw and a
seeded run is reproducible whatever the thread count or the order of work.

Definition (all arithmetic modulo 2**64):

    mix64(z)  = z ^= z >> 30; z *= 0xBF58476D1CE4E5B9; z ^= z >> 27;
                z *= 0x94D049BB133111EB; z ^= z >> 31
    key       = k3, where k0 = mix64(seed + G) and k(j+1) = mix64((k(j) ^ field_j) + G)
                for field_j in (step, layer, stream)
    draw(i)   = mix64(key + (i + 1) * G)          with G = 0x9E3779B97F4A7C15
    uniform(i)= (draw(i) >> 40) * 2**-24          a float32 in [0, 1), exact
    keep(i)   = (draw(i) >> 11) < p_i * 2**53     a Bernoulli(p_i) draw with 53 random bits

Stochastic rounding uses ``uniform`` (24 bits: its error is below float32's own rounding).
An AQ keep draw needs more: with 24 bits a group with p < 2**-24 would be kept at rate
2**-24 and then rescaled by 1/p. With 53 bits the rate is exactly p for every p on the
2**-53 grid, which ``reference.aq_probabilities`` rounds p up to.

Streams: which random numbers a draw is for (``STREAM_*`` below).
"""
from __future__ import annotations

import numpy as np
import torch

GOLDEN = 0x9E3779B97F4A7C15
MUL1 = 0xBF58476D1CE4E5B9
MUL2 = 0x94D049BB133111EB
MASK64 = (1 << 64) - 1

# Stream ids: stochastic rounding and group sampling of each SCQ path draw independently.
STREAM_SR_INPUT = 0      # stochastic rounding, input-gradient path (per-sample groups)
STREAM_SR_WEIGHT = 1     # stochastic rounding, weight-gradient path (per-channel groups)
STREAM_SAMPLE_INPUT = 2  # AQ Bernoulli draw per sample group
STREAM_SAMPLE_WEIGHT = 3  # AQ Bernoulli draw per channel group
STREAM_DROPOUT = 4       # dropout keep draw per element (the layer field is the dropout site)

KEEP_BITS = 53  # random bits of a keep draw: the float64 mantissa, so p * 2**53 is exact


def mix64_int(z: int) -> int:
    """The SplitMix64 finalizer on a Python int (used for keys)."""
    z &= MASK64
    z ^= z >> 30
    z = (z * MUL1) & MASK64
    z ^= z >> 27
    z = (z * MUL2) & MASK64
    z ^= z >> 31
    return z


def stream_key(seed: int, step: int, layer: int, stream: int) -> int:
    """The 64-bit key of one stream; each field is folded in by a full mix so that
    neighbouring (seed, step, layer, stream) tuples give unrelated streams."""
    k = mix64_int(seed + GOLDEN)
    for field in (step, layer, stream):
        k = mix64_int((k ^ (field & MASK64)) + GOLDEN)
    return k


def seed_and_step(rng_state) -> tuple[int, int]:
    """``(seed, step)`` from the int64 ``[seed, step]`` tensor a compiled graph receives."""
    seed, step = rng_state.tolist()
    return seed, step


def _mix64_np(z: np.ndarray) -> np.ndarray:
    z = z ^ (z >> np.uint64(30))
    z = z * np.uint64(MUL1)
    z = z ^ (z >> np.uint64(27))
    z = z * np.uint64(MUL2)
    return z ^ (z >> np.uint64(31))


def draws_u64(key: int, start: int, count: int) -> np.ndarray:
    """``draw(i)`` for ``i`` in ``[start, start + count)`` as uint64."""
    idx = np.arange(start + 1, start + count + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        return _mix64_np(np.uint64(key) + idx * np.uint64(GOLDEN))


def uniform(seed: int, step: int, layer: int, stream: int, count: int, start: int = 0) -> torch.Tensor:
    """float32 uniforms in [0, 1) with 24 random bits each: ``(draw >> 40) * 2**-24``."""
    return uniform_of_key(stream_key(seed, step, layer, stream), count, start)


def uniform_of_key(key: int, count: int, start: int = 0) -> torch.Tensor:
    """``uniform`` of the stream with 64-bit ``key`` (what a kernel is given)."""
    d = draws_u64(key, start, count)
    u = (d >> np.uint64(40)).astype(np.float32) * np.float32(2.0 ** -24)
    return torch.from_numpy(u)


def bernoulli(draws: np.ndarray, prob: torch.Tensor) -> torch.Tensor:
    """``keep[i] = (draws[i] >> 11) < prob[i] * 2**53`` for uint64 ``draws``: true for exactly
    ``ceil(prob[i] * 2**53)`` of the 2**53 values of the draw's top bits, i.e. at rate
    ``prob[i]`` when it is a multiple of ``2**-53``. Both sides are exact in float64."""
    top = torch.from_numpy((draws >> np.uint64(64 - KEEP_BITS)).astype(np.float64))
    return top < prob.double() * float(2 ** KEEP_BITS)


def keep_draws(seed: int, step: int, layer: int, stream: int, prob: torch.Tensor) -> torch.Tensor:
    """AQ keep decisions of the ``prob.numel()`` groups of one path: ``bernoulli`` of draws
    ``0..N-1`` of the stream."""
    return bernoulli(draws_u64(stream_key(seed, step, layer, stream), 0, prob.numel()), prob)


def rank_seed(seed: int, rank: int) -> int:
    """The seed a distributed rank draws with: ``seed`` itself on rank 0 (a single process
    is unchanged), an unrelated one (below 2**63, an int64 graph input) on every other rank,
    so that data-parallel replicas quantize their gradients independently."""
    if rank == 0:
        return seed
    return mix64_int(seed ^ mix64_int(rank + GOLDEN)) >> 1
