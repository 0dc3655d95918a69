"""Issue 14: unmodified torchvision / timm / transformers models compile and train on the
kernels (the cases and their checks: ``tests/model_zoo.py``), and README's "Which models
work" table is the generated one and agrees with what these runs find."""
from __future__ import annotations

import json

import pytest

import model_zoo

CI = [pytest.param(case, id=case.name, marks=[pytest.mark.slow] if case.ci == "slow" else [])
      for case in model_zoo.cases() if case.ci]


def _recorded() -> dict:
    return json.loads(model_zoo.RESULTS.read_text())


@pytest.mark.parametrize("case", CI)
def test_model_trains_on_the_kernels_as_the_readme_says(case):
    pytest.importorskip(case.library)
    row = model_zoo.train(case)   # raises on a failed check
    recorded = _recorded().get(case.name)
    assert recorded is not None, f"no row for {case.name}: run python tests/model_zoo.py {case.name}"
    for key in ("binarized", "total", "float", "status"):
        assert row[key] == recorded[key], (
            f"{case.name}: {key} is {row[key]!r}, the README table says {recorded[key]!r}; "
            f"run python tests/model_zoo.py {case.name}")


def test_every_library_family_is_in_ci():
    names = {case.name for case in model_zoo.cases() if case.ci}
    assert {"efficientnet_b0", "swin_t", "llama", "gpt2", "bert", "t5"} <= names
    # timm's own implementations of the families torchvision's cases do not cover
    timm = {name.split("/")[1].split("_")[0] for name in names if name.startswith("timm/")}
    assert timm >= {"convnext", "vit", "mixer", "regnetx"}


def test_readme_table_is_the_generated_one():
    text = model_zoo.README.read_text()
    section = text[text.index(model_zoo.BEGIN) + len(model_zoo.BEGIN):text.index(model_zoo.END)]
    assert section.strip() == model_zoo.table(_recorded()).strip()
    assert "python tests/model_zoo.py" in text
