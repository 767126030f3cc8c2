"""Dense float16 export (qat/export/hf.py): plain transformers loads it and computes what was trained."""

import copy
import functools

import pytest
import torch

from qat.convert import quantize_
from qat.errors import UserError
from qat.export import export_
from qat.quantizers import LSQ, Ternary

W4 = functools.partial(LSQ, bits=4, granularity="group", group_size=32, init="minmax")
TEQUILA = functools.partial(Ternary, "absmean", granularity="group", group_size=32, deadzone="tequila")
IDS = torch.tensor([[1, 5, 9, 33, 70, 2, 11, 4]])


def _tiny(cls_name, **extra):
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, cls_name.replace("ForCausalLM", "Config"))(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, **extra,
    )
    return getattr(transformers, cls_name)(config).eval()


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("weight", [W4, TEQUILA], ids=["w4", "ternary-tequila"])
def test_plain_transformers_loads_the_dense_export(weight, tmp_path):
    model = quantize_(_tiny("LlamaForCausalLM"), weight=weight, include=["model.layers.*"]).eval()
    out = export_(model, tmp_path / "hf", format="hf")
    loaded = _load(out)
    assert next(iter(loaded.state_dict().values())).dtype == torch.float32  # asked for float32 ...
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:  # ... from float16 weights on disk
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    q = model.model.layers[0].self_attn.q_proj
    w_hat, extra = q.quantized_weight()
    w16 = loaded.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(w16, w_hat.detach().half().float())  # the baked weight, rounded once to float16
    if weight is TEQUILA:
        assert loaded.config.attention_bias and loaded.config.mlp_bias  # room for the folded bias
        assert torch.equal(loaded.model.layers[0].self_attn.q_proj.bias, extra.detach().half().float())
        assert torch.equal(w16, w_hat.detach())  # ternary: s * {-1, 0, 1} is exactly a float16
    else:
        assert not loaded.config.attention_bias and loaded.model.layers[0].self_attn.q_proj.bias is None
    with torch.no_grad():
        diff = (loaded(IDS).logits - model(IDS).logits).abs().max().item()
    assert diff < 1e-3, diff


def test_an_architecture_without_bias_switches_cannot_hold_tequila(tmp_path):
    model = quantize_(_tiny("MistralForCausalLM"), weight=TEQUILA, include=["model.layers.*"]).eval()
    with pytest.raises(UserError, match="cannot represent.*MistralForCausalLM.*format='packed'"):
        export_(model, tmp_path / "hf", format="hf")
    assert list(tmp_path.iterdir()) == []
    # without a folded bias Mistral exports fine
    export_(quantize_(_tiny("MistralForCausalLM"), weight=W4, include=["model.layers.*"]), tmp_path / "ok", format="hf")


@pytest.mark.slow
@pytest.mark.parametrize("weight", [W4, functools.partial(TEQUILA, group_size=64)], ids=["w4", "ternary-tequila"])
def test_smollm2_dense_export_logits(smollm2, weight, tmp_path):
    model, tok = smollm2
    model = quantize_(copy.deepcopy(model), weight=weight, include=["model.layers.*"]).eval()
    out = export_(model, tmp_path / "hf", format="hf", tokenizer=tok)
    loaded = _load(out)
    ids = tok("The quick brown fox jumps over the lazy dog. Quantization-aware training", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model(ids).logits
        diff = (loaded(ids).logits - ref).abs().max().item()
    print(f"max |logit diff| {diff:.3g} (logits span {ref.abs().max().item():.3g})")
    # measured: w4 0.077, ternary-Tequila 0.015 (logits span ~30): float16 rounding of weights with |q| > 2,
    # of the embedding table, norms and folded biases
    assert diff < 0.15
