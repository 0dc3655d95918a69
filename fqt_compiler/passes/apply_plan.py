"""Decide every layer (``config.resolve_plan``) and attach the decisions.

Matches: call nodes carrying ``meta["fqt_call"]`` (from ``annotate_layers``).
Produces: the resolved plan (appended to ``plan_out``; ``model_order``, the call order of
the whole forward when given, else that of the graph, decides the first/last-layer
exclusions), ``meta["fqt_plan"]`` = the node's LayerPlan with the call's kind and its
input/weight/output shapes recorded (the weight as ``[out, in, ...]``, also when the call
uses it transposed); a layer whose call form cannot be binarized (e.g. asymmetric 'same'
padding), or that a higher-order op calls (``meta["fqt_nested_layers"]``, e.g. inside
activation checkpointing), is kept float with that reason.
Invariants: the graph is not changed (metadata only).
"""
from __future__ import annotations

import torch.fx as fx
import torch.nn as nn

from ..config import Config, resolve_plan
from .infra import PassResult, at_node, target_name


def _shape(node):
    if not isinstance(node, fx.Node):
        return None
    val = node.meta.get("val", node.meta.get("example_value"))
    return tuple(val.shape) if val is not None else None


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
            node.meta["fqt_plan"] = layer
    plan_out[:] = plan
    return PassResult(gm, False)
