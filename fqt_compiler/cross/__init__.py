"""Cross-targeting: a training step's kernels for another CPU, emitted, verified, estimated.

``record`` (which kernels one step requests for a target), ``emit`` (object, assembly, C
header, manifest, shared library), ``verify`` (replay every call on the target, natively or
under qemu, through ``harness.c``), ``oracle`` (what each call must write, from the
pure-PyTorch reference), ``mca`` (llvm-mca estimates of the GEMM inner loops). This package
sits above the runtime and the compiler; ``codegen`` imports nothing from it.
"""
from .emit import emit_kernels

__all__ = ["emit_kernels"]
