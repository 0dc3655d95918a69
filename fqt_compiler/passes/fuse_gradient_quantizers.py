"""Fuse each SCQ path's quantizer chain into one op (kernel backend only).

Matches: ``fqt.*_grad_q(codes, scale, zero, keep, *operands, grouping)`` (``operands``: the
weight's saved bits and shape, the saved x bits, the geometry) whose
quantized gradient comes from ``fqt.quantize_gradient`` and ``fqt.aq_sample`` on
``G'`` reshaped to rows (``reshape(permute(G'))`` for a conv, ``reshape(G')`` for a linear).
Produces: ``fqt.aq_quantize_<layer>_<path>_grad(G', rng_state, *operands, method, bits,
layer)`` reading ``G'`` in its original layout (``ops/fused.py``); the chain
and the now unused reshapes are erased.
Invariants: the fused node takes the GEMM node's ``meta`` (same ``val``); semantics are
the chain's, draw for draw (the fused op's reference is the chain).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ..ops.fused import FUSED
from .infra import PassResult

aten = torch.ops.aten
fqt = torch.ops.fqt
_VIEWS = (aten.reshape.default, aten.view.default, aten.permute.default, aten._unsafe_view.default)


def _producer(node: fx.Node) -> fx.Node:
    """The multi-output op a ``getitem`` node reads."""
    assert node.target is operator.getitem, f"{node.name} is not an output of a quantizer op"
    return node.args[0]


def _unrows(g2d: fx.Node) -> fx.Node:
    """Walk back from ``G'`` as rows to the gradient in its layer's layout."""
    node = g2d
    while isinstance(node, fx.Node) and node.target in _VIEWS:
        node = node.args[0]
    return node


def fuse_gradient_quantizers(gm: fx.GraphModule) -> PassResult:
    graph = gm.graph
    fused = 0
    for gemm in list(graph.nodes):
        if gemm.op != "call_function" or gemm.target not in FUSED:
            continue
        codes, _scale, _zero, _keep, *operands, _grouping = gemm.args
        quantize = _producer(codes)
        if quantize.target is not fqt.quantize_gradient.default:
            continue
        g2d, _lo, _hi, _keep2, _prob, rng_state, method, _path, bits, _rps, layer = quantize.args
        with graph.inserting_before(gemm):
            new = graph.call_function(FUSED[gemm.target],
                                      (_unrows(g2d), rng_state, *operands, method, bits, layer))
        new.meta.update(gemm.meta)
        gemm.replace_all_uses_with(new)
        graph.erase_node(gemm)
        fused += 1
    if fused:
        graph.eliminate_dead_code()
        gm.recompile()
    return PassResult(gm, bool(fused))
