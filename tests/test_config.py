"""Config validation and the resolved per-layer plan."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fqt_compiler as fqt
from fqt_compiler.config import resolve_plan
from fqt_test_models import SmallCNN

ORDER = ["stem", "conv1", "conv2", "dw", "fc1", "head"]  # SmallCNN's call order


def plan_of(config, order=ORDER):
    return {layer.name: layer for layer in resolve_plan(SmallCNN(), config, order)}


def test_defaults_match_spec():
    cfg = fqt.Config()
    assert (cfg.method, cfg.bits, cfg.seed, cfg.backend, cfg.target) == ("aq_scq", 4, 0, "kernels", "host")


@pytest.mark.parametrize("options, words", [
    ({"bitz": 4}, ["bitz", "did you mean 'bits'"]),
    ({"bits": 3}, ["bits=3", "(1, 2, 4, 8)"]),
    ({"bits": 16}, ["bits=16"]),
    ({"check_finite": "yes"}, ["check_finite='yes'"]),
    ({"rules": [{"name": "fc1", "bits": 5}]}, ["bits=5"]),
    ({"method": "sgd"}, ["method='sgd'", "aq_scq"]),
    ({"method": "bhq"}, ["bhq", "not implemented"]),
    ({"backend": "cuda"}, ["backend='cuda'", "reference"]),
    ({"target": "m1"}, ["target='m1'", "rpi4"]),
    ({"seed": -1}, ["seed=-1"]),
    ({"rules": [{"name": "a", "regex": "b"}]}, ["exactly one of"]),
    ({"rules": [{"name": "a", "bitz": 2}]}, ["Rule", "bitz"]),
])
def test_invalid_options_name_the_argument(options, words):
    with pytest.raises((TypeError, ValueError)) as err:
        fqt.Config(**options)
    for word in words:
        assert word in str(err.value)


def test_default_plan_excludes_first_last_and_depthwise_with_reasons():
    plan = plan_of(fqt.Config())
    assert [n for n, l in plan.items() if l.binarize] == ["conv1", "conv2", "fc1"]
    assert "first" in plan["stem"].reason
    assert "last" in plan["head"].reason
    assert "groups=16" in plan["dw"].reason
    assert all(l.reason for l in plan.values())
    assert [l.index for l in plan.values()] == list(range(6))


def test_first_and_last_follow_call_order_not_registration():
    plan = plan_of(fqt.Config(), ["conv1", "stem", "conv2", "dw", "head", "fc1"])
    assert not plan["conv1"].binarize and not plan["fc1"].binarize
    assert plan["stem"].binarize and plan["head"].binarize


def test_rules_by_type_name_regex_apply_in_order():
    cfg = fqt.Config(rules=[
        fqt.Rule(type=nn.Linear, bits=8),
        {"name": "head", "binarize": True},
        {"regex": r"conv\d", "method": "psq", "bits": 1},
        {"name": "conv2", "binarize": False},
    ])
    plan = plan_of(cfg)
    assert plan["fc1"].bits == 8 and plan["head"].binarize and "rules[1]" in plan["head"].reason
    assert (plan["conv1"].method, plan["conv1"].bits) == ("psq", 1)
    assert not plan["conv2"].binarize and "rules[3]" in plan["conv2"].reason
    assert plan["stem"].method == "aq_scq"  # regex is a full match: 'stem' is untouched


def test_summary_reports_requested_and_running_backend():
    compiled = fqt.compile(SmallCNN(), fqt.Config(backend="kernels"))
    with pytest.raises(RuntimeError, match="call the compiled model once"):
        fqt.summary(compiled)
    compiled(torch.randn(2, 3, 8, 8)).sum().backward()
    text = fqt.summary(compiled)
    assert "backend requested: kernels" in text
    ran = compiled.fqt_graphs[-1].ran
    # the kernel backend folds the default alpha into the forward op (passes/fold_alpha.py)
    # and runs both gradient paths of a conv in one op (passes/merge_gradient_paths.py)
    assert set(ran) >= {"fqt::binary_conv2d_scaled", "fqt::aq_quantize_conv2d_grads",
                        "fqt::aq_quantize_linear_grads"}
    assert ran["fqt::binary_conv2d_scaled"] == "kernels"
    for op, backend in ran.items():
        assert f"{op.split('::')[1]}={backend}" in text


def test_tied_weight_is_named_after_the_layer_that_computes_with_it():
    """A language model whose head shares the embedding's weight (GPT-2, T5): the layer is
    the head, so a rule naming it selects it, whatever order the modules register in."""
    from fqt_test_models import GPT
    torch.manual_seed(0)
    model = GPT(vocab=20, layers=1)
    model.lm_head.weight = model.tok.weight   # tied, registered under `tok` first
    compiled = fqt.compile(model, fqt.Config(backend="reference",
                                             rules=[{"name": "lm_head", "binarize": True}]))
    compiled(torch.randint(0, 20, (2, 8))).sum().backward()
    plan = {layer.name: layer for cg in compiled.fqt_graphs for layer in cg.plan}
    assert "tok" not in plan
    assert plan["lm_head"].binarize and "rules[0]" in plan["lm_head"].reason
    assert model.tok.weight.grad is not None
