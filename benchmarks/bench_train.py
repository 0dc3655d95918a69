"""Training-step speed and memory, the paper's protocol (docs/math.md §7).

VGG-16 (CIFAR variant: first conv and classifier float) and torchvision ResNet-18, input
128x3x32x32, forward + backward timed with every preprocessing step inside the timed region
(optimizer step excluded for every contender), warm-up excluded, median of repeats, at 1
thread and at all threads; the repeats are interleaved rounds (each round times every
contender once), so a change in a shared host's load reaches every contender alike, and the
per-round FQT-vs-fp32 ratios are printed under each row. Contenders, measured side by side
in one run:

  fp32   the unmodified model in eager PyTorch, float32
  bf16   the same under ``torch.autocast("cpu", dtype=torch.bfloat16)``
  fqt    ``fqt.compile(model, Config(method="aq_scq", bits=4))`` on the JIT kernels
  inductor  ``torch.compile(model)`` (Inductor), float32: what a user would try first

in training-mode BN and in eval-mode BN (the paper timed the latter). Then a per-phase
breakdown of one FQT step (from ``fqt.runtime.stats()``; ``region_*`` are the fused
BatchNorm/activation/pool kernels; ``glue`` the kernel ops' Python and small torch ops
between their kernels; "float ops" is the rest: unfused float ops, the float layers,
autograd), the bytes saved for backward (every tensor autograd keeps, deduplicated by
storage; once in all and once without the model's parameters, which both contenders keep
resident anyway and which dominate at small batches), and the ``hygon`` (AVX2) kernels vs
float32 PyTorch limited to AVX2, in a subprocess whose oneDNN/MKL/ATen are capped before
torch is imported.

    python benchmarks/bench_train.py [--quick] [--models vgg16,resnet18] [--batch 128]
        [--contenders fp32,bf16,inductor,fqt] [--threads 1,2] [--bn train,eval]
        [--sections speed,breakdown,avx2]
"""
from __future__ import annotations

import argparse
import os
import sys
from contextlib import nullcontext

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import fqt_compiler as fqt  # noqa: E402
from benchmarks.common import (banner, contender_row, interleaved_medians, median_time,  # noqa: E402
                               paired_ratios, run_avx2_child)
from fqt_compiler import zoo  # noqa: E402
from fqt_compiler.runtime import kernel_stats as stats  # noqa: E402

PHASES = ("pack", "quantize", "forward", "input_grad", "weight_grad", "dequantize", "ste_mask",
          "region_forward", "region_backward", "float_conv", "glue")
MODELS = {"vgg16": zoo.vgg16_cifar, "resnet18": zoo.resnet18}


def step_fn(model, runner, x, y, autocast=False):
    """One forward + backward; the returned closure is what is timed."""
    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else nullcontext():
            loss = nn.functional.cross_entropy(runner(x), y)
        loss.backward()
    return step


def saved_bytes(step, parameters=()) -> tuple[int, int]:
    """Bytes of every tensor autograd saves for backward during ``step``, each storage once:
    ``(all, all but the storages of parameters)``."""
    seen = {}

    def pack(t):
        if isinstance(t, torch.Tensor) and t.device.type == "cpu":
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    params = {p.untyped_storage().data_ptr() for p in parameters}
    return sum(seen.values()), sum(n for ptr, n in seen.items() if ptr not in params)


def contenders(name, batch, train_bn, target="host"):
    torch.manual_seed(0)
    model = MODELS[name]()
    model.train(train_bn)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    compiled = fqt.compile(model, fqt.Config(method="aq_scq", bits=4, seed=0, target=target))
    compiled.train(train_bn)
    return model, {
        "fp32": step_fn(model, model, x, y),
        "bf16": step_fn(model, model, x, y, autocast=True),
        "fqt": step_fn(model, compiled, x, y),
        "inductor": step_fn(model, torch.compile(model), x, y),   # Inductor compiles on first call
    }


CONTENDERS = ("fp32", "bf16", "inductor", "fqt")


def run_speed(args, threads_list):
    results = {}
    for name in args.models:
        for train_bn in args.bn:
            _, steps = contenders(name, args.batch, train_bn)
            for threads in threads_list:
                torch.set_num_threads(threads)
                times, rounds = interleaved_medians({k: steps[k] for k in args.contenders},
                                                    repeats=args.repeats, warmup=2)
                results[(name, train_bn, threads)] = times
                bn = "train-BN" if train_bn else "eval-BN "
                print(f"{name:<9} {bn} {threads:>2} thr  {contender_row(times)}", flush=True)
                print(f"{'':<9} {'':<8} {'':>2}      {paired_ratios(rounds, 'fp32')}", flush=True)
    return results


