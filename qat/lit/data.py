"""Data for training and held-out evaluation: a corpus, tokenised by ``datasets``, as LightningDataModules.

``TextDataModule`` packs a corpus into causal-LM blocks of ``seq_len`` tokens; ``SentenceDataModule``
cuts it into sentences for embedding distillation. Both read the same sources: ``"shipped"`` (the
documentation topics of CPython 3.11, shipped in the package: ``qat.corpus.shipped_text()``), ``"licenses"`` (Debian's
common licences, the out-of-domain text: ``qat.corpus.licenses_text()``), a local text
(``.txt``/``.md``: one file, one document), JSON/JSONL or Parquet file, a folder of files of one
of those types, or a hub dataset name (online only). Every step is a ``datasets`` call whose
result ``datasets`` caches on disk, so a second run (or the other ranks of a DDP run, after rank
0's ``prepare_data``) reads the cache instead of tokenising again.

Split: the FIRST items (blocks or sentences) are held out, the rest train; they never overlap.

Training stream: infinite, deterministic and resumable. With ``n`` training items, ``B`` items
per rank and batch, ``W`` ranks, global batch ``G = B * W`` and ``P = n // G`` global batches per
epoch (the remainder of each epoch's permutation is skipped), global batch ``k`` is::

    e, p = divmod(k, P)
    perm_e = torch.randperm(n, generator=torch.Generator().manual_seed(seed + e))
    global_batch(k) = perm_e[p * G : (p + 1) * G]         rank r takes [r * B : (r + 1) * B]

so ``W`` ranks of batch ``B`` see exactly the data of one process with batch ``B * W``. Under a
Trainer the stream starts at ``k = global_step * accumulate_grad_batches``, read when the loader
is iterated; Lightning restores ``global_step`` from a checkpoint before that, so a resumed run
continues with the batch the interrupted one would have taken next.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from qat.corpus import TEXTS
from qat.errors import UserError

log = logging.getLogger(__name__)

SHIPPED = "shipped"  # the default training corpus; qat.corpus.TEXTS names the others
_BUILDERS = {".txt": "text", ".md": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


# ---------------------------------------------------------------- the training stream


def stream_batch_indices(
    n: int, batch_size: int, *, seed: int = 0, start: int = 0, rank: int = 0, world_size: int = 1
) -> Iterator[list[int]]:
    """This rank's item indices for global batches ``start, start + 1, ...`` (an infinite iterator).

    See the module docstring for the schedule. A pure function of its arguments: the same call
    yields the same batches in any process.

    Args:
        n: number of training items.
        batch_size: items per batch on this rank.
        seed: seed of epoch 0's permutation; epoch ``e`` uses ``seed + e``.
        start: index of the first global batch to yield.
        rank: this rank, in ``[0, world_size)``.
        world_size: number of ranks sharing each global batch.

    Raises:
        UserError: ``n`` is smaller than one global batch.
        ValueError: a bad rank/size/start (a caller's bug).

    Example:
        >>> it = stream_batch_indices(10, 2, seed=0)
        >>> first = next(it)
        >>> next(stream_batch_indices(10, 1, world_size=2, rank=1)) == [first[1]]
        True
    """
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or start < 0:
        raise ValueError(
            "need batch_size >= 1, world_size >= 1, 0 <= rank < world_size, start >= 0; "
            f"got {batch_size=}, {world_size=}, {rank=}, {start=}"
        )
    g = batch_size * world_size
    per_epoch = n // g
    if per_epoch == 0:
        raise UserError(
            f"{n} training items are fewer than one global batch of {g} (batch_size={batch_size} x world_size={world_size}); "
            "use a larger corpus or a smaller batch_size"
        )
    epoch, perm = None, None
    for k in itertools.count(start):
        e, p = divmod(k, per_epoch)
        if e != epoch:
            epoch, perm = e, torch.randperm(n, generator=torch.Generator().manual_seed(seed + e)).tolist()
        lo = p * g + rank * batch_size
        yield perm[lo : lo + batch_size]


class BatchStream(IterableDataset):
    """An infinite ``IterableDataset`` of whole batches, ``fetch(indices)`` for each index batch.

    It has no ``__len__``: Lightning treats it as infinite and ``max_steps`` ends training. Use it
    with ``DataLoader(stream, batch_size=None)``. ``start`` may be a callable, read at each
    ``iter()``, so a loader iterated again (a new Lightning epoch) continues instead of repeating.

    Args:
        n: number of items.
        batch_size: items per batch on this rank.
        fetch: maps a list of indices to a batch (a dict of tensors).
        seed, rank, world_size: as in ``stream_batch_indices``.
        start: the first global batch, or a callable returning it.

    Raises:
        UserError, ValueError: as ``stream_batch_indices``, when iterated.

    Example:
        >>> stream = BatchStream(8, 2, lambda idx: {"i": torch.tensor(idx)})
        >>> next(iter(DataLoader(stream, batch_size=None)))["i"].shape
        torch.Size([2])
    """

    def __init__(self, n: int, batch_size: int, fetch: Callable[[list[int]], dict], *, seed: int = 0,
                 start: int | Callable[[], int] = 0, rank: int = 0, world_size: int = 1):
        self.n, self.batch_size, self.fetch = n, batch_size, fetch
        self.seed, self.start, self.rank, self.world_size = seed, start, rank, world_size

    def __iter__(self) -> Iterator[dict]:
        start = self.start() if callable(self.start) else self.start
        indices = stream_batch_indices(
            self.n, self.batch_size, seed=self.seed, start=start, rank=self.rank, world_size=self.world_size
        )
        for idx in indices:
            yield self.fetch(idx)


# ---------------------------------------------------------------- sources


@dataclass(frozen=True)
class _Source:
    name: str  # as given, for messages
    builder: str | None  # "text", "json", "parquet"; None for a hub dataset
    files: tuple[str, ...] = ()  # empty for the named texts (written at load time) and hub datasets


def resolve_source(source: str | os.PathLike) -> _Source:
    """Classify ``source`` without reading any data; every path error surfaces here."""
    if not isinstance(source, (str, os.PathLike)) or not str(source):
        raise UserError(f"source must be 'shipped', 'licenses', a file or folder path, or a hub dataset name; got {source!r}")
    name = str(source)
    if name in TEXTS:
        return _Source(name, "text")
    path = Path(name).expanduser()
    kinds = ", ".join(_BUILDERS)
    if path.is_file():
        builder = _BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise UserError(f"source {name!r}: unknown extension {path.suffix!r}; supported: {kinds}")
        return _Source(name, builder, (str(path),))
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        if not files:
            raise UserError(f"source folder {name!r} holds no data files ({kinds})")
        unknown = [p.name for p in files if p.suffix.lower() not in _BUILDERS]
        if unknown:
            raise UserError(f"source folder {name!r}: files with unknown extensions {unknown[:5]}; supported: {kinds}")
        builders = {_BUILDERS[p.suffix.lower()] for p in files}
        if len(builders) > 1:
            raise UserError(f"source folder {name!r} mixes file types ({', '.join(sorted(builders))}); use one type per folder")
        return _Source(name, builders.pop(), tuple(str(p) for p in files))
    if path.suffix.lower() in _BUILDERS or path.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1:
        raise UserError(f"source {name!r}: no such file or folder")
    return _Source(name, None)  # a hub dataset name


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("QAT_CACHE"):
        return Path(os.environ["QAT_CACHE"]).expanduser() / "data"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qat" / "data"


def text_file(name: str = SHIPPED, cache_dir: str | os.PathLike | None = None) -> Path:
    """A named text of ``qat.corpus.TEXTS`` as a UTF-8 file in the data cache, written once (atomically).

    The name carries a hash of the text, so CPython versions with different topics (or systems with
    other licence files) never share a file. ``cache_dir`` defaults to ``$QAT_CACHE/data``, else
    ``~/.cache/qat/data``.

    Raises:
        UserError: the cache directory is not writable, or ``"licenses"`` on a system without Debian's common licences.

    Example:
        >>> text_file("shipped").read_text() == shipped_text()  # doctest: +SKIP
        True
    """
    text = TEXTS[name]()
    root = _cache_root(cache_dir)
    target = root / f"{name}-{hashlib.sha256(text.encode()).hexdigest()[:16]}.txt"
    if target.is_file():
        return target
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=root)
    except OSError as e:
        raise UserError(f"the data cache {root} is not writable ({e.strerror}); point QAT_CACHE (or data.cache_dir) "
                        "at a writable folder") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)  # atomic: concurrent writers race harmlessly, readers never see half
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _hub_offline() -> bool:
    return any(os.environ.get(k, "") not in ("", "0", "false", "False") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _load_documents(source: _Source, text_field: str, cache_dir: str | os.PathLike | None):
    """The source as a ``datasets.Dataset`` and the name of its text column.

    Text files load with ``sample_by="document"`` (one row per file, newlines intact).
    """
    import datasets

    root = _cache_root(cache_dir)
    hf_cache = str(root / "datasets")
    if source.builder is None:
        try:
            ds = datasets.load_dataset(source.name, split="train", cache_dir=hf_cache)
        except (ConnectionError, FileNotFoundError) as e:
            why = ("this machine is offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set)" if _hub_offline()
                   else "the Hugging Face hub could not be reached or has no such dataset (is this machine offline?)")
            raise UserError(
                f"source {source.name!r} is not a local file or folder and could not be loaded as a hub dataset: {why}. "
                f"Offline, use source='shipped' or a local {', '.join(_BUILDERS)} file or folder ({type(e).__name__}: {e})"
            ) from e
        column = text_field
    elif source.builder == "text":
        files = list(source.files) or [str(text_file(source.name, cache_dir))]
        ds = datasets.load_dataset("text", data_files=files, sample_by="document", split="train", cache_dir=hf_cache)
        column = "text"
    else:
        ds = datasets.load_dataset(source.builder, data_files=list(source.files), split="train", cache_dir=hf_cache)
        column = text_field
    if column not in ds.column_names:
        raise UserError(f"source {source.name!r} has no field {column!r}; its fields are {ds.column_names}; set text_field")
    return ds, column


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"{name} must be an integer >= {minimum}; got {value!r}")


class _StreamingDataModule(L.LightningDataModule):
    """What both data modules share: the source, the trainer's rank and step, the training loader."""

    def __init__(self, tokenizer, source, batch_size: int, seed: int, cache_dir, text_field: str):
        super().__init__()
        if tokenizer is None:
            raise UserError("tokenizer is required: pass the model's tokenizer (qat.models.load_model returns it)")
        _check_int("batch_size", batch_size, 1)
        _check_int("seed", seed, 0)
        if not isinstance(text_field, str) or not text_field:
            raise UserError(f"text_field must be a non-empty column name; got {text_field!r}")
        self.tokenizer, self.batch_size, self.seed, self.text_field = tokenizer, batch_size, seed, text_field
        self.cache_dir = cache_dir
        self._source = resolve_source(source)
        self.source = self._source.name

    def _rank_world(self) -> tuple[int, int]:
        t = self.trainer
        return (t.global_rank, t.world_size) if t is not None else (0, 1)

    def _start_batch(self) -> int:
        t = self.trainer
        return t.global_step * t.accumulate_grad_batches if t is not None else 0

    def _check_sizes(self, n_total: int, n_held: int, unit: str, detail: str) -> None:
        _, world = self._rank_world()
        need = self.batch_size * world
        if n_total - n_held < need:
            raise UserError(
                f"source {self.source!r} is too small: {n_total} {unit}{detail}, of which the held-out split takes "
                f"the first {n_held}, leaving {max(n_total - n_held, 0)} for training; need at least {need} "
                f"(batch_size={self.batch_size} x world_size={world}). Use a larger corpus or hold out less"
            )

    def _require_setup(self, what):
        if what is None:
            raise RuntimeError(f"call {type(self).__name__}.setup() first")
        return what

    def _train_loader(self, n: int, fetch: Callable[[list[int]], dict]) -> DataLoader:
        rank, world = self._rank_world()
        stream = BatchStream(n, self.batch_size, fetch, seed=self.seed, start=self._start_batch, rank=rank, world_size=world)
        return DataLoader(stream, batch_size=None)

    def prepare_data(self) -> None:
        """Build (and so cache) the tokenised data once, on local rank 0, before every rank's ``setup``."""
        self._build()

    def _build(self):
        raise NotImplementedError


# ---------------------------------------------------------------- causal-LM blocks


def _tokenize_documents(batch: dict, tokenizer, column: str, eos: int | None) -> dict:
    texts = [t or "" for t in batch[column]]
    ids = tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    if eos is not None:
        ids = [x + [eos] if x else x for x in ids]  # eos closes each document: a boundary the model sees
    return {"input_ids": ids}


def _pack_blocks(batch: dict, seq_len: int) -> dict:
    flat = list(itertools.chain.from_iterable(batch["input_ids"]))
    n = len(flat) // seq_len
    return {"input_ids": [flat[i * seq_len : (i + 1) * seq_len] for i in range(n)]}


class _Rows(Dataset):
    def __init__(self, rows: torch.Tensor):
        self.rows = rows

    def __len__(self) -> int:
        return self.rows.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.rows[i]}


