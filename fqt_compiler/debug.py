"""``FQT_DEBUG`` ladder and the ``fqt_compiler`` logger (as tinygrad's ``DEBUG=1..4``).

Every module logs to ``logging.getLogger(__name__)``, i.e. under ``fqt_compiler``; the
environment variable only sets that logger's level and adds a stderr handler, and switches
on the dumps, which cost time and disk:

=========  ===================================================================================
FQT_DEBUG  what you get
=========  ===================================================================================
0 (unset)  warnings only (graph breaks, an unsafe kernel cache directory)
1          INFO: each compiled graph: mode, layers binarized / total, backend, compile time
2          DEBUG: also the plan (layer, decision, reason) and every pass's time
3          also the graphs after every pass, forward.txt/backward.txt and the summary of each
           compiled graph, and the LLVM IR of every kernel, in ``$FQT_DEBUG_DIR``
           (default ``./fqt_debug``): ``graph<i>/``, ``kernels/<symbol>-<key>.ll``
4          also the optimized assembly of every kernel (``kernels/<symbol>-<key>.s``)
=========  ===================================================================================

Without the variable, ``logging.getLogger("fqt_compiler").setLevel(logging.INFO)`` (or
DEBUG) gives levels 1 and 2 through the application's own handlers.

The ladder observes: it subscribes to the ``events`` the compiler and the runtime emit
(``graph_compiled``, ``backward_compiled``, ``kernel_compiled``); neither imports it.
"""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

from . import events
from .report import dump
from .runtime.jit import compile_assembly

log = logging.getLogger("fqt_compiler")
_handler: logging.Handler | None = None


def level() -> int:
    value = os.environ.get("FQT_DEBUG", "0") or "0"
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"FQT_DEBUG={value!r}: expected an integer 0..4") from None


def debug_dir() -> Path:
    return Path(os.environ.get("FQT_DEBUG_DIR") or "fqt_debug")


def configure() -> None:
    """Apply ``FQT_DEBUG`` to the ``fqt_compiler`` logger (called on import)."""
    global _handler
    lvl = level()
    if lvl <= 0:
        return
    log.setLevel(logging.INFO if lvl == 1 else logging.DEBUG)
    if _handler is None:
        _handler = logging.StreamHandler()
        _handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        log.addHandler(_handler)


def compiled_graph(module, graph, seconds: float) -> None:
    """Report one Dynamo graph just compiled (forward side; the backward comes lazily)."""
    index = module.fqt_graphs.index(graph)
    n_bin = sum(layer.binarize for layer in graph.plan)
    called = [layer for layer in graph.plan if layer.shapes]
    log.info("compiled graph %d of %s: %s mode, %d/%d layers binarized (%d in this graph), "
             "backend=%s target=%s, %.2f s", index, type(module.module).__name__,
             "train" if graph.training else "eval", n_bin, len(graph.plan), len(called),
             module.fqt_config.backend, module.fqt_config.target, seconds)
    if log.isEnabledFor(logging.DEBUG):
        for layer in graph.plan:
            log.debug("  plan %-3d %-30s %-6s %s", layer.index, layer.name,
                      "binary" if layer.binarize else "float", layer.reason)
        _log_passes(graph.records)
    dump_graph(module, graph)


def compiled_backward(module, graph) -> None:
    log.info("compiled backward of graph %d", module.fqt_graphs.index(graph))
    if log.isEnabledFor(logging.DEBUG):
        _log_passes([r for r in graph.records if r.stage == "backward"])
    dump_graph(module, graph)


def _log_passes(records) -> None:
    for r in records:
        log.debug("  pass %-9s %-28s %7.1f ms", r.stage, r.name, r.seconds * 1e3)


def dump_graph(module, graph) -> None:
    if level() < 3:
        return
    out = debug_dir() / f"graph{module.fqt_graphs.index(graph)}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # "no backward graph yet" before the first backward
        dump(module, out, graph=graph)
    log.info("dumped graph %d to %s", module.fqt_graphs.index(graph), out)


def kernel_compiled(ir_text: str, symbols: str, key: str, target, from_cache: bool) -> None:
    """Every kernel module ``runtime.jit`` loads."""
    log.debug("kernel module %s %s for %s (%s)", symbols, key[:12], target.name,
              "from the disk cache" if from_cache else "compiled")
    lvl = level()
    if lvl < 3:
        return
    out = debug_dir() / "kernels"
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{symbols}-{key[:12]}"
    (out / f"{stem}.ll").write_text(ir_text)
    if lvl >= 4:
        (out / f"{stem}.s").write_text(compile_assembly(ir_text, target))


events.subscribe("graph_compiled", compiled_graph)
events.subscribe("backward_compiled", compiled_backward)
events.subscribe("kernel_compiled", kernel_compiled)
