"""The paper's ablations on scikit-learn's bundled digits.

    python examples/ablation.py [--quick | --tiny] [--models vgg,resnet] [--seeds 0,1,2]
                                [--epochs 5] [--backend kernels] [--out docs/results]

Protocol (the paper's fine-tuning setting, scaled down to digits upsampled to 16x16):
  1. pretrain the float32 model on classes 0-4 (upstream), then QAT (fqt method "none":
     binary forward, float gradients) on the same classes;
  2. fine-tune on classes 5-9 (downstream; fresh classifier) with every gradient method
     (qat, ptq b=1, psq b=1, aq_scq b=2/4/8, aq_opt b=2/4/8, topk b=4) and every optimizer
     (Adam, SGD, SGD momentum 0.9);
  3. train from scratch on classes 5-9 (random init, Adam) for qat, psq b=1, aq_scq b=4,
     aq_opt b=4;
  4. measure the per-layer gradient-quantizer variance E||Q(G') - G'||^2 over resampled
     draws on one fixed downstream batch, next to the docs/math.md §4 bound (``variance_bound``).

Test accuracy is measured in eval mode after ``fqt.recalibrate_bn`` re-estimated the
BatchNorm statistics on the training set with the final weights (``test_acc``), and before
it, with the running statistics training left behind (``test_acc_running``).

Outputs in --out: results.csv (one row per run), summary.csv and results.md (mean ± std over
seeds), losses.csv, variance.csv, accuracy.png, loss_curves.png, variance.png.
--quick: default model only, one seed, 3 epochs (a few minutes on 2 cores). --tiny (or
FQT_ABLATION_TINY=1): a smoke run for tests (tiny model, few steps, Adam only, few draws).
"""
from __future__ import annotations

import argparse
import copy
import csv
import math
import os
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.model_selection import train_test_split

import fqt_compiler as fqt
from fqt_compiler import zoo
from fqt_compiler.datasets import digits
from fqt_compiler.ops import reference

# name -> (fqt method, bits)
METHODS = {
    "qat": ("none", 1),
    "ptq_b1": ("ptq", 1),
    "psq_b1": ("psq", 1),
    "aq_scq_b2": ("aq_scq", 2),
    "aq_scq_b4": ("aq_scq", 4),
    "aq_scq_b8": ("aq_scq", 8),
    "aq_opt_b2": ("aq_opt", 2),
    "aq_opt_b4": ("aq_opt", 4),
    "aq_opt_b8": ("aq_opt", 8),
    "topk_b4": ("topk", 4),
}
SCRATCH = ("qat", "psq_b1", "aq_scq_b4", "aq_opt_b4")
OPTIMIZERS = ("adam", "sgd", "sgdm")
OPT_COLORS = {"adam": "tab:blue", "sgd": "tab:orange", "sgdm": "tab:green"}
LR = {"adam": 1e-3, "sgd": 0.05, "sgdm": 0.05}
MODELS = {
    "vgg": lambda width: zoo.vgg_small(num_classes=5, in_channels=1, width=0.5 * width),
    "resnet": lambda width: zoo.resnet_small(num_classes=5, in_channels=1, width=width),
}
VARIANCE_METHODS = {name: METHODS[name] for name in ("psq_b1", "aq_scq_b2", "aq_scq_b4", "aq_scq_b8",
                                                    "aq_opt_b2", "aq_opt_b4", "aq_opt_b8")}


# --------------------------------------------------------------------------- data

def load_data(seed: int, limit: int | None = None):
    """Digits upsampled to 16x16, standardised; stratified 75/25 split; upstream = classes
    0-4, downstream = classes 5-9 relabelled 0-4. ``limit`` caps each training set."""
    x, y = digits(16)
    tr, te = train_test_split(range(len(y)), test_size=0.25, random_state=seed,
                              stratify=y.numpy())
    tr, te = torch.tensor(tr), torch.tensor(te)
    parts = {}
    for part, lo in (("up", 0), ("down", 5)):
        tr_p = tr[(y[tr] >= lo) & (y[tr] < lo + 5)]
        te_p = te[(y[te] >= lo) & (y[te] < lo + 5)]
        if limit:
            tr_p = tr_p[:limit]
        parts[part] = (x[tr_p], y[tr_p] - lo, x[te_p], y[te_p] - lo)
    return parts


