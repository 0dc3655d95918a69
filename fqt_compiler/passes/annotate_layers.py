"""Find the Conv2d/Linear calls of a captured graph and name its placeholders.

Matches: a conv2d or linear call in any form a capture produces: ``call_function`` on
``torch.conv2d`` / ``F.conv2d`` / ``torch._C._nn.linear`` / ``F.linear`` / ``aten.conv2d`` /
``aten.convolution`` (not transposed) / ``aten.linear``, or ``call_module`` on an
``nn.Conv2d`` / ``nn.Linear``.
Produces: ``meta["fqt_call"]`` on each, the call normalized to ``kind, x, weight, bias,
stride, padding, dilation, groups`` (for ``call_module``, new ``get_attr`` nodes provide
weight and bias), ``meta["fqt_layer"]`` = the module name that owns the weight, and
``meta["fqt_name"]`` on every placeholder = its parameter/buffer name (``input_<i>`` else).
A higher-order op (e.g. ``torch.utils.checkpoint``'s ``tag_activation_checkpoint``) gets
``meta["fqt_nested_layers"]``: the layers its bodies call, named through the operands it
passes in; the layers stay float (``apply_plan`` says why), the op is left as it is.
Invariants: the computation is unchanged; new nodes are ``get_attr`` only.
"""
from __future__ import annotations

import inspect

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .infra import PassResult, at_node


def _conv_signature(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    pass


def _convolution_signature(input, weight, bias, stride, padding, dilation, transposed,
                           output_padding, groups):
    pass


def _linear_signature(input, weight, bias=None):
    pass


_CALLS = {  # target -> (kind, signature)
    torch.conv2d: ("conv2d", _conv_signature),
    F.conv2d: ("conv2d", _conv_signature),
    torch.ops.aten.conv2d.default: ("conv2d", _conv_signature),
    torch.ops.aten.convolution.default: ("conv2d", _convolution_signature),
    torch._C._nn.linear: ("linear", _linear_signature),
    F.linear: ("linear", _linear_signature),
    torch.ops.aten.linear.default: ("linear", _linear_signature),
}


def _pair(v):
    return [int(v), int(v)] if isinstance(v, int) else [int(x) for x in v]


def _conv_geometry(call: dict, weight_shape) -> dict | str:
    """Stride/padding/dilation as int pairs, or the reason they are unsupported."""
    stride, dilation, padding = _pair(call["stride"]), _pair(call["dilation"]), call["padding"]
    if padding == "valid":
        padding = [0, 0]
    elif padding == "same":
        total = [d * (k - 1) for d, k in zip(dilation, weight_shape[2:])]
        if any(t % 2 for t in total):
            return "padding='same' with an asymmetric pad"
        padding = [t // 2 for t in total]
    else:
        padding = _pair(padding)
    if len(stride) != 2 or len(weight_shape) != 4:
        return "not a 2-D convolution"
    return {"stride": stride, "padding": padding, "dilation": dilation}


def _normalize(gm: fx.GraphModule, node: fx.Node) -> dict | None:
    if node.op == "call_function" and node.target in _CALLS:
        kind, sig = _CALLS[node.target]
        bound = inspect.signature(sig).bind(*node.args, **node.kwargs)
        bound.apply_defaults()
        call = dict(bound.arguments)
        if call.get("transposed"):
            return None
        call["x"] = call.pop("input")
    elif node.op == "call_module" and isinstance(gm.get_submodule(node.target), (nn.Conv2d, nn.Linear)):
        module = gm.get_submodule(node.target)
        kind = "conv2d" if isinstance(module, nn.Conv2d) else "linear"
        with gm.graph.inserting_before(node):
            weight = gm.graph.get_attr(f"{node.target}.weight")
            bias = gm.graph.get_attr(f"{node.target}.bias") if module.bias is not None else None
        call = {"x": node.args[0], "weight": weight, "bias": bias}
        if kind == "conv2d":
            if module.padding_mode != "zeros":
                return None
            call.update(stride=module.stride, padding=module.padding, dilation=module.dilation,
                        groups=module.groups)
    else:
        return None
    call["kind"] = kind
    return call


def annotate_layers(gm: fx.GraphModule, *, model: nn.Module, example_inputs) -> PassResult:
    tensor_names = {id(t): n for n, t in model.named_parameters(remove_duplicate=False)}
    tensor_names.update({id(t): n for n, t in model.named_buffers(remove_duplicate=False)})
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, (node, value) in enumerate(zip(placeholders, example_inputs)):
        node.meta["fqt_name"] = tensor_names.get(id(value), f"input_{i}")
    module_names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    modified = False
    for node in list(gm.graph.nodes):
        with at_node(node):
            if isinstance(node.target, torch._ops.HigherOrderOperator):
                node.meta["fqt_nested_layers"] = _nested_layers(gm, node)
            call = _normalize(gm, node)
            if call is None:
                continue
            weight = call["weight"]
            if weight.op == "get_attr":
                modified = True
                owner = weight.target.rsplit(".", 1)[0]
                layer = module_names.get(id(gm.get_submodule(owner)), owner)
            else:
                layer = weight.meta.get("fqt_name", "").rsplit(".", 1)[0]
            if call["kind"] == "conv2d":
                geometry = _conv_geometry(call, _shape(weight, gm))
                if isinstance(geometry, str):
                    call["unsupported"] = geometry
                else:
                    call.update(geometry)
            node.meta["fqt_call"] = call
            node.meta["fqt_layer"] = layer
    if modified:
        gm.recompile()
    return PassResult(gm, modified)


def _nested_layers(gm: fx.GraphModule, node: fx.Node) -> list[str]:
    """Layers called inside the bodies of a higher-order op ``node``. Each body's placeholders
    take the op's non-body operands in order (as ``tag_activation_checkpoint(body, *operands)``
    and ``cond``'s operand tuple do), which names the weights a body receives."""
    bodies = [gm.get_submodule(a.target) for a in node.args
              if isinstance(a, fx.Node) and a.op == "get_attr"]
    operands = [a for a in _flat_nodes(node.args) if a.op != "get_attr"]
    layers = []
    for body in bodies:
        if not isinstance(body, fx.GraphModule):
            continue
        names = {ph: op.meta.get("fqt_name", "") for ph, op in
                 zip((n for n in body.graph.nodes if n.op == "placeholder"), operands)}
        for inner in body.graph.nodes:
            call = _normalize(body, inner)
            if call is not None and names.get(call["weight"]):
                layers.append(names[call["weight"]].rsplit(".", 1)[0])
    return list(dict.fromkeys(layers))


def _flat_nodes(args) -> list[fx.Node]:
    nodes = []
    fx.node.map_arg(args, nodes.append)
    return nodes


def _shape(weight: fx.Node, gm: fx.GraphModule):
    if weight.op == "get_attr":
        return tuple(gm.get_submodule(weight.target.rsplit(".", 1)[0]).weight.shape)
    val = weight.meta.get("val", weight.meta.get("example_value"))
    return tuple(val.shape)
