"""Bind every fqt op node to the implementation of the chosen backend (``ops/registry.py``).

Matches: call nodes whose target is an op of the ``fqt`` namespace.
Produces: the node's target replaced by ``registry.lookup(op, backend)``'s callable (the op
stays readable as ``meta["fqt_op"]``), ``impl=<backend that ran>`` appended to its note, and
``ran[op] = backend that ran`` so summaries report it; an implementation marked
``takes_layer_name`` also gets the keywords ``layer_name`` (its layer's module name) and
``target`` (the Config's kernel target; a fused region's ops get its ``region`` name as
``layer_name``). An op with no implementation on the backend
raises, naming the op and its layer, unless the layer's plan chose float gradients (method
``none``: its float-G' GEMMs run on the reference, noted as such); nothing falls back
silently, e.g. an unfused quantizer chain left by a fusion that did not match.
With ``check_finite``, each op that takes a layer's output gradient G' first (the gradient
quantizers, and the float backward GEMMs of method ``none``) is wrapped by a check that
raises ``FloatingPointError`` naming the layer when G' holds a NaN or an Inf.
Invariants: the callable has the op's schema and semantics, so ``meta["val"]`` stays valid.
This is the last pass: the lowering of an op to a kernel is a registry entry, not a pass.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..ops import registry
from .infra import PassResult

# Ops whose first argument is the G' of a layer (named gprime/g2d in their schemas);
# mark_gradient and quantize_gradient see the same tensor as aq_sample, checked once there.
_GRADIENT_CONSUMERS = ("aq_sample", "aq_quantize_", "conv2d_input_grad", "conv2d_weight_grad",
                       "linear_input_grad", "linear_weight_grad")


def finite_check(impl, layer_name: str):
    """``impl`` preceded by a NaN/Inf check of its first argument. One sum over G' (NaN or
    Inf iff an element is, or iff the finite sum overflows, which the exact test rules out)."""
    def checked(g, *args, **kwargs):
        if not torch.isfinite(g.sum()) and not torch.isfinite(g).all():
            bad = int((~torch.isfinite(g)).sum())
            raise FloatingPointError(
                f"fqt: non-finite gradient at layer {layer_name!r}: {bad} of {g.numel()} "
                f"elements of dL/dY are NaN or Inf (Config(check_finite=True)); lower the "
                f"learning rate, check the loss, or set check_finite=False to let them "
                f"propagate as in float training")
        return impl(g, *args, **kwargs)
    checked.__name__ = getattr(impl, "__name__", "impl")
    return checked


# The float-G' GEMMs, which only a layer with method "none" (QAT: float gradients) keeps.
_FLOAT_GRADIENT_OPS = ("fqt::conv2d_input_grad", "fqt::conv2d_weight_grad", "fqt::linear_input_grad",
                       "fqt::linear_weight_grad")


def _implementation(op: str, backend: str, layer):
    """``(callable, backend it belongs to)`` of ``op`` for ``layer`` (a LayerPlan or None)."""
    if registry.has(op, backend):
        return registry.lookup(op, backend), backend
    if layer is not None and layer.method == "none" and op in _FLOAT_GRADIENT_OPS:
        return registry.lookup(op, "reference"), "reference"
    where = f"layer {layer.name!r}" if layer is not None else "no layer"
    raise NotImplementedError(
        f"fqt: {op} (of {where}) has no {backend!r} implementation, so it would silently run "
        f"the pure-PyTorch reference; register one (ops/registry.register), use "
        f"backend='reference', or keep the layer float with a rule (binarize=False or "
        f"method='none')")


def bind_implementations(gm: fx.GraphModule, *, backend: str, ran: dict, plan: dict,
                         target: str = "host", check_finite: bool = False) -> PassResult:
    modified = False
    for node in gm.graph.nodes:
        if isinstance(node.target, torch._ops.OpOverload) and node.target.namespace == "fqt":
            op = node.target._schema.name
            args = dict(zip((a.name for a in node.target._schema.arguments), node.args))
            layer = args.get("layer", node.meta.get("fqt_layer_index"))
            impl, used = _implementation(op, backend, plan[layer] if layer is not None else None)
            ran[op] = used
            node.meta["fqt_op"] = node.target
            node.meta["fqt_note"] = (node.meta.get("fqt_note", "") + f"  impl={used}").strip()
            if getattr(impl, "takes_layer_name", False):
                # Kernel implementations record runtime statistics under the layer's name (a
                # fused region's: the module it is rooted at) and run the kernels generated
                # for the configured target.
                name = plan[layer].name if layer is not None else args["region"]
                node.kwargs = {**node.kwargs, "layer_name": name, "target": target}
            if check_finite and layer is not None and op.split("::")[1].startswith(_GRADIENT_CONSUMERS):
                impl = finite_check(impl, plan[layer].name)
            node.target = impl
            modified = True
    gm.recompile()
    return PassResult(gm, modified)
