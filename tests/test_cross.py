"""Cross-targeting: emitted kernels for rpi4/rpi5/hygon, replayed on the target CPU
(natively or under qemu) against the host kernels and the pure-PyTorch reference, the hygon
kernels in a normal training step, and the llvm-mca report."""
from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fqt_compiler as fqt
from fqt_compiler.cross import mca, oracle
from fqt_compiler.cross.emit import emit_kernels
from fqt_compiler.cross.record import training_step
from fqt_compiler.codegen.targets import get_target, host_target, runs_on_host
from fqt_compiler.ops import reference
from fqt_compiler.runtime import jit
from fqt_compiler.runtime.quantize import group_min_max
from conftest import CROSS_TARGETS, needs_cross
from fqt_compiler.cross.verify import (OddShapes, call_argument, capture_calls, odd_shapes, verify,
                                 verify_calls)
from fqt_compiler.zoo import resnet18, resnet_small, vgg16_cifar, vgg_small

needs_hygon_cpu = pytest.mark.skipif(not runs_on_host(get_target("hygon")),
                                     reason="this CPU cannot run the hygon (AVX2) kernels")


def _x():
    torch.manual_seed(0)
    return (torch.randn(2, 3, 32, 32),)


def _model(factory):
    """The model built from a fixed seed, whatever ran before: the fused regions' reference
    check is a tolerance check, and a batch-2 step's deep maps put integer GEMM outputs
    exactly on their channel's batch mean, where BN's output is a rounding residual. The
    kernels round as ATen's BatchNorm does on maps of 2 or more elements, but at 1x1 maps
    ATen sums per thread in float and the two can take the two sides of the ReLU."""
    torch.manual_seed(0)
    return factory()


def _assert_verified(results, target, tmp_path, *, popcounts=True):
    """Every kernel the step ran is bit-identical on the target and the host and matches the
    reference; the object is for the target's ISA (``popcounts``: and the GEMMs use its
    vector popcount)."""
    assert results and all(r.calls and r.mismatches == 0 for r in results), \
        [r for r in results if not r.calls or r.mismatches]
    assert all(r.passed for r in results), [r for r in results if not r.passed]
    assert all(r.has_reference for r in results), [r.family for r in results if not r.has_reference]
    asm = (tmp_path / "fqt_kernels.s").read_text()
    if target in ("rpi4", "rpi5"):
        out = subprocess.run(["file", str(tmp_path / "fqt_kernels.o")], capture_output=True, text=True)
        assert "aarch64" in out.stdout
        assert "cnt\tv" in asm or not popcounts
        # rpi4 (ARMv8.0) must not use dotprod; rpi5 does, for popcount sums.
        assert ("udot" in asm) == (target == "rpi5") and "sdot" not in asm
    if target == "hygon":
        assert "ymm" in asm and "zmm" not in asm and "{%k" not in asm


@needs_cross
@pytest.mark.slow
# Whole steps replay once per architecture: ResNet-18 on rpi4 (ARMv8.0, the strictest
# AArch64 preset), VGG-16 on hygon. Every kernel family of both steps replays on every target
# in the odd-shape and region tests below, and rpi5's dotprod kernels in its odd shapes.
@pytest.mark.parametrize("target", ["rpi4"])
def test_resnet18_step_kernels_verify_on_target(target, tmp_path):
    _assert_verified(verify(_model(resnet18), _x(), target, tmp_path), target, tmp_path)


@needs_cross
@pytest.mark.slow
@pytest.mark.parametrize("target", ["hygon"])
def test_vgg16_step_kernels_verify_on_target(target, tmp_path):
    _assert_verified(verify(_model(vgg16_cifar), _x(), target, tmp_path), target, tmp_path)


@needs_cross
@pytest.mark.slow
@pytest.mark.parametrize("target", CROSS_TARGETS)
def test_odd_shapes_verify_on_target(target, tmp_path):
    results = verify_calls(odd_shapes(target), target, tmp_path)
    _assert_verified(results, target, tmp_path)
    families = {r.family for r in results}
    assert {"binary", "bitplane", "pack", "pack_rows", "im2col_pack", "im2col_pack_t", "tap_gather"} <= families


