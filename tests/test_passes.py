"""Pass manager, individual passes, dumps and the CLI."""
from __future__ import annotations

import re

import pytest
import torch
import torch.fx as fx

import fqt_compiler as fqt
from fqt_compiler.cli import main as cli_main
from fqt_compiler.config import Config
from fqt_compiler.passes import PassManager, PassResult, annotate_layers, apply_plan
from fqt_test_models import SmallCNN

BINARIZED = ["conv1", "conv2", "fc1"]


def test_pass_manager_names_the_failing_pass_and_records_each():
    gm = fx.symbolic_trace(SmallCNN())
    for node in gm.graph.nodes:
        node.meta["val"] = None

    def keep(gm):
        return PassResult(gm, False)

    def drop_meta(gm):
        next(iter(gm.graph.nodes)).meta.clear()
        return PassResult(gm, True)

    records = []
    with pytest.raises(RuntimeError, match=r"pass 'drop_meta' failed \(passes run before it: keep\)"):
        PassManager("test", [keep, drop_meta], records)(gm)
    assert [r.name for r in records] == ["keep"]


def test_annotate_layers_finds_call_module_layers():
    model = SmallCNN()
    gm = fx.symbolic_trace(model)
    assert any(n.op == "call_module" for n in gm.graph.nodes)
    annotate_layers(gm, model=model, example_inputs=[])
    layers = [n.meta["fqt_layer"] for n in gm.graph.nodes if "fqt_call" in n.meta]
    assert layers == ["stem", "conv1", "conv2", "dw", "fc1", "head"]
    plan = []
    apply_plan(gm, model=model, config=Config(), plan_out=plan)
    assert [l.name for l in plan if l.binarize] == BINARIZED


@pytest.fixture(scope="module")
def dumped(tmp_path_factory):
    out = tmp_path_factory.mktemp("dump")
    compiled = fqt.compile(SmallCNN(), fqt.Config(backend="reference"))
    compiled(torch.randn(4, 3, 8, 8)).sum().backward()
    fqt.dump(compiled, out)
    return out, compiled


def test_dump_names_placeholders_by_parameter(dumped):
    out, _ = dumped
    forward, backward = (out / "forward.txt").read_text(), (out / "backward.txt").read_text()
    for name in ["stem.weight", "conv1.weight", "bn1.running_mean", "fc1.weight", "fqt.rng_state"]:
        assert re.search(rf"^%{re.escape(name)} : \S+ = placeholder", forward, re.M), name
    assert not re.search(r"^%primals_\d+ ", forward, re.M)
    for name in BINARIZED:
        assert f"%{name}.x_sign_bits" in forward and f"%{name}.x_ste_bits" in backward


def test_backward_has_aq_and_quantizers_per_binarized_layer(dumped):
    out, _ = dumped
    lines = (out / "backward.txt").read_text().splitlines()
    for name in BINARIZED:
        mine = [l for l in lines if f" {name}:" in l]
        aq = [l for l in mine if "fqt.aq_sample(" in l]
        quant = [l for l in mine if "fqt.quantize_gradient(" in l]
        assert len(aq) == 2 and len(quant) == 2, name
        assert any("per-sample" in l for l in aq) and any("per-channel" in l for l in aq)
        assert all("kept fraction 0.25" in l for l in aq)
    gemms = [l for l in lines if re.search(r"fqt\.\w+_grad_q\(", l)]
    assert len(gemms) == 2 * len(BINARIZED)
    assert not any(re.search(r"fqt\.\w+_grad\(", l) or "mark_gradient" in l for l in lines)


def test_dump_writes_one_numbered_file_per_pass(dumped):
    out, compiled = dumped
    files = sorted(p.name for p in out.glob("[0-9][0-9]_*.txt"))
    records = compiled.fqt_graphs[-1].records
    assert files == [f"{i:02d}_{r.stage}_{r.name}.txt" for i, r in enumerate(records, 1)]
    assert {r.stage for r in records} == {"capture", "forward", "backward"}
    assert "binarized_conv2d" in (out / "03_capture_rewrite_binary_layers.txt").read_text()
    assert "summary.txt" in {p.name for p in out.iterdir()}


