"""compressed-tensors pack-quantized export: the package decompresses our fake-quant weights bitwise.

One SmolLM2 export holds a different grid in each of the first blocks (several config groups,
asymmetric zero points, a width stored wider than trained); it is loaded back two ways: through
the package's ``PackedQuantizationCompressor.decompress`` on the saved tensors; a one-grid export
goes through transformers' compressed-tensors integration, as a user loads it.
"""

import copy
import functools
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from qat.convert import quantize_
from qat.errors import UserError
from qat.export import compressed
from qat.nn.linear import QuantLinear
from qat.quantizers import FP4, FP8, LSQ, MinMax, Ternary
from qat.quantizers.base import Quantizer

P = functools.partial
GRIDS = {
    0: P(LSQ, bits=4, granularity="group", group_size=32),
    1: P(MinMax, bits=4, granularity="group", group_size=32, symmetric=False),
    2: P(MinMax, bits=8, granularity="channel"),
    3: P(MinMax, bits=8, granularity="group", group_size=64, symmetric=False),
    4: P(LSQ, bits=3, granularity="group", group_size=32),
    5: P(Ternary, "absmean", granularity="group", group_size=64),
}
EXPECT = {  # block -> (stored num_bits, symmetric, strategy, group_size)
    0: (4, True, "group", 32),
    1: (4, False, "group", 32),
    2: (8, True, "channel", None),
    3: (8, False, "group", 64),
    4: (4, True, "group", 32),
    5: (4, True, "group", 64),
}


@pytest.fixture(scope="module")
def exported(smollm2, tmp_path_factory, quantize_blocks):
    model = quantize_blocks(copy.deepcopy(smollm2[0]), GRIDS)
    out = tmp_path_factory.mktemp("ct")
    info = compressed.save(model, smollm2[1], out)
    return model, out, info


def ours(model, name):
    layer = model.get_submodule(name)
    return layer.weight_quantizer.codes(layer.latent_weight().detach())


def quantized_names(model):
    projections = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    return [f"model.layers.{i}.{p}" for i in GRIDS for p in projections]


def test_config_describes_each_grid(exported):
    model, out, info = exported
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert "lm_head" in qc["ignore"] and "model.layers.6.self_attn.q_proj" in qc["ignore"]
    seen = {}
    for group in qc["config_groups"].values():
        w = group["weights"]
        assert w["type"] == "int"
        for target in group["targets"]:
            seen[target] = (w["num_bits"], w["symmetric"], w["strategy"], w["group_size"])
    assert seen == {n: EXPECT[int(n.split(".")[2])] for n in quantized_names(model)}
    trained = {g["trained_bits"] for g in info["config_groups"].values() if g["num_bits"] == 4}
    assert trained == {2, 3, 4}  # ternary and 3-bit stored as int4


def test_transformers_loads_an_asymmetric_int4_export_bitwise(smollm2, tmp_path):
    # transformers 5.24 dequantizes on load with the first config group for every layer, so this
    # user path is checked on a one-grid export (the mixed one is checked through the package below).
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    model = quantize_(copy.deepcopy(smollm2[0]), weight=P(MinMax, bits=4, granularity="group", group_size=32, symmetric=False))
    compressed.save(model, smollm2[1], tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=CompressedTensorsConfig(dequantize=True))
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.17.self_attn.k_proj", "model.layers.29.mlp.down_proj"):
        assert torch.equal(loaded.get_submodule(name).weight, ours(model, name).dequantize()), name
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ids = smollm2[1]("The quick brown fox jumps over the lazy dog", return_tensors="pt").input_ids
    with safe_open(str(tmp_path / compressed.FILENAME), "pt") as f:
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "F16"  # unquantized tensors in 16 bits
        assert f.get_slice("model.layers.0.self_attn.q_proj.weight_scale").get_dtype() == "F32"
    reference = copy.deepcopy(model)  # the fake-quant model with its plain tensors as the file holds them
    with torch.no_grad():
        for m in reference.modules():
            if not isinstance(m, (QuantLinear, Quantizer)):
                for p in m.parameters(recurse=False):
                    p.copy_(p.half().float())
        torch.testing.assert_close(loaded(ids).logits, reference(ids).logits, rtol=0, atol=1e-5)