@needs_cross
# rpi4 and hygon compress without pext (none on AArch64, microcoded on Zen 1); the x86 presets
# with a fast pext run theirs in tests/test_pack_kernels.py.
@pytest.mark.parametrize("target", ["rpi4", "hygon"])
def test_direct_im2col_transpose_verifies_on_target(target, tmp_path, monkeypatch):
    """The direct transposed im2col at every width (the step only takes it from width 16 on)
    with strides 2 and 3, whose every-s-th-bit compression uses shifts where ``pext`` is
    missing or slow, and a
    dilated two-word bitmap row; with the input gradient's tap gather at stride 2."""
    from fqt_compiler.runtime import pack
    monkeypatch.setattr(pack, "DIRECT_TRANSPOSE_MIN_WIDTH", 0)
    gen = torch.Generator().manual_seed(0)
    cases = [((2, 3, 9, 11), 3, 2, 1, 1), ((1, 2, 5, 130), 3, (3, 1), (1, 2), (1, 2)), ((3, 5, 6, 6), 1, 2, 0, 1)]

    def run():
        for shape, *conv in cases:
            pack.im2col_pack_t(torch.randn(*shape, generator=gen), *conv, target=target)
        codes = torch.randint(-2**62, 2**62, (2, 3 * 5 * 6, 8), generator=gen)
        pack.tap_gather(codes, 2, (9, 11), (5, 6), 3, 2, 1, 1, target=target)
    results = verify_calls(run, target, tmp_path)
    _assert_verified(results, target, tmp_path, popcounts=False)
    assert {"im2col_pack_t", "tap_gather"} <= {r.family for r in results}


@needs_cross
@pytest.mark.parametrize("target", CROSS_TARGETS)
def test_fused_regions_verify_on_target(target, tmp_path):
    """The fused BatchNorm/ReLU/max-pool kernels (train mode, odd maps, pooling an odd 15x15
    map) on the target: equal to the host's bit for bit, to the unfused chain to float32
    rounding; a wrong argmax byte or a wrong channel fails the check. At width 0.25 and seed 0
    an input of a 3x3 map equals its channel's batch mean exactly: BN's output there is a
    rounding residual, and the ReLU mask agrees only if the kernel rounds as ATen does."""
    torch.manual_seed(0)
    results = verify(vgg_small(in_channels=1, width=0.25), (torch.randn(3, 1, 15, 15),), target, tmp_path)
    _assert_verified(results, target, tmp_path)
    assert {"region_forward", "region_backward"} <= {r.family for r in results}


