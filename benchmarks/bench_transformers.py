"""Training-step speed of transformers: a BERT-style encoder and timm's ViT-tiny.

Models (random init, no download):

  bert  transformers ``BertForSequenceClassification`` from ``BertConfig(hidden_size=512,
        num_hidden_layers=4, num_attention_heads=8, intermediate_size=2048)``, batch 32 x 128
        tokens (the issue's encoder; dropout on, as in training)
  vit   timm ``vit_tiny_patch16_224`` at 64x64 (``img_size=64``, 10 classes), batch 32

One step = forward + cross-entropy + backward + SGD step, every contender on its own copy of
the same weights, measured side by side in one run at 1 and 2 threads, warm-up (and
compilation) excluded, median of repeats, the repeats interleaved (each round times every
contender once, so a change in a shared host's load reaches all of them; the per-round
FQT-vs-fp32 ratios are printed under each row):

  fp32      eager PyTorch, float32
  bf16      eager under ``torch.autocast("cpu", dtype=torch.bfloat16)``
  compiled  ``torch.compile`` (Inductor), float32
  fqt       ``fqt.compile(model, Config(method="aq_scq", bits=4))`` on the JIT kernels

Then the per-phase breakdown of one FQT step at 1 thread (``fqt.runtime.stats()``; "float
ops + rest" is softmax and attention's products, residual adds, the float first/last layers,
autograd and glue; the fused LayerNorm, linear -> GELU and dropout kernels are the
``region_*`` phases), and the bytes autograd saves for backward in one step of fp32 and of
fqt (every saved tensor, each storage once; once in all and once without the parameters).

With ``--sections ...,avx2``, a subprocess whose float32 PyTorch is limited to AVX2 (oneDNN,
MKL and ATen capped before torch is imported) times it against the ``hygon`` (AVX2) kernels
at 1 thread: what a CPU without AVX-512 (a Hygon or Zen 1-3 host) would show, on this one.

    python benchmarks/bench_transformers.py [--models bert,vit] [--repeats 3] [--threads 1,2]
        [--contenders fp32,bf16,compiled,fqt] [--sections speed,breakdown,avx2]
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
from contextlib import nullcontext

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import fqt_compiler as fqt  # noqa: E402
from benchmarks.bench_train import print_phases, saved_bytes  # noqa: E402
from benchmarks.common import (banner, contender_row, interleaved_medians, median_time,  # noqa: E402
                               paired_ratios, run_avx2_child)
from fqt_compiler.runtime import kernel_stats as stats  # noqa: E402


def bert(batch):
    import transformers
    config = transformers.BertConfig(hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
                                     intermediate_size=2048, num_labels=2)
    model = transformers.BertForSequenceClassification(config)
    return model, torch.randint(0, config.vocab_size, (batch, 128)), torch.randint(0, 2, (batch,))


def vit(batch):
    import timm
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=10)
    return model, torch.randn(batch, 3, 64, 64), torch.randint(0, 10, (batch,))


MODELS = {"bert": bert, "vit": vit}


def step_fn(model, runner, x, y, autocast=False):
    """One forward + backward + SGD step of ``runner`` (which trains ``model``'s parameters)."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else nullcontext():
            out = runner(x)
            logits = out.logits if hasattr(out, "logits") else out
            loss = nn.functional.cross_entropy(logits.float(), y)
        loss.backward()
        opt.step()
    return step


def contenders(name, batch, target="host"):
    torch.manual_seed(0)
    model, x, y = MODELS[name](batch)
    model.train()
    inductor, quantized = copy.deepcopy(model), copy.deepcopy(model)
    compiled = fqt.compile(quantized, fqt.Config(method="aq_scq", bits=4, seed=0, target=target))
    return {
        "fp32": step_fn(model, model, x, y),
        "bf16": step_fn(model, model, x, y, autocast=True),
        "compiled": step_fn(inductor, torch.compile(inductor), x, y),   # Inductor compiles on first call
        "fqt": step_fn(quantized, compiled, x, y),
    }, compiled, {"fp32": model, "fqt": quantized}


CONTENDERS = ("fp32", "bf16", "compiled", "fqt")


def run(args):
    for name in args.models:
        steps, compiled, models = contenders(name, args.batch)
        if "speed" in args.sections:
            for threads in args.threads:
                torch.set_num_threads(threads)
                t, rounds = interleaved_medians({k: steps[k] for k in args.contenders}, repeats=args.repeats,
                                                warmup=1)
                print(f"{name:<5} {threads} thr  {contender_row(t)}", flush=True)
                print(f"{'':<5}        {paired_ratios(rounds, 'fp32')}", flush=True)
        if "breakdown" not in args.sections:
            continue
        torch.set_num_threads(1)
        steps["fqt"]()                    # kernels for this thread count are compiled outside the timed step
        stats.reset_stats()
        total = median_time(steps["fqt"], repeats=1, warmup=0)
        plan = {layer.name: layer for cg in compiled.fqt_graphs for layer in cg.plan if layer.shapes}
        print(f"\n-- {name}: one FQT step, 1 thread: {total * 1e3:.1f} ms; "
              f"{sum(layer.binarize for layer in plan.values())}/{len(plan)} layers binarized")
        print_phases(stats.stats().by_kind(), total)
        (fp32, fp32_act), (q, q_act) = (saved_bytes(steps[k], list(models[k].parameters())) for k in ("fp32", "fqt"))
        print(f"   saved for backward: fp32 {fp32 / 2**20:.1f} MiB, fqt {q / 2**20:.1f} MiB ({fp32 / q:.2f}x less); "
              f"without parameters: fp32 {fp32_act / 2**20:.1f} MiB, fqt {q_act / 2**20:.1f} MiB "
              f"({fp32_act / q_act:.2f}x less)")
        print()


def avx2_child(args):
    """Runs in a subprocess with ``common.AVX2_ENV``: fp32 PyTorch capped at AVX2 vs fqt's hygon kernels."""
    torch.set_num_threads(1)
    for name in args.models:
        steps, _, _ = contenders(name, args.batch, target="hygon")
        times, rounds = interleaved_medians({k: steps[k] for k in ("fp32", "fqt")}, repeats=args.repeats, warmup=1)
        t32, tq = times["fp32"], times["fqt"]
        print(f"{name:<5} 1 thr  fp32(AVX2) {t32 * 1e3:8.1f} ms  fqt(hygon kernels) {tq * 1e3:8.1f} ms"
              f"   {t32 / tq:5.2f}x", flush=True)
        print(f"{'':<5}        {paired_ratios(rounds, 'fp32')}", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="bert,vit")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--contenders", default=",".join(CONTENDERS),
                   help="which of fp32,bf16,compiled,fqt to time (bf16 is slow on CPUs without bfloat16 "
                        "arithmetic; torch.compile compiles for minutes)")
    p.add_argument("--sections", default="speed,breakdown",
                   help="which parts to run: speed,breakdown,avx2 (avx2: the hygon kernels vs float32 PyTorch "
                        "limited to AVX2, in a subprocess, 1 thread)")
    p.add_argument("--avx2-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.sections = args.sections.split(",")
    args.contenders = [c for c in CONTENDERS if c in args.contenders.split(",")]
    if "fqt" not in args.contenders:
        p.error("--contenders must include fqt: the breakdown and the ratios are FQT's")
    args.models = args.models.split(",")
    args.threads = [int(t) for t in args.threads.split(",")]
    if args.avx2_child:
        return avx2_child(args)
    banner(f"transformer training step (forward + backward + SGD), batch {args.batch}, "
           f"median of {args.repeats}")
    run(args)
    if "avx2" in args.sections:
        run_avx2_child(__file__, ["--models", ",".join(args.models), "--batch", str(args.batch),
                                  "--repeats", str(args.repeats)])


if __name__ == "__main__":
    main()
