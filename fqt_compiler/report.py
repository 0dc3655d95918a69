"""Inspection: ``fqt.dump`` (graph text files) and ``fqt.summary`` (per-layer table).

Both describe, by default, the graphs the compiled model's last call ran (one compilation
per input shape and mode, where a dynamic graph serves every size of its symbolic
dimensions; where the model has graph breaks, every region that call ran, so every layer of
the whole model appears with its plan): call the compiled model once first, and
``.backward()`` once for the backward graphs. With ``graph=``, that one compiled graph, as
the debug ladder does for each graph it is told was compiled.
"""
from __future__ import annotations

import math
import shutil
import warnings
from pathlib import Path

from .compiler import CompiledGraph, FQTModule
from .config import OTHER_REGION
from .passes import graph_text
from .ops import reference as ref
from .runtime.kernel_stats import stats


def _regions(compiled: FQTModule, graph: CompiledGraph | None) -> list[CompiledGraph]:
    """``[graph]`` when given, else the graphs the last call ran, in order."""
    if not isinstance(compiled, FQTModule):
        raise TypeError(f"expected the result of fqt.compile, got {type(compiled).__name__}")
    if graph is not None:
        return [graph]
    if compiled.fqt_last is None:
        raise RuntimeError("nothing compiled yet: call the compiled model once (compilation "
                           "happens at the first call, per input shape and mode)")
    return compiled.fqt_last_call or [compiled.fqt_last]


def whole_plan(compiled: FQTModule, *, graph: CompiledGraph | None = None) -> list:
    """The whole model's plan as the last call ran it: one LayerPlan per layer,
    from the region that called it (every region's plan lists all the model's layers; the
    others mark it as called in another region)."""
    def called_here(layer):
        # shapes: the region captured the call; a layer inside a higher-order op has none,
        # but the region that called it gives its own reason
        return bool(layer.shapes), layer.reason != OTHER_REGION

    merged = {}
    for cg in _regions(compiled, graph):
        for layer in cg.plan:
            if layer.index not in merged or called_here(layer) > called_here(merged[layer.index]):
                merged[layer.index] = layer
    return [merged[i] for i in sorted(merged)]


def dump(compiled: FQTModule, directory, *, graph: CompiledGraph | None = None) -> list[Path]:
    """Write forward.txt, backward.txt, summary.txt and one ``NN_stage_pass.txt`` per pass
    (plus forward.svg / backward.svg where pydot and graphviz are installed); with graph
    breaks, the graph files of each region in ``region<i>/`` and one summary of all of them.
    Returns the paths written."""
    regions = _regions(compiled, graph)
    out = Path(directory)
    written = []
    for r, cg in enumerate(regions):
        # one region: the files at the top; graph breaks: one folder per region, in order
        folder = out / f"region{r}" if len(regions) > 1 else out
        folder.mkdir(parents=True, exist_ok=True)
        for i, record in enumerate(cg.records, 1):
            written.append(_write(folder / f"{i:02d}_{record.stage}_{record.name}.txt",
                                  f"# after pass {record.name} ({record.stage}, "
                                  f"{record.seconds * 1e3:.1f} ms)\n" + record.text))
        for name, gm in (("forward", cg.forward), ("backward", cg.backward)):
            if gm is None:
                warnings.warn(f"no {name} graph yet in {folder}: run the compiled model"
                              + (" and call .backward() once" if name == "backward" else ""))
                continue
            written.append(_write(folder / f"{name}.txt", graph_text(gm, cg.names)))
            written += _render_svg(gm, folder / f"{name}.svg")
    written.append(_write(out / "summary.txt", summary(compiled, graph=graph)))
    return written


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


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


def _dims(shape, symbolic: dict) -> str:
    """``4xs27x128``: a shape with its symbolic (dynamic) sizes shown as their symbols."""
    return "x".join(symbolic.get(d, str(size)) for d, size in enumerate(shape))