def run_breakdown(args):
    torch.set_num_threads(1)
    for name in args.models:
        model, steps = contenders(name, args.batch, True)
        fqt_step = steps["fqt"]
        fqt_step()                                   # compile
        stats.reset_stats()
        total = median_time(fqt_step, repeats=1, warmup=0)
        by_kind = stats.stats().by_kind()
        print(f"\n-- {name}: one FQT step, 1 thread, train-BN: {total * 1e3:.1f} ms")
        print_phases(by_kind, total)
        # this step's stats only: saved_bytes below runs more steps
        binarized_in = sum(e.saved_bytes for (layer, kind), e in stats.stats().items() if kind == "forward")
        (fp32, fp32_act), (q, q_act) = (saved_bytes(steps[k], list(model.parameters())) for k in ("fp32", "fqt"))
        print(f"   saved for backward: fp32 {fp32 / 2**20:.1f} MiB, fqt {q / 2**20:.1f} MiB "
              f"({fp32 / q:.2f}x less); without parameters: fp32 {fp32_act / 2**20:.1f} MiB, fqt "
              f"{q_act / 2**20:.1f} MiB ({fp32_act / q_act:.2f}x less); packed inputs of binarized layers "
              f"{binarized_in / 2**20:.2f} MiB")
        compression = binarized_layer_compression(name, args.batch)
        print(f"   binarized layers' saved inputs: float32 {compression[0] / 2**20:.1f} MiB vs packed sign+STE "
              f"bits {compression[1] / 2**20:.2f} MiB = {compression[0] / compression[1]:.1f}x smaller")


def print_phases(by_kind, total: float) -> None:
    """Kernel time per phase of one FQT step (``stats().by_kind()``) and the rest ("float
    ops + rest": the float layers and ops, autograd, glue), as ms and share of ``total``."""
    kernel_time = 0.0
    for kind in PHASES:
        if kind in by_kind:
            e = by_kind[kind]
            kernel_time += e.seconds
            macs = f"{e.binary_macs / e.seconds / 1e9:8.1f} G binary MAC/s" if e.binary_macs else ""
            print(f"   {kind:<18} {e.seconds * 1e3:8.1f} ms  {100 * e.seconds / total:5.1f}%  {macs}")
    rest = total - kernel_time
    print(f"   {'float ops + rest':<18} {rest * 1e3:8.1f} ms  {100 * rest / total:5.1f}%")


def binarized_layer_compression(name, batch):
    """(float32 bytes of the binarized layers' inputs, bytes fqt keeps for them)."""
    torch.manual_seed(0)
    model = MODELS[name]()
    compiled = fqt.compile(model, fqt.Config())
    x = torch.randn(batch, 3, 32, 32)
    stats.reset_stats()
    with torch.no_grad():
        compiled.train()
        inputs = {}
        hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: inputs.__setitem__(n, inp[0].numel() * 4))
                 for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        model(x)
        for h in hooks:
            h.remove()
        compiled(x)
    packed = {layer: e.saved_bytes for (layer, kind), e in stats.stats().items() if kind == "forward"}
    return sum(inputs[n] for n in packed), sum(packed.values())


def avx2_child(args):
    """Runs in a subprocess with ``common.AVX2_ENV``: fp32 PyTorch capped at AVX2 vs fqt's hygon kernels."""
    torch.set_num_threads(1)
    for name in args.models:
        _, steps = contenders(name, args.batch, True, target="hygon")
        times, _ = interleaved_medians({k: steps[k] for k in ("fp32", "fqt")}, repeats=args.repeats, warmup=2)
        t32, tq = times["fp32"], times["fqt"]
        print(f"{name:<9} train-BN  1 thr  fp32(AVX2) {t32 * 1e3:8.1f} ms  fqt(hygon kernels) {tq * 1e3:8.1f} ms"
              f"   {t32 / tq:5.2f}x", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="vgg16,resnet18")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="batch 32, 3 repeats")
    p.add_argument("--contenders", default=",".join(CONTENDERS),
                   help="which of fp32,bf16,inductor,fqt to time (bf16 is slow on CPUs without bfloat16 "
                        "arithmetic; inductor compiles for minutes)")
    p.add_argument("--threads", default="", help="thread counts, e.g. 1,2 (default: 1 and all cores)")
    p.add_argument("--bn", default="train,eval", help="BatchNorm modes to time: train,eval")
    p.add_argument("--sections", default="speed,breakdown,avx2", help="which parts to run")
    p.add_argument("--avx2-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.models = args.models.split(",")
    args.contenders = [c for c in CONTENDERS if c in args.contenders.split(",")]
    args.bn = [mode == "train" for mode in args.bn.split(",")]
    sections = args.sections.split(",")
    if args.quick:
        args.batch, args.repeats = 32, 3
    if args.avx2_child:
        return avx2_child(args)
    banner(f"training step, batch {args.batch}x3x32x32, forward + backward, median of {args.repeats}")
    all_threads = os.cpu_count() or 1
    threads = ([int(t) for t in args.threads.split(",")] if args.threads
               else [1] if all_threads == 1 else [1, all_threads])
    print(f"threads: {threads} (torch and fqt kernels use the same count)\n")
    if "speed" in sections:
        run_speed(args, threads)
    if "breakdown" in sections:
        run_breakdown(args)
    if "avx2" in sections:
        run_avx2_child(__file__, ["--models", ",".join(args.models), "--batch", str(args.batch),
                                  "--repeats", str(args.repeats)])

if __name__ == "__main__":
    main()
