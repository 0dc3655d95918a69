from .gemm import binary_gemm, bitplane_gemm
