"""Which implementation runs each fqt op: one table keyed by (op name, backend).

The graphs hold ``torch.ops.fqt.*`` nodes whatever the backend; the last pass of each
pipeline (``passes/bind_implementations.py``) replaces every such node's target with
``lookup(op, backend)``. Binding the JIT kernels is therefore one call per op,

    registry.register("fqt::binary_conv2d", "kernels", my_kernel_impl)

where the implementation takes the op's schema arguments in order and returns what the
op returns. ``lookup`` never falls back to another backend: an op with no entry is an
error, and only ``bind_implementations`` may run a layer's op on the reference, when the
layer's plan asks for float (method ``none``).
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


def has(op: str, backend: str) -> bool:
    """Whether ``op`` has an implementation on ``backend``."""
    return (op, backend) in _IMPLS


def lookup(op: str, backend: str) -> Callable:
    """The implementation of ``op`` on ``backend``; a KeyError naming both if there is none."""
    if (op, backend) not in _IMPLS:
        have = [b for b in BACKENDS if (op, b) in _IMPLS]
        raise KeyError(f"no {backend!r} implementation of {op} is registered (it has: {have or 'none'})")
    return _IMPLS[(op, backend)]


def ops() -> list[str]:
    """Every op with a reference implementation."""
    return sorted(op for op, backend in _IMPLS if backend == "reference")
