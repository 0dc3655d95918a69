"""``fqt.compile``: Dynamo capture -> capture passes -> AOTAutograd -> forward/backward passes.

``FQTModule`` wraps the unmodified model (its parameters are the model's) and a
``torch.compile`` of it whose backend is ``FQTModule._backend``. Each Dynamo graph (one per
train/eval mode, grad mode and input shape and, where Dynamo cannot trace the forward whole,
one per region between graph breaks) becomes a ``CompiledGraph`` that keeps its plan, its
per-pass records and its final ATen graphs. ``print`` and ``logging.Logger`` calls
(including methods libraries add to it, such as transformers' ``warning_once``) do not
break the graph where Dynamo can move them after it (``reorderable_logging_functions``:
called without keywords, on tensors, constants or format strings); they still run, after the
region.

Shapes (``Config.dynamic``): ``False`` compiles a static graph per input shape; ``"auto"``
(Dynamo's automatic dynamic shapes) compiles the first shape statically and, when a size
changes, one graph in which the sizes that changed are symbolic (SymInts through the capture
passes, AOTAutograd, the fqt ops' fake implementations and the backward passes), which then
serves every size; ``True`` makes every input size symbolic from the first call. Weights,
channels and kernel sizes stay static. Dynamo specializes sizes 0 and 1, so a batch of 1
gets a static graph of its own. The kernels take M, N and K at run time and pick their tile
and variant per call, so a dynamic graph needs no kernel per size; the quantizer
draws are keyed by element index, not by a compile-time size, so they match a static
compile's draw for draw. ``CompiledGraph.dynamic`` names each input's symbolic dimensions.

The graph breaks Dynamo reported are kept in ``FQTModule.fqt_graph_breaks``, and the regions
the last call ran in ``FQTModule.fqt_last_call`` (what ``fqt.summary`` and ``fqt.dump``
describe). Because a region cannot know whether a later one holds more layers, the first
call runs the model eagerly once (no grad, buffers and RNG state restored) to learn the
order the whole forward calls its layers (GEMM weights): the first and last layer exclusions
(docs/math.md §2) are those of the whole forward, not of one region.

Inputs: floating-point tensors must be float32 (the binarized layers and the kernels compute
in float32; a float64/float16/bfloat16 input is refused with a TypeError naming the argument,
not cast, so no precision changes silently); any memory layout (non-contiguous,
channels_last) is accepted; an empty batch is refused with a ValueError. The model's floating
parameters must be float32 (``fqt.compile`` refuses others).

RNG step: every call appends a fresh int64 tensor ``[seed, step]`` to the graph inputs
(placeholder ``fqt.rng_state``); each fqt forward op saves it for the backward quantizers.
``step`` advances after each call made in training mode with grad enabled, so the graphs
are never recompiled for it. Under ``torch.distributed`` the seed is
``rng.rank_seed(seed, rank)``, so each data-parallel rank draws its own stream.
"""
from __future__ import annotations

import copy
import logging
import re
import time
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.fx as fx
import torch.nn as nn
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd
from torch.overrides import TorchFunctionMode

from . import events
from .config import Config, candidate_layers, layer_name, parameter_names, resolve_plan
from .ops import reference, rng
from .passes import (PassManager, is_symbolic, annotate_fqt_nodes, annotate_layers, apply_plan,
                     bind_implementations, fold_alpha, fuse_dropout, fuse_gradient_quantizers,
                     fuse_regions, insert_gradient_quantizers, merge_gradient_paths,
                     name_placeholders, rewrite_binary_layers)
from .passes.annotate_layers import linear_call
from .runtime import dropout, fusion, lowered  # noqa: F401  (register the "kernels" backend's implementations)


RECOMPILE_LIMIT = 256
log = logging.getLogger(__name__)


