"""Which implementation runs each fqt op: one table keyed by (op name, backend).

The graphs hold ``torch.ops.fqt.*`` nodes whatever the backend; the last pass of each
pipeline (``passes/bind_implementations.py``) replaces every such node's target with
``lookup(op, backend)``. Binding the JIT kernels is therefore one call per op,

    registry.register("fqt::binary_conv2d", "kernels", my_kernel_impl)

where the implementation takes the op's schema arguments in order and returns what the
op returns. A backend with no entry for an op falls back to ``"reference"``, and
``lookup`` says which one it chose, so a summary can report what actually ran.
"""
from __future__ import annotations

from typing import Callable

BACKENDS = ("reference", "kernels")

_IMPLS: dict[tuple[str, str], Callable] = {}


def register(op: str, backend: str, impl: Callable) -> Callable:
    """Make ``impl`` the implementation of op ``"fqt::name"`` on ``backend``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    _IMPLS[(op, backend)] = impl
    return impl


def lookup(op: str, backend: str) -> tuple[Callable, str]:
    """(implementation, backend it belongs to) for ``op``, preferring ``backend``."""
    for candidate in (backend, "reference"):
        if (op, candidate) in _IMPLS:
            return _IMPLS[(op, candidate)], candidate
    raise KeyError(f"no implementation of {op} is registered (backends: {BACKENDS})")


def ops() -> list[str]:
    """Every op with a reference implementation."""
    return sorted(op for op, backend in _IMPLS if backend == "reference")
