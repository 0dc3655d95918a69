"""Packed bit matrices: the operand format of every popcount kernel.

``PackedBits.words`` is an int64 tensor ``[rows, ld]``: row ``i`` holds element ``k`` of the
packed axis at bit ``k % 64`` of word ``k // 64`` (``reference.pack_bits`` order). ``ld`` is
a multiple of ``WORD_ALIGN`` so kernels can load whole 512-bit vectors; every bit past
``k`` (the tail of the last word and the padding words) is 0 in every operand, which is
what makes the popcount identities of docs/math.md §3 exact without masking.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops import reference

from ..ops.reference import WORD_ALIGN, padded_words  # noqa: F401  (the layout is defined there)


@dataclass
class PackedBits:
    """A ``rows x k`` bit matrix packed along ``k`` (bit 1 = +1 / code bit set)."""

    words: torch.Tensor  # int64 [rows, ld], contiguous
    k: int

    def __post_init__(self):
        if self.words.dtype != torch.int64 or self.words.dim() != 2:
            raise TypeError(f"PackedBits.words must be a 2-D int64 tensor, got {self.words.dtype} "
                            f"{tuple(self.words.shape)}")
        if self.words.shape[1] < (self.k + 63) // 64:
            raise ValueError(f"{self.words.shape[1]} words per row cannot hold k={self.k} bits")

    @property
    def rows(self) -> int:
        return self.words.shape[0]

    @property
    def ld(self) -> int:
        return self.words.shape[1]

    @property
    def nbytes(self) -> int:
        return self.words.numel() * 8

    @classmethod
    def from_bool(cls, bits: torch.Tensor) -> "PackedBits":
        """Pack a bool ``[rows, k]`` matrix with the reference packer (slow; for tests and fallbacks)."""
        rows, k = bits.shape
        words = torch.zeros(rows, padded_words(k), dtype=torch.int64)
        words[:, :(k + 63) // 64] = reference.pack_bits(bits)
        return cls(words, k)

    def to_bool(self) -> torch.Tensor:
        return reference.unpack_bits(self.words, self.k)
