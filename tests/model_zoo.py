"""Unmodified models from torchvision, timm and transformers, built by the libraries' own
constructors (random init; nothing is downloaded), compiled and trained on the kernels.

One definition for two users: ``tests/test_model_zoo.py`` runs the ``ci`` cases, and this
file as a script regenerates README.md's "Which models work" table from every case:

    python tests/model_zoo.py                   # every model (each in its own process)
    python tests/model_zoo.py swin_t gpt2       # only these; the other rows are kept
    python tests/model_zoo.py --missing         # only the models without a row yet

Results are kept in ``docs/model_zoo.json`` (with each run's wall time), the table is
rendered from it between the README's ``model-zoo`` markers.
"""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "model_zoo.json"
README = ROOT / "README.md"
BEGIN, END = "<!-- model-zoo: begin -->", "<!-- model-zoo: end -->"
MAX_PARAMS = 150e6   # the table run trains on 2 cores in ~20 GB; bigger models are listed, not run


@dataclass
class Case:
    """``build()`` returns ``(model, inputs, loss_fn)``: ``model(**inputs)`` and
    ``loss_fn(output)`` is the loss. ``ci``: run by the test suite (``"fast"``, or
    ``"slow"`` for the slow tier); ``None``: the README table run only."""

    name: str
    library: str
    build: Callable
    input: str
    ci: str | None = None
    steps: int = 1
    notes: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- torchvision

def _vision_loss(out):
    logits = out[0] if isinstance(out, tuple) else out   # GoogLeNet/Inception train outputs
    return F.cross_entropy(logits, torch.arange(logits.shape[0]) % logits.shape[1])


def _torchvision(name: str, size: int, **kwargs):
    def build():
        import torchvision
        model = torchvision.models.get_model(name, num_classes=10, **kwargs)
        return model, {"x": torch.randn(2, 3, size, size)}, _vision_loss
    return build


# Smallest input each model builds at (stride-32 nets with a 1x1 last stage take 32).
_VISION_SIZE = {"alexnet": 64, "inception_v3": 80, "maxvit_t": 224}
# inception_v3's auxiliary classifier (a train-mode output) needs a 299-pixel input: off at 80.
_VISION_KWARGS = {"inception_v3": {"aux_logits": False, "init_weights": False},
                  "vit_b_16": {"image_size": 32}, "vit_b_32": {"image_size": 32},
                  "vit_l_16": {"image_size": 32}, "vit_l_32": {"image_size": 32},
                  "vit_h_14": {"image_size": 28}, "maxvit_t": {"input_size": (224, 224)}}
# Run by the test suite: the regressions of issue 14 (efficientnet_b0 and swin_t failed in
# annotate_layers); the other families are in the README table run only (each costs a
# Dynamo + AOTAutograd compile, and the suite must stay within the CI budget; ResNet-18
# trains on the kernels in tests/test_lowering.py and tests/test_fused_regions.py,
# MobileNet's depthwise blocks in tests/test_core_models.py).
_VISION_CI = {"efficientnet_b0": "slow", "swin_t": "slow"}


def _torchvision_cases() -> list[Case]:
    import torchvision
    cases = []
    for name in torchvision.models.list_models(module=torchvision.models):
        size = _VISION_SIZE.get(name, 32)
        cases.append(Case(name, "torchvision", _torchvision(name, size, **_VISION_KWARGS.get(name, {})),
                          f"2x3x{size}x{size}", _VISION_CI.get(name)))
    return cases


# --------------------------------------------------------------------------- timm

def _timm(name: str, **kwargs):
    def build():
        import timm
        model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
        return model, {"x": torch.randn(2, 3, 32, 32)}, _vision_loss
    return build


_TIMM = [  # (model name, constructor overrides for a 32x32 input)
    ("resnet18", {}), ("efficientnet_b0", {}), ("convnext_atto", {}),
    ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8}),
    ("swin_tiny_patch4_window7_224", {"img_size": 32, "window_size": 4}),
    ("mixer_s16_224", {"img_size": 32}), ("regnetx_002", {}),
]


# The families torchvision's CI cases already cover are in the table run only.
_TIMM_TABLE_ONLY = {"resnet18", "efficientnet_b0", "swin_tiny_patch4_window7_224"}


