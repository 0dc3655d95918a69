from .gemm import binary_gemm, bitplane_gemm
from .pack import (im2col_pack, im2col_pack_t, mask_in_place, pack_signs, pack_signs_and_ste, transpose_bits,
                   unpack_mask, unpack_signs)
from .quantize import BitplaneGradient, quantize_bitplanes, sample_groups
from .kernel_stats import reset_stats, stats
from .buffers import release_buffers
