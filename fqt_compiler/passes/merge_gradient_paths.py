"""Merge the two SCQ path ops of one layer's ``G'`` into one op (kernel backend only).

Matches: a pair of fused path ops of ``ops/fused.MERGED`` (``fqt.aq_quantize_conv2d_input_grad``
and ``fqt.aq_quantize_conv2d_weight_grad``, or the ``linear`` pair) with the same ``G'``,
rng_state, weight bits, geometry, method, bits, layer and alpha, i.e. both paths of one layer, as
``fuse_gradient_quantizers`` and ``fold_alpha`` leave them.
Produces: ``fqt.aq_quantize_conv2d_grads(G', rng_state, w_sign_bits, w_ste_bits, w_shape,
x_ste_bits, x_sign_bits, *geometry, method, bits, layer, alpha=)`` (``aq_quantize_linear_grads`` for the linear pair,
whose two paths share ``alpha ⊙ G'`` rather than a statistics pass) where the earlier of the
two stood, and
``getitem`` 0 (dX) and 1 (dW) in place of the two nodes, so the kernels run the statistics
pass over ``G'`` once for both paths (``runtime.quantize.SharedStatistics``).
Invariants: values are unchanged (each path draws and rounds as before, and min/max are
exact whichever pass computed them); the getitems take the replaced nodes' ``meta``, the
merged node the pair of their ``val``s; a layer with one path (an input that needs no
gradient, a frozen weight) keeps its op; a pair is left as it is when an argument of the
later node is computed after the earlier one (the merged node could not take its place).
"""
from __future__ import annotations

import operator

import torch.fx as fx

from ..ops.fused import MERGED
from .infra import PassResult

_PATH = {op: (i, merged) for ops, merged in MERGED.items() for i, op in enumerate(ops)}
_X_BITS = 5   # (G', rng_state, w_sign_bits, w_ste_bits, w_shape, x bits, ...): the path's own operand


def _key(node: fx.Node, merged) -> tuple:
    """What both paths of one layer share: every argument but the saved x bits."""
    args = [tuple(a) if isinstance(a, list) else a for a in node.args[:_X_BITS] + node.args[_X_BITS + 1:]]
    return (merged, *args, node.kwargs.get("alpha"))


def merge_gradient_paths(gm: fx.GraphModule) -> PassResult:
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    layers: dict[tuple, list] = {}
    for node in graph.nodes:
        if node.op == "call_function" and node.target in _PATH:
            path, merged = _PATH[node.target]
            layers.setdefault(_key(node, merged), [None, None])[path] = node
    merged_count = 0
    for key, (dx, dw) in layers.items():
        if dx is None or dw is None:
            continue
        first, second = sorted((dx, dw), key=order.__getitem__)
        if any(order[a] > order[first] for a in second.all_input_nodes):
            continue
        with graph.inserting_before(first):
            both = graph.call_function(key[0], (*dx.args[:_X_BITS + 1], dw.args[_X_BITS], *dx.args[_X_BITS + 1:]),
                                       dict(dx.kwargs))
            both.meta.update(dx.meta)
            both.meta["val"] = (dx.meta["val"], dw.meta["val"])
            for i, old in enumerate((dx, dw)):
                out = graph.call_function(operator.getitem, (both, i))
                out.meta.update(old.meta)
                old.replace_all_uses_with(out)
        graph.erase_node(dx)
        graph.erase_node(dw)
        merged_count += 1
    if merged_count:
        gm.recompile()
    return PassResult(gm, bool(merged_count))
