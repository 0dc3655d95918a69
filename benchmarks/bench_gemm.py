"""GEMM-level speed: popcount kernels vs torch.mm float32 / bfloat16 at the same thread count.

Operands are packed (or converted to bf16) before timing: this measures the GEMMs alone; the
preprocessing kernels have their own benchmark. Every number is the median of repeats after
a warm-up, measured side by side in one run. Port limit: Zen 4 / Ice Lake run one 512-bit
XOR, VPOPCNTQ and ADD per 512 binary MACs on four 256-bit vector pipes, so at most about
4 * 256 / 3 = 341 binary MACs per cycle per core.

    python benchmarks/bench_gemm.py [--quick] [--threads N]
"""
from __future__ import annotations

import argparse
import ctypes
import os
import sys
import time

PORT_LIMIT = 341  # binary MACs / cycle / core (see module docstring)


def conv_gemms(model: str, batch: int = 128, size: int = 32) -> list[tuple[str, int, int, int]]:
    """``(name, M, N, K)`` of the forward GEMM of every binarized conv (first conv stays float)."""
    if model == "resnet18":  # torchvision ResNet-18: 7x7/2 stem + max pool, so 32x32 -> 8x8
        hw, convs = size // 4, []
        for stage, (c_in, c_out) in enumerate([(64, 64), (64, 128), (128, 256), (256, 512)], 1):
            stride = 1 if stage == 1 else 2
            out = hw // stride
            convs += [(f"layer{stage}.0.conv1", c_in, c_out, 3, out), (f"layer{stage}.0.conv2", c_out, c_out, 3, out)]
            if stride == 2:
                convs.append((f"layer{stage}.0.downsample", c_in, c_out, 1, out))
            convs += [(f"layer{stage}.1.conv{i}", c_out, c_out, 3, out) for i in (1, 2)]
            hw = out
    else:  # VGG-16 CIFAR variant: 3x3 pad-1 convs, 2x2 max pools
        cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
        hw, c_in, convs = size, 3, []
        for i, v in enumerate(cfg):
            if v == "M":
                hw //= 2
                continue
            convs.append((f"features.{i}", c_in, v, 3, hw))
            c_in = v
        convs = convs[1:]
    seen, shapes = set(), []
    for name, c_in, c_out, k, out in convs:
        key = (batch * out * out, c_out, c_in * k * k)
        if key not in seen:
            seen.add(key)
            shapes.append((f"{model} {name}",) + key)
    return shapes


def estimate_clock_ghz() -> float:
    """Core clock from a chain of dependent 1-cycle ``add`` instructions (median of 5)."""
    from fqt_compiler.runtime import jit
    adds = "\\0A".join(["addq $$1, $0"] * 100)
    ir = f"""
define i64 @fqt_clock_probe(i64 %n) {{
entry:
  br label %loop
loop:
  %i = phi i64 [0, %entry], [%i2, %loop]
  %x = phi i64 [0, %entry], [%y, %loop]
  %y = call i64 asm sideeffect "{adds}", "=r,0"(i64 %x)
  %i2 = add i64 %i, 1
  %c = icmp slt i64 %i2, %n
  br i1 %c, label %loop, label %exit
exit:
  ret i64 %y
}}"""
    probe = jit.compile_ir(ir, "host").function("fqt_clock_probe", ctypes.c_int64, ctypes.c_int64)
    n = 200_000
    rates = []
    for _ in range(5):
        t0 = time.perf_counter()
        probe(n)
        rates.append(100 * n / (time.perf_counter() - t0) / 1e9)
    return sorted(rates)[2]


def operands(m, n, k, gen):
    import torch
    from fqt_compiler.runtime.packed import PackedBits
    a = PackedBits.from_bool(torch.rand(m, k, generator=gen) > 0.5)
    b = PackedBits.from_bool(torch.rand(n, k, generator=gen) > 0.5)
    return a, b


