"""Config, per-layer rules and the resolved plan (which layers are binarized, and why).

Options are registered fields: a misspelt key is an error that names it and suggests the
closest valid one, as TVM's PassContext does for its config keys.

A layer is a GEMM weight: a parameter the forward passes as the weight of a linear-like call
(``annotate_layers`` recognises them in the traced graph: ``F.linear``, ``addmm`` with the
weight transposed as in transformers' GPT-2 ``Conv1D``, ``conv1d``, ``conv2d``), whatever
module owns it. It is named by its module when the parameter is the module's ``weight``,
else by the parameter's full name; a weight tied under several names (``parameter_names``)
is named after the GEMM layer that uses it (a language model's ``lm_head``, not the
embedding it shares its weight with). Rules are applied in order over the layers; a later rule
overrides an earlier one. Each rule selects layers by exactly one of ``type`` (the owning
module's class or class name), ``name`` (the layer name) or ``regex`` (``re.fullmatch`` on
it), and sets any of ``binarize``, ``method``, ``bits``, ``alpha``. A rule that selects no
layer is an error.
"""
from __future__ import annotations

import difflib
import importlib
import re
from dataclasses import dataclass, field, fields
from typing import NamedTuple

import torch.nn as nn

from .codegen.targets import PRESET_NAMES
from .ops import reference
from .ops.registry import BACKENDS


def import_object(spec: str):
    """``pkg.module:qualname`` -> the object it names (model factories on the command line,
    rule types in checkpoints)."""
    module_name, _, qualname = spec.partition(":")
    if not qualname:
        raise ValueError(f"expected MODULE:NAME (e.g. torchvision.models:resnet18), got {spec!r}")
    obj = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj

METHODS = reference.METHODS
ALPHAS = ("mean", "learned")
# Modules whose weight is a GEMM weight by construction: listed in the plan even when the
# forward does not call them, and the only ones fqt.compile gives an alpha="learned"
# parameter (created before any graph shows how another module uses its weight).
LAYER_TYPES = {nn.Conv1d: "conv1d", nn.Conv2d: "conv2d", nn.Linear: "linear"}
OTHER_REGION = "called in another graph region (graph break)"   # a plan reason
DYNAMIC = ("auto", True, False)


def _check_keys(cls, options: dict) -> None:
    valid = [f.name for f in fields(cls)]
    for key in options:
        if key not in valid:
            near = difflib.get_close_matches(key, valid, n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise TypeError(f"{cls.__name__}: unknown option {key!r}; {hint}valid options: "
                            f"{', '.join(valid)}")


def _check_choice(owner: str, name: str, value, choices) -> None:
    if value is not None and value not in choices:
        extra = ""
        if name == "method" and value == "bhq":
            extra = " (bhq, docs/math.md §4's optional block Householder quantizer, is not implemented)"
        raise ValueError(f"{owner}: {name}={value!r} is not supported{extra}; "
                         f"expected one of {tuple(choices)}")


@dataclass(frozen=True, init=False)
class Rule:
    """Per-layer override. Select with one of type/name/regex; set any of the rest."""

    type: type | str | None = None
    name: str | None = None
    regex: str | None = None
    binarize: bool | None = None
    method: str | None = None
    bits: int | None = None
    alpha: str | None = None

    def __init__(self, **options):
        _check_keys(Rule, options)
        for f in fields(self):
            object.__setattr__(self, f.name, options.get(f.name, f.default))
        selectors = [k for k in ("type", "name", "regex") if getattr(self, k) is not None]
        if len(selectors) != 1:
            raise ValueError(f"Rule needs exactly one of type=, name=, regex= to select layers; "
                             f"got {selectors or 'none'}")
        _check_choice("Rule", "method", self.method, METHODS)
        _check_choice("Rule", "bits", self.bits, reference.BITS)
        _check_choice("Rule", "alpha", self.alpha, ALPHAS)
        if self.regex is not None:
            re.compile(self.regex)

    def selects(self, name: str, module: nn.Module) -> bool:
        if self.name is not None:
            return name == self.name
        if self.regex is not None:
            return re.fullmatch(self.regex, name) is not None
        if isinstance(self.type, str):
            return type(module).__name__ == self.type
        return isinstance(module, self.type)

    def describe(self) -> str:
        return ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self)
                         if getattr(self, f.name) is not None)


