"""The FP model's held-out metric, measured once per (model weights, held-out data, objective).

Every ``qat-train`` run reports the FP model's held-out perplexity next to PTQ and QAT, and every
run of the same model on the same split measures the same number again (70 s of a SmolLM2-135M run
on 2 CPU cores). The value is a function of the weights, the held-out token ids and the objective,
so it is stored under a key made of their digests (the weights' bytes, the ids' bytes, the
objective's class and metric, the torch version) and read back when the key matches. A changed
weight, split, objective or torch gives another key; nothing is invalidated by hand.

Stored as one small JSON file per key under ``$QAT_CACHE/fp_reference`` (default
``~/.cache/qat/fp_reference``), written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import torch


def cache_dir() -> Path:
    root = os.environ.get("QAT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qat"
    return Path(root).expanduser() / "fp_reference"


def fingerprint(model: torch.nn.Module, batches: Iterable[dict], objective) -> str:
    """A digest of ``model``'s parameters and buffers, the held-out ``batches`` and ``objective``."""
    h = hashlib.sha256()
    h.update(torch.__version__.encode())
    # the objective's class decides how a model is measured; its training settings (distillation weight,
    # temperature, chunking) do not, so a CE and a KD run of the same model share the FP numbers
    h.update(f"{type(objective).__module__}.{type(objective).__qualname__}:{getattr(objective, 'metric', '')}".encode())
    for name, t in list(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    for batch in batches:
        for key in sorted(batch):
            value = batch[key]
            if isinstance(value, torch.Tensor):
                h.update(key.encode())
                h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def fp_metric(model: torch.nn.Module, batches: list[dict], objective, compute: Callable[[], float], use_cache: bool = True) -> tuple[float, bool]:
    """``(value, from_cache)``: the stored value for this key, or ``compute()`` stored for next time."""
    if not use_cache:
        return compute(), False
    value, hit = cached(fingerprint(model, batches, objective), lambda: {"value": compute(), "metric": getattr(objective, "metric", None)})
    return float(value["value"]), hit


def cached(key: str, compute: Callable[[], dict]) -> tuple[dict, bool]:
    """``(record, from_cache)``: the JSON record stored under ``key``, or ``compute()``'s stored for next time.

    The FP fine-tune's metrics go through here too (``qat-train eval.fp_finetune=true``), keyed by
    the FP fingerprint and the settings of the training it repeats.
    """
    path = cache_dir() / f"{key}.json"
    try:
        return json.loads(path.read_text()), True
    except (OSError, ValueError):
        pass
    record = compute()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs the next run the measurement
    return record, False
