"""Pass infrastructure: PassResult, a small PassManager, the lint run between passes, and
the readable graph text that dumps are made of.

Modelled on ``torch/fx/passes/infra/pass_manager.py``: a pass is ``GraphModule ->
PassResult``; the manager runs a list of them, lints after each one and names the failing
pass and the ones before it, and, when the failure is tied to a node (``at_node``), the
model's source lines that produced that node. Like TVM's ``DumpIR`` instrument, it records
each pass's output as text (``records``) without the passes knowing.
"""
from __future__ import annotations

import contextlib
import math
import operator
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx.experimental.symbolic_shapes import is_concrete_int


@dataclass
class PassResult:
    graph_module: fx.GraphModule
    modified: bool


Pass = Callable[[fx.GraphModule], PassResult]


def pass_name(p: Pass) -> str:
    return getattr(p, "__name__", None) or getattr(p.func, "__name__", repr(p))


@dataclass
class PassRecord:
    stage: str
    name: str
    text: str
    seconds: float


@dataclass
class PassManager:
    """Runs ``passes`` over a GraphModule of ``stage``; ``records`` receives one PassRecord
    per pass (the graph text after it) when given."""

    stage: str
    passes: list
    records: list | None = None
    names: dict = field(default_factory=dict)   # node name -> display name, for the text

    def __call__(self, gm: fx.GraphModule) -> fx.GraphModule:
        done = []
        for p in self.passes:
            name = pass_name(p)
            start = time.perf_counter()
            try:
                gm = p(gm).graph_module
                lint(gm)
            except Exception as e:
                before = ", ".join(done) or "none"
                raise RuntimeError(f"fqt {self.stage} pass {name!r} failed (passes run before "
                                   f"it: {before}): {e}{_origin(getattr(e, 'fqt_node', None))}"
                                   ) from e
            done.append(name)
            if self.records is not None:
                self.records.append(PassRecord(self.stage, name, graph_text(gm, self.names),
                                               time.perf_counter() - start))
        return gm


@contextlib.contextmanager
def at_node(node: fx.Node):
    """Tie an exception raised while a pass handles ``node`` to it, so the PassManager's
    error names the model code the node came from."""
    try:
        yield
    except Exception as e:
        if getattr(e, "fqt_node", None) is None:
            e.fqt_node = node
        raise


def _origin(node: fx.Node | None) -> str:
    """Where ``node`` came from: its name and target, and the model's source lines Dynamo
    recorded for it (``meta["stack_trace"]``, innermost call last)."""
    if node is None:
        return ""
    trace = (node.meta.get("stack_trace") or "").rstrip()
    where = (f"; the model's code (innermost call last):\n{trace}" if trace else
             "; Dynamo recorded no source line for it")
    return f"\n  at node {node.name} ({node.op} {target_name(node)}){where}"


def lint(gm: fx.GraphModule) -> None:
    """FX's structural lint plus the invariant every pass keeps: each node whose value is
    used has a fake-tensor ``meta["val"]`` (Dynamo graphs call it ``example_value``). A call
    kept only for its side effect (no users, e.g. torchvision's ``_log_api_usage_once``)
    may have none: Dynamo records no value for a call that returns None."""
    gm.graph.lint()
    for node in gm.graph.nodes:
        if node.op in ("output", "get_attr") or not node.users:
            continue
        if "val" not in node.meta and "example_value" not in node.meta:
            error = AssertionError(f"node {node.name} ({node.op} {target_name(node)}) is used "
                                   f"by {', '.join(u.name for u in node.users)} but has no "
                                   f"meta['val']")
            error.fqt_node = node
            raise error


def set_val(node: fx.Node, keys=("val",)) -> None:
    """Compute a new call node's ``meta["val"]`` by running its target on fake inputs."""
    def val(n):
        return n.meta["val"] if "val" in n.meta else n.meta["example_value"]

    args, kwargs = fx.node.map_arg((node.args, node.kwargs), val)
    with fake_mode_of(_flatten(args)):
        out = node.target(*args, **kwargs)
    for key in keys:
        node.meta[key] = out