def _pooling_net():
    """BatchNorm regions with every average pool: 3x3/2 with padding, ceil_mode and without
    the padding in the divisor; 2x2/2; the mean of the plane (the head)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False),
                         nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(), nn.AvgPool2d(2),
                         nn.Conv2d(12, 9, 3, padding=1), nn.BatchNorm2d(9), nn.Hardtanh(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(9, 10))


@needs_cross
@pytest.mark.parametrize("target", CROSS_TARGETS)
def test_residual_and_average_pool_regions_verify_on_target(target, tmp_path):
    """The region kernels with a residual add (a small ResNet: blocks' ``bn2 + shortcut``,
    odd 15x15 and 8x8 maps, the head's mean pool) and with average pools, on the target:
    equal to the host's bit for bit, to the unfused chain to float32 rounding, the
    residual's gradient included."""
    torch.manual_seed(0)
    resnet = resnet_small(in_channels=1, width=0.5)
    results = verify(resnet, (torch.randn(3, 1, 15, 15),), target, tmp_path)
    _assert_verified(results, target, tmp_path)
    results = verify(_pooling_net(), (torch.randn(3, 1, 15, 15),), target, tmp_path / "pools")
    _assert_verified(results, target, tmp_path / "pools")
    assert {"region_forward", "region_backward"} <= {r.family for r in results}


@needs_cross
@pytest.mark.parametrize("target", CROSS_TARGETS)
def test_layer_norm_regions_verify_on_target(target, tmp_path):
    """The fused LayerNorm -> GELU (exact, tanh) row kernels and the linear layers' kernels,
    87 rows (two row blocks) of odd widths, on the target: equal to the host's bit for bit, to the unfused chain to
    float32 rounding (their erf/exp/tanh are polynomials: no libm call to link)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 24), torch.nn.LayerNorm(24), torch.nn.Linear(24, 40),
                                torch.nn.LayerNorm(40), torch.nn.GELU(), torch.nn.Linear(40, 24),
                                torch.nn.LayerNorm(24), torch.nn.GELU("tanh"), torch.nn.Linear(24, 3))
    results = verify(model, (torch.randn(3, 29, 24),), target, tmp_path)
    _assert_verified(results, target, tmp_path)
    # pack_cols: the linear layers' weight-path quantizer over their row-major G'; aq_groups:
    # the quantizer's keep decisions and per-group scales
    assert {"region_forward", "region_backward", "pack_cols", "aq_groups"} <= {r.family for r in results}


class _LlamaBlock(nn.Module):
    """A Llama-style MLP block with odd widths: LlamaRMSNorm's chain, SwiGLU (with biases,
    so the gated region's bias gradients run too), nn.RMSNorm (torch.rms_norm) -> SiLU."""

    def __init__(self, d=22, hidden=37):
        super().__init__()
        self.embed, self.norm = nn.Linear(d, d), nn.Parameter(torch.rand(d) + 0.5)
        self.gate, self.up, self.down = nn.Linear(d, hidden), nn.Linear(d, hidden), nn.Linear(hidden, d)
        self.rms, self.head = nn.RMSNorm(d, eps=1e-6), nn.Linear(d, 3)

    def forward(self, x):
        h = self.embed(x)
        h = self.norm * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6))
        h = self.down(F.silu(self.gate(h)) * self.up(h))
        return self.head(F.silu(self.rms(h)))


@needs_cross
@pytest.mark.parametrize("target", CROSS_TARGETS)
def test_llama_regions_verify_on_target(target, tmp_path):
    """The RMSNorm row kernels (LlamaRMSNorm's chain; nn.RMSNorm -> SiLU) and the SwiGLU gated
    linear kernels, 87 rows (two row blocks) of odd widths, on the target: equal to the host's
    bit for bit, to the unfused chain to float32 rounding."""
    torch.manual_seed(0)
    results = verify(_LlamaBlock(), (torch.randn(3, 29, 22),), target, tmp_path)
    _assert_verified(results, target, tmp_path)
    # no LayerNorm and no other activation: the row regions are RMSNorms, the linear ones gated
    assert {"region_forward", "region_backward", "linear_region_forward", "linear_region_backward"} <= \
        {r.family for r in results}


def test_reference_check_catches_one_flipped_bit():
    """Each call of a small step matches the reference as the host computed it, and flipping
    one bit the call wrote makes it fail (the check compares what kernels write)."""
    target = host_target()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        compiled = fqt.compile(OddShapes(), fqt.Config(method="psq"))
    uses, capture = capture_calls(lambda: training_step(compiled, (torch.randn(1, 3, 13, 17),)), target)
    state = {i: initial for i, (_, _, initial) in enumerate(capture.storages)}
    caught = set()
    for index, encoded, after in capture.calls:
        spec = uses[index].spec
        args = dict(zip(spec.abi.names, map(call_argument, encoded)))
        before = {b: state[b] for b in after}
        assert oracle.check_call(spec, args, before, after) == 0, spec.family
        scratch = {args[n][0] for n in oracle.SCRATCH.get(spec.family, ()) if args.get(n)}
        for b in [b for b in after if after[b] != before[b] and b not in scratch][:1]:
            i = int(np.flatnonzero(np.frombuffer(after[b], np.uint8) != np.frombuffer(before[b], np.uint8))[0])
            bad = bytearray(after[b])
            bad[i] ^= 1
            assert oracle.check_call(spec, args, before,
                                               {**after, b: bytes(bad)}) == 1, spec.family
            caught.add(spec.family)
        state.update(after)
    assert {"binary", "bitplane", "minmax", "pack", "sign_pack", "im2col_pack", "rowpop"} <= caught


