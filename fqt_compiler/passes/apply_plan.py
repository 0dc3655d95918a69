"""Decide every layer (``config.resolve_plan``) and attach the decisions.

Matches: call nodes carrying ``meta["fqt_call"]`` (from ``annotate_layers``).
Produces: the resolved plan (appended to ``plan_out``; ``model_order``, the call order of
the whole forward when given, else that of the graph, decides the first/last-layer
exclusions), ``meta["fqt_plan"]`` = the node's LayerPlan with the call's kind and its
input/weight/output shapes recorded (the sizes of the call that compiled the graph; the weight
as ``[out, in, ...]``, also when the call uses it transposed) and, in a dynamic graph, which
of them are symbolic (``LayerPlan.dynamic``); a layer whose call form cannot be binarized
(e.g. asymmetric 'same' padding), or that a higher-order op calls
(``meta["fqt_nested_layers"]``, e.g. inside activation checkpointing), is kept float with
that reason.
Invariants: the graph is not changed (metadata only).
"""
from __future__ import annotations

import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import optimization_hint
import torch.nn as nn

from ..config import Config, resolve_plan
from .infra import PassResult, at_node, is_symbolic, target_name


def _val(node):
    return node.meta.get("val", node.meta.get("example_value")) if isinstance(node, fx.Node) else None


def _shape(node):
    """Sizes at the call that compiled the graph (a symbolic size's hint)."""
    val = _val(node)
    return tuple(optimization_hint(s) for s in val.shape) if val is not None else None


def _symbolic_dims(node) -> dict[int, str]:
    val = _val(node)
    return {d: str(s) for d, s in enumerate(val.shape) if is_symbolic(s)} if val is not None else {}


def apply_plan(gm: fx.GraphModule, *, model: nn.Module, config: Config, plan_out: list,
               model_order: list[str] | None = None) -> PassResult:
    calls = [n for n in gm.graph.nodes if "fqt_call" in n.meta]
    nested = {name: n for n in gm.graph.nodes for name in n.meta.get("fqt_nested_layers", ())}
    order = []   # layers in the order the graph calls them, nested ones included
    for node in gm.graph.nodes:
        order += [node.meta["fqt_layer"]] if "fqt_call" in node.meta else []
        order += node.meta.get("fqt_nested_layers", [])
    plan = resolve_plan(model, config, list(dict.fromkeys(order)), model_order)
    by_name = {layer.name: layer for layer in plan}
    for name, node in nested.items():
        if name not in by_name:   # a weight of fewer than two dimensions: not a layer
            continue
        by_name[name].binarize = False
        by_name[name].reason = (f"called inside {target_name(node)} (e.g. activation "
                                f"checkpointing): fqt does not rewrite inside higher-order ops")
    for node in calls:
        with at_node(node):
            layer = by_name.get(node.meta["fqt_layer"])
            if layer is None:
                continue
            call = node.meta["fqt_call"]
            if layer.binarize and "unsupported" in call:
                layer.binarize, layer.reason = False, f"unsupported call: {call['unsupported']}"
            weight = _shape(call["weight"]) or tuple(model.get_submodule(layer.name).weight.shape)
            layer.kind = call["kind"]
            layer.shapes = {"x": _shape(call["x"]), "weight": weight[::-1] if call["transposed"]
                            else weight, "y": _shape(node)}
            layer.dynamic = {k: dims for k, dims in (("x", _symbolic_dims(call["x"])),
                                                     ("y", _symbolic_dims(node))) if dims}
            node.meta["fqt_plan"] = layer
    plan_out[:] = plan
    return PassResult(gm, False)
