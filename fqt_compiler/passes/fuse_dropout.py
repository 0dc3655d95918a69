"""Replace training-mode dropout by the counter-based ``fqt::dropout`` (capture stage, both
backends).

Matches: ``F.dropout(input, p, training, inplace)`` calls (what Dynamo captures for
``nn.Dropout`` and ``F.dropout``) on a float32 input with a constant ``p`` in (0, 1),
``training=True`` and ``inplace=False``; and ``F.scaled_dot_product_attention(query, key,
value, attn_mask, dropout_p, is_causal, scale)`` with a constant ``dropout_p`` in (0, 1)
(transformers' attention passes ``dropout_p=p`` in training, 0 in eval), float32, constant
``is_causal`` and ``scale``, without ``enable_gqa``.
Produces: one ``ops.dropout.counted_dropout`` call per dropout (``fqt::dropout``: the mask
drawn from the ``(seed, step, site, STREAM_DROPOUT)`` stream, kept as bits for backward),
and one ``ops.dropout.attention_dropout`` per attention (ATen's math path, which the CPU
runs whenever ``dropout_p > 0``, with ``fqt::dropout`` on the probabilities), each noted
with its site; ``regions_out`` receives one line per site. The site is
``dropout.site_id(module path, occurrence)``, so sites draw different masks, and each step
new ones (the step is in ``fqt.rng_state``). The graph gets the ``fqt.rng_state``
placeholder if ``rewrite_binary_layers`` gave it none (a model without binarized layers),
announced in ``extras_out`` as that pass does. Both backends run the pass, so both draw the
same masks: the reference backend runs the op's reference, the kernel backend its kernels.
Dropout inside activation checkpointing's bodies (``tag_activation_checkpoint``) is replaced
too: the body gets the ``[seed, step]`` input as a new last operand, and its replay in
backward redraws the same mask (no RNG state to save and restore); its sites count on from
the graph's own.
Left as captured: ``training=False`` and ``p == 0`` (the identity: ATen returns the input,
no mask), and with a reason in ``float_out`` (shown by ``fqt.summary``): ``p == 1`` (all
zeros, no draw needed), ``inplace=True`` (the op is out of place, and other users of the
input would see the mutation), arguments that are not constants, grouped-query attention,
and dropout in the body of another higher-order op or of a body called more than once
(its sites would repeat one mask).
Invariants: new nodes have ``meta["val"]`` and the ``nn_module_stack`` of the call they
replace; nothing aliases or mutates.
"""
from __future__ import annotations

import inspect

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..ops.dropout import attention_dropout, counted_dropout, site_id
from .annotate_layers import module_path
from .infra import PassResult, fake_mode_of, insert_call
from .rewrite_binary_layers import add_placeholder

KEYS = ("val", "example_value")
_SIGNATURE = inspect.signature(F.dropout)
_TARGETS = (F.dropout, F.scaled_dot_product_attention)
_CHECKPOINT = torch.ops.higher_order.tag_activation_checkpoint
_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


def _arguments(node: fx.Node) -> dict | None:
    """The call's arguments by name, with ``"input"`` (for an attention: its query, whose
    dtype is checked), ``"p"``, ``"training"``, ``"inplace"`` and ``"what"`` (for notes)."""
    if node.target is F.dropout:
        try:
            bound = _SIGNATURE.bind(*node.args, **node.kwargs)
        except TypeError:
            return None
        bound.apply_defaults()
        return {**bound.arguments, "what": "dropout"}
    # F.scaled_dot_product_attention is a builtin without a signature.
    if len(node.args) > len(_SDPA_PARAMS) or not set(node.kwargs) <= set(_SDPA_PARAMS):
        return None
    a = {**_SDPA_DEFAULTS, **dict(zip(_SDPA_PARAMS, node.args)), **node.kwargs}
    if not {"query", "key", "value"} <= set(a):
        return None
    return {**a, "input": a["query"], "p": a["dropout_p"], "training": True, "inplace": False,
            "what": "attention dropout"}


def _unfused_reason(a: dict) -> str | None:
    """Why a training-mode dropout call stays torch's, or None when it is replaced."""
    p, training, inplace = a["p"], a["training"], a["inplace"]
    if not isinstance(p, (int, float)) or not isinstance(training, bool) or not isinstance(inplace, bool):
        return "p or training is not a constant: torch's dropout kept"
    if p == 1:
        return "p=1 zeroes every element (no mask to draw): torch's dropout kept"
    if inplace:
        return "inplace=True (the input's other users see the mutation): torch's dropout kept"
    if a.get("enable_gqa", False) is not False:
        return "grouped-query attention (enable_gqa): torch's attention dropout kept"
    if not isinstance(a.get("is_causal", False), bool) or not isinstance(a.get("scale"), (float, type(None))):
        return "is_causal or scale is not a constant: torch's attention dropout kept"
    val = a["input"].meta.get("example_value", a["input"].meta.get("val")) \
        if isinstance(a["input"], fx.Node) else None
    if not isinstance(val, torch.Tensor) or val.dtype != torch.float32:
        return "input is not a float32 tensor: torch's dropout kept"
    return None