def time_torch(m, n, k, repeats, gen):
    import torch
    from common import median_time
    x, w = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen)
    xb, wb = x.bfloat16(), w.bfloat16()
    fp32 = median_time(lambda: torch.mm(x, w.t()), repeats=repeats)
    bf16 = median_time(lambda: torch.mm(xb, wb.t()), repeats=repeats)
    return fp32, bf16


def bitplane_case(m_kept, n, k, bits, gen):
    """Arguments of a ``bits``-plane GEMM over ``m_kept`` kept rows scattered into ``4 m_kept``."""
    import torch
    from fqt_compiler.runtime.packed import PackedBits
    planes = torch.stack([PackedBits.from_bool(torch.rand(m_kept, k, generator=gen) > 0.5).words
                          for _ in range(bits)])
    b = PackedBits.from_bool(torch.rand(n, k, generator=gen) > 0.5)
    kw = dict(row_scale=torch.rand(m_kept, generator=gen), row_zero=torch.rand(m_kept, generator=gen),
              row_map=torch.arange(m_kept) * 4, out_rows=4 * m_kept)
    return planes, b, kw


def conv_training_shapes(quick: bool) -> list[tuple[str, str, int, int, int, int]]:
    """``(name, kind, M, N, K, out_hw)`` of the forward GEMMs (NCHW output, as the binary conv
    writes it), of the input-gradient 4-bit bit-plane GEMMs (rows = kept quarter of the
    input positions, N = input channels, K = taps x output channels) and of the
    weight-gradient ones (rows = kept quarter of the output channels, N = taps x input
    channels, K = batch x output positions) of VGG-16 / ResNet-18."""
    out, batch = [], 128
    for model in ("vgg16", "resnet18"):
        for name, m, n, k in conv_gemms(model, batch):
            taps = 1 if "downsample" in name else 9
            stride2 = "downsample" in name or (".0.conv1" in name and "layer1" not in name)
            out.append((name, "fwd", m, n, k, m // batch))  # rows = batch x h' w'
            rows = m // 4 * (4 if stride2 else 1)
            out.append((name + " dX", "dX", rows, k // taps, taps * n, None))
            out.append((name + " dW", "dW", n // 4, k, m, None))
    if quick:
        out = [s for s in out if s[0] in ("vgg16 features.1", "vgg16 features.1 dX", "resnet18 layer1.0.conv1",
                                          "vgg16 features.14 dW")]
    return out


def conv_training_section(args, gen, ghz: float) -> None:
    """Old (along-K, shuffle-tree reduction) vs new (across-N panel) kernel at the conv
    training shapes, 1 thread, vs float32 torch.mm [M, K] x [K, N]."""
    import torch
    from common import median_time
    from fqt_compiler.codegen import gemm as codegen
    from fqt_compiler.runtime import binary_gemm, bitplane_gemm
    from fqt_compiler.runtime.gemm import _use_panel

    torch.set_num_threads(1)
    old, new = codegen.default_tile("host"), codegen.default_panel_tile("host")
    repeats = 3 if args.quick else 5
    print(f"\n-- conv training shapes, 1 thread, median of {repeats} (after a warm-up): old = along-K kernel "
          f"{old}, new = across-N panel kernel {new}; fwd: float32 NCHW output with per-channel scale; "
          f"dX, dW: 4-bit bit-plane GEMMs, float32 dequantized rows; GMAC/s counts 4 binary MACs per "
          f"4-bit code x sign; % port = of {PORT_LIMIT} x {ghz:.2f} GHz")
    print(f"{'shape':<38} {'M':>7} {'N':>4} {'K':>6} {'old ms':>8} {'new ms':>8} {'speedup':>7} "
          f"{'fp32 ms':>8} {'new x fp32':>10} {'new GMAC/s':>10} {'% port':>6} {'runtime picks':>13}")
    for name, kind, m, n, k, hw in conv_training_shapes(args.quick):
        if kind == "fwd":
            a, b = operands(m, n, k, gen)
            scale = torch.rand(n, generator=gen)
            out = torch.empty(m // hw, n, hw)

            def run(tile):
                return lambda: binary_gemm(a, b, scale=scale, out_hw=hw, out=out, threads=1, tile=tile)
            macs = m * n * k
        else:
            planes, b, kw = bitplane_case(m, n, k, 4, gen)
            kw = dict(kw, row_map=torch.arange(m), out_rows=m, out=torch.empty(m, n))

            def run(tile):
                return lambda: bitplane_gemm(planes, b, threads=1, tile=tile, **kw)
            macs = 4 * m * n * k
        t_old, t_new = (median_time(run(t), repeats=repeats) for t in (old, new))
        x, w = torch.randn(m, k, generator=gen), torch.randn(k, n, generator=gen)
        fp32 = median_time(lambda: torch.mm(x, w), repeats=repeats)
        print(f"{name:<38} {m:>7} {n:>4} {k:>6} {t_old * 1e3:>8.2f} {t_new * 1e3:>8.2f} {t_old / t_new:>6.2f}x "
              f"{fp32 * 1e3:>8.2f} {fp32 / t_new:>9.1f}x {macs / t_new / 1e9:>10.0f} "
              f"{100 * macs / t_new / (PORT_LIMIT * ghz * 1e9):>5.0f}% {'new' if _use_panel(m, n, k) else 'old':>13}")
        del x, w


def main_bench(args) -> None:
    import torch
    from common import banner, median_time, run_avx2_child
    from fqt_compiler.runtime import binary_gemm, bitplane_gemm

    banner("bench_gemm: popcount GEMMs vs torch.mm")
    all_threads = args.threads or os.cpu_count() or 1
    ghz = estimate_clock_ghz()
    print(f"threads: 1 and {all_threads}; clock estimate {ghz:.2f} GHz (dependent-add chain); "
          f"port limit {PORT_LIMIT} binary MACs/cycle/core")
    print("binary MACs/cycle/core = M N K / (time * clock * threads); bit-plane rows: 4-bit codes over 1/4 of the rows")
    repeats = 3 if args.quick else 5
    gen = torch.Generator().manual_seed(0)
    conv_training_section(args, gen, ghz)
    if args.conv_only:
        return
    square = [("square", 1024, 1024, 4096)]
    layers = conv_gemms("resnet18") + conv_gemms("vgg16")
    if args.quick:
        layers = [layers[0], layers[-1]]
    elif not args.all_layers:
        layers = [s for s in layers if s[1] * s[2] * s[3] >= 2 ** 28]
    header = (f"{'shape':<34} {'M':>7} {'N':>5} {'K':>7} {'thr':>3} {'ms':>8} {'x fp32':>7} {'x bf16':>7} "
              f"{'GOPS':>6} {'MAC/cyc':>7} {'% port':>6}")

    def row(name, m, n, k, threads, t, fp32, bf16):
        macs = m * n * k
        per_cycle = macs / (t * ghz * 1e9 * threads)
        print(f"{name:<34} {m:>7} {n:>5} {k:>7} {threads:>3} {t * 1e3:>8.3f} {fp32 / t:>7.1f} {bf16 / t:>7.1f} "
              f"{macs / t / 1e9:>6.0f} {per_cycle:>7.0f} {100 * per_cycle / PORT_LIMIT:>5.0f}%")

    for threads in sorted({1, all_threads}):
        torch.set_num_threads(threads)
        print(f"\n-- forward binary GEMM (int32 out), {threads} thread(s)")
        print(header)
        for name, m, n, k in square + layers:
            a, b = operands(m, n, k, gen)
            t = median_time(lambda: binary_gemm(a, b, threads=threads), repeats=repeats)
            row(name, m, n, k, threads, t, *time_torch(m, n, k, repeats, gen))
        print(f"\n-- backward GEMMs as 4-bit bit-plane GEMMs over 1/4 of the rows, {threads} thread(s) "
              f"(M = kept rows; torch.mm over all 4M rows, float)")
        print(header)
        backward = []
        for name, m, n, k in layers:
            backward.append((name + " dX", m, k, n))  # rows r, outputs C k k, contracts over O
            backward.append((name + " dW", n, k, m))  # rows O, outputs C k k, contracts over r
        for name, m, n, k in [("square", 1024, 1024, 4096)] + backward:
            planes, b, kw = bitplane_case(m // 4, n, k, 4, gen)
            t = median_time(lambda: bitplane_gemm(planes, b, threads=threads, **kw), repeats=repeats)
            row(name, m // 4, n, k, threads, t, *time_torch(m, n, k, repeats, gen))

    print("\n-- acceptance checks at M = N = 1024, K = 4096")
    a, b = operands(1024, 1024, 4096, gen)
    torch.set_num_threads(1)
    t1 = median_time(lambda: binary_gemm(a, b, threads=1), repeats=2 * repeats)
    fp32, bf16 = time_torch(1024, 1024, 4096, repeats, gen)
    t2 = median_time(lambda: binary_gemm(a, b, threads=2), repeats=2 * repeats)
    planes, pb, kw = bitplane_case(256, 1024, 4096, 4, gen)
    tp = median_time(lambda: bitplane_gemm(planes, pb, threads=1, **kw), repeats=2 * repeats)
    checks = [(f"1 thread vs float32 torch.mm: {fp32 / t1:.1f}x", fp32 / t1 >= 10, ">= 10x"),
              (f"1 thread vs bfloat16 torch.mm: {bf16 / t1:.1f}x", bf16 / t1 >= 1.5, ">= 1.5x"),
              (f"2 threads vs 1 thread: {t1 / t2:.2f}x", t1 / t2 >= 1.8, ">= 1.8x"),
              (f"4-bit bit-plane over 1/4 rows / dense binary: {tp / t1:.2f}x the time", tp / t1 <= 1.3, "<= 1.3x")]
    for text, ok, goal in checks:
        print(f"  {'PASS' if ok else 'MISS'}  {text} (goal {goal})")

    run_avx2_child(__file__, ["--threads", str(all_threads)] + (["--quick"] if args.quick else []),
                   baseline="float32 torch.mm")


def avx2_child(args) -> None:
    import torch
    from common import median_time
    from fqt_compiler.runtime import binary_gemm

    print(f"torch CPU capability: {torch.backends.cpu.get_cpu_capability()}; MKL: {torch.backends.mkl.is_available()}")
    repeats = 3 if args.quick else 5
    gen = torch.Generator().manual_seed(1)
    shapes = [("square", 1024, 1024, 4096)] + ([] if args.quick else conv_gemms("vgg16")[:2])
    print(f"{'shape':<34} {'M':>7} {'N':>5} {'K':>7} {'thr':>3} {'hygon ms':>9} {'fp32 ms':>9} {'x fp32':>7}")
    for threads in sorted({1, args.threads}):
        torch.set_num_threads(threads)
        for name, m, n, k in shapes:
            a, b = operands(m, n, k, gen)
            x, w = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen)
            t = median_time(lambda: binary_gemm(a, b, threads=threads, target="hygon"), repeats=repeats)
            fp32 = median_time(lambda: torch.mm(x, w.t()), repeats=repeats)
            print(f"{name:<34} {m:>7} {n:>5} {k:>7} {threads:>3} {t * 1e3:>9.3f} {fp32 * 1e3:>9.2f} {fp32 / t:>7.1f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the 1024 x 1024 x 4096 shape and two conv layers")
    parser.add_argument("--threads", type=int, default=None, help="the 'all threads' count (default: all cores)")
    parser.add_argument("--all-layers", action="store_true",
                        help="every distinct conv shape (default: those with at least 2^28 MACs)")
    parser.add_argument("--conv-only", action="store_true", help="only the conv training shapes section")
    parser.add_argument("--avx2-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    avx2_child(args) if args.avx2_child else main_bench(args)