def test_method_none_backward_keeps_float_gemms(tmp_path):
    compiled = fqt.compile(SmallCNN(), fqt.Config(method="none", backend="reference"))
    compiled(torch.randn(2, 3, 8, 8)).sum().backward()
    fqt.dump(compiled, tmp_path)
    backward = (tmp_path / "backward.txt").read_text()
    assert "fqt.conv2d_input_grad(" in backward and "fqt.linear_weight_grad(" in backward
    assert "aq_sample" not in backward and "quantize_gradient" not in backward


def test_summary_table_counts_macs_and_saved_bytes(dumped):
    _, compiled = dumped
    text = fqt.summary(compiled)
    conv1 = next(l for l in text.splitlines() if re.match(r"1\s+conv1\s", l))
    # conv1: 8->16 channels, 3x3, 8x8 output, batch 4 -> 4*64 rows * 72 * 16 MACs
    assert "294.91k b" in conv1 and "1/1/4" in conv1 and "0.25/0.25" in conv1
    # saved input 4x8x8x8 floats = 8192 B; packed: 2 bit sets x 4 rows x 8 words x 8 B
    assert "512 " in conv1 and "8.19k" in conv1
    assert "3/6 layers binarized" in text


def test_summary_saved_bytes_match_the_saved_tensors_at_a_256_bit_row():
    """A 256-bit row is 4 words, padded to a whole vector of 8: the summary counts the bytes
    reference.pack_activation actually saves (2 x 3 rows x 8 words x 8 B), not 4 words."""
    model = torch.nn.Sequential(torch.nn.Linear(16, 256), torch.nn.Linear(256, 32), torch.nn.Linear(32, 10))
    compiled = fqt.compile(model, fqt.Config(backend="reference"))
    x = torch.randn(3, 16)
    compiled(x)
    signs, ste = fqt.ops.reference.pack_activation(model[0](x), "linear")
    assert (signs.numel() + ste.numel()) * 8 == 384
    row = next(l for l in fqt.summary(compiled).splitlines() if re.match(r"1\s+1\s", l))
    assert "1/1/4" in row and " 384 " in row and "3.07k" in row


def test_cli_dump(tmp_path, capsys):
    code = cli_main(["dump", "fqt_test_models:small_cnn", "--input-shape", "2,3,8,8",
                     "--out", str(tmp_path), "--backend", "reference", "--method", "psq",
                     "--bits", "2"])
    assert code == 0
    assert "method=psq bits=2" in capsys.readouterr().out
    assert "fqt.quantize_gradient(" in (tmp_path / "backward.txt").read_text()


def _kernel_step(rules=()):
    torch.manual_seed(0)
    model = SmallCNN()
    compiled = fqt.compile(model, fqt.Config(seed=5, rules=list(rules)))
    x = torch.randn(3, 3, 8, 8)
    for _ in range(2):   # the second step draws at another RNG step
        model.zero_grad(set_to_none=True)
        compiled(x).sum().backward()
    return compiled, {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("rules", [(), [{"name": "stem", "binarize": True}]], ids=["default", "binary-stem"])
def test_merged_gradient_paths_change_no_bit(monkeypatch, rules):
    """merge_gradient_paths gives each binarized layer one op for both paths (a layer whose
    input needs no gradient, a binarized stem, keeps its weight-path op), and the step's
    gradients are those of the unmerged graph bit for bit."""
    compiled, merged = _kernel_step(rules)
    backward = "\n".join(r.text for r in compiled.fqt_graphs[-1].records
                         if r.stage == "backward" and r.name == "merge_gradient_paths")
    assert backward.count("fqt.aq_quantize_conv2d_grads(") == 2      # conv1, conv2
    assert backward.count("fqt.aq_quantize_linear_grads(") == 1      # fc1
    assert backward.count("fqt.aq_quantize_conv2d_weight_grad(") == len(rules)
    assert not re.search(r"fqt\.aq_quantize_(conv2d_input|linear_input|linear_weight)_grad\(", backward)
    monkeypatch.setattr(fqt.compiler, "merge_gradient_paths", lambda gm: PassResult(gm, False))
    compiled, separate = _kernel_step(rules)
    assert not {"fqt::aq_quantize_conv2d_grads", "fqt::aq_quantize_linear_grads"} & set(compiled.fqt_last.ran)
    for name, grad in merged.items():
        assert torch.equal(grad, separate[name]), name
