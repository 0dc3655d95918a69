"""``fqt.save`` / ``fqt.load``: a compiled model's checkpoint.

The original model's ``state_dict`` stays the source of truth (learned alphas are ordinary
parameters ``<layer>.fqt_alpha`` in it). Next to it the file holds what a recompile needs to
continue the same run: the Config, the RNG step (the quantizers' draws are keyed by
``(seed, step, layer)``, so a resumed run draws what an uninterrupted one would), the layer
call order of the forward and the plan, and the versions of fqt, torch and llvmlite. Nothing
compiled is stored: ``load`` recompiles, and warns when the plan it resolves differs from the
saved one. The file holds only tensors and plain Python values (``torch.load(...,
weights_only=True)`` reads it). Optimizer state is saved the usual torch way, next to it.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, fields

import llvmlite
import torch
import torch.nn as nn

from .compiler import FQTModule, compile
from .config import Config, Rule, import_object, resolve_plan

FORMAT = "fqt-checkpoint/1"
VERSION = "0.1.0"   # pyproject.toml's; the package may run uninstalled from a checkout
log = logging.getLogger(__name__)


def versions() -> dict:
    return {"fqt": VERSION, "torch": str(torch.__version__), "llvmlite": llvmlite.__version__}


def _rule_dict(rule: Rule) -> dict:
    out = {f.name: getattr(rule, f.name) for f in fields(rule) if getattr(rule, f.name) is not None}
    if isinstance(out.get("type"), type):
        out["type"] = f"{out['type'].__module__}:{out['type'].__qualname__}"
    return out


def _rule(d: dict) -> Rule:
    d = dict(d)
    if isinstance(d.get("type"), str) and ":" in d["type"]:
        d["type"] = import_object(d["type"])
    return Rule(**d)


def config_dict(config: Config) -> dict:
    out = {f.name: getattr(config, f.name) for f in fields(config)}
    out["rules"] = [_rule_dict(r) for r in config.rules]
    return out


def save(compiled: FQTModule, path) -> None:
    """Write ``compiled``'s model state_dict, Config, plan, RNG step and versions to ``path``."""
    if not isinstance(compiled, FQTModule):
        raise TypeError(f"fqt.save expects the result of fqt.compile, got {type(compiled).__name__} "
                        f"(for a DistributedDataParallel wrapper pass its .module)")
    merged = {}   # each layer as decided by a graph that calls it (regions split the forward)
    for cg in compiled.fqt_graphs:
        for layer in cg.plan:
            if layer.shapes or layer.index not in merged:
                merged[layer.index] = layer
    plan = [merged[i] for i in sorted(merged)]
    torch.save({"format": FORMAT, "state_dict": compiled.module.state_dict(),
                "config": config_dict(compiled.fqt_config), "step": compiled.fqt_step,
                "call_order": compiled.fqt_call_order,
                "plan": [{k: v for k, v in asdict(layer).items() if k not in ("shapes", "dynamic")}
                         for layer in plan],
                "versions": versions()}, path)


def load(path, model: nn.Module) -> FQTModule:
    """Load the checkpoint at ``path`` into ``model`` (the unmodified model, built as for
    the saved run) and return it compiled with the saved Config, at the saved RNG step.
    Build the optimizer from ``model.parameters()`` afterwards and load its state."""
    ckpt = torch.load(path, weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path}: not an fqt checkpoint (format {FORMAT!r}); for a plain "
                         f"state_dict use model.load_state_dict and fqt.compile")
    saved, now = ckpt["versions"], versions()
    for name in saved:
        if saved[name] != now.get(name):
            log.warning("%s: saved with %s %s, running %s %s", path, name, saved[name], name,
                        now.get(name))
    options = dict(ckpt["config"])
    options["rules"] = [_rule(r) for r in options["rules"]]
    config = Config(**options)
    compiled = compile(model, config)   # registers learned alphas before the state is loaded
    model.load_state_dict(ckpt["state_dict"])
    compiled.fqt_step = ckpt["step"]
    order = ckpt["call_order"]
    if order is not None:
        compiled.fqt_call_order = list(order)
        plan = resolve_plan(model, config, order)
        for layer, old in zip(plan, ckpt["plan"]):
            # apply_plan's own downgrades ("unsupported call") depend on the traced call form
            if (layer.name, layer.binarize) != (old["name"], old["binarize"]) \
                    and not old["reason"].startswith("unsupported call"):
                log.warning("%s: layer %s is now %s (%s), was %s (%s)", path, layer.name,
                            "binary" if layer.binarize else "float", layer.reason,
                            "binary" if old["binarize"] else "float", old["reason"])
        if len(ckpt["plan"]) not in (0, len(plan)):
            log.warning("%s: saved plan has %d layers, the model has %d", path,
                        len(ckpt["plan"]), len(plan))
    return compiled
