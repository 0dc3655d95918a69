"""The kernel ABI is written once (``codegen.abi``): everything else is derived from it."""
import ast
import ctypes
from pathlib import Path

import llvmlite.binding as llvm
import torch

import fqt_compiler as fqt
from fqt_compiler.codegen import gemm as gemm_gen, pack as pack_gen, quantize as quantize_gen
from fqt_compiler.codegen.abi import KINDS
from fqt_compiler.codegen.targets import get_target
from fqt_compiler.runtime import jit

PACKAGE = Path(fqt.__file__).parent
IR_TYPES = {"ptr": "ptr", "i64": "i64", "u64": "i64", "f32": "float"}


def step_specs() -> set:
    """Every kernel spec one small training step (every kernel family) requests."""
    from fqt_compiler.cross.verify import OddShapes
    seen = set()

    def hook(spec, load):
        seen.add(spec)
        return load(spec)

    with torch.random.fork_rng():
        torch.manual_seed(0)
        compiled = fqt.compile(OddShapes(), fqt.Config(method="psq"))
        with jit.kernel_hook(hook):
            compiled(torch.randn(1, 3, 13, 17)).sum().backward()
    return seen


def test_every_runtime_signature_is_derived_from_the_ir():
    """Each kernel a step calls is called with ctypes types derived from its ABI, and its IR
    defines the ABI's symbol with the ABI's parameter names and types, in order."""
    specs = step_specs()
    assert {"binary", "bitplane", "rowpop", "sign_pack", "padded_rows", "im2col_pack",
            "transpose_bits", "minmax", "pack"} <= {s.family for s in specs}
    for spec in specs:
        fn = llvm.parse_assembly(spec.ir_text).get_function(spec.symbol)
        assert [a.name for a in fn.arguments] == list(spec.abi.names), spec.symbol
        assert [str(a.type) for a in fn.arguments] == [IR_TYPES[p.kind] for p in spec.abi.params]
        assert spec.argtypes == tuple(KINDS[p.kind][1] for p in spec.abi.params)


def test_no_runtime_wrapper_writes_ctypes_argument_types():
    """The wrappers name no ctypes scalar type: argument types can only come from the ABI."""
    for path in (PACKAGE / "runtime").glob("*.py"):
        names = {n.attr for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Attribute)}
        assert not {n for n in names if n.startswith("c_")}, path.name


def test_c_prototype_and_unsigned_key():
    """The C declaration as the docstring states the kernel; random-stream keys are unsigned."""
    kernel = pack_gen.sign_pack_ir(get_target("x86-64-v3"))
    assert kernel.abi.c_prototype() == ("void fqt_sign_pack(void *x, int64_t srow, int64_t k, void *out, "
                                        "int64_t ld, int64_t row0, int64_t row1);")
    assert kernel.abi.c_prototype("other").startswith("void other(void *x,")
    for ir in (quantize_gen.quantize_pack_ir("x86-64-v3", bits=2),
               quantize_gen.quantize_pack_rows_ir("x86-64-v3", bits=2)):
        kinds = dict((p.name, p.kind) for p in ir.abi.params)
        assert kinds["key"] == "u64" and ir.abi.argtypes[ir.abi.names.index("key")] is ctypes.c_uint64


def test_masked_intrinsics_need_no_auto_upgrade():
    """Every generator declares masked loads, stores, gathers and scatters with LLVM's current
    three-operand signature (alignment as a pointer attribute, no i32 operand), so no kernel
    relies on LLVM's auto-upgrader."""
    target = get_target("x86-64-v3")
    declared = 0
    for kernel in (pack_gen.unpack_ir(target), pack_gen.transpose_bits_ir(target),
                   quantize_gen.group_minmax_ir(target), gemm_gen.binary_gemm_ir(target, epilogue="scale_bias"),
                   gemm_gen.bitplane_gemm_ir(target, bits=2)):
        for line in kernel.text.splitlines():
            if line.startswith("declare") and "@\"llvm.masked." in line:
                declared += 1
                assert line.split("(", 1)[1].count(",") == 2, line
    assert declared >= 5
