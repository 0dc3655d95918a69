"""Fuse normalization -> [residual add ->] activation [-> pool] chains into one op (capture
stage, kernel backend).

Matches, in the captured graph: ``F.batch_norm(x, running_mean, running_var, weight, bias,
training, momentum, eps)`` on a 4-D float32 ``x`` with an affine (weight and bias), a float
momentum (``momentum=None``, the cumulative average, breaks Dynamo's graph before it gets
here) and, in eval mode, running statistics; then, each only if the previous value has no
other user: one residual add (``operator.add``/``iadd``, ``torch.add`` with alpha 1) of a
float32 tensor of ``x``'s shape, either operand order (ResNet's ``out += identity``; the
identity may be another BatchNorm's output; the note says what backward keeps for it: the
activation's mask bits, nothing, or for GELU and SiLU the residual itself); one activation
(``_ACTIVATIONS``: ReLU, ReLU6, Hardtanh, LeakyReLU, GELU exact or tanh, SiLU); one pool:
``F.max_pool2d`` (dilation 1, no indices returned, window of at most 255 taps),
``F.avg_pool2d`` (no divisor_override) or ``F.adaptive_avg_pool2d`` to 1x1. And
``F.layer_norm(x, normalized_shape, weight, bias, eps)`` on a float32 ``x`` of two or more
dimensions normalized over its last one, with weight and bias, then (if its only user) one
activation. And RMSNorm over the last dimension with a weight, then (if its only user) one
activation: ``weight * (h * rsqrt(mean(h ** 2, -1, keepdim=True) + eps))`` as
``transformers``' LlamaRMSNorm traces (method or function ``pow``/``mean``, a float32 ``.to``
of the normalized value allowed, each link the only user of the one before, the weight of
shape ``[D]`` in either operand order), or ``torch.rms_norm``/``F.rms_norm`` (``nn.RMSNorm``).
And a ``binarized_linear`` (from ``rewrite_binary_layers``) with the default
alpha on a float32 input whose only user is one activation (ViT's and BERT's fc1 -> GELU;
SiLU), and when that activation's only user is its product with a second such layer's output
of the same shape that nothing else reads (SwiGLU: ``silu(gate(x)) * up(x)``, either order),
the second layer and the product too.
Produces: one ``fused_regions.batch_norm_region`` call in place of a BatchNorm chain (the
fused op ``fqt::bn_region`` plus the running-statistics update), one
``fused_regions.layer_norm_region`` call (``fqt::ln_region``) in place of a LayerNorm
chain, one ``fused_regions.rms_norm_region`` call (``fqt::rms_region``) in place of an
RMSNorm chain, one ``fused_regions.binary_gated_linear_region`` call
(``fqt::gated_linear_region``: both raw GEMM results kept as int16) in place of a gated
pair, one ``fused_regions.binary_linear_region`` call (``fqt::linear_act_region``: the
raw GEMM result, alpha and bias go into the region, which keeps the raw result as int16, or
int32 for a contraction of 32768 or more, instead of a float32 copy) in place of a linear
layer and its activation, each noted with the ops it replaced; ``regions_out`` receives one
line per fused region. When the BatchNorm's input is a
``binarized_conv2d`` (from ``rewrite_binary_layers``) with the default alpha, no bias and no
other user, that call joins the region (``fused_regions.binary_conv2d_region``): the region
reads the raw GEMM result and alpha, and backward keeps the raw result as int16 (int32 when
the contraction is 32768 or longer; the note and region line say which) instead of a
float32 copy. When its input is a float ``conv2d`` (a layer the plan keeps float, e.g. the
first) with no other user and the region has no residual, that conv joins the region instead
(``fused_regions.conv2d_region``): the backward keeps the conv's input and weight, which
the conv's own backward keeps anyway, and recomputes the conv output rather than keeping
it. Then every BatchNorm region whose output is the input ``x`` of one or more
``binary_conv2d_region`` calls (the next binarized layers), on maps of at least
``PACK_MIN_PLANE`` outputs, writes that output's packed sign
and STE bits too (``pack_signs``: the kernel derives them from the values it stores, in the
same pass), and those calls take them (``x_bits``: ``library.binary_conv2d_packed``) instead
of packing ``x`` themselves; the region's note and line name the layers it packs for. The
float output stays (the conv's input gradient flows through it, and the residual adds and
float layers that read it keep reading it). Likewise (unless ``PACK_ROW_REGIONS`` is off)
every LayerNorm, RMSNorm, linear or gated linear region whose output is the input ``x`` of
``library.binarized_linear`` calls or of linear and gated regions' layers (``x``,
``x_up``), directly or through an identity ``F.dropout`` (``p=0`` or not training), writes
the output's sign and STE bits row by row and those take them as ``x_bits`` /
``x_up_bits`` (``library.binary_linear_packed``). Anything else ends a region: it stays as
captured, so correctness never depends on the match.
Invariants: values are those of the unfused chain up to float32 rounding (the reference
of each fused op is that chain); every new node has ``meta["val"]`` and the
``nn_module_stack`` of the normalization it replaces; the running statistics are mutated as
``F.batch_norm`` mutates them.
"""
from __future__ import annotations