@dataclass
class CompiledGraph:
    """One Dynamo graph's compilation: plan, pass records and final forward/backward graphs."""

    training: bool
    plan: list = field(default_factory=list)
    records: list = field(default_factory=list)
    names: dict = field(default_factory=dict)
    extras: list = field(default_factory=list)
    regions: list = field(default_factory=list)   # fused regions, as fuse_regions describes them
    float_ops: list = field(default_factory=list)   # (module path, op, reason) kept float
    ran: dict = field(default_factory=dict)
    forward: fx.GraphModule | None = None
    backward: fx.GraphModule | None = None
    dynamic: dict = field(default_factory=dict)   # input name -> its symbolic dims {dim: symbol}
    registered: bool = False


class FQTModule(nn.Module):
    """The compiled model. Call it like the model; ``fqt.dump``/``fqt.summary`` inspect it."""

    def __init__(self, model: nn.Module, config: Config):
        super().__init__()
        self.module = model
        self.fqt_config = config
        self.fqt_step = 0
        self.fqt_graphs: list[CompiledGraph] = []
        self.fqt_last: CompiledGraph | None = None   # the graph the last call ran
        self.fqt_last_call: list[CompiledGraph] = []   # every region the last call ran, in order
        self._running: list[CompiledGraph] = []
        self.fqt_graph_breaks: list[str] = []          # Dynamo's reasons, in order seen
        self.fqt_call_order: list[str] | None = None   # layers as the forward calls them
        # Not a submodule: the OptimizedModule would list the model's parameters twice.
        # fullgraph=False: a model Dynamo cannot trace whole still compiles, region by region.
        object.__setattr__(self, "_compiled", torch.compile(
            model, backend=self._backend, fullgraph=False,
            dynamic=None if config.dynamic == "auto" else config.dynamic))

    def forward(self, *args, **kwargs):
        _check_inputs(args, kwargs)
        if self.fqt_call_order is None:
            order = _eager_call_order(self.module, args, kwargs)
            # Now the layers are known: a rule that selects none of them raises here, as a
            # ValueError, not wrapped in Dynamo's error from inside the backend.
            resolve_plan(self.module, self.fqt_config, order)
            self.fqt_call_order = order
        breaks = _graph_break_reasons()
        self._running = []
        # Dynamo's recompile limit counts graphs per code object across all instances; each
        # fqt.compile of the same model class adds its own (own backend), so lift it here.
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT,
                                        reorderable_logging_functions=_logging_functions()):
            out = self._compiled(*args, **kwargs)
        for reason, count in _graph_break_reasons().items():
            if count > breaks.get(reason, 0):
                self.fqt_graph_breaks.append(_short_reason(reason))
                log.warning("graph break in %s (the parts before and after it compile as "
                            "separate graphs): %s", type(self.module).__name__, reason)
        self.fqt_last_call = self._running
        if self.training and torch.is_grad_enabled():
            self.fqt_step += 1
        return out

    def _extra_inputs(self, extras: list) -> list:
        seed = self.fqt_config.seed
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            seed = rng.rank_seed(seed, torch.distributed.get_rank())
        return [torch.tensor([seed, self.fqt_step], dtype=torch.int64)
                if kind == "rng_state" else value for kind, value in extras]

    def _backend(self, gm: fx.GraphModule, example_inputs):
        start = time.perf_counter()
        cg = CompiledGraph(training=self.module.training)
        model, config = self.module, self.fqt_config
        # Dynamo still reads its graph after the backend returns, and AOTAutograd expects a
        # graph marked as Dynamo's to have only Dynamo's placeholders: rewrite a copy.
        gm = fx.GraphModule(gm, copy.deepcopy(gm.graph))
        # Rewrites that only pay with kernels; the reference backend runs the graphs as derived.
        kernels = config.backend == "kernels"
        gm = PassManager("capture", [
            partial(annotate_layers, model=model, example_inputs=example_inputs,
                    float_out=cg.float_ops),
            partial(apply_plan, model=model, config=config, plan_out=cg.plan,
                    model_order=self.fqt_call_order),
            partial(rewrite_binary_layers, model=model, extras_out=cg.extras),
            # Both backends, so both draw the same masks (the summary's region lines are kernels').
            partial(fuse_dropout, regions_out=cg.regions if kernels else [], float_out=cg.float_ops,
                    extras_out=cg.extras),
            *([partial(fuse_regions, regions_out=cg.regions)] if kernels else []),
        ], cg.records)(gm)
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        input_names = [n.meta["fqt_name"] for n in placeholders]
        cg.dynamic = _dynamic_dims(placeholders)
        layers = {layer.index: layer for layer in cg.plan}   # what the ops' `layer` argument names

        forward_kernel_passes = [fold_alpha] if kernels else []
        backward_kernel_passes = [fuse_gradient_quantizers, fold_alpha, merge_gradient_paths] if kernels else []

        def fw_compiler(fgm, _inputs):
            cg.forward = PassManager("forward", [
                partial(name_placeholders, input_names=input_names, names=cg.names, plan=layers),
                *forward_kernel_passes,
                partial(annotate_fqt_nodes, plan=layers),
                partial(bind_implementations, backend=config.backend, ran=cg.ran, plan=layers,
                        target=config.target),
            ], cg.records, cg.names)(fgm)
            return make_boxed_func(cg.forward.forward)

        def bw_compiler(bgm, _inputs):
            cg.backward = PassManager("backward", [
                partial(name_placeholders, input_names=None, names=cg.names, plan=layers),
                partial(insert_gradient_quantizers, plan=layers),
                *backward_kernel_passes,
                partial(annotate_fqt_nodes, plan=layers),
                partial(bind_implementations, backend=config.backend, ran=cg.ran, plan=layers,
                        target=config.target, check_finite=config.check_finite),
            ], cg.records, cg.names)(bgm)
            if cg.registered:   # else (a dynamic graph compiles its backward at once) at its first run
                events.emit("backward_compiled", module=self, graph=cg)
            return make_boxed_func(cg.backward.forward)

        # The extras' placeholders hold static fakes: given the real tensors, AOTAutograd
        # would make their sizes symbolic in a dynamic graph.
        extras = [n.meta["val"] for n in placeholders[len(example_inputs):]]
        compiled = aot_autograd(fw_compiler=fw_compiler, bw_compiler=bw_compiler)(
            gm, list(example_inputs) + extras)
        seconds = time.perf_counter() - start

        def run(*args):
            # Registered when it first runs: Dynamo may discard a graph its backend compiled
            # and trace the frame again (e.g. to specialize a float it had made symbolic).
            if not cg.registered:
                cg.registered = True
                self.fqt_graphs.append(cg)
                events.emit("graph_compiled", module=self, graph=cg, seconds=seconds)
                if cg.backward is not None:
                    events.emit("backward_compiled", module=self, graph=cg)
            self.fqt_last = cg
            if not any(ran is cg for ran in self._running):
                self._running.append(cg)
            return compiled(*args, *self._extra_inputs(cg.extras))

        return run