class TextDataModule(_StreamingDataModule):
    """Causal-LM blocks of ``seq_len`` tokens: a fixed held-out split and an infinite training stream.

    Documents are tokenised without special tokens and each is closed by the tokenizer's eos token
    (none if it has no eos), then concatenated and cut into blocks of ``seq_len`` (the standard
    group-texts of ``datasets.map``: per map batch of 1000 documents, the tail shorter than a block
    is dropped). The first ``heldout_tokens // seq_len`` blocks are held out; the rest train.
    The shipped corpus is one document, so its held-out blocks are exactly
    ``qat.corpus.token_blocks(tokenizer, shipped_text(), seq_len)[:n]`` (the eos lands in the
    dropped tail). Batches are ``{"input_ids": LongTensor[B, seq_len]}``; the model shifts labels.

    Args:
        tokenizer: a Hugging Face tokenizer.
        source: ``"shipped"``, ``"licenses"``, a ``.txt``/``.md``/``.json``/``.jsonl``/``.parquet`` file, a folder of
            files of one of those types (its top-level files, in sorted order), or a hub dataset
            name (``datasets.load_dataset(name, split="train")``, online or from the hub cache).
        seq_len: tokens per block, >= 2.
        batch_size: training blocks per batch on each rank.
        heldout_tokens: size of the held-out split; ``heldout_tokens // seq_len`` >= 1 blocks.
        eval_batch_size: validation batch size; default ``batch_size``.
        text_field: the text column of JSON/Parquet/hub sources.
        seed: seed of the training order (epoch ``e`` uses ``seed + e``).
        cache_dir: where the shipped text file and ``datasets``' caches live; default
            ``$QAT_CACHE/data``, else ``~/.cache/qat/data``.
        val_blocks: validate on the first ``val_blocks`` held-out blocks only (cheap checks during
            training); default all of them.

    Raises:
        UserError: ``seq_len < 2``, a held-out split under one block, other bad sizes, an empty
            ``text_field``, an unknown file extension, a folder mixing types or a missing file or
            folder (at construction); a JSON/Parquet/hub source without ``text_field`` (names its
            fields), a hub dataset that cannot be loaded, e.g. offline, or a corpus too small for
            the held-out split plus one global batch (in ``setup``).

    Example:
        >>> dm = TextDataModule(tokenizer, seq_len=256, batch_size=4)  # doctest: +SKIP
        >>> dm.setup()  # doctest: +SKIP
        >>> dm.heldout_blocks().shape, next(iter(dm.train_dataloader()))["input_ids"].shape  # doctest: +SKIP
        (torch.Size([80, 256]), torch.Size([4, 256]))
        >>> trainer.fit(module, datamodule=dm)  # doctest: +SKIP
    """

    def __init__(self, tokenizer, source: str | os.PathLike = SHIPPED, seq_len: int = 256, batch_size: int = 4,
                 heldout_tokens: int = 20480, eval_batch_size: int | None = None, text_field: str = "text",
                 seed: int = 0, cache_dir: str | os.PathLike | None = None, val_blocks: int | None = None):
        _check_int("seq_len", seq_len, 2)
        _check_int("heldout_tokens", heldout_tokens, seq_len)  # at least one held-out block
        if eval_batch_size is not None:
            _check_int("eval_batch_size", eval_batch_size, 1)
        if val_blocks is not None:
            _check_int("val_blocks", val_blocks, 1)
        super().__init__(tokenizer, source, batch_size, seed, cache_dir, text_field)
        self.seq_len, self.heldout_tokens = seq_len, heldout_tokens
        self.eval_batch_size, self.val_blocks = eval_batch_size or batch_size, val_blocks
        self._heldout = self._train = None

    @property
    def n_heldout(self) -> int:
        """Number of held-out blocks."""
        return self.heldout_tokens // self.seq_len

    @property
    def tokens_per_sample(self) -> int:
        """Tokens in one training sample (a block)."""
        return self.seq_len

    def _build(self):
        docs, column = _load_documents(self._source, self.text_field, self.cache_dir)
        eos = self.tokenizer.eos_token_id
        tokens = docs.map(_tokenize_documents, batched=True, remove_columns=docs.column_names,
                          fn_kwargs={"tokenizer": self.tokenizer, "column": column, "eos": eos}, desc="tokenize")
        return tokens.map(_pack_blocks, batched=True, remove_columns=tokens.column_names,
                          fn_kwargs={"seq_len": self.seq_len}, desc=f"pack into blocks of {self.seq_len}")

    def setup(self, stage: str | None = None) -> None:
        """Load, tokenise and pack the corpus (from ``datasets``' cache when it is there) and split it.

        Raises:
            UserError: the corpus is too small for the held-out split plus one global batch.
        """
        if self._train is None:
            blocks = self._build()
            n_held = self.n_heldout
            self._check_sizes(len(blocks), n_held, "blocks", f" of seq_len={self.seq_len}")
            self._heldout = blocks.select(range(n_held)).with_format("torch")
            self._train = blocks.select(range(n_held, len(blocks))).with_format("torch")
        else:
            self._check_sizes(len(self._heldout) + len(self._train), self.n_heldout, "blocks", f" of seq_len={self.seq_len}")

    def heldout_blocks(self) -> torch.Tensor:
        """The held-out blocks, a LongTensor ``(n_heldout, seq_len)``."""
        return self._require_setup(self._heldout)[:]["input_ids"]

    def train_blocks(self) -> torch.Tensor:
        """All training blocks in corpus order, a LongTensor ``(n, seq_len)``."""
        return self._require_setup(self._train)[:]["input_ids"]

    def train_dataloader(self) -> DataLoader:
        """The infinite training stream of ``{"input_ids": LongTensor[batch_size, seq_len]}`` (module docstring)."""
        train = self._require_setup(self._train)
        return self._train_loader(len(train), lambda idx: {"input_ids": train[idx]["input_ids"]})

    def val_dataloader(self) -> DataLoader:
        """The held-out blocks (the first ``val_blocks`` if set) in order, ``eval_batch_size`` per batch."""
        rows = self.heldout_blocks()[: self.val_blocks]
        return DataLoader(_Rows(rows), batch_size=self.eval_batch_size, shuffle=False)


