"""qat.lit.data: held-out splits, every source type, datasets' cache, the resumable stream, bad input.

All text is real: the shipped corpus (CPython's documentation topics) or files written here from it.
"""

import copy
import json
import os
import time
import warnings
from pydoc_data.topics import topics

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from qat.corpus import COMMON_LICENSES, licenses_text, shipped_text, token_blocks
from qat.errors import UserError
from qat.lit.data import (
    BatchStream,
    SentenceDataModule,
    TextDataModule,
    split_sentences,
    stream_batch_indices,
    text_file,
)

SEQ = 64
HELD = 16 * SEQ  # 16 held-out blocks
DOCS = [topics[k].strip() for k in sorted(topics)][:40]  # 40 real documents, about 9k tokens


@pytest.fixture(scope="module")
def tok(smollm2):
    return smollm2[1]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("qat-data-cache")


@pytest.fixture(scope="module")
def dm(tok, cache):
    dm = TextDataModule(tok, seq_len=SEQ, batch_size=4, heldout_tokens=HELD, cache_dir=cache)
    dm.setup()
    return dm


def rows(blocks):
    return {tuple(r.tolist()) for r in blocks}


def text_dm(tok, source, cache, **kw):
    kw = {"seq_len": SEQ, "batch_size": 2, "heldout_tokens": 4 * SEQ, "cache_dir": cache} | kw
    dm = TextDataModule(tok, source, **kw)
    dm.setup()
    return dm


# ---------------------------------------------------------------- split


def test_shipped_heldout_is_the_first_token_blocks_and_never_trains(dm, tok):
    ref = token_blocks(tok, shipped_text(), SEQ)
    held, train = dm.heldout_blocks(), dm.train_blocks()
    assert held.dtype == train.dtype == torch.long
    assert torch.equal(held, ref[:16])
    assert torch.equal(train, ref[16:])  # one document: the closing eos falls in the dropped tail
    assert not rows(held) & rows(train)
    assert dm.n_heldout == 16 and dm.tokens_per_sample == SEQ


def test_two_instances_agree_and_the_seed_changes_only_the_order(dm, tok, cache):
    other = TextDataModule(tok, seq_len=SEQ, batch_size=4, heldout_tokens=HELD, cache_dir=cache)
    other.setup()
    assert torch.equal(other.heldout_blocks(), dm.heldout_blocks())
    a, b = iter(dm.train_dataloader()), iter(other.train_dataloader())
    for _ in range(5):
        x, y = next(a), next(b)
        assert list(x) == ["input_ids"] and x["input_ids"].shape == (4, SEQ)
        assert torch.equal(x["input_ids"], y["input_ids"])
    reseeded = TextDataModule(tok, seq_len=SEQ, batch_size=4, heldout_tokens=HELD, cache_dir=cache, seed=1)
    reseeded.setup()
    assert torch.equal(reseeded.train_blocks(), dm.train_blocks())
    assert not torch.equal(next(iter(reseeded.train_dataloader()))["input_ids"], next(iter(dm.train_dataloader()))["input_ids"])