@dataclass(frozen=True, init=False)
class Config:
    """What ``fqt.compile`` does (docs/math.md §8). ``rules``: a list of ``Rule`` or dicts of its fields."""

    method: str = "aq_scq"
    bits: int = 4
    seed: int = 0
    backend: str = "kernels"
    target: str = "host"
    alpha: str = "mean"
    rules: tuple = field(default=())
    # Raise (naming the layer) when a gradient reaching a quantizer holds a NaN/Inf; without
    # it a non-finite gradient propagates as in float training (never rounded to codes).
    check_finite: bool = False
    # Input sizes: "auto" compiles the first shape statically and, from the first call with
    # another size, one graph whose changed dimensions are symbolic (as torch.compile does);
    # True makes every input dimension symbolic from the start; False compiles per shape.
    dynamic: bool | str = "auto"

    def __init__(self, **options):
        _check_keys(Config, options)
        for f in fields(self):
            object.__setattr__(self, f.name, options.get(f.name, f.default))
        _check_choice("Config", "method", self.method, METHODS)
        _check_choice("Config", "bits", self.bits, reference.BITS)
        _check_choice("Config", "backend", self.backend, BACKENDS)
        _check_choice("Config", "target", self.target, PRESET_NAMES)
        _check_choice("Config", "alpha", self.alpha, ALPHAS)
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2 ** 63:
            raise ValueError(f"Config: seed={self.seed!r} must be an int in [0, 2**63)")
        if not isinstance(self.check_finite, bool):
            raise ValueError(f"Config: check_finite={self.check_finite!r} must be True or False")
        if self.dynamic not in DYNAMIC or not isinstance(self.dynamic, (bool, str)):
            raise ValueError(f"Config: dynamic={self.dynamic!r} is not supported; expected one "
                             f"of {DYNAMIC}")
        rules = tuple(r if isinstance(r, Rule) else Rule(**r) for r in self.rules)
        object.__setattr__(self, "rules", rules)


@dataclass
class LayerPlan:
    """One layer (a GEMM weight): ``index`` is its RNG layer id (position of the weight among
    the model's parameters of two or more dimensions, stable across recompiles)."""

    index: int
    name: str
    kind: str                 # "conv2d" | "conv1d" | "linear" (by module type, then by the call)
    binarize: bool
    reason: str
    method: str
    bits: int
    alpha: str
    shapes: dict = field(default_factory=dict)   # filled at capture: x, weight, y
    dynamic: dict = field(default_factory=dict)  # symbolic dims of x, y: {"x": {0: "s0"}}


class Candidate(NamedTuple):
    """A parameter that may be a GEMM weight: its layer name, owning module, and the kind
    its module type implies (``None`` when only the traced call can tell)."""

    name: str
    module: nn.Module
    kind: str | None


def layer_kind(module: nn.Module) -> str | None:
    """The kind a ``LAYER_TYPES`` module's weight has, else None."""
    return next((kind for t, kind in LAYER_TYPES.items() if isinstance(module, t)), None)


def layer_name(parameter: str) -> str:
    """The layer a weight parameter names (see the module docstring)."""
    owner, _, attr = parameter.rpartition(".")
    return owner if attr == "weight" else parameter


