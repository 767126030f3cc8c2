"""qat.models: the embedded models load, run on real text, cache exactly, and fail clearly."""

import json
import time
from pydoc_data.topics import topics

import pytest
import torch

from qat.errors import UserError
from qat.models import EMBEDDED, _cache_root, _save_atomically, load_model

# Real English text that ships with CPython: a section of the language reference, and its first sentence.
ASSERT_TOPIC = topics["assert"]
ASSERT_DOC = ASSERT_TOPIC.split("\n\n")[1].replace("\n", " ")


def next_token_loss(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss.item()


def test_embedded_names():
    assert EMBEDDED == ("smollm2-135m", "all-minilm-l6-v2")


def test_smollm2_is_the_tied_135m_llama_in_eval_mode(smollm2):
    model, _ = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not model.training
    assert model.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert model.config.tie_word_embeddings
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_smollm2_predicts_real_text(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer(ASSERT_TOPIC, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size) == (1, ids.shape[1], 49152)
    assert torch.isfinite(logits).all()
    assert ids.shape[1] > 200
    assert next_token_loss(model, ids) < 3.5  # 2.84 measured; uniform guessing would be ln(49152) = 10.8


def test_smollm2_tokenizer_round_trips_and_pads(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer(ASSERT_DOC).input_ids
    assert tokenizer.decode(ids) == ASSERT_DOC
    assert tokenizer.pad_token is not None  # <|im_end|>, which is also eos
    assert tokenizer.pad_token_id == model.config.pad_token_id

    short = "The assert statement."
    batch = tokenizer([short, ASSERT_DOC], padding=True, return_tensors="pt")
    n = len(tokenizer(short).input_ids)
    assert batch.attention_mask[0].sum() == n and (batch.input_ids[0, n:] == tokenizer.pad_token_id).all()
    with torch.no_grad():
        padded = model(**batch).logits[0, :n]
        alone = model(**tokenizer(short, return_tensors="pt")).logits[0]
    torch.testing.assert_close(padded, alone, atol=1e-4, rtol=1e-4)


def test_cached_reload_is_fast_and_identical(smollm2):
    model, tokenizer = smollm2  # loaded (and, on a fresh machine, converted) once per session
    ids = tokenizer(ASSERT_DOC, return_tensors="pt").input_ids
    t0 = time.perf_counter()
    again, tokenizer2 = load_model("smollm2-135m")
    seconds = time.perf_counter() - t0
    assert seconds < 3, f"cached load took {seconds:.1f} s"
    assert again.get_output_embeddings().weight is again.get_input_embeddings().weight
    assert tokenizer2(ASSERT_DOC).input_ids == ids[0].tolist()
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, model(input_ids=ids).logits)


def test_a_local_directory_loads_by_path_with_its_task_from_the_config(smollm2):
    cached = _cache_root(None) / "smollm2-135m"  # a save_pretrained directory like any other
    causal, _ = load_model(str(cached))
    assert type(causal).__name__ == "LlamaForCausalLM"
    bare, _ = load_model(str(cached), task="embedding")
    assert type(bare).__name__ == "LlamaModel"


def mean_pooled(model, tokenizer, sentences):
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch.attention_mask.unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def test_minilm_embeds_real_sentences(minilm):
    model, tokenizer = minilm
    assert type(model).__name__ == "BertModel" and not model.training
    sentences = [ASSERT_DOC, "Assertions are a way to debug a program.", "The weather was cold and rainy all week."]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    assert hidden.shape == (3, batch.input_ids.shape[1], 384)
    e = mean_pooled(model, tokenizer, sentences)
    assert e[0] @ e[1] > 0.5 > e[0] @ e[2]  # trained weights: related sentences lie close


def test_minilm_tokenizer_round_trips(minilm):
    _, tokenizer = minilm
    ids = tokenizer(ASSERT_DOC).input_ids
    text = tokenizer.decode(ids, skip_special_tokens=True)
    assert text.startswith("assert statements are a convenient way")  # an uncased vocabulary
    assert tokenizer(text).input_ids == ids
    assert tokenizer.pad_token == "[PAD]"


def test_minilm_by_path_matches_by_name(minilm):
    model, tokenizer = minilm
    path = model.name_or_path
    by_path, _ = load_model(path)
    batch = tokenizer([ASSERT_DOC], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(by_path(**batch).last_hidden_state, model(**batch).last_hidden_state)


@pytest.mark.parametrize("dtype", ["bfloat16", torch.float16, "float32"])
def test_dtype(dtype):
    model, _ = load_model("all-minilm-l6-v2", dtype=dtype)
    expected = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    assert {p.dtype for p in model.parameters()} == {expected}


@pytest.mark.parametrize("dtype", ["int8", "fp16", torch.int8, torch.float64])
def test_bad_dtype_names_the_valid_ones(dtype):
    with pytest.raises(UserError, match="float32, bfloat16, float16"):
        load_model("all-minilm-l6-v2", dtype=dtype)


def test_bad_task():
    with pytest.raises(UserError, match="causal-lm"):
        load_model("all-minilm-l6-v2", task="seq2seq")


def test_unknown_name_lists_the_embedded_ones():
    with pytest.raises(UserError, match=r"'smollm2-360m'.*smollm2-135m, all-minilm-l6-v2.*HF_HUB_OFFLINE"):
        load_model("smollm2-360m")


def test_missing_and_wrong_paths(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_model(str(tmp_path / "model.gguf"))
    with pytest.raises(UserError, match="no such model"):
        load_model(str(tmp_path / "nothing"))
    with pytest.raises(UserError, match="without a config.json"):
        load_model(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(UserError, match="not a .gguf file"):
        load_model(str(tmp_path / "weights.bin"))


def fake_save(tag):
    def save(tmp):
        (tmp / "config.json").write_text(json.dumps({"by": tag}))

    return save


def written_by(target):
    return json.loads((target / "config.json").read_text())["by"]


def test_atomic_save_publishes_and_leaves_no_temporaries(tmp_path):
    target = tmp_path / "m"
    _save_atomically(fake_save("us"), target, current=lambda: False)
    assert written_by(target) == "us" and [p.name for p in tmp_path.iterdir()] == ["m"]


def test_atomic_save_loser_of_a_race_keeps_the_winners_copy(tmp_path):
    target = tmp_path / "m"

    def save_while_another_process_publishes(tmp):
        fake_save("us")(tmp)
        target.mkdir()
        fake_save("winner")(target)

    _save_atomically(save_while_another_process_publishes, target, current=target.exists)
    assert written_by(target) == "winner" and [p.name for p in tmp_path.iterdir()] == ["m"]


def test_atomic_save_replaces_a_stale_copy(tmp_path):
    target = tmp_path / "m"
    target.mkdir()
    fake_save("old")(target)
    _save_atomically(fake_save("new"), target, current=lambda: False)
    assert written_by(target) == "new" and [p.name for p in tmp_path.iterdir()] == ["m"]


@pytest.mark.slow
def test_cache_round_trip_matches_the_direct_gguf_load(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    from qat.models import _smollm2_135m

    gguf = _smollm2_135m()
    direct = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True)
    )
    direct_tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    ids = direct_tok(ASSERT_DOC, return_tensors="pt").input_ids

    converted, tok = load_model("smollm2-135m", cache_dir=tmp_path)  # converts into tmp_path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smollm2-135m"]
    t0 = time.perf_counter()
    cached, _ = load_model("smollm2-135m", cache_dir=tmp_path)
    assert time.perf_counter() - t0 < 3
    assert tok(ASSERT_DOC).input_ids == ids[0].tolist()
    with torch.no_grad():
        reference = direct(input_ids=ids).logits
        for m in converted, cached:
            assert m.get_output_embeddings().weight is m.get_input_embeddings().weight
            assert torch.equal(m(input_ids=ids).logits, reference)