def _dynamic_dims(placeholders) -> dict[str, dict[int, str]]:
    """The symbolic dimensions of a captured graph's tensor inputs: ``{name: {dim: symbol}}``,
    named by the forward's argument (``x``, ``input_ids``) where Dynamo recorded it."""
    dims = {}
    for node in placeholders:
        val = node.meta.get("example_value", node.meta.get("val"))
        if isinstance(val, torch.Tensor):
            symbolic = {d: str(s) for d, s in enumerate(val.shape) if is_symbolic(s)}
            if symbolic:
                source = getattr(node.meta.get("grapharg"), "source", None)
                # L['x'], or L['kwargs']['input_ids'] under a decorator taking **kwargs
                argument = re.search(r"\['(\w+)'\]$", source.name) if source else None
                dims[argument.group(1) if argument else node.meta["fqt_name"]] = symbolic
    return dims


def _tensors(args, kwargs):
    leaves = torch.utils._pytree.tree_leaves((args, kwargs))
    names = [f"argument {i}" for i in range(len(args))] + [f"argument {k!r}" for k in kwargs]
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, torch.Tensor):
            yield (names[i] if len(leaves) == len(names) else f"input tensor {i}"), leaf


def _check_inputs(args, kwargs) -> None:
    """Refuse what the compiled graphs cannot take before anything runs (nothing changes)."""
    for name, t in _tensors(args, kwargs):
        if t.is_floating_point() and t.dtype != torch.float32:
            raise TypeError(f"fqt: {name} has dtype {t.dtype}; fqt trains in float32 (the "
                            f"binarized layers and their kernels compute in float32): pass "
                            f"x.float(), or use autocast outside fqt only for float layers")
        if t.dim() > 0 and t.shape[0] == 0:
            raise ValueError(f"fqt: {name} is an empty batch (shape {tuple(t.shape)}); the "
                             f"quantizers need at least one sample: skip empty batches")


