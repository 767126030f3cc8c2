"""The packed format (qat/export/packed.py) and the export entry point (qat/export/__init__.py).

Exactness: for every weight quantizer and bit width, the weight rebuilt from the packed file equals
the fake-quantized weight bitwise, and ``load_packed`` reproduces the fake-quant model's logits.
"""

import copy
import functools
import json

import pytest
import torch
from torch import nn

import qat
from qat.convert import quantize_
from qat.errors import UserError
from qat.export import export_, load_packed
from qat.export.packed import PackedEmbedding, PackedLinear, pack_layer, size_report
from qat.nn.linear import QuantLinear
from qat.quantizers import LSQ, LWC, MinMax, Ternary

BITS = [2, 3, 4, 8]


QUANTIZERS = {  # name -> factory per bit width (PACT quantizes activations only: not exported)
    "minmax_sym": lambda b: functools.partial(MinMax, bits=b, granularity="group", group_size=16),
    "minmax_asym": lambda b: functools.partial(MinMax, bits=b, granularity="channel", symmetric=False),
    "lsq": lambda b: functools.partial(LSQ, bits=b, granularity="group", group_size=16),
    "lsq_narrow_tensor": lambda b: functools.partial(LSQ, bits=b, granularity="tensor", narrow=True),
    "lsq_plus": lambda b: functools.partial(LSQ, bits=b, granularity="group", group_size=16, symmetric=False, offset=True),
    "lwc_asym": lambda b: functools.partial(LWC, bits=b, granularity="group", group_size=16),
    "lwc_sym": lambda b: functools.partial(LWC, bits=b, granularity="channel", symmetric=True),
}
TERNARY = {
    "absmean": functools.partial(Ternary, "absmean", granularity="group", group_size=16),
    "twn": functools.partial(Ternary, "twn", granularity="channel"),
    "seq": functools.partial(Ternary, "seq", granularity="group", group_size=16),
    "tequila": functools.partial(Ternary, "absmean", granularity="group", group_size=16, deadzone="tequila"),
    "tequila_twn_tensor": functools.partial(Ternary, "twn", granularity="tensor", deadzone="tequila"),
}
CASES = [(f"{n}-w{b}", f(b)) for n, f in QUANTIZERS.items() for b in BITS] + [(f"ternary-{n}", f) for n, f in TERNARY.items()]


def _codes(layer):
    return layer.weight_quantizer.codes(layer.latent_weight())


def _trained_layer(factory, seed=0):
    """A QuantLinear whose learned parameters moved away from their init (as training moves them)."""
    gen = torch.Generator().manual_seed(seed)
    lin = nn.Linear(48, 24)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(24, 48, generator=gen) * 0.2)
        lin.bias.copy_(torch.randn(24, generator=gen))
    layer = QuantLinear.from_float(lin, factory())
    with torch.no_grad():
        for p in layer.weight_quantizer.parameters():
            p.mul_(1 + 0.1 * torch.rand(p.shape, generator=gen))
        layer.weight.add_(0.01 * torch.randn(24, 48, generator=gen))
    return layer.eval()


