"""examples/ablation.py --tiny runs end to end and writes well-formed tables and plots."""
from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ablation.py"


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_ablation_tiny(tmp_path):
    spec = importlib.util.spec_from_file_location("ablation", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--tiny", "--out", str(tmp_path)])

    results = _rows(tmp_path / "results.csv")
    finetuned = {r["method"] for r in results if r["protocol"] == "finetune"}
    scratch = {r["method"] for r in results if r["protocol"] == "scratch"}
    assert finetuned == set(module.METHODS)
    assert scratch == set(module.SCRATCH)
    for r in results:
        assert 0.0 <= float(r["test_acc"]) <= 1.0, r
        assert float(r["final_loss"]) > 0, r

    summary = _rows(tmp_path / "summary.csv")
    assert len(summary) == len(module.METHODS) + len(module.SCRATCH)
    for s in summary:
        assert 0.0 <= float(s["mean_acc"]) <= 1.0 and float(s["std_acc"]) >= 0.0

    md = (tmp_path / "results.md").read_text()
    assert "| protocol | method |" in md
    for name in module.METHODS:
        assert f"| finetune | {name} |" in md

    variance = _rows(tmp_path / "variance.csv")
    assert variance
    for v in variance:
        assert float(v["measured"]) > 0 and float(v["bound"]) > 0, v

    def total(label, key):
        return sum(float(v[key]) for v in variance if v["method"] == label)

    # AQ + 4-bit SCQ at 1 bit/element on average is far less noisy than 1-bit PSQ, as its
    # bound says; both measurements sit near their bounds.
    assert total("aq_scq_b4", "measured") < total("psq_b1", "measured") / 3
    assert total("aq_scq_b4", "bound") < total("psq_b1", "bound")
    for label in ("psq_b1", "aq_scq_b4"):
        assert total(label, "measured") < 1.5 * total(label, "bound")

    losses = _rows(tmp_path / "losses.csv")
    assert {r["method"] for r in losses} == set(module.METHODS)

    for png in ("accuracy.png", "loss_curves.png", "variance.png"):
        data = (tmp_path / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png
