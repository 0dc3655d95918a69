"""Bad input fails loudly and names the culprit with nothing lost (Config values themselves:
test_config.py); layouts, small batches, graph breaks and layers the kernels cannot take
still train; non-finite gradients are raised on or propagated, never rounded away (unsafe
kernel caches: test_jit_cache.py); save and resume is bit-identical; runs are deterministic whatever the thread count; kernels may be
called from several Python threads; the FQT_DEBUG ladder and the fqt_compiler logger."""
import copy
import logging
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fqt_compiler as fqt
from conftest import BACKENDS
from fqt_compiler import runtime
from fqt_compiler.runtime import jit
from fqt_test_models import MLP, SmallCNN

ROOT = Path(__file__).resolve().parents[1]


def snapshot(model, optimizer=None, compiled=None):
    """Everything a failing call must leave alone."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    opt = copy.deepcopy(optimizer.state_dict()) if optimizer is not None else None
    return state, opt, getattr(compiled, "fqt_step", None)


def assert_unchanged(before, after):
    (s0, o0, step0), (s1, o1, step1) = before, after
    assert s0.keys() == s1.keys() and all(torch.equal(s0[k], s1[k]) for k in s0)
    assert step0 == step1
    if o0 is not None:
        assert o0["param_groups"] == o1["param_groups"]
        assert o0["state"].keys() == o1["state"].keys()
        for i in o0["state"]:
            assert all(torch.equal(o0["state"][i][k], o1["state"][i][k]) for k in o0["state"][i])


def trained_cnn(backend="kernels", **options):
    """A SmallCNN compiled and trained one step with SGD momentum (so the optimizer has state)."""
    torch.manual_seed(0)
    model = SmallCNN()
    compiled = fqt.compile(model, fqt.Config(backend=backend, **options))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    compiled(torch.randn(4, 3, 8, 8)).square().mean().backward()
    opt.step()
    opt.zero_grad()
    return model, compiled, opt


# --------------------------------------------------------------------------- Config values

def test_rule_matching_nothing_names_the_rule_and_the_layers():
    model = SmallCNN()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"rules\[0\].*name='fc9'.*selects no layer") as e:
        fqt.compile(model, fqt.Config(rules=[{"name": "fc9", "binarize": False}]))
    assert "fc1" in str(e.value) and "conv1" in str(e.value)
    assert_unchanged(before, snapshot(model))


def test_binarizing_a_grouped_conv_is_refused_by_name():
    with pytest.raises(ValueError, match=r"'dw'.*groups=16"):
        fqt.compile(SmallCNN(), fqt.Config(rules=[{"name": "dw", "binarize": True}]))


# --------------------------------------------------------------------------- dtypes, batches

def test_float64_model_is_refused_naming_the_parameter():
    model = SmallCNN().double()
    with pytest.raises(TypeError, match=r"stem\.weight is torch\.float64.*model\.float\(\)"):
        fqt.compile(model)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_non_float32_inputs_are_refused_and_nothing_changes(dtype):
    model, compiled, opt = trained_cnn()
    before = snapshot(model, opt, compiled)
    with pytest.raises(TypeError, match=rf"argument 0 has dtype {dtype}.*x\.float\(\)"):
        compiled(torch.randn(4, 3, 8, 8, dtype=dtype))
    with pytest.raises(TypeError, match=rf"argument 'x' has dtype {dtype}"):
        compiled(x=torch.randn(4, 3, 8, 8).to(dtype))
    assert_unchanged(before, snapshot(model, opt, compiled))


def test_empty_batch_is_refused_and_nothing_changes():
    model, compiled, opt = trained_cnn()
    before = snapshot(model, opt, compiled)
    with pytest.raises(ValueError, match=r"argument 0 is an empty batch \(shape \(0, 3, 8, 8\)\)"):
        compiled(torch.randn(0, 3, 8, 8))
    assert_unchanged(before, snapshot(model, opt, compiled))


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_and_non_contiguous_inputs_equal_the_contiguous_result(backend):
    torch.manual_seed(1)
    x = torch.randn(3, 3, 8, 8)
    layouts = {"contiguous": x, "channels_last": x.to(memory_format=torch.channels_last),
               "transposed": x.transpose(2, 3).contiguous().transpose(2, 3),
               "strided": torch.stack([x, -x], -1)[..., 0]}
    results = {}
    for name, xi in layouts.items():
        assert torch.equal(xi, x)
        torch.manual_seed(0)
        model = SmallCNN()
        compiled = fqt.compile(model, fqt.Config(backend=backend))
        y = compiled(xi)
        y.square().mean().backward()
        results[name] = (y.detach(), {n: p.grad for n, p in model.named_parameters()})
    y0, g0 = results["contiguous"]
    for name, (y, g) in results.items():
        # the float stem conv may sum in another order for another layout: rounding only
        torch.testing.assert_close(y, y0, rtol=1e-5, atol=1e-5, msg=name)
        for k in g0:
            torch.testing.assert_close(g[k], g0[k], rtol=1e-4, atol=1e-5, msg=f"{name} {k}")


@pytest.mark.parametrize("batch", [1, 2, 3])
def test_batches_smaller_than_b_train(batch):
    torch.manual_seed(0)
    model = SmallCNN()
    compiled = fqt.compile(model, fqt.Config(bits=4))
    compiled(torch.randn(batch, 3, 8, 8)).square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    # fc1's G' comes from the float head, so it is never all zero; fc1's weight-path groups
    # are its channels over the batch (one element each at batch 1: constant groups, which AQ
    # must keep in proportion to |value|). The convs' G' may legitimately be zero: fc1's
    # input path keeps a batch of fewer than b samples as a whole with probability < 1.
    assert model.fc1.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------- graph breaks

LIBRARY_LOG = logging.getLogger("fqt_test_model")   # module level, as libraries define them


class Breaky(nn.Module):
    """Two graph breaks (an explicit one and a data-dependent branch on .item()) and the
    logging side effects Dynamo can move after a graph instead of breaking it."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d = (nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 16),
                                          nn.Linear(16, 4))

    def forward(self, x):
        x = F.relu(self.b(F.relu(self.a(x))))
        print("fqt-test: printed from the compiled region")
        LIBRARY_LOG.warning("fqt-test: a library %s", "warning")
        LIBRARY_LOG.warning_once("fqt-test: warned once")
        torch._dynamo.graph_break()
        if x.sum().item() > 0:
            x = x * 0.5
        return self.d(F.relu(self.c(x)))


