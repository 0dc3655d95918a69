"""Inspection: ``fqt.dump`` (graph text files) and ``fqt.summary`` (per-layer table).

Both describe one compiled graph of a compiled model (one compilation per input shape and
mode): by default the one its last call ran (call the compiled model once first, and
``.backward()`` once for the backward graph), or the ``graph=`` given, as the debug ladder
does for each graph it is told was compiled.
"""
from __future__ import annotations

import math
import shutil
import warnings
from pathlib import Path

from .compiler import CompiledGraph, FQTModule
from .passes import graph_text
from .ops import reference as ref
from .runtime.kernel_stats import stats


def _graph(compiled: FQTModule, graph: CompiledGraph | None) -> CompiledGraph:
    if not isinstance(compiled, FQTModule):
        raise TypeError(f"expected the result of fqt.compile, got {type(compiled).__name__}")
    if graph is not None:
        return graph
    if compiled.fqt_last is None:
        raise RuntimeError("nothing compiled yet: call the compiled model once (compilation "
                           "happens at the first call, per input shape and mode)")
    return compiled.fqt_last


def dump(compiled: FQTModule, directory, *, graph: CompiledGraph | None = None) -> list[Path]:
    """Write forward.txt, backward.txt, summary.txt and one ``NN_stage_pass.txt`` per pass
    (plus forward.svg / backward.svg where pydot and graphviz are installed). Returns the
    paths written."""
    cg = _graph(compiled, graph)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    written = []

    def write(name: str, text: str):
        path = out / name
        path.write_text(text)
        written.append(path)

    for i, record in enumerate(cg.records, 1):
        write(f"{i:02d}_{record.stage}_{record.name}.txt",
              f"# after pass {record.name} ({record.stage}, {record.seconds * 1e3:.1f} ms)\n"
              + record.text)
    for name, gm in (("forward", cg.forward), ("backward", cg.backward)):
        if gm is None:
            warnings.warn(f"no {name} graph yet: run the compiled model"
                          + (" and call .backward() once" if name == "backward" else ""))
            continue
        write(f"{name}.txt", graph_text(gm, cg.names))
        written += _render_svg(gm, out / f"{name}.svg")
    write("summary.txt", summary(compiled, graph=cg))
    return written


def _render_svg(gm, path: Path) -> list[Path]:
    try:
        from torch.fx.passes.graph_drawer import FxGraphDrawer
    except ImportError:  # pydot missing
        return []
    if shutil.which("dot") is None:
        return []
    path.write_bytes(FxGraphDrawer(gm, path.stem).get_dot_graph().create_svg())
    return [path]


