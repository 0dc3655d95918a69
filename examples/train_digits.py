"""Train a small CNN on scikit-learn's bundled 8x8 digits with each FQT method.

    python examples/train_digits.py [--epochs 8] [--methods fp32,qat,psq,aq_scq,aq_opt]
                                    [--backend kernels|reference] [--out digits_graphs]

fp32: the plain PyTorch model (eager). qat: fqt method "none" (binary weights and
activations, float gradients). psq: per-sample quantized gradients at b=1 (the 1-bit PSQ
baseline). aq_scq: the 1-bit FQT method, b=4 with AQ pruning (1 bit per element on
average). aq_opt: the same budget with variance-optimal keep probabilities. The aq_scq run's
graphs are dumped to --out.

Test accuracy is reported three ways: in eval mode with the running BatchNorm statistics
training left behind, in eval mode after ``fqt.recalibrate_bn`` re-estimated them on the
training set with the final weights, and with batch statistics (train-mode BatchNorm).
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import fqt_compiler as fqt
from fqt_compiler.datasets import digits

METHODS = {  # name -> Config options (None: eager float32)
    "fp32": None,
    "qat": {"method": "none"},
    "psq": {"method": "psq", "bits": 1},
    "aq_scq": {"method": "aq_scq", "bits": 4},
    "aq_opt": {"method": "aq_opt", "bits": 4},
}


class DigitsCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(64)
        self.conv3 = nn.Conv2d(64, 64, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(64)
        self.fc1 = nn.Linear(64 * 4 * 4, 128)
        self.bn4 = nn.BatchNorm1d(128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = F.max_pool2d(F.relu(self.bn3(self.conv3(x))), 2)
        x = F.relu(self.bn4(self.fc1(x.flatten(1))))
        return self.fc2(x)


def load_data(seed: int):
    x, y = digits(16)
    idx_train, idx_test = train_test_split(range(len(y)), test_size=0.2, random_state=seed,
                                           stratify=y.numpy())
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


def batches(x, batch: int):
    """Full batches only: every call then has one shape, so one compilation."""
    return [x[i:i + batch] for i in range(0, len(x) - batch + 1, batch)]


def accuracy(model, x, y, batch: int) -> float:
    model.eval()
    with torch.no_grad():
        correct = sum((model(xb).argmax(1) == yb).sum().item()
                      for xb, yb in zip(batches(x, batch), batches(y, batch)))
    return correct / (len(y) // batch * batch)


def batch_stats_accuracy(model, net, x, y, batch: int) -> float:
    """Accuracy with BatchNorm normalizing by each test batch's own statistics (train mode),
    the running statistics put back afterwards."""
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    net.train()
    with torch.no_grad():
        correct = sum((net(xb).argmax(1) == yb).sum().item()
                      for xb, yb in zip(batches(x, batch), batches(y, batch)))
    model.load_state_dict(saved)
    return correct / (len(y) // batch * batch)


def train(name, options, data, args):
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(args.seed)
    model = DigitsCNN()
    net = model if options is None else fqt.compile(
        model, fqt.Config(seed=args.seed, backend=args.backend, **options))
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    fqt.runtime.reset_stats()   # the summary's measured columns then cover this run only
    # Drop the ragged last batch: every step then has one shape, so one compilation.
    steps = len(y_train) // args.batch
    gen = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    bar = tqdm(range(args.epochs * steps), desc=f"{name:>6}", leave=False)
    for step in bar:
        if step % steps == 0:
            order = torch.randperm(len(y_train), generator=gen)
            net.train()
        idx = order[(step % steps) * args.batch:(step % steps + 1) * args.batch]
        loss = F.cross_entropy(net(x_train[idx]), y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    seconds = time.perf_counter() - start
    acc = {"running": accuracy(net, x_test, y_test, args.batch),
           "batch": batch_stats_accuracy(model, net, x_test, y_test, args.batch)}
    fqt.recalibrate_bn(net, batches(x_train, args.batch))
    acc["recalibrated"] = accuracy(net, x_test, y_test, args.batch)
    return net, acc, loss.item(), seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated subset of {', '.join(METHODS)}")
    parser.add_argument("--backend", default="kernels", choices=("reference", "kernels"))
    parser.add_argument("--out", default="digits_graphs", help="where the aq_scq graphs go")
    args = parser.parse_args(argv)
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    data = load_data(args.seed)
    results = []
    for name in methods:
        net, acc, loss, seconds = train(name, METHODS[name], data, args)
        results.append((name, acc, loss, seconds))
        if name == "aq_scq":
            net.train()
            F.cross_entropy(net(data[0][:args.batch]), data[1][:args.batch]).backward()
            fqt.dump(net, args.out)
            print(fqt.summary(net))
            print(f"aq_scq graphs written to {args.out}/ (forward.txt, backward.txt, one file "
                  f"per pass)")
    print(f"\ndigits, {args.epochs} epochs, batch {args.batch}, Adam lr {args.lr}, "
          f"backend {args.backend}")
    print("test acc: eval mode with the running BN statistics of training | after "
          "fqt.recalibrate_bn | with batch statistics")
    print(f"{'method':<8} {'test acc':>8} {'recalib.':>8} {'batch st':>8} {'last loss':>9} "
          f"{'time s':>7}")
    for name, acc, loss, seconds in results:
        print(f"{name:<8} {acc['running']:>8.3f} {acc['recalibrated']:>8.3f} {acc['batch']:>8.3f} "
              f"{loss:>9.3f} {seconds:>7.1f}")
    return results


if __name__ == "__main__":
    main()