@pytest.fixture
def warning_once(monkeypatch):
    """``logging.Logger.warning_once``, as transformers adds it on import."""
    import functools
    monkeypatch.setattr(logging.Logger, "warning_once",
                        functools.lru_cache(lambda self, *args: self.warning(*args)),
                        raising=False)


def test_graph_breaks_compile_region_by_region(capsys, caplog, warning_once):
    torch.manual_seed(0)
    runtime.reset_stats()
    model = Breaky()
    compiled = fqt.compile(model, fqt.Config(backend="kernels"))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        compiled(torch.randn(6, 8)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert len(compiled.fqt_graph_breaks) == 2, compiled.fqt_graph_breaks
    assert any("graph_break" in r for r in compiled.fqt_graph_breaks)
    assert any("item()" in r for r in compiled.fqt_graph_breaks)
    # print and logging did not break the graph, and still ran (eager once, then 2 calls)
    assert capsys.readouterr().out.count("fqt-test: printed from the compiled region") == 3
    assert caplog.text.count("fqt-test: a library warning") == 3
    assert caplog.text.count("fqt-test: warned once") == 1
    decided = {}
    for cg in compiled.fqt_graphs:
        for layer in cg.plan:
            if layer.shapes:
                decided[layer.name] = (layer.binarize, layer.reason)
    # first/last of the whole forward, not of each region
    expected = {"a": (False, "first layer: sees the input"),
                "b": (True, "default: linear in the body"),
                "c": (True, "default: linear in the body"),
                "d": (False, "last layer: produces the output")}
    assert decided == expected
    assert any(cg.ran.get(op) == "kernels" for cg in compiled.fqt_graphs
               for op in ("fqt::binary_linear", "fqt::binary_linear_scaled"))
    # the summary covers every region the last call ran: each layer with its own plan
    text = fqt.summary(compiled)
    assert "graph breaks: 2" in text and "item()" in text and "regions" in text
    assert "called in another graph region" not in text
    rows = {line.split()[1]: line for line in text.splitlines() if re.match(r"\d+\s+[a-d]\s", line)}
    for name, (binary, reason) in expected.items():
        assert ("binary" if binary else "float") in rows[name] and reason[:20] in rows[name]
    # b and c are each followed by a ReLU: linear regions, whose GEMM is the unscaled op
    assert "2/4 layers binarized" in text
    assert "binary_linear=kernels" in text and "linear_act_region=kernels" in text
    assert re.search(r"^b\s+2\s", text, re.M) and re.search(r"^c\s+2\s", text, re.M)


def test_dump_writes_every_region(tmp_path, warning_once):
    compiled = fqt.compile(Breaky(), fqt.Config(backend="reference"))
    compiled(torch.randn(6, 8)).square().mean().backward()
    fqt.dump(compiled, tmp_path)
    regions = sorted(p.name for p in tmp_path.glob("region*"))
    assert len(regions) == len(compiled.fqt_last_call) >= 3
    forwards = {r: (tmp_path / r / "forward.txt").read_text() for r in regions}
    binarized = [r for r, text in forwards.items() if "fqt.binary_linear(" in text]
    assert sum(forwards[r].count("fqt.binary_linear(") for r in binarized) == 2
    assert all("fqt.aq_sample(" in (tmp_path / r / "backward.txt").read_text() for r in binarized)
    assert "2/4 layers binarized" in (tmp_path / "summary.txt").read_text()


# --------------------------------------------------------------------------- fallbacks

class OddConvs(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.reflect = nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect")
        self.circular = nn.Conv2d(8, 8, 3, padding=1, padding_mode="circular")
        self.same = nn.Conv2d(8, 8, 4, padding="same")
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        for conv in (self.stem, self.grouped, self.reflect, self.circular, self.same):
            x = F.relu(conv(x))
        return self.head(x.mean((2, 3)))


def test_layers_the_kernels_cannot_take_fall_back_to_float_with_a_reason():
    torch.manual_seed(0)
    model = OddConvs()
    compiled = fqt.compile(model)
    compiled(torch.randn(2, 3, 8, 8)).sum().backward()
    plan = {layer.name: layer for layer in compiled.fqt_last.plan}
    assert not plan["grouped"].binarize and "groups=2" in plan["grouped"].reason
    assert not plan["same"].binarize and "asymmetric" in plan["same"].reason
    # reflect/circular: nn.Conv2d pads in float (F.pad) and convolves with padding=0, which
    # binarizes exactly (the pad happens before the sign, as for zero padding, docs/math.md §2)
    for name in ("reflect", "circular"):
        assert plan[name].binarize, plan[name].reason
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


# --------------------------------------------------------------------------- non-finite gradients

@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_loss_gives_nan_gradients_not_finite_codes(backend):
    torch.manual_seed(0)
    model = MLP()
    compiled = fqt.compile(model, fqt.Config(backend=backend))
    (compiled(torch.randn(8, 20)).sum() * float("nan")).backward()
    for name, p in model.named_parameters():
        assert torch.isnan(p.grad).any(), name      # every layer, binarized ones included


@pytest.mark.parametrize("model_class", [MLP, SmallCNN])
def test_nan_weight_gradients_match_the_reference_where_the_ste_mask_is_zero(model_class):
    """The weight STE is ``dw * 1{|w| < 1}``: a NaN dw stays NaN where the mask is 0 (the
    kernels once selected 0 there)."""
    nan_at = {}
    for backend in BACKENDS:
        torch.manual_seed(0)
        model = model_class()
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() > 1:
                    p[0].fill_(1.5)          # one output channel outside the STE window
        compiled = fqt.compile(model, fqt.Config(backend=backend))
        x = torch.randn(8, 20) if model_class is MLP else torch.randn(4, 3, 8, 8)
        (compiled(x).sum() * float("nan")).backward()
        nan_at[backend] = [p.grad.isnan() for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(*nan_at.values()))
    assert all(m.any() for m in nan_at["kernels"])     # the NaN reached every parameter


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_one_sample_reaches_the_binarized_layers(backend):
    torch.manual_seed(0)
    model = MLP()
    compiled = fqt.compile(model, fqt.Config(backend=backend))
    out = compiled(torch.randn(8, 20))
    weight = torch.ones_like(out)
    weight[3, 1] = float("nan")
    (out * weight).sum().backward()
    # net.2 and net.5 are binarized: the NaN sample's group must not be pruned or rounded
    assert torch.isnan(model.net[2].weight.grad).any() and torch.isnan(model.net[5].weight.grad).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_check_finite_raises_with_the_layer_name(backend):
    torch.manual_seed(0)
    model = MLP()
    compiled = fqt.compile(model, fqt.Config(backend=backend, check_finite=True))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    compiled(torch.randn(8, 20)).sum().backward()             # finite: no error
    opt.step()
    opt.zero_grad()
    before = snapshot(model, opt)
    out = compiled(torch.randn(8, 20))
    with pytest.raises(FloatingPointError, match=r"non-finite gradient at layer 'net\.5'.*check_finite"):
        (out.sum() * float("inf")).backward()
    assert_unchanged(before, snapshot(model, opt))


# --------------------------------------------------------------------------- save / load

def run_steps(compiled, model, opt, batches):
    for x in batches:
        compiled(x).square().mean().backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("backend", BACKENDS)
def test_save_and_resume_is_bit_identical(backend, tmp_path):
    torch.manual_seed(5)
    batches = [torch.randn(4, 3, 8, 8) for _ in range(4)]
    config = fqt.Config(backend=backend, seed=3, rules=[{"type": nn.Linear, "alpha": "learned"}])

    def fresh(seed):
        torch.manual_seed(seed)
        model = SmallCNN()
        return model

    model = fresh(0)
    compiled = fqt.compile(model, config)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    run_steps(compiled, model, opt, batches)
    uninterrupted = {k: v.clone() for k, v in model.state_dict().items()}

    model = fresh(0)
    compiled = fqt.compile(model, config)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    run_steps(compiled, model, opt, batches[:2])
    fqt.save(compiled, tmp_path / "ckpt.pt")
    torch.save(opt.state_dict(), tmp_path / "opt.pt")

    model = fresh(123)                                   # other initial weights: all must come from the file
    compiled = fqt.load(tmp_path / "ckpt.pt", model)
    assert compiled.fqt_step == 2 and compiled.fqt_config == config
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    opt.load_state_dict(torch.load(tmp_path / "opt.pt"))
    run_steps(compiled, model, opt, batches[2:])
    resumed = model.state_dict()
    assert uninterrupted.keys() == resumed.keys()
    for k in uninterrupted:
        assert torch.equal(uninterrupted[k], resumed[k]), k


def test_checkpoint_contents_and_bad_files(tmp_path):
    model, compiled, _ = trained_cnn()
    fqt.save(compiled, tmp_path / "c.pt")
    ckpt = torch.load(tmp_path / "c.pt", weights_only=True)
    assert set(ckpt["versions"]) == {"fqt", "torch", "llvmlite"}
    assert ckpt["step"] == 1 and ckpt["config"]["method"] == "aq_scq"
    assert {p["name"]: p["binarize"] for p in ckpt["plan"]}["conv1"] is True
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    with pytest.raises(ValueError, match=r"plain\.pt: not an fqt checkpoint"):
        fqt.load(tmp_path / "plain.pt", SmallCNN())
    with pytest.raises(TypeError, match="result of fqt.compile"):
        fqt.save(model, tmp_path / "x.pt")


# --------------------------------------------------------------------------- determinism, threads

def test_same_seed_same_threads_is_bit_identical():
    batches = [torch.randn(4, 3, 8, 8) for _ in range(3)]
    finals = []
    for _ in range(2):
        torch.manual_seed(0)
        model = SmallCNN()
        compiled = fqt.compile(model, fqt.Config(backend="kernels", seed=11))
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        run_steps(compiled, model, opt, batches)
        finals.append(model.state_dict())
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])


