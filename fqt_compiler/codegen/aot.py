"""Ahead-of-time kernels for another CPU: exactly the kernels one training step requests.

``record_kernels`` runs one compiled training step on this machine with the model compiled
for the *target* (``Config(target=...)``), so every runtime wrapper picks the target's tile,
vector width and blocking; the ``jit.kernel`` hook records each request (family, params,
layer, the integer arguments of its first call per layer) and, when the target cannot run
here, runs the same family and parameters compiled for the host in its place.
``emit_kernels`` regenerates each recorded kernel's IR for the target and writes one object
and one assembly file, a C header, a JSON manifest and, where a linker for the target is
installed, a shared library.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import llvmlite.binding as llvm
import torch

from ..runtime import jit, stats
from .targets import Target, get_target, host_target, runs_on_host

# LLVM IR types of kernel parameters -> C types (the wrappers pass int64 sizes, uint64 keys,
# float constants and pointers; nothing else appears in a kernel signature).
_C_TYPES = {"ptr": "void *", "i64": "int64_t", "i32": "int32_t", "float": "float", "double": "double"}
_CTYPES_C = {"c_void_p": "void *", "c_int64": "int64_t", "c_long": "int64_t", "c_uint64": "uint64_t",
             "c_ulong": "uint64_t", "c_float": "float", "c_int32": "int32_t", "c_int": "int32_t"}

# gcc that links shared libraries / static executables for a target architecture.
LINKERS = {"aarch64": "aarch64-linux-gnu-gcc", "x86_64": "gcc"}


@dataclass
class KernelUse:
    """One kernel a step requested: its spec for the target and where it was used."""

    spec: jit.KernelSpec
    layers: list = field(default_factory=list)
    calls: dict = field(default_factory=dict)       # layer -> {parameter name: int} of the first call

    @property
    def symbol(self) -> str:
        """Unique exported name: specializations of one family share the generator's symbol."""
        return f"{self.spec.symbol}_{hashlib.sha256(self.spec.ir_text.encode()).hexdigest()[:10]}"


def parameter_names(spec: jit.KernelSpec) -> list[str]:
    return [a.name for a in llvm.parse_assembly(spec.ir_text).get_function(spec.symbol).arguments]


def stand_in(spec: jit.KernelSpec, load):
    """The callable for ``spec``: itself where it runs here, else the host build of the same
    family and parameters (the computation a kernel performs does not depend on its target)."""
    return load(spec if runs_on_host(spec.target) else spec.for_target(host_target()))


def compile_for(model_or_compiled, target: Target):
    """An ``FQTModule`` of the model whose kernels are requested for ``target``."""
    import fqt_compiler as fqt
    if isinstance(model_or_compiled, fqt.FQTModule):
        config = dataclasses.replace(model_or_compiled.fqt_config, target=target.name)
        return fqt.compile(model_or_compiled.module, config)
    return fqt.compile(model_or_compiled, fqt.Config(target=target.name))


def training_step(compiled, example_inputs) -> None:
    compiled.train()
    out = compiled(*example_inputs)
    out.float().sum().backward()


def record_kernels(model_or_compiled, example_inputs, target) -> list[KernelUse]:
    """Every kernel one training step of the model on ``example_inputs`` requests for ``target``."""
    target = get_target(target)
    compiled = compile_for(model_or_compiled, target)
    uses: dict[jit.KernelSpec, KernelUse] = {}

    def hook(spec, load):
        fn = stand_in(spec, load)
        layer = stats.current_layer.get() or "?"
        use = uses.setdefault(spec, KernelUse(spec))
        if layer not in use.layers:
            use.layers.append(layer)
        if layer in use.calls:
            return fn
        names = parameter_names(spec)

        def first_call(*args):
            use.calls.setdefault(layer, {n: a for n, a, t in zip(names, args, spec.argtypes)
                                         if t.__name__ in ("c_int64", "c_long", "c_float")})
            return fn(*args)
        return first_call

    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    with jit.kernel_hook(hook), torch.random.fork_rng():
        training_step(compiled, example_inputs)
    return list(uses.values())


def c_prototype(use: KernelUse) -> str:
    """The C declaration of a kernel, from its IR signature (checked against the wrapper's
    ctypes argument types, which is how the runtime calls it)."""
    fn = llvm.parse_assembly(use.spec.ir_text).get_function(use.spec.symbol)
    params = []
    for arg, ctype in zip(fn.arguments, use.spec.argtypes, strict=True):
        c = _C_TYPES[str(arg.type)]
        if ctype.__name__ in ("c_uint64", "c_ulong") and c == "int64_t":
            c = "uint64_t"          # LLVM integers carry no sign; the wrapper passes the key unsigned
        if c != _CTYPES_C[ctype.__name__]:
            raise AssertionError(f"{use.spec.symbol}: IR parameter {arg.name} is {arg.type}, "
                                 f"the runtime passes {ctype.__name__}")
        params.append(f"{c}{'' if c.endswith('*') else ' '}{arg.name}")
    return f"void {use.symbol}({', '.join(params)});"