import inspect
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true, sym_eq

from ..ops import library
from ..ops.fused_regions import (ACTIVATION_MASKS, batch_norm_region, binary_conv2d_region,
                                 binary_gated_linear_region, binary_linear_region, conv2d_region,
                                 layer_norm_region, raw_dtype, rms_norm_region)
from .annotate_layers import linear_call
from .fuse_dropout import _arguments as _dropout_arguments
from .fuse_dropout import _is_identity
from .infra import PassResult, insert_call, set_val

KEYS = ("val", "example_value")

# Activation call -> (table name, its constant parameters from the bound call).
_ACTIVATIONS = {
    F.relu: ("relu", lambda a: ()),
    torch.relu: ("relu", lambda a: ()),
    torch.relu_: ("relu", lambda a: ()),
    F.relu6: ("hardtanh", lambda a: (0.0, 6.0)),
    F.hardtanh: ("hardtanh", lambda a: (float(a.get("min_val", -1.0)), float(a.get("max_val", 1.0)))),
    F.leaky_relu: ("leaky_relu", lambda a: (float(a.get("negative_slope", 0.01)),)),
    F.silu: ("silu", lambda a: ()),
}
_GELU = {"none": "gelu", "tanh": "gelu_tanh"}
_SIGNATURES = {F.relu: F.relu, torch.relu: F.relu, torch.relu_: F.relu, F.relu6: F.relu6,
               F.hardtanh: F.hardtanh, F.leaky_relu: F.leaky_relu, F.silu: F.silu}
_ADDS = (operator.add, operator.iadd, torch.add)


def _avg_pool2d(input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
                divisor_override=None):
    """``F.avg_pool2d``'s signature (a builtin, which ``inspect`` cannot read)."""



def _activation(node: fx.Node | None, source: fx.Node):
    """``(table name, params)`` of an activation call applied to ``source``, else None."""
    if node is None or node.op != "call_function":
        return None
    if node.target is F.gelu:
        # F.gelu is a builtin without a signature: (input, approximate="none")
        approximate = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
        if node.args[:1] != (source,) or approximate not in _GELU:
            return None
        return _GELU[approximate], ()
    if node.target not in _ACTIVATIONS:
        return None
    bound = _bind(_SIGNATURES[node.target], node)
    if bound is None or bound.get("input", bound.get("self")) is not source:
        return None
    name, get = _ACTIVATIONS[node.target]
    return name, get(bound)


