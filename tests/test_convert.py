import functools

import pytest
import torch
from torch import nn

import qat
from qat.errors import UserError
from qat.nn import QuantEmbedding, QuantLinear
from qat.quantizers import LSQ, PACT, MinMax, Ternary


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 64)
        self.block = nn.ModuleDict({"q_proj": nn.Linear(64, 64), "up_proj": nn.Linear(64, 96), "down_proj": nn.Linear(96, 64)})
        self.lm_head = nn.Linear(64, 50, bias=False)
        self.lm_head.weight = self.embed.weight

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, ids):
        h = self.embed(ids)
        h = h + self.block["q_proj"](h)
        h = h + self.block["down_proj"](torch.relu(self.block["up_proj"](h)))
        return self.lm_head(h)


LSQ4 = functools.partial(LSQ, bits=4, granularity="group", group_size=32)


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


def test_default_excludes_output_head_and_quantizes_every_other_linear():
    m = Toy()
    qat.quantize_(m, weight=LSQ4)
    names = [n for n, _ in qat.quantized_layers(m)]
    assert names == ["block.q_proj", "block.up_proj", "block.down_proj"]
    assert type(m.lm_head) is nn.Linear
    assert m.lm_head.weight is m.embed.weight  # tie intact


def test_each_layer_gets_its_own_quantizer_and_forward_backward_runs():
    m = Toy()
    qat.quantize_(m, weight=LSQ4, activation=functools.partial(LSQ, bits=8, granularity="tensor"))
    qs = [layer.weight_quantizer for _, layer in qat.quantized_layers(m)]
    assert len({id(q) for q in qs}) == len(qs)
    ids = torch.randint(0, 50, (2, 7))
    qat.calibrate_(m, ids)
    assert all(layer.act_quantizer._ready for _, layer in qat.quantized_layers(m))
    m(ids).logsumexp(-1).mean().backward()
    assert all(q.scale.grad is not None for q in qs)


def test_include_exclude_patterns():
    m = Toy()
    qat.quantize_(m, weight=LSQ4, include="block.*", exclude=["*down_proj"])
    assert [n for n, _ in qat.quantized_layers(m)] == ["block.q_proj", "block.up_proj"]


def test_explicit_empty_exclude_quantizes_the_head_and_embedding_factory():
    m = Toy()
    qat.quantize_(m, weight=LSQ4, exclude=(), embedding=functools.partial(MinMax, bits=4, granularity="channel"))
    assert isinstance(m.lm_head, QuantLinear) and isinstance(m.embed, QuantEmbedding)
    assert m(torch.randint(0, 50, (1, 4))).shape == (1, 4, 50)


class ToyLM(Toy):
    def get_input_embeddings(self):
        return self.embed


def test_embedding_factory_quantizes_the_input_embedding_and_the_head_tied_to_it():
    m = ToyLM()
    qat.quantize_(m, weight=LSQ4, include="block.*", embedding=functools.partial(MinMax, bits=8, granularity="channel"))
    assert isinstance(m.embed, QuantEmbedding)  # the input embedding, though include names the block only
    assert isinstance(m.lm_head, QuantLinear) and m.lm_head.weight is m.embed.weight
    assert m.lm_head.weight_quantizer is m.embed.weight_quantizer  # one quantized table for lookup and head
    ids = torch.randint(0, 50, (1, 4))
    w_hat = m.embed.weight_quantizer(m.embed.weight)
    assert torch.equal(m.lm_head.quantized_weight()[0], w_hat)
    plain = qat.dequantize_(m)
    assert plain.lm_head.weight is plain.embed.weight and torch.equal(plain.embed.weight, w_hat)  # still tied
    assert plain(ids).shape == (1, 4, 50)


def test_a_head_named_in_exclude_stays_float_beside_a_quantized_embedding():
    m = ToyLM()
    qat.quantize_(m, weight=LSQ4, include="block.*", exclude=["lm_head"], embedding=functools.partial(MinMax, bits=8, granularity="channel"))
    assert isinstance(m.embed, QuantEmbedding) and type(m.lm_head) is nn.Linear and m.lm_head.weight is m.embed.weight