def test_results_do_not_depend_on_the_thread_count():
    torch.manual_seed(0)
    x = torch.randn(6, 3, 8, 8)
    g = torch.randn(6 * 16, 32)
    threads = torch.get_num_threads()
    outputs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            torch.manual_seed(0)
            model = SmallCNN()
            compiled = fqt.compile(model, fqt.Config(backend="kernels"))
            with torch.no_grad():
                y = compiled.eval()(x)
            a = runtime.pack_signs(torch.randn(70, 300, generator=torch.Generator().manual_seed(1)))
            b = runtime.pack_signs(torch.randn(90, 300, generator=torch.Generator().manual_seed(2)))
            q = runtime.quantize_bitplanes(g, "aq_scq", "weight", 4, seed=1, step=2, layer=3)
            outputs.append((y, runtime.binary_gemm(a, b), q.planes, q.row_map))
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*outputs):
        assert torch.equal(one, two)


def test_kernel_calls_from_several_python_threads():
    torch.manual_seed(0)
    a = [runtime.pack_signs(torch.randn(64 + 7 * i, 200)) for i in range(4)]
    b = runtime.pack_signs(torch.randn(48, 200))
    model = SmallCNN().eval()
    compiled = fqt.compile(model, fqt.Config(backend="kernels"))
    xs = [torch.randn(2 + i, 3, 8, 8) for i in range(4)]
    with torch.no_grad():
        expect = [(runtime.binary_gemm(ai, b), compiled(x)) for ai, x in zip(a, xs)]
    got, errors = [None] * 4, []

    def work(i):
        try:
            with torch.no_grad():
                got[i] = [(runtime.binary_gemm(a[i], b), compiled(xs[i])) for _ in range(3)]
        except Exception as e:  # surfaced below: a thread's exception would be lost
            errors.append(e)

    workers = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors, errors
    for i in range(4):
        for gemm, y in got[i]:
            assert torch.equal(gemm, expect[i][0]) and torch.equal(y, expect[i][1])


