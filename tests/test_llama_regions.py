"""Fused regions of Llama-style blocks: RMSNorm (the row region without the mean and the
bias) -> activation, and the gated linear region ``act(gate(x)) * up(x)`` of two binarized
linear layers (SwiGLU): the kernels against the unfused chain under autograd, and the pass
that matches LlamaRMSNorm's traced chain, ``torch.rms_norm`` and SwiGLU (issue 13)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import fqt_compiler as fqt
from fqt_compiler.codegen import fusion as gen
from fqt_compiler.ops import registry

from test_layer_norm_regions import _close, _graph_ops, _steps

ACTS = {"none": lambda v: v, "silu": F.silu, "gelu": F.gelu}
# one row, three rows, more than one ROW_BLOCK; features not multiples of 8 or 64
SHAPES = [(1, 7), (3, 70), (131, 67), (2, 3, 5, 9), (3, 515)]


def _ops(name):
    return registry.lookup(f"fqt::{name}", "kernels"), registry.lookup(f"fqt::{name}", "reference")


def _rms_chain(x, weight, eps):
    """LlamaRMSNorm's forward as transformers writes it."""
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def check_rms_region(shape, act, seed=0, eps=1e-6):
    """Kernel == reference (output, per-row invstd, dx, dweight), and the reference == the
    literal chain differentiated by autograd."""
    gen_ = torch.Generator().manual_seed(seed)
    d = shape[-1]
    x = torch.randn(shape, generator=gen_) * 2 + 0.5
    weight, dy = torch.rand(d, generator=gen_) + 0.5, torch.randn(shape, generator=gen_)
    args = (x, weight, eps, act, [], "norm")
    kern, ref = _ops("rms_region")
    got, want = kern(*args), ref(*args)
    assert [t.shape for t in want] == [x.shape, x.shape[:-1], (0,), (0,)]
    for name, g, w in zip(("out", "invstd"), got, want):
        _close(g, w, name, 1e-5)
    leaf = [x.clone().requires_grad_(), weight.clone().requires_grad_()]
    chain = ACTS[act](_rms_chain(*leaf, eps))
    _close(want[0], chain.detach(), "reference out", 1e-6)
    chain.backward(dy)
    bargs = (dy, x, weight, want[1], eps, act, [], "norm")
    kern_b, ref_b = _ops("rms_region_backward")
    for name, g, w, autograd in zip(("dx", "dweight"), kern_b(*bargs), ref_b(*bargs), leaf):
        _close(g, w, name, 1e-5)
        _close(w, autograd.grad, f"reference {name}", 1e-5)


@pytest.mark.parametrize("act", ["none", "silu"])
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_region_kernels_match_the_unfused_chain(shape, act):
    check_rms_region(shape, act)


def test_rms_region_of_a_zero_row_and_one_feature():
    """A zero row normalizes to 0 (invstd = 1/sqrt(eps)), its dx is dy gamma invstd; one
    feature: the output is gamma times the sign of x up to rounding."""
    x = torch.tensor([[0.0, 0.0, 0.0], [1.0, -2.0, 3.0]])
    check = _ops("rms_region")[0](x, torch.ones(3), 1e-6, "none", [], "norm")
    assert torch.equal(check[0][0], torch.zeros(3)) and check[1][0] == pytest.approx(1e3, rel=1e-6)
    check_rms_region((5, 1), "none")


