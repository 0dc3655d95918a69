"""Replace training-mode dropout by the counter-based ``fqt::dropout`` (capture stage, both
backends).

Matches: ``F.dropout(input, p, training, inplace)`` calls (what Dynamo captures for
``nn.Dropout`` and ``F.dropout``) on a float32 input with a constant ``p`` in (0, 1),
``training=True`` and ``inplace=False``.
Produces: one ``ops.dropout.counted_dropout`` call each (``fqt::dropout``: the mask drawn
from the ``(seed, step, site, STREAM_DROPOUT)`` stream, kept as bits for backward), noted
with its site; ``regions_out`` receives one line per site. The site is
``dropout.site_id(module path, occurrence)``, so sites draw different masks, and each step
new ones (the step is in ``fqt.rng_state``). The graph gets the ``fqt.rng_state``
placeholder if ``rewrite_binary_layers`` gave it none (a model without binarized layers),
announced in ``extras_out`` as that pass does. Both backends run the pass, so both draw the
same masks: the reference backend runs the op's reference, the kernel backend its kernels.
Left as captured: ``training=False`` and ``p == 0`` (the identity: ATen returns the input,
no mask), and with a reason in ``float_out`` (shown by ``fqt.summary``): ``p == 1`` (all
zeros, no draw needed), ``inplace=True`` (the op is out of place, and other users of the
input would see the mutation), a ``p`` or ``training`` that is not a constant, and dropout
inside a higher-order op's body (activation checkpointing replays torch's RNG state there,
which a counter-based draw would not need but this pass does not rewrite bodies). Dropout
inside ``F.scaled_dot_product_attention(dropout_p=...)`` happens inside that op and is not
matched.
Invariants: new nodes have ``meta["val"]`` and the ``nn_module_stack`` of the call they
replace; nothing aliases or mutates.
"""
from __future__ import annotations

import inspect

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..ops.dropout import counted_dropout, site_id
from .annotate_layers import module_path
from .infra import PassResult, fake_mode_of, insert_call
from .rewrite_binary_layers import add_placeholder

KEYS = ("val", "example_value")
_SIGNATURE = inspect.signature(F.dropout)


def _arguments(node: fx.Node) -> dict | None:
    try:
        bound = _SIGNATURE.bind(*node.args, **node.kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    return bound.arguments


def _unfused_reason(a: dict) -> str | None:
    """Why a training-mode dropout call stays torch's, or None when it is replaced."""
    p, training, inplace = a["p"], a["training"], a["inplace"]
    if not isinstance(p, (int, float)) or not isinstance(training, bool) or not isinstance(inplace, bool):
        return "p or training is not a constant: torch's dropout kept"
    if p == 1:
        return "p=1 zeroes every element (no mask to draw): torch's dropout kept"
    if inplace:
        return "inplace=True (the input's other users see the mutation): torch's dropout kept"
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


def _in_bodies(gm: fx.GraphModule, float_out: list) -> None:
    for name, sub in gm.named_modules():
        if name and isinstance(sub, fx.GraphModule):
            for node in sub.graph.nodes:
                if node.op == "call_function" and node.target is F.dropout:
                    float_out.append((module_path(node), "dropout", "inside a higher-order op's body "
                                      "(activation checkpointing): torch's dropout kept"))


def fuse_dropout(gm: fx.GraphModule, *, regions_out: list, float_out: list, extras_out: list) -> PassResult:
    _in_bodies(gm, float_out)
    occurrences: dict[str, int] = {}
    replaced = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not F.dropout:
            continue
        a = _arguments(node)
        if a is None or _is_identity(a):
            continue
        path = module_path(node)
        reason = _unfused_reason(a)
        if reason is not None:
            float_out.append((path, "dropout", reason))
            continue
        occurrence = occurrences[path] = occurrences.get(path, -1) + 1
        site = site_id(path, occurrence)
        label = f"{path or '(model)'}#{occurrence}"
        rng_state = _rng_state(gm, extras_out)
        with gm.graph.inserting_before(node):
            new = insert_call(gm.graph, counted_dropout, (a["input"], rng_state, float(a["p"]), site, label),
                              KEYS)
        for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
            if key in node.meta:
                new.meta[key] = node.meta[key]
        line = f"dropout {label} (p={float(a['p'])}): counter-based mask, saved as bits"
        new.meta["fqt_note"] = line
        regions_out.append(line)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        replaced += 1
    if replaced:
        gm.recompile()
    return PassResult(gm, bool(replaced))
