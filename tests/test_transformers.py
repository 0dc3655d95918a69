"""transformers models from small local configs (random init, no download) compile with their
linear layers binarized and train on the kernels; attention stays float."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fqt_compiler as fqt

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow

VOCAB, TOKENS = 48, 16


def gpt2():
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=TOKENS, n_embd=64, n_layer=2,
                                     n_head=4)
    return transformers.GPT2LMHeadModel(config)


def bert():
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=128,
                                     max_position_embeddings=TOKENS)
    return transformers.BertForMaskedLM(config)


def llama():
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=128, max_position_embeddings=TOKENS)
    return transformers.LlamaForCausalLM(config)


def _train(make, steps=12):
    """Adam on one fixed batch (predict the next token): returns the compiled model, the
    first and last losses and the kernel statistics of the last step."""
    torch.manual_seed(0)
    model = make()
    compiled = fqt.compile(model, fqt.Config(seed=0))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    ids = torch.randint(0, VOCAB, (4, TOKENS))
    losses = []
    for step in range(steps):
        if step == steps - 1:
            fqt.runtime.reset_stats()
        logits = compiled(ids).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return compiled, losses, fqt.runtime.stats()


def _layers(compiled):
    """Each layer as decided by the graph that calls it."""
    return {layer.name: layer for cg in compiled.fqt_graphs for layer in cg.plan if layer.shapes}


def _check_trains_on_kernels(compiled, losses, stats, expect_binary):
    plan = _layers(compiled)
    binary = sorted(name for name, layer in plan.items() if layer.binarize)
    assert binary == sorted(expect_binary)
    for name in binary:
        for kind in ("forward", "input_grad", "weight_grad"):
            assert stats[(name, kind)].calls == 1, (name, kind)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.9 * losses[0], losses
    kept = "\n".join(f"{path} {op}" for cg in compiled.fqt_graphs for path, op, _ in cg.float_ops)
    assert "attn" in kept or "attention" in kept


def test_gpt2_conv1d_layers_are_binarized_and_train():
    compiled, losses, stats = _train(gpt2)
    plan = _layers(compiled)
    conv1d = [n for n in plan if type(compiled.module.get_submodule(n)).__name__ == "Conv1D"]
    assert len(conv1d) == 8
    # the first Conv1D sees the embeddings; the LM head (its weight tied to wte) produces the output
    assert plan["lm_head"].reason.startswith("last layer")
    _check_trains_on_kernels(compiled, losses, stats, conv1d[1:])
    assert plan["transformer.h.0.mlp.c_fc"].shapes["weight"] == (256, 64)   # [out, in]


def test_bert_trains_on_the_kernels():
    compiled, losses, stats = _train(bert)
    plan = _layers(compiled)
    body = [n for n in plan if n.startswith("bert.encoder.")][1:]
    _check_trains_on_kernels(compiled, losses, stats, body + ["cls.predictions.transform.dense"])


def test_llama_trains_on_the_kernels(tmp_path):
    compiled, losses, stats = _train(llama)
    plan = _layers(compiled)
    body = [n for n in plan if n.startswith("model.layers.")][1:]
    _check_trains_on_kernels(compiled, losses, stats, body)
    # RMSNorm (two per layer and the final norm) and SwiGLU run as fused regions: no float
    # RMSNorm or SiLU ops are left in the step
    regions = compiled.fqt_graphs[-1].regions
    norms = [f"model.layers.{i}.{n}" for i in range(2) for n in ("input_layernorm", "post_attention_layernorm")]
    assert [r.split(" (rms): ")[0] for r in regions if " (rms): " in r] == norms + ["model.norm"], regions
    gated = [r for r in regions if "(gated linear)" in r]
    assert [r.split(" ")[0] for r in gated] == [f"model.layers.{i}.mlp.gate_proj" for i in range(2)], regions
    assert all(f"times model.layers.{i}.mlp.up_proj" in r for i, r in enumerate(gated))
    for name in norms + ["model.layers.1.mlp.gate_proj"]:
        assert stats[(name, "region_forward")].calls == 1 and stats[(name, "region_backward")].calls == 1
    fqt.dump(compiled, tmp_path)
    forward, backward = (tmp_path / "forward.txt").read_text(), (tmp_path / "backward.txt").read_text()
    assert forward.count("fqt.rms_region(") == 5 and forward.count("fqt.gated_linear_region(") == 2
    assert "aten.rsqrt" not in forward and "aten.silu" not in forward and "aten.silu_backward" not in backward
    assert "  - model.norm (rms): pow -> mean -> add -> rsqrt -> mul -> to -> mul" in fqt.summary(compiled)