def combined_module(uses: list[KernelUse], target: Target) -> str:
    """One IR module with every kernel renamed to its unique symbol; helpers and tables get
    internal linkage so modules of different specializations link without clashes."""
    main = llvm.parse_assembly("")
    main.triple = target.triple
    for use in uses:
        mod = llvm.parse_assembly(use.spec.for_target(target).ir_text)
        for fn in mod.functions:
            if fn.is_declaration:
                continue
            if fn.name == use.spec.symbol:
                fn.name = use.symbol
            else:
                fn.linkage = llvm.Linkage.internal
        for g in mod.global_variables:
            if not g.is_declaration:
                g.linkage = llvm.Linkage.internal
        main.link_in(mod)
    return str(main)


def linker(target: Target) -> str | None:
    return shutil.which(LINKERS.get(target.arch, ""))


@dataclass
class Emitted:
    out_dir: Path
    target: Target
    uses: list
    files: dict
    linker_message: str

    def summary(self) -> str:
        lines = [f"{len(self.uses)} kernels for {self.target.name} ({self.target.triple}, "
                 f"cpu {self.target.cpu}, {self.target.features}) in {self.out_dir}"]
        lines += [f"  {kind:9s} {path}" for kind, path in self.files.items()]
        lines.append(self.linker_message)
        return "\n".join(lines)


def emit_kernels(model_or_compiled, example_inputs, target="rpi4", out_dir="build/kernels") -> Emitted:
    """Emit every kernel one training step of the model needs, built for ``target``, into
    ``out_dir``: ``fqt_kernels.o``/``.s``, ``fqt_kernels.h``, ``manifest.json`` and
    ``libfqt_kernels.so`` where the target's gcc is installed."""
    target = get_target(target)
    uses = record_kernels(model_or_compiled, example_inputs, target)
    # The spec recorded is the target's own (the step ran with Config(target=...)).
    uses = [KernelUse(u.spec.for_target(target), u.layers, u.calls) for u in uses]
    return write_kernels(uses, target, out_dir)


def write_kernels(uses: list[KernelUse], target: Target, out_dir) -> Emitted:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = combined_module(uses, target)
    files = {"object": out / "fqt_kernels.o", "assembly": out / "fqt_kernels.s",
             "header": out / "fqt_kernels.h", "manifest": out / "manifest.json"}
    files["object"].write_bytes(jit.compile_object(text, target))
    files["assembly"].write_text(jit.compile_assembly(text, target))
    guard = "FQT_KERNELS_H"
    header = [f"/* fqt-compiler kernels for {target.name}: {target.triple}, cpu {target.cpu}, "
              f"features {target.features}. Generated; see manifest.json for shapes. */",
              f"#ifndef {guard}", f"#define {guard}", "#include <stdint.h>", "",
              '#ifdef __cplusplus\nextern "C" {\n#endif']
    for use in uses:
        header.append(f"/* {use.spec.family} {_params(use.spec)}; layers: {', '.join(use.layers)} */")
        header.append(c_prototype(use))
    header += ["#ifdef __cplusplus\n}\n#endif", f"#endif  /* {guard} */", ""]
    files["header"].write_text("\n".join(header))
    manifest = {"target": target.name, "triple": target.triple, "cpu": target.cpu,
                "features": target.features, "kernels": [
                    {"symbol": u.symbol, "kernel": u.spec.family, "generator_symbol": u.spec.symbol,
                     "params": _params(u.spec), "layers": u.layers, "shapes": u.calls,
                     "prototype": c_prototype(u)} for u in uses]}
    files["manifest"].write_text(json.dumps(manifest, indent=1))
    gcc = linker(target)
    if gcc is None:
        message = (f"no linker for {target.arch} found ({LINKERS.get(target.arch)}): shared library "
                   f"not built (Debian: apt-get install gcc-aarch64-linux-gnu)")
    else:
        lib = out / "libfqt_kernels.so"
        subprocess.run([gcc, "-shared", "-o", str(lib), str(files["object"])], check=True,
                       capture_output=True, text=True)
        files["library"] = lib
        message = f"linked {lib} with {gcc}"
    return Emitted(out, target, uses, files, message)


def _params(spec: jit.KernelSpec) -> str:
    return ", ".join(str(p) for p in spec.params)