def test_train_stream_only_draws_training_blocks(dm):
    train, held = rows(dm.train_blocks()), rows(dm.heldout_blocks())
    it = iter(dm.train_dataloader())
    seen = rows(torch.cat([next(it)["input_ids"] for _ in range(len(train) // 4 + 3)]))  # past one epoch
    assert seen <= train and not seen & held


def test_val_loader_is_the_heldout_split_in_order(dm, tok, cache):
    batches = list(dm.val_dataloader())
    assert [b["input_ids"].shape[0] for b in batches] == [4, 4, 4, 4]
    assert torch.equal(torch.cat([b["input_ids"] for b in batches]), dm.heldout_blocks())
    small = TextDataModule(tok, seq_len=SEQ, heldout_tokens=HELD, cache_dir=cache, val_blocks=3, eval_batch_size=2)
    small.setup()
    assert torch.equal(torch.cat([b["input_ids"] for b in small.val_dataloader()]), dm.heldout_blocks()[:3])


# ---------------------------------------------------------------- the stream, as a pure function


def test_each_epoch_is_a_seeded_permutation():
    n, b = 10, 3  # 3 batches per epoch, one item left out of each
    it = stream_batch_indices(n, b, seed=7)
    epochs = [[i for _ in range(3) for i in next(it)] for _ in range(3)]
    for e, epoch in enumerate(epochs):
        assert epoch == torch.randperm(n, generator=torch.Generator().manual_seed(7 + e)).tolist()[:9]
    assert epochs[0] != epochs[1]


def test_starting_at_k_equals_skipping_k_batches():
    full = stream_batch_indices(13, 2, seed=3)
    batches = [next(full) for _ in range(30)]  # 6 batches per epoch: five epochs
    assert [next(stream_batch_indices(13, 2, seed=3, start=k)) for k in range(30)] == batches
    resumed = stream_batch_indices(13, 2, seed=3, start=20)
    assert [next(resumed) for _ in range(10)] == batches[20:]


def test_ranks_split_each_global_batch_like_one_bigger_process():
    n, b, w = 29, 3, 2
    single = stream_batch_indices(n, b * w, seed=1)
    ranks = [stream_batch_indices(n, b, seed=1, rank=r, world_size=w, start=5) for r in range(w)]
    for _ in range(5):
        next(single)
    for _ in range(12):  # crosses epoch boundaries (4 global batches per epoch)
        parts = [next(r) for r in ranks]
        assert parts[0] + parts[1] == next(single)
        assert not set(parts[0]) & set(parts[1])


def test_stream_rejects_too_few_items_and_bad_ranks():
    with pytest.raises(UserError, match="fewer than one global batch of 8"):
        next(stream_batch_indices(7, 4, world_size=2))
    with pytest.raises(ValueError, match="rank"):
        next(stream_batch_indices(10, 2, rank=2, world_size=2))


def test_batch_stream_has_no_length_and_reads_start_at_each_iteration():
    step = [0]
    stream = BatchStream(12, 2, lambda idx: {"i": torch.tensor(idx)}, seed=0, start=lambda: step[0])
    assert not hasattr(stream, "__len__")
    first = next(iter(stream))["i"].tolist()
    step[0] = 4
    assert next(iter(stream))["i"].tolist() == next(stream_batch_indices(12, 2, start=4))
    assert first == next(stream_batch_indices(12, 2))


# ---------------------------------------------------------------- resume through a real Trainer


class Recorder(L.LightningModule):
    """A one-parameter model that records every training batch it is given."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["input_ids"].clone())
        return (self.w * batch["input_ids"].float().mean()).sum() ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(tok, cache, root, max_steps, ckpt_path=None, callbacks=()):
    dm = TextDataModule(tok, seq_len=SEQ, batch_size=2, heldout_tokens=HELD, cache_dir=cache)
    module = Recorder()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, accumulate_grad_batches=2, logger=False,
        enable_checkpointing=bool(callbacks), callbacks=list(callbacks), enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=root,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's notes: val loop skipped, checkpoint callback not passed again
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    assert trainer.global_step == max_steps
    return module.seen


def test_resumed_run_sees_the_batches_of_an_uninterrupted_one(tok, cache, tmp_path):
    k = 3
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=k, save_top_k=-1)
    full = fit(tok, cache, tmp_path, 2 * k, callbacks=[ckpt])
    assert len(full) == 2 * k * 2  # accumulate_grad_batches=2: two batches per step
    saved = sorted((tmp_path / "ckpt").glob(f"*step={k}.ckpt"))
    assert len(saved) == 1
    resumed = fit(tok, cache, tmp_path, 2 * k, ckpt_path=saved[0])
    assert len(resumed) == k * 2
    assert all(torch.equal(a, b) for a, b in zip(resumed, full[k * 2 :]))
    assert not torch.equal(full[0], full[k * 2])


# ---------------------------------------------------------------- sources


def test_a_text_file_of_the_shipped_text_is_the_shipped_corpus(dm, tok, cache, tmp_path):
    path = tmp_path / "topics.txt"
    path.write_text(shipped_text(), encoding="utf-8")
    other = text_dm(tok, path, cache, heldout_tokens=HELD, batch_size=4)
    assert torch.equal(other.heldout_blocks(), dm.heldout_blocks())
    assert torch.equal(other.train_blocks(), dm.train_blocks())
    assert text_file("shipped", cache).read_text(encoding="utf-8") == shipped_text()


@pytest.mark.skipif(not COMMON_LICENSES.is_dir(), reason="not a Debian-based system")
def test_the_out_of_domain_licences_are_a_named_source_like_the_shipped_text(tok, cache):
    dm = text_dm(tok, "licenses", cache, heldout_tokens=HELD)
    ref = token_blocks(tok, licenses_text(), SEQ)
    assert torch.equal(dm.heldout_blocks(), ref[:16])
    assert text_file("licenses", cache).read_text(encoding="utf-8") == licenses_text()


def check_documents(dm, tok, n_docs):
    blocks = torch.cat([dm.heldout_blocks(), dm.train_blocks()])
    first = tok(DOCS[0], add_special_tokens=False)["input_ids"][:SEQ]
    assert blocks[0].tolist() == first  # documents in order, newlines intact
    n_eos = int((blocks == tok.eos_token_id).sum())
    assert 0 < n_eos <= n_docs  # an eos closes each document
    assert not rows(dm.heldout_blocks()) & rows(dm.train_blocks())


def test_a_folder_of_markdown_and_text_files(tok, cache, tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for i, doc in enumerate(DOCS):
        (folder / f"{i:03d}.{'md' if i % 2 else 'txt'}").write_text(doc, encoding="utf-8")
    (folder / ".hidden").write_text("ignored")
    check_documents(text_dm(tok, folder, cache), tok, len(DOCS))


def test_jsonl_json_and_parquet_files(tok, cache, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [{"id": i, "body": doc} for i, doc in enumerate(DOCS)]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in records), encoding="utf-8")
    (tmp_path / "c.json").write_text(json.dumps(records), encoding="utf-8")
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "c.parquet")
    for name in ("c.jsonl", "c.json", "c.parquet"):
        check_documents(text_dm(tok, tmp_path / name, cache, text_field="body"), tok, len(DOCS))


def test_datasets_cache_files_are_reused(tok, tmp_path):
    src = tmp_path / "c.txt"
    src.write_text("\n\n".join(DOCS), encoding="utf-8")
    t0 = time.perf_counter()
    first = text_dm(tok, src, tmp_path / "cache")
    built = time.perf_counter() - t0
    files = sorted((tmp_path / "cache").rglob("cache-*.arrow"))
    assert len(files) == 2  # tokenize, pack
    stamps = [f.stat().st_mtime_ns for f in files]
    t0 = time.perf_counter()
    second = text_dm(tok, src, tmp_path / "cache")
    reread = time.perf_counter() - t0
    assert sorted((tmp_path / "cache").rglob("cache-*.arrow")) == files
    assert [f.stat().st_mtime_ns for f in files] == stamps
    assert {c["filename"] for c in second._train.cache_files} <= {str(f) for f in files}
    assert torch.equal(first.train_blocks(), second.train_blocks())
    assert reread < built


def test_hub_names_fail_clearly_offline(tok, tmp_path):
    dm = TextDataModule(tok, "nosuchuser/no_such_corpus", seq_len=SEQ, heldout_tokens=HELD, cache_dir=tmp_path)
    with pytest.raises(UserError, match=r"'nosuchuser/no_such_corpus'.*offline"):
        dm.setup()


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"seq_len": 1}, "seq_len must be an integer >= 2"),
        ({"seq_len": 64, "heldout_tokens": 63}, "heldout_tokens must be an integer >= 64"),
        ({"batch_size": 0}, "batch_size"),
        ({"eval_batch_size": 0}, "eval_batch_size"),
        ({"val_blocks": 0}, "val_blocks"),
        ({"text_field": ""}, "text_field must be a non-empty"),
    ],
)
def test_bad_sizes_fail_at_construction(tok, kwargs, match):
    with pytest.raises(UserError, match=match):
        TextDataModule(tok, **kwargs)


def test_bad_paths_fail_at_construction_naming_them(tok, tmp_path):
    for missing in (tmp_path / "nope.txt", tmp_path / "no" / "such" / "folder"):
        with pytest.raises(UserError, match=str(missing)):
            TextDataModule(tok, missing)
    (tmp_path / "corpus.csv").write_text("text\nhello\n")
    with pytest.raises(UserError, match=r"unknown extension '\.csv'"):
        TextDataModule(tok, tmp_path / "corpus.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no data files"):
        TextDataModule(tok, tmp_path / "empty")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.txt").write_text(DOCS[0])
    (mixed / "b.jsonl").write_text(json.dumps({"text": DOCS[1]}))
    with pytest.raises(UserError, match="mixes file types"):
        TextDataModule(tok, mixed)
    (mixed / "b.jsonl").rename(mixed / "b.csv")
    with pytest.raises(UserError, match=r"unknown extensions \['b.csv'\]"):
        TextDataModule(tok, mixed)


def test_a_json_file_without_the_text_field_names_its_fields(tok, tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps({"id": i, "body": d}) for i, d in enumerate(DOCS[:3])))
    dm = TextDataModule(tok, path, seq_len=SEQ, heldout_tokens=SEQ, cache_dir=tmp_path)
    with pytest.raises(UserError, match=r"no field 'text'; its fields are \['id', 'body'\]"):
        dm.setup()


def test_a_corpus_too_small_names_the_numbers(tok, tmp_path):
    path = tmp_path / "small.txt"
    path.write_text(DOCS[0], encoding="utf-8")
    n = len(tok(DOCS[0], add_special_tokens=False)["input_ids"]) // SEQ
    dm = TextDataModule(tok, path, seq_len=SEQ, batch_size=4, heldout_tokens=(n - 2) * SEQ, cache_dir=tmp_path)
    with pytest.raises(UserError, match=rf"{n} blocks of seq_len=64.*first {n - 2}, leaving 2 for training; need at least 4"):
        dm.setup()


def test_blocks_before_setup_is_an_error(tok):
    with pytest.raises(RuntimeError, match="setup"):
        TextDataModule(tok).heldout_blocks()


# ---------------------------------------------------------------- sentences


@pytest.fixture(scope="module")
def sdm(minilm, cache):
    dm = SentenceDataModule(minilm[1], max_length=32, batch_size=8, heldout_sentences=64, cache_dir=cache)
    dm.setup()
    return dm


def test_split_sentences_keeps_prose_only():
    text = topics["assert"]
    sentences = split_sentences(text, min_words=5)
    assert sentences[0] == "Assert statements are a convenient way to insert debugging assertions into a program:"
    assert all(len(s.split()) >= 5 and "::=" not in s for s in sentences)
    assert split_sentences("Too short here.", min_words=5) == []


def test_sentences_split_heldout_first_deduplicated(sdm):
    held, train = sdm.heldout_texts(), sdm.train_texts()
    unique = list(dict.fromkeys(split_sentences(shipped_text())))  # first occurrences, in order
    assert held == unique[:64] and train == unique[64:]
    assert len(train) > 2000 and not set(held) & set(train)


def test_sentence_batches_are_padded_per_batch(sdm, minilm):
    tok = minilm[1]
    it = iter(sdm.train_dataloader())
    for _ in range(3):
        b = next(it)
        assert sorted(b) == ["attention_mask", "input_ids"]
        ids, mask = b["input_ids"], b["attention_mask"]
        assert ids.shape == mask.shape and ids.shape[0] == 8 and ids.shape[1] <= 32
        assert ids.shape[1] == int(mask.sum(1).max())  # padded to the longest in the batch
        assert (ids[mask == 0] == tok.pad_token_id).all()
        assert (ids[:, 0] == tok.cls_token_id).all()
    val = list(sdm.val_dataloader())
    assert sum(b["input_ids"].shape[0] for b in val) == 64
    first = tok(sdm.heldout_texts()[0], truncation=True, max_length=32)["input_ids"]
    assert val[0]["input_ids"][0, : len(first)].tolist() == first


def test_sentence_stream_is_deterministic(sdm, minilm, cache):
    other = SentenceDataModule(minilm[1], max_length=32, batch_size=8, heldout_sentences=64, cache_dir=cache)
    other.setup()
    a, b = next(iter(sdm.train_dataloader())), next(iter(other.train_dataloader()))
    assert torch.equal(a["input_ids"], b["input_ids"])
    assert 5 < sdm.tokens_per_sample <= 32


def test_sentence_bad_input(minilm, smollm2, tmp_path):
    tok = minilm[1]
    with pytest.raises(UserError, match="min_words"):
        SentenceDataModule(tok, min_words=0)
    with pytest.raises(UserError, match="heldout_sentences"):
        SentenceDataModule(tok, heldout_sentences=0)
    with pytest.raises(UserError, match="nope.jsonl"):
        SentenceDataModule(tok, tmp_path / "nope.jsonl")
    no_pad = copy.deepcopy(smollm2[1])
    no_pad.pad_token = None
    with pytest.raises(UserError, match="no pad token"):
        SentenceDataModule(no_pad)
    path = tmp_path / "one.txt"
    path.write_text(DOCS[0], encoding="utf-8")
    dm = SentenceDataModule(tok, path, heldout_sentences=3, batch_size=32, cache_dir=tmp_path)
    with pytest.raises(UserError, match=r"too small: \d+ sentences.*need at least 32"):
        dm.setup()


# ---------------------------------------------------------------- the measurement the docs quote


@pytest.mark.slow
def test_fp_smollm2_perplexity_on_the_default_heldout_split(smollm2, tmp_path):
    from qat.metrics import perplexity

    model, tok = smollm2
    dm = TextDataModule(tok, cache_dir=tmp_path)  # the defaults: seq_len 256, 20480 held-out tokens
    dm.setup()
    assert dm.heldout_blocks().shape == (80, 256)
    # 17.44 measured with CPython 3.11's topics (the held-out blocks are token_blocks(...)[:80]);
    # ENVIRONMENT.md quotes 17.26 from an earlier slicing. The last 80 blocks give 13.8.
    assert perplexity(model, dm.heldout_blocks()) == pytest.approx(17.26, rel=0.02)


class RankRecorder(Recorder):
    def __init__(self, out):
        super().__init__()
        self.out = out

    def on_train_end(self):
        torch.save(self.seen, os.path.join(self.out, f"rank{self.global_rank}.pt"))


@pytest.mark.slow
def test_two_ddp_ranks_see_the_data_of_one_process_with_twice_the_batch(tok, cache, tmp_path):
    seen = {}
    for name, devices, batch_size, strategy in (("single", 1, 4, "auto"), ("ddp", 2, 2, "ddp_spawn")):
        out = tmp_path / name
        out.mkdir()
        dm = TextDataModule(tok, seq_len=SEQ, batch_size=batch_size, heldout_tokens=HELD, cache_dir=cache)
        dm.setup("fit")
        trainer = L.Trainer(
            accelerator="cpu", devices=devices, strategy=strategy, max_steps=4, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(RankRecorder(str(out)), datamodule=dm)
        seen[name] = [torch.load(f) for f in sorted(out.glob("rank*.pt"))]
    (single,), (rank0, rank1) = seen["single"], seen["ddp"]
    assert len(single) == len(rank0) == len(rank1) == 4
    assert all(torch.equal(s, torch.cat([a, b])) for s, a, b in zip(single, rank0, rank1))


def test_an_unwritable_data_cache_is_named_with_the_fix():
    with pytest.raises(UserError, match="/proc/qat-cache.*QAT_CACHE"):  # /proc refuses new folders, even to root
        text_file("shipped", "/proc/qat-cache")
