"""GGUF export: gguf-py reads back our fake-quant weights bitwise, per ggml type, on SmolLM2.

One export holds a different grid in each of the first blocks (so one file, read once, covers
them all: reading a GGUF file's 49k-token vocabulary takes seconds). Block layouts are also checked
on random codes against gguf-py's dequantizers (llama.cpp's ``dequantize_row_*`` in numpy).
"""

import copy
import functools

import gguf
import numpy as np
import pytest
import torch
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

from qat.convert import quantize_
from qat.errors import UserError
from qat.export import gguf as qgguf
from qat.nn.embedding import QuantEmbedding
from qat.quantizers import FP4, FP8, LSQ, MinMax, Ternary

P = functools.partial
GRIDS = {  # block index -> weight quantizer
    0: P(LSQ, bits=4, granularity="group", group_size=32),
    1: P(MinMax, bits=4, granularity="group", group_size=32),
    2: P(MinMax, bits=8, granularity="group", group_size=32),
    3: P(Ternary, "absmean", granularity="group", group_size=64),
    4: P(Ternary, "absmean", granularity="channel"),
    5: P(Ternary, "absmean", granularity="channel", deadzone="tequila"),
    6: P(LSQ, bits=3, granularity="channel"),
    10: P(FP4, "mxfp4", scale="lsq"),  # its learned E8M0 scales moved off min-max by the fixture
    11: P(FP4, "mxfp4"),
}
PROJ = {  # HF module -> GGUF tensor
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


@pytest.fixture(scope="module")
def exported(smollm2, tmp_path_factory, quantize_blocks):
    """(model, GGUFReader, save's report) for one mixed-grid SmolLM2 export (ternary as TQ2_0)."""
    model = quantize_blocks(copy.deepcopy(smollm2[0]), GRIDS)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # "train" block 10's MXFP4 scales: some round to another power of two
        for m in model.model.layers[10].modules():
            if isinstance(m, FP4):
                m.scale.mul_(2 ** (torch.rand(m.scale.shape, generator=gen) - 0.5))
    # A quantized embedding table: token_embd becomes Q4_0 and the tied head keeps the latent table.
    table = MinMax(bits=4, granularity="group", group_size=32)
    model.model.embed_tokens = QuantEmbedding.from_float(model.model.embed_tokens, table)
    out = tmp_path_factory.mktemp("gguf")
    info = qgguf.save(model, smollm2[1], out)
    return model, gguf.GGUFReader(out / qgguf.FILENAME), info


def gguf_to_hf(reader, gguf_name, hf_name, cfg):
    """Dequantize one tensor with gguf-py and undo the Q/K permutation the way transformers' loader does."""
    t = next(t for t in reader.tensors if t.name == gguf_name)
    w = gguf.quants.dequantize(t.data, t.tensor_type)
    if hf_name.endswith(("q_proj", "k_proj")):
        n_kv = cfg.num_attention_heads if hf_name.endswith("q_proj") else cfg.num_key_value_heads
        w = LlamaTensorProcessor()._reverse_permute_weights(w, cfg.num_attention_heads, n_kv)
    return t.tensor_type.name, torch.from_numpy(np.array(w))


def ours(model, name):
    layer = model.get_submodule(name)
    return layer.weight_quantizer.codes(layer.latent_weight().detach())


def check_block(model, reader, i, expected_types):
    for proj, gname in PROJ.items():
        hf_name = f"model.layers.{i}.{proj}"
        qtype, w = gguf_to_hf(reader, f"blk.{i}.{gname}.weight", hf_name, model.config)
        assert qtype == expected_types(proj), (hf_name, qtype)
        assert torch.equal(w, ours(model, hf_name).dequantize()), hf_name


@pytest.mark.parametrize("block", [0, 1])
def test_int4_sym_g32_is_q4_0_bitwise(exported, block):
    model, reader, _ = exported
    check_block(model, reader, block, lambda proj: "Q4_0")


def test_int8_g32_is_q8_0_bitwise(exported):
    model, reader, _ = exported
    check_block(model, reader, 2, lambda proj: "Q8_0")


def test_ternary_g64_is_q4_0_bitwise(exported):
    model, reader, _ = exported
    check_block(model, reader, 3, lambda proj: "Q4_0")


@pytest.mark.parametrize("block", [10, 11])
def test_mxfp4_is_ggml_mxfp4_bitwise(exported, block):
    model, reader, _ = exported
    check_block(model, reader, block, lambda proj: "MXFP4")


def test_ternary_per_channel_uses_tq2_0_where_rows_split_into_256_blocks(exported):
    # in_features 1536 (down_proj) splits into 256-blocks; 576 does not, so those rows are Q4_0.
    model, reader, _ = exported
    check_block(model, reader, 4, lambda proj: "TQ2_0" if proj == "mlp.down_proj" else "Q4_0")


def test_ternary_per_channel_as_tq1_0_is_bitwise(exported):
    model = exported[0]
    name = "model.layers.4.mlp.down_proj"
    codes, shape = ours(model, name), tuple(model.get_submodule(name).weight.shape)
    qtype = qgguf.ggml_type(codes, shape[1], ternary="TQ1_0")
    assert qtype.name == "TQ1_0"
    w = gguf.quants.dequantize(qgguf.encode(codes, shape, qtype), qtype)
    assert torch.equal(torch.from_numpy(w), codes.dequantize())


def test_3bit_sym_is_stored_exactly_as_q4_0(exported):
    model, reader, _ = exported
    check_block(model, reader, 6, lambda proj: "Q4_0")


def test_tequila_bias_is_written_as_llama_bias_tensors(exported):
    model, reader, _ = exported
    cfg = model.config
    check_block(model, reader, 5, lambda proj: "TQ2_0" if proj == "mlp.down_proj" else "Q4_0")
    for proj, gname in PROJ.items():
        hf_name = f"model.layers.5.{proj}"
        qtype, b = gguf_to_hf(reader, f"blk.5.{gname}.bias", hf_name, cfg)
        assert qtype == "F32"
        assert torch.equal(b, ours(model, hf_name).bias), hf_name
    assert not any(t.name == "blk.4.attn_q.bias" for t in reader.tensors)  # no dead zone, no bias


def test_embedding_head_float_tensors_tokenizer_and_metadata(exported, smollm2):
    model, reader, info = exported
    tensors = {t.name: t for t in reader.tensors}
    assert "blk.7.attn_q.weight" in tensors and len(tensors) == 3 + 30 * 9 + 7  # embd, head, norm; 7 Tequila biases

    def read(name):
        t = tensors[name]
        return t.tensor_type.name, torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type)))

    embed = model.model.embed_tokens
    assert read("token_embd.weight")[0] == "Q4_0"
    assert torch.equal(read("token_embd.weight")[1], embed.weight_quantizer.codes(embed.weight.detach()).dequantize())
    # a head that shares the table but not its quantizer multiplies by the latent table, stored in float16
    assert read("output.weight")[0] == "F16"
    assert torch.equal(read("output.weight")[1], embed.weight.detach().half().float())
    norm = model.model.layers[9].post_attention_layernorm.weight.detach()
    assert read("blk.9.ffn_norm.weight")[0] == "F32"
    assert torch.equal(read("blk.9.ffn_norm.weight")[1], norm)
    qtype, w = gguf_to_hf(reader, "blk.8.attn_k.weight", "model.layers.8.self_attn.k_proj", model.config)
    assert qtype == "F16"  # unquantized matrices in the model's 16-bit dtype, permuted back exactly
    assert torch.equal(w, model.model.layers[8].self_attn.k_proj.weight.detach().half().float())
    fields = reader.fields
    assert fields["general.architecture"].contents() == "llama"
    assert fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_0
    assert fields["tokenizer.ggml.pre"].contents() == "smollm"
    assert len(fields["tokenizer.ggml.tokens"].data) == len(smollm2[1])
    assert info["tensor_types"]["Q4_0"] == 1 + 4 * 7 + 6 + 6 and info["tensor_types"]["TQ2_0"] == 2


