"""Ahead-of-time kernels for another CPU: exactly the kernels one training step requests.

``emit_kernels`` records them (``record.record_kernels``), regenerates each one's IR for the
target and writes one object and one assembly file, a C header and a JSON manifest (both
derived from each kernel's ABI) and, where a linker for the target is installed, a shared
library.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import llvmlite.binding as llvm

from ..codegen.targets import Target, get_target
from ..runtime import jit
from .record import KernelUse, record_kernels

# gcc that links shared libraries / static executables for a target architecture.
LINKERS = {"aarch64": "aarch64-linux-gnu-gcc", "x86_64": "gcc"}


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
    optimized = jit.optimize(text, target)   # once: -O3 over every kernel is most of the time
    files["assembly"].write_text(target.create_target_machine().emit_assembly(optimized.clone()))
    files["object"].write_bytes(target.create_target_machine().emit_object(optimized))
    guard = "FQT_KERNELS_H"
    header = [f"/* fqt-compiler kernels for {target.name}: {target.triple}, cpu {target.cpu}, "
              f"features {target.features}. Generated; see manifest.json for shapes. */",
              f"#ifndef {guard}", f"#define {guard}", "#include <stdint.h>", "",
              '#ifdef __cplusplus\nextern "C" {\n#endif']
    for use in uses:
        header.append(f"/* {use.spec.family} {use.options}; layers: {', '.join(use.layers)} */")
        header.append(use.prototype)
    header += ["#ifdef __cplusplus\n}\n#endif", f"#endif  /* {guard} */", ""]
    files["header"].write_text("\n".join(header))
    manifest = {"target": target.name, "triple": target.triple, "cpu": target.cpu,
                "features": target.features, "kernels": [
                    {"symbol": u.symbol, "kernel": u.spec.family, "generator_symbol": u.spec.symbol,
                     "options": u.options, "layers": u.layers, "shapes": u.calls,
                     "prototype": u.prototype} for u in uses]}
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
