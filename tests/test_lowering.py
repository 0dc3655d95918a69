"""The kernels backend: each lowered op against its reference, and whole training steps that
run every GEMM of every binarized layer on the JIT kernels."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import fqt_compiler as fqt
from fqt_compiler.ops import fused  # noqa: F401
from fqt_compiler.ops import library as L
from fqt_compiler.ops import registry
from fqt_compiler.ops.reference import padded_words
from fqt_compiler.runtime import lowered, quantize  # noqa: F401
from fqt_compiler.zoo import resnet_small, vgg_small

FLOAT_GEMMS = {"aten::convolution", "aten::convolution_backward", "aten::mm", "aten::addmm",
               "aten::bmm", "aten::baddbmm"}


def float_gemm_calls(fn):
    """Run ``fn`` under the profiler; every float GEMM/conv ATen op it ran, with input shapes.
    (A dispatch mode would do, but Dynamo re-traces under one.)"""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    return [(e.name, [tuple(s) for s in e.input_shapes if s]) for e in prof.events()
            if e.name in FLOAT_GEMMS]


def _both(op):
    return registry.lookup(op, "kernels"), registry.lookup(op, "reference")


CONV_CASES = [  # (N, C, H, W), (O, kh, kw), stride, padding, dilation
    ((2, 3, 7, 9), (5, 3, 3), (2, 1), (1, 0), (1, 2)),
    ((1, 7, 5, 5), (1, 1, 1), (1, 1), (0, 0), (1, 1)),        # K = 7, O = 1
    ((3, 9, 8, 6), (65, 3, 3), (1, 1), (2, 2), (2, 2)),       # K = 81, O = 65
    ((2, 64, 4, 4), (63, 1, 1), (2, 2), (1, 1), (1, 1)),      # K = 64, O = 63
]


@pytest.mark.parametrize("xs,ws,stride,padding,dilation", CONV_CASES)
def test_conv_forward_kernel_matches_reference_exactly(xs, ws, stride, padding, dilation):
    torch.manual_seed(0)
    x = torch.randn(*xs) * 1.5
    w = torch.randn(ws[0], xs[1], ws[1], ws[2])
    rs = torch.tensor([0, 0])
    args = (x, w, rs, list(stride), list(padding), list(dilation), 0)
    kern, ref = _both("fqt::binary_conv2d")
    for got, want in zip(kern(*args), ref(*args)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("method,bits", [("aq_scq", 4), ("aq_scq", 1), ("topk", 2), ("ptq", 8), ("psq", 1)])
@pytest.mark.parametrize("xs,ws,stride,padding,dilation", CONV_CASES)
def test_conv_gradient_kernels_match_reference(xs, ws, stride, padding, dilation, method, bits):
    torch.manual_seed(1)
    x = torch.randn(*xs) * 1.5
    w = torch.randn(ws[0], xs[1], ws[1], ws[2]) * 0.8
    rs = torch.tensor([7, 3])
    geom = (list(stride), list(padding), list(dilation))
    y, sign_bits, ste_bits, *w_bits = L.binary_conv2d(x, w, rs, *geom, 2)
    g, wb = torch.randn_like(y), (*w_bits, list(w.shape))
    for op, saved in (("fqt::aq_quantize_conv2d_input_grad", ste_bits),
                      ("fqt::aq_quantize_conv2d_weight_grad", sign_bits)):
        assert_kept_gradient_matches(op, lambda rs: (g, rs, *wb, saved, list(x.shape), *geom, method, bits, 2))


@pytest.mark.parametrize("method,bits", [("aq_scq", 4), ("aq_opt", 2), ("psq", 1), ("topk", 8)])
@pytest.mark.parametrize("xs,ws,stride,padding,dilation", CONV_CASES)
def test_both_paths_in_one_op_equal_the_path_ops_bit_for_bit(xs, ws, stride, padding, dilation, method, bits,
                                                            monkeypatch):
    """``aq_quantize_conv2d_grads`` shares one statistics pass between the paths: dX and dW
    are exactly those of the two path kernels, alpha folded in and G' in NCHW or
    channels-last layout (each path would read a copy of the latter)."""
    torch.manual_seed(3)
    x = torch.randn(*xs) * 1.5
    w = torch.randn(ws[0], xs[1], ws[1], ws[2]) * 0.8
    geom = (list(stride), list(padding), list(dilation))
    y, sign_bits, ste_bits, *w_bits = L.binary_conv2d(x, w, torch.tensor([7, 3]), *geom, 2)
    wb = (*w_bits, list(w.shape))
    alpha = torch.rand(ws[0]) + 0.5
    kern = {op: registry.lookup(f"fqt::aq_quantize_conv2d_{op}", "kernels")
            for op in ("input_grad", "weight_grad", "grads")}
    for g in (torch.randn_like(y), torch.randn_like(y).to(memory_format=torch.channels_last)):
        for step in range(3):
            rs = torch.tensor([7, step])
            rest = (list(x.shape), *geom, method, bits, 2, alpha)
            passes = []
            monkeypatch.setattr(quantize, "_min_max", lambda *a, run=quantize._min_max: passes.append(a) or run(*a))
            dx, dw = kern["grads"](g, rs, *wb, ste_bits, sign_bits, *rest)
            monkeypatch.undo()
            # one kernel pass for both paths (a 1x1 map's groups take torch's reductions)
            assert len(passes) == (y.shape[2] * y.shape[3] > 1)
            assert torch.equal(dx, kern["input_grad"](g, rs, *wb, ste_bits, *rest))
            assert torch.equal(dw, kern["weight_grad"](g, rs, *wb, sign_bits, *rest))
    want = registry.lookup("fqt::aq_quantize_conv2d_grads", "reference")(g, rs, *wb, ste_bits, sign_bits, *rest)
    for got, ref_ in zip((dx, dw), want):
        torch.testing.assert_close(got, ref_, rtol=1e-4, atol=1e-4)


def assert_kept_gradient_matches(op, args_of):
    """Kernel == reference for the first RNG step at which the reference gradient is nonzero:
    AQ keeps N/b groups on average, so a small case (one sample, one channel) may drop them
    all at a given step, and zeros equal to zeros would prove nothing."""
    kern, ref = _both(op)
    for step in range(32):
        args = args_of(torch.tensor([7, step]))
        want = ref(*args)
        if want.abs().sum() > 0:
            break
    assert want.abs().sum() > 0, f"{op}: no step in 0..31 kept a group"
    torch.testing.assert_close(kern(*args), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rows,features,out", [(1, 1, 1), (6, 70, 5), (9, 64, 130), (33, 129, 63)])
@pytest.mark.parametrize("method,bits", [("aq_scq", 4), ("psq", 1), ("ptq", 2)])
def test_linear_kernels_match_reference(rows, features, out, method, bits):
    torch.manual_seed(2)
    x = torch.randn(rows, features) * 1.5
    w = torch.randn(out, features)
    rs = torch.tensor([1, 9])
    kern, ref = _both("fqt::binary_linear")
    k_out, r_out = kern(x, w, rs, 4), ref(x, w, rs, 4)
    for got, want in zip(k_out, r_out):
        assert torch.equal(got, want)
    _, sign_bits, ste_bits, *w_bits = r_out
    g, wb = torch.randn(rows, out), (*w_bits, list(w.shape))
    for op, saved in (("fqt::aq_quantize_linear_input_grad", ste_bits),
                      ("fqt::aq_quantize_linear_weight_grad", sign_bits)):
        assert_kept_gradient_matches(op, lambda rs: (g, rs, *wb, saved, [rows, features], method, bits, 4))


@pytest.mark.parametrize("method,bits", [("aq_scq", 4), ("aq_opt", 2), ("psq", 1)])
@pytest.mark.parametrize("lead,features,out", [((1,), 1, 1), ((2, 3), 70, 5), ((33,), 129, 63)])
def test_both_linear_paths_in_one_op_equal_the_path_ops_bit_for_bit(lead, features, out, method, bits):
    """``aq_quantize_linear_grads`` runs one statistics pass for both paths: dX and dW are
    exactly those of the two path kernels (each with its own pass)."""
    torch.manual_seed(4)
    x, w = torch.randn(*lead, features) * 1.5, torch.randn(out, features)
    _, sign_bits, ste_bits, *w_bits = L.binary_linear(x, w, torch.tensor([1, 9]), 4)
    wb = (*w_bits, list(w.shape))
    g, alpha = torch.randn(*lead, out), torch.rand(out) + 0.5
    kern = {op: registry.lookup(f"fqt::aq_quantize_linear_{op}", "kernels")
            for op in ("input_grad", "weight_grad", "grads")}
    for step, a in ((0, alpha), (1, alpha), (2, None)):
        rs, rest = torch.tensor([1, step]), (list(x.shape), method, bits, 4, a)
        dx, dw = kern["grads"](g, rs, *wb, ste_bits, sign_bits, *rest)
        assert torch.equal(dx, kern["input_grad"](g, rs, *wb, ste_bits, *rest))
        assert torch.equal(dw, kern["weight_grad"](g, rs, *wb, sign_bits, *rest))
    want = registry.lookup("fqt::aq_quantize_linear_grads", "reference")(g, rs, *wb, ste_bits, sign_bits, *rest)
    for got, ref_ in zip((dx, dw), want):
        torch.testing.assert_close(got, ref_, rtol=1e-4, atol=1e-4)


def assert_same_gradients(grads_k, grads_r):
    """Kernel-backend gradients agree with the reference backend's in direction (cosine) and
    size, or both are zero."""
    for name, g in grads_r.items():
        if g.norm() > 0:
            cos = torch.nn.functional.cosine_similarity(grads_k[name].flatten(), g.flatten(), dim=0)
            assert cos > 0.999 and abs(grads_k[name].norm() / g.norm() - 1) < 0.01, name
        else:
            assert grads_k[name].norm() == 0, name


def _train_step(model_fn, x, y, backend, method, bits, seed=3):
    torch.manual_seed(0)
    model = model_fn()
    compiled = fqt.compile(model, fqt.Config(backend=backend, method=method, bits=bits, seed=seed))
    # Dynamo does not trace under a dispatch mode: compile both graphs with a first step.
    nn.functional.cross_entropy(compiled(x), y).backward()
    model.zero_grad(set_to_none=True)
    fqt.runtime.reset_stats()   # the public API (docs/math.md §8)
    losses = []

    def step():
        losses.append(nn.functional.cross_entropy(compiled(x), y))
        losses[-1].backward()

    calls = float_gemm_calls(step)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    compiled.summary_after_step = fqt.summary(compiled)   # reads the stats of this step
    return compiled, losses[-1].item(), grads, fqt.runtime.stats(), calls


KERNEL_PHASES = {"pack", "quantize", "forward", "input_grad", "weight_grad", "dequantize", "ste_mask", "glue"}


def _check_step_on_kernels(model_fn, x, y, method="aq_scq", bits=4):
    compiled, loss_k, grads_k, st, float_calls = _train_step(model_fn, x, y, "kernels", method, bits)
    plan = compiled.fqt_graphs[-1].plan
    binarized = [layer for layer in plan if layer.binarize]
    assert binarized, "the default plan binarizes something"
    for layer in binarized:
        for kind in ("forward", "input_grad", "weight_grad"):
            entry = st.get((layer.name, kind))
            assert entry is not None and entry.calls == 1, (layer.name, kind)
        # AQ may keep no sample of a small batch for one layer (it keeps N/b on average)
        assert st[(layer.name, "forward")].binary_macs > 0
        assert {kind for name, kind in st if name == layer.name} <= KERNEL_PHASES, layer.name
        # the layer's forward op and its backward op(s), each once: their time between kernels
        assert st[(layer.name, "glue")].calls >= 2 and st[(layer.name, "glue")].seconds > 0, layer.name
    for kind in ("input_grad", "weight_grad"):
        assert sum(st[(layer.name, kind)].binary_macs for layer in binarized) > 0    # No float GEMM ran for a binarized layer: every float conv left is a float layer's, and the
    # matrix products are exactly those of the float linear layers (forward, dX, dW each).
    float_layers = [compiled.module.get_submodule(l.name) for l in plan if not l.binarize]
    float_conv_weights = {tuple(m.weight.shape) for m in float_layers if isinstance(m, nn.Conv2d)}
    n_float_linear = sum(isinstance(m, nn.Linear) for m in float_layers)
    convs = [shapes for name, shapes in float_calls if "convolution" in name]
    assert convs and all(set(shapes) & float_conv_weights for shapes in convs), convs
    assert len([n for n, _ in float_calls if n in ("aten::mm", "aten::addmm")]) == 3 * n_float_linear
    # Same seed on the reference backend: the forward is exact, so the loss is equal. Each
    # op agrees with its reference to float32 rounding (tests above), but a rounding
    # difference in one layer's dX can move a later layer's stochastic rounding across a
    # code boundary, so whole-model gradients are compared by direction and size: a layout
    # or indexing bug gives a cosine near 0, one flipped code changes the fourth decimal.
    _, loss_r, grads_r, _, _ = _train_step(model_fn, x, y, "reference", method, bits)
    assert loss_k == loss_r
    assert_same_gradients(grads_k, grads_r)
    # Saved activations: sign + STE bits, 2 bits per element of the input (16x less than its
    # float32 32 bits), each row padded to whole 512-bit vectors.
    for layer in binarized:
        x_shape = layer.shapes["x"]
        rows, k = (x_shape[0], math.prod(x_shape[1:])) if layer.kind == "conv2d" else \
            (math.prod(x_shape[:-1]), x_shape[-1])
        padded_bits = padded_words(k) * 64
        assert st[(layer.name, "forward")].saved_bytes * 8 == 2 * rows * padded_bits, layer.name
    return compiled, st


@pytest.mark.parametrize("method,bits", [("aq_scq", 4), ("psq", 1)])
def test_vgg_training_step_runs_all_gemms_on_kernels(method, bits):
    """psq b=1 included: its weight gradient (a per-sample scale along the contraction) runs a
    segmented bit-plane GEMM, not the float reference."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 1, 16, 16, generator=gen), torch.randint(0, 10, (4,), generator=gen)
    compiled, st = _check_step_on_kernels(lambda: vgg_small(in_channels=1), x, y, method, bits)
    # 16x: a float32 input of a binarized conv is 32 bits per element, we keep 2 (+ row padding)
    inputs = {"features.3": 4 * 32 * 16 * 16, "features.7": 4 * 32 * 8 * 8}
    for name, elements in inputs.items():
        assert elements * 4 / st[(name, "forward")].saved_bytes >= 16
    # fqt.summary shows the measured numbers next to the plan
    measured = compiled.summary_after_step.split("measured on the kernels")[1].splitlines()
    for name in inputs:
        row = next(line for line in measured if line.startswith(name + " "))
        assert row.split()[1] == "1"          # one call since the reset


