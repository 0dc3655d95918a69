"""Decide every Conv2d/Linear layer (``config.resolve_plan``) and attach the decisions.

Matches: call nodes carrying ``meta["fqt_call"]`` (from ``annotate_layers``).
Produces: the resolved plan (appended to ``plan_out``; ``model_order``, the call order of
the whole forward when given, else that of the graph, decides the first/last-layer
exclusions), ``meta["fqt_plan"]`` = the node's LayerPlan with its
input/weight/output shapes recorded; a layer whose call form cannot be binarized (e.g.
asymmetric 'same' padding) is kept float with that reason.
Invariants: the graph is not changed (metadata only).
"""
from __future__ import annotations

import torch.fx as fx
import torch.nn as nn

from ..config import Config, resolve_plan
from .infra import PassResult


def _shape(node):
    if not isinstance(node, fx.Node):
        return None
    val = node.meta.get("val", node.meta.get("example_value"))
    return tuple(val.shape) if val is not None else None


def apply_plan(gm: fx.GraphModule, *, model: nn.Module, config: Config, plan_out: list,
               model_order: list[str] | None = None) -> PassResult:
    calls = [n for n in gm.graph.nodes if "fqt_call" in n.meta]
    order = list(dict.fromkeys(n.meta["fqt_layer"] for n in calls))
    plan = resolve_plan(model, config, order, model_order)
    by_name = {layer.name: layer for layer in plan}
    for node in calls:
        layer = by_name.get(node.meta["fqt_layer"])
        if layer is None:
            continue
        call = node.meta["fqt_call"]
        if layer.binarize and "unsupported" in call:
            layer.binarize, layer.reason = False, f"unsupported call: {call['unsupported']}"
        layer.shapes = {"x": _shape(call["x"]), "weight": _shape(call["weight"]) or
                        tuple(model.get_submodule(layer.name).weight.shape), "y": _shape(node)}
        node.meta["fqt_plan"] = layer
    plan_out[:] = plan
    return PassResult(gm, False)
