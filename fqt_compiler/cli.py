"""The ``fqt-compiler`` command. Each subcommand is one ``add_<name>(subparsers)`` function
that declares its arguments and sets ``run``; list it in ``COMMANDS`` to add it."""
from __future__ import annotations

import argparse
import sys

import torch


def load_factory(spec: str):
    """``pkg.module:factory`` -> the callable (called with no arguments to build the model)."""
    from .config import import_object
    try:
        return import_object(spec)
    except ValueError as e:
        raise SystemExit(str(e)) from None


def shape(text: str) -> tuple[int, ...]:
    return tuple(int(d) for d in text.split(","))


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """The Config fields every model-taking subcommand accepts."""
    from .codegen.targets import PRESET_NAMES
    from .config import ALPHAS, METHODS
    from .ops.reference import BITS
    from .ops.registry import BACKENDS
    p.add_argument("--method", default="aq_scq", choices=METHODS)
    p.add_argument("--bits", type=int, default=4, choices=BITS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="kernels", choices=BACKENDS)
    p.add_argument("--target", default="host", choices=PRESET_NAMES)
    p.add_argument("--alpha", default="mean", choices=ALPHAS)


def config_from(args):
    from .config import Config
    return Config(method=args.method, bits=args.bits, seed=args.seed, backend=args.backend,
                  target=args.target, alpha=args.alpha)


def run_dump(args) -> int:
    import fqt_compiler as fqt
    model = load_factory(args.model)()
    compiled = fqt.compile(model, config_from(args))
    compiled.train()
    out = compiled(torch.randn(args.input_shape))
    out.float().sum().backward()  # compiles the backward graph so it can be dumped
    paths = fqt.dump(compiled, args.out)
    print(fqt.summary(compiled))
    print(f"wrote {len(paths)} files to {args.out}")
    return 0


def add_dump(subparsers) -> None:
    p = subparsers.add_parser("dump", help="compile a model, run one training step on random "
                              "input, write its forward/backward graphs and summary")
    p.add_argument("model", help="MODULE:FACTORY building the nn.Module, e.g. "
                   "torchvision.models:resnet18")
    p.add_argument("--input-shape", type=shape, required=True, help="e.g. 1,3,32,32")
    p.add_argument("--out", required=True, help="directory for the graph files")
    add_config_arguments(p)
    p.set_defaults(run=run_dump)


def run_kernels(args) -> int:
    import fqt_compiler as fqt
    emitted = fqt.emit_kernels(load_factory(args.model)(), (torch.randn(args.input_shape),),
                               target=args.target, out_dir=args.out)
    print(emitted.summary())
    if args.report:
        import shutil
        from .cross import mca
        if not shutil.which(mca.LLVM_MCA):
            print(f"--report: {mca.LLVM_MCA} not found (Debian: apt-get install llvm)")
            return 1
        print(mca.format_report(mca.mca_report(emitted), emitted.target))
    return 0


def add_kernels(subparsers) -> None:
    p = subparsers.add_parser("kernels", help="emit the kernels one training step of a model "
                              "needs for a target: .o/.s, C header, manifest, shared library")
    p.add_argument("model", help="MODULE:FACTORY, e.g. fqt_compiler.zoo:resnet18")
    p.add_argument("--input-shape", type=shape, required=True, help="e.g. 128,3,32,32")
    p.add_argument("--target", required=True, help="rpi4, rpi5, aarch64, hygon, x86-64-v3, ...")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--report", action="store_true", help="llvm-mca estimate of each GEMM micro-kernel's "
                   "inner loop: cycles, binary MACs per cycle, vs the CPU's fp32 FMA peak")
    p.set_defaults(run=run_kernels)


def run_verify(args) -> int:
    from .codegen.targets import get_target
    from .cross.verify import odd_shapes, table, verify, verify_calls
    target = get_target(args.target)
    models = args.model or ([] if args.odd_shapes else DEFAULT_VERIFY_MODELS)
    ok = True
    for spec in models:
        torch.manual_seed(0)
        results = verify(load_factory(spec)(), (torch.randn(args.input_shape),), target)
        print(table(results, target, f"{spec} training step, input {args.input_shape}"))
        ok &= all(r.passed for r in results)
    if args.odd_shapes or not args.model:
        results = verify_calls(odd_shapes(target), target)
        print(table(results, target, "odd shapes (K = 1, 63, 64, 65; M or N = 1; stride 2, padding 1 and 2, "
                                     "dilation 2)"))
        ok &= all(r.passed for r in results)
    return 0 if ok else 1


DEFAULT_VERIFY_MODELS = ["fqt_compiler.zoo:resnet18", "fqt_compiler.zoo:vgg16_cifar"]


def add_verify(subparsers) -> None:
    p = subparsers.add_parser("verify", help="run a training step's kernels built for a target "
                              "(natively or under qemu) and compare them with the host and with the "
                              "pure-PyTorch reference, bit for bit")
    p.add_argument("--target", required=True)
    p.add_argument("--model", action="append", default=None,
                   help="MODULE:FACTORY (repeatable; default: zoo resnet18 and vgg16_cifar, "
                        "then the odd-shape cases)")
    p.add_argument("--odd-shapes", action="store_true",
                   help="run the odd-shape cases (alone, or after the --model steps)")
    p.add_argument("--input-shape", type=shape, default=(2, 3, 32, 32))
    p.set_defaults(run=run_verify)


BENCHMARKS = ("gemm", "preprocess", "train")


def run_bench(args) -> int:
    import os
    import subprocess
    from pathlib import Path
    script = Path(__file__).resolve().parent.parent / "benchmarks" / f"bench_{args.which}.py"
    if not script.exists():
        raise SystemExit(f"{script} not found: the benchmarks live in the source checkout "
                         f"(install with pip install -e . from a clone to use fqt-compiler bench)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(script.parent.parent),
                                                                      os.environ.get("PYTHONPATH")]))}
    return subprocess.call([sys.executable, str(script), *args.rest], env=env)


def add_bench(subparsers) -> None:
    p = subparsers.add_parser("bench", help="run a benchmark from benchmarks/ (gemm: popcount GEMMs "
                              "vs torch.mm; preprocess: packing/quantization GB/s; train: the paper's "
                              "training-step protocol vs PyTorch fp32/bf16)")
    p.add_argument("which", choices=BENCHMARKS)
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for the benchmark (e.g. --quick)")
    p.set_defaults(run=run_bench)


COMMANDS = [add_dump, add_kernels, add_verify, add_bench]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fqt-compiler", description=__doc__.split("\n")[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(subparsers)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
