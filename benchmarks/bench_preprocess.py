"""Preprocessing kernels vs the equivalent torch ops, on conv layers of ResNet-18 and VGG-16
(CIFAR variant) at batch 128, 32x32 input.

Per layer (input x: N x C x H x W, gradient g: N x O x H' x W'):
  sign+STE pack   x -> sign bits and |x|<1 bits       vs  (x > 0), (x.abs() < 1)
  im2col_pack     saved sign bits -> X̂ packed along k  vs  F.unfold(x) (float im2col)
  im2col_pack_t   saved sign bits -> X̂ᵀ packed along r vs  F.unfold(x) (float im2col)
  quantize input  g -> 4-bit AQ planes along o           vs  reference.quantize_gradient (torch)
  quantize weight g -> 4-bit AQ planes along r           vs  reference.quantize_gradient (torch)
GB/s counts the bytes the kernel must read and write (floats 4 B, bits 1/8 B; output padding
excluded). Median of repeats after a warm-up, kernel and torch side by side, same threads.

    python benchmarks/bench_preprocess.py [--quick] [--threads N]

``preprocess_table(threads, quick)`` prints the same table from another benchmark.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def conv_layers(model: str, batch: int = 128, size: int = 32):
    """Distinct ``(name, N, C, H, O, kernel, stride, padding)`` of the binarized convs."""
    layers = []
    if model == "resnet18":   # torchvision ResNet-18: the stem (float) and max pool take 32 -> 8
        hw = size // 4
        for stage, (c_in, c_out) in enumerate([(64, 64), (64, 128), (128, 256), (256, 512)], 1):
            stride = 1 if stage == 1 else 2
            layers.append((f"layer{stage}.0.conv1", c_in, hw, c_out, 3, stride, 1))
            if stride == 2:
                layers.append((f"layer{stage}.0.downsample", c_in, hw, c_out, 1, 2, 0))
            hw //= stride
            layers.append((f"layer{stage}.0.conv2", c_out, hw, c_out, 3, 1, 1))
    else:                     # VGG-16 CIFAR variant: 3x3 pad-1 convs, first conv float
        cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
        hw, c_in = size, 3
        for i, v in enumerate(cfg):
            if v == "M":
                hw //= 2
                continue
            if i:
                layers.append((f"features.{i}", c_in, hw, v, 3, 1, 1))
            c_in = v
    seen, out = set(), []
    for name, c, hw, o, k, s, p in layers:
        if (c, hw, o, k, s) not in seen:
            seen.add((c, hw, o, k, s))
            out.append((f"{model} {name}", batch, c, hw, o, k, s, p))
    return out


def layer_cases(n, c, hw, o, k, s, p, gen):
    """``(kernel name, kernel fn, torch op name, torch fn, bytes moved)`` of one conv layer."""
    import torch
    import torch.nn.functional as F

    from fqt_compiler.ops import reference
    from fqt_compiler.runtime import im2col_pack, im2col_pack_t, pack_signs_and_ste, quantize_bitplanes

    x = torch.randn(n, c, hw, hw, generator=gen)
    oh = (hw + 2 * p - k) // s + 1
    g = torch.randn(n, o, oh, oh, generator=gen)
    rows, kk = n * oh * oh, c * k * k
    signs, _ = pack_signs_and_ste(x.flatten(1))
    xb, gb = x.numel() * 4, g.numel() * 4
    key = dict(seed=0, step=0, layer=0)

    def quant(path):
        return lambda: quantize_bitplanes(g, "aq_scq", path, 4, **key)

    def quant_ref(path):
        return lambda: reference.quantize_gradient(reference.conv_rows(g), "aq_scq", path, 4,
                                                   rows_per_sample=oh * oh, **key)

    return [
        ("sign+STE pack", lambda: pack_signs_and_ste(x.flatten(1)), "x>0, |x|<1",
         lambda: (x > 0, x.abs() < 1), xb + x.numel() // 4),
        ("im2col_pack", lambda: im2col_pack(signs, k, s, p, input_shape=x.shape), "F.unfold",
         lambda: F.unfold(x, k, padding=p, stride=s), x.numel() // 8 + rows * kk // 8),
        ("im2col_pack_t", lambda: im2col_pack_t(signs, k, s, p, input_shape=x.shape), "F.unfold",
         lambda: F.unfold(x, k, padding=p, stride=s), x.numel() // 8 + rows * kk // 8),
        ("quantize input", quant("input"), "reference", quant_ref("input"), gb + g.numel() // 8),
        ("quantize weight", quant("weight"), "reference", quant_ref("weight"), gb + g.numel() // 8),
    ]


def preprocess_table(threads: list[int] | None = None, quick: bool = False) -> None:
    """Print the preprocessing table (GB/s and time vs torch) at each thread count."""
    import torch

    from common import median_time

    threads = threads or sorted({1, os.cpu_count() or 1})
    layers = conv_layers("resnet18") + conv_layers("vgg16")
    if quick:
        layers = [layers[0], layers[-1]]
    repeats = 3 if quick else 5
    gen = torch.Generator().manual_seed(0)
    print(f"{'layer':34} {'thr':>3} {'kernel':16} {'ms':>8} {'GB/s':>7}   {'torch op':12} {'ms':>9} {'speedup':>8}")
    for name, n, c, hw, o, k, s, p in layers:
        cases = layer_cases(n, c, hw, o, k, s, p, gen)
        for t in threads:
            torch.set_num_threads(t)
            for kname, fn, tname, tfn, nbytes in cases:
                mine = median_time(fn, repeats=repeats)
                ref = median_time(tfn, repeats=1 if tname == "reference" else repeats)
                print(f"{name + f' C{c} {hw}x{hw} O{o} k{k}s{s}':34} {t:>3} {kname:16} {mine * 1e3:8.2f} "
                      f"{nbytes / mine / 1e9:7.1f}   {tname:12} {ref * 1e3:9.2f} {ref / mine:7.1f}x")
        del cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="two layers, fewer repeats")
    parser.add_argument("--threads", type=int, help="the 'all threads' count (default: all cores)")
    args = parser.parse_args()
    from common import banner
    banner("bench_preprocess: preprocessing kernels vs torch")
    preprocess_table(sorted({1, args.threads or os.cpu_count() or 1}), quick=args.quick)


if __name__ == "__main__":
    main()
