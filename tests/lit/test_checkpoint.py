"""``LastCheckpoint`` and ``AtomicCheckpointIO`` on Lightning's own Trainer, with a one-layer module (seconds).

The end-to-end check (a resumed SmolLM2 run equals an uninterrupted one) is the slow
``tests/test_train.py::test_resume_matches_an_uninterrupted_run``.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from qat.lit.checkpoint import AtomicCheckpointIO, LastCheckpoint


class Regression(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(3, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loader(n: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=1)


def fit(tmp_path, every: int, **limits) -> tuple[Regression, dict]:
    ckpt = LastCheckpoint(dirpath=tmp_path, every_n_train_steps=every, save_last=True, save_top_k=0)
    trainer = L.Trainer(default_root_dir=tmp_path, callbacks=[ckpt], plugins=[AtomicCheckpointIO()], logger=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", **limits)
    module = Regression()
    trainer.fit(module, loader())
    return module, torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=False)


@pytest.mark.parametrize("limits", [{"max_steps": 5}, {"max_epochs": 1}], ids=["max_steps", "max_epochs"])
def test_last_checkpoint_holds_the_final_step_between_save_points(tmp_path, limits):
    """Saving every 3 steps, a 5-step (or one 8-batch epoch) run's last.ckpt is its final model, not step 3 (or 6)."""
    module, saved = fit(tmp_path, every=3, **limits)
    assert saved["global_step"] == limits.get("max_steps", 8)
    for name, value in module.state_dict().items():
        assert torch.equal(saved["state_dict"][name], value), name
    assert not list(tmp_path.glob("*.tmp"))  # the atomic writer leaves no temporary behind


def test_last_checkpoint_on_a_save_point_is_written_once(tmp_path):
    _, saved = fit(tmp_path, every=3, max_steps=6)
    assert saved["global_step"] == 6 and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