def _bind(fn, node: fx.Node) -> dict | None:
    try:
        bound = inspect.signature(fn).bind(*node.args, **node.kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    return bound.arguments


def _val(node):
    return node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else None


def _only_user(node: fx.Node):
    return next(iter(node.users)) if len(node.users) == 1 else None


def _pair(v):
    return (int(v), int(v)) if isinstance(v, int) else tuple(int(x) for x in v)


def _pool(node: fx.Node):
    """``(kh, kw, sh, sw, ph, pw), pool_mode, ceil_mode`` of a pool the kernels take (the
    window is empty for "mean"), else None."""
    if node is None or node.op != "call_function":
        return None
    if node.target is F.adaptive_avg_pool2d:
        a = _bind(F.adaptive_avg_pool2d, node)
        return ((), "mean", False) if a is not None and a["output_size"] in (1, (1, 1), [1, 1]) else None
    if node.target is F.max_pool2d:
        a = _bind(F._max_pool2d, node)   # F.max_pool2d's signature (it is a dispatch wrapper)
        if a is None or a["return_indices"] or _pair(a["dilation"]) != (1, 1):
            return None
        mode = "max"
    elif node.target is F.avg_pool2d:
        a = _bind(_avg_pool2d, node)
        if a is None or a["divisor_override"] is not None or not isinstance(a["count_include_pad"], bool):
            return None
        mode = "avg" if a["count_include_pad"] else "avg_valid"
    else:
        return None
    if any(isinstance(a[k], fx.Node) for k in ("kernel_size", "stride", "padding", "ceil_mode")):
        return None
    kernel = _pair(a["kernel_size"])
    stride = _pair(a["stride"]) if a["stride"] not in (None, []) else kernel
    padding = _pair(a["padding"])
    if kernel[0] * kernel[1] > 255 or any(2 * p > k for p, k in zip(padding, kernel)):
        return None
    return (*kernel, *stride, *padding), mode, bool(a["ceil_mode"])


def _residual(add: fx.Node | None, bn: fx.Node, x):
    """The other operand of a residual add ``bn + r`` (either order), else None."""
    if add is None or add.op != "call_function" or add.target not in _ADDS or len(add.args) != 2:
        return None
    if set(add.kwargs) - {"alpha"} or add.kwargs.get("alpha", 1) != 1:
        return None
    # ``r += bn`` would mutate r, which others may read: only ``bn += r`` is the region's.
    if add.args.count(bn) != 1 or (add.target is operator.iadd and add.args[0] is not bn):
        return None
    other = add.args[1] if add.args[0] is bn else add.args[0]
    r = _val(other)
    # a shape test that adds no guard to a dynamic graph
    if r is None or r.dtype != torch.float32 or not statically_known_true(sym_eq(r.shape, x.shape)):
        return None
    return other


def _residual_note(activation: str) -> str:
    """What the region's backward keeps to differentiate the activation at ``bn(x) + r``."""
    if activation in ACTIVATION_MASKS:
        return "activation mask saved as bits"
    if activation == "none":
        return "nothing saved (no activation)"
    return f"kept as float32 ({activation}'s derivative needs bn(x) + r itself, not a mask)"


def _region_name(weight: fx.Node) -> str:
    name = weight.meta.get("fqt_name", weight.name)
    return name.removesuffix(".weight")


def _raw_input(node) -> dict | None:
    """The bound arguments of a ``binarized_conv2d`` whose raw GEMM result a region can take:
    default alpha (a learned one needs ``Y_raw`` for its gradient), no bias, one user."""
    if not isinstance(node, fx.Node) or node.target is not library.binarized_conv2d or len(node.users) != 1:
        return None
    conv = _bind(library.binarized_conv2d, node)
    return conv if conv is not None and conv["bias"] is None and conv["alpha"] is None else None


def _float_conv(node) -> dict | None:
    """The bound arguments of a float ``conv2d`` only the BatchNorm reads, with constant int
    geometry (not ``padding="same"``), geometry as int pairs."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or len(node.users) != 1:
        return None
    call = linear_call(node.target, node.args, node.kwargs)
    if call is None or call["kind"] != "conv2d" or not isinstance(call["weight"], fx.Node):
        return None
    geometry = [call[k] for k in ("stride", "padding", "dilation", "groups")]
    if any(isinstance(v, (str, fx.Node)) for v in geometry) or _val(call["weight"]).dim() != 4:
        return None
    return {**call, **{k: list(_pair(call[k])) for k in ("stride", "padding", "dilation")}}


def _fuse(gm: fx.GraphModule, bn: fx.Node, regions_out: list) -> bool:
    a = _bind(F.batch_norm, bn)
    if a is None:
        return False
    x = _val(a["input"])
    if x is None or x.dim() != 4 or x.dtype != torch.float32:
        return False
    if not isinstance(a["weight"], fx.Node) or not isinstance(a["bias"], fx.Node):
        return False
    training, momentum, eps = a["training"], a["momentum"], a["eps"]
    if not isinstance(training, bool) or not isinstance(momentum, float) or not isinstance(eps, float):
        return False
    if not training and not isinstance(a["running_mean"], fx.Node):
        return False
    chain, last = [bn], bn
    residual = _residual(_only_user(bn), bn, x)
    if residual is not None:
        last = _only_user(bn)
        chain.append(last)
    activation, params = "none", ()
    found = _activation(_only_user(last), last)
    if found is not None:
        (activation, params), last = found, _only_user(last)
        chain.append(last)
    pool, pool_mode, ceil_mode = (), "max", False
    found = _pool(_only_user(last))
    if found is not None:
        pool, pool_mode, ceil_mode = found
        last = _only_user(last)
        chain.append(last)
    name = _region_name(a["weight"])
    region_args = (a["running_mean"], a["running_var"], a["weight"], a["bias"], training, momentum, eps,
                   activation, list(params), list(pool), pool_mode, ceil_mode, name)
    conv = _raw_input(a["input"])
    # conv2d_region takes no residual: with one, a float conv stays outside the region
    float_conv = _float_conv(a["input"]) if conv is None and residual is None else None
    if conv is not None:
        fn, args = binary_conv2d_region, (conv["x"], conv["weight"], conv["rng_state"], conv["stride"],
                                          conv["padding"], conv["dilation"], conv["layer"], *region_args,
                                          residual)
        contraction = _val(conv["weight"])[0].numel()
        input_note = (f"; input: layer {conv['layer']}'s raw GEMM result, saved as "
                      f"{str(raw_dtype(contraction)).removeprefix('torch.')} (K={contraction})")
    elif float_conv is not None:
        fn, args = conv2d_region, (float_conv["x"], float_conv["weight"], float_conv["bias"],
                                   float_conv["stride"], float_conv["padding"], float_conv["dilation"],
                                   float_conv["groups"], *region_args)
        input_note = f"; input: float conv2d {_region_name(float_conv['weight'])}, recomputed in backward"
    else:
        fn, args, input_note = batch_norm_region, (a["input"], *region_args, None, 0, residual), ""
    if residual is not None:
        input_note += "; residual: " + _residual_note(activation)
    _replace(gm, chain, fn, args, f"{name} ({'train' if training else 'eval'})", regions_out, input_note)
    if conv is not None or float_conv is not None:
        gm.graph.erase_node(a["input"])
    return True


def _replace(gm: fx.GraphModule, chain: list, fn, args: tuple, label: str, regions_out: list,
             input_note: str = "") -> fx.Node:
    """Put ``fn(*args)`` in place of ``chain`` (its first node is the normalization); returns
    the new node."""
    first, last = chain[0], chain[-1]
    with gm.graph.inserting_before(last):
        new = insert_call(gm.graph, fn, args, KEYS)
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
        if key in first.meta:
            new.meta[key] = first.meta[key]
    replaced = " -> ".join(getattr(n.target, "__name__", str(n.target)) for n in chain)
    replaced += input_note
    new.meta["fqt_note"] = f"fused region {label}: {replaced}"
    regions_out.append(f"{label}: {replaced}")
    new.meta["fqt_region_line"] = len(regions_out) - 1
    last.replace_all_uses_with(new)
    for node in reversed(chain):
        gm.graph.erase_node(node)
    return new


_BN_REGIONS = (batch_norm_region, binary_conv2d_region, conv2d_region)
# Output planes (OH*OW) from which a region writes the bits: on smaller maps (ResNet-18's 4x4
# to 1x1 at 32x32 inputs) its per-plane bit writes cost more than the conv's own pass over
# the map (benchmarked one region at a time, 1 thread).
PACK_MIN_PLANE = 64


def _pack_for_binarized_convs(gm: fx.GraphModule, region: fx.Node, regions_out: list) -> bool:
    """Have ``region`` write its output's sign and STE bits for the ``binary_conv2d_region``
    calls reading that output as ``x``, and those calls read them."""
    convs = [u for u in region.users if u.target is binary_conv2d_region and u.args[0] is region]
    out = _val(region)
    if not convs or not statically_known_true(out.shape[2] * out.shape[3] >= PACK_MIN_PLANE):
        return False
    readers = [(conv, "x_bits", _region_name(conv.args[1])) for conv in convs]
    _write_bits(gm, region, readers, regions_out)
    return True


def _write_bits(gm: fx.GraphModule, region: fx.Node, readers: list, regions_out: list) -> None:
    """Put ``region`` with ``pack_signs=True`` in its place, and give each reader ``(node,
    keyword, layer name)`` the bits as ``keyword``; the notes and the region's line name
    the layers."""
    graph = gm.graph
    with graph.inserting_after(region):
        packing = graph.call_function(region.target, region.args, {**region.kwargs, "pack_signs": True})
    set_val(packing, KEYS)
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack", "fqt_region_line"):
        if key in region.meta:
            packing.meta[key] = region.meta[key]
    items, before = [], packing
    for i, value in enumerate(packing.meta[KEYS[0]]):
        with graph.inserting_after(before):
            before = graph.call_function(operator.getitem, (packing, i))
        for key in KEYS:
            before.meta[key] = value
        items.append(before)
    region.replace_all_uses_with(items[0])
    writer = _region_name(region.args[_WEIGHT[region.target]])
    for node, keyword, _ in readers:
        node.kwargs = {**node.kwargs, keyword: tuple(items[1:])}
        note = f"; {'x_up' if keyword == 'x_up_bits' else 'x'} as the sign + STE bits {writer} wrote"
        node.meta["fqt_note"] = node.meta.get("fqt_note", f"binarized {_region_name(node.args[1])}") + note
    layers = ", ".join(dict.fromkeys(name for *_, name in readers))
    note = f"; writes the sign + STE bits of its output for {layers}"
    packing.meta["fqt_note"] = region.meta["fqt_note"] + note
    regions_out[region.meta["fqt_region_line"]] += note
    graph.erase_node(region)


# where each region call takes its normalization's (or linear layer's) weight, named after the module
_WEIGHT = {batch_norm_region: 3, binary_conv2d_region: 9, conv2d_region: 9, layer_norm_region: 1,
           rms_norm_region: 1, binary_linear_region: 1, binary_gated_linear_region: 1}

# Row regions whose output the binarized linear layers reading it take as packed bits.
_ROW_REGIONS = (layer_norm_region, rms_norm_region, binary_linear_region, binary_gated_linear_region)
# Whether row regions write those bits (the comparison with the layers packing their input
# themselves, in tests and benchmarks, switches it off).
PACK_ROW_REGIONS = True


def _identity_dropout(node: fx.Node, source: fx.Node) -> bool:
    """Whether ``node`` is ``F.dropout(source)`` that returns its input (``p == 0`` or not
    training: ``fuse_dropout`` leaves those as captured), as timm's ``Mlp`` has between its
    activation and ``fc2``."""
    a = _dropout_arguments(node) if node.op == "call_function" and node.target is F.dropout else None
    return a is not None and a["input"] is source and a["inplace"] is False and _is_identity(a)


def _linear_readers(region: fx.Node) -> list:
    """``(node, keyword, layer name)`` of each binarized linear layer reading ``region``'s
    output as its input, directly or through an identity dropout (``_identity_dropout``): a
    ``library.binarized_linear`` call (``x``), a linear region's layer (``x``) or either
    layer of a gated one (``x``, ``x_up``)."""
    readers = []
    sources = [region, *(u for u in region.users if _identity_dropout(u, region))]
    for source in sources:
        for user in source.users:
            if user.target is library.binarized_linear:
                a = _bind(library.binarized_linear, user)
                if a is not None and a["x"] is source and a["x_bits"] is None:
                    readers.append((user, "x_bits", _region_name(a["weight"])))
            elif user.target in (binary_linear_region, binary_gated_linear_region) and user.args[0] is source:
                readers.append((user, "x_bits", _region_name(user.args[1])))
            if user.target is binary_gated_linear_region and user.args[3] is source:
                readers.append((user, "x_up_bits", _region_name(user.args[4])))
    return readers


def _pack_for_binarized_linears(gm: fx.GraphModule, region: fx.Node, regions_out: list) -> bool:
    """Have a row region write its output's sign and STE bits (row by row, as a binarized
    linear layer packs its input) for the binarized linear layers reading that output, and
    those read them."""
    out = _val(region)
    readers = _linear_readers(region)
    if not readers or out is None or out.dtype != torch.float32:
        return False
    _write_bits(gm, region, readers, regions_out)
    return True


def _normalizes_last_dim(x: fx.Node, shape) -> bool:
    """Whether a normalization of ``x`` over ``normalized_shape`` is one over the last
    dimension of a float32 tensor of two or more dimensions."""
    x = _val(x)
    shape = (shape,) if isinstance(shape, int) else shape
    return (x is not None and x.dim() >= 2 and x.dtype == torch.float32 and isinstance(shape, (tuple, list))
            and len(shape) == 1 and isinstance(shape[0], int) and statically_known_true(x.shape[-1] == shape[0]))


def _fuse_layer_norm(gm: fx.GraphModule, ln: fx.Node, regions_out: list) -> bool:
    a = _bind(F.layer_norm, ln)
    if a is None:
        return False
    if not _normalizes_last_dim(a["input"], a["normalized_shape"]):
        return False
    if not isinstance(a["weight"], fx.Node) or not isinstance(a["bias"], fx.Node) \
            or not isinstance(a["eps"], float):
        return False
    chain, activation, params = [ln], "none", ()
    found = _activation(_only_user(ln), ln)
    if found is not None:
        activation, params = found
        chain.append(_only_user(ln))
    name = _region_name(a["weight"])
    _replace(gm, chain, layer_norm_region,
             (a["input"], a["weight"], a["bias"], a["eps"], activation, list(params), name),
             f"{name} (row)", regions_out)
    return True


def _raw_linear(node) -> dict | None:
    """The bound arguments of a ``binarized_linear`` whose raw GEMM result a region can take:
    default alpha, a float32 input."""
    a = _bind(library.binarized_linear, node) if isinstance(node, fx.Node) and node.op == "call_function" \
        and node.target is library.binarized_linear else None
    if a is None or a["alpha"] is not None or _val(a["x"]) is None or _val(a["x"]).dtype != torch.float32:
        return None
    return a


def _gate_product(mul: fx.Node | None, act: fx.Node):
    """``(up node, its bound arguments)`` when ``mul`` is ``act * up`` (either order) of a
    second binarized linear layer's output of the same shape that only the product reads."""
    if mul is None or mul.op != "call_function" or mul.target not in (operator.mul, torch.mul) \
            or len(mul.args) != 2 or mul.kwargs or mul.args.count(act) != 1:
        return None
    up = mul.args[1] if mul.args[0] is act else mul.args[0]
    a = _raw_linear(up)
    if a is None or len(up.users) != 1 or not statically_known_true(sym_eq(_val(up).shape, _val(act).shape)):
        return None
    return up, a


