"""Give ATen graph placeholders and saved activations their model names.

Matches: placeholders of an AOTAutograd forward/inference graph (``primals_<i>`` /
``arg<i>_1``, in the order of the flat inputs) and the packed activations and weights of fqt
forward ops (their outputs, or for the activations the inputs of ``binary_conv2d_packed``); in a
backward graph, placeholders that are saved forward values.
Produces: ``meta["fqt_name"]`` = ``layer1.0.conv1.weight``, ``fqt.rng_state``,
``layer1.0.conv1.x_sign_bits``, ``layer1.0.conv1.w_sign_bits`` ...; forward names are recorded in
``names`` (shared with the backward graph, whose saved-value placeholders carry the forward node
names).
Invariants: metadata only; node names (the Python identifiers of the code) are unchanged.
"""
from __future__ import annotations

import operator

import torch.fx as fx

from ..ops.library import FORWARD_OPS, PACKED_INPUT_OPS
from .infra import PassResult

_SAVED = {1: "x_sign_bits", 2: "x_ste_bits", 3: "w_sign_bits", 4: "w_ste_bits"}   # outputs of a forward op
_PACKED_SAVED = {1: "w_sign_bits", 2: "w_ste_bits"}   # outputs of binary_conv2d_packed


def name_placeholders(gm: fx.GraphModule, *, input_names: list | None, names: dict,
                      plan: dict) -> PassResult:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if input_names is not None:
        for node, name in zip(placeholders, input_names):
            names[node.name] = name
        for node in gm.graph.nodes:
            if node.target in FORWARD_OPS.values():
                layer = plan[node.args[-1]].name
                for user in node.users:
                    if user.target is operator.getitem and user.args[1] in _SAVED:
                        names[user.name] = f"{layer}.{_SAVED[user.args[1]]}"
            elif node.target in PACKED_INPUT_OPS:   # x bits a region wrote, maybe for several layers
                layer = plan[node.args[-1]].name
                for i in (1, 2):
                    names.setdefault(node.args[i].name, f"{layer}.{_SAVED[i]}")
                for user in node.users:
                    if user.target is operator.getitem and user.args[1] in _PACKED_SAVED:
                        names[user.name] = f"{layer}.{_PACKED_SAVED[user.args[1]]}"
    for node in placeholders:
        if node.name in names:
            node.meta["fqt_name"] = names[node.name]
    return PassResult(gm, False)