def test_an_embedding_quantizer_with_a_dead_zone_bias_is_refused():
    # Tequila's bias is lam * (sum of the dead-zone weights) per output row: a lookup adds no bias, and the head tied to
    # the table would add one the embedding lacks. Refused before any layer is swapped.
    m = ToyLM()
    before = snapshot(m)
    with pytest.raises(UserError, match=r"embed: .*deadzone=null"):
        qat.quantize_(m, weight=LSQ4, include="block.*", embedding=functools.partial(Ternary, deadzone="tequila"))
    assert snapshot(m)[1] == before[1] and all(torch.equal(v, before[0][k]) for k, v in m.state_dict().items())
    qat.quantize_(m, weight=LSQ4, include="block.*", embedding=functools.partial(Ternary))  # the same grid without it
    assert isinstance(m.embed, QuantEmbedding) and m.lm_head.weight_quantizer is m.embed.weight_quantizer


def test_quant_embedding_in_the_config_is_applied():
    from transformers import LlamaConfig, LlamaForCausalLM

    from qat.config import compose, quantize

    def model():
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))

    cfg = compose(["quant=ternary_seq_g64"])
    assert cfg.quant.embedding is None  # the main recipe's config: the table stays float
    plain = model()
    quantize(cfg, plain)
    assert type(plain.model.embed_tokens) is nn.Embedding and type(plain.lm_head) is nn.Linear
    cfg = compose(["quant=ternary_seq_g64", "quant.embedding={_target_:qat.quantizers.MinMax,_partial_:true,bits:8,granularity:channel}"])
    quantized = model()
    quantize(cfg, quantized)
    emb = quantized.model.embed_tokens
    assert isinstance(emb, QuantEmbedding) and emb.weight_quantizer.bits == 8 and emb.weight_quantizer.granularity == "channel"
    assert quantized.lm_head.weight_quantizer is emb.weight_quantizer


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(weight=functools.partial(LSQ, bits=0)), UserError, ["bits=0", "2 to 8"]),
        (dict(weight=functools.partial(LSQ, bits=9)), UserError, ["bits=9"]),
        (dict(weight=functools.partial(LSQ, bits=4, granularity="group", group_size=40)), UserError,
         ["block.q_proj", "group_size=40", "in_features=64", "valid group sizes", "32"]),
        (dict(weight=LSQ4, include="decoder.*"), UserError, ["include pattern", "decoder.*", "matches no layer"]),
        (dict(weight=LSQ4, exclude=["nothing_here"]), UserError, ["exclude pattern", "nothing_here"]),
        (dict(weight=lambda: nn.Linear(2, 2)), UserError, ["Quantizer"]),
        (dict(), UserError, ["at least one"]),
    ],
)
def test_bad_input_raises_before_the_model_changes(kwargs, error, words):
    m = Toy()
    before, types = snapshot(m)
    with pytest.raises(error) as info:
        qat.quantize_(m, **kwargs)
    for w in words:
        assert w in str(info.value)
    after, types_after = snapshot(m)
    assert types == types_after
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_integer_weight_is_refused_naming_the_layer():
    m = Toy()
    m.block["q_proj"].weight = nn.Parameter(torch.zeros(64, 64, dtype=torch.int32), requires_grad=False)
    with pytest.raises(UserError, match="block.q_proj.*int32"):
        qat.quantize_(m, weight=LSQ4)
    assert not list(qat.quantized_layers(m))


def test_nan_weight_is_a_value_error_naming_the_layer():
    m = Toy()
    with torch.no_grad():
        m.block["down_proj"].weight[0, 0] = float("nan")
    with pytest.raises(UserError, match="block.down_proj.*non-finite"):
        qat.quantize_(m, weight=LSQ4)
    assert not list(qat.quantized_layers(m))


def test_nan_in_calibration_batch_is_a_value_error():
    layer = nn.Linear(8, 4)
    m = nn.Sequential(layer)
    qat.quantize_(m, weight=functools.partial(MinMax, bits=8), activation=functools.partial(PACT, bits=8))
    x = torch.randn(2, 8)
    x[0, 0] = float("inf")
    with pytest.raises(UserError, match="non-finite"):
        qat.calibrate_(m, x)