def test_the_pack_quantized_compressor_decompresses_the_saved_tensors(exported):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    model, out, _ = exported
    state = load_file(out / compressed.FILENAME)
    qc = QuantizationConfig.model_validate(json.loads((out / "config.json").read_text())["quantization_config"])
    for scheme in qc.config_groups.values():
        for name in scheme.targets:
            local = {k.removeprefix(name + "."): v for k, v in state.items() if k.startswith(name + ".")}
            assert "weight" not in local and local["weight_packed"].dtype == torch.int32
            w = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
            assert torch.equal(w, ours(model, name).dequantize()), name


@pytest.mark.parametrize(
    "factory, match",
    [
        (P(LSQ, bits=4, granularity="group", group_size=32, symmetric=False, offset=True), "offset"),
        (P(Ternary, "absmean", granularity="channel", deadzone="tequila"), "Tequila"),
    ],
)
def test_grids_the_format_cannot_hold_are_refused(factory, match):
    w = torch.randn(8, 64)
    with pytest.raises(UserError, match=match):
        compressed.weight_args(factory().init_(w).codes(w), "layer")


def test_save_refuses_a_model_without_quantized_layers(smollm2, tmp_path):
    with pytest.raises(UserError, match="no quantized Linear"):
        compressed.save(smollm2[0], smollm2[1], tmp_path)
    weight = P(LSQ, bits=4, granularity="group", group_size=32, offset=True, symmetric=False)
    model = quantize_(copy.deepcopy(smollm2[0]), weight=weight, include="model.layers.0.*")
    with pytest.raises(UserError, match="model.layers.0.self_attn.q_proj: an LSQ\\+ offset"):
        compressed.save(model, smollm2[1], tmp_path)
    assert list(tmp_path.iterdir()) == []


# -- floating-point grids: nvfp4- / mxfp4-pack-quantized, float-quantized (FP8) -----------------------

FP_GRIDS = {
    0: P(FP4, "nvfp4", scale="lsq"),  # learned E4M3 scales, moved off min-max by the fixture
    1: P(FP4, "nvfp4"),
    2: P(FP4, "mxfp4", scale="dual_lsq"),
    3: P(FP4, "mxfp4"),
    4: P(FP8, "e4m3", granularity="channel"),
    5: P(MinMax, bits=4, granularity="group", group_size=32),  # and an integer grid: a mixed-precision file
}
FP_FORMATS = {0: "nvfp4-pack-quantized", 1: "nvfp4-pack-quantized", 2: "mxfp4-pack-quantized", 3: "mxfp4-pack-quantized",
              4: "float-quantized", 5: "pack-quantized"}


