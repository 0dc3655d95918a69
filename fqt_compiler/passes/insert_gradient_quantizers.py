"""Insert each binarized layer's gradient quantizers into the backward graph (docs/math.md §4).

Matches: ``fqt.mark_gradient(G', rng_state, layer)`` and its users, the float-G' GEMM ops
``fqt.{conv2d,linear}_{input,weight}_grad``.
Produces, for a layer whose method is not ``none``: ``G'`` in the ``[rows, O]`` layout
(``aten.permute`` + ``aten.reshape`` for a conv), then per SCQ path an
``fqt.aq_sample`` (group min/max, AQ keep decisions) and an ``fqt.quantize_gradient``
(b-bit codes + per-group scale/zero), feeding the path's quantized GEMM
``fqt.*_grad_q`` in place of the float one. Each path quantizes G' independently (input
path: its method's input grouping, e.g. per sample; weight path: e.g. per channel). For
method ``none`` the marker is removed and the float GEMMs read G' directly, their layer's
index recorded as ``meta["fqt_layer_index"]``.
Invariants: every new node has ``meta["val"]``; the float GEMMs and markers are erased; a
symbolic size (dynamic shapes) is never baked in as a constant: the rows per sample of a
conv whose H or W is symbolic are computed in the graph (``aten.sym_size``).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..ops import reference as ref
from ..ops.library import GRAD_OPS
from .infra import PassResult, insert_call, size_product

aten = torch.ops.aten
fqt = torch.ops.fqt


def _rows(graph: fx.Graph, gprime: fx.Node, kind: str) -> tuple[fx.Node, int | fx.Node]:
    """(G' as [rows, O], rows per sample) in reference.conv_rows' layout. The channel count
    is static; the rows per sample of a graph with symbolic H, W are read at run time."""
    shape = gprime.meta["val"].shape
    if kind == "conv2d":
        nhwc = insert_call(graph, aten.permute.default, (gprime, [0, 2, 3, 1]))
        g2d = insert_call(graph, aten.reshape.default, (nhwc, [-1, int(shape[1])]))
        return g2d, size_product(graph, gprime, (2, 3))
    return insert_call(graph, aten.reshape.default, (gprime, [-1, int(shape[-1])])), 1


def insert_gradient_quantizers(gm: fx.GraphModule, *, plan: dict) -> PassResult:
    graph = gm.graph
    markers = [n for n in graph.nodes if n.target is fqt.mark_gradient.default]
    for marker in markers:
        gprime, rng_state, index = marker.args
        layer = plan[index]
        gemms = list(marker.users)
        if layer.method == "none":
            for gemm in gemms:   # their schemas have no layer argument
                gemm.meta["fqt_layer_index"] = index
            marker.replace_all_uses_with(gprime)
            graph.erase_node(marker)
            continue
        with graph.inserting_before(marker):
            # the op's kind, not the layer's: a conv1d layer runs the conv2d ops
            g2d, rows_per_sample = _rows(graph, gprime, GRAD_OPS[gemms[0].target][0])
        for gemm in gemms:
            kind, path, quantized_op = GRAD_OPS[gemm.target]
            grouping = ref.grouping(layer.method, path)
            common = (layer.method, path, layer.bits, rows_per_sample, index)
            with graph.inserting_before(gemm):
                lo, hi, keep, prob = insert_call(graph, fqt.aq_sample.default,
                                                 (g2d, rng_state, *common))
                codes, scale, zero = insert_call(graph, fqt.quantize_gradient.default,
                                                 (g2d, lo, hi, keep, prob, rng_state, *common))
                # the weight's bits and shape, the saved x bits and the geometry: unchanged
                new = insert_call(graph, quantized_op, (codes, scale, zero, keep, *gemm.args[1:], grouping))
            new.meta.update({k: v for k, v in gemm.meta.items() if k != "val"})
            gemm.replace_all_uses_with(new)
            graph.erase_node(gemm)
        graph.erase_node(marker)
    gm.recompile()
    return PassResult(gm, bool(markers))
