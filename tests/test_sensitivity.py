"""Per-layer sensitivity on the embedded SmolLM2: the KL measurement and the Fisher estimate against direct computation."""

from functools import partial

import pytest
import torch

from qat.errors import UserError
from qat.quantizers import MinMax
from qat.sensitivity import fisher_sensitivity, kl_sensitivity, quantized_weight

LAYERS = ["model.layers.0.self_attn.k_proj", "model.layers.29.mlp.down_proj"]
CANDIDATES = {"w2": partial(MinMax, bits=2, granularity="group", group_size=64, symmetric=False),
              "w8": partial(MinMax, bits=8, granularity="channel")}


@pytest.fixture(scope="module")
def ids(smollm2):
    _, tok = smollm2
    return tok("The quick brown fox jumps over the lazy dog. Python lists are mutable sequences.", return_tensors="pt").input_ids


def test_kl_by_hand_and_model_left_unchanged(smollm2, ids):
    model, _ = smollm2
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    s = kl_sensitivity(model, LAYERS, CANDIDATES, [ids])
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    # the same number computed directly: quantize the layer's weight, KL(p_fp || p_q) summed over the vocabulary, mean over tokens
    layer = model.get_submodule(LAYERS[1])
    with torch.no_grad():
        p_fp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        original = layer.weight.data
        layer.weight.data = quantized_weight(original, CANDIDATES["w2"])[0]
        p_q = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        layer.weight.data = original
    expected = (p_fp.exp() * (p_fp - p_q)).sum(-1).mean().item()
    assert s[LAYERS[1]]["w2"] == pytest.approx(expected, rel=1e-4)
    for name in LAYERS:  # 8 bits per channel costs less than 2 bits per group, and nothing is negative
        assert 0 <= s[name]["w8"] < s[name]["w2"]


def test_fisher_by_hand_and_grad_state_restored(smollm2, ids):
    model, _ = smollm2
    req = {n: p.requires_grad for n, p in model.named_parameters()}
    s = fisher_sensitivity(model, LAYERS, CANDIDATES, [ids, ids[:, :8]])
    assert {n: p.requires_grad for n, p in model.named_parameters()} == req
    assert all(p.grad is None for p in model.parameters())
    layer = model.get_submodule(LAYERS[0])
    w = layer.weight
    fisher = torch.zeros_like(w)
    for batch in (ids, ids[:, :8]):
        w.requires_grad_(True)
        g = torch.autograd.grad(model(input_ids=batch, labels=batch).loss, w)[0]
        w.requires_grad_(req[LAYERS[0] + ".weight"])
        fisher += g.square()
    q = quantized_weight(w.detach(), CANDIDATES["w2"])[0]
    expected = 0.5 * (fisher * (q - w.detach()).square()).sum().item()
    assert s[LAYERS[0]]["w2"] == pytest.approx(expected, rel=1e-4)
    for name in LAYERS:
        assert 0 <= s[name]["w8"] < s[name]["w2"]


def test_bad_layer_or_no_batch_is_named(smollm2, ids):
    model, _ = smollm2
    with pytest.raises(UserError, match="is not an nn.Linear"):
        kl_sensitivity(model, ["model.layers.0"], CANDIDATES, [ids])
    with pytest.raises(UserError, match="at least one calibration batch"):
        fisher_sensitivity(model, LAYERS, CANDIDATES, [])


def test_layers_are_found_in_their_decoder_block(smollm2):
    from torch import nn

    from qat.sensitivity import block_index

    model, _ = smollm2
    stack, index = block_index(model, LAYERS)
    assert stack is model.model.layers and index == {LAYERS[0]: 0, LAYERS[1]: 29}
    assert block_index(nn.Sequential(nn.Linear(2, 2)), ["0"]) == (None, {})  # no stack of blocks: a full forward per layer
