"""Record exactly the kernels one training step requests, for a target CPU.

``record_kernels`` runs one compiled training step on this machine with the model compiled
for the *target* (``Config(target=...)``), so every runtime wrapper picks the target's tile,
vector width and blocking; the ``jit.kernel`` hook records each request (family, options,
layer, the integer and float arguments of its first call per layer) and, when the target
cannot run here, runs the same family and options compiled for the host in its place.
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field

import torch

from ..codegen.targets import Target, get_target, host_target, runs_on_host
from ..compiler import FQTModule, compile
from ..config import Config
from ..runtime import jit
from ..runtime import kernel_stats as stats


@dataclass
class KernelUse:
    """One kernel a step requested: its spec for the target and where it was used."""

    spec: jit.KernelSpec
    layers: list = field(default_factory=list)
    calls: dict = field(default_factory=dict)       # layer -> {parameter name: value} of the first call

    @property
    def symbol(self) -> str:
        """Unique exported name: specializations of one family share the generator's symbol."""
        return f"{self.spec.symbol}_{hashlib.sha256(self.spec.ir_text.encode()).hexdigest()[:10]}"

    @property
    def prototype(self) -> str:
        """The C declaration under the unique symbol, from the kernel's ABI."""
        return self.spec.abi.c_prototype(self.symbol)

    @property
    def options(self) -> str:
        return ", ".join(f"{name}={value}" for name, value in self.spec.options)


def stand_in(spec: jit.KernelSpec, load):
    """The callable for ``spec``: itself where it runs here, else the host build of the same
    family and options (the computation a kernel performs does not depend on its target)."""
    return load(spec if runs_on_host(spec.target) else spec.for_target(host_target()))


def compile_for(model_or_compiled, target: Target) -> FQTModule:
    """An ``FQTModule`` of the model whose kernels are requested for ``target``."""
    if isinstance(model_or_compiled, FQTModule):
        config = dataclasses.replace(model_or_compiled.fqt_config, target=target.name)
        return compile(model_or_compiled.module, config)
    return compile(model_or_compiled, Config(target=target.name))


def training_step(compiled, example_inputs) -> None:
    compiled.train()
    out = compiled(*example_inputs)
    out.float().sum().backward()


def record_kernels(model_or_compiled, example_inputs, target) -> list[KernelUse]:
    """Every kernel one training step of the model on ``example_inputs`` requests for ``target``."""
    target = get_target(target)
    compiled = compile_for(model_or_compiled, target)
    uses: dict[jit.KernelSpec, KernelUse] = {}

    def hook(spec, load):
        fn = stand_in(spec, load)
        layer = stats.current_layer.get() or "?"
        use = uses.setdefault(spec, KernelUse(spec))
        if layer not in use.layers:
            use.layers.append(layer)
        if layer in use.calls:
            return fn

        def first_call(*args):
            use.calls.setdefault(layer, {p.name: a for p, a in zip(spec.abi.params, args)
                                         if p.kind in ("i64", "f32")})
            return fn(*args)
        return first_call

    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    with jit.kernel_hook(hook), torch.random.fork_rng():
        training_step(compiled, example_inputs)
    return list(uses.values())
