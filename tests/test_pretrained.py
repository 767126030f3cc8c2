"""quantize_ on the embedded real models: SmolLM2-135M (Llama) and all-MiniLM-L6-v2 (BERT)."""

import copy
import functools

import pytest
import torch

import qat
from qat.corpus import shipped_text, token_blocks
from qat.errors import UserError
from qat.metrics import perplexity
from qat.quantizers import LSQ, MinMax, Ternary

DECODER = "model.layers.*"


@pytest.fixture(scope="module")
def heldout(smollm2):
    _, tokenizer = smollm2
    return token_blocks(tokenizer, shipped_text(), 256)[:8]  # the first 2,048 tokens: the held-out split


@pytest.fixture(scope="module")
def fp_ppl(smollm2, heldout):
    return perplexity(smollm2[0], heldout)


def quantized_copy(model, **kwargs):
    m = copy.deepcopy(model)
    qat.quantize_(m, include=DECODER, **kwargs)
    return m


def test_decoder_has_210_linear_layers_and_head_and_embeddings_stay_float(smollm2):
    m = quantized_copy(smollm2[0], weight=functools.partial(MinMax, bits=8))
    names = [n for n, _ in qat.quantized_layers(m)]
    assert len(names) == 210
    assert type(m.lm_head) is torch.nn.Linear and type(m.model.embed_tokens) is torch.nn.Embedding
    assert m.lm_head.weight is m.model.embed_tokens.weight


def test_int8_per_channel_keeps_perplexity_within_one_percent(smollm2, heldout, fp_ppl):
    m = quantized_copy(smollm2[0], weight=functools.partial(MinMax, bits=8, granularity="channel"))
    ppl = perplexity(m, heldout)
    assert 5 < fp_ppl < 40  # real English text, a real model
    assert abs(ppl / fp_ppl - 1) < 0.01, (ppl, fp_ppl)


def test_ternary_absmean_round_to_nearest_collapses(smollm2, heldout, fp_ppl):
    m = quantized_copy(smollm2[0], weight=functools.partial(Ternary, method="absmean", granularity="channel"))
    ppl = perplexity(m, heldout)
    print(f"FP {fp_ppl:.2f}  ternary absmean RTN {ppl:.3g}")
    assert ppl > 1000 * fp_ppl  # the gap QAT has to close (about 3e7 on 20k tokens)


def test_lsq_training_step_on_smollm2_moves_scales(smollm2, heldout):
    m = quantized_copy(smollm2[0], weight=functools.partial(LSQ, bits=4, granularity="group", group_size=32))
    m.train()
    ids = heldout[:1, :64]
    m(input_ids=ids, labels=ids).loss.backward()
    q = m.model.layers[0].self_attn.q_proj.weight_quantizer
    assert q.scale.grad is not None and q.scale.grad.abs().sum() > 0
    assert m.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_group_size_128_is_refused_on_smollm2_naming_the_layer(smollm2):
    model = smollm2[0]
    with pytest.raises(UserError, match=r"model\.layers\.0\.self_attn\.q_proj: group_size=128 does not divide in_features=576.*64"):
        qat.quantize_(model, weight=functools.partial(LSQ, bits=4, granularity="group", group_size=128), include=DECODER)
    assert not list(qat.quantized_layers(model))


def test_minilm_runs_after_quantize(minilm):
    model, tokenizer = minilm
    m = copy.deepcopy(model)
    batch = tokenizer(["Assert statements are a convenient way to insert debugging assertions."], return_tensors="pt")
    ref = model(**batch).last_hidden_state
    qat.quantize_(m, weight=functools.partial(LSQ, bits=8, granularity="channel"))
    assert len(list(qat.quantized_layers(m))) == 37  # 6 x (query, key, value, attn out, intermediate, output) + pooler
    out = m(**batch).last_hidden_state
    cos = torch.nn.functional.cosine_similarity(out.mean(1), ref.mean(1)).item()
    assert cos > 0.99