def test_quantizing_twice_is_refused_and_dequantize_restores_plain_layers():
    m = Toy()
    qat.quantize_(m, weight=functools.partial(Ternary, deadzone="tequila"))
    with pytest.raises(UserError, match="already quantized"):
        qat.quantize_(m, weight=LSQ4)
    ids = torch.randint(0, 50, (2, 5))
    m.eval()
    expected = m(ids)
    qat.dequantize_(m)
    assert not list(qat.quantized_layers(m))
    assert all(type(m.block[k]) is nn.Linear for k in m.block)
    torch.testing.assert_close(m(ids), expected)
    # the baked weights lie on the ternary grid: three distinct magnitudes per row at most
    w = m.block["q_proj"].weight
    assert all(len(torch.unique(row.abs())) <= 2 for row in w)
    with pytest.raises(UserError, match="nothing to dequantize"):
        qat.dequantize_(m)


def test_minilm_and_gpt2_from_config_run_after_quantize():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=128, n_positions=32, bos_token_id=0, eos_token_id=0))
    qat.quantize_(gpt2, weight=LSQ4)
    assert len(list(qat.quantized_layers(gpt2))) == 8  # c_attn, c_proj, c_fc, mlp.c_proj per block
    out = gpt2(torch.randint(0, 128, (2, 9)), labels=torch.randint(0, 128, (2, 9)))
    out.loss.backward()
    assert torch.isfinite(out.loss)


# ---------------------------------------------------------------- per-layer rules (mixed precision)


def _three_blocks():
    torch.manual_seed(0)
    return nn.ModuleDict({f"b{i}": nn.ModuleDict({"attn": nn.Linear(64, 64), "mlp": nn.Linear(64, 64)}) for i in range(3)})


def test_rules_first_match_wins_and_missing_keys_keep_the_default():
    m = _three_blocks()
    w4 = functools.partial(LSQ, bits=4, granularity="group", group_size=32)
    rules = [("b0.*", {"weight": functools.partial(MinMax, bits=8, granularity="channel")}),  # first: b0.mlp takes 8 bits, not 2
             ("*.mlp", {"weight": functools.partial(MinMax, bits=2, granularity="group", group_size=32, symmetric=False)}),
             ("b2.attn", {"weight": None}),                                          # left float
             ("b1.attn", {"activation": functools.partial(MinMax, bits=8, granularity="token")})]  # weight key left out: w4
    qat.quantize_(m, weight=w4, rules=rules)
    bits = {f"{b}.{k}": (m[b][k].weight_quantizer.grid.bits if isinstance(m[b][k], QuantLinear) else None)
            for b in m for k in m[b]}
    assert bits == {"b0.attn": 8, "b0.mlp": 8, "b1.attn": 4, "b1.mlp": 2, "b2.attn": None, "b2.mlp": 2}
    assert type(m["b2"]["attn"]) is nn.Linear
    assert m["b1"]["attn"].act_quantizer is not None and m["b0"]["attn"].act_quantizer is None


def test_rules_that_match_nothing_or_have_other_keys_are_refused_before_any_change():
    m = _three_blocks()
    w4 = functools.partial(LSQ, bits=4, granularity="group", group_size=32)
    with pytest.raises(UserError, match="rule pattern 'b9.*' matches no layer"):
        qat.quantize_(m, weight=w4, rules=[("b0.*", {"weight": w4}), ("b9.*", {"weight": w4})])
    with pytest.raises(UserError, match="a rule is"):
        qat.quantize_(m, weight=w4, rules=[("b0.*", {"bits": 4})])
    assert not any(isinstance(x, QuantLinear) for x in m.modules())


def test_iter_codes_yields_every_quantized_weight_in_module_order():
    m = Toy()
    qat.quantize_(m, weight=LSQ4, include=["block.*"])
    m.embed = QuantEmbedding.from_float(m.embed, MinMax(bits=4, granularity="channel"))
    m.lm_head = QuantLinear.from_float(m.lm_head, None, PACT(bits=8))
    got = list(qat.iter_codes(m))
    assert [n for n, _, _ in got] == ["embed", "block.q_proj", "block.up_proj", "block.down_proj"]  # lm_head: activations only
    for name, layer, codes in got:
        assert layer is m.get_submodule(name)
        assert torch.equal(codes.dequantize(), layer.weight_quantizer(layer.latent_weight()).detach())
