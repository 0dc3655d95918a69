"""Dynamic shapes (issue 16): one compiled graph for every batch size / sequence length,
equal to a static compile at each shape, with the same random draws."""
from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fqt_compiler as fqt
from conftest import needs_cross
from fqt_compiler.codegen.gemm import PanelTile
from fqt_compiler.cross.record import training_step
from fqt_compiler.cross.verify import OddShapes, verify_calls
from fqt_compiler.ops import reference
from fqt_compiler.runtime import jit
from fqt_test_models import SmallCNN

# 10 batch sizes: 1 (Dynamo specializes size 1: its own graph) and primes among them.
BATCHES = [4, 6, 1, 7, 2, 13, 3, 8, 5, 11]
SEQUENCES = [16, 9, 1, 23, 2, 31, 12, 5, 20, 7]
# Compared with a static compile: the first shape (static), the first change (the dynamic
# graph's compile), size 1 (specialized), the dynamic graph's later shapes, the last one;
# for BERT, whose static compiles cost most, the first, the first change and a later shape.
BATCHES_COMPARED = [4, 6, 1, 13, 11]
SEQUENCES_COMPARED = [16, 9, 31]


@pytest.fixture
def draws(monkeypatch):
    """Every quantizer draw of the reference backend: (layer, path, keep, codes) per call."""
    seen = []
    quantize = reference.quantize_groups

    def recording(g2d, lo, hi, keep, prob, method, path, bits, *, layer, **kw):
        codes, scale, zero = quantize(g2d, lo, hi, keep, prob, method, path, bits, layer=layer, **kw)
        seen.append((layer, path, keep.clone(), codes.clone()))
        return codes, scale, zero

    monkeypatch.setattr(reference, "quantize_groups", recording)
    return seen


def _step(compiled, model, inputs, target):
    """Loss and parameter gradients of one training step (no optimizer: weights stay put)."""
    model.zero_grad(set_to_none=True)
    out = compiled(**inputs) if isinstance(inputs, dict) else compiled(inputs)
    logits = out.logits if hasattr(out, "logits") else out
    loss = F.cross_entropy(logits, target)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                           if p.grad is not None}


def _compare_with_static(make, shapes, inputs_at, targets_at, backend, draws=None, compare=None):
    """Train steps of one ``dynamic="auto"`` compile over ``shapes``; at each shape in
    ``compare`` (default: all), the same step of a static compile (``dynamic=False``, a graph
    per shape: a compile each, most of these tests' time) at the same RNG step."""
    compare = set(shapes if compare is None else compare)
    torch.manual_seed(0)
    model = make()
    twin = copy.deepcopy(model)
    dynamic = fqt.compile(model, fqt.Config(backend=backend, seed=5))
    static = fqt.compile(twin, fqt.Config(backend=backend, seed=5, dynamic=False))
    gen = torch.Generator().manual_seed(1)
    results = []
    for shape in shapes:
        inputs, target = inputs_at(shape, gen), targets_at(shape, gen)
        static.fqt_step = dynamic.fqt_step
        start = len(draws) if draws is not None else 0
        got = _step(dynamic, model, inputs, target)
        mid = len(draws) if draws is not None else 0
        if shape not in compare:
            continue
        # A clone: Dynamo marks the dims it made dynamic on the input tensor itself, which a
        # dynamic=False compile would honour as if the user had marked them.
        want = _step(static, twin, torch.utils._pytree.tree_map(torch.clone, inputs), target)
        if draws is not None:
            got_draws, want_draws = draws[start:mid], draws[mid:]
            assert len(got_draws) == len(want_draws) > 0
            for (layer, path, keep, codes), (layer2, path2, keep2, codes2) in zip(got_draws,
                                                                                  want_draws):
                assert (layer, path) == (layer2, path2)
                assert torch.equal(keep, keep2) and torch.equal(codes, codes2), (shape, layer, path)
        results.append((shape, got, want))
    assert len(static.fqt_graphs) == len(compare), [cg.plan[1].shapes for cg in static.fqt_graphs]
    return dynamic, results


def _assert_equal(results):
    for shape, (loss, grads), (loss2, grads2) in results:
        assert torch.equal(loss, loss2), shape
        assert grads.keys() == grads2.keys()
        for name in grads:
            assert torch.equal(grads[name], grads2[name]), (shape, name)


