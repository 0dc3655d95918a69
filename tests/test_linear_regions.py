"""Fused linear -> activation regions (a binarized Linear with the default alpha, then GELU
exact or tanh, ReLU, ...): the kernels against the unfused chain, the pass that fuses them,
and what the compiled step saves and shows (issue 13)."""
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

ACTS = {"none": lambda v: v, "gelu": F.gelu, "gelu_tanh": lambda v: F.gelu(v, approximate="tanh"),
        "relu": F.relu, "silu": F.silu}
# rows 1, prime, and more than one ROW_BLOCK; features not multiples of 8 or 16
SHAPES = [(1, 1), (13, 70), (131, 67), (2, 3, 5, 9), (2, 515)]


def _ops(name):
    return registry.lookup(f"fqt::{name}", "kernels"), registry.lookup(f"fqt::{name}", "reference")


def check_linear_region(shape, act, bias=True, contraction=192, seed=0):
    """Kernel == reference (output, the int raw copy, the gradient at ``v`` and the bias
    gradient), and the reference == the literal chain ``Y_raw * alpha + bias -> activation``
    under autograd."""
    gen_ = torch.Generator().manual_seed(seed)
    d = shape[-1]
    y = torch.randint(-contraction, contraction + 1, shape, generator=gen_).float()
    alpha = torch.rand(d, generator=gen_) * 0.02 + 1e-3
    b = torch.randn(d, generator=gen_) if bias else None
    dy = torch.randn(shape, generator=gen_)
    args = (y, alpha, b, contraction, act, [], "fc")
    kern, ref = _ops("linear_act_region")
    (out, raw, *_), (want_out, want_raw, *_) = kern(*args), ref(*args)
    assert raw.dtype == want_raw.dtype == (torch.int16 if contraction < 1 << 15 else torch.int32)
    assert torch.equal(raw, want_raw) and torch.equal(raw.float(), y)
    # the same float32 operations in the same order, but GELU's and SiLU's polynomials
    tol = 1e-5 if act in ("gelu", "gelu_tanh", "silu") else 0
    _close(out, want_out, "out", tol)
    leaf_y = y.clone().requires_grad_()
    leaf_b = b.clone().requires_grad_() if bias else None
    v = leaf_y * alpha
    chain = ACTS[act](v + leaf_b if bias else v)
    _close(want_out, chain.detach(), "reference out", 0)
    chain.backward(dy)
    kern_b, ref_b = _ops("linear_act_region_backward")
    bargs = (dy, raw, alpha, b, act, [], "fc")
    (g, dbias), (want_g, want_dbias) = kern_b(*bargs), ref_b(*bargs)
    _close(g, want_g, "dv", tol)
    _close(want_g * alpha, leaf_y.grad, "reference G'", 0)
    if bias:
        _close(dbias, want_dbias, "dbias")
        _close(want_dbias, leaf_b.grad, "reference dbias")
    else:
        assert dbias.numel() == 0 and want_dbias.numel() == 0


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("shape", SHAPES)
def test_linear_region_kernels_match_the_unfused_chain(shape, act):
    check_linear_region(shape, act)


@pytest.mark.parametrize("act", ["gelu", "gelu_tanh"])
def test_linear_region_without_bias_and_with_a_long_contraction(act):
    """No bias; K >= 32768 keeps the raw result as int32."""
    check_linear_region((3, 40), act, bias=False)
    check_linear_region((70, 33), act, contraction=40000)


@settings(max_examples=15, deadline=None)
@given(rows=st.integers(1, 150), d=st.integers(1, 100), act=st.sampled_from(list(ACTS)),
       bias=st.booleans(), seed=st.integers(0, 1000))
def test_linear_region_kernels_property(rows, d, act, bias, seed):
    check_linear_region((rows, d), act, bias, seed=seed)


def test_linear_region_results_do_not_depend_on_the_thread_count():
    """dbias is a column sum over rows: per-block partials, added in block order."""
    y = torch.randint(-100, 101, (300, 37)).float()
    alpha, b, dy = torch.rand(37) * 0.05, torch.randn(37), torch.randn(300, 37)
    kern, kern_b = _ops("linear_act_region")[0], _ops("linear_act_region_backward")[0]
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            out, raw, _, _ = kern(y, alpha, b, 100, "gelu", [], "fc")
            results.append((out, raw, *kern_b(dy, raw, alpha, b, "gelu", [], "fc")))
    finally:
        torch.set_num_threads(threads)
    for a, b_ in zip(*results):
        assert torch.equal(a, b_)


def test_linear_region_rejects_what_it_cannot_run():
    with pytest.raises(ValueError, match="raw_bits 8"):
        gen.LinearRegion(gen.Activation("gelu"), raw_bits=8)
    with pytest.raises(ValueError, match="activation 'swish'"):
        gen.LinearRegion(gen.Activation("swish"))


# --------------------------------------------------------------------------- the pass

