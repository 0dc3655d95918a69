"""Fused row regions (LayerNorm over the last dimension -> activation, GELU exact and tanh
among them): the kernels against the unfused chain, the pass that fuses them, and training
steps of a BERT and a ViT-tiny on the kernels against the reference backend (issue 13)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import fqt_compiler as fqt
from fqt_compiler.codegen import fusion as gen
from fqt_compiler.ops import registry
from fqt_compiler.runtime import fusion

ACTS = ["none", "gelu", "gelu_tanh", "relu", "silu"]
# rows 1, prime, and more than one ROW_BLOCK; features not multiples of 8 or 64
SHAPES = [(1, 7), (13, 70), (131, 67), (2, 3, 5, 9), (2, 515)]


def _ops(name):
    return registry.lookup(f"fqt::{name}", "kernels"), registry.lookup(f"fqt::{name}", "reference")


def _close(got, want, what, tol=1e-5, atol=None):
    scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    atol = tol * scale if atol is None else max(float(atol), tol * scale)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    assert torch.allclose(got, want, rtol=tol, atol=atol), (what, (got - want).abs().max())


def check_row_region(shape, act, seed=0):
    """Kernel == reference (output, per-row mean/invstd, the three gradients), and the
    reference == the literal chain ``F.layer_norm -> activation`` differentiated by autograd."""
    gen_ = torch.Generator().manual_seed(seed)
    d = shape[-1]
    x = torch.randn(shape, generator=gen_) * 2 + 0.5
    weight, bias = torch.rand(d, generator=gen_) + 0.5, torch.randn(d, generator=gen_) * 0.5
    dy = torch.randn(shape, generator=gen_)
    args = (x, weight, bias, 1e-5, act, [], "ln")
    kern, ref = _ops("ln_region")
    got, want = kern(*args), ref(*args)
    # A row whose spread is small next to its values is ill-conditioned: a rounding of
    # x - mean (relative 6e-8 of |x|) becomes relative 6e-8 |x| invstd of the output and the
    # gradients, in ATen's chain as in the kernel. The tolerances follow that amplification.
    cond = max(1.0, (x.abs().amax(-1) * want[2]).max().item() / 100)
    for name, g, w in zip(("out", "mean", "invstd"), got, want):
        _close(g, w, name, 1e-5 * cond)
    leaf = [t.clone().requires_grad_() for t in (x, weight, bias)]
    chain = {"none": lambda v: v, "gelu": F.gelu, "gelu_tanh": lambda v: F.gelu(v, approximate="tanh"),
             "relu": F.relu, "silu": F.silu}[act](F.layer_norm(leaf[0], (d,), leaf[1], leaf[2], 1e-5))
    _close(want[0], chain.detach(), "reference out", 1e-5 * cond)
    chain.backward(dy)
    bargs = (dy, x, weight, bias, want[1], want[2], 1e-5, act, [], "ln")
    kern_b, ref_b = _ops("ln_region_backward")
    # dx is also a difference of terms of size |dy gamma| invstd that cancel (to 0 for two
    # features): its tolerance is relative to those terms.
    tol = 1e-4 * cond
    terms = dy.abs().max() * weight.abs().max() * want[2].max()
    for name, g, w, autograd in zip(("dx", "dweight", "dbias"), kern_b(*bargs), ref_b(*bargs), leaf):
        atol = tol / 10 * terms if name == "dx" else None
        _close(g, w, name, tol, atol)
        _close(w, autograd.grad, f"reference {name}", tol, atol)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_row_region_kernels_match_the_unfused_chain(shape, act):
    check_row_region(shape, act)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 150), d=st.integers(2, 130), act=st.sampled_from(ACTS),
       seed=st.integers(0, 1000))
def test_row_region_kernels_property(rows, d, act, seed):
    check_row_region((rows, d), act, seed)


def test_row_region_of_one_feature_is_exact():
    """One feature per row: the row is its own mean, so the output is ``bias`` and only dbias
    is nonzero, exactly (ATen's mean may differ from x by a rounding, which invstd =
    1/sqrt(eps) amplifies: the reference is not the oracle here, the math is)."""
    x, dy = torch.randn(15, 1) * 3, torch.randn(15, 1)
    weight, bias = torch.tensor([1.5]), torch.tensor([-0.25])
    kern, kern_b = _ops("ln_region")[0], _ops("ln_region_backward")[0]
    out, mean, invstd, _, _ = kern(x, weight, bias, 1e-5, "none", [], "ln")
    assert torch.equal(out, bias.expand(15, 1)) and torch.equal(mean, x.flatten())
    dx, dweight, dbias = kern_b(dy, x, weight, bias, mean, invstd, 1e-5, "none", [], "ln")
    assert torch.equal(dx, torch.zeros(15, 1)) and dweight.item() == 0
    _close(dbias, dy.sum(0), "dbias")


def test_row_region_results_do_not_depend_on_the_thread_count():
    """dgamma/dbeta are column sums over rows: per-block partials, added in block order."""
    x, dy = torch.randn(300, 37), torch.randn(300, 37)
    weight, bias = torch.rand(37) + 0.5, torch.randn(37)
    kern, kern_b = _ops("ln_region")[0], _ops("ln_region_backward")[0]
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            out, mean, invstd, _, _ = kern(x, weight, bias, 1e-5, "gelu", [], "ln")
            results.append((out, *kern_b(dy, x, weight, bias, mean, invstd, 1e-5, "gelu", [], "ln")))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


_POLYNOMIAL_ACTS = {"gelu": (F.gelu, torch.ops.aten.gelu_backward),
                    "gelu_tanh": (lambda v: F.gelu(v, approximate="tanh"),
                                  lambda d, v: torch.ops.aten.gelu_backward(d, v, approximate="tanh")),
                    "silu": (F.silu, torch.ops.aten.silu_backward)}


@pytest.mark.parametrize("name", list(_POLYNOMIAL_ACTS))
def test_polynomial_activations_match_torch_over_the_float_range(name):
    """GELU, SiLU and their derivatives from the kernels' polynomial erf/exp/tanh, against
    float64 torch: about as close as float32 torch is (and finite, with the right limits, at
    huge inputs where an unclamped exp would overflow)."""
    x = torch.cat([torch.linspace(-12, 12, 20001),
                   torch.tensor([-1e30, -1e4, -100.0, -9.5, 0.0, -0.0, 1e-30, 9.5, 100.0, 1e4, 1e30])])
    x4 = x.view(1, -1, 1, 1)
    ones, zeros = torch.ones(x.numel()), torch.zeros(x.numel())
    region = gen.Region(False, gen.Activation(name))   # eval-mode identity affine, then GELU
    out = fusion.region_forward(x4, region, ones, zeros, zeros, ones)[0].flatten().double()
    dx = fusion.region_backward(torch.ones_like(x4), x4, torch.empty(0, dtype=torch.uint8), region,
                                ones, zeros, zeros, ones)[0].flatten().double()
    forward, backward = _POLYNOMIAL_ACTS[name]
    want, want_d = forward(x.double()), backward(torch.ones_like(x).double(), x.double())
    # float32 ATen's tanh-GELU derivative is NaN where x^2 overflows; the kernel's too
    finite = torch.isfinite(backward(torch.ones_like(x), x))
    assert torch.equal(finite, torch.isfinite(dx))
    assert ((out - want).abs() / want.abs().clamp(min=1)).max() < 1e-6
    assert (dx - want_d)[finite].abs().max() < 5e-6
    assert out[-1] == x[-1] and out[-11] == 0 and dx[-10] == 0 and dx[-2] == 1


def test_row_region_rejects_what_it_cannot_run():
    with pytest.raises(ValueError, match="row region"):
        gen.Region(True, pool=(2, 2, 2, 2, 0, 0), axis="row")
    with pytest.raises(ValueError, match="axis"):
        gen.Region(True, axis="column")


# --------------------------------------------------------------------------- the pass

class Encoder(nn.Module):
    """LayerNorm after a linear layer, LayerNorm -> GELU (tanh), a residual add before a
    LayerNorm, and two LayerNorms the pass must leave alone (no affine; two dimensions)."""

    def __init__(self, d=24, hidden=40):
        super().__init__()
        self.embed, self.ln0 = nn.Linear(d, d), nn.LayerNorm(d)
        self.fc1, self.ln1, self.act = nn.Linear(d, hidden), nn.LayerNorm(hidden), nn.GELU("tanh")
        self.fc2, self.ln2 = nn.Linear(hidden, d), nn.LayerNorm(d)
        self.plain, self.wide = nn.LayerNorm(d, elementwise_affine=False), nn.LayerNorm((7, d))
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = self.ln0(self.embed(x))
        h = self.ln2(self.fc2(self.act(self.ln1(self.fc1(h)))) + h)
        return self.head(self.wide(self.plain(h)))


def _graph_ops(gm):
    return {str(n.meta.get("fqt_op", n.target)) for n in gm.graph.nodes}


def _same_direction(got, want, name):
    # Zero in exact arithmetic (attention's key bias: softmax ignores a per-query shift), so
    # float rounding leaves noise of about 1e-12 with no direction to compare.
    if want.norm() < 1e-9:
        assert got.norm() < 1e-9, name
    else:
        assert F.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.999, name


def _steps(make, x, loss_fn):
    """Loss and gradients of one training step on the kernels and on the reference backend."""
    results = {}
    for backend in ("kernels", "reference"):
        torch.manual_seed(0)
        model = make()
        compiled = fqt.compile(model, fqt.Config(backend=backend, seed=0))
        loss = loss_fn(compiled(x))
        loss.backward()
        results[backend] = (compiled, loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()})
    (_, loss_k, grads_k), (_, loss_r, grads_r) = results["kernels"], results["reference"]
    assert abs(loss_k - loss_r) <= 1e-4 * abs(loss_r), (loss_k, loss_r)
    assert any(g.norm() > 0 for g in grads_r.values())
    for name, g in grads_r.items():
        _same_direction(grads_k[name], g, name)
    return results["kernels"][0], results["reference"][0]


def test_layer_norm_regions_are_fused_and_match_the_reference_backend(tmp_path):
    x = torch.randn(5, 7, 24, generator=torch.Generator().manual_seed(1))
    compiled, reference = _steps(Encoder, x, lambda out: out.square().mean())
    assert reference.fqt_graphs[-1].regions == []
    cg = compiled.fqt_graphs[-1]
    # ln0 and ln1 -> gelu feed binarized fc1, fc2: they write the sign + STE bits those take
    assert cg.regions == ["ln0 (row): layer_norm; writes the sign + STE bits of its output for fc1",
                          "ln1 (row): layer_norm -> gelu; writes the sign + STE bits of its output for fc2",
                          "ln2 (row): layer_norm"]
    fw, bw = _graph_ops(cg.forward), _graph_ops(cg.backward)
    assert "fqt.ln_region.default" in fw and "fqt.ln_region_backward.default" in bw
    assert "aten.gelu.default" not in fw and "aten.gelu_backward.default" not in bw
    # the two unfusible LayerNorms stay ATen's
    assert "aten.native_layer_norm.default" in fw
    ln_backward = torch.ops.aten.native_layer_norm_backward.default
    assert sum(n.target == ln_backward for n in cg.backward.graph.nodes) == 2
    # Saved for ln1 -> gelu: its input and per-row statistics, not its float output or the
    # GELU's input: the only saved [5, 7, 40] float tensor is ln1's input.
    saved = [n.meta["val"] for n in cg.backward.graph.nodes if n.op == "placeholder"]
    assert sum(tuple(v.shape) == (5, 7, 40) and v.dtype == torch.float32 for v in saved) == 1
    stats = fqt.runtime.stats()
    assert stats[("ln1", "region_forward")].calls == 1 and stats[("ln1", "region_backward")].calls == 1
    assert "  - ln1 (row): layer_norm -> gelu; writes the sign + STE bits of its output for fc2" \
        in fqt.summary(compiled)
    fqt.dump(compiled, tmp_path)
    assert "ln_region" in (tmp_path / "forward.txt").read_text()
    assert "ln_region_backward" in (tmp_path / "backward.txt").read_text()
    capture = [p for p in tmp_path.iterdir() if p.name.endswith("capture_fuse_regions.txt")]
    assert "fused region ln1 (row): layer_norm -> gelu" in capture[0].read_text()


@pytest.mark.slow
def test_bert_step_with_fused_layer_norms_matches_the_reference_backend():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=48, hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=128,
                                     max_position_embeddings=16, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    ids = torch.randint(0, 48, (4, 16), generator=torch.Generator().manual_seed(0))
    compiled, _ = _steps(lambda: transformers.BertForMaskedLM(config), ids,
                         lambda out: F.cross_entropy(out.logits.reshape(-1, 48), ids.reshape(-1)))
    regions = compiled.fqt_graphs[-1].regions
    # LayerNorms: embeddings, two per layer, and the MLM head's transform (dense -> GELU ->
    # LayerNorm); binarized dense -> GELU: each layer's intermediate and the head's transform
    rows = [r for r in regions if r.split(";")[0].endswith("(row): layer_norm")]
    linear = [r for r in regions if "(linear): binarized_linear -> gelu; input: " in r]
    assert len(rows) == 6 and len(linear) == 3 and len(regions) == 9, regions
    # all but the head's two write the bits of the binarized layers after them (the next
    # Q, K, V; intermediate; output dense; the head's transform)
    assert sum("; writes the sign + STE bits of its output for " in r for r in regions) == 7, regions
    assert ("bert.encoder.layer.0.output.LayerNorm (row): layer_norm; writes the sign + STE bits of its output for "
            "bert.encoder.layer.1.attention.self.query, bert.encoder.layer.1.attention.self.key, "
            "bert.encoder.layer.1.attention.self.value") in regions, regions


@pytest.mark.slow
def test_vit_tiny_step_with_fused_layer_norms_matches_the_reference_backend():
    timm = pytest.importorskip("timm")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([1, 7])
    compiled, _ = _steps(lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                                                   num_classes=10, depth=4),
                         x, lambda out: F.cross_entropy(out, y))
    regions = compiled.fqt_graphs[-1].regions
    # norm1, norm2 per block, final norm; fc1 -> GELU per block
    assert sum("(row): layer_norm" in r for r in regions) == 2 * 4 + 1
    linear = [r for r in regions if "(linear)" in r]
    assert [r.split(" ")[0] for r in linear] == [f"blocks.{i}.mlp.fc1" for i in range(4)], regions
    assert all(r.startswith(f"blocks.{i}.mlp.fc1 (linear): binarized_linear -> gelu; input: layer ")
               and r.endswith(f"'s raw GEMM result, saved as int16 (K=192); writes the sign + STE bits of its "
                              f"output for blocks.{i}.mlp.fc2") for i, r in enumerate(linear)), regions
