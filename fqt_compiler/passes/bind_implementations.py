"""Bind every fqt op node to the implementation of the chosen backend (``ops/registry.py``).

Matches: call nodes whose target is an op of the ``fqt`` namespace.
Produces: the node's target replaced by ``registry.lookup(op, backend)``'s callable (the op
stays readable as ``meta["fqt_op"]``), ``impl=<backend that ran>`` appended to its note, and
``ran[op] = backend that ran`` so summaries report it; an implementation marked
``takes_layer_name`` also gets the keywords ``layer_name`` (its layer's module name) and
``target`` (the Config's kernel target) (a backend without an implementation
of an op falls back to ``reference``).
Invariants: the callable has the op's schema and semantics, so ``meta["val"]`` stays valid.
This is the last pass: the lowering of an op to a kernel is a registry entry, not a pass.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..ops import registry
from .infra import PassResult


def bind_implementations(gm: fx.GraphModule, *, backend: str, ran: dict, plan: list,
                         target: str = "host") -> PassResult:
    modified = False
    for node in gm.graph.nodes:
        if isinstance(node.target, torch._ops.OpOverload) and node.target.namespace == "fqt":
            op = node.target._schema.name
            impl, used = registry.lookup(op, backend)
            ran[op] = used
            node.meta["fqt_op"] = node.target
            node.meta["fqt_note"] = (node.meta.get("fqt_note", "") + f"  impl={used}").strip()
            if getattr(impl, "takes_layer_name", False):
                # Kernel implementations record runtime statistics under the layer's name and
                # run the kernels generated for the configured target.
                layer = dict(zip((a.name for a in node.target._schema.arguments), node.args))["layer"]
                node.kwargs = {**node.kwargs, "layer_name": plan[layer].name, "target": target}
            node.target = impl
            modified = True
    gm.recompile()
    return PassResult(gm, modified)
