"""examples/train_digits.py runs end to end and reports every method it was asked for."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_digits.py"


@pytest.mark.slow
def test_train_digits_short_run(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("train_digits", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = module.main(["--epochs", "1", "--methods", "qat,aq_scq", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert [r[0] for r in results] == ["qat", "aq_scq"]
    for name, acc, _, _ in results:
        assert acc > 0.3, (name, acc)  # 10 classes: chance is 0.1
        assert name in printed.split("test acc")[-1]
    assert (tmp_path / "backward.txt").exists() and str(tmp_path) in printed
