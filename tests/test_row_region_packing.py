"""Row regions write the next binarized linear layers' packed bits (issue 13): LayerNorm,
RMSNorm, linear -> activation and gated linear regions whose output is the input of
binarized linear layers write that output's sign and STE bits in the same pass
(``pack_signs``), and those layers read them (``library.binary_linear_packed``) instead of
packing the output themselves."""
from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import fqt_compiler as fqt
from fqt_compiler.ops import reference as R
from fqt_compiler.ops import registry

from test_layer_norm_regions import Encoder
from test_llama_regions import LlamaBlock

# the module (the package exports its pass function under the same name)
fuse_regions = importlib.import_module("fqt_compiler.passes.fuse_regions")

KINDS = ("ln", "rms", "linear", "gated")
EDGES = torch.tensor([0.0, 1.0, -1.0, -0.0, 0.5, -2.0, 1.0000001, -0.9999999])


def _kernel(op):
    return registry.lookup(f"fqt::{op}", "kernels")


def _inputs(kind, rows, d, seed):
    """Arguments (without ``pack_signs``) of one row-region op over ``rows x d``, chosen so
    that the output holds 0, -0.0, +-1 and values next to +-1 where the op can produce them:
    LayerNorm with gamma 0 in some features outputs beta there (the edge values); the
    linear regions with alpha +-1, no activation, integer raw results and bias -0.0 (0 * -1 = -0.0);
    RMSNorm with gamma +-0 outputs signed zeros."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, d, generator=gen) * 2
    edges = EDGES.repeat(d // len(EDGES) + 1)[:d]
    if kind == "ln":
        gamma = torch.where(torch.arange(d) % 3 == 0, 0.0, torch.rand(d, generator=gen) + 0.5)
        beta = torch.where(torch.arange(d) % 3 == 0, edges, torch.randn(d, generator=gen))
        return "ln_region", (x, gamma, beta, 1e-5, "none", [], "ln")
    if kind == "rms":
        gamma = torch.where(torch.arange(d) % 4 == 0, torch.tensor(0.0), torch.rand(d, generator=gen) + 0.5)
        gamma[1::4] = -0.0
        return "rms_region", (x, gamma, 1e-6, "silu" if seed % 2 else "none", [], "rms")
    y = torch.randint(-3, 4, (rows, d), generator=gen).float()
    alpha = torch.where(torch.arange(d) % 2 == 0, 1.0, -1.0)
    alpha[2::5] = torch.rand(len(alpha[2::5]), generator=gen)
    bias = torch.where(torch.arange(d) % 7 == 0, torch.randn(d, generator=gen), -0.0)   # -0 + -0 = -0
    if kind == "linear":
        return "linear_act_region", (y, alpha, bias, 64, "none", [], "fc")
    y_up = torch.randint(-2, 3, (rows, d), generator=gen).float()
    return "gated_linear_region", (y, alpha, bias, y_up, alpha.flip(0), bias, 64, "none", [], "mlp")


def _bits_of(kind, rows, d, seed, target="host"):
    """``(output, sign words, STE words)`` of the kernel with ``pack_signs``, after checking
    that its other outputs equal those of the kernel without."""
    op, args = _inputs(kind, rows, d, seed)
    kern = _kernel(op)
    packed, plain = kern(*args, True, target=target), kern(*args, target=target)
    assert all(torch.equal(a, b) for a, b in zip(packed[:-2], plain[:-2])), kind
    assert plain[-1].numel() == plain[-2].numel() == 0
    return packed[0], packed[-2], packed[-1]


def _check_bits(kind, rows, d, seed=0, target="host"):
    out, signs, ste = _bits_of(kind, rows, d, seed, target)
    want_signs, want_ste = R.pack_activation(out, "linear")
    assert signs.shape == (rows, R.padded_words(d)) and signs.dtype == torch.int64
    assert torch.equal(signs, want_signs) and torch.equal(ste, want_ste), (kind, rows, d)
    return out


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rows", [1, 3, 150])
@pytest.mark.parametrize("d", [7, 9, 63, 64, 65, 67, 515])
def test_region_bits_equal_the_packer_of_its_output(kind, rows, d):
    """Exactly ``reference.pack_activation`` of the float output the kernel wrote (padding
    bits and words zero, sign(0) and sign(-0.0) bit 0, STE ``|v| < 1``), and on the larger
    shapes the edge values occur in the output."""
    out = _check_bits(kind, rows, d)
    if rows * d >= 150 * 63:
        zeros = out == 0
        assert zeros.any() and (zeros & torch.signbit(out)).any() and (zeros & ~torch.signbit(out)).any(), kind
        if kind != "rms":
            assert (out == 1).any() and (out == -1).any(), kind


@pytest.mark.parametrize("kind", KINDS)
def test_region_bits_on_the_avx2_code_path(kind):
    """The same bits from the kernels built for an AVX2 target (hygon) on this host."""
    for rows, d in ((1, 9), (3, 67), (70, 515)):
        _check_bits(kind, rows, d, 1, target="hygon")


@settings(max_examples=20, deadline=None)
@given(kind=st.sampled_from(KINDS), rows=st.integers(1, 200), d=st.integers(1, 300), seed=st.integers(0, 1000))
def test_region_bits_property(kind, rows, d, seed):
    _check_bits(kind, rows, d, seed)


def test_region_bits_do_not_depend_on_the_thread_count():
    """Threads own whole rows (blocks of them): the same words at any thread count."""
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            results.append([_bits_of(kind, 300, 67, 1) for kind in KINDS])
    finally:
        torch.set_num_threads(threads)
    for first, second in zip(*results):
        assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_gated_region_bits_on_three_dimensional_rows():
    """A ``[batch, tokens, D]`` output packs as ``batch * tokens`` rows, as the layer reading it does."""
    op, args = _inputs("gated", 12, 70, 3)
    args = tuple(a.view(3, 4, 70) if torch.is_tensor(a) and a.dim() == 2 else a for a in args)
    out, *_, signs, ste = _kernel(op)(*args, True)
    assert all(torch.equal(a, b) for a, b in zip((signs, ste), R.pack_activation(out, "linear")))


def test_packed_linear_op_reads_the_bits_not_x():
    """``binary_linear_packed`` (reference and kernels): ``Y_raw`` from the given bits, the
    weight's bits; the float ``x`` only routes the input gradient."""
    x, w = torch.randn(2, 5, 67), torch.randn(9, 67)
    signs, ste = R.pack_activation(x, "linear")
    want = R.binary_linear(torch.where(x > 0, 1.0, -1.0), w, torch.ones(9), None)
    for impl in ("reference", "kernels"):
        y, *w_bits = registry.lookup("fqt::binary_linear_packed", impl)(torch.full_like(x, float("nan")), signs,
                                                                         ste, w, torch.tensor([0, 0]), 1)
        assert torch.equal(y, want) and all(torch.equal(a, b) for a, b in zip(w_bits, R.pack_weight(w))), impl
    with pytest.raises(ValueError, match="layer 'fc'.*packed input bits"):
        _kernel("binary_linear_packed")(x, signs[:, :1], ste, w, torch.tensor([0, 0]), 1, layer_name="fc")