def _raw_note(layers: str, contraction: int) -> str:
    return (f"; input: {layers} raw GEMM result, saved as "
            f"{str(raw_dtype(contraction)).removeprefix('torch.')} (K={contraction})")


def _fuse_linear_activation(gm: fx.GraphModule, linear: fx.Node, regions_out: list) -> bool:
    a = _raw_linear(linear)
    found = _activation(_only_user(linear), linear) if a is not None else None
    if found is None:
        return False
    (activation, params), act = found, _only_user(linear)
    name = _region_name(a["weight"])
    contraction = _val(a["weight"]).shape[1]
    gated = _gate_product(_only_user(act), act)
    if gated is not None:
        (up, u), mul = gated, _only_user(act)
        contraction = max(contraction, _val(u["weight"]).shape[1])
        note = (f"; times {_region_name(u['weight'])}"
                + _raw_note(f"layers {a['layer']} and {u['layer']}'s", contraction).replace("result", "results"))
        _replace(gm, [linear, act, up, mul], binary_gated_linear_region,
                 (a["x"], a["weight"], a["bias"], u["x"], u["weight"], u["bias"], a["rng_state"], a["layer"],
                  u["layer"], activation, list(params), name), f"{name} (gated linear)", regions_out, note)
        return True
    _replace(gm, [linear, act], binary_linear_region,
             (a["x"], a["weight"], a["bias"], a["rng_state"], a["layer"], activation, list(params), name),
             f"{name} (linear)", regions_out, _raw_note(f"layer {a['layer']}'s", contraction))
    return True


