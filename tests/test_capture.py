"""The capture passes take every node Dynamo produces, and a pass failure names the model's
source line of the node it failed on."""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import fqt_compiler as fqt
from fqt_compiler.passes import PassManager, PassResult
from fqt_compiler.passes.infra import at_node


class SideEffects(nn.Module):
    """What library code puts in a Dynamo graph: a call kept only for its side effect, whose
    node has no value (torchvision's ``_log_api_usage_once``), in-place ops on a binarized
    layer's output, and a layer inside activation checkpointing (a higher-order op)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d, self.e = (nn.Linear(8, 16), nn.Linear(16, 16),
                                                  nn.Linear(16, 16), nn.Linear(16, 16),
                                                  nn.Linear(16, 4))

    def _block(self, x):
        return F.relu(self.c(x))

    def forward(self, x):
        torch._C._log_api_usage_once("fqt.tests.side_effects")
        x = F.relu(self.a(x))
        x = self.b(x)
        x.mul_(0.5).add_(0.1)
        F.relu(x, inplace=True)
        x = checkpoint(self._block, x, use_reentrant=False)
        return self.e(F.relu(self.d(x)))


def _train(model, config, x, steps=2):
    compiled = fqt.compile(model, config)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    outs = []
    for _ in range(steps):
        out = compiled(x)
        out.square().mean().backward()
        outs.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
        opt.step()
        opt.zero_grad()
    return compiled, outs


def test_side_effect_calls_inplace_ops_and_checkpointing_compile_and_train():
    torch.manual_seed(0)
    x = torch.randn(6, 8)
    models = [SideEffects() for _ in range(3)]
    for m in models[1:]:
        m.load_state_dict(models[0].state_dict())
    compiled, kernels = _train(models[0], fqt.Config(backend="kernels"), x)
    _, reference = _train(models[1], fqt.Config(backend="reference"), x)
    for (y_k, g_k), (y_r, g_r) in zip(kernels, reference):
        torch.testing.assert_close(y_k, y_r, rtol=1e-4, atol=1e-5)
        for a, b in zip(g_k, g_r):
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    plan = {layer.name: layer for layer in compiled.fqt_last.plan}
    assert [name for name, layer in plan.items() if layer.binarize] == ["b", "d"]
    assert "inside tag_activation_checkpoint" in plan["c"].reason
    assert re.search(r"^2\s+c\s+float .*inside tag_activation_checkpoint", fqt.summary(compiled),
                     re.M)
    assert plan["a"].reason == "first layer: sees the input"
    assert plan["e"].reason == "last layer: produces the output"
    assert compiled.fqt_graph_breaks == []
    # the in-place ops keep their meaning: with every layer float, the compiled model is the
    # eager one
    eager = SideEffects()
    eager.load_state_dict(models[2].state_dict())
    floats = fqt.compile(models[2], fqt.Config(rules=[{"type": "Linear", "binarize": False}]))
    torch.testing.assert_close(floats(x), eager(x))


def _capture(model, x, passes):
    """Run ``passes`` through a PassManager on Dynamo's graph of ``model``."""
    def backend(gm, _inputs):
        PassManager("capture", passes)(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=backend, fullgraph=True)(x)


def test_pass_failure_names_the_source_line_of_the_node():
    def fail_at_second_linear(gm):
        linear = [n for n in gm.graph.nodes if n.target is torch._C._nn.linear][1]
        with at_node(linear):
            raise ValueError("cannot take this call")

    with pytest.raises(Exception) as info:
        _capture(SideEffects(), torch.randn(2, 8), [fail_at_second_linear])
    text = str(info.value)
    assert "pass 'fail_at_second_linear' failed" in text and "cannot take this call" in text
    assert re.search(r'File ".*test_capture\.py", line \d+, in forward\n\s+x = self\.b\(x\)',
                     text), text


def test_lint_names_the_source_line_of_a_used_node_without_a_value():
    def drop_value_of_relu(gm):
        relu = next(n for n in gm.graph.nodes if n.target is F.relu)
        relu.meta.pop("example_value")
        return PassResult(gm, True)

    with pytest.raises(Exception) as info:
        _capture(SideEffects(), torch.randn(2, 8), [drop_value_of_relu])
    text = str(info.value)
    assert "is used by" in text and "has no meta['val']" in text
    assert "x = F.relu(self.a(x))" in text