class _LayerCalls(TorchFunctionMode):
    """Records the layers (``annotate_layers.linear_call`` forms whose weight is one of
    ``layers``' parameters) in the order an eager forward calls them."""

    def __init__(self, layers: dict[int, str]):
        super().__init__()
        self.layers, self.order = layers, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        call = linear_call(func, args, kwargs)
        if call is not None and id(call["weight"]) in self.layers:
            self.order.append(self.layers[id(call["weight"])])
        return func(*args, **kwargs)


def _eager_call_order(model: nn.Module, args, kwargs) -> list[str]:
    """The layers in the order one eager forward calls them. Runs without grad and restores
    the buffers (BatchNorm statistics) and the global RNG state it touched."""
    recorder = _LayerCalls({key: layer_name(n) for key, n in parameter_names(model).items()})
    buffers = [(b, b.clone()) for b in model.buffers()]
    rng_state = torch.get_rng_state()
    try:
        with torch.no_grad(), recorder:
            model(*args, **kwargs)
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        torch.set_rng_state(rng_state)
    return list(dict.fromkeys(recorder.order))


LOGGER_METHODS = ("debug", "info", "warning", "warn", "error", "critical",
                  "warning_once", "info_once")   # the last two: added by transformers


def _logging_functions() -> set:
    """``print`` and the ``logging.Logger`` methods defined now (libraries add some on
    import): side effects that would split the graph, and that Dynamo may run after it."""
    methods = (getattr(logging.Logger, name, None) for name in LOGGER_METHODS)
    return {print, *(m for m in methods if m is not None)}


def _short_reason(reason: str) -> str:
    """Dynamo's headline and its explanation (which names the culprit), on one line."""
    lines = [line.strip() for line in reason.strip().splitlines() if line.strip()]
    explanation = next((line.removeprefix("Explanation:").strip() for line in lines
                        if line.startswith("Explanation:")), "")
    return f"{lines[0]}: {explanation}" if explanation else lines[0]


def _graph_break_reasons() -> dict[str, int]:
    """Dynamo's global count of graph breaks per reason (diffed around a call)."""
    from torch._dynamo.utils import counters
    return dict(counters["graph_break"])


def compile(model: nn.Module, config: Config | None = None) -> FQTModule:
    """Compile ``model`` for 1-bit FQT (docs/math.md §8). Layers with ``alpha="learned"`` get a new
    parameter ``fqt_alpha`` (initialised to mean |w|), so build the optimizer afterwards."""
    config = config or Config()
    if not isinstance(model, nn.Module):
        raise TypeError(f"fqt.compile expects an nn.Module, got {type(model).__name__}")
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if p.is_floating_point() and p.dtype != torch.float32:
            raise TypeError(f"fqt.compile: {name} is {p.dtype}; fqt trains float32 models "
                            f"(binarized layers keep float32 latent weights): call "
                            f"model.float() first")
    candidates = candidate_layers(model)
    # Validates the rules against every parameter that may be a GEMM weight (the graph tells
    # which are); only LAYER_TYPES modules' weights can get a learned alpha this early.
    for layer, (_, module, kind) in zip(resolve_plan(model, config, [c.name for c in candidates]),
                                        candidates):
        if kind and layer.alpha == "learned" and getattr(module, "groups", 1) == 1 \
                and not hasattr(module, "fqt_alpha"):
            module.register_parameter(
                "fqt_alpha", nn.Parameter(reference.default_alpha(module.weight).clone()))
    return FQTModule(model, config)