def _assert_close(results):
    # As tests/test_lowering.py compares whole models on the kernels: a float32 rounding
    # difference can move a later layer's stochastic rounding across a code boundary.
    for shape, (loss, grads), (loss2, grads2) in results:
        torch.testing.assert_close(loss, loss2, rtol=1e-5, atol=1e-6)
        for name, g in grads2.items():
            if g.norm() > 1e-6:
                cos = F.cosine_similarity(grads[name].flatten(), g.flatten(), dim=0)
                assert cos > 0.999 and abs(grads[name].norm() / g.norm() - 1) < 0.01, (shape, name)
            else:   # 0, or float noise around 0 (the bias of a conv that BatchNorm follows)
                assert grads[name].norm() <= 1e-6, (shape, name)


def _graphs(compiled, training=True):
    return [cg for cg in compiled.fqt_graphs if cg.training == training]


def _cnn_inputs(batch, gen):
    return torch.randn(batch, 3, 8, 8, generator=gen)


def _cnn_targets(batch, gen):
    return torch.randint(0, 10, (batch,), generator=gen)


@pytest.mark.slow
def test_ten_batch_sizes_compile_at_most_three_graphs_equal_to_static(draws):
    compiled, results = _compare_with_static(SmallCNN, BATCHES, _cnn_inputs, _cnn_targets,
                                             "reference", draws, compare=BATCHES_COMPARED)
    _assert_equal(results)
    graphs = _graphs(compiled)
    assert len(graphs) <= 3
    assert [cg.dynamic for cg in graphs].count({}) == len(graphs) - 1   # first and size-1 static
    (dyn,) = [cg for cg in graphs if cg.dynamic]
    assert list(dyn.dynamic.values()) == [{0: next(iter(dyn.dynamic.values()))[0]}]  # batch only
    # eval mode: its own graphs, as few
    compiled.eval()
    with torch.no_grad():
        for batch in BATCHES:
            assert compiled(torch.randn(batch, 3, 8, 8)).shape == (batch, 10)
    assert len(_graphs(compiled, training=False)) <= 3


def test_batch_sizes_share_one_dynamic_graph_equal_to_static(draws):
    """The fast tier's share of the test above: a static shape, a change, size 1, a prime."""
    compiled, results = _compare_with_static(SmallCNN, [4, 6, 1, 7], _cnn_inputs, _cnn_targets,
                                             "reference", draws)
    _assert_equal(results)
    assert [bool(cg.dynamic) for cg in compiled.fqt_graphs] == [False, True, False]
    summary = fqt.summary(compiled)    # the last call ran the dynamic graph
    (symbol,) = compiled.fqt_graphs[1].dynamic["x"].values()    # SmallCNN.forward(self, x)
    assert f"dynamic dimensions: x[0]={symbol}" in summary
    row = next(line for line in summary.splitlines() if line.split()[1:2] == ["conv1"])
    assert f"{symbol}x8x8x8" in row                  # conv1's input: batch symbolic, C, H, W not


def test_kernels_dynamic_graph_matches_static_at_each_batch():
    compiled, results = _compare_with_static(SmallCNN, [4, 6, 7], _cnn_inputs, _cnn_targets,
                                             "kernels")
    _assert_close(results)
    assert [bool(cg.dynamic) for cg in compiled.fqt_graphs] == [False, True]


def test_symbolic_spatial_sizes_read_rows_per_sample_at_run_time(draws):
    """``dynamic=True``: H and W symbolic too. The per-sample quantizer groups of a conv span
    H'W' rows, which the backward graph must compute from G' at run time, not bake in."""
    def make():
        return OddShapes()

    def inputs_at(hw, gen):
        return torch.randn(2, 3, *hw, generator=gen)

    torch.manual_seed(0)
    model = make()
    twin = copy.deepcopy(model)
    dynamic = fqt.compile(model, fqt.Config(backend="reference", dynamic=True, method="psq"))
    static = fqt.compile(twin, fqt.Config(backend="reference", dynamic=False, method="psq"))
    gen = torch.Generator().manual_seed(0)
    for hw in ((13, 17), (9, 11)):
        x, y = inputs_at(hw, gen), torch.randint(0, 10, (2,), generator=gen)
        static.fqt_step = dynamic.fqt_step
        _assert_equal([(hw, _step(dynamic, model, x, y), _step(static, twin, x.clone(), y))])
    (cg,) = dynamic.fqt_graphs
    assert [set(dims) for dims in cg.dynamic.values()] == [{0, 2, 3}]
    samplers = [n for n in cg.backward.graph.nodes
                if n.meta.get("fqt_op") is torch.ops.fqt.aq_sample.default
                and cg.plan[n.args[6]].kind == "conv2d"]
    assert samplers
    for node in samplers:   # rows_per_sample = H'W' of G', from aten.sym_size nodes
        assert isinstance(node.args[5], torch.fx.Node), node.format_node()