# --------------------------------------------------------------------------- FQT_DEBUG, logging

def test_logger_reports_compiled_graphs_and_plan(caplog):
    with caplog.at_level(logging.DEBUG, logger="fqt_compiler"):
        compiled = fqt.compile(MLP(), fqt.Config(backend="reference"))
        compiled(torch.randn(4, 20)).sum().backward()
    text = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("fqt_compiler"))
    assert "compiled graph 0 of MLP: train mode, 2/4 layers binarized" in text
    assert "backend=reference" in text and "compiled backward of graph 0" in text
    assert "plan 1   net.2" in text and "pass capture" in text


SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
import fqt_compiler as fqt
from fqt_test_models import MLP
fqt.compile(MLP(), fqt.Config(backend="kernels"))(torch.randn(4, 20)).sum().backward()
"""


@pytest.mark.parametrize("level", [0, 4])
def test_fqt_debug_ladder(level, tmp_path):
    env = dict(os.environ, FQT_DEBUG=str(level), FQT_DEBUG_DIR=str(tmp_path / "dbg"),
               PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(tests=str(ROOT / "tests"))], env=env,
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr
    if level == 0:
        assert "fqt_compiler" not in err and not (tmp_path / "dbg").exists()
        return
    assert "fqt_compiler: compiled graph 0 of MLP" in err                   # 1
    assert "plan 1   net.2" in err and "pass backward" in err                # 2
    graph = tmp_path / "dbg" / "graph0"                                      # 3
    assert (graph / "forward.txt").exists() and (graph / "backward.txt").exists()
    assert any(p.name.endswith("_capture_apply_plan.txt") for p in graph.iterdir())
    kernels = tmp_path / "dbg" / "kernels"                                   # 3 and 4
    ll, asm = sorted(kernels.glob("*.ll")), sorted(kernels.glob("*.s"))
    assert ll and len(asm) == len(ll)
    assert any("fqt_binary_gemm" in p.name for p in ll)


def test_bad_fqt_debug_value_names_the_variable(monkeypatch):
    from fqt_compiler import debug
    monkeypatch.setenv("FQT_DEBUG", "verbose")
    with pytest.raises(ValueError, match="FQT_DEBUG='verbose'"):
        debug.level()