@pytest.mark.slow
def test_resnet18_training_step_runs_all_gemms_on_kernels():
    torchvision = pytest.importorskip("torchvision")
    gen = torch.Generator().manual_seed(0)
    # Fused regions (BatchNorm + residual add + ReLU, the stem's max pool, the head's mean):
    # BatchNorm rounds as ATen's on maps of 2+ elements and the head's mean (a double sum)
    # agrees to float rounding, here exactly, so the loss is the reference's. 64x64:
    # at 32x32 the last stage's maps are 1x1, where ATen's BatchNorm sums in float per
    # thread, and with batch 2 values on their batch mean are common enough to flip signs.
    x, y = torch.randn(2, 3, 64, 64, generator=gen), torch.randint(0, 10, (2,), generator=gen)
    _check_step_on_kernels(lambda: torchvision.models.resnet18(num_classes=10), x, y)


@pytest.mark.parametrize("alpha", ["mean", "learned"])
def test_alpha_is_folded_into_the_kernels_unless_learned(alpha):
    torch.manual_seed(0)
    model = vgg_small(in_channels=1)
    compiled = fqt.compile(model, fqt.Config(alpha=alpha))
    nn.functional.cross_entropy(compiled(torch.randn(4, 1, 16, 16)), torch.randint(0, 10, (4,))).backward()
    cg = compiled.fqt_graphs[-1]
    fw_ops = {n.meta.get("fqt_op") for n in cg.forward.graph.nodes}
    bw_alpha = [n for n in cg.backward.graph.nodes if "alpha" in n.kwargs]
    # bn_region_backward(dy, x, arg, ..., region, alpha, residual): alpha is its 16th argument
    raw_regions = [n for n in cg.backward.graph.nodes if n.meta.get("fqt_op") is torch.ops.fqt.bn_region_backward.default
                   and len(n.args) > 15 and n.args[15] is not None]
    binarized = [layer for layer in cg.plan if layer.binarize]
    if alpha == "mean":
        # Every binarized conv of this model feeds a BatchNorm, whose fused region takes the
        # raw GEMM result and alpha: alpha * Y_raw in registers, G' = alpha ⊙ dx in the
        # region's backward kernel; Y_raw goes to the region alone.
        assert len(raw_regions) == len(binarized) and not bw_alpha
        ops = (torch.ops.fqt.binary_conv2d.default, torch.ops.fqt.binary_conv2d_packed.default)
        convs = [n for n in cg.forward.graph.nodes if n.meta.get("fqt_op") in ops]
        assert len(convs) == len(binarized)
        for conv in convs:
            y_raw = next(u for u in conv.users if u.args[1] == 0)
            assert {u.meta.get("fqt_op") for u in y_raw.users} == {torch.ops.fqt.bn_region.default}
    else:   # a learned alpha needs Y_raw for its own gradient: the forward multiply stays
        # both SCQ paths scale g, in the one op merge_gradient_paths makes of them
        assert len(bw_alpha) == len(binarized) and not raw_regions
        assert {n.meta["fqt_op"] for n in bw_alpha} == {torch.ops.fqt.aq_quantize_conv2d_grads.default}
        assert torch.ops.fqt.binary_conv2d.default in fw_ops
        assert torch.ops.fqt.binary_conv2d_scaled.default not in fw_ops
        assert all(p.grad is not None for n, p in model.named_parameters() if n.endswith("fqt_alpha")
                   and n.split(".fqt_alpha")[0] in {l.name for l in cg.plan if l.binarize})