def _move_learned_scales_(model, blocks, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i in blocks:
            for m in model.model.layers[i].modules():
                if isinstance(m, FP4):
                    for p in m.parameters():
                        p.mul_(2 ** (torch.rand(p.shape, generator=gen) - 0.5))
    return model


@pytest.fixture(scope="module")
def exported_fp(smollm2, tmp_path_factory, quantize_blocks):
    model = _move_learned_scales_(quantize_blocks(copy.deepcopy(smollm2[0]), FP_GRIDS), (0, 2)).eval()
    out = tmp_path_factory.mktemp("ct_fp")
    info = compressed.save(model, smollm2[1], out)
    return model, out, info


def _schemes(out):
    from compressed_tensors.quantization import QuantizationConfig

    return QuantizationConfig.model_validate(json.loads((out / "config.json").read_text())["quantization_config"])


def test_fp_export_is_mixed_precision_with_each_layer_in_its_scheme(exported_fp):
    model, out, info = exported_fp
    qc = _schemes(out)
    assert qc.format == "mixed-precision"
    seen = {}
    for scheme in qc.config_groups.values():
        for target in scheme.targets:
            seen[target] = scheme.format
            w = scheme.weights
            if scheme.format.startswith(("nvfp4", "mxfp4")):
                assert (w.num_bits, w.type, w.group_size) == (4, "float", 16 if scheme.format.startswith("nv") else 32)
    names = [f"model.layers.{i}.{p}" for i in FP_GRIDS for p in ("self_attn.q_proj", "mlp.down_proj")]
    assert {n: seen[n] for n in names} == {n: FP_FORMATS[int(n.split(".")[2])] for n in names}
    state = load_file(out / compressed.FILENAME)
    name = "model.layers.0.mlp.down_proj"  # (576, 1536)
    assert state[f"{name}.weight_packed"].dtype == torch.uint8 and state[f"{name}.weight_packed"].shape == (576, 768)
    assert state[f"{name}.weight_scale"].dtype == torch.float8_e4m3fn and state[f"{name}.weight_scale"].shape == (576, 96)
    g = state[f"{name}.weight_global_scale"]
    assert g.dtype == torch.float32 and g.shape == (1,) and torch.frexp(g)[0].item() == 0.5  # 1 / s_tensor, a power of two
    assert state["model.layers.2.mlp.down_proj.weight_scale"].dtype == torch.uint8  # E8M0 exponents
    assert state["model.layers.4.mlp.down_proj.weight"].dtype == torch.float8_e4m3fn


def test_the_fp_compressors_decompress_the_saved_tensors_bitwise(exported_fp):
    model, out, _ = exported_fp
    state = load_file(out / compressed.FILENAME)
    checked = 0
    for scheme in _schemes(out).config_groups.values():
        for name in scheme.targets:
            local = {k.removeprefix(name + "."): v for k, v in state.items() if k.startswith(name + ".")}
            w = compressed.decompressor(scheme.format).decompress(local, scheme)["weight"]
            layer = model.get_submodule(name)
            assert torch.equal(w.float(), ours(model, name).dequantize()), name
            assert torch.equal(w.float(), layer.quantized_weight()[0]), name  # the eval forward's weight
            checked += 1
    assert checked == 7 * len(FP_GRIDS)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_transformers_and_model_compressor_load_an_fp4_export_bitwise(smollm2, tmp_path, quantize_blocks, fmt):
    # the user's path: transformers' compressed-tensors integration, ModelCompressor.decompress_model inside
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    model = quantize_blocks(copy.deepcopy(smollm2[0]), {0: P(FP4, fmt, scale="lsq"), 1: P(FP4, fmt, scale="lsq")})
    _move_learned_scales_(model, (0, 1), seed=1)
    compressed.save(model, smollm2[1], tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["format"] == f"{fmt}-pack-quantized"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=CompressedTensorsConfig(dequantize=True))
    for i in (0, 1):
        for proj in ("self_attn.q_proj", "self_attn.k_proj", "mlp.gate_proj", "mlp.down_proj"):
            name = f"model.layers.{i}.{proj}"
            assert torch.equal(loaded.get_submodule(name).weight.float(), ours(model, name).dequantize()), name


def _round_trip(codes, shape):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**compressed.weight_args(codes)))
    state = compressed._compress_fp("layer", codes, shape, scheme)
    return state, compressed.decompressor(compressed.compression_format(codes)).decompress(dict(state), scheme)["weight"]


def test_nvfp4_by_hand_all_zero_and_saturated_blocks():
    w = torch.zeros(3, 32)
    w[0, :4] = torch.tensor([10.0, 2.0, -1.0, 0.0])  # s_t = 2^-8 (10 / 2688 rounded up); scale 10/6*256 -> 416 (0x7D)
    w[1, :16] = torch.linspace(-0.5, 0.5, 16)  # row 1, block 0: its learned scale made 8x too small below
    q = FP4("nvfp4", scale="lsq").init_(w)
    with torch.no_grad():
        q.scale[1, 0] /= 8
    codes = q.eval().codes(w)
    state, back = _round_trip(codes, (3, 32))
    assert state["weight_global_scale"].item() == 256.0
    assert state["weight_scale"].view(torch.uint8)[0].tolist() == [0x7D, 0x01]  # block (0, 1) all zero: E4M3's 2^-9
    # 10 / 1.625 = 6.15 -> 6 (code 7); 2 / 1.625 = 1.23 -> 1 (2); -1 / 1.625 = -0.62 -> -0.5 (8 | 1): low nibble first
    assert state["weight_packed"][0, :2].tolist() == [7 | 2 << 4, 9 | 0 << 4]
    assert back.dtype == torch.bfloat16 and back[0, :3].float().tolist() == [9.75, 1.625, -0.8125]
    assert ((codes.codes[1, :16] & 7) == 7).sum() >= 8  # saturated: +-6 at both ends
    assert torch.equal(back.float(), q(w)) and (back[2] == 0).all()


