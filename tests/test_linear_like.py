"""Layers recognised in the traced graph, not by module class (transformers' GPT-2 ``Conv1D``
as ``addmm`` with a transposed weight, ``F.linear`` with a parameter weight, ``nn.Conv1d``),
checked against the binarized formulas (docs/math.md §2-3) written out eagerly here; and
attention's products and softmax reported as kept float."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fqt_compiler as fqt
from fqt_test_models import SignSTE


class Conv1DLike(nn.Module):
    """transformers.pytorch_utils.Conv1D: the weight is ``[in, out]``, used through addmm."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.5)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


class FunctionalLinear(nn.Module):
    """``F.linear`` with a parameter that is not called ``weight``."""

    def __init__(self, out: int, features: int):
        super().__init__()
        self.proj = nn.Parameter(torch.randn(out, features) * 0.5)
        self.shift = nn.Parameter(torch.randn(out) * 0.1)

    def forward(self, x):
        return F.linear(x, self.proj, self.shift)


class Gate(nn.Module):
    """Two GEMM weights in one module (a SwiGLU gate)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w_gate = nn.Parameter(torch.randn(hidden, dim) * 0.3)
        self.w_up = nn.Parameter(torch.randn(hidden, dim) * 0.3)

    def forward(self, x):
        return F.silu(F.linear(x, self.w_gate)) * F.linear(x, self.w_up)


class Mixer(nn.Module):
    """Linear -> Conv1D-like -> single-head attention -> gate -> Conv1d over tokens -> Linear."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.c1 = Conv1DLike(32, 16)
        self.gate = Gate(32, 24)
        self.conv = nn.Conv1d(24, 24, 3, padding=1)
        self.out = nn.Linear(24, 4)

    def forward(self, x):
        h = self.c1(self.inp(x))
        att = (h @ h.transpose(1, 2) / math.sqrt(h.shape[-1])).softmax(-1)
        h = self.gate(att @ h)
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        return self.out(h)


MIXER_LAYERS = ["inp", "c1", "gate.w_gate", "gate.w_up", "conv", "out"]


def _plan(compiled):
    return {layer.name: layer for layer in compiled.fqt_graphs[-1].plan}


def test_plan_recognises_the_forms_by_call():
    torch.manual_seed(0)
    compiled = fqt.compile(Mixer(), fqt.Config(backend="reference"))
    compiled(torch.randn(2, 5, 8))
    plan = _plan(compiled)
    assert list(plan) == MIXER_LAYERS
    assert compiled.fqt_call_order == MIXER_LAYERS
    assert {n: plan[n].kind for n in MIXER_LAYERS} == {
        "inp": "linear", "c1": "linear", "gate.w_gate": "linear", "gate.w_up": "linear",
        "conv": "conv1d", "out": "linear"}
    assert [plan[n].binarize for n in MIXER_LAYERS] == [False, True, True, True, True, False]
    assert plan["c1"].shapes["weight"] == (32, 16)        # [out, in], though stored [in, out]
    assert plan["conv"].shapes["weight"] == (24, 24, 3)


def test_rules_select_graph_layers_by_type_and_name():
    config = fqt.Config(backend="reference", rules=[
        {"type": "Conv1DLike", "bits": 8}, {"name": "gate.w_up", "binarize": False},
        {"type": Gate, "method": "psq"}, {"type": "Conv1d", "binarize": False}])
    compiled = fqt.compile(Mixer(), config)
    compiled(torch.randn(2, 5, 8))
    plan = _plan(compiled)
    assert plan["c1"].binarize and plan["c1"].bits == 8
    assert not plan["gate.w_up"].binarize and "rules[1]" in plan["gate.w_up"].reason
    assert plan["gate.w_gate"].method == "psq" and plan["gate.w_up"].method == "psq"
    assert not plan["conv"].binarize and "rules[3]" in plan["conv"].reason


def test_a_rule_selecting_no_gemm_weight_is_an_error():
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2))
    with pytest.raises(ValueError, match="rules\\[0\\].*selects no layer"):
        fqt.compile(model, fqt.Config(rules=[{"name": "7"}]))
    # An Embedding weight may be a GEMM weight (a tied LM head) until the graph shows it is not.
    compiled = fqt.compile(model, fqt.Config(rules=[{"type": "Embedding", "bits": 2}]))
    with pytest.raises(ValueError, match="selects no layer; the model's layers .*: 1, 2, 3"):
        compiled(torch.randint(0, 10, (2, 3)))


def test_learned_alpha_falls_back_to_mean_for_a_graph_only_layer():
    torch.manual_seed(0)
    model = Mixer()
    compiled = fqt.compile(model, fqt.Config(backend="reference", alpha="learned"))
    compiled(torch.randn(2, 5, 8))
    plan = _plan(compiled)
    assert plan["conv"].alpha == "learned" and isinstance(model.conv.fqt_alpha, nn.Parameter)
    assert plan["c1"].alpha == "mean" and "mean |w| used" in plan["c1"].reason
    assert not hasattr(model.c1, "fqt_alpha")


def test_summary_lists_attention_products_and_softmax_as_float():
    compiled = fqt.compile(Mixer(), fqt.Config(backend="reference"))
    compiled(torch.randn(2, 5, 8))
    text = fqt.summary(compiled)
    kept = text.split("kept float (not layers):")[1]
    assert "matmul x2: activation x activation" in kept
    assert "softmax" in kept
    assert "gate" not in kept and "c1" not in kept