def _is_identity(a: dict) -> bool:
    return a["training"] is False or (isinstance(a["p"], (int, float)) and a["p"] == 0)


def _rng_state(gm: fx.GraphModule, extras_out: list) -> fx.Node:
    """The graph's ``fqt.rng_state`` placeholder, added if the graph has none."""
    for node in gm.graph.nodes:
        if node.op == "placeholder" and node.meta.get("fqt_name") == "fqt.rng_state":
            return node
    mode = fake_mode_of(n.meta.get("example_value", n.meta.get("val"))
                        for n in gm.graph.nodes if n.op == "placeholder")
    example = torch.zeros(2, dtype=torch.int64)
    extras_out.append(("rng_state", example))
    return add_placeholder(gm, "fqt_rng_state", "fqt.rng_state", example, mode)


def _fuse_in(gm: fx.GraphModule, rng_state, occurrences: dict, regions_out: list, float_out: list) -> int:
    """Replace the matched calls of ``gm``'s own graph; ``rng_state()`` gives (and on first use
    makes) the graph's ``[seed, step]`` input. Returns how many were replaced."""
    replaced = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _TARGETS:
            continue
        a = _arguments(node)
        if a is None or _is_identity(a):
            continue
        path = module_path(node)
        reason = _unfused_reason(a)
        if reason is not None:
            float_out.append((path, a["what"], reason))
            continue
        occurrence = occurrences[path] = occurrences.get(path, -1) + 1
        site = site_id(path, occurrence)
        label = f"{path or '(model)'}#{occurrence}"
        p = float(a["p"])
        with gm.graph.inserting_before(node):
            if node.target is F.dropout:
                fn, args = counted_dropout, (a["input"], rng_state(), p, site, label)
            else:
                fn, args = attention_dropout, (a["query"], a["key"], a["value"], a["attn_mask"], p,
                                               a["is_causal"], a["scale"], rng_state(), site, label)
            new = insert_call(gm.graph, fn, args, KEYS)
        for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
            if key in node.meta:
                new.meta[key] = node.meta[key]
        line = f"{a['what']} {label} (p={p}): counter-based mask, saved as bits"
        new.meta["fqt_note"] = line
        regions_out.append(line)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        replaced += 1
    if replaced:
        gm.recompile()
    return replaced


def _body_rng_state(gm: fx.GraphModule, hop: fx.Node, body: fx.GraphModule, outer):
    """``rng_state()`` for a checkpoint body: a new last placeholder of the body, fed the
    outer graph's ``rng_state`` as the checkpoint call's new last operand."""
    made = []

    def rng_state():
        if not made:
            mode = fake_mode_of(n.meta.get("val", n.meta.get("example_value"))
                                for n in body.graph.nodes if n.op == "placeholder")
            made.append(add_placeholder(body, "fqt_rng_state", "fqt.rng_state", torch.zeros(2, dtype=torch.int64),
                                        mode))
            hop.args = (*hop.args, outer())
        return made[0]
    return rng_state


def _bodies(gm: fx.GraphModule, rng_state, occurrences: dict, regions_out: list, float_out: list) -> int:
    """Dropout inside activation checkpointing's bodies, which the checkpoint replays in
    backward: a counter-based mask is redrawn the same, so no RNG state needs saving. Bodies
    of other higher-order ops, or one body called twice (its sites would repeat a mask), keep
    torch's dropout with that reason."""
    replaced, handled = 0, set()
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and n.args
             and isinstance(n.args[0], fx.Node) and n.args[0].op == "get_attr"]
    for hop in calls:
        body = getattr(gm, hop.args[0].target, None)
        if not isinstance(body, fx.GraphModule):
            continue
        shared = sum(c.args[0].target == hop.args[0].target for c in calls) > 1
        if hop.target is not _CHECKPOINT or shared:
            why = "a body called more than once" if shared else f"inside {hop.target}"
            float_out.extend((module_path(n), "dropout", f"{why}: torch's dropout kept")
                             for n in body.graph.nodes if n.op == "call_function" and n.target in _TARGETS)
            continue
        if hop.args[0].target not in handled:
            handled.add(hop.args[0].target)
            replaced += _fuse_in(body, _body_rng_state(gm, hop, body, rng_state), occurrences, regions_out,
                                 float_out)
    return replaced


def fuse_dropout(gm: fx.GraphModule, *, regions_out: list, float_out: list, extras_out: list) -> PassResult:
    made = []

    def rng_state():
        if not made:
            made.append(_rng_state(gm, extras_out))
        return made[0]

    occurrences: dict[str, int] = {}
    replaced = _fuse_in(gm, rng_state, occurrences, regions_out, float_out)
    replaced += _bodies(gm, rng_state, occurrences, regions_out, float_out)
    if replaced:
        gm.recompile()
    return PassResult(gm, bool(replaced))
