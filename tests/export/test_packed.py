"""The packed format (qat/export/packed.py) and the export entry point (qat/export/__init__.py).

Exactness: for every weight quantizer and bit width, the weight rebuilt from the packed file equals
the fake-quantized weight bitwise, and ``load_packed`` reproduces the fake-quant model's logits (with
its unquantized tensors rounded to the 16-bit dtype the file stores them in, or exactly with
``unquantized_dtype="float32"``).
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
from qat.quantizers import FP4, FP8, LSQ, LWC, MinMax, Ternary

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


def _as_stored(model, out):
    """A copy of ``model`` whose tensors stored as plain tensors in ``out`` are rounded to their stored dtype."""
    from safetensors import safe_open

    from qat.export.packed import _SAFETENSORS_DTYPES

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        stored = {k: _SAFETENSORS_DTYPES[f.get_slice(k).get_dtype()] for k in f.keys()}
    model = copy.deepcopy(model)
    with torch.no_grad():
        for key, t in model.state_dict().items():
            if key in stored and t.is_floating_point():
                t.copy_(t.to(stored[key]).to(t.dtype))
    return model


def test_tiny_llama_round_trip_with_quantized_embedding_and_tied_head(tiny_llama, tmp_path):
    model = _quantized(tiny_llama, TERNARY["tequila"], embedding=functools.partial(MinMax, bits=4, granularity="channel"))
    assert model.lm_head.weight_quantizer is model.model.embed_tokens.weight_quantizer  # one table, one set of codes
    out = export_(model, tmp_path / "exp")
    meta = json.loads((out / "quant_config.json").read_text())
    assert meta["format"] == "packed" and meta["architecture"] == "LlamaForCausalLM"
    assert meta["layers"]["model.embed_tokens"]["kind"] == "embedding"
    assert meta["layers"]["lm_head"] == {"kind": "linear", "tied_to": "model.embed_tokens"}
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert not any(k.startswith("lm_head") for k in f.keys())  # the codes once, under the embedding
    loaded = load_packed(out)
    assert isinstance(loaded.model.layers[0].self_attn.q_proj, PackedLinear)
    assert isinstance(loaded.model.embed_tokens, PackedEmbedding)
    assert isinstance(loaded.lm_head, PackedLinear) and loaded.lm_head.qweight is loaded.model.embed_tokens.qweight
    w_hat = model.model.embed_tokens.weight_quantizer(model.model.embed_tokens.weight)
    assert torch.equal(loaded.lm_head.dequantized_weight(), w_hat) and torch.equal(loaded.model.embed_tokens.dequantized_weight(), w_hat)
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, _as_stored(model, out)(IDS).logits)
    assert size_report(out)["quantized_weights"] == sum(
        m.weight.numel() for n, m in qat.quantized_layers(model) if n != "lm_head")  # the tied table counted once


def test_an_excluded_tied_head_multiplies_by_the_float_table(tiny_llama, tmp_path):
    model = copy.deepcopy(tiny_llama)
    quantize_(model, weight=TERNARY["absmean"], embedding=functools.partial(MinMax, bits=8, granularity="channel"),
              include=["model.layers.*"], exclude=["lm_head"])
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens).__name__ == "QuantEmbedding"
    out = export_(model.eval(), tmp_path / "exp", unquantized_dtype="float32")
    loaded = load_packed(out)
    assert torch.equal(loaded.lm_head.weight, tiny_llama.lm_head.weight)  # stored on its own, as it was
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)


def test_unquantized_tensors_are_stored_in_16_bits_and_load_back_in_the_working_dtype(tiny_llama, tmp_path):
    from safetensors import safe_open

    model = _quantized(tiny_llama, QUANTIZERS["lsq"](4))
    sizes = {}
    for choice, expected in [("auto", "F16"), ("bfloat16", "BF16"), ("float32", "F32")]:
        out = export_(model, tmp_path / choice, unquantized_dtype=choice)
        meta = json.loads((out / "quant_config.json").read_text())
        assert meta["dtype"] == "float32" and meta["unquantized_dtype"] == {"auto": "float16"}.get(choice, choice)
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
        plain = {k: v for k, v in dtypes.items() if not k.endswith(("qweight", "scales", "zeros", "offsets", "extra_bias"))}
        assert "model.embed_tokens.weight" in plain and "lm_head.weight" not in dtypes  # the tied table once
        assert set(plain.values()) == {expected}, plain
        assert {v for k, v in dtypes.items() if k.endswith("scales")} == {"F16"}  # quantized tensors: unchanged
        loaded = load_packed(out)
        assert loaded.dtype == torch.float32 and loaded.lm_head.weight is loaded.model.embed_tokens.weight
        stored = model.model.embed_tokens.weight.to(getattr(torch, meta["unquantized_dtype"])).float()
        assert torch.equal(loaded.model.embed_tokens.weight, stored)
        for name, layer in qat.quantized_layers(model):
            assert torch.equal(loaded.get_submodule(name).dequantized_weight(), layer.quantized_weight()[0]), name
        with torch.no_grad():
            assert torch.equal(loaded(IDS).logits, _as_stored(model, out)(IDS).logits)
        sizes[choice] = size_report(out)
    # the table is 96 x 64: 2 bytes a value saved per float16 value (norms too), codes and scales unchanged
    plain32 = sizes["float32"]["unquantized_bytes"]
    assert sizes["auto"]["unquantized_bytes"] == sizes["bfloat16"]["unquantized_bytes"] == plain32 // 2
    assert sizes["float32"]["file_bytes"] - sizes["auto"]["file_bytes"] == plain32 // 2
    assert sizes["auto"]["bits_per_weight"] == sizes["float32"]["bits_per_weight"]
    with pytest.raises(UserError, match="unquantized_dtype must be one of"):
        export_(model, tmp_path / "bad", unquantized_dtype="int8")
    assert not (tmp_path / "bad").exists()


def test_a_bfloat16_model_keeps_bfloat16(tiny_llama, tmp_path):
    model = _quantized(tiny_llama, QUANTIZERS["lsq"](4)).to(torch.bfloat16)
    out = export_(model, tmp_path / "bf16")
    meta = json.loads((out / "quant_config.json").read_text())
    assert meta["dtype"] == meta["unquantized_dtype"] == "bfloat16"
    assert load_packed(out).dtype == torch.bfloat16


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

    def crash(model, tokenizer, tmp_dir, **options):
        real(model, tokenizer, tmp_dir, **options)  # the weights are written ...
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
        diff = (loaded(SMOLLM2_IDS).logits - _as_stored(model, out)(SMOLLM2_IDS).logits).abs().max().item()
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


@pytest.mark.slow
def test_smollm2_main_recipe_export_is_at_most_0_35_of_float16(smollm2, tmp_path):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from qat.config import config_dir

    node = OmegaConf.load(config_dir() / "quant" / "ternary_seq_g64.yaml")  # the main recipe's quant config
    assert node.embedding is None  # the table stays float, stored in float16
    model = quantize_(copy.deepcopy(smollm2[0]), weight=instantiate(node.weight), include=list(node.include)).eval()
    out = export_(model, tmp_path / "exp")
    fp16_bytes = 2 * sum(p.numel() for p in smollm2[0].parameters())  # the tied table once, as save_pretrained stores it
    report = size_report(out)
    print(report, report["file_bytes"] / fp16_bytes)
    assert report["unquantized_bytes"] == 2 * (49152 * 576 + 61 * 576)  # the table and 61 norms, in float16
    assert report["file_bytes"] <= 0.35 * fp16_bytes
    loaded = load_packed(out)
    for name, layer in qat.quantized_layers(model):
        assert torch.equal(loaded.get_submodule(name).dequantized_weight(), layer.quantized_weight()[0]), name


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
        assert torch.equal(load_packed(out)(IDS).logits, _as_stored(model, out)(IDS).logits)


# -- floating-point grids (FP4, FP8): codes index the format's value table ------------------------

FP_CASES = {
    "nvfp4-minmax": functools.partial(FP4, "nvfp4"),
    "nvfp4-lsq": functools.partial(FP4, "nvfp4", scale="lsq"),
    "nvfp4-dual_lsq": functools.partial(FP4, "nvfp4", scale="dual_lsq"),
    "mxfp4-minmax": functools.partial(FP4, "mxfp4"),
    "mxfp4-lsq": functools.partial(FP4, "mxfp4", scale="lsq"),
    "fp8-e4m3-channel": functools.partial(FP8, "e4m3", granularity="channel"),
    "fp8-e5m2-tensor": functools.partial(FP8, "e5m2", granularity="tensor"),
}


def _fp_layer(factory, seed=0):
    """A QuantLinear on an FP grid (64 inputs: two MXFP4 blocks) with an all-zero row and a saturated block."""
    gen = torch.Generator().manual_seed(seed)
    lin = nn.Linear(64, 24)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(24, 64, generator=gen) * 0.05)
        lin.weight[3] = 0.0  # all-zero blocks
    layer = QuantLinear.from_float(lin, factory())
    with torch.no_grad():
        for p in layer.weight_quantizer.parameters():
            p.mul_(1 + 0.2 * torch.rand(p.shape, generator=gen))  # learned scales moved off min-max
        if any(True for _ in layer.weight_quantizer.parameters()):
            next(layer.weight_quantizer.parameters())[5].mul_(0.1)  # row 5: scales far too small, its values saturate
    return layer.eval()


@pytest.mark.parametrize("factory", list(FP_CASES.values()), ids=list(FP_CASES))
def test_fp_grids_pack_and_rebuild_bitwise(factory):
    layer = _fp_layer(factory)
    codes = _codes(layer)
    spec, parts = pack_layer("layer", layer, codes)
    packed = PackedLinear(spec, parts, layer.bias.detach())
    w_hat, _ = layer.quantized_weight()
    assert torch.equal(packed.dequantized_weight(), w_hat.detach())
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    assert torch.equal(packed(x), layer(x).detach())
    assert torch.equal(packed.codes().codes, codes.codes)
    assert spec["format"] == codes.format and spec["bits"] == codes.bits
    if codes.format in ("nvfp4", "mxfp4"):
        assert set(parts) == {"qweight", "scale_codes"} | ({"tensor_scale"} if codes.format == "nvfp4" else set())
        assert parts["qweight"].numel() == 24 * 64 // 2 and parts["scale_codes"].dtype == torch.uint8
        assert torch.equal(parts["scale_codes"], codes.scale_codes.squeeze(-1))
    else:
        assert set(parts) == {"qweight", "scales"} and parts["scales"].dtype == torch.float32
    assert (packed.dequantized_weight()[3] == 0).all()


def test_fp4_saturated_block_is_stored_at_plus_minus_six():
    layer = _fp_layer(FP_CASES["nvfp4-lsq"])
    codes = _codes(layer)
    row = codes.codes[5]
    assert ((row & 7) == 7).float().mean() > 0.5  # most of the row at the largest magnitude, 6
    spec, parts = pack_layer("layer", layer, codes)
    assert torch.equal(PackedLinear(spec, parts).dequantized_weight()[5], layer.quantized_weight()[0][5])


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_smollm2_fp4_load_packed_reproduces_the_logits_bitwise(smollm2, tmp_path, quantize_blocks, fmt):
    model = quantize_blocks(copy.deepcopy(smollm2[0]), {0: functools.partial(FP4, fmt, scale="lsq"), 1: functools.partial(FP4, fmt)})
    model.eval()
    out = export_(model, tmp_path / "exp", tokenizer=smollm2[1], unquantized_dtype="float32")
    meta = json.loads((out / "quant_config.json").read_text())
    assert meta["layers"]["model.layers.0.mlp.down_proj"]["format"] == fmt
    loaded = load_packed(out)
    with torch.no_grad():
        assert torch.equal(loaded(SMOLLM2_IDS).logits, model(SMOLLM2_IDS).logits)
    report = size_report(out)
    block = 16 if fmt == "nvfp4" else 32
    assert report["bits_per_weight"] == pytest.approx(4 + 8 / block, abs=1e-3)  # codes + 1-byte scale codes (+ 1 tensor scale)
    assert report["ratio"] <= 1.0001