def _fmt(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _layer_row(layer) -> dict:
    x, w, y = layer.shapes.get("x"), layer.shapes.get("weight"), layer.shapes.get("y")
    row = {"#": layer.index, "layer": layer.name,
           "decision": "binary" if layer.binarize else "float", "reason": layer.reason,
           "weight": "x".join(map(str, w)) if w else "-"}
    if not (x and w and y):
        return row | {"W/A/G": "-", "kept in/w": "-", "MACs fwd": "-", "MACs dX": "-",
                      "MACs dW": "-", "saved packed": "-", "saved f32": "-"}
    o, k = w[0], math.prod(w[1:])
    rows = math.prod(y) // o if layer.kind == "conv2d" else math.prod(y[:-1])
    macs = rows * k * o
    x_float = 4 * math.prod(x)
    if not layer.binarize:
        return row | {"W/A/G": "32/32/32", "kept in/w": "-", "MACs fwd": f"{_fmt(macs)} f",
                      "MACs dX": f"{_fmt(macs)} f", "MACs dW": f"{_fmt(macs)} f",
                      "saved packed": _fmt(x_float), "saved f32": _fmt(x_float),
                      "_binary": 0, "_float": 3 * macs, "_packed": x_float, "_f32": x_float}
    # reference.pack_activation's layout: sign + STE words per row, rows padded to whole vectors
    n_rows, width = (x[0], math.prod(x[1:])) if layer.kind == "conv2d" else (math.prod(x[:-1]), x[-1])
    packed = 2 * 8 * n_rows * ref.padded_words(width)
    if layer.method == "none":
        gbits, kept, grad = 32, (1.0, 1.0), (f"{_fmt(macs)} f", f"{_fmt(macs)} f")
        binary, floating = macs, 2 * macs
    else:
        gbits = layer.bits
        groups = {"tensor": 1, "sample": x[0] if layer.kind == "conv2d" else rows, "channel": o}
        kept = tuple(ref.expected_kept(layer.method, gbits, groups[ref.grouping(layer.method, p)])
                     for p in (ref.PATH_INPUT, ref.PATH_WEIGHT))
        grad = tuple(f"{_fmt(macs * gbits * f)} b" for f in kept)
        binary, floating = macs + sum(macs * gbits * f for f in kept), 0
    return row | {"W/A/G": f"1/1/{gbits}", "kept in/w": f"{kept[0]:.2f}/{kept[1]:.2f}",
                  "MACs fwd": f"{_fmt(macs)} b", "MACs dX": grad[0], "MACs dW": grad[1],
                  "saved packed": _fmt(packed), "saved f32": _fmt(x_float),
                  "_binary": binary, "_float": floating, "_packed": packed, "_f32": x_float}


def summary(compiled: FQTModule, *, graph: CompiledGraph | None = None) -> str:
    """A larq-style per-layer table: decision and reason, weight shape, W/A/G bits, expected
    kept fraction of groups per SCQ path, MACs of the three GEMMs (``b`` = binary/bit-plane
    MACs, i.e. bit-plane count × kept fraction × GEMM size; ``f`` = float32), bytes of the
    layer input saved for backward (packed bits vs float32), and totals."""
    cg = _graph(compiled, graph)
    config = compiled.fqt_config
    rows = [_layer_row(layer) for layer in cg.plan]
    cols = ["#", "layer", "decision", "W/A/G", "kept in/w", "weight", "MACs fwd", "MACs dX",
            "MACs dW", "saved packed", "saved f32", "reason"]
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
    line = "  ".join(c.ljust(widths[c]) for c in cols)
    out = [f"fqt summary: method={config.method} bits={config.bits} seed={config.seed} "
           f"alpha={config.alpha} target={config.target}",
           f"backend requested: {config.backend}; ran: " + (", ".join(
               f"{op.split('::')[1]}={b}" for op, b in sorted(cg.ran.items())) or "nothing yet"),
           f"graph: {'train' if cg.training else 'eval'} mode, step {compiled.fqt_step}"
           + (f", one of {len(compiled.fqt_graphs)} compiled" if len(compiled.fqt_graphs) > 1 else "")]
    if compiled.fqt_graph_breaks:
        out.append(f"graph breaks: {len(compiled.fqt_graph_breaks)} (each region between them "
                   f"is compiled on its own; layers of other regions show as such below)")
        out += [f"  - {reason}" for reason in compiled.fqt_graph_breaks]
    out += [line, "-" * len(line)]
    out += ["  ".join(str(r.get(c, "")).ljust(widths[c]) for c in cols) for r in rows]
    tot = {k: sum(r.get(k, 0) for r in rows) for k in ("_binary", "_float", "_packed", "_f32")}
    n_bin = sum(layer.binarize for layer in cg.plan)
    share = tot["_binary"] / max(1, tot["_binary"] + tot["_float"])
    out += ["-" * len(line),
            f"total: {n_bin}/{len(cg.plan)} layers binarized; binary MACs {_fmt(tot['_binary'])}, "
            f"float MACs {_fmt(tot['_float'])} ({share:.1%} binary, 3 GEMMs per layer); saved "
            f"layer inputs {_fmt(tot['_packed'])}B packed vs {_fmt(tot['_f32'])}B float32"]
    if cg.regions:
        out.append(f"fused regions ({len(cg.regions)}; each runs as one generated kernel per "
                   f"direction, phases region_forward / region_backward in fqt.runtime.stats()):")
        out += [f"  - {region}" for region in cg.regions]
    out += _measured(cg.plan)
    return "\n".join(out)


def _measured(plan) -> list[str]:
    """What the kernels recorded for this plan's layers (``fqt.runtime.stats()`` since its
    last reset), per call: binary MACs of each GEMM (the input/weight-gradient ones reflect the
    groups AQ actually kept), kernel time, and bytes saved for backward."""
    table = stats()
    names = [layer.name for layer in plan if layer.binarize and (layer.name, "forward") in table]
    if not names:
        return []
    out = ["", "measured on the kernels (fqt.runtime.stats(), per call, since the last reset; MACs as "
               "executed, channel runs padded to whole 64-bit words):",
           f"{'layer':<28} {'calls':>5} {'MACs fwd':>10} {'MACs dX':>10} {'MACs dW':>10} "
           f"{'kernel ms':>9} {'saved':>9}"]
    for name in names:
        entries = {kind: e for (layer, kind), e in table.items() if layer == name}
        calls = entries["forward"].calls
        macs = [_fmt(entries[k].binary_macs / max(1, entries[k].calls)) if k in entries else "-"
                for k in ("forward", "input_grad", "weight_grad")]
        ms = sum(e.seconds for e in entries.values()) * 1e3 / calls
        out.append(f"{name:<28} {calls:>5} {macs[0]:>10} {macs[1]:>10} {macs[2]:>10} {ms:>9.2f} "
                   f"{_fmt(entries['forward'].saved_bytes / calls) + 'B':>9}")
    return out