# --------------------------------------------------------------------------- training

def make_optimizer(name: str, params, lr_scale: float = 1.0):
    if name == "adam":
        return torch.optim.Adam(params, lr=LR[name] * lr_scale)
    if name == "sgd":
        return torch.optim.SGD(params, lr=LR[name] * lr_scale)
    if name == "sgdm":
        return torch.optim.SGD(params, lr=LR[name] * lr_scale, momentum=0.9)
    raise ValueError(name)


def run_training(net, params, data, opt_name, epochs, batch, seed, lr_scale=1.0):
    """Train ``net`` (eager or compiled) on ``data``'s training part; return per-step losses.
    The ragged last batch is dropped so a compiled net sees one shape (one compilation)."""
    x_train, y_train = data[0], data[1]
    opt = make_optimizer(opt_name, params, lr_scale)
    steps = max(1, len(y_train) // batch)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    net.train()
    for epoch in range(epochs):
        order = torch.randperm(len(y_train), generator=gen)
        for s in range(steps):
            idx = order[s * batch:(s + 1) * batch]
            loss = F.cross_entropy(net(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return losses


def accuracy(net, x, y) -> float:
    net.eval()
    with torch.no_grad():  # one batch: the eval graph compiles once
        acc = (net(x).argmax(1) == y).float().mean().item()
    net.train()
    return acc


def recalibrated_accuracy(net, data, batch) -> float:
    """Test accuracy after ``fqt.recalibrate_bn`` on the training set's full batches."""
    x_train = data[0]
    fqt.recalibrate_bn(net, [x_train[i:i + batch] for i in range(0, len(x_train) - batch + 1, batch)])
    return accuracy(net, data[2], data[3])


def fqt_config(method, bits, seed, args):
    return fqt.Config(method=method, bits=bits, seed=seed, backend=args.backend)


def pretrain(model_name, seed, parts, args):
    """Float32 then QAT on the upstream classes; returns the state dict and accuracies."""
    torch.manual_seed(seed)
    model = MODELS[model_name](args.width)
    up = parts["up"]
    run_training(model, model.parameters(), up, "adam", args.pretrain_epochs, args.batch, seed)
    fp_acc = accuracy(model, up[2], up[3])
    net = fqt.compile(model, fqt_config("none", 1, seed, args))
    run_training(net, model.parameters(), up, "adam", args.pretrain_epochs, args.batch, seed)
    qat_acc = accuracy(net, up[2], up[3])
    return copy.deepcopy(model.state_dict()), fp_acc, qat_acc


def downstream_model(model_name, state, seed, args):
    """The pretrained model (or a fresh one when ``state`` is None) with a new classifier."""
    torch.manual_seed(seed)
    model = MODELS[model_name](args.width)
    if state is not None:
        model.load_state_dict(state)
        torch.manual_seed(1000 + seed)
        model.classifier.reset_parameters()
    return model


_NETS: dict = {}


def compiled_for(model_name, method_name, seed, args):
    """One compiled net per (model, method), reused across runs: each run loads its start
    weights into the shared model in place (no recompilation; Dynamo's guards still hold)
    and sets the RNG seed and step of the compiled module, which are read per call."""
    key = (model_name, method_name, args.backend, args.width)
    if key not in _NETS:
        method, bits = METHODS[method_name]
        model = MODELS[model_name](args.width)
        _NETS[key] = (model, fqt.compile(model, fqt_config(method, bits, seed, args)))
    model, net = _NETS[key]
    method, bits = METHODS[method_name]
    net.fqt_config = fqt_config(method, bits, seed, args)
    net.fqt_step = 0
    return model, net


def train_method(model_name, state, method_name, opt_name, seed, parts, args):
    model, net = compiled_for(model_name, method_name, seed, args)
    with torch.no_grad():
        model.load_state_dict(downstream_model(model_name, state, seed, args).state_dict())
    down = parts["down"]
    start = time.perf_counter()
    losses = run_training(net, model.parameters(), down, opt_name, args.epochs, args.batch, seed)
    running = accuracy(net, down[2], down[3])
    acc = recalibrated_accuracy(net, down, args.batch)
    return acc, running, losses, time.perf_counter() - start


# --------------------------------------------------------------------------- variance

def _ste_sign(v):
    """sign (docs/math.md §2: 0 -> -1) with the straight-through gradient 1{|v| < 1}."""
    hard = torch.where(v > 0, 1.0, -1.0).to(v.dtype)
    soft = v * (v.abs() < 1).to(v.dtype)
    return hard.detach() + soft - soft.detach()


def capture_gprime(model, layers, x, y):
    """G' = alpha * dL/dY of every binarized layer on one batch, in the binarized network.

    An eager re-implementation of the docs/math.md §2 forward (sign of the zero-padded input and of
    the weight, per-channel alpha = mean|w| treated as a constant, STE) via forward hooks;
    the gradient w.r.t. the un-scaled output Y_raw is exactly G'. Gradients are float (QAT),
    as every method's quantizer sees them at this point of training."""
    store, handles = {}, []
    for name, _index in layers:
        module = model.get_submodule(name)

        def hook(mod, inputs, _out, name=name):
            x_in, w = inputs[0], mod.weight
            alpha = w.detach().abs().mean(dim=tuple(range(1, w.dim())))
            if isinstance(mod, nn.Conv2d):
                ph, pw = mod.padding
                xb = _ste_sign(F.pad(x_in, (pw, pw, ph, ph)))
                y_raw = F.conv2d(xb, _ste_sign(w), None, mod.stride, 0, mod.dilation)
                shape = (1, -1, 1, 1)
            else:
                y_raw = F.linear(_ste_sign(x_in), _ste_sign(w))
                shape = (1, -1)
            y_raw.register_hook(lambda g: store.__setitem__(name, g.detach().clone()))
            out = alpha.view(shape) * y_raw
            return out if mod.bias is None else out + mod.bias.view(shape)

        handles.append(module.register_forward_hook(hook))
    try:
        out = model(x)
        F.cross_entropy(out, y).backward()
    finally:
        for h in handles:
            h.remove()
    return store, out.detach()


def as_rows(g):
    """(g2d, rows_per_sample) of a layer's G' (conv NCHW -> [(n,h,w), o])."""
    if g.dim() == 4:
        return reference.conv_rows(g).contiguous(), g.shape[2] * g.shape[3]
    return g.reshape(-1, g.shape[-1]).contiguous(), 1


def variance_bound(g2d, method, path, bits, rows_per_sample):
    """docs/math.md §4 / Chen et al. 2020 bound on E||Q(G') - G'||^2 for one path.

    Group i (a sample's rows or a channel's column) has d_i elements, range R_i, keep
    probability p_i (1 without AQ) and B = 2^b - 1 levels. Stochastic rounding to a grid of
    step R_i/B has per-element variance <= (R_i/B)^2/4; a kept group is rescaled by 1/p_i, so
    E||m_i/p_i SR(G_i) - G_i||^2 = (1/p_i - 1)||G_i||^2 + Var_SR_i / p_i. Hence

        bound = sum_i [ (1/p_i - 1) ||G_i||^2 + d_i R_i^2 / (4 B^2 p_i) ]

    (groups with p_i = 0 contribute ||G_i||^2, their exact error). ``p_i`` are the method's
    own keep probabilities (aq_scq: proportional to R_i; aq_opt: the ones minimizing this
    bound)."""
    kind = reference.grouping(method, path)
    n, ids = reference.group_index(g2d, kind, rows_per_sample)
    lo, hi, _, prob = reference.sample_groups(g2d, method, path, bits, rows_per_sample=rows_per_sample,
                                              seed=0, step=0, layer=0)
    r = (hi - lo).double()
    d = torch.zeros(n, dtype=torch.float64).scatter_add_(0, ids.reshape(-1),
                                                         torch.ones(g2d.numel(), dtype=torch.float64))
    sq = torch.zeros(n, dtype=torch.float64).scatter_add_(0, ids.reshape(-1),
                                                          g2d.double().reshape(-1) ** 2)
    p = prob.double()
    levels = float(2 ** bits - 1)
    kept = p > 0
    pk = p[kept]
    return ((1 / pk - 1) * sq[kept] + d[kept] * r[kept] ** 2 / (4 * levels ** 2 * pk)).sum().item()


def measure_variance(model_name, state, seed, parts, args):
    """Per layer and path: measured E||Q(G') - G'||^2 over ``args.draws`` resampled draws
    (different RNG steps) of reference.quantize_gradient, and the bound."""
    model = downstream_model(model_name, state, seed, args)
    down = parts["down"]
    x, y = down[0][:args.batch], down[1][:args.batch]
    # The plan (which layers are binarized, their RNG layer ids) and a check that the eager
    # binarized forward matches the compiled one.
    net = fqt.compile(model, fqt_config("none", 1, seed, args))
    net.eval()
    with torch.no_grad():
        compiled_out = net(x)
    layers = [(lp.name, lp.index) for lp in net.fqt_graphs[0].plan if lp.binarize]
    model.eval()
    store, eager_out = capture_gprime(model, layers, x, y)
    forward_diff = (compiled_out - eager_out).abs().max().item()
    model.train()
    store, _ = capture_gprime(model, layers, x, y)  # training-mode BN, as in fine-tuning
    rows = []
    for name, index in layers:
        g2d, rps = as_rows(store[name])
        norm = g2d.double().pow(2).sum().item()
        for path in (reference.PATH_INPUT, reference.PATH_WEIGHT):
            for label, (method, bits) in VARIANCE_METHODS.items():
                errs = []
                for draw in range(args.draws):
                    q = reference.quantize_gradient(g2d, method, path, bits, rows_per_sample=rps,
                                                    seed=seed, step=draw, layer=index)
                    errs.append((q.dequantize().double() - g2d.double()).pow(2).sum().item())
                rows.append({
                    "model": model_name, "seed": seed, "layer": name, "layer_index": index,
                    "path": path, "method": label, "bits": bits,
                    "measured": sum(errs) / len(errs),
                    "measured_sem": (torch.tensor(errs).std().item() / math.sqrt(len(errs))
                                     if len(errs) > 1 else 0.0),
                    "bound": variance_bound(g2d, method, path, bits, rps),
                    "grad_sq_norm": norm, "draws": args.draws,
                })
    return rows, forward_diff


# --------------------------------------------------------------------------- reporting

def _read_csv(path):
    """Rows of a CSV this script wrote, numbers parsed (int, then float, else the string)."""
    def parse(v):
        for kind in (int, float):
            try:
                return kind(v)
            except ValueError:
                pass
        return v
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [{k: parse(v) for k, v in row.items()} for row in csv.DictReader(f)]


def merged_runs(dirs):
    """(results, losses, variance, pretraining accuracies, forward diffs) of several runs'
    output directories (the same settings, different seeds), as one run would hold them."""
    results, losses, variance, pre, diffs = [], {}, [], {}, {}
    for d in map(Path, dirs):
        results += _read_csv(d / "results.csv")
        variance += _read_csv(d / "variance.csv")
        for r in _read_csv(d / "losses.csv"):
            losses.setdefault((r["model"], r["protocol"], r["method"], r["optimizer"], r["seed"]), []).append(r["loss"])
        for r in _read_csv(d / "pretrain.csv"):
            pre[(r["model"], r["seed"])] = (r["fp32_acc"], r["qat_acc"])
            if r["forward_diff"] != "":
                diffs[r["model"]] = r["forward_diff"]
    return results, losses, variance, pre, diffs


def mean_std(values):
    t = torch.tensor(values, dtype=torch.float64)
    return t.mean().item(), (t.std().item() if len(values) > 1 else 0.0)


def summarize(results):
    groups = {}
    for r in results:
        groups.setdefault((r["model"], r["protocol"], r["method"], r["optimizer"]), []).append(r)
    return [{"model": k[0], "protocol": k[1], "method": k[2], "optimizer": k[3],
             "mean_acc": mean_std([r["test_acc"] for r in v])[0],
             "std_acc": mean_std([r["test_acc"] for r in v])[1],
             "mean_acc_running": mean_std([r["test_acc_running"] for r in v])[0],
             "std_acc_running": mean_std([r["test_acc_running"] for r in v])[1], "n_seeds": len(v)}
            for k, v in groups.items()]


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def markdown(summary, variance, pre, args, models, optimizers):
    lines = [f"# Ablation on digits (16x16): test accuracy, mean ± std over "
             f"{len(args.seed_list)} seed(s)", "",
             "Fine-tune: pretrained float32 + QAT on classes 0-4, then fine-tuned on classes 5-9 "
             "(5-way, chance 0.20). Scratch: random init, Adam, classes 5-9.",
             f"Budget: {args.epochs} epochs fine-tune/scratch, {args.pretrain_epochs} epochs each "
             f"for fp32 and QAT pretraining, batch {args.batch}, learning rates {LR} (SGD "
             f"momentum 0.9 for sgdm), backend {args.backend}, width x{args.width}.", ""]
    cols = [(m, o) for m in models for o in optimizers
            if any(s["model"] == m and s["optimizer"] == o for s in summary)]
    index = {(s["model"], s["protocol"], s["method"], s["optimizer"]): s for s in summary}
    for key, title in (("acc", "BatchNorm statistics recalibrated (`fqt.recalibrate_bn`) before "
                               "evaluation"),
                       ("acc_running", "without recalibration: the running statistics training "
                                       "left behind")):
        lines += [f"### {title}", "",
                  "| protocol | method | " + " | ".join(f"{m} {o}" for m, o in cols) + " |",
                  "|---|---|" + "---|" * len(cols)]
        for protocol, names in (("finetune", list(METHODS)), ("scratch", list(SCRATCH))):
            for name in names:
                cells = []
                for m, o in cols:
                    s = index.get((m, protocol, name, o))
                    cells.append(f"{100 * s['mean_' + key]:.1f} ± {100 * s['std_' + key]:.1f}" if s else "")
                if any(cells):
                    lines.append(f"| {protocol} | {name} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["", "Upstream (classes 0-4) test accuracy after pretraining: " + "; ".join(
        f"{m} seed {s}: fp32 {100 * a:.1f}, QAT {100 * b:.1f}" for (m, s), (a, b) in pre.items())]
    if variance:
        lines += ["", "## Gradient-quantizer variance (sum over binarized layers and both paths)",
                  "", "| model | method | measured E‖Q(G')−G'‖² | bound | measured / ‖G'‖² |",
                  "|---|---|---|---|---|"]
        for m in models:
            for label in VARIANCE_METHODS:
                rows = [v for v in variance if v["model"] == m and v["method"] == label]
                if not rows:
                    continue
                meas = sum(v["measured"] for v in rows)
                bound = sum(v["bound"] for v in rows)
                rel = meas / sum(v["grad_sq_norm"] for v in rows)
                lines.append(f"| {m} | {label} | {meas:.3e} | {bound:.3e} | {rel:.3f} |")
    return "\n".join(lines) + "\n"


def plots(out, summary, losses, variance, models, optimizers):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [("finetune", n) for n in METHODS] + [("scratch", n) for n in SCRATCH]
    fig, axes = plt.subplots(1, len(models), figsize=(7 * len(models), 4.5), squeeze=False)
    index = {(s["model"], s["protocol"], s["method"], s["optimizer"]): s for s in summary}
    width = 0.8 / len(optimizers)
    for ax, m in zip(axes[0], models):
        for j, o in enumerate(optimizers):
            xs, ys, es = [], [], []
            for i, (p, n) in enumerate(names):
                s = index.get((m, p, n, o))
                if s:
                    xs.append(i + (j - (len(optimizers) - 1) / 2) * width)
                    ys.append(s["mean_acc"])
                    es.append(s["std_acc"])
            if xs:
                ax.bar(xs, ys, width, yerr=es, label=o, capsize=2, color=OPT_COLORS[o])
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([n if p == "finetune" else f"{n}\n(scratch)" for p, n in names],
                           rotation=45, ha="right", fontsize=8)
        ax.set_ylim(0, 1)
        ax.axhline(0.2, color="gray", lw=0.5, ls="--")
        ax.set_ylabel("test accuracy (classes 5-9)")
        ax.set_title(f"{m}: accuracy per method (mean ± std over seeds)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(len(models), len(optimizers) + 1,
                             figsize=(4.2 * (len(optimizers) + 1), 3.4 * len(models)),
                             squeeze=False)
    for r, m in enumerate(models):
        for c, o in enumerate(list(optimizers) + ["scratch"]):
            ax = axes[r][c]
            protocol, opt = ("scratch", "adam") if o == "scratch" else ("finetune", o)
            for n in (SCRATCH if o == "scratch" else METHODS):
                curves = [l for (mm, p, nn_, oo, _s), l in losses.items()
                          if (mm, p, nn_, oo) == (m, protocol, n, opt)]
                if not curves:
                    continue
                t = torch.tensor(curves).mean(0)
                k = max(1, len(t) // 30)   # light smoothing: moving average over k steps
                if k > 1:
                    t = F.avg_pool1d(t.view(1, 1, -1), k, stride=1).view(-1)
                ax.plot(t.numpy(), label=n, lw=1)
            if not ax.lines:   # this optimizer was not run for this model
                ax.set_visible(False)
                continue
            ax.set_title(f"{m}: {'scratch (adam)' if o == 'scratch' else 'fine-tune ' + o}",
                         fontsize=9)
            ax.set_xlabel("step")
            ax.set_ylabel("train loss")
            ax.set_yscale("log")
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=100)
    plt.close(fig)

    if variance:
        fig, axes = plt.subplots(len(models), 2, figsize=(12, 3.8 * len(models)), squeeze=False)
        for r, m in enumerate(models):
            for c, path in enumerate((reference.PATH_INPUT, reference.PATH_WEIGHT)):
                ax = axes[r][c]
                for label, color in (("psq_b1", "tab:red"), ("aq_scq_b4", "tab:blue"), ("aq_opt_b4", "tab:green")):
                    rows = [v for v in variance if v["model"] == m and v["path"] == path
                            and v["method"] == label and v["seed"] == variance[0]["seed"]]
                    layers = [v["layer"] for v in rows]
                    ax.plot(range(len(rows)), [v["measured"] for v in rows], "o-", color=color,
                            label=f"{label} measured")
                    ax.plot(range(len(rows)), [v["bound"] for v in rows], "s--", color=color,
                            alpha=0.6, label=f"{label} bound")
                ax.set_xticks(range(len(layers)))
                ax.set_xticklabels(layers, rotation=45, ha="right", fontsize=7)
                ax.set_yscale("log")
                ax.set_ylabel("E‖Q(G')−G'‖²")
                ax.set_title(f"{m}: {path}-gradient path, per binarized layer", fontsize=9)
                ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "variance.png", dpi=110)
        plt.close(fig)


# --------------------------------------------------------------------------- main

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="default model, 1 seed, 3 epochs")
    parser.add_argument("--tiny", action="store_true",
                        help="smoke run for tests (also FQT_ABLATION_TINY=1)")
    parser.add_argument("--models", default="vgg,resnet")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS),
                        help="optimizers for the first (default) model")
    parser.add_argument("--other-optimizers", default="adam",
                        help="optimizers for the other models (keeps the full run short)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"subset of {', '.join(METHODS)} (scratch runs: those of "
                             f"{', '.join(SCRATCH)} included)")
    parser.add_argument("--epochs", type=int, default=5, help="fine-tune / scratch epochs")
    parser.add_argument("--pretrain-epochs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--width", type=float, default=1.0, help="model width multiplier")
    parser.add_argument("--draws", type=int, default=32, help="variance draws per layer/path")
    parser.add_argument("--limit", type=int, default=0, help="cap training-set sizes")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--backend", default="kernels", choices=("kernels", "reference"))
    parser.add_argument("--variance-seed", type=int, default=None,
                        help="the seed whose G' the variance table measures (default: the first "
                             "of --seeds; -1: none)")
    parser.add_argument("--merge", default="",
                        help="comma-separated --out directories of runs of the same settings on "
                             "other seeds: combine their tables into --out, train nothing")
    parser.add_argument("--out", default="docs/results")
    args = parser.parse_args(argv)
    if args.tiny or os.environ.get("FQT_ABLATION_TINY"):
        args.models, args.seeds, args.optimizers = "vgg", "0", "adam"
        args.epochs, args.pretrain_epochs, args.width = 1, 1, 0.5
        args.batch, args.limit, args.draws = 32, 64, 3
    elif args.quick:
        args.models, args.seeds, args.epochs, args.pretrain_epochs = "vgg", "0", 3, 3
    torch.set_num_threads(args.threads)
    models = args.models.split(",")
    optimizers = args.optimizers.split(",")
    methods = args.methods.split(",")
    unknown = [n for n in methods if n not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    other_optimizers = [o for o in args.other_optimizers.split(",") if o in optimizers]
    args.seed_list = [int(s) for s in args.seeds.split(",")]
    variance_seed = args.seed_list[0] if args.variance_seed is None else args.variance_seed
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    results, losses, variance, pre, diffs = [], {}, [], {}, {}
    t0 = time.perf_counter()
    if args.merge:
        results, losses, variance, pre, diffs = merged_runs(args.merge.split(","))
        args.seed_list = sorted({r["seed"] for r in results})
    for seed in [] if args.merge else args.seed_list:
        parts = load_data(seed, args.limit or None)
        for m in models:
            state, fp_acc, qat_acc = pretrain(m, seed, parts, args)
            pre[(m, seed)] = (fp_acc, qat_acc)
            print(f"[{time.perf_counter() - t0:6.0f}s] {m} seed {seed}: upstream fp32 "
                  f"{fp_acc:.3f} QAT {qat_acc:.3f}", flush=True)
            if seed == variance_seed:
                rows, diffs[m] = measure_variance(m, state, seed, parts, args)
                variance += rows
            opts = optimizers if m == models[0] else other_optimizers
            runs = [("finetune", n, o) for n in methods for o in opts]
            runs += [("scratch", n, "adam") for n in SCRATCH if n in methods]
            for protocol, name, opt in runs:
                acc, running, curve, seconds = train_method(
                    m, state if protocol == "finetune" else None, name, opt, seed, parts, args)
                method, bits = METHODS[name]
                results.append({"model": m, "protocol": protocol, "method": name,
                                "fqt_method": method, "bits": bits, "optimizer": opt,
                                "seed": seed, "test_acc": acc, "test_acc_running": running,
                                "final_loss": curve[-1],
                                "seconds": round(seconds, 2)})
                losses[(m, protocol, name, opt, seed)] = curve
                print(f"[{time.perf_counter() - t0:6.0f}s] {m} {protocol:8s} {name:9s} {opt:4s} "
                      f"seed {seed}: acc {acc:.3f} (running BN stats {running:.3f}) "
                      f"loss {curve[-1]:.3f}", flush=True)

    summary = summarize(results)
    write_csv(out / "results.csv", results)
    write_csv(out / "summary.csv", summary)
    write_csv(out / "losses.csv", [{"model": k[0], "protocol": k[1], "method": k[2],
                                    "optimizer": k[3], "seed": k[4], "step": i, "loss": v}
                                   for k, curve in losses.items() for i, v in enumerate(curve)])
    if variance:
        write_csv(out / "variance.csv", variance)
    if pre:
        write_csv(out / "pretrain.csv", [{"model": m, "seed": seed, "fp32_acc": a, "qat_acc": b,
                                          "forward_diff": diffs.get(m) if seed == variance_seed else ""}
                                         for (m, seed), (a, b) in pre.items()])
    md = markdown(summary, variance, pre, args, models, optimizers)
    md += "\nEager-vs-compiled binarized forward (eval), max |logit diff|: " + ", ".join(
        f"{m} {d:.2e}" for m, d in diffs.items()) + "\n"
    (out / "results.md").write_text(md)
    plots(out, summary, losses, variance, models, optimizers)
    print(md)
    print(f"total {time.perf_counter() - t0:.0f}s; outputs in {out}/")
    return summary, variance


if __name__ == "__main__":
    main()