# ---------------------------------------------------------------- sentences


_PARAGRAPH = re.compile(r"\n\s*\n")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'“‘(\[]?[A-Z])")
_WORD = re.compile(r"^[\"'“‘(]?[A-Za-z][a-z’'-]*[,.;:!?\"'”’)]*$")


def split_sentences(text: str, min_words: int = 5) -> list[str]:
    """Prose sentences of ``text``: paragraphs (blank-line separated), whitespace collapsed, cut after
    ``.``/``!``/``?`` before a capital; kept when they hold at least ``min_words`` plain words and
    plain words make at least half their tokens (which drops code, grammar rules and tables).

    Example:
        >>> split_sentences("The first one is here. The second one is here too.\\n\\n>>> x = [1, 2, 3, 4, 5]")
        ['The first one is here.', 'The second one is here too.']
    """
    out = []
    for para in _PARAGRAPH.split(text or ""):
        for s in _SENTENCE_END.split(" ".join(para.split())):
            tokens = s.split()
            words = sum(1 for w in tokens if _WORD.match(w))
            if words >= min_words and 2 * words >= len(tokens):
                out.append(s)
    return out


def _split_documents(batch: dict, column: str, min_words: int) -> dict:
    return {"sentence": [s for text in batch[column] for s in split_sentences(text, min_words)]}


