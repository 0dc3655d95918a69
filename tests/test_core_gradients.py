"""Gradients of compiled models against docs/math.md §2-4 written out eagerly in this file."""
from __future__ import annotations

import copy
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fqt_compiler as fqt
from fqt_test_models import GPT, MLP, SignSTE, SmallCNN


def _binary_forward(self, x):
    alpha = self.weight.detach().abs().flatten(1).mean(1)
    if isinstance(self, nn.Conv2d):
        ph, pw = self.padding
        xp = F.pad(x, (pw, pw, ph, ph))  # zeros before sign: padding is -1
        y = F.conv2d(SignSTE.apply(xp), SignSTE.apply(self.weight), None, self.stride, 0,
                     self.dilation) * alpha.view(1, -1, 1, 1)
        return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)
    y = F.linear(SignSTE.apply(x), SignSTE.apply(self.weight)) * alpha
    return y if self.bias is None else y + self.bias


def eager_twin(model: nn.Module, binarized: list[str]) -> nn.Module:
    """A copy of ``model`` whose listed layers run the binarized formulas eagerly."""
    twin = copy.deepcopy(model)
    for name in binarized:
        module = twin.get_submodule(name)
        module.forward = types.MethodType(_binary_forward, module)
    return twin


def grads(model, loss):
    for p in model.parameters():
        p.grad = None
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def compiled_pair(model, **config):
    return fqt.compile(model, fqt.Config(backend="reference", **config))


CASES = {
    "cnn": (lambda: SmallCNN(), lambda: torch.randn(4, 3, 8, 8), "cnn"),
    "gpt": (lambda: GPT(), lambda: torch.randint(0, 50, (2, 16)), "gpt"),
}


def _loss(out):
    return (out.float() ** 2).mean() + out.float().sum() * 0.01


@pytest.mark.parametrize("case", CASES)
def test_method_none_gradients_equal_eager_sign_ste(case):
    make_model, make_input, _ = CASES[case]
    torch.manual_seed(0)
    model, x = make_model(), make_input()
    compiled = compiled_pair(model, method="none")
    g_fqt = grads(model, _loss(compiled(x)))
    binarized = [layer.name for layer in compiled.fqt_graphs[-1].plan if layer.binarize]
    assert len(binarized) >= 2
    twin = eager_twin(model, binarized)
    g_ref = grads(twin, _loss(twin(x)))
    assert g_fqt.keys() == g_ref.keys()
    for name in g_ref:
        torch.testing.assert_close(g_fqt[name], g_ref[name], rtol=1e-4, atol=1e-5, msg=name)


def test_bn_running_stats_and_eval_match_eager():
    torch.manual_seed(1)
    model, x = SmallCNN(), torch.randn(4, 3, 8, 8)
    before = copy.deepcopy(model)
    compiled = compiled_pair(model, method="aq_scq")
    out = compiled(x)
    twin = eager_twin(before, [l.name for l in compiled.fqt_graphs[-1].plan if l.binarize])
    torch.testing.assert_close(out, twin(x), rtol=1e-4, atol=1e-5)
    buffers = dict(twin.named_buffers())
    for name, b in model.named_buffers():
        torch.testing.assert_close(b, buffers[name], msg=name)
    assert model.bn1.num_batches_tracked.item() == 1
    compiled.eval()
    twin.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), twin(x), rtol=1e-4, atol=1e-5)


def _draw(model, compiled, x):
    return grads(model, _loss(compiled(x)))


def test_same_seed_bit_identical_different_seed_differs():
    torch.manual_seed(0)
    base, x = SmallCNN(), torch.randn(4, 3, 8, 8)
    runs = {}
    for tag, seed in (("a", 3), ("b", 3), ("c", 4)):
        model = copy.deepcopy(base)
        runs[tag] = _draw(model, compiled_pair(model, seed=seed), x)
    for name in runs["a"]:
        assert torch.equal(runs["a"][name], runs["b"][name]), name
    binary_weights = ["conv1.weight", "conv2.weight", "fc1.weight"]
    assert all(not torch.equal(runs["a"][n], runs["c"][n]) for n in binary_weights)


def test_step_advances_the_random_draws():
    torch.manual_seed(0)
    model, x = SmallCNN(), torch.randn(4, 3, 8, 8)
    compiled = compiled_pair(model, seed=0)
    first, second = _draw(model, compiled, x), _draw(model, compiled, x)
    assert compiled.fqt_step == 2
    assert not torch.equal(first["conv1.weight"], second["conv1.weight"])
    assert len(compiled.fqt_graphs) == 1  # the step is an input, not a recompile


@pytest.mark.slow
def test_aq_scq_gradient_is_unbiased():
    torch.manual_seed(0)
    model, x = MLP(), torch.randn(16, 20)
    exact = grads(model, _loss(compiled_pair(model, method="none")(x)))
    compiled = compiled_pair(model, method="aq_scq", bits=4)
    draws = [_draw(model, compiled, x) for _ in range(300)]
    for name in ("net.2.weight", "net.5.weight"):  # the binarized body layers
        single = torch.stack([(d[name] - exact[name]).norm() for d in draws[:20]]).mean()
        mean = torch.stack([d[name] for d in draws]).mean(0)
        # 300 independent unbiased draws shrink the error ~17x; a bias would not shrink.
        assert (mean - exact[name]).norm() < 0.2 * single, name


def test_learned_alpha_is_a_trained_parameter():
    torch.manual_seed(0)
    model = SmallCNN()
    compiled = compiled_pair(model, alpha="learned", method="none")
    assert isinstance(model.conv1.fqt_alpha, nn.Parameter)
    assert any(p is model.conv1.fqt_alpha for p in compiled.parameters())
    g = grads(model, _loss(compiled(torch.randn(4, 3, 8, 8))))
    assert g["conv1.fqt_alpha"].abs().sum() > 0
    assert "stem.fqt_alpha" not in g  # first layer stays float


def test_new_input_shape_recompiles():
    # dynamic=False: one static graph per shape (the default, "auto", would make the second
    # one dynamic, or the first, when an earlier test already fed this forward two batch
    # sizes: Dynamo remembers that per code object; tests/test_dynamic.py covers "auto").
    model = SmallCNN()
    compiled = compiled_pair(model, dynamic=False)
    compiled(torch.randn(2, 3, 8, 8)).sum().backward()
    compiled(torch.randn(3, 3, 8, 8)).sum().backward()
    assert len(compiled.fqt_graphs) == 2 and not any(cg.dynamic for cg in compiled.fqt_graphs)
    assert compiled.fqt_graphs[-1].plan[1].shapes["x"][0] == 3
