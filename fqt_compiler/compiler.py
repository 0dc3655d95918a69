"""``fqt.compile``: Dynamo capture -> capture passes -> AOTAutograd -> forward/backward passes.

``FQTModule`` wraps the unmodified model (its parameters are the model's) and a
``torch.compile`` of it whose backend is ``FQTModule._backend``. Each Dynamo graph (one per
input shape, train/eval mode and grad mode; ``fullgraph=True``, static shapes) becomes a
``CompiledGraph`` that keeps its plan, its per-pass records and its final ATen graphs.

RNG step: every call appends a fresh int64 tensor ``[seed, step]`` to the graph inputs
(placeholder ``fqt.rng_state``); each fqt forward op saves it for the backward quantizers.
``step`` advances after each call made in training mode with grad enabled, so the graphs
are never recompiled for it.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.fx as fx
import torch.nn as nn
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

from .config import Config, candidate_layers, resolve_plan
from .ops import reference
from .passes import (PassManager, annotate_fqt_nodes, annotate_layers, apply_plan,
                     bind_implementations, fuse_gradient_quantizers, insert_gradient_quantizers,
                     name_placeholders, rewrite_binary_layers)
from .runtime import lowered  # noqa: F401  (registers the "kernels" backend's implementations)


RECOMPILE_LIMIT = 256


@dataclass
class CompiledGraph:
    """One Dynamo graph's compilation: plan, pass records and final forward/backward graphs."""

    training: bool
    plan: list = field(default_factory=list)
    records: list = field(default_factory=list)
    names: dict = field(default_factory=dict)
    extras: list = field(default_factory=list)
    ran: dict = field(default_factory=dict)
    forward: fx.GraphModule | None = None
    backward: fx.GraphModule | None = None


class FQTModule(nn.Module):
    """The compiled model. Call it like the model; ``fqt.dump``/``fqt.summary`` inspect it."""

    def __init__(self, model: nn.Module, config: Config):
        super().__init__()
        self.module = model
        self.fqt_config = config
        self.fqt_step = 0
        self.fqt_graphs: list[CompiledGraph] = []
        self.fqt_last: CompiledGraph | None = None   # the graph the last call ran
        # Not a submodule: the OptimizedModule would list the model's parameters twice.
        object.__setattr__(self, "_compiled", torch.compile(
            model, backend=self._backend, fullgraph=True, dynamic=False))

    def forward(self, *args, **kwargs):
        # Dynamo's recompile limit counts graphs per code object across all instances; each
        # fqt.compile of the same model class adds its own (own backend), so lift it here.
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            out = self._compiled(*args, **kwargs)
        if self.training and torch.is_grad_enabled():
            self.fqt_step += 1
        return out

    def _extra_inputs(self, extras: list) -> list:
        return [torch.tensor([self.fqt_config.seed, self.fqt_step], dtype=torch.int64)
                if kind == "rng_state" else value for kind, value in extras]

    def _backend(self, gm: fx.GraphModule, example_inputs):
        cg = CompiledGraph(training=self.module.training)
        self.fqt_graphs.append(cg)
        model, config = self.module, self.fqt_config
        # Dynamo still reads its graph after the backend returns, and AOTAutograd expects a
        # graph marked as Dynamo's to have only Dynamo's placeholders: rewrite a copy.
        gm = fx.GraphModule(gm, copy.deepcopy(gm.graph))
        gm = PassManager("capture", [
            partial(annotate_layers, model=model, example_inputs=example_inputs),
            partial(apply_plan, model=model, config=config, plan_out=cg.plan),
            partial(rewrite_binary_layers, model=model, extras_out=cg.extras),
        ], cg.records)(gm)
        input_names = [n.meta["fqt_name"] for n in gm.graph.nodes if n.op == "placeholder"]

        def fw_compiler(fgm, _inputs):
            cg.forward = PassManager("forward", [
                partial(name_placeholders, input_names=input_names, names=cg.names, plan=cg.plan),
                partial(annotate_fqt_nodes, plan=cg.plan),
                partial(bind_implementations, backend=config.backend, ran=cg.ran, plan=cg.plan,
                        target=config.target),
            ], cg.records, cg.names)(fgm)
            return make_boxed_func(cg.forward.forward)

        def bw_compiler(bgm, _inputs):
            cg.backward = PassManager("backward", [
                partial(name_placeholders, input_names=None, names=cg.names, plan=cg.plan),
                partial(insert_gradient_quantizers, plan=cg.plan),
                *([fuse_gradient_quantizers] if config.backend == "kernels" else []),
                partial(annotate_fqt_nodes, plan=cg.plan),
                partial(bind_implementations, backend=config.backend, ran=cg.ran, plan=cg.plan,
                        target=config.target),
            ], cg.records, cg.names)(bgm)
            return make_boxed_func(cg.backward.forward)

        compiled = aot_autograd(fw_compiler=fw_compiler, bw_compiler=bw_compiler)(
            gm, list(example_inputs) + [value for _, value in cg.extras])

        def run(*args):
            self.fqt_last = cg
            return compiled(*args, *self._extra_inputs(cg.extras))

        return run


def compile(model: nn.Module, config: Config | None = None) -> FQTModule:
    """Compile ``model`` for 1-bit FQT (SPEC §8). Layers with ``alpha="learned"`` get a new
    parameter ``fqt_alpha`` (initialised to mean |w|), so build the optimizer afterwards."""
    config = config or Config()
    names = [n for n, _ in candidate_layers(model)]
    for layer in resolve_plan(model, config, names):  # validates the rules
        module = model.get_submodule(layer.name)
        if layer.alpha == "learned" and getattr(module, "groups", 1) == 1 \
                and not hasattr(module, "fqt_alpha"):
            module.register_parameter(
                "fqt_alpha", nn.Parameter(reference.default_alpha(module.weight).clone()))
    return FQTModule(model, config)