@pytest.mark.parametrize("act", [("relu", ()), ("hardtanh", (0.0, 6.0)), ("leaky_relu", (0.1,))])
def test_reference_check_catches_one_wrong_mask_bit(act):
    """A residual region's forward writes the activation's mask bits: the oracle checks them
    exactly (one flipped bit of a 3x5 plane's byte is caught), and the backward that reads
    them matches the reference."""
    from fqt_compiler.codegen.fusion import Activation, Region
    from fqt_compiler.runtime.fusion import region_backward, region_forward
    gen = torch.Generator().manual_seed(0)
    x, res = torch.randn(2, 7, 3, 5, generator=gen), torch.randn(2, 7, 3, 5, generator=gen)
    gamma, beta = torch.rand(7, generator=gen) + 0.5, torch.randn(7, generator=gen)
    region = Region(True, Activation(*act), residual=True)
    assert region.mask_bits

    def step():
        _, arg, mean, _, invstd, _, mask = region_forward(x, region, gamma, beta, residual=res)[:7]
        region_backward(torch.randn(x.shape, generator=gen), x, arg, region, gamma, beta, mean, invstd, mask=mask)
    uses, capture = capture_calls(step, host_target())
    state = {i: initial for i, (_, _, initial) in enumerate(capture.storages)}
    for index, encoded, after in capture.calls:
        spec = uses[index].spec
        args = dict(zip(spec.abi.names, map(call_argument, encoded)))
        before = {b: state[b] for b in after}
        assert oracle.check_call(spec, args, before, after) == 0, spec.family
        if spec.family == "region_forward":
            buf, offset = args["mask"]
            bad = bytearray(after[buf])
            bad[offset + 2 * 13 + 1] ^= 1 << 6   # plane 13 (sample 1, channel 6), position 14 (its last)
            assert oracle.check_call(spec, args, before, {**after, buf: bytes(bad)}) == 1
        state.update(after)
    assert [uses[i].spec.family for i, _, _ in capture.calls] == ["region_forward", "region_backward"]


def test_reference_check_catches_one_wrong_sign_or_ste_bit():
    """A region that packs its output's sign and STE bits for the next binarized layer: the
    oracle checks both bit matrices exactly, one flipped bit of either is caught."""
    from fqt_compiler.codegen.fusion import Activation, Region
    from fqt_compiler.runtime.fusion import region_forward
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 20, 7, 7, generator=gen)
    gamma, beta = torch.rand(20, generator=gen) + 0.5, torch.randn(20, generator=gen)
    region = Region(True, Activation("relu"), pool=(3, 3, 2, 2, 1, 1), pack_signs=True)
    # sample 1, bit 29: channel 1 (4x4 outputs a plane), output 13
    assert_bit_flips_caught(lambda: region_forward(x, region, gamma, beta), lambda ld: 8 * ld + 3, 5)


def assert_bit_flips_caught(run, byte, bit):
    """``run`` makes one kernel call that writes ``signs`` and ``ste`` (``ld`` words a row):
    the oracle passes it, and fails it when bit ``bit`` of byte ``byte(ld)`` of either is
    flipped."""
    uses, capture = capture_calls(run, host_target())
    (index, encoded, after), = capture.calls
    spec = uses[index].spec
    args = dict(zip(spec.abi.names, map(call_argument, encoded)))
    before = {i: initial for i, (_, _, initial) in enumerate(capture.storages)}
    before = {b: before[b] for b in after}
    assert oracle.check_call(spec, args, before, after) == 0
    for name in ("signs", "ste"):
        buf, offset = args[name]
        bad = bytearray(after[buf])
        bad[offset + byte(args["ld"])] ^= 1 << bit
        assert oracle.check_call(spec, args, before, {**after, buf: bytes(bad)}) == 1, name