def _is_method_or_function(node, method: str, functions) -> bool:
    return isinstance(node, fx.Node) and ((node.op == "call_method" and node.target == method)
                                          or (node.op == "call_function" and node.target in functions))


def _last_dim(dim, ndim) -> bool:
    dim = dim[0] if isinstance(dim, (tuple, list)) and len(dim) == 1 else dim
    return isinstance(dim, int) and dim in (-1, ndim - 1)


def _mean_square(node) -> fx.Node | None:
    """``h`` of ``mean(h ** 2, -1, keepdim=True)`` (method or function calls; the square and
    the mean with one user each), else None."""
    if not _is_method_or_function(node, "mean", (torch.mean,)) or len(node.users) != 1:
        return None
    args = list(node.args) + [None] * 3
    square, dim, keepdim = args[0], node.kwargs.get("dim", args[1]), node.kwargs.get("keepdim", args[2])
    if not _is_method_or_function(square, "pow", (torch.pow, operator.pow)) or len(square.users) != 1 \
            or len(square.args) != 2 or square.kwargs or square.args[1] not in (2, 2.0):
        return None
    h = square.args[0]
    x = _val(h)
    if x is None or x.dtype != torch.float32 or x.dim() < 2 or keepdim is not True or not _last_dim(dim, x.dim()):
        return None
    return h


