"""Read an offline W&B run back (``<save_dir>/wandb/offline-run-*/run-<id>.wandb``) without a server.

wandb >= 0.2x writes its runs from the Go ``wandb-core`` service and no longer ships a Python
reader (``wandb.sdk.internal.datastore`` is gone), but the file format is unchanged: a 7-byte
header (``":W&B"``, magic ``0xBEE1``, version 0) followed by LevelDB-log records in 32 KiB blocks
(each chunk: crc32 seeded by the chunk type, uint16 length, uint8 type FULL/FIRST/MIDDLE/LAST; a
block tail shorter than a chunk header is zero padding). Each record is a
``wandb.proto.wandb_internal_pb2.Record``.

Usage (other tests load this file by path, see ``load_reader`` in ``test_callbacks.py``)::

    run = read_run(tmp_path)                      # the only offline run under tmp_path/wandb
    run.history                                   # one dict per logged row, nested values decoded
    run.keys()                                    # every history key
    run.column("quant/zero_frac")                 # [(trainer/global_step, value), ...]
    run.config["_wandb"]["visualize"]["ppl_curve"]  # custom charts (wandb.plot.*)
    run.table("ppl_curve_table")                  # {"columns": [...], "data": [[...], ...]}
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

HEADER = struct.Struct("<4sHB")  # ident, magic, version
CHUNK = struct.Struct("<IHB")  # crc32, length, type
BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def raw_records(path: str | Path):
    """The records' bytes, chunks joined, crc checked."""
    data = Path(path).read_bytes()
    ident, magic, version = HEADER.unpack_from(data)
    if ident != b":W&B" or magic != 0xBEE1:
        raise ValueError(f"{path} is not a W&B transaction log (header {data[:7]!r})")
    pos, parts = HEADER.size, []
    while pos + CHUNK.size <= len(data):
        left = BLOCK - pos % BLOCK
        if left < CHUNK.size:  # zero padding up to the next block
            pos += left
            continue
        crc, length, kind = CHUNK.unpack_from(data, pos)
        if pos + CHUNK.size + length > len(data):  # a run still being written
            break
        pos += CHUNK.size
        chunk = data[pos : pos + length]
        pos += length
        if kind == 0 and length == 0:  # preallocated tail
            break
        if crc != zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF:
            raise ValueError(f"{path}: bad checksum at byte {pos - length - CHUNK.size}")
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            parts = [chunk]
        elif kind == MIDDLE:
            parts.append(chunk)
        elif kind == LAST:
            yield b"".join(parts + [chunk])
            parts = []


def _set(tree: dict, keys: list[str], value) -> None:
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


def _items(items) -> dict:
    out: dict = {}
    for item in items:
        keys = list(item.nested_key) or [item.key]
        _set(out, keys, json.loads(item.value_json))
    return out


@dataclass
class OfflineRun:
    """What an offline run recorded: history rows, config, summary and its directory."""

    dir: Path
    history: list[dict] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    exited: bool = False  # the exit record is written last, when the run finishes

    def keys(self) -> set[str]:
        return {k for row in self.history for k in row}

    def column(self, key: str, step_key: str = "trainer/global_step") -> list[tuple]:
        """``(step, value)`` for every row that logged ``key``."""
        return [(row.get(step_key), row[key]) for row in self.history if key in row]

    def table(self, key: str) -> dict:
        """The JSON of a logged ``wandb.Table`` (``key`` as it appears in history, e.g. ``"x_table"``)."""
        ref = next(row[key] for row in reversed(self.history) if key in row)
        return json.loads((self.dir / "files" / ref["path"]).read_text())


def read_run(save_dir: str | Path, timeout: float = 30.0) -> OfflineRun:
    """Parse the single offline run under ``save_dir/wandb`` (or ``save_dir`` itself).

    Call ``wandb.finish()`` first. It can return before ``wandb-core`` has flushed the file (seen
    with runs over one 32 KiB block), so this waits until the run's ``exit`` record is there.

    Raises:
        FileNotFoundError: no run, or more than one.
        TimeoutError: the run has not been finished (no ``exit`` record) after ``timeout`` seconds.
    """
    save_dir = Path(save_dir)
    files = sorted(save_dir.glob("wandb/offline-run-*/*.wandb")) or sorted(save_dir.glob("offline-run-*/*.wandb"))
    if len(files) != 1:
        raise FileNotFoundError(f"expected one offline W&B run under {save_dir}, found {[str(f) for f in files]}")
    deadline = time.monotonic() + timeout
    while True:
        run = _parse(files[0])
        if run.exited:
            return run
        if time.monotonic() > deadline:
            raise TimeoutError(f"{files[0]} has no exit record after {timeout} s: call wandb.finish() before reading")
        time.sleep(0.05)


def _parse(path: Path) -> OfflineRun:
    from wandb.proto import wandb_internal_pb2 as pb

    run = OfflineRun(path.parent)
    for raw in raw_records(path):
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            run.history.append(_items(record.history.item))
        elif kind == "config":
            for k, v in _items(record.config.update).items():
                run.config[k] = _merge(run.config.get(k), v)
        elif kind == "summary":
            for k, v in _items(record.summary.update).items():
                run.summary[k] = _merge(run.summary.get(k), v)
        elif kind == "exit":
            run.exited = True
    return run


def _merge(old, new):
    if isinstance(old, dict) and isinstance(new, dict):
        return {**old, **{k: _merge(old.get(k), v) for k, v in new.items()}}
    return new
