"""Checkpoints that are never half-written and never stale.

``AtomicCheckpointIO``: Lightning's default writes the target path directly, so a run killed
mid-save (a pre-empted SLURM job, a full disk) can leave a truncated ``last.ckpt`` over a good
one. ``os.replace`` is atomic on POSIX within one file system, so readers see the old checkpoint
or the new one, never a mix.

``LastCheckpoint``: a step-based ``ModelCheckpoint`` (``every_n_train_steps: 50``) saves on
multiples of 50 only, so a 90-step run's ``last.ckpt`` held step 50, and ``qat-eval`` and
``qat-export`` of the run directory read a model 40 steps short of the one the run reported.
This one also saves ``last.ckpt`` at the final step (``global_step == max_steps``), inside the
training loop, so the checkpoint resumes exactly like any other step-based one; a run that ends
otherwise (``max_epochs``, a time limit, early stopping) gets it at ``on_train_end``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
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


class LastCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` is always the model the run ends with (``save_last``)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        final = trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step
        if final and self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_end(self, trainer, pl_module) -> None:
        if self.save_last and self._last_global_step_saved != trainer.global_step and not trainer.fast_dev_run:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        super().on_train_end(trainer, pl_module)