def _other(node: fx.Node | None, one: fx.Node, ops=(operator.mul, torch.mul)):
    """The other operand of a binary ``node`` (``ops``, either order) whose one operand is ``one``."""
    if node is None or node.op != "call_function" or node.target not in ops or len(node.args) != 2 \
            or node.kwargs or node.args.count(one) != 1:
        return None
    return node.args[1] if node.args[0] is one else node.args[0]


def _noop_to(node: fx.Node | None, source: fx.Node) -> bool:
    """Whether ``node`` is ``source.to(...)`` to float32 that changes nothing (float32 in)."""
    return (node is not None and node.op == "call_method" and node.target == "to" and node.args[:1] == (source,)
            and _val(node) is not None and _val(node).dtype == torch.float32
            and _val(source).dtype == torch.float32 and _val(node).device == _val(source).device)


def _fuse_rms_chain(gm: fx.GraphModule, rsqrt: fx.Node, regions_out: list) -> bool:
    """``weight * (h * rsqrt(mean(h ** 2, -1, keepdim=True) + eps))`` as ``transformers``'
    LlamaRMSNorm writes it (a float32 ``.to`` around the normalized value allowed)."""
    add = rsqrt.args[0] if len(rsqrt.args) == 1 and not rsqrt.kwargs else None
    if not isinstance(add, fx.Node) or len(add.users) != 1 or len(rsqrt.users) != 1:
        return False
    eps = next((e for e in add.args if isinstance(e, float)), None) if add.target is operator.add else None
    mean = next((m for m in add.args if isinstance(m, fx.Node)), None)
    if eps is None or len(add.args) != 2 or add.kwargs or (h := _mean_square(mean)) is None:
        return False
    normalized = _only_user(rsqrt)
    if _other(normalized, rsqrt) is not h:
        return False
    chain = [mean.args[0], mean, add, rsqrt, normalized]
    if _noop_to(_only_user(normalized), normalized):
        chain.append(_only_user(normalized))
    scaled = _only_user(chain[-1])
    weight = _other(scaled, chain[-1])
    if not isinstance(weight, fx.Node) or _val(weight) is None or _val(weight).dtype != torch.float32 \
            or not statically_known_true(sym_eq(_val(weight).shape, _val(h).shape[-1:])):
        return False
    chain.append(scaled)
    return _fuse_rms(gm, chain, h, weight, eps, regions_out)