class Mlp(nn.Module):
    """fc1 -> GELU (exact) -> fc2 -> GELU (tanh) -> head, as timm's ViT MLP with a second
    activation; ``shared`` is read twice (by GELU and by the residual) and must stay
    unfused."""

    def __init__(self, d=24, hidden=40):
        super().__init__()
        self.embed = nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d, bias=False)
        self.shared = nn.Linear(d, d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = self.embed(x)
        h = F.gelu(self.fc2(F.gelu(self.fc1(h))), approximate="tanh")
        s = self.shared(h)
        return self.head(F.gelu(s) + s)


def test_linear_regions_are_fused_and_match_the_reference_backend(tmp_path):
    x = torch.randn(5, 7, 24, generator=torch.Generator().manual_seed(1))
    fqt.runtime.reset_stats()   # other tests' layers are called fc1 too
    compiled, reference = _steps(Mlp, x, lambda out: out.square().mean())
    assert reference.fqt_graphs[-1].regions == []
    cg = compiled.fqt_graphs[-1]
    assert [r.split(";")[0] for r in cg.regions] == ["fc1 (linear): binarized_linear -> gelu",
                                                     "fc2 (linear): binarized_linear -> gelu"]
    assert "int16 (K=24)" in cg.regions[0] and "int16 (K=40)" in cg.regions[1]
    fw, bw = _graph_ops(cg.forward), _graph_ops(cg.backward)
    assert "fqt.linear_act_region.default" in fw and "fqt.linear_act_region_backward.default" in bw
    # G' = alpha ⊙ dv: the multiply is folded into fc1's and fc2's gradient quantizers
    region_grads = [n for n in cg.backward.graph.nodes if str(n.meta.get("fqt_op")).startswith("fqt.aq_quantize")
                    and n.args[0].args[0].meta.get("fqt_op") == torch.ops.fqt.linear_act_region_backward.default]
    assert len(region_grads) == 2 and all(n.kwargs.get("alpha") is not None for n in region_grads)
    # only the shared layer's GELU stays ATen's
    assert sum(n.target == torch.ops.aten.gelu.default for n in cg.forward.graph.nodes) == 1
    # Saved for fc1 -> GELU: the raw GEMM result as int16, no float32 [5, 7, 40] tensor
    saved = [n.meta["val"] for n in cg.backward.graph.nodes if n.op == "placeholder"]
    assert not any(tuple(v.shape) == (5, 7, 40) and v.dtype == torch.float32 for v in saved)
    assert any(tuple(v.shape) == (5, 7, 40) and v.dtype == torch.int16 for v in saved)
    stats = fqt.runtime.stats()
    assert stats[("fc1", "region_forward")].calls == 1 and stats[("fc1", "region_backward")].calls == 1
    assert "  - fc1 (linear): binarized_linear -> gelu" in fqt.summary(compiled)
    fqt.dump(compiled, tmp_path)
    assert "linear_act_region" in (tmp_path / "forward.txt").read_text()
    assert "linear_act_region_backward" in (tmp_path / "backward.txt").read_text()
    capture = [p for p in tmp_path.iterdir() if p.name.endswith("capture_fuse_regions.txt")]
    assert "fused region fc2 (linear): binarized_linear -> gelu" in capture[0].read_text()


def test_reference_check_of_linear_region_calls():
    """The cross verifier's oracle replays a linear region's forward and backward calls
    (150 rows: three blocks of dbias partial sums) and catches one flipped bit of the raw copy and one
    wrong gradient."""
    from fqt_compiler.codegen.targets import host_target
    from fqt_compiler.cross import oracle
    from fqt_compiler.cross.verify import call_argument, capture_calls
    kern, kern_b = _ops("linear_act_region")[0], _ops("linear_act_region_backward")[0]
    gen_ = torch.Generator().manual_seed(0)
    y = torch.randint(-50, 51, (150, 21), generator=gen_).float()
    alpha, b, dy = torch.rand(21, generator=gen_) * 0.05, torch.randn(21, generator=gen_), torch.randn(150, 21)
    uses, capture = capture_calls(lambda: kern_b(dy, kern(y, alpha, b, 50, "gelu", [], "fc")[1], alpha, b,
                                                 "gelu", [], "fc"), host_target())
    state = {i: initial for i, (_, _, initial) in enumerate(capture.storages)}
    families = []
    for index, encoded, after in capture.calls:
        spec = uses[index].spec
        families.append(spec.family)
        args = dict(zip(spec.abi.names, map(call_argument, encoded)))
        before = {k: state[k] for k in after}
        assert oracle.check_call(spec, args, before, after) == 0, spec.family
        forward = spec.family == "linear_region_forward"
        buf, offset = args["raw" if forward else "g"]
        first = offset + args["r0"] * 21 * (2 if forward else 4)   # the call's first element
        bad = bytearray(after[buf])
        if forward:
            bad[first] ^= 1          # the raw copy's lowest bit
        else:
            bad[first + 3] ^= 0x80   # the gradient's sign bit
        assert oracle.check_call(spec, args, before, {**after, buf: bytes(bad)}) == 1, spec.family
        state.update(after)
    assert sorted(set(families)) == ["linear_region_backward", "linear_region_forward"]