def _timm_cases() -> list[Case]:
    return [Case(f"timm/{name}", "timm", _timm(name, **kwargs), "2x3x32x32",
                 None if name in _TIMM_TABLE_ONLY else "slow")
            for name, kwargs in _TIMM]


# --------------------------------------------------------------------------- transformers

def _transformers(model_class: str, config_class: str, config: dict, task: str):
    def build():
        import transformers
        torch.manual_seed(0)
        model = getattr(transformers, model_class)(getattr(transformers, config_class)(**config))
        ids = torch.randint(0, 64, (2, 8))
        labels = torch.tensor([0, 1]) if task == "classify" else ids
        return model, {"input_ids": ids, "labels": labels}, lambda out: out.loss
    return build


_SMALL = {"vocab_size": 64}
_TRANSFORMERS = [
    Case("bert", "transformers", _transformers(
        "BertForSequenceClassification", "BertConfig",
        _SMALL | dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=16, num_labels=2),
        "classify"), "2x8 tokens", "slow"),
    # GPT-2's attention and MLP projections are transformers' Conv1D, not nn.Linear: layers
    # by their call (addmm with the weight transposed).
    Case("gpt2", "transformers", _transformers(
        "GPT2LMHeadModel", "GPT2Config",
        _SMALL | dict(n_embd=32, n_layer=2, n_head=4, n_positions=16, bos_token_id=0,
                      eos_token_id=0), "lm"), "2x8 tokens", "fast", steps=2),
    Case("llama", "transformers", _transformers(
        "LlamaForCausalLM", "LlamaConfig",
        _SMALL | dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                      bos_token_id=0, eos_token_id=0), "lm"), "2x8 tokens", "fast", steps=2),
    Case("t5", "transformers", _transformers(
        "T5ForConditionalGeneration", "T5Config",
        _SMALL | dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1), "lm"),
        "2x8 tokens", "slow"),
]


def cases() -> list[Case]:
    return _torchvision_cases() + _timm_cases() + _TRANSFORMERS


# --------------------------------------------------------------------------- one run

def _short_reason(reason: str) -> str:
    """A plan reason without its details, to group float layers ("groups=32 > 1 (...)" ->
    "groups > 1")."""
    head = reason.split(" (")[0].split(":")[0] if not reason.startswith("unsupported") else reason
    return re.sub(r"=\d+", "", head)