def _fuse_rms_call(gm: fx.GraphModule, node: fx.Node, regions_out: list) -> bool:
    """``torch.rms_norm(x, normalized_shape, weight, eps)`` (``nn.RMSNorm``) over the last
    dimension with a weight."""
    a = _bind(F.rms_norm, node)
    if a is None or not _normalizes_last_dim(a["input"], a["normalized_shape"]):
        return False
    if not isinstance(a["weight"], fx.Node) or not isinstance(a["eps"], (float, type(None))):
        return False
    eps = torch.finfo(torch.float32).eps if a["eps"] is None else a["eps"]
    return _fuse_rms(gm, [node], a["input"], a["weight"], eps, regions_out)


def _fuse_rms(gm: fx.GraphModule, chain: list, x: fx.Node, weight: fx.Node, eps: float, regions_out: list) -> bool:
    activation, params = "none", ()
    found = _activation(_only_user(chain[-1]), chain[-1])
    if found is not None:
        activation, params = found
        chain.append(_only_user(chain[-1]))
    name = _region_name(weight)
    _replace(gm, chain, rms_norm_region, (x, weight, eps, activation, list(params), name), f"{name} (rms)",
             regions_out)
    return True


_FUSERS = {F.batch_norm: _fuse, F.layer_norm: _fuse_layer_norm, library.binarized_linear: _fuse_linear_activation,
           torch.rsqrt: _fuse_rms_chain, torch.rms_norm: _fuse_rms_call, F.rms_norm: _fuse_rms_call}


def fuse_regions(gm: fx.GraphModule, *, regions_out: list) -> PassResult:
    fused = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in _FUSERS:
            fused += _FUSERS[node.target](gm, node, regions_out)
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in _BN_REGIONS:
            _pack_for_binarized_convs(gm, node, regions_out)
        elif node.op == "call_function" and node.target in _ROW_REGIONS and PACK_ROW_REGIONS:
            _pack_for_binarized_linears(gm, node, regions_out)
    if fused:
        gm.recompile()
    return PassResult(gm, bool(fused))
