"""Annotate every fqt op node with what it computes, for the dumps.

Matches: call nodes whose target is an op of the ``fqt`` namespace.
Produces: ``meta["fqt_note"]``: layer index and name, bits, grouping, and for ``aq_sample``
the expected kept fraction of groups (``N/b`` of ``N`` for aq_scq and aq_opt, ``ceil(N/b)`` for
topk, all otherwise); a symbolic N (dynamic shapes) is shown as its expression.
Invariants: metadata only.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..ops import reference as ref
from .infra import PassResult, is_symbolic


def _note(node: fx.Node, plan: dict) -> str:
    op = node.target._opname
    args = dict(zip((a.name for a in node.target._schema.arguments), node.args))
    if op == "mark_gradient":
        layer = plan[args["layer"]]
        return f"layer {layer.index} {layer.name}: G' = alpha * dL/dY"
    if op in ("binary_conv2d", "binary_linear"):
        layer = plan[args["layer"]]
        return f"layer {layer.index} {layer.name}: W1 A1 -> y_raw, packed x and W sign + STE bits"
    if op in ("binary_conv2d_packed", "binary_linear_packed"):
        layer = plan[args["layer"]]
        return (f"layer {layer.index} {layer.name}: W1 A1 -> y_raw from the x sign + STE bits the "
                f"region before it wrote, packed W sign + STE bits")
    if op in ("binary_conv2d_scaled", "binary_linear_scaled", "binary_linear_packed_scaled"):
        layer = plan[args["layer"]]
        bias = " + bias" if node.kwargs.get("bias") is not None else ""
        x_bits = ("x sign + STE bits from the region before it, packed W" if op.endswith("packed_scaled")
                  else "packed x and W")
        return (f"layer {layer.index} {layer.name}: W1 A1 -> alpha * y_raw{bias} (alpha{bias} in the GEMM "
                f"epilogue), {x_bits} sign + STE bits")
    if op in ("aq_sample", "quantize_gradient"):
        layer = plan[args["layer"]]
        grouping = ref.grouping(args["method"], args["path"])
        groups = node.meta["val"][0].shape[0] if op == "aq_sample" else None
        note = (f"layer {layer.index} {layer.name}: {args['path']} path, {args['method']}, "
                f"b={args['bits']}, per-{grouping} groups")
        if groups is not None:
            # A symbolic group count (dynamic shapes) is printed, never evaluated (a guard).
            kept = (f"ceil(N/{args['bits']})/N" if is_symbolic(groups) and args["method"] == "topk"
                    else f"{ref.expected_kept(args['method'], args['bits'], groups):.3g}")
            note += f", {groups} groups, kept fraction {kept} expected"
        return note
    if op.startswith("aq_quantize_") and op.endswith("_grads"):
        layer = plan[args["layer"]]
        return (f"layer {layer.index} {layer.name}: input and weight paths, {args['method']}, "
                f"b={args['bits']}, one statistics pass over G' for both, then each path's "
                f"quantizer and bit-plane GEMM")
    if op.startswith("aq_quantize_"):
        layer = plan[args["layer"]]
        path = ref.PATH_INPUT if "_input_" in op else ref.PATH_WEIGHT
        grouping = ref.grouping(args["method"], path)
        gemm = "segmented bit-plane GEMM (a scale per sample segment of r)" if (
            path == ref.PATH_WEIGHT and grouping == "sample") else "bit-plane GEMM over kept groups"
        return (f"layer {layer.index} {layer.name}: {path} path, {args['method']}, b={args['bits']}, "
                f"per-{grouping} groups, kept fraction "
                f"{ref.expected_kept(args['method'], args['bits'], 1 if grouping == 'tensor' else 2**30):.3g} "
                f"expected; AQ sampling + quantize + bit-plane pack fused, then {gemm}")
    if op.endswith("_grad_q"):
        return f"bit-plane GEMM over kept per-{args['grouping']} groups"
    if op.endswith("_grad"):
        return "float G' GEMM (method none)"
    return ""


def annotate_fqt_nodes(gm: fx.GraphModule, *, plan: dict) -> PassResult:
    for node in gm.graph.nodes:
        if isinstance(node.target, torch._ops.OpOverload) and node.target.namespace == "fqt":
            node.meta["fqt_note"] = _note(node, plan)
    return PassResult(gm, False)
