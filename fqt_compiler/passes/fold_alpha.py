"""Fold the per-channel scale alpha into the kernels (kernel backend only).

Matches, in the forward graph: ``aten.mul(getitem(fqt.binary_{conv2d,linear}(...), 0),
alpha)`` (or ``fqt.binary_linear_packed``) where ``Y_raw`` has no other user (so not with a
learned alpha, whose gradient needs ``Y_raw``). Produces ``fqt.binary_*_scaled(x, weight,
alpha, ...)`` (alpha after the weight, ``ops.fused.WEIGHT_INPUT``), whose GEMM
epilogue applies alpha: one float pass over every binarized layer's output less. A linear
layer's bias add that is the product's only user, ``aten.add(alpha * Y_raw, bias)`` with
a bias of O elements (defined before the multiply), folds too (``bias=``): one more pass
less; autograd's bias gradient (a sum of ``dL/dY``) never read the forward values.
Matches, in the backward graph: a fused ``fqt.aq_quantize_*_grad`` whose ``G'`` is
``aten.mul(g, alpha)``; produces the same op reading ``g`` with ``alpha=`` given, applied
inside the quantizer kernel (``G' = alpha ⊙ g`` with the same single float multiply).
Invariants: values are unchanged (the same float32 products); every node keeps its
``meta["val"]``; multiplies left without users are erased; symbolic sizes are compared
without adding guards (only shapes provably equal at every size fold).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true, sym_eq

from ..ops.fused import FUSED, SCALED, WEIGHT_INPUT
from .infra import PassResult

aten = torch.ops.aten
_MULS = (aten.mul.Tensor,)
_ADDS = (aten.add.Tensor,)
_WITH_BIAS = (torch.ops.fqt.binary_linear.default, torch.ops.fqt.binary_linear_packed.default)


def _channel_scale(mul: fx.Node, full: fx.Node, channels: int):
    """The operand of ``mul`` other than ``full``, if it is a per-channel vector (numel O)."""
    other = mul.args[1] if mul.args[0] is full else mul.args[0]
    val = other.meta.get("val") if isinstance(other, fx.Node) else None
    return other if val is not None and statically_known_true(val.numel() == channels) else None


def _fold_forward(graph: fx.Graph, node: fx.Node, order: dict) -> bool:
    outputs = [u for u in node.users if u.target is operator.getitem]
    y_raw = next((u for u in outputs if u.args[1] == 0), None)
    if y_raw is None or len(y_raw.users) != 1 or len(outputs) != len(node.users):
        return False
    mul = next(iter(y_raw.users))
    w = WEIGHT_INPUT.get(node.target, 1)
    channels = node.args[w].meta["val"].shape[0]
    if mul.target not in _MULS or (alpha := _channel_scale(mul, y_raw, channels)) is None:
        return False
    # alpha is computed after the forward op: the scaled op goes where the multiply was, so
    # every other reader of the op's outputs must come later (in practice: the graph output).
    if any(order[user] < order[mul] for out in outputs if out is not y_raw for user in out.users):
        return False
    bias_add = _bias_add(mul, channels, order) if node.target in _WITH_BIAS else None
    with graph.inserting_before(mul):
        scaled = graph.call_function(SCALED[node.target], (*node.args[:w + 1], alpha, *node.args[w + 1:]),
                                     {} if bias_add is None else {"bias": bias_add[1]})
        scaled.meta.update(node.meta)
        for out in outputs:
            new = graph.call_function(operator.getitem, (scaled, out.args[1]))
            new.meta.update(out.meta)
            # the op's first output now stands for the product (and the bias add)
            replaced = out if out is not y_raw else bias_add[0] if bias_add else mul
            if out is y_raw:
                new.meta.update(replaced.meta)
            replaced.replace_all_uses_with(new)
    if bias_add is not None:
        graph.erase_node(bias_add[0])
    graph.erase_node(mul)
    for out in outputs:
        graph.erase_node(out)
    graph.erase_node(node)
    return True


def _bias_add(mul: fx.Node, channels: int, order: dict):
    """``(add, bias)`` when the only user of ``mul`` adds a bias of ``channels`` elements
    along the last dimension that exists before ``mul``, else None."""
    if len(mul.users) != 1:
        return None
    add = next(iter(mul.users))
    if add.target not in _ADDS or len(add.args) != 2 or add.kwargs or add.args.count(mul) != 1:
        return None
    bias = _channel_scale(add, mul, channels)
    if bias is None or bias.meta["val"].dim() != 1 or bias.meta["val"].dtype != torch.float32 \
            or order.get(bias, len(order)) > order[mul] \
            or not statically_known_true(sym_eq(add.meta["val"].shape, mul.meta["val"].shape)):
        return None
    return add, bias


def _fold_backward(node: fx.Node) -> bool:
    gprime = node.args[0]
    if not isinstance(gprime, fx.Node) or gprime.target not in _MULS:
        return False
    channels = node.args[2].meta["val"].shape[0]   # w_sign_bits: a row per output channel
    for g in gprime.args:
        if isinstance(g, fx.Node) and statically_known_true(
                sym_eq(g.meta["val"].shape, gprime.meta["val"].shape)):
            alpha = _channel_scale(gprime, g, channels)
            if alpha is not None:
                node.args = (g, *node.args[1:])
                node.kwargs = {**node.kwargs, "alpha": alpha}
                return True
    return False


def fold_alpha(gm: fx.GraphModule) -> PassResult:
    graph = gm.graph
    folded = 0
    fused_ops = set(FUSED.values())
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in SCALED:
            folded += _fold_forward(graph, node, order)
        elif node.target in fused_ops and "alpha" not in node.kwargs:
            folded += _fold_backward(node)
    if folded:
        graph.eliminate_dead_code()
        gm.recompile()
    return PassResult(gm, bool(folded))