def fake_mode_of(values):
    """The fake mode of the graph's own values (Dynamo's tracing context may hold another)."""
    for v in values:
        if isinstance(v, FakeTensor):
            return v.fake_mode
    raise AssertionError("no fake tensor among the node's inputs")


def _flatten(x):
    if isinstance(x, (list, tuple)):
        for item in x:
            yield from _flatten(item)
    else:
        yield x


def insert_call(graph: fx.Graph, target, args, keys=("val",)) -> fx.Node:
    """Create a call_function node at the graph's insertion point, with its meta["val"],
    and getitem nodes for each element if it returns a tuple (returned as a tuple)."""
    node = graph.call_function(target, tuple(args))
    set_val(node, keys)
    if not isinstance(node.meta[keys[0]], (tuple, list)):
        return node
    items = []
    for i, v in enumerate(node.meta[keys[0]]):
        item = graph.call_function(operator.getitem, (node, i))
        for key in keys:
            item.meta[key] = v
        items.append(item)
    return tuple(items)


def is_symbolic(size) -> bool:
    """A size that varies between calls of a dynamic graph (a SymInt not fixed by a guard)."""
    return isinstance(size, torch.SymInt) and not is_concrete_int(size)


def size_product(graph: fx.Graph, node: fx.Node, dims) -> int | fx.Node:
    """The product of ``node``'s sizes along ``dims`` as an argument for a new node: an int
    when static, else ``sym_size`` nodes and their product, read at run time (a symbolic
    size cannot be a constant of the graph: it would be wrong at the next shape)."""
    shape = node.meta["val"].shape
    total = math.prod(int(shape[d]) for d in dims if not is_symbolic(shape[d]))
    for d in (d for d in dims if is_symbolic(shape[d])):
        size = insert_call(graph, torch.ops.aten.sym_size.int, (node, d))
        if total != 1:
            product = graph.call_function(operator.mul, (total, size))
            product.meta["val"] = (total.meta["val"] if isinstance(total, fx.Node) else total) \
                * size.meta["val"]
            size = product
        total = size
    return total


# --------------------------------------------------------------------------- text

def _short(v) -> str:
    if isinstance(v, torch.Tensor):
        dtype = str(v.dtype).replace("torch.", "")
        return f"{dtype}[{','.join(str(s) for s in v.shape)}]"
    if isinstance(v, (tuple, list)):
        return "(" + ", ".join(_short(x) for x in v) + ")"
    return ""


def target_name(node: fx.Node) -> str:
    target = node.meta.get("fqt_op", node.target)
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._opname}"
    if isinstance(target, str):
        return target
    return getattr(target, "__qualname__", None) or getattr(target, "__name__", repr(target))


def graph_text(gm: fx.GraphModule, names: dict | None = None) -> str:
    """One line per node: ``%name : type = op(args)  # annotation``. Display names come from
    ``node.meta["fqt_name"]`` (parameter/buffer names) or ``names``; annotations from
    ``node.meta["fqt_note"]``."""
    names = names or {}

    def show(n: fx.Node) -> str:
        return "%" + n.meta.get("fqt_name", names.get(n.name, n.name))

    def arg(a) -> str:
        if isinstance(a, fx.Node):
            return show(a)
        if isinstance(a, (list, tuple)):
            inner = ", ".join(arg(x) for x in a)
            return f"[{inner}]" if isinstance(a, list) else f"({inner}{',' if len(a) == 1 else ''})"
        return repr(a)

    lines = []
    for n in gm.graph.nodes:
        val = n.meta.get("val", n.meta.get("example_value"))
        typ = f" : {_short(val)}" if _short(val) else ""
        if n.op == "placeholder":
            rhs = "placeholder"
        elif n.op == "output":
            lines.append(f"return {arg(n.args[0])}")
            continue
        else:
            args = ", ".join([arg(a) for a in n.args] + [f"{k}={arg(v)}" for k, v in n.kwargs.items()])
            rhs = f"{target_name(n)}({args})"
        note = n.meta.get("fqt_note")
        lines.append(f"{show(n)}{typ} = {rhs}" + (f"  # {note}" if note else ""))
    return "\n".join(lines) + "\n"