# --------------------------------------------------------------------------- values

def _eager_binarized(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """docs/math.md §2 for each form, with sign and its STE written out (SignSTE)."""
    if isinstance(module, Conv1DLike):
        w = module.weight                                  # [in, out]
        alpha = w.detach().abs().mean(0)
        x2 = x.reshape(-1, x.shape[-1])
        y = (SignSTE.apply(x2) @ SignSTE.apply(w)) * alpha + module.bias
        return y.view(*x.shape[:-1], -1)
    if isinstance(module, FunctionalLinear):
        alpha = module.proj.detach().abs().mean(1)
        return F.linear(SignSTE.apply(x), SignSTE.apply(module.proj)) * alpha + module.shift
    w = module.weight                                      # nn.Conv1d
    alpha = w.detach().abs().flatten(1).mean(1)
    (k,), (d,) = module.kernel_size, module.dilation
    pad = d * (k - 1) // 2 if module.padding == "same" else module.padding[0]
    xp = F.pad(x, (pad, pad))                              # zeros before sign: padding is -1
    y = F.conv1d(SignSTE.apply(xp), SignSTE.apply(w), None, module.stride, 0, module.dilation)
    return y * alpha.view(1, -1, 1) + module.bias.view(1, -1, 1)


FORMS = {  # name -> (module factory, input shape)
    "conv1d-like rows=10 k=65 o=3": (lambda: Conv1DLike(3, 65), (2, 5, 65)),
    "conv1d-like rows=1 k=130 o=1": (lambda: Conv1DLike(1, 130), (1, 1, 130)),
    "F.linear rows=6 k=64 o=7": (lambda: FunctionalLinear(7, 64), (3, 2, 64)),
    "F.linear rows=1 k=3 o=1": (lambda: FunctionalLinear(1, 3), (1, 3)),
    "Conv1d k=3 pad=1": (lambda: nn.Conv1d(3, 5, 3, padding=1), (2, 3, 9)),
    "Conv1d k=4 stride=2": (lambda: nn.Conv1d(5, 4, 4, stride=2), (1, 5, 11)),
    "Conv1d k=3 dil=2 pad=2 o=1": (lambda: nn.Conv1d(7, 1, 3, padding=2, dilation=2), (3, 7, 10)),
    "Conv1d K=66 same dil=2": (lambda: nn.Conv1d(22, 3, 3, padding="same", dilation=2), (2, 22, 8)),
}
ALL_BINARY = [{"regex": ".*", "binarize": True}]   # a lone layer is first and last


def _run(form, backend, method, seed=5):
    make, shape = FORMS[form]
    torch.manual_seed(0)
    module, x = make(), torch.randn(*shape).requires_grad_()
    compiled = fqt.compile(module, fqt.Config(backend=backend, method=method, seed=seed,
                                              rules=ALL_BINARY))
    y = compiled(x)
    torch.manual_seed(1)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    assert all(layer.binarize for layer in compiled.fqt_graphs[-1].plan)
    return module, x, y.detach(), g, {"x": x.grad, **{n: p.grad for n, p in module.named_parameters()}}


@pytest.mark.parametrize("form", FORMS)
def test_forward_and_float_gradients_equal_the_eager_formulas(form):
    module, x, y, g, grads = _run(form, "reference", "none")
    x_eager = x.detach().clone().requires_grad_()
    y_eager = _eager_binarized(module, x_eager)
    torch.testing.assert_close(y, y_eager.detach(), rtol=1e-5, atol=1e-5)
    module.zero_grad()
    (y_eager * g).sum().backward()
    eager = {"x": x_eager.grad, **{n: p.grad for n, p in module.named_parameters()}}
    for name, want in eager.items():
        torch.testing.assert_close(grads[name], want, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("form", FORMS)
def test_kernels_equal_the_reference_draw_for_draw(form):
    _, _, y_ref, _, grads_ref = _run(form, "reference", "aq_scq")
    _, _, y_kern, _, grads_kern = _run(form, "kernels", "aq_scq")
    assert torch.equal(y_kern, y_ref)    # integer GEMM times the same float alpha
    for name, want in grads_ref.items():
        torch.testing.assert_close(grads_kern[name], want, rtol=1e-4, atol=1e-5, msg=name)


def test_the_bias_add_folds_into_the_gemm_epilogue(tmp_path):
    """A binarized linear layer's ``alpha * y_raw + bias`` is one kernel call (the epilogue
    adds the bias): no float add is left in the forward graph, the dump says so, and the
    output is the reference backend's bit for bit (same two float32 roundings)."""
    form = "F.linear rows=6 k=64 o=7"
    _, _, y_ref, _, _ = _run(form, "reference", "aq_scq")
    make, shape = FORMS[form]
    torch.manual_seed(0)
    module, x = make(), torch.randn(*shape)
    compiled = fqt.compile(module, fqt.Config(backend="kernels", method="aq_scq", seed=5, rules=ALL_BINARY))
    assert torch.equal(compiled(x), y_ref)
    fw = compiled.fqt_graphs[-1].forward.graph
    targets = {str(n.meta.get("fqt_op", n.target)) for n in fw.nodes}
    assert "fqt.binary_linear_scaled.default" in targets and "aten.add.Tensor" not in targets
    fqt.dump(compiled, tmp_path)
    assert "alpha * y_raw + bias (alpha + bias in the GEMM epilogue)" in (tmp_path / "forward.txt").read_text()