@pytest.mark.parametrize("factory", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_packed_weight_equals_fake_quant_bitwise(factory):
    layer = _trained_layer(factory)
    spec, parts = pack_layer("layer", layer, _codes(layer))
    packed = PackedLinear(spec, parts, layer.bias.detach())
    w_hat, _ = layer.quantized_weight()
    assert torch.equal(packed.dequantized_weight(), w_hat.detach())
    assert parts["scales"].dtype == torch.float16
    x = torch.randn(5, 48, generator=torch.Generator().manual_seed(1))
    assert torch.equal(packed(x), layer(x).detach())  # Tequila's extra bias included
    codes = layer.weight_quantizer.codes(layer.latent_weight())
    assert torch.equal(packed.codes().codes, codes.codes)
    if codes.zero is not None:
        assert parts["zeros"].dtype in (torch.uint8, torch.int16)


def test_layout_metadata_and_ternary_layouts():
    layer = _trained_layer(TERNARY["absmean"])
    spec, parts = pack_layer("l", layer, _codes(layer))
    assert spec["layout"] == "base3" and spec["bits"] == 2 and parts["qweight"].numel() == -(-24 * 48 // 5)
    assert spec["padding"] == 5 * parts["qweight"].numel() - 24 * 48
    spec4, parts4 = pack_layer("l", layer, _codes(layer), ternary_layout="bits")
    assert spec4["layout"] == "bits" and parts4["qweight"].numel() == 24 * 48 // 4
    assert torch.equal(PackedLinear(spec4, parts4).dequantized_weight(), PackedLinear(spec, parts).dequantized_weight())
    layer3 = _trained_layer(QUANTIZERS["lsq"](3))
    spec3, parts3 = pack_layer("l", layer3, _codes(layer3))
    assert (spec3["bits"], spec3["lo"], spec3["hi"], spec3["group_size"]) == (3, -4, 3, 16)
    assert parts3["qweight"].numel() == 24 * 48 * 3 // 8


def test_scales_that_float16_cannot_hold_are_refused():
    layer = _trained_layer(QUANTIZERS["lsq"](4))
    codes = layer.weight_quantizer.codes(layer.latent_weight())
    codes.scale = codes.scale + 1e-7  # what a quantizer training in float32 would export
    with pytest.raises(UserError, match="not float16 values"):
        pack_layer("l", layer, codes)


# -- whole models -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def _quantized(model, weight, embedding=None, include=("model.layers.*",)):
    model = copy.deepcopy(model)
    quantize_(model, weight=weight, embedding=embedding, include=list(include) + (["model.embed_tokens"] if embedding else []))
    return model.eval()


IDS = torch.tensor([[1, 5, 9, 33, 70, 2, 11, 4]])


def test_tiny_llama_round_trip_with_quantized_embedding(tiny_llama, tmp_path):
    model = _quantized(tiny_llama, TERNARY["tequila"], embedding=functools.partial(MinMax, bits=4, granularity="channel"))
    out = export_(model, tmp_path / "exp")
    meta = json.loads((out / "quant_config.json").read_text())
    assert meta["format"] == "packed" and meta["architecture"] == "LlamaForCausalLM"
    assert meta["layers"]["model.embed_tokens"]["kind"] == "embedding"
    loaded = load_packed(out)
    assert isinstance(loaded.model.layers[0].self_attn.q_proj, PackedLinear)
    assert isinstance(loaded.model.embed_tokens, PackedEmbedding)
    # the tied head keeps the float table, as in the fake-quant model (only the embedding lookup is quantized)
    assert torch.equal(loaded.lm_head.weight, tiny_llama.lm_head.weight)
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)


def test_export_leaves_the_model_unchanged(tiny_llama, tmp_path):
    model = _quantized(tiny_llama, QUANTIZERS["lsq_plus"](3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_(model, tmp_path / "a")
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_bad_input_is_refused_before_writing(tiny_llama, tmp_path):
    with pytest.raises(UserError, match="no quantized weights.*quantize_"):
        export_(copy.deepcopy(tiny_llama), tmp_path / "x")
    model = _quantized(tiny_llama, QUANTIZERS["lsq"](4))
    with pytest.raises(UserError, match="unknown export format 'onnx'; formats: packed, hf, gguf, compressed-tensors"):
        export_(model, tmp_path / "x", format="onnx")
    fresh = LSQ(bits=4)  # a quantizer that never saw data: nothing trained to export
    model.model.layers[0].mlp.up_proj.weight_quantizer = fresh
    with pytest.raises(UserError, match="not initialised.*up_proj"):
        export_(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_existing_directory_needs_overwrite(tiny_llama, tmp_path):
    model = _quantized(tiny_llama, QUANTIZERS["minmax_sym"](4))
    target = tmp_path / "exp"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="already exists"):
        export_(model, target)
    assert (target / "keep.txt").read_text() == "mine"
    export_(model, target, overwrite=True)
    assert not (target / "keep.txt").exists() and (target / "quant_config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]  # no temporary directory left


def test_interrupted_export_leaves_nothing(tiny_llama, tmp_path, monkeypatch):
    import qat.export.packed as packed

    model = _quantized(tiny_llama, QUANTIZERS["lsq"](4))
    real = packed.save

    def crash(model, tokenizer, tmp_dir):
        real(model, tokenizer, tmp_dir)  # the weights are written ...
        assert (tmp_dir / "model.safetensors").exists()
        raise KeyboardInterrupt  # ... then the export is killed before it completes

    monkeypatch.setattr(packed, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        export_(model, tmp_path / "exp")
    assert list(tmp_path.iterdir()) == []


def test_load_packed_refuses_other_directories(tmp_path):
    with pytest.raises(UserError, match="quant_config.json"):
        load_packed(tmp_path)
    (tmp_path / "quant_config.json").write_text(json.dumps({"format": "hf"}))
    with pytest.raises(UserError, match="'hf' export, not a packed one"):
        load_packed(tmp_path)


def test_public_api():
    assert qat.export_ is export_ and qat.load_packed is load_packed


# -- SmolLM2: the done-when checks on the real model ------------------------------------------------

SMOLLM2_IDS = torch.tensor([[1, 504, 3458, 5336, 30, 13, 4045, 314, 260, 1345, 2593, 28, 216, 1530]])


def _smollm2_check(smollm2, tmp_path, weight):
    model, tok = smollm2
    model = _quantized(model, weight)
    out = export_(model, tmp_path / "exp", tokenizer=tok)
    loaded = load_packed(out)
    with torch.no_grad():
        diff = (loaded(SMOLLM2_IDS).logits - model(SMOLLM2_IDS).logits).abs().max().item()
    report = size_report(out)
    print(f"max |logit diff| {diff:.3g}, size {report}")
    assert diff <= 1e-5
    assert report["ratio"] <= 1.05
    assert (out / "tokenizer.json").exists() and (out / "config.json").exists()
    return report


@pytest.mark.slow
def test_smollm2_w4_logits_and_size(smollm2, tmp_path):
    report = _smollm2_check(smollm2, tmp_path, functools.partial(LSQ, bits=4, granularity="group", group_size=32, init="minmax"))
    assert report["bits_per_weight"] == 4 + 16 / 32  # codes and float16 scales, nothing else


@pytest.mark.slow
def test_smollm2_ternary_tequila_logits_and_size(smollm2, tmp_path):
    weight = functools.partial(Ternary, "absmean", granularity="group", group_size=64, deadzone="tequila")
    report = _smollm2_check(smollm2, tmp_path, weight)
    # base-3 codes 1.6 + float16 scales 16 / 64 + the float32 extra bias, 32 bits per row of >= 576
    assert report["bits_per_weight"] < 1.6 + 16 / 64 + 32 / 576


def test_activation_quantization_is_dropped_with_a_record(tiny_llama, tmp_path):
    from qat.quantizers import PACT

    model = copy.deepcopy(tiny_llama)
    quantize_(model, weight=QUANTIZERS["lsq"](4), activation=functools.partial(PACT, bits=8, signed=True, alpha=4.0), include=["model.layers.*"])
    out = export_(model.eval(), tmp_path / "exp")
    meta = json.loads((out / "quant_config.json").read_text())
    assert all(spec["activation_dropped"] for spec in meta["layers"].values())
    for _, layer in qat.quantized_layers(model):
        layer.act_quantizer.enabled = False  # the packed model is the weight-only model
    with torch.no_grad():
        assert torch.equal(load_packed(out)(IDS).logits, model(IDS).logits)