def train(case: Case) -> dict:
    """Compile ``case`` with the default Config (kernels) and train ``case.steps`` steps;
    check finite loss and gradients, that some binarized layer (if any) ran its three GEMMs
    on the kernels, and that ``fqt.summary`` lists every Conv1d/Conv2d/Linear layer. Returns the
    table row; a failed check raises ``AssertionError``."""
    import fqt_compiler as fqt
    from fqt_compiler.config import candidate_layers
    from fqt_compiler.report import whole_plan

    torch._dynamo.reset()
    fqt.runtime.reset_stats()
    torch.manual_seed(0)
    model, inputs, loss_fn = case.build()
    compiled = fqt.compile(model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    for step in range(case.steps):
        loss = loss_fn(compiled(**inputs))
        opt.zero_grad()
        loss.backward()
        assert math.isfinite(loss.item()), f"step {step}: loss {loss.item()}"
        grads = [(n, p.grad) for n, p in model.named_parameters() if p.grad is not None]
        assert grads, "no parameter received a gradient"
        bad = [n for n, g in grads if not torch.isfinite(g).all()]
        assert not bad, f"step {step}: non-finite gradients in {bad[:5]}"
        opt.step()
    plan = whole_plan(compiled)
    binarized = [layer.name for layer in plan if layer.binarize]
    stats = fqt.runtime.stats()
    on_kernels = [name for name in binarized
                  if all((name, kind) in stats for kind in ("forward", "input_grad", "weight_grad"))]
    assert not binarized or on_kernels, (
        f"no binarized layer ran its three GEMMs on the kernels ({len(binarized)} binarized)")
    text = fqt.summary(compiled)
    listed = {line.split()[1] for line in text.splitlines() if re.match(r"\d+\s+\S", line)}
    missing = [c.name for c in candidate_layers(model) if c.kind and c.name not in listed]
    assert not missing, f"fqt.summary does not list {missing[:5]}"
    floats: dict[str, list[str]] = {}
    for layer in plan:
        if not layer.binarize:
            floats.setdefault(_short_reason(layer.reason), []).append(layer.name)
    return {"model": case.name, "library": case.library, "input": case.input,
            "binarized": len(binarized), "total": len(plan), "on_kernels": len(on_kernels),
            "float": floats, "graph_breaks": len(compiled.fqt_graph_breaks),
            "params": sum(p.numel() for p in model.parameters()), "steps": case.steps,
            "status": "trains" + (f", {len(compiled.fqt_graph_breaks)} graph breaks"
                                  if compiled.fqt_graph_breaks else "")}


# --------------------------------------------------------------------------- the table

def _float_cell(floats: dict) -> str:
    parts = []
    for reason, names in floats.items():
        parts.append(f"`{names[0]}`: {reason}" if len(names) == 1 else f"{len(names)} × {reason}")
    return "; ".join(parts) or "none"


def table(rows: dict) -> str:
    """The README table: every case in order, from its row in ``rows`` (docs/model_zoo.json)."""
    lines = ["| library | model | input | binarized / total | float layers (reason) | status |",
             "|---|---|---|---|---|---|"]
    for case in cases():
        row = rows.get(case.name) or {"library": case.library, "model": case.name,
                                      "input": case.input, "status": "not run yet"}
        counts = f"{row['binarized']} / {row['total']}" if "total" in row else "-"
        lines.append(f"| {row['library']} | {row['model']} | {row['input']} | {counts} | "
                     f"{_float_cell(row.get('float', {})) if 'total' in row else '-'} | "
                     f"{row['status']} |")
    return "\n".join(lines)


def _run_isolated(case: Case) -> dict:
    """``train(case)`` in a fresh process (a crash or the memory of one model cannot take the
    others down); a failure becomes the row's status."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--one", case.name], capture_output=True,
                          text=True, cwd=ROOT)
    seconds = round(time.perf_counter() - start, 1)
    if proc.returncode == 0:
        return json.loads(proc.stdout.strip().splitlines()[-1]) | {"seconds": seconds}
    error = [line for line in proc.stderr.strip().splitlines() if line.strip()] or ["crashed"]
    last = next((line for line in reversed(error) if re.match(r"\w*(Error|Exception)\b", line)),
                error[-1])
    return {"model": case.name, "library": case.library, "input": case.input,
            "status": f"fails: {last.strip()[:160]}", "seconds": seconds}


def _params(case: Case) -> int:
    """Parameter count, from a build on the meta device (no memory, no init time) where the
    constructor allows it (RegNet's initialisation reads values back)."""
    try:
        with torch.device("meta"):
            model, _, _ = case.build()
    except NotImplementedError:
        model, _, _ = case.build()
    return sum(p.numel() for p in model.parameters())


def main(argv: list[str]) -> int:
    by_name = {case.name: case for case in cases()}
    if argv[:1] == ["--one"]:
        print(json.dumps(train(by_name[argv[1]])))
        return 0
    rows = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    names = ([name for name in by_name if name not in rows] if argv == ["--missing"]
             else argv or list(by_name))
    unknown = [name for name in names if name not in by_name]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; known: {', '.join(by_name)}")
    # the suite's cases first: their rows are the ones tests/test_model_zoo.py compares
    for name in sorted(names, key=lambda n: by_name[n].ci is None):
        case = by_name[name]
        params = _params(case)
        if params > MAX_PARAMS:
            rows[name] = {"model": name, "library": case.library, "input": case.input,
                          "status": f"not run: {params / 1e6:.0f} M parameters, over the "
                                    f"table run's {MAX_PARAMS / 1e6:.0f} M"}
        else:
            rows[name] = _run_isolated(case)
        print(f"{name}: {rows[name]['status']} ({rows[name].get('seconds', 0)} s)", flush=True)
        _write(rows)   # after each model: a long run can be stopped and resumed (--missing)
    _write(rows)
    return 0


def _write(rows: dict) -> None:
    RESULTS.write_text(json.dumps(rows, indent=1) + "\n")
    text = README.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    README.write_text(text[:start] + "\n" + table(rows) + "\n" + text[end:])


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))   # this checkout's fqt_compiler, not an installed one
    raise SystemExit(main(sys.argv[1:]))
