"""Shapes that vary: static graphs per shape vs one dynamic graph (issue 16).

A 2-layer BERT (hidden 128, 2 heads, intermediate 512; ``transformers``' BertForSequenceClassification)
trained with Adam on the kernels (aq_scq, b=4):

  varying   total wall time of ``--steps`` training steps whose sequence lengths are all
            distinct (every step a new shape), compiles included: ``Config(dynamic=False)``
            (a Dynamo + AOTAutograd + pass pipeline run per length) vs ``dynamic="auto"``
            (static first graph, then one graph for every length; a length of 1 would be
            Dynamo's own third graph, so lengths start at 2). Each contender runs in its own
            process, so neither finds the other's compiled code or Dynamo state.
  fixed     the per-step cost of a dynamic graph at one shape: median step time of the
            dynamic graph (compiled with ``dynamic=True``) vs a static compile of that shape,
            their steps interleaved (after one warm-up step each).

    python benchmarks/bench_dynamic.py [--quick] [--threads N] [--steps 20] [--batch 8]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from functools import partial

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import fqt_compiler as fqt  # noqa: E402
from benchmarks.common import banner  # noqa: E402

VOCAB, LABELS = 1000, 3


def bert(hidden: int):
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=4 * hidden,
                        max_position_embeddings=512, num_labels=LABELS)
    return BertForSequenceClassification(config)


def batch_of(length: int, batch: int, gen: torch.Generator):
    return (torch.randint(0, VOCAB, (batch, length), generator=gen),
            torch.randint(0, LABELS, (batch,), generator=gen))


def train_steps(compiled, opt, lengths, batch, gen) -> None:
    for length in lengths:
        ids, labels = batch_of(length, batch, gen)
        loss = compiled(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def varying(args, dynamic) -> dict:
    """One contender of the varying-length run (in its own process)."""
    model = bert(args.hidden)
    compiled = fqt.compile(model, fqt.Config(dynamic=dynamic))
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    lengths = random.Random(0).sample(range(2, args.max_length + 1), args.steps)
    gen = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    train_steps(compiled, opt, lengths, args.batch, gen)
    return {"seconds": time.perf_counter() - start, "graphs": len(compiled.fqt_graphs)}


def fixed(args) -> dict:
    """Median step time at one shape: a static compile vs a dynamic graph, their steps
    interleaved so that a load change on a shared machine hits both alike."""
    steps, times, dims = {}, {}, {}
    for name, dynamic in (("static", False), ("dynamic", True)):
        model = bert(args.hidden)
        compiled = fqt.compile(model, fqt.Config(dynamic=dynamic))
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        gen = torch.Generator().manual_seed(0)
        steps[name] = partial(train_steps, compiled, opt, [args.length], args.batch, gen)
        steps[name]()    # compiles
        dims[name] = compiled.fqt_graphs[-1].dynamic
        times[name] = []
    for _ in range(args.repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()} | {"dynamic_dims": dims["dynamic"]}


def child(args) -> None:
    torch.set_num_threads(args.threads)
    result = fixed(args) if args.child == "fixed" else varying(
        args, {"static": False, "auto": "auto"}[args.child])
    print("RESULT " + json.dumps(result, default=str))


def run_child(args, which: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", which]
    for key in ("threads", "steps", "batch", "hidden", "max_length", "length", "repeats"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 steps, short lengths, 3 repeats")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--length", type=int, default=64, help="the fixed shape's sequence length")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--child", choices=("static", "auto", "fixed"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.steps, args.max_length, args.length, args.repeats = 5, 32, 16, 3
    if args.child:
        return child(args)
    banner("dynamic shapes: BERT training steps, static graphs per shape vs one dynamic graph")
    print(f"threads: {args.threads} (torch and fqt kernels); BERT 2 layers, hidden {args.hidden}, "
          f"batch {args.batch}; aq_scq b=4 on the kernels\n")
    static, auto = run_child(args, "static"), run_child(args, "auto")
    print(f"{args.steps} steps, {args.steps} distinct lengths in [2, {args.max_length}], "
          f"compiles included:")
    print(f"  dynamic=False  {static['seconds']:8.1f} s  ({static['graphs']} graphs)")
    print(f"  dynamic=auto   {auto['seconds']:8.1f} s  ({auto['graphs']} graphs)  "
          f"{static['seconds'] / auto['seconds']:.2f}x faster")
    fix = run_child(args, "fixed")
    print(f"\none shape (batch {args.batch}, length {args.length}), median step of {args.repeats}:")
    print(f"  static graph   {fix['static'] * 1e3:8.1f} ms")
    print(f"  dynamic graph  {fix['dynamic'] * 1e3:8.1f} ms  ({fix['dynamic'] / fix['static'] - 1:+.1%}; "
          f"dynamic dims {fix['dynamic_dims']})")


if __name__ == "__main__":
    main()
