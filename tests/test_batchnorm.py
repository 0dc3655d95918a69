"""fqt.recalibrate_bn: running statistics = the average of the batches' statistics, computed
with the final weights; nothing else changes, and the same batches give the same result."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fqt_compiler as fqt


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8, momentum=0.3)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(self.drop(x.mean((2, 3))))


def _data(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(5, 8, 1, 6, 6, generator=gen), torch.randint(0, 4, (5, 8), generator=gen)


def _trained(compiled: bool):
    torch.manual_seed(0)
    model = Net()
    net = fqt.compile(model, fqt.Config(seed=0)) if compiled else model
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    xs, ys = _data()
    for x, y in zip(xs, ys):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    return model, net, opt


def _sign(v):
    return torch.where(v > 0, 1.0, -1.0)


def _expected_stats(model, xs, binarized_conv2: bool):
    """Per BN layer: the mean over batches of each batch's mean and unbiased variance of the
    layer's input, computed eagerly from the model's weights, BN normalizing by batch
    statistics. fqt binarizes conv2 (neither the first nor the last layer): then its output
    is ``mean|w| * conv(sign(pad(x)), sign(w)) + bias`` (docs/math.md)."""
    seen = {"bn1": [], "bn2": []}
    c2 = model.conv2
    for x in xs:
        h = model.conv1(x)
        seen["bn1"].append((h.mean((0, 2, 3)), h.var((0, 2, 3), unbiased=True)))
        h = F.relu(F.batch_norm(h, None, None, model.bn1.weight, model.bn1.bias, True, 0.0, model.bn1.eps))
        if binarized_conv2:
            alpha = c2.weight.abs().mean((1, 2, 3)).view(1, -1, 1, 1)
            h = alpha * F.conv2d(_sign(F.pad(h, (1, 1, 1, 1))), _sign(c2.weight)) + c2.bias.view(1, -1, 1, 1)
        else:
            h = c2(h)
        seen["bn2"].append((h.mean((0, 2, 3)), h.var((0, 2, 3), unbiased=True)))
    return {k: (torch.stack([m for m, _ in v]).mean(0), torch.stack([s for _, s in v]).mean(0))
            for k, v in seen.items()}


def _check_stats(model, xs, before, *, binarized_conv2):
    with torch.no_grad():
        expected = _expected_stats(model, xs, binarized_conv2)
    for name in ("bn1", "bn2"):
        bn = getattr(model, name)
        assert torch.allclose(bn.running_mean, expected[name][0], atol=1e-5)
        assert torch.allclose(bn.running_var, expected[name][1], rtol=1e-4, atol=1e-5)
        assert not torch.allclose(bn.running_mean, before[f"{name}.running_mean"])
        assert bn.num_batches_tracked == len(xs)


def _state(model, opt):
    return (copy.deepcopy({k: v for k, v in model.named_parameters()}),
            {k: v.grad.clone() for k, v in model.named_parameters()},
            copy.deepcopy(opt.state_dict()))


def test_plain_module_statistics_are_the_batch_average():
    model, net, opt = _trained(compiled=False)
    params, grads, opt_state = _state(model, opt)
    xs = _data(seed=1)[0]
    before = copy.deepcopy(model.state_dict())
    assert fqt.recalibrate_bn(net, [(x, None) for x in xs]) == len(xs)
    _check_stats(model, xs, before, binarized_conv2=False)
    assert model.bn1.momentum == 0.3 and model.bn2.momentum == 0.1
    assert model.training and all(m.training for m in model.modules())   # modes restored
    for k, v in model.named_parameters():
        assert torch.equal(v, params[k]) and torch.equal(v.grad, grads[k])
    assert repr(opt.state_dict()) == repr(opt_state)


def test_compiled_module_statistics_deterministic_and_nothing_else_changes():
    model, net, opt = _trained(compiled=True)
    params, grads, opt_state = _state(model, opt)
    step = net.fqt_step
    xs = _data(seed=1)[0]
    start = copy.deepcopy(model.state_dict())
    net.eval()
    fqt.recalibrate_bn(net, iter(xs))
    first = copy.deepcopy(model.state_dict())
    assert not net.training and not model.bn1.training
    _check_stats(model, xs, start, binarized_conv2=True)
    model.load_state_dict(start)
    fqt.recalibrate_bn(net, iter(xs))
    for k, v in model.state_dict().items():
        assert torch.equal(v, first[k]), k
    assert net.fqt_step == step
    for k, v in model.named_parameters():
        assert torch.equal(v, params[k]) and torch.equal(v.grad, grads[k])
    assert repr(opt.state_dict()) == repr(opt_state)
    assert not net.fqt_graph_breaks


def test_bad_batches():
    model = Net()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="no batches"):
        fqt.recalibrate_bn(model, [])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert fqt.recalibrate_bn(nn.Linear(2, 2), [torch.zeros(1, 2)]) == 0
    with pytest.raises(ValueError, match="track_running_stats"):
        fqt.recalibrate_bn(nn.BatchNorm1d(3, track_running_stats=False), [torch.zeros(2, 3)])