def check_gated_region(shape, act, bias=True, contraction=192, seed=0):
    """Kernel == reference (output, both int raw copies, both gradients at the layers'
    outputs and bias gradients), and the reference == the literal chain ``act(Y_raw * alpha
    + bias) * (Y_up * alpha_up + bias_up)`` under autograd."""
    gen_ = torch.Generator().manual_seed(seed)
    d = shape[-1]
    ys = [torch.randint(-contraction, contraction + 1, shape, generator=gen_).float() for _ in range(2)]
    alphas = [torch.rand(d, generator=gen_) * 0.02 + 1e-3 for _ in range(2)]
    biases = [torch.randn(d, generator=gen_) if bias else None for _ in range(2)]
    dy = torch.randn(shape, generator=gen_)
    args = (ys[0], alphas[0], biases[0], ys[1], alphas[1], biases[1], contraction, act, [], "mlp")
    kern, ref = _ops("gated_linear_region")
    got, want = kern(*args), ref(*args)
    for y, g, w in zip(ys, got[1:3], want[1:3]):
        assert g.dtype == w.dtype == (torch.int16 if contraction < 1 << 15 else torch.int32)
        assert torch.equal(g, w) and torch.equal(w.float(), y)
    _close(got[0], want[0], "out", 1e-5)
    leaves = [y.clone().requires_grad_() for y in ys]
    leaf_b = [b.clone().requires_grad_() if bias else None for b in biases]
    v, u = (leaf * alpha + b if bias else leaf * alpha for leaf, alpha, b in zip(leaves, alphas, leaf_b))
    chain = ACTS[act](v) * u
    _close(want[0], chain.detach(), "reference out", 0)
    chain.backward(dy)
    bargs = (dy, want[1], alphas[0], biases[0], want[2], alphas[1], biases[1], act, [], "mlp")
    kern_b, ref_b = _ops("gated_linear_region_backward")
    got_b, want_b = kern_b(*bargs), ref_b(*bargs)
    for i, name in enumerate(("gate", "up")):
        _close(got_b[2 * i], want_b[2 * i], f"g {name}", 1e-5)
        _close(want_b[2 * i] * alphas[i], leaves[i].grad, f"reference G' {name}", 0)
        if bias:
            _close(got_b[2 * i + 1], want_b[2 * i + 1], f"dbias {name}")
            _close(want_b[2 * i + 1], leaf_b[i].grad, f"reference dbias {name}")
        else:
            assert got_b[2 * i + 1].numel() == 0 and want_b[2 * i + 1].numel() == 0


@pytest.mark.parametrize("act", ["silu", "gelu"])
@pytest.mark.parametrize("shape", SHAPES)
def test_gated_region_kernels_match_the_unfused_chain(shape, act):
    check_gated_region(shape, act)


def test_gated_region_without_bias_and_with_a_long_contraction():
    """No biases (Llama's MLP); K >= 32768 keeps both raw results as int32."""
    check_gated_region((3, 40), "silu", bias=False)
    check_gated_region((70, 33), "silu", contraction=40000)


@settings(max_examples=10, deadline=None)
@given(rows=st.integers(1, 150), d=st.integers(1, 100), bias=st.booleans(), seed=st.integers(0, 1000))
def test_llama_region_kernels_property(rows, d, bias, seed):
    check_rms_region((rows, d), "silu" if bias else "none", seed)
    check_gated_region((rows, d), "silu", bias, seed=seed)


def test_rms_and_gated_regions_do_not_depend_on_the_thread_count():
    """dweight and the bias gradients are column sums over rows: per-block partials."""
    x, dy = torch.randn(300, 37), torch.randn(300, 37)
    y, y_up = torch.randint(-50, 51, (2, 300, 37)).float()
    weight, alpha, b = torch.rand(37) + 0.5, torch.rand(37) * 0.05, torch.randn(37)
    (rms, rms_b), (glu, glu_b) = [(_ops(n)[0], _ops(n + "_backward")[0]) for n in ("rms_region", "gated_linear_region")]
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            out, invstd, _, _ = rms(x, weight, 1e-6, "silu", [], "n")
            glu_out, raw, raw_up, _, _ = glu(y, alpha, b, y_up, alpha, b, 50, "silu", [], "g")
            results.append((out, *rms_b(dy, x, weight, invstd, 1e-6, "silu", [], "n"), glu_out,
                            *glu_b(dy, raw, alpha, b, raw_up, alpha, b, "silu", [], "g")))
    finally:
        torch.set_num_threads(threads)
    for first, second in zip(*results):
        assert torch.equal(first, second)


def test_uncentered_regions_are_row_regions():
    with pytest.raises(ValueError, match="RMSNorm"):
        gen.Region(True, centered=False)


# --------------------------------------------------------------------------- the pass