def test_mxfp4_by_hand_all_zero_and_saturated_blocks():
    w = torch.zeros(2, 64)
    w[0, 32:36] = torch.tensor([5.0, -2.5, 1.25, 0.3])  # scale 2^0 (byte 127): 4, -2, 1, 0.5
    w[1, :32] = torch.linspace(-1.0, 1.0, 32)
    q = FP4("mxfp4", scale="lsq").init_(w)
    with torch.no_grad():
        q.scale[1, 0] /= 4  # 2^-4 instead of min-max's 2^(0 - 2): +-1 / 2^-4 = 16 saturates to 6
    codes = q.eval().codes(w)
    state, back = _round_trip(codes, (2, 64))
    assert state["weight_scale"].tolist() == [[0, 127], [123, 0]]  # all-zero blocks: e = -127, byte 0
    assert state["weight_packed"][0, 16:18].tolist() == [6 | 12 << 4, 2 | 1 << 4]
    assert back[1, 0].item() == -0.375 and back[1, 31].item() == 0.375  # -6 * 2^-4 and 6 * 2^-4
    assert torch.equal(back.float(), q(w))


def test_fp8_channel_and_tensor_by_hand():
    w = torch.tensor([[448.0, 100.0, 3.3, 0.0], [0.0, 0.0, 0.0, 0.0]])  # row 0: scale 1; 100 -> 96; row 1 all zero
    for granularity in ("channel", "tensor"):
        codes = FP8("e4m3", granularity=granularity).init_(w).codes(w)
        state, back = _round_trip(codes, (2, 4))
        assert state["weight"].dtype == torch.float8_e4m3fn and back.dtype == torch.float32
        assert back[0].tolist() == [448.0, 96.0, 3.25, 0.0] and torch.equal(back, codes.dequantize())


def test_an_nvfp4_tensor_scale_that_is_no_power_of_two_is_refused_and_why():
    w = torch.randn(4, 32) * 0.05
    q = FP4("nvfp4", scale="lsq").init_(w)
    q.tensor_scale.fill_(w.abs().max().item() / 2688)  # NVIDIA's exact amax / (6 * 448), as older checkpoints hold it
    codes = q.eval().codes(w)
    with pytest.raises(UserError, match="not a power of two"):
        compressed.weight_args(codes, "layer")
    # why: the package decompresses E2M1 * (E4M3 / (1 / s_t)) and casts to bfloat16, which cannot hold E2M1 * E4M3 * s_t
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**compressed._FP_ARGS["nvfp4"][1]))
    back = NVFP4PackedCompressor.decompress(compressed._fp_state(codes, (4, 32)), scheme)["weight"]
    assert not torch.equal(back.float(), codes.dequantize())


def test_fp_grids_without_a_scheme_are_refused(smollm2, tmp_path):
    w = torch.randn(8, 64)
    with pytest.raises(UserError, match="E5M2|e5m2"):
        compressed.weight_args(FP8("e5m2", granularity="channel").init_(w).codes(w), "layer")
    model = quantize_(copy.deepcopy(smollm2[0]), weight=P(FP4, "nvfp4"), activation=P(FP4, "nvfp4"), include="model.layers.0.mlp.up_proj")
    with pytest.raises(UserError, match="quantizes its input activations"):
        compressed.save(model, smollm2[1], tmp_path)
    assert list(tmp_path.iterdir()) == []