# --------------------------------------------------------------------------- compiled models

def _step(make, inputs, loss_fn, pack, monkeypatch, steps=2):
    """Losses and gradients of ``steps`` training steps on the kernels, with row regions
    writing the bits (``pack``) or the layers packing their input themselves."""
    monkeypatch.setattr(fuse_regions, "PACK_ROW_REGIONS", pack)
    torch.manual_seed(0)
    model = make()
    compiled = fqt.compile(model, fqt.Config(seed=0))
    losses = []
    for x in inputs[:steps]:
        model.zero_grad()
        loss = loss_fn(compiled(x))
        loss.backward()
        losses.append(loss.detach())
    return compiled, losses, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _same_with_and_without(make, inputs, loss_fn, monkeypatch):
    """Both ways give equal losses and gradients (the layers' GEMMs read the same bits);
    returns the compiled model that packs in the regions."""
    on, losses_on, grads_on = _step(make, inputs, loss_fn, True, monkeypatch)
    off, losses_off, grads_off = _step(make, inputs, loss_fn, False, monkeypatch)
    assert all(torch.equal(a, b) for a, b in zip(losses_on, losses_off)), (losses_on, losses_off)
    assert grads_on.keys() == grads_off.keys() and any(g.norm() > 0 for g in grads_on.values())
    for name, g in grads_off.items():
        assert torch.equal(grads_on[name], g), name
    assert not any("writes the sign + STE bits" in r for r in off.fqt_graphs[-1].regions)
    return on


def _ops_of(gm):
    return [getattr(n.target, "__name__", str(n.target)) for n in gm.graph.nodes if n.op == "call_function"]


def test_llama_block_equal_with_region_bits(monkeypatch, tmp_path):
    """RMSNorm -> gate/up, the gated products -> down, nn.RMSNorm -> up3/gate3 (fused
    linear region): the plan and dump name the layers each region packs for."""
    gen = torch.Generator().manual_seed(1)
    inputs = [torch.randn(5, 7, 24, generator=gen) for _ in range(2)]
    compiled = _same_with_and_without(LlamaBlock, inputs, lambda out: out.square().mean(), monkeypatch)
    cg = compiled.fqt_graphs[-1]
    assert [r.split("; writes the sign + STE bits of its output for ")[1] for r in cg.regions if "writes" in r] \
        == ["gate, up", "down", "down2", "up3, gate3"], cg.regions
    ops = _ops_of(cg.forward)
    # gate, up, gate3 inside regions; down, down2, up3 with alpha (and bias) folded in
    assert ops.count("binary_linear_packed") == 3 and ops.count("binary_linear_packed_scaled") == 3, ops
    fqt.dump(compiled, tmp_path)
    forward = (tmp_path / "forward.txt").read_text()
    assert "down: W1 A1 -> alpha * y_raw (alpha in the GEMM epilogue), x sign + STE bits from the region" in forward
    assert "writes the sign + STE bits of its output for gate, up" in fqt.summary(compiled)


