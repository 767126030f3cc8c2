"""Checkpoints that are never half-written: save to a temporary file beside the target, then rename.

Lightning's default writes the target path directly, so a run killed mid-save (a pre-empted SLURM
job, a full disk) can leave a truncated ``last.ckpt`` over a good one. ``os.replace`` is atomic
on POSIX within one file system, so readers see the old checkpoint or the new one, never a mix.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with write-to-temporary-then-rename saves (local paths)."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
