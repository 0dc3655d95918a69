"""Find the layers of a captured graph (calls whose weight is a parameter), name its
placeholders, and list the products and softmaxes that stay float.

Matches: a linear-like call whose weight operand is a parameter of the model (a placeholder
Dynamo lifted from one, or a ``get_attr``), recognised by the call, not by the module class:
- ``conv2d``: ``torch.conv2d`` (= ``F.conv2d``), ``aten.conv2d``, ``aten.convolution`` (not
  transposed), ``call_module`` on an ``nn.Conv2d``;
- ``conv1d``: ``torch.conv1d``, ``aten.conv1d``, ``aten.convolution`` with a 3-D weight,
  ``call_module`` on an ``nn.Conv1d``: a GEMM over im2col rows ``(n, l')``, ``k = (c, kw)``,
  run as a conv2d over a height-1 image;
- ``linear``: ``F.linear``, ``aten.linear``, ``call_module`` on an ``nn.Linear``, and
  ``addmm(bias, x, W)`` with ``beta = alpha = 1``, where ``W`` is ``[in, out]`` (used
  transposed: transformers' GPT-2 ``Conv1D``).
Also matches ``matmul``/``@``/``bmm``/``baddbmm``/``einsum``/``scaled_dot_product_attention``
calls (attention's activation x activation products, or a product with a parameter that is
none of the forms above) and softmax: they stay float.
Produces: ``meta["fqt_call"]`` on each layer call, normalized to ``kind, x, weight, bias,
transposed`` (the weight is ``[in, out]``) and, for convolutions, 2-D ``stride, padding,
dilation, groups`` (a conv1d's as ``(1, s)``, ``(0, p)``, ``(1, d)``) or ``unsupported`` =
why the kernels cannot take it; ``meta["fqt_layer"]`` = the layer name
(``config.layer_name`` of the weight's ``config.parameter_names`` name); ``meta["fqt_name"]`` on every
placeholder = its parameter/buffer name (``input_<i>`` else); ``float_out`` receives one
``(module path, op, reason)`` per product or softmax kept float.
A higher-order op (e.g. ``torch.utils.checkpoint``'s ``tag_activation_checkpoint``) gets
``meta["fqt_nested_layers"]``: the layers its bodies call, named through the operands it
passes in; the layers stay float (``apply_plan`` says why), the op is left as it is.
Invariants: the computation is unchanged; new nodes are ``get_attr`` only.
"""
from __future__ import annotations

import inspect
import operator
import re

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..config import layer_kind, layer_name, parameter_names
from .infra import PassResult, at_node

aten = torch.ops.aten