@pytest.mark.parametrize(
    "factory, match",
    [
        (P(MinMax, bits=4, granularity="group", group_size=32, symmetric=False), "asymmetric"),
        (P(LSQ, bits=4, granularity="group", group_size=32, symmetric=False, offset=True), "offset"),
        (P(LSQ, bits=4, granularity="group", group_size=16), "inside a 32-weight ggml block"),
    ],
)
def test_grids_without_an_exact_ggml_type_are_refused(factory, match):
    w = torch.randn(16, 64)
    codes = factory().init_(w).codes(w)
    with pytest.raises(UserError, match=match) as e:
        qgguf.ggml_type(codes, 64, name="blk")
    assert "symmetric=true" in str(e.value) and "group_size 32" in str(e.value)


def test_rows_that_do_not_split_into_blocks_are_refused():
    w = torch.randn(8, 48)
    with pytest.raises(UserError, match="in_features=48 does not split into 32-weight"):
        qgguf.ggml_type(LSQ(bits=4, granularity="channel").init_(w).codes(w), 48)


def test_scales_that_are_not_float16_are_refused():
    w = torch.randn(8, 64)
    codes = LSQ(bits=4, granularity="group", group_size=32).init_(w).codes(w)
    codes.scale = codes.scale + 1e-6  # between two float16 values
    with pytest.raises(UserError, match="float16"):
        qgguf.ggml_type(codes, 64)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"weight": P(MinMax, bits=4, granularity="group", group_size=32, symmetric=False)}, "q_proj: an asymmetric grid"),
        ({"weight": GRIDS[0], "activation": P(LSQ, bits=8, granularity="tensor")}, "q_proj quantizes its input activations"),
    ],
)
def test_save_refuses_before_writing(smollm2, tmp_path, kwargs, match):
    model = quantize_(copy.deepcopy(smollm2[0]), include="model.layers.0.self_attn.q_proj", **kwargs)
    with pytest.raises(UserError, match=match):
        qgguf.save(model, smollm2[1], tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_other_architectures_and_models_without_a_source_gguf(minilm, exported, tmp_path, monkeypatch):
    with pytest.raises(UserError, match="llama-architecture"):
        qgguf.save(minilm[0], minilm[1], tmp_path)
    model = exported[0]
    monkeypatch.setattr(model, "name_or_path", str(tmp_path))
    monkeypatch.setattr(model.config, "_name_or_path", str(tmp_path))
    with pytest.raises(UserError, match="source=<file.gguf>"):
        qgguf.save(model, None, tmp_path)


@pytest.mark.parametrize("qtype, lo, hi", [("Q4_0", -8, 7), ("Q8_0", -128, 127), ("TQ2_0", -1, 1), ("TQ1_0", -1, 1)])
def test_block_bytes_match_gguf_dequantize_on_random_codes(qtype, lo, hi):
    g = torch.Generator().manual_seed(0)
    qt = gguf.GGMLQuantizationType[qtype]
    block = gguf.GGML_QUANT_SIZES[qt][0]
    q = torch.randint(lo, hi + 1, (6, 2 * 256), generator=g, dtype=torch.int8)
    q[0, :block] = lo  # extremes
    q[1, :block] = hi
    d = (torch.rand(6, q.shape[1] // block, generator=g) * 0.1).half()
    d[2, 0] = 6e-8  # a float16 subnormal
    if qtype.startswith("TQ"):
        raw = qgguf.pack_ternary(q.numpy(), d.numpy(), qt)
    else:
        raw = {"Q4_0": qgguf.pack_q4_0, "Q8_0": qgguf.pack_q8_0}[qtype](q.numpy(), d.numpy())
    assert raw.shape == (6, q.shape[1] // block * gguf.GGML_QUANT_SIZES[qt][1])
    expected = q.float() * d.float().repeat_interleave(block, dim=1)
    assert torch.equal(torch.from_numpy(gguf.quants.dequantize(raw, qt)), expected)


def test_hf_to_gguf_rows_inverts_transformers_reverse_permute():
    for n_head, n_kv in [(9, 9), (9, 3)]:
        w = np.arange(n_kv * 64 * 3).reshape(n_kv * 64, 3)
        back = LlamaTensorProcessor()._reverse_permute_weights(qgguf.hf_to_gguf_rows(w, n_kv), n_head, n_kv)
        assert np.array_equal(back, w)


def test_a_planned_mix_exports_each_tensor_in_its_own_type_bitwise(smollm2, tmp_path):
    """Issue 18: a plan (qat.plan, Fisher on two calibration blocks) over blocks 0-1 with candidates GGUF holds
    (ternary per row, int4 g32, int8 g32) becomes rules; the GGUF file has each tensor's own type, values exact."""
    from qat.plan import make_plan

    model = copy.deepcopy(smollm2[0])
    names = [f"model.layers.{i}.{p}" for i in (0, 1) for p in PROJ]
    nodes = {"ternary": {"_target_": "qat.quantizers.Ternary", "_partial_": True, "method": "absmean", "granularity": "channel"},
             "w4": {"_target_": "qat.quantizers.MinMax", "_partial_": True, "bits": 4, "granularity": "group", "group_size": 32},
             "w8": {"_target_": "qat.quantizers.MinMax", "_partial_": True, "bits": 8, "granularity": "group", "group_size": 32}}
    ids = smollm2[1]("def f(x):\n    return [y * 2 for y in x]  # a list comprehension", return_tensors="pt").input_ids
    plan = make_plan(model, names, nodes, [ids], bits=3.5, method="fisher")
    assert len({c for _, c, _, _ in plan.chosen()}) > 1, plan.table()  # a real mix
    from hydra.utils import instantiate

    rules = [(r["pattern"], {"weight": instantiate(r["weight"])}) for r in plan.rules()]
    quantize_(model, include=["model.layers.0.*", "model.layers.1.*"], rules=rules)
    qgguf.save(model, smollm2[1], tmp_path)
    reader = gguf.GGUFReader(tmp_path / qgguf.FILENAME)
    expected = {"ternary": ("TQ2_0", "Q4_0"), "w4": ("Q4_0",), "w8": ("Q8_0",)}  # ternary rows of 576 fall back to Q4_0
    for name, cand, _, _ in plan.chosen():
        i, proj = name.split(".")[2], name.split(".", 3)[3]
        qtype, w = gguf_to_hf(reader, f"blk.{i}.{PROJ[proj]}.weight", name, model.config)
        assert qtype in expected[cand], (name, cand, qtype)
        assert torch.equal(w, ours(model, name).dequantize()), name


def test_unquantized_matrices_follow_the_16_bit_dtype_and_vectors_stay_f32():
    t = torch.randn(4, 32) * 0.1
    a, raw = qgguf._float_array(t)
    assert a.dtype == np.float16 and raw is None and torch.equal(torch.from_numpy(a).float(), t.half().float())
    a, raw = qgguf._float_array(t, torch.bfloat16)
    assert raw == gguf.GGMLQuantizationType.BF16
    assert torch.equal(torch.from_numpy(np.array(gguf.quants.dequantize(a, raw))), t.bfloat16().float())
    assert qgguf._float_array(t[0])[0].dtype == np.float32  # a norm
    assert qgguf._float_array(t, torch.float32)[0].dtype == np.float32  # not float16 values: kept exactly


def _mxfp4_by_hand():
    """A (4, 64) weight: an all-zero block, a block worked by hand, a saturated block, a block below 2^-125."""
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(0)) * 0.05
    w[0, :32] = 0.0
    w[0, 32:] = 0.0
    w[0, 32:36] = torch.tensor([5.0, -2.5, 1.25, 0.3])  # amax 5: scale 2^0 (byte 127); 5 -> 4, -2.5 -> -2, 1.25 -> 1, 0.3 -> 0.5
    w[0, 48] = -0.1  # -> -0.0: code 8
    w[2, 32:] = torch.linspace(-1e-38, 1e-38, 32)  # e clamped to -127 (byte 0): ggml's half scale 2^-128 is subnormal
    q = FP4("mxfp4", scale="lsq").init_(w)
    with torch.no_grad():
        q.scale[1, 0] /= 8  # row 1, block 0: scale 8x too small, its values saturate to +-6
    return w, q.eval()


def test_mxfp4_blocks_by_hand_against_gguf_dequantize():
    w, q = _mxfp4_by_hand()
    codes = q.codes(w)
    raw = qgguf.encode(codes, (4, 64), qgguf.ggml_type(codes, 64))
    assert raw.shape == (4, 2 * 17) and raw.dtype == np.uint8
    assert raw[0, :17].tolist() == [0] * 17  # all-zero block: e = -127 (byte 0), codes 0
    # block (0, 1): scale byte 127; byte j holds element j (low nibble) and j + 16 (high): codes 6, 12, 2, 1 and 8 at 16
    assert raw[0, 17] == 127 and raw[0, 18:22].tolist() == [6 | 8 << 4, 12, 2, 1]
    assert ((codes.codes[1, :32] & 7) == 7).sum() > 16  # the saturated block: mostly +-6
    # 1e-38 = 1.70 * 2^-127 -> 1.5 * 2^-127; the levels 0.5 * 2^-127 = 2^-128 and 2^-127 are float32 subnormals
    tiny = set(codes.dequantize()[2, 32:].abs().tolist())
    assert raw[2, 17] == 0 and tiny == {0.0, 2.0**-128, 2.0**-127, 1.5 * 2.0**-127}
    back = torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.MXFP4))
    assert torch.equal(back, codes.dequantize()) and torch.equal(back, q(w))
    assert back[0, 48].item() == 0.0 and not torch.signbit(back[0, 48])  # -0 reads back as +0 (equal values)


def test_mxfp4_dual_lsq_exports_its_post_scale_and_the_codes_its_pre_scale_picked():
    # the recipe's mode (smollm2_mxfp4): codes chosen under a continuous pre-scale, stored under the power-of-two post-scale
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(1)) * 0.05
    q = FP4("mxfp4", scale="dual_lsq").init_(w)
    with torch.no_grad():
        q.scale.mul_(1.3)        # pre-scales off the grid: other codes than min-max's
        q.scale_post[0, 1] *= 2  # one stored scale a power of two up
    q.eval()
    codes = q.codes(w)
    assert not torch.equal(codes.codes, FP4("mxfp4").init_(w).codes(w).codes)
    raw = qgguf.encode(codes, (4, 64), qgguf.ggml_type(codes, 64))
    back = torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.MXFP4))
    assert torch.equal(back, q(w))