def test_reference_check_covers_the_sum_of_squares():
    """aq_opt's statistics kernel (min/max plus sums of squares) and its keep decisions on
    the float64 scores (``aq_groups``) replay against the oracle, and one flipped bit of a
    sum of squares or of a group's zero point is caught."""
    from fqt_compiler.runtime.quantize import sample_groups
    target = host_target()
    g = torch.randn(3, 5, 9, 11, generator=torch.Generator().manual_seed(0))
    uses, capture = capture_calls(lambda: [sample_groups(g, "aq_opt", path, 4, seed=0, step=0, layer=0)
                                           for path in ("input", "weight")], target)
    assert {u.spec.family for u in uses} == {"minmax", "aq_groups"}
    assert {dict(u.spec.options)["sum_squares"] for u in uses if u.spec.family == "minmax"} == {True}
    for index, encoded, after in capture.calls:
        spec = uses[index].spec
        args = dict(zip(spec.abi.names, map(call_argument, encoded)))
        before = {b: capture.storages[b][2] for b in after}
        assert oracle.check_call(spec, args, before, after) == 0
        if spec.family == "aq_groups":
            assert args["scores"] is not None and args["decide"]
        buf, offset = args["ss" if spec.family == "minmax" else "zero"]
        bad = bytearray(after[buf])
        bad[offset] ^= 1
        assert oracle.check_call(spec, args, before, {**after, buf: bytes(bad)}) == 1


def test_group_min_max_zero_is_positive_zero():
    """-0.0 and +0.0 in one group: min and max are +0.0 in the kernel and the reference (the
    sign of a zero vector.reduce.fmin result differs between x86 and AArch64)."""
    g = torch.tensor([[-0.0, 0.0, -0.0, 0.0], [0.0, -0.0, 0.0, 0.0], [-0.0, -0.0, -0.0, -0.0]]).view(3, 1, 2, 2)
    for lo, hi in (group_min_max(g, "sample"), reference.group_min_max(reference.conv_rows(g), "sample", 4)):
        assert torch.equal(torch.signbit(lo), torch.zeros(3, dtype=torch.bool))
        assert torch.equal(torch.signbit(hi), torch.zeros(3, dtype=torch.bool))


def _training_step(target: str):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = OddShapes()
        compiled = fqt.compile(model, fqt.Config(target=target, seed=3))
        x, y = torch.randn(3, 3, 13, 17), torch.randint(0, 10, (3,))
        loss = torch.nn.functional.cross_entropy(compiled(x), y)
        loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@needs_hygon_cpu
def test_hygon_kernels_run_a_training_step_like_the_host_kernels():
    requested = []

    def hook(spec, load):
        requested.append(spec.target.name)
        return load(spec)

    with jit.kernel_hook(hook):
        loss, grads = _training_step("hygon")
    assert requested and set(requested) == {"hygon"}
    host_loss, host_grads = _training_step("host")
    assert loss.item() == host_loss.item()
    assert all(g is not None for g in grads.values())
    for name, grad in grads.items():
        torch.testing.assert_close(grad, host_grads[name], rtol=1.2e-7, atol=1e-7, msg=name)


@pytest.mark.skipif(not shutil.which(mca.LLVM_MCA), reason=f"needs {mca.LLVM_MCA} (Debian: apt-get install llvm)")
@pytest.mark.parametrize("target", CROSS_TARGETS)
def test_kernels_report_estimates_binary_macs_per_cycle(target, tmp_path):
    torch.manual_seed(0)
    emitted = emit_kernels(vgg_small(in_channels=1, width=0.25), (torch.randn(2, 1, 8, 8),), target, tmp_path)
    rows = mca.mca_report(emitted)
    assert {r.family for r in rows} == {"binary", "bitplane"}
    for r in rows:
        assert r.cycles_per_iteration > 0 and r.binary_macs_per_iteration > 0
        assert r.binary_macs_per_cycle == pytest.approx(r.binary_macs_per_iteration / r.cycles_per_iteration)
    text = mca.format_report(rows, emitted.target)
    assert mca.FMA_PEAK[emitted.target.cpu][0] > 0 and "binary MACs/cycle" in text