def _conv_signature(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    pass


def _convolution_signature(input, weight, bias, stride, padding, dilation, transposed,
                           output_padding, groups):
    pass


def _linear_signature(input, weight, bias=None):
    pass


def _addmm_signature(input, mat1, mat2, *, beta=1, alpha=1, out=None):
    pass


_CALLS = {  # target -> (kind, signature); "conv": the weight's rank decides 1-D or 2-D
    torch.conv2d: ("conv2d", _conv_signature),
    aten.conv2d.default: ("conv2d", _conv_signature),
    torch.conv1d: ("conv1d", _conv_signature),
    aten.conv1d.default: ("conv1d", _conv_signature),
    aten.convolution.default: ("conv", _convolution_signature),
    torch._C._nn.linear: ("linear", _linear_signature),
    aten.linear.default: ("linear", _linear_signature),
    torch.addmm: ("addmm", _addmm_signature),
    aten.addmm.default: ("addmm", _addmm_signature),
}

_PRODUCTS = {torch.matmul: "matmul", operator.matmul: "matmul", torch.bmm: "bmm",
             torch.baddbmm: "baddbmm", torch.einsum: "einsum",
             F.scaled_dot_product_attention: "scaled_dot_product_attention (QK^T, softmax, AV)",
             "matmul": "matmul", "bmm": "bmm", "__matmul__": "matmul"}
_SOFTMAX = {torch.softmax, F.softmax, "softmax"}
FLOAT_PRODUCT = ("activation x activation: float (the paper binarizes weight GEMMs only; "
                 "both operands change every step, so there is no latent weight to binarize)")
FLOAT_SOFTMAX = "softmax: float (exp and normalisation, not a GEMM)"
FLOAT_WEIGHT_PRODUCT = ("a product with a parameter in no linear-like form (F.linear, addmm, "
                        "conv): float; write it as F.linear to binarize it")


def linear_call(target, args, kwargs) -> dict | None:
    """The call normalized to ``kind, x, weight, bias, transposed`` (plus the convolution
    arguments) if ``target`` is a linear-like form, else None. The arguments may be fx nodes
    or tensors: the eager call-order pass (``compiler``) recognises the same forms."""
    if target not in _CALLS:
        return None
    kind, signature = _CALLS[target]
    try:
        bound = inspect.signature(signature).bind(*args, **kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    call = dict(bound.arguments)
    if call.pop("transposed", False):
        return None
    if kind == "addmm":
        if (call["beta"], call["alpha"], call["out"]) != (1, 1, None):
            return None
        return {"kind": "linear", "x": call["mat1"], "weight": call["mat2"],
                "bias": call["input"], "transposed": True}
    call.pop("output_padding", None)
    call.update(kind=kind, x=call.pop("input"), transposed=False)
    return call


def _ints(v, n: int) -> list[int]:
    return [int(v)] * n if isinstance(v, int) else [int(x) for x in v]


def _conv_geometry(call: dict, weight_shape) -> dict | str:
    """2-D stride/padding/dilation as int lists, or the reason they are unsupported."""
    dims = len(weight_shape) - 2
    if dims not in (1, 2):
        return f"a {dims}-D convolution (1-D and 2-D only)"
    if call["groups"] != 1:
        return f"groups={call['groups']} > 1 (depthwise contraction too short)"
    stride, dilation, padding = _ints(call["stride"], dims), _ints(call["dilation"], dims), call["padding"]
    if padding == "valid":
        padding = [0] * dims
    elif padding == "same":
        total = [d * (k - 1) for d, k in zip(dilation, weight_shape[2:])]
        if any(t % 2 for t in total):
            return "padding='same' with an asymmetric pad"
        padding = [t // 2 for t in total]
    else:
        padding = _ints(padding, dims)
    if dims == 1:   # a conv2d over a height-1 image
        stride, padding, dilation = [1, *stride], [0, *padding], [1, *dilation]
    return {"stride": stride, "padding": padding, "dilation": dilation}


def _normalize(gm: fx.GraphModule, node: fx.Node) -> dict | None:
    if node.op == "call_function":
        return linear_call(node.target, node.args, node.kwargs)
    if node.op != "call_module" or not layer_kind(module := gm.get_submodule(node.target)):
        return None
    with gm.graph.inserting_before(node):
        weight = gm.graph.get_attr(f"{node.target}.weight")
        bias = gm.graph.get_attr(f"{node.target}.bias") if module.bias is not None else None
    call = {"kind": layer_kind(module), "x": node.args[0], "weight": weight, "bias": bias,
            "transposed": False}
    if call["kind"] != "linear":
        if module.padding_mode != "zeros":
            return None
        call.update(stride=module.stride, padding=module.padding, dilation=module.dilation,
                    groups=module.groups)
    return call


def module_path(node: fx.Node) -> str:
    """The innermost module a node was traced in, as a model name (``h.0.attn``)."""
    stack = node.meta.get("nn_module_stack") or {}
    path = list(stack.values())[-1][0] if stack else ""
    # the root is L['self'], or L['args'][0] when a decorator on forward passes self on
    path = re.sub(r"^L\['[^']*'\](\[\d+\])*\.?", "", path)
    return re.sub(r"\[(\d+)\]", r".\1", path).replace("._modules['", ".").replace("']", "")


def _float_op(node: fx.Node, params: set) -> tuple[str, str] | None:
    if node.op not in ("call_function", "call_method"):
        return None
    if node.target in _SOFTMAX:
        return "softmax", FLOAT_SOFTMAX
    if node.target in _PRODUCTS:
        weighted = any(a in params for a in node.all_input_nodes)
        return _PRODUCTS[node.target], FLOAT_WEIGHT_PRODUCT if weighted else FLOAT_PRODUCT
    return None


def annotate_layers(gm: fx.GraphModule, *, model: nn.Module, example_inputs,
                    float_out: list | None = None) -> PassResult:
    tensor_names = {id(t): n for n, t in model.named_parameters(remove_duplicate=False)}
    tensor_names.update({id(t): n for n, t in model.named_buffers(remove_duplicate=False)})
    layers = {key: layer_name(n) for key, n in parameter_names(model).items()}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    params = {}   # placeholder -> layer name of the parameter it holds
    for i, (node, value) in enumerate(zip(placeholders, example_inputs)):
        node.meta["fqt_name"] = tensor_names.get(id(value), f"input_{i}")
        if id(value) in layers:
            params[node] = layers[id(value)]
    module_names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    modified = False
    for node in list(gm.graph.nodes):
        with at_node(node):
            if isinstance(node.target, torch._ops.HigherOrderOperator):
                node.meta["fqt_nested_layers"] = _nested_layers(gm, node, params)
            if float_out is not None and (kept := _float_op(node, params)):
                float_out.append((module_path(node), *kept))
            call = _normalize(gm, node)
            if call is None or not isinstance(call["weight"], fx.Node):
                continue
            weight = call["weight"]
            if weight.op == "get_attr":
                modified = True
                owner = weight.target.rsplit(".", 1)[0]
                layer = module_names.get(id(gm.get_submodule(owner)), owner)
            elif weight in params:
                layer = params[weight]
            else:
                continue   # the weight is an activation: not a layer
            if call["kind"] != "linear":
                shape = _shape(weight, gm)
                call["kind"] = "conv1d" if len(shape) == 3 else "conv2d"
                geometry = _conv_geometry(call, shape)
                if isinstance(geometry, str):
                    call["unsupported"] = geometry
                else:
                    call.update(geometry)
            node.meta["fqt_call"] = call
            node.meta["fqt_layer"] = layer
    if modified:
        gm.recompile()
    return PassResult(gm, modified)


def _nested_layers(gm: fx.GraphModule, node: fx.Node, params: dict) -> list[str]:
    """Layers called inside the bodies of a higher-order op ``node``. Each body's placeholders
    take the op's non-body operands in order (as ``tag_activation_checkpoint(body, *operands)``
    and ``cond``'s operand tuple do), which names the weights a body receives (``params``:
    placeholder -> layer name)."""
    bodies = [gm.get_submodule(a.target) for a in node.args
              if isinstance(a, fx.Node) and a.op == "get_attr"]
    operands = [a for a in _flat_nodes(node.args) if a.op != "get_attr"]
    layers = []
    for body in bodies:
        if not isinstance(body, fx.GraphModule):
            continue
        names = {ph: params.get(op) for ph, op in
                 zip((n for n in body.graph.nodes if n.op == "placeholder"), operands)}
        for inner in body.graph.nodes:
            call = _normalize(body, inner)
            if call is not None and names.get(call["weight"]):
                layers.append(names[call["weight"]])
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