def test_mxfp4_minmax_blocks_are_the_bytes_gguf_py_quantizes():
    # gguf-py's own MXFP4 quantizer, given our fake-quant values (on the grid already), finds the same
    # exponent and codes (its -0 is +0): the two layouts agree byte for byte
    w = torch.randn(8, 128, generator=torch.Generator().manual_seed(1)) * 0.05
    w[3, :32] = 0.0
    w[4, :32] *= 100  # large values: a bigger exponent
    q = FP4("mxfp4").init_(w).eval()
    codes = q.codes(w)
    codes.codes = torch.where(codes.codes == 8, 0, codes.codes).to(torch.uint8)
    ours_ = qgguf.encode(codes, (8, 128), gguf.GGMLQuantizationType.MXFP4)
    theirs = gguf.quants.quantize(q(w).numpy(), gguf.GGMLQuantizationType.MXFP4)
    assert np.array_equal(ours_, theirs)


@pytest.mark.parametrize(
    "factory, match",
    [(P(FP4, "nvfp4"), "NVFP4 has an FP32 tensor scale"), (P(FP8, "e4m3"), "no type for fp8_e4m3")],
)
def test_fp_grids_without_a_ggml_type_are_refused(factory, match):
    w = torch.randn(8, 64)
    with pytest.raises(UserError, match=match):
        qgguf.ggml_type(factory().init_(w).codes(w), 64, name="blk")
