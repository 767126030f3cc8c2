"""A test-only Lightning callback: each rank saves its quantizer parameters at the start and end of training.

Added to a run with ``+callbacks.quant_dump._target_=quant_dump.SaveQuantizers
+callbacks.quant_dump.dirpath=DIR`` and ``PYTHONPATH=tests/distributed``; writes
``DIR/quant_rank{r}.pt`` = ``{"start": {name: tensor}, "end": {name: tensor}}``.
"""

from pathlib import Path

import lightning as L
import torch


class SaveQuantizers(L.Callback):
    def __init__(self, dirpath: str):
        self.dirpath = Path(dirpath)
        self.state: dict = {}

    @staticmethod
    def _params(module) -> dict:
        return {n: p.detach().cpu().clone() for n, p in module.named_parameters() if "_quantizer." in n}

    def on_train_start(self, trainer, pl_module) -> None:
        self.state["start"] = self._params(pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.state["end"] = self._params(pl_module)
        self.dirpath.mkdir(parents=True, exist_ok=True)
        torch.save(self.state, self.dirpath / f"quant_rank{trainer.global_rank}.pt")
