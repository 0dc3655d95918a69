"""Events the compiler and the runtime emit, for observers that subscribe to them.

The emitters (``compiler`` when it compiles a graph, ``runtime.jit`` when it loads a kernel
module) call ``emit`` and know nothing of who listens; the ``FQT_DEBUG`` ladder (``debug``)
subscribes, as TVM's pass instruments observe passes that know nothing of them. This module
imports nothing from the package, so any stage may emit without an import cycle.

=====================  ==========================================================================
event                  payload (keyword arguments)
=====================  ==========================================================================
``graph_compiled``     ``module`` (the ``FQTModule``), ``graph`` (its ``CompiledGraph``), ``seconds``
``backward_compiled``  ``module``, ``graph``
``kernel_compiled``    ``ir_text``, ``symbols`` (the module's kernels, ``+``-joined), ``key`` (cache
                       key), ``target``, ``from_cache``
=====================  ==========================================================================
"""
from __future__ import annotations

EVENTS = ("graph_compiled", "backward_compiled", "kernel_compiled")

_subscribers: dict[str, list] = {name: [] for name in EVENTS}


def _check(event: str) -> None:
    if event not in _subscribers:
        raise ValueError(f"unknown event {event!r}; expected one of {', '.join(EVENTS)}")


def subscribe(event: str, callback) -> None:
    """Call ``callback(**payload)`` on every ``event`` from now on."""
    _check(event)
    _subscribers[event].append(callback)


def unsubscribe(event: str, callback) -> None:
    _check(event)
    _subscribers[event].remove(callback)


def emit(event: str, **payload) -> None:
    _check(event)
    for callback in list(_subscribers[event]):
        callback(**payload)