def parameter_names(model: nn.Module) -> dict[int, str]:
    """``id(parameter) -> name`` with one name per parameter. A tied weight (one tensor under
    several names, e.g. a language model's embedding and output head) takes the first of its
    names whose module is a ``LAYER_TYPES`` layer, the one that computes a GEMM with it
    (``lm_head``, not the ``wte`` embedding), else its first name."""
    names = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        owner, _, attr = pname.rpartition(".")
        gemm = attr == "weight" and layer_kind(model.get_submodule(owner)) is not None
        if id(p) not in names or (gemm and not names[id(p)][1]):
            names[id(p)] = (pname, gemm)
    return {key: name for key, (name, _) in names.items()}


def candidate_layers(model: nn.Module) -> list[Candidate]:
    """Every parameter of two or more dimensions, in ``named_parameters`` order (a tied
    weight once, under the name ``parameter_names`` gives it)."""
    out = []
    names = parameter_names(model)
    for p in model.parameters():
        pname = names[id(p)]
        if p.dim() < 2:
            continue
        module = model.get_submodule(pname.rpartition(".")[0])
        kind = layer_kind(module) if pname.rpartition(".")[2] == "weight" else None
        out.append(Candidate(layer_name(pname), module, kind))
    return out


def check_rules(config: Config, layers: list[Candidate]) -> None:
    """Raise if a rule selects none of ``layers``."""
    for i, rule in enumerate(config.rules):
        if not any(rule.selects(n, m) for n, m, _ in layers):
            names = ", ".join(n for n, _, _ in layers[:12]) + (", ..." if len(layers) > 12 else "")
            raise ValueError(f"Config.rules[{i}] ({rule.describe()}) selects no layer; the "
                             f"model's layers (GEMM weights) are: {names}")


def resolve_plan(model: nn.Module, config: Config, call_order: list[str],
                 model_order: list[str] | None = None) -> list[LayerPlan]:
    """Decide every layer. ``call_order``: names of the layers in the order the captured
    graph calls them; ``model_order``: the order the whole forward calls them, when Dynamo
    split it into several graphs at graph breaks (first and last of the whole forward are
    the docs/math.md §2 exclusions, not those of one graph). The plan lists the ``LAYER_TYPES``
    modules and every other parameter either order uses as a GEMM weight."""
    called = set(call_order)
    order = model_order or call_order
    used = called | set(order)
    first, last = (order[0], order[-1]) if order else (None, None)
    candidates = candidate_layers(model)
    layers = [(i, c) for i, c in enumerate(candidates) if c.kind or c.name in used]
    check_rules(config, [c for _, c in layers])
    plan = []
    for index, (name, module, kind) in layers:
        groups = getattr(module, "groups", 1) if kind else 1
        if name not in called:
            binarize, reason = False, (OTHER_REGION
                                       if model_order and name in model_order else
                                       "not called by forward")
        elif groups > 1:
            binarize, reason = False, f"groups={groups} > 1 (depthwise contraction too short)"
        elif name == first:
            binarize, reason = False, "first layer: sees the input"
        elif name == last:
            binarize, reason = False, "last layer: produces the output"
        else:
            binarize, reason = True, f"default: {kind or 'GEMM weight'} in the body"
        layer = LayerPlan(index, name, kind or "linear", binarize, reason, config.method,
                          config.bits, config.alpha)
        for i, rule in enumerate(config.rules):
            if not rule.selects(name, module):
                continue
            if rule.binarize is not None and name in called:
                if rule.binarize and groups > 1:
                    raise ValueError(f"Config.rules[{i}] asks to binarize {name!r}, a conv with "
                                     f"groups={groups}; only groups=1 is supported")
                layer.binarize = rule.binarize
                layer.reason = f"rules[{i}]: {rule.describe()}"
            for attr in ("method", "bits", "alpha"):
                if getattr(rule, attr) is not None:
                    setattr(layer, attr, getattr(rule, attr))
        if layer.alpha == "learned" and not kind:
            layer.alpha = "mean"
            layer.reason += (f"; alpha='learned' needs an nn.{'/'.join(t.__name__ for t in LAYER_TYPES)}"
                             f" weight (fqt.compile creates fqt_alpha before tracing), mean |w| used")
        plan.append(layer)
    return plan
