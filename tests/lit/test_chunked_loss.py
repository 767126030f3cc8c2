"""Chunked cross-entropy: the same loss and gradients as the full logits, with a quantized head too."""

from __future__ import annotations

import functools

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import qat
from qat.errors import UserError
from qat.lit.chunked_loss import chunked_causal_lm_loss
from qat.lit.objectives import CausalLM
from qat.quantizers import LSQ


def tiny_llama(seed=0, tie=True):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie)
    return LlamaForCausalLM(config)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
@pytest.mark.parametrize("tie", [True, False])
def test_chunked_loss_and_gradients_equal_the_full_logits(chunk, tie):
    model = tiny_llama(tie=tie)
    qat.quantize_(model, weight=functools.partial(LSQ, bits=4, granularity="group", group_size=16), include="model.layers.*")
    ids = torch.randint(0, 97, (3, 21))
    full = model(input_ids=ids, labels=ids).loss
    full.backward()
    ref = grads(model)
    model.zero_grad(set_to_none=True)
    loss = chunked_causal_lm_loss(model, ids, chunk)
    loss.backward()
    torch.testing.assert_close(loss, full, rtol=1e-6, atol=1e-6)
    got = grads(model)
    assert got.keys() == ref.keys() and any("_quantizer." in n for n in got)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6, msg=name)


def test_padding_is_not_predicted_and_no_grad_path_matches():
    model = tiny_llama()
    ids = torch.randint(0, 97, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss = chunked_causal_lm_loss(model, ids, 4, attention_mask=mask)
    torch.testing.assert_close(loss, full, rtol=1e-6, atol=1e-6)


def test_objective_uses_chunks_and_refuses_bad_settings():
    model = tiny_llama()
    ids = torch.randint(0, 97, (2, 11))
    loss, logs = CausalLM(chunk_tokens=5)(model, {"input_ids": ids})
    torch.testing.assert_close(loss, model(input_ids=ids, labels=ids).loss, rtol=1e-6, atol=1e-6)
    assert logs["ce"] == loss.detach()
    with pytest.raises(UserError, match="chunk_tokens=0"):
        CausalLM(chunk_tokens=0)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(UserError, match="final_logit_softcapping.*chunk_tokens=null"):
        chunked_causal_lm_loss(model, ids, 4)