def test_kernels_for_a_new_batch_size_are_the_same_kernels():
    """The kernels take M at run time: a new batch size requests no new kernel (no kernel
    is specialized on the batch size but for two bounded choices, below); only the sizes
    passed to the calls differ."""
    torch.manual_seed(0)
    compiled = fqt.compile(SmallCNN(), fqt.Config(dynamic=True))
    requested = {}

    def run(batch):
        specs, sizes = set(), set()

        def hook(spec, load):
            specs.add(spec)
            fn = load(spec)

            def call(*args):
                sizes.add(tuple(a for a in args if isinstance(a, int)))
                return fn(*args)
            return call

        with jit.kernel_hook(hook):
            training_step(compiled, (torch.randn(batch, 3, 8, 8),))
        requested[batch] = specs, sizes

    # Not 3 or 8: Dynamo gives equal sizes one symbol, and C = 3 and H = W = 8 are fixed.
    for batch in (5, 7, 11, 13):
        run(batch)
    assert len(compiled.fqt_graphs) == 1
    assert requested[5][0] == requested[7][0] and requested[11][0] == requested[13][0]
    assert requested[5][1] != requested[7][1]          # the same kernels at other sizes
    # Across a power of two only the group min/max kernel's vector width (lanes, rounded up
    # from the group length: the batch for a linear's per-channel groups) may change, and a
    # GEMM's panel tile may be built for its K's word count (K = batch x positions in a
    # weight gradient) or take K at run time; nothing else about the GEMM kernels.
    def k_free(specs):
        return {(s.family, tuple((name, replace(v, words=0) if isinstance(v, PanelTile) else v)
                                 for name, v in s.options)) for s in specs}

    assert {family for family, _ in k_free(requested[5][0]) ^ k_free(requested[11][0])} <= {"minmax"}


@needs_cross
def test_dynamic_graph_kernels_verify_on_rpi4(tmp_path):
    """Cross-targeting records and replays the calls of a dynamic graph, at two batch sizes,
    on the target (qemu) against the host kernels and the reference, bit for bit."""
    torch.manual_seed(0)
    compiled = fqt.compile(OddShapes(), fqt.Config(target="rpi4", dynamic=True))

    def run():
        for batch in (5, 2):    # not 3: Dynamo would give it the channels' symbol (C = 3)
            training_step(compiled, (torch.randn(batch, 3, 13, 17),))

    results = verify_calls(run, "rpi4", tmp_path)
    assert results and all(r.passed for r in results), [r for r in results if not r.passed]
    assert len(compiled.fqt_graphs) == 1 and compiled.fqt_graphs[0].dynamic


def test_dynamic_option_is_checked():
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match="dynamic"):
            fqt.Config(dynamic=bad)
    assert fqt.Config().dynamic == "auto"


def test_static_option_compiles_per_shape():
    compiled = fqt.compile(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 2)),
                           fqt.Config(backend="reference", dynamic=False))
    for batch in (2, 3, 5):
        compiled(torch.randn(batch, 4)).sum().backward()
    assert [cg.dynamic for cg in compiled.fqt_graphs] == [{}, {}, {}]



def _bert():
    from transformers import BertConfig, BertForSequenceClassification
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=3,
                        # dropout draws from the global RNG: off, so both compiles see one model
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config)


def _bert_inputs(length, gen):
    return {"input_ids": torch.randint(0, 100, (3, length), generator=gen)}


def _bert_targets(length, gen):
    return torch.randint(0, 3, (3,), generator=gen)


@pytest.mark.slow
def test_bert_ten_sequence_lengths_compile_at_most_three_graphs_equal_to_static(draws):
    pytest.importorskip("transformers")
    compiled, results = _compare_with_static(_bert, SEQUENCES, _bert_inputs, _bert_targets,
                                             "reference", draws, compare=SEQUENCES_COMPARED)
    _assert_equal(results)
    graphs = _graphs(compiled)
    assert len(graphs) <= 3
    (dyn,) = [cg for cg in graphs if cg.dynamic]
    assert list(dyn.dynamic) == ["input_ids"] and set(dyn.dynamic["input_ids"]) == {1}


@pytest.mark.slow
def test_bert_sequence_lengths_on_kernels_match_static():
    pytest.importorskip("transformers")
    compiled, results = _compare_with_static(_bert, [16, 9, 5], _bert_inputs, _bert_targets,
                                             "kernels")
    _assert_close(results)
    assert len(compiled.fqt_graphs) <= 2