def _layer_row(layer) -> dict:
    x, w, y = layer.shapes.get("x"), layer.shapes.get("weight"), layer.shapes.get("y")
    row = {"#": layer.index, "layer": layer.name,
           "decision": "binary" if layer.binarize else "float", "reason": layer.reason,
           "input": _dims(x, layer.dynamic.get("x", {})) if x else "-",
           "weight": "x".join(map(str, w)) if w else "-"}
    if not (x and w and y):
        return row | {"W/A/G": "-", "kept in/w": "-", "MACs fwd": "-", "MACs dX": "-",
                      "MACs dW": "-", "saved packed": "-", "saved f32": "-"}
    o, k = w[0], math.prod(w[1:])
    conv = layer.kind != "linear"
    rows = math.prod(y) // o if conv else math.prod(y[:-1])
    macs = rows * k * o
    x_float = 4 * math.prod(x)
    if not layer.binarize:
        return row | {"W/A/G": "32/32/32", "kept in/w": "-", "MACs fwd": f"{_fmt(macs)} f",
                      "MACs dX": f"{_fmt(macs)} f", "MACs dW": f"{_fmt(macs)} f",
                      "saved packed": _fmt(x_float), "saved f32": _fmt(x_float),
                      "_binary": 0, "_float": 3 * macs, "_packed": x_float, "_f32": x_float}
    # reference.pack_activation's layout: sign + STE words per row, rows padded to whole vectors
    n_rows, width = (x[0], math.prod(x[1:])) if conv else (math.prod(x[:-1]), x[-1])
    packed = 2 * 8 * n_rows * ref.padded_words(width)
    if layer.method == "none":
        gbits, kept, grad = 32, (1.0, 1.0), (f"{_fmt(macs)} f", f"{_fmt(macs)} f")
        binary, floating = macs, 2 * macs
    else:
        gbits = layer.bits
        groups = {"tensor": 1, "sample": x[0] if conv else rows, "channel": o}
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
    layer input saved for backward (packed bits vs float32), and totals. In a dynamic graph
    (``Config.dynamic``) the input shapes show the symbolic dimensions by their symbols, and
    a header line lists which dimensions of the graphs' inputs are dynamic."""
    regions = _regions(compiled, graph)
    plan = whole_plan(compiled, graph=graph)
    ran = {op: b for cg in regions for op, b in cg.ran.items()}
    config = compiled.fqt_config
    rows = [_layer_row(layer) for layer in plan]
    cols = ["#", "layer", "decision", "W/A/G", "kept in/w", "input", "weight", "MACs fwd", "MACs dX",
            "MACs dW", "saved packed", "saved f32", "reason"]
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
    line = "  ".join(c.ljust(widths[c]) for c in cols)
    out = [f"fqt summary: method={config.method} bits={config.bits} seed={config.seed} "
           f"alpha={config.alpha} target={config.target}",
           f"backend requested: {config.backend}; ran: " + (", ".join(
               f"{op.split('::')[1]}={b}" for op, b in sorted(ran.items())) or "nothing yet"),
           f"graph: {'train' if regions[-1].training else 'eval'} mode, step {compiled.fqt_step}"
           + (f", {len(regions)} regions" if len(regions) > 1 else "")
           + (f", {len(regions)} of {len(compiled.fqt_graphs)} compiled graphs"
              if len(compiled.fqt_graphs) > len(regions) else "")]
    dynamic = [(r, cg) for r, cg in enumerate(regions) if cg.dynamic]
    if dynamic:
        # input names are per region: with graph breaks, each region's are prefixed with it
        dims = ", ".join((f"region{r}." if len(regions) > 1 else "") + f"{name}[{d}]={symbol}"
                         for r, cg in dynamic for name, symbolic in cg.dynamic.items()
                         for d, symbol in symbolic.items())
        out.append(f"dynamic dimensions: {dims} (one graph for every size; MACs and bytes "
                   f"below are per call at the sizes of the call that compiled it)")
    if compiled.fqt_graph_breaks:
        out.append(f"graph breaks: {len(compiled.fqt_graph_breaks)} (each region between them "
                   f"is compiled on its own; "
                   + ("every region the last call ran is listed below)" if graph is None else
                      "layers of other regions show as such below)"))
        out += [f"  - {reason}" for reason in compiled.fqt_graph_breaks]
    out += [line, "-" * len(line)]
    out += ["  ".join(str(r.get(c, "")).ljust(widths[c]) for c in cols) for r in rows]
    tot = {k: sum(r.get(k, 0) for r in rows) for k in ("_binary", "_float", "_packed", "_f32")}
    n_bin = sum(layer.binarize for layer in plan)
    share = tot["_binary"] / max(1, tot["_binary"] + tot["_float"])
    out += ["-" * len(line),
            f"total: {n_bin}/{len(plan)} layers binarized; binary MACs {_fmt(tot['_binary'])}, "
            f"float MACs {_fmt(tot['_float'])} ({share:.1%} binary, 3 GEMMs per layer); saved "
            f"layer inputs {_fmt(tot['_packed'])}B packed vs {_fmt(tot['_f32'])}B float32"]
    fused = [region for cg in regions for region in cg.regions]
    if fused:
        out.append(f"fused regions ({len(fused)}; each runs as one generated kernel per "
                   f"direction, phases region_forward / region_backward in fqt.runtime.stats()):")
        out += [f"  - {region}" for region in fused]
    out += _kept_float([op for cg in regions for op in cg.float_ops])
    out += _measured(plan)
    return "\n".join(out)


def _kept_float(float_ops) -> list[str]:
    """The products and softmaxes ``annotate_layers`` found outside the layers, one line per
    (module, op) with its count and why it stays float."""
    counts = {}
    for entry in float_ops:
        counts[entry] = counts.get(entry, 0) + 1
    if not counts:
        return []
    return ["", "kept float (not layers):"] + [
        f"  {path or '(model)'}: {op}{f' x{n}' if n > 1 else ''}: {reason}"
        for (path, op, reason), n in counts.items()]


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
        ms = sum(e.seconds for kind, e in entries.items() if kind != "glue") * 1e3 / calls
        out.append(f"{name:<28} {calls:>5} {macs[0]:>10} {macs[1]:>10} {macs[2]:>10} {ms:>9.2f} "
                   f"{_fmt(entries['forward'].saved_bytes / calls) + 'B':>9}")
    return out