def _tokenize_sentences(batch: dict, tokenizer, max_length: int) -> dict:
    enc = tokenizer(batch["sentence"], truncation=True, max_length=max_length)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


class _Pad:
    """Pads a list of rows (or a dict of lists) to the longest, with the tokenizer's pad token and side."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, rows) -> dict:
        if isinstance(rows, list):
            rows = {k: [r[k] for r in rows] for k in ("input_ids", "attention_mask")}
        enc = self.tokenizer.pad({"input_ids": rows["input_ids"], "attention_mask": rows["attention_mask"]}, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


class SentenceDataModule(_StreamingDataModule):
    """Sentences for embedding distillation: a fixed held-out set and an infinite training stream.

    The corpus is cut into sentences by ``split_sentences`` (a regex split keeping prose with at
    least ``min_words`` words); repeated sentences are kept once (first occurrence), so held-out
    and training sentences never coincide. The first ``heldout_sentences`` are held out, the rest
    train. Sentences are tokenised with the tokenizer's special tokens, truncated to
    ``max_length``, and padded per batch: batches are ``{"input_ids", "attention_mask"}``
    LongTensors ``[B, longest in batch]``. On the shipped corpus: about 2500 sentences.

    Args:
        tokenizer: a Hugging Face tokenizer with a pad token.
        source, seed, cache_dir, text_field: as for ``TextDataModule``.
        max_length: truncation length in tokens, >= 2.
        batch_size: training sentences per batch on each rank (also the validation batch size).
        heldout_sentences: number of held-out sentences, >= 1.
        min_words: minimum number of plain words for a sentence to be kept, >= 1.

    Raises:
        UserError: bad sizes, a tokenizer without a pad token, and the source errors of
            ``TextDataModule``; a corpus with too few sentences for the held-out set plus one
            global batch (in ``setup``).

    Example:
        >>> dm = SentenceDataModule(tokenizer, batch_size=32)  # doctest: +SKIP
        >>> dm.setup()  # doctest: +SKIP
        >>> batch = next(iter(dm.train_dataloader()))  # doctest: +SKIP
        >>> sorted(batch), batch["input_ids"].shape[0]  # doctest: +SKIP
        (['attention_mask', 'input_ids'], 32)
    """

    def __init__(self, tokenizer, source: str | os.PathLike = SHIPPED, max_length: int = 128, batch_size: int = 32,
                 heldout_sentences: int = 512, min_words: int = 5, seed: int = 0,
                 cache_dir: str | os.PathLike | None = None, text_field: str = "text"):
        _check_int("max_length", max_length, 2)
        _check_int("heldout_sentences", heldout_sentences, 1)
        _check_int("min_words", min_words, 1)
        if tokenizer is not None and tokenizer.pad_token_id is None:
            raise UserError("the tokenizer has no pad token; set tokenizer.pad_token (qat.models.load_model does)")
        super().__init__(tokenizer, source, batch_size, seed, cache_dir, text_field)
        self.max_length, self.heldout_sentences, self.min_words = max_length, heldout_sentences, min_words
        self._heldout = self._train = None
        self._pad = _Pad(tokenizer)

    @property
    def tokens_per_sample(self) -> int:
        """Mean tokens (special tokens included, padding excluded) of a training sentence, rounded."""
        lengths = self._require_setup(self._train).with_format("numpy")[:]["attention_mask"]
        return round(sum(int(m.sum()) for m in lengths) / len(lengths))

    def _build(self):
        docs, column = _load_documents(self._source, self.text_field, self.cache_dir)
        sentences = docs.map(_split_documents, batched=True, remove_columns=docs.column_names,
                             fn_kwargs={"column": column, "min_words": self.min_words}, desc="split sentences")
        seen: set[str] = set()
        keep = [i for i, s in enumerate(sentences["sentence"]) if not (s in seen or seen.add(s))]
        if len(keep) < len(sentences):
            sentences = sentences.select(keep)
        return sentences.map(_tokenize_sentences, batched=True,
                             fn_kwargs={"tokenizer": self.tokenizer, "max_length": self.max_length}, desc="tokenize")

    def setup(self, stage: str | None = None) -> None:
        """Load, split, deduplicate and tokenise the corpus (cached by ``datasets``), then split it.

        Raises:
            UserError: too few sentences for the held-out set plus one global batch.
        """
        detail = f" (with at least min_words={self.min_words} words, deduplicated)"
        if self._train is None:
            data = self._build()
            n_held = self.heldout_sentences
            self._check_sizes(len(data), n_held, "sentences", detail)
            self._heldout = data.select(range(n_held))
            self._train = data.select(range(n_held, len(data)))
        else:
            self._check_sizes(len(self._heldout) + len(self._train), self.heldout_sentences, "sentences", detail)

    def heldout_texts(self) -> list[str]:
        """The held-out sentences, in order."""
        return list(self._require_setup(self._heldout)["sentence"])

    def train_texts(self) -> list[str]:
        """The training sentences, in corpus order."""
        return list(self._require_setup(self._train)["sentence"])

    def train_dataloader(self) -> DataLoader:
        """The infinite training stream of padded ``{"input_ids", "attention_mask"}`` batches."""
        train = self._require_setup(self._train)
        return self._train_loader(len(train), lambda idx: self._pad(train[idx]))

    def val_dataloader(self) -> DataLoader:
        """The held-out sentences in order, ``batch_size`` per padded batch."""
        held = self._require_setup(self._heldout).select_columns(["input_ids", "attention_mask"])
        return DataLoader(held, batch_size=self.batch_size, shuffle=False, collate_fn=self._pad)