class LlamaBlock(nn.Module):
    """LlamaRMSNorm's traced chain (with its float32 ``.to`` casts) before two SwiGLU MLPs
    (the second written ``up * silu(gate)``), an ``nn.RMSNorm``, and what the pass must leave
    alone: an RMSNorm chain whose normalized value has a second reader, and a gate product
    whose ``up`` output is read twice."""

    def __init__(self, d=24, hidden=40):
        super().__init__()
        self.embed = nn.Linear(d, d)
        self.norm = nn.Parameter(torch.rand(d) + 0.5)
        self.gate, self.up, self.down = nn.Linear(d, hidden, bias=False), nn.Linear(d, hidden, bias=False), \
            nn.Linear(hidden, d, bias=False)
        self.gate2, self.up2, self.down2 = nn.Linear(d, hidden), nn.Linear(d, hidden), nn.Linear(hidden, d)
        self.rms = nn.RMSNorm(d, eps=1e-5)
        self.gate3, self.up3 = nn.Linear(d, d), nn.Linear(d, d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = self.embed(x).to(torch.float32)
        normalized = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        h = self.norm * normalized.to(torch.float32)
        h = h + self.down(F.silu(self.gate(h)) * self.up(h))
        h = h + self.down2(self.up2(h) * F.silu(self.gate2(h)))
        h = self.rms(h)
        up = self.up3(h)
        h = F.silu(self.gate3(h)) * up + up
        loose = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.head(self.norm * loose + loose)


def test_llama_regions_are_fused_and_match_the_reference_backend(tmp_path):
    x = torch.randn(5, 7, 24, generator=torch.Generator().manual_seed(1))
    compiled, reference = _steps(LlamaBlock, x, lambda out: out.square().mean())
    assert reference.fqt_graphs[-1].regions == []
    cg = compiled.fqt_graphs[-1]
    assert cg.regions == [
        "norm (rms): pow -> mean -> add -> rsqrt -> mul -> to -> mul; writes the sign + STE bits of its output for "
        "gate, up",
        "gate (gated linear): binarized_linear -> silu -> binarized_linear -> mul; times up; input: layers 1 and "
        "2's raw GEMM results, saved as int16 (K=24); writes the sign + STE bits of its output for down",
        "gate2 (gated linear): binarized_linear -> silu -> binarized_linear -> mul; times up2; input: layers 4 "
        "and 5's raw GEMM results, saved as int16 (K=24); writes the sign + STE bits of its output for down2",
        "rms (rms): rms_norm; writes the sign + STE bits of its output for up3, gate3",
        "gate3 (linear): binarized_linear -> silu; input: layer 7's raw GEMM result, saved as int16 (K=24)"], cg.regions
    fw, bw = _graph_ops(cg.forward), _graph_ops(cg.backward)
    assert {"fqt.rms_region.default", "fqt.gated_linear_region.default"} <= fw
    assert {"fqt.rms_region_backward.default", "fqt.gated_linear_region_backward.default"} <= bw
    assert "aten.silu.default" not in fw and "aten.silu_backward.default" not in bw
    # the loose chain at the end stays ATen's
    assert "aten.rsqrt.default" in fw and sum(n.target == torch.ops.aten.rsqrt.default
                                               for n in cg.forward.graph.nodes) == 1
    # Saved for the gated regions: both raw GEMM results as int16, no float copy of the
    # [5, 7, 40] gate/up outputs or of the SiLU's output (the only [5, 7, 40] floats are none)
    saved = [n.meta["val"] for n in cg.backward.graph.nodes if n.op == "placeholder"]
    assert sum(tuple(v.shape) == (5, 7, 40) and v.dtype == torch.int16 for v in saved) == 4
    assert not any(tuple(v.shape) == (5, 7, 40) and v.dtype == torch.float32 for v in saved)
    stats = fqt.runtime.stats()
    for name in ("norm", "gate", "rms"):
        assert stats[(name, "region_forward")].calls == 1 and stats[(name, "region_backward")].calls == 1
    fqt.dump(compiled, tmp_path)
    assert "rms_region" in (tmp_path / "forward.txt").read_text()
    assert "gated_linear_region_backward" in (tmp_path / "backward.txt").read_text()