def _after_first_step(model_fn, backend, x, y):
    """``(model, compiled)`` for ``backend`` (seed 3) after one step, which compiles both graphs."""
    torch.manual_seed(0)
    model = model_fn()
    compiled = fqt.compile(model, fqt.Config(backend=backend, seed=3))
    nn.functional.cross_entropy(compiled(x), y).backward()
    return model, compiled


@pytest.mark.parametrize("model_fn", [lambda: vgg_small(in_channels=1, width=0.5),
                                      lambda: nn.Sequential(nn.Flatten(), nn.Linear(256, 96), nn.ReLU(),
                                                            nn.Linear(96, 80), nn.ReLU(), nn.Linear(80, 70),
                                                            nn.ReLU(), nn.Linear(70, 10))],
                         ids=["conv", "linear"])
@pytest.mark.parametrize("edit", ["no_grad", "data"])
def test_sign_weight_is_packed_once_per_step_and_follows_in_place_edits(edit, model_fn, monkeypatch):
    """A step packs each binarized conv's or linear layer's sign(W) and STE bits once (the
    forward; its backward reuses those bits). In-place edits of the weights between steps are
    seen by the next step's forward and backward, loss and gradients agreeing with the
    reference backend's on the same edit: negating them through ``.data`` (which leaves the
    version counter as it was; stale sign(W) bits would flip the earlier layers' gradients)
    or scaling them by 20 with an in-place op (no sign flips, so the input gradient's
    operands stay, but most weights leave the STE window |w| < 1)."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 1, 16, 16, generator=gen), torch.randint(0, 10, (3,), generator=gen)
    results = {}
    for backend in ("kernels", "reference"):
        model, compiled = _after_first_step(model_fn, backend, x, y)
        weights = [model.get_submodule(l.name).weight for l in compiled.fqt_graphs[-1].plan if l.binarize]
        for w in weights:
            if edit == "data":
                w.data.neg_()
            else:
                with torch.no_grad():
                    w.mul_(20)
        model.zero_grad(set_to_none=True)
        packed = []
        monkeypatch.setattr(lowered, "pack_signs_and_ste", lambda t, *, target, run=lowered.pack_signs_and_ste, **kw:
                            packed.append(t.data_ptr()) or run(t, target=target, **kw))
        loss = nn.functional.cross_entropy(compiled(x), y)
        loss.backward()
        monkeypatch.undo()
        results[backend] = (loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()},
                            sorted(p for p in packed if p in {w.data_ptr() for w in weights}),
                            sorted(w.data_ptr() for w in weights))
    (loss_k, grads_k, packed_k, weights_k), (loss_r, grads_r, _, _) = results["kernels"], results["reference"]
    assert loss_k == loss_r
    assert_same_gradients(grads_k, grads_r)
    assert len(weights_k) >= 2 and packed_k == weights_k


@pytest.mark.parametrize("model_fn", [vgg_small, resnet_small], ids=["vgg", "resnet"])
def test_a_step_saves_no_binarized_weight_only_its_bits(model_fn):
    """What autograd saves for backward in a compiled step (every saved tensor, by storage, as
    ``benchmarks/bench_train.py``'s ``saved_bytes`` counts them) shares no storage with a
    binarized layer's float weight: its backward reads sign(W) and |W| < 1 from 2 bits per
    weight. The float first conv and the float head still save their weights (which shows the
    hook sees parameters). The partitioner decides what is saved before either backend binds
    its implementations: the kernel backend shows it."""
    torch.manual_seed(0)
    model = model_fn()
    compiled = fqt.compile(model, fqt.Config(seed=3))
    x, y = torch.randn(2, 1, 16, 16), torch.tensor([1, 7])
    nn.functional.cross_entropy(compiled(x), y).backward()   # compiles both graphs
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = nn.functional.cross_entropy(compiled(x), y)
    loss.backward()
    plan = compiled.fqt_graphs[-1].plan
    binarized = {l.name for l in plan if l.binarize}
    stored = {l.name: model.get_submodule(l.name).weight.untyped_storage().data_ptr() in saved for l in plan}
    assert len(binarized) >= 5 and not any(stored[name] for name in binarized), stored
    assert all(stored[name] for name in stored.keys() - binarized), stored
    # the bits instead: two int64 word matrices [O, padded_words(K)] per binarized layer
    for name in binarized:
        w = model.get_submodule(name).weight
        words = (w.shape[0], padded_words(w[0].numel()))
        assert sum(t.dtype == torch.int64 and tuple(t.shape) == words for t in saved.values()) >= 2, name


def test_backward_kernels_name_the_layer_for_weight_bits_of_another_layout():
    """A backward op handed the float weight, or bits of another shape, in place of the weight
    bits its forward returned: an error naming the layer and the layout expected."""
    torch.manual_seed(0)
    x, w, geom = torch.randn(2, 3, 5, 5), torch.randn(4, 3, 3, 3), ([1, 1], [1, 1], [1, 1])
    y, sign_bits, ste_bits, w_sign, w_ste = L.binary_conv2d(x, w, torch.tensor([1, 2]), *geom, 0)
    g, rest = torch.randn_like(y), (list(x.shape), *geom, "ptq", 4, 0)
    kern = {op: registry.lookup(f"fqt::aq_quantize_conv2d_{op}", "kernels") for op in ("input_grad", "weight_grad")}
    with pytest.raises(ValueError, match=r"layer 'conv1': packed weight sign bits .* \(4, 8\)"):
        kern["input_grad"](g, torch.tensor([1, 2]), w, w_ste, list(w.shape), ste_bits, *rest, layer_name="conv1")
    with pytest.raises(ValueError, match=r"layer 'conv1': packed weight STE bits .* \(4, 8\)"):
        kern["weight_grad"](g, torch.tensor([1, 2]), w_sign, w_ste[:, :4].contiguous(), list(w.shape), sign_bits,
                            *rest, layer_name="conv1")


class _SharedInput(nn.Module):
    """q, k and v read one activation (float first and last layers around them)."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Linear(40, 70), nn.Linear(33, 5)
        self.q, self.k, self.v = (nn.Linear(70, 33) for _ in range(3))

    def forward(self, x):
        h = self.embed(x)
        return self.head(self.q(h) * self.k(h) + self.v(h))


def test_layers_reading_one_activation_pack_it_once():
    """On the kernel backend the three binarized layers that read ``h`` share one packing of
    it: the step saves one sign and one STE word matrix of ``h`` for backward, not three of
    each, with loss and gradients equal to the reference backend's."""
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(9, 40, generator=gen), torch.randint(0, 5, (9,), generator=gen)
    results = {}
    for backend in ("kernels", "reference"):
        model, compiled = _after_first_step(_SharedInput, backend, x, y)
        model.zero_grad(set_to_none=True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            loss = nn.functional.cross_entropy(compiled(x), y)
        loss.backward()
        words_of_h = {t.untyped_storage().data_ptr() for t in saved
                      if t.dtype == torch.int64 and tuple(t.shape) == (9, padded_words(70))}
        results[backend] = loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}, words_of_h
    (loss_k, grads_k, words_k), (loss_r, grads_r, _) = results["kernels"], results["reference"]
    assert len(words_k) == 2
    assert loss_k == loss_r
    assert_same_gradients(grads_k, grads_r)
