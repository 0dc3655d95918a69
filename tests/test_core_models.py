"""Acceptance: unmodified models compile with the default plan and train (docs/math.md §8)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision

import fqt_compiler as fqt
from fqt_test_models import GPT, MLP


def _vision(factory):
    return lambda: (factory(num_classes=10), torch.randn(2, 3, 32, 32), torch.tensor([1, 7]))


# ResNet-18 trains on the kernels against the reference backend in tests/test_lowering.py
# and tests/test_fused_regions.py.
MODELS = {
    "mobilenet_v2": _vision(torchvision.models.mobilenet_v2),
    "gpt": lambda: (GPT(), torch.randint(0, 50, (2, 16)), torch.randint(0, 50, (2, 16))),
    "mlp": lambda: (MLP(), torch.randn(8, 20), torch.randint(0, 5, (8,))),
}


@pytest.mark.parametrize("name", [
    pytest.param("mobilenet_v2", marks=pytest.mark.slow),
    "gpt", "mlp"])
def test_model_trains_with_default_plan(name):
    torch.manual_seed(0)
    model, x, y = MODELS[name]()
    compiled = fqt.compile(model, fqt.Config(backend="reference"))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(5):
        out = compiled(x)
        loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0], losses
    (cg,) = compiled.fqt_graphs
    assert sum(layer.binarize for layer in cg.plan) >= 2
    assert cg.ran["fqt::aq_sample"] == "reference"
