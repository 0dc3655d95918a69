"""Rewrite the selected layer calls of a captured graph into fqt ops.

Matches: call nodes whose ``meta["fqt_plan"]`` says ``binarize``.
Produces: one ``binarized_conv2d`` / ``binarized_linear`` call each (``ops/library.py``: the
``fqt.binary_*`` forward op, then alpha and bias as float ops, which AOTAutograd traces
through); a weight used transposed (``addmm``) is passed as ``weight.t()``, a conv1d as a
conv2d over a height-1 image (``unsqueeze(2)`` of input and weight, ``squeeze(2)`` of the
result); a new trailing placeholder ``fqt.rng_state`` (int64 ``[seed, step]``, fed fresh
every call) and, per layer with ``alpha="learned"``, a placeholder for that layer's
``fqt_alpha`` parameter. ``extras_out`` receives, in placeholder order, what the compiled
wrapper must append to the inputs: ``("rng_state", example)`` or ``("alpha", parameter)``
(the example value, already fake-ified here, keeps AOTAutograd's view of it static).
Invariants: every new node has ``meta["val"]`` (and Dynamo's ``example_value``) and the
``nn_module_stack`` of the call it replaces, so AOTAutograd's ATen nodes keep the layer's
module path; nothing aliases or mutates.
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from ..ops import library
from .infra import PassResult, at_node, fake_mode_of, insert_call

KEYS = ("val", "example_value")


def add_placeholder(gm: fx.GraphModule, name: str, display: str, value: torch.Tensor, mode):
    last = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    with gm.graph.inserting_after(last):
        node = gm.graph.placeholder(name)
    fake = mode.from_tensor(value, static_shapes=True)
    for key in KEYS:
        node.meta[key] = fake
    node.meta["fqt_name"] = display
    return node


def _binarized_call(graph: fx.Graph, call: dict, alpha, rng_state, index: int) -> fx.Node:
    x, weight = call["x"], call["weight"]
    if call["transposed"]:
        weight = insert_call(graph, torch.t, (weight,), KEYS)
    if call["kind"] == "linear":
        return insert_call(graph, library.binarized_linear,
                           (x, weight, call["bias"], alpha, rng_state, index), KEYS)
    one_d = call["kind"] == "conv1d"
    if one_d:
        x, weight = (insert_call(graph, torch.unsqueeze, (v, 2), KEYS) for v in (x, weight))
    y = insert_call(graph, library.binarized_conv2d,
                    (x, weight, call["bias"], alpha, rng_state, call["stride"], call["padding"],
                     call["dilation"], index), KEYS)
    return insert_call(graph, torch.squeeze, (y, 2), KEYS) if one_d else y


def rewrite_binary_layers(gm: fx.GraphModule, *, model: nn.Module, extras_out: list) -> PassResult:
    targets = [n for n in gm.graph.nodes if getattr(n.meta.get("fqt_plan"), "binarize", False)]
    if not targets:
        return PassResult(gm, False)
    mode = fake_mode_of(n.meta.get("example_value", n.meta.get("val"))
                        for n in gm.graph.nodes if n.op == "placeholder")
    example = torch.zeros(2, dtype=torch.int64)
    rng_state = add_placeholder(gm, "fqt_rng_state", "fqt.rng_state", example, mode)
    extras_out[:] = [("rng_state", example)]
    for node in targets:
        layer, call = node.meta["fqt_plan"], node.meta["fqt_call"]
        alpha = None
        if layer.alpha == "learned":
            param = model.get_submodule(layer.name).fqt_alpha
            alpha = add_placeholder(gm, f"fqt_alpha_{layer.index}", f"{layer.name}.fqt_alpha",
                                     param, mode)
            extras_out.append(("alpha", param))
        with gm.graph.inserting_before(node), at_node(node):
            new = _binarized_call(gm.graph, call, alpha, rng_state, layer.index)
        for key in ("nn_module_stack", "stack_trace", "source_fn_stack", "fqt_plan", "fqt_layer"):
            if key in node.meta:
                new.meta[key] = node.meta[key]
        new.meta["fqt_note"] = f"layer {layer.index} {layer.name}: W1 A1 alpha={layer.alpha}"
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    for node in list(gm.graph.nodes):  # weight/bias of rewritten call_module layers
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
    gm.recompile()
    return PassResult(gm, True)