def test_encoder_equal_with_region_bits(monkeypatch):
    """LayerNorm -> fc1 and LayerNorm -> GELU -> fc2."""
    gen = torch.Generator().manual_seed(2)
    inputs = [torch.randn(5, 7, 24, generator=gen) for _ in range(2)]
    compiled = _same_with_and_without(Encoder, inputs, lambda out: out.square().mean(), monkeypatch)
    assert sum("writes the sign + STE bits" in r for r in compiled.fqt_graphs[-1].regions) == 2


@pytest.mark.parametrize("which", ["sign", "ste"])
def test_a_wrong_region_bit_changes_the_step(which, monkeypatch):
    """The layers really read the region's bits: one flipped sign bit changes the loss
    (the GEMM reads it), one flipped STE bit the gradients before the layer (the input
    gradient's mask)."""
    gen = torch.Generator().manual_seed(2)
    inputs = [torch.randn(5, 7, 24, generator=gen)]
    loss_fn = lambda out: out.square().mean()   # noqa: E731
    _, (loss,), grads = _step(Encoder, inputs, loss_fn, True, monkeypatch, steps=1)
    kern = _kernel("ln_region")

    def flipped(*args, **kw):
        out, mean, invstd, signs, ste = kern(*args, **kw)
        if args[6] == "ln0" and signs.numel():
            bits = (signs if which == "sign" else ste).clone()
            bits[:, 0] ^= 1 << 5          # feature 5 of each row (the input path keeps some rows only)
            signs, ste = (bits, ste) if which == "sign" else (signs, bits)
        return out, mean, invstd, signs, ste
    flipped.takes_layer_name = True
    monkeypatch.setitem(registry._IMPLS, ("fqt::ln_region", "kernels"), flipped)
    _, (bad_loss,), bad_grads = _step(Encoder, inputs, loss_fn, True, monkeypatch, steps=1)
    if which == "sign":
        assert not torch.equal(bad_loss, loss)
    else:
        assert torch.equal(bad_loss, loss)
        assert torch.equal(bad_grads["fc1.weight"], grads["fc1.weight"])   # sign bits unchanged
    assert not torch.equal(bad_grads["embed.weight"], grads["embed.weight"])


@pytest.mark.slow
@pytest.mark.parametrize("model", ["vit", "bert", "llama"])
def test_transformers_equal_with_region_bits(model, monkeypatch):
    """timm's ViT-tiny at 64x64 (norm1 -> qkv, norm2 -> fc1, GELU(fc1) -> fc2 through its
    p=0 dropout), BERT (post-LN: each LayerNorm's output feeds the residual and the next
    Q, K, V) and Llama (RMSNorm -> q/k/v and gate/up, the gated product -> down) from small
    local configs: equal losses and gradients with and without the region bits."""
    if model == "vit":
        timm = pytest.importorskip("timm")
        make = lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64,   # noqa: E731
                                         num_classes=10)
        gen = torch.Generator().manual_seed(0)
        inputs = [torch.randn(2, 3, 64, 64, generator=gen) for _ in range(2)]
        y = torch.tensor([1, 7])
        loss_fn = lambda out: F.cross_entropy(out, y)   # noqa: E731
        writers = 3 * 12
    else:
        transformers = pytest.importorskip("transformers")
        common = dict(vocab_size=48, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=128, max_position_embeddings=16)
        if model == "bert":
            config = transformers.BertConfig(**common, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
            make = lambda: transformers.BertForMaskedLM(config)   # noqa: E731
            writers = 7
        else:
            config = transformers.LlamaConfig(**common, num_key_value_heads=2)
            make = lambda: transformers.LlamaForCausalLM(config)   # noqa: E731
            writers = 6
        gen = torch.Generator().manual_seed(0)
        inputs = [torch.randint(0, 48, (2, 16), generator=gen) for _ in range(2)]
        loss_fn = lambda out: out.logits.square().mean()   # noqa: E731
    compiled = _same_with_and_without(make, inputs, loss_fn, monkeypatch)
    regions = compiled.fqt_graphs[-1].regions
    assert sum("writes the sign + STE bits of its output for" in r for r in regions) == writers, regions


@pytest.mark.parametrize("kind", KINDS)
def test_cross_oracle_checks_the_region_bits(kind):
    """The cross verifier's oracle (what rpi4/rpi5/hygon runs are checked with) compares a
    row kernel's sign and STE words with the packer's bits of the rows it wrote: one flipped
    bit of either is caught."""
    from test_cross import assert_bit_flips_caught
    op, args = _inputs(kind, 70, 67, 0)
    # row 69 (the last), feature 65
    assert_bit_flips_caught(lambda: _kernel(op)(*args, True), lambda ld: 8 * ld * 69 + 8, 1)
