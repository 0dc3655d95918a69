"""Kernel call statistics: what actually ran, per layer and per GEMM kind.

Every kernel-backed op implementation records into one process-wide table; tests read it
to prove that the three GEMMs of each binarized layer ran on kernels, and ``fqt.summary``
shows it next to the plan. Phases other than GEMMs (pack, quantize, ste_mask, ...) are timed
too, so a benchmark can break a training step down. ``glue`` is the rest of each op call:
its Python and the small torch ops between its timed phases (``op_timed``).
"""
from __future__ import annotations

import contextvars
import functools
import threading
import time
from collections import defaultdict
from dataclasses import dataclass

GEMM_KINDS = ("forward", "input_grad", "weight_grad")


@dataclass
class Entry:
    calls: int = 0
    binary_macs: int = 0
    seconds: float = 0.0
    saved_bytes: int = 0


_lock = threading.Lock()
# The layer whose kernels are being requested: kernel emission records it in its manifest.
current_layer: contextvars.ContextVar[str] = contextvars.ContextVar("fqt_layer", default="")
_table: dict[tuple[str, str], Entry] = defaultdict(Entry)
_timed_total = [0.0]   # seconds of every timed block so far, for op_timed's difference


def record(layer: str, kind: str, *, seconds: float = 0.0, binary_macs: int = 0, saved_bytes: int = 0) -> None:
    with _lock:
        e = _table[(layer, kind)]
        e.calls += 1
        e.binary_macs += binary_macs
        e.seconds += seconds
        e.saved_bytes += saved_bytes


class timed:
    """``with timed(layer, kind, ...)``: time the block and record it as one call of ``kind``
    for ``layer``. A class, not a generator context manager: a step enters it about ten
    times per binarized layer, and the generator protocol costs several times more."""

    __slots__ = ("layer", "kind", "binary_macs", "saved_bytes", "_t0", "_token")

    def __init__(self, layer: str, kind: str, *, binary_macs: int = 0, saved_bytes: int = 0):
        self.layer, self.kind, self.binary_macs, self.saved_bytes = layer, kind, binary_macs, saved_bytes

    def __enter__(self):
        self._token = current_layer.set(self.layer)
        self._t0 = time.perf_counter()

    def __exit__(self, *exc):
        seconds = time.perf_counter() - self._t0
        current_layer.reset(self._token)
        _timed_total[0] += seconds
        record(self.layer, self.kind, seconds=seconds, binary_macs=self.binary_macs, saved_bytes=self.saved_bytes)


def op_timed(fn):
    """``fn`` (an op implementation taking ``layer_name``) recording as ``glue`` its call's
    time outside the ``timed`` blocks it runs."""
    @functools.wraps(fn)
    def run(*args, layer_name="?", **kwargs):
        t0, inner = time.perf_counter(), _timed_total[0]
        try:
            return fn(*args, layer_name=layer_name, **kwargs)
        finally:
            record(layer_name, "glue", seconds=time.perf_counter() - t0 - (_timed_total[0] - inner))
    return run


class Stats(dict):
    """``{(layer, kind): Entry}`` with a readable ``str``."""

    def by_kind(self) -> dict[str, Entry]:
        out: dict[str, Entry] = defaultdict(Entry)
        for (_, kind), e in self.items():
            t = out[kind]
            t.calls += e.calls
            t.binary_macs += e.binary_macs
            t.seconds += e.seconds
            t.saved_bytes += e.saved_bytes
        return dict(out)

    def layers(self) -> list[str]:
        return sorted({layer for layer, _ in self})

    def __str__(self) -> str:
        rows = [f"{'layer':<32} {'kind':<14} {'calls':>6} {'binary MACs':>14} {'ms':>9} {'saved KiB':>10}"]
        for (layer, kind), e in sorted(self.items()):
            rows.append(f"{layer:<32} {kind:<14} {e.calls:>6} {e.binary_macs:>14,} "
                        f"{e.seconds * 1e3:>9.2f} {e.saved_bytes / 1024:>10.1f}")
        return "\n".join(rows)


def stats() -> Stats:
    """A snapshot of the table since the last ``reset_stats``."""
    with _lock:
        return Stats({k: Entry(**vars(v)) for k, v in _table.items()})


def reset_stats() -> None:
    with _lock:
        _table.clear()
