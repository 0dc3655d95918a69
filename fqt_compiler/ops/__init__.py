"""The fqt IR: custom ops (``library``), their reference semantics (``reference``, ``rng``)
and the table binding each op to an implementation per backend (``registry``)."""
from . import library, reference, registry, rng

__all__ = ["library", "reference", "registry", "rng"]
