"""ZOModule under Lightning's Trainer on SmolLM2: what moves, what is counted, what is refused."""

from __future__ import annotations

import copy
import functools
import os
import subprocess
import sys

import lightning as L
import pytest
import torch

import qat
from qat.corpus import shipped_text, token_blocks
from qat.errors import UserError
from qat.lit.module import QATModule
from qat.lit.objectives import CausalLM
from qat.lit.zo_module import ZOModule
from qat.quantizers import LSQ
from qat.zo import ZOSGD


@pytest.fixture
def small_quantized(smollm2):
    model, tok = smollm2
    model = copy.deepcopy(model)
    qat.quantize_(model, weight=functools.partial(LSQ, bits=4, granularity="group", group_size=32, init="minmax"), include="model.layers.0.*")
    blocks = token_blocks(tok, shipped_text(), 16)[:4]
    loader = torch.utils.data.DataLoader([{"input_ids": b} for b in blocks], batch_size=2)
    return model, loader


def fit(module, loader, steps=2):
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, train_dataloaders=loader)
    return trainer


def test_zo_steps_move_only_the_step_sizes(small_quantized):
    model, loader = small_quantized
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    module = ZOModule(model, functools.partial(ZOSGD, lr=1e-3, eps=1e-3), train=["quant"], total_steps=2)
    trainer = fit(module, loader)
    assert trainer.global_step == 2 and module.optimizers().optimizer.steps == 2
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all("_quantizer." in n for n in moved)  # latent weights, norms, embeddings: bitwise unchanged
    assert not any(p.requires_grad for n, p in model.named_parameters() if "_quantizer." not in n)
    assert "train/loss" in trainer.callback_metrics and trainer.callback_metrics["train/skipped"] == 0


class _NaNObjective(CausalLM):
    def __call__(self, model, batch, teacher=None):
        loss, logs = super().__call__(model, batch, teacher)
        return loss * float("nan"), logs


def test_non_finite_loss_is_skipped_counted_and_logged(small_quantized):
    model, loader = small_quantized
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    module = ZOModule(model, functools.partial(ZOSGD, lr=1.0, eps=1e-3), train=["quant"], objective=_NaNObjective(), total_steps=2)
    trainer = fit(module, loader)
    assert module.optimizers().optimizer.skipped == 2 and trainer.callback_metrics["train/skipped"] == 2
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # never applied


def test_wrong_pairings_and_roles_are_refused(small_quantized):
    model, _ = small_quantized
    with pytest.raises(UserError, match="choose roles among"):
        ZOModule(copy.deepcopy(model), functools.partial(ZOSGD), train=["latent"])
    with pytest.raises(UserError, match="matches no trainable parameter"):
        ZOModule(copy.deepcopy(model), functools.partial(ZOSGD), train=["adapter"])
    with pytest.raises(UserError, match="perturbation share 'column'"):
        ZOModule(copy.deepcopy(model), functools.partial(ZOSGD), train=["quant"], share="column")
    with pytest.raises(UserError, match="positive multiplier"):
        ZOModule(copy.deepcopy(model), functools.partial(ZOSGD), train=["quant"], scale={"adapter": 0})
    with pytest.raises(UserError, match="needs optim=zo_sgd"):
        ZOModule(copy.deepcopy(model), functools.partial(torch.optim.AdamW), train=["quant"]).configure_optimizers()
    with pytest.raises(UserError, match="use it with module=zo"):
        QATModule(copy.deepcopy(model), functools.partial(ZOSGD)).configure_optimizers()


def test_cli_refuses_gradient_clipping_for_forward_only_training(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline")
    cmd = [sys.executable, "-m", "qat.train", f"hydra.run.dir={tmp_path / 'run'}", "module=zo", "optim=zo_sgd"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "trainer.gradient_clip_val=null" in out.stderr


@pytest.mark.parametrize("override, message", [("module.share=column", "perturbation share 'column'"),
                                               ("module.scale={latent: 0.1}", "positive multiplier")])
def test_cli_refuses_bad_perturbation_options_before_loading(tmp_path, override, message):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline")
    cmd = [sys.executable, "-m", "qat.train", f"hydra.run.dir={tmp_path / 'run'}", "module=zo", "optim=zo_sgd",
           "trainer.gradient_clip_val=null", override]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert message in out.stderr and "module:" in out.stderr
