"""``ZOModule``: forward-only QAT with SPSA (MeZO; ZeroQAT for quantized models).

Each training step runs ``2n`` forward passes of the quantized model under
``torch.inference_mode`` (nothing is kept for a backward) at ``theta +- eps u``, and the optimizer
(``qat.zo.ZOSGD``) replays the seeds to apply ``theta -= lr * p * u``. Memory stays that of
inference: no activations saved, no gradients, no optimizer state. What moves is chosen by
parameter role (``train``): ``quant`` (step sizes, offsets, clipping: the smooth parameters, the
recommended target), ``adapter`` (L4Q / LoRA factors), ``weights`` (latent weights, perturbed in
whole grid steps so rounding cannot swallow them; ALGORITHMS.md section 6).

The model runs in eval mode during the passes (MeZO: no dropout; the quantizers round
deterministically), so both passes see the same function up to the perturbation.
"""

from __future__ import annotations

import math

import torch

from qat.errors import UserError
from qat.lit.module import QATModule
from qat.roles import ROLES, parameter_roles
from qat.zo.perturb import Perturbation, check_options
from qat.zo.spsa import ZOSGD


class ZOModule(QATModule):
    """Zeroth-order training of ``model`` (manual optimisation; the optimizer must be ``ZOSGD``).

    Args:
        model, optimizer, scheduler, total_steps, quant_lr, quant_weight_decay, adapter_lr,
        adapter_weight_decay, objective, teacher, freeze: as for :class:`QATModule`.
        train: roles that move, a subset of ``("weights", "quant", "adapter")``; every other
            parameter is frozen.
        perturbation: direction kind (``qat.zo.perturb.MODES``; ``"auto"`` picks per role).
        share: one random coordinate per entry, row or tensor (``qat.zo.perturb.SHARES``), for all
            roles or per role (``{quant: tensor, adapter: none}``).
        scale: per-role multipliers of the directions (``{adapter: 0.05}``; ``qat.zo.perturb``).

    Raises:
        UserError: an unknown role, no parameter of the chosen roles, an optimizer that is not
            ``ZOSGD``.

    Example:
        >>> module = ZOModule(model, optimizer=partial(ZOSGD, lr=1e-4, eps=1e-3), train=["quant"])  # doctest: +SKIP
    """

    forward_only = True  # qat-train refuses gradient clipping and accumulation for it, before loading

    def __init__(self, model, optimizer, scheduler=None, total_steps: int = 1, train=("quant",), perturbation: str = "auto", share="none", scale=None,
                 quant_lr=None, quant_weight_decay: float = 0.0, adapter_lr=None, adapter_weight_decay: float = 0.0,
                 objective=None, teacher=None, freeze=()):
        super().__init__(model, optimizer, scheduler, total_steps, quant_lr, quant_weight_decay, adapter_lr,
                         adapter_weight_decay, objective, teacher, quant_delay_steps=0, freeze=freeze)
        self.automatic_optimization = False
        roles = tuple(train)
        unknown = [r for r in roles if r not in ROLES]
        if unknown or not roles:
            raise UserError(f"module.train={list(roles)}: choose roles among {list(ROLES)}")
        role = parameter_roles(self.model)
        for name, p in self.model.named_parameters():
            if role[name] not in roles:
                p.requires_grad_(False)
        if not any(p.requires_grad for p in self.model.parameters()):
            kinds = sorted(set(role.values()))
            raise UserError(f"module.train={list(roles)} matches no trainable parameter; this model has {kinds}")
        check_options(perturbation, share, scale)  # at construction, not first at configure_optimizers
        self.perturbation_mode, self.share, self.scale = perturbation, share, scale
        self.perturbation: Perturbation | None = None

    def configure_optimizers(self):
        self.perturbation = Perturbation(self.model, self.perturbation_mode, self.share, self.scale)
        config = super().configure_optimizers()
        optimizer = config["optimizer"] if isinstance(config, dict) else config
        if not isinstance(optimizer, ZOSGD):
            raise UserError(f"module=zo trains forward-only and needs optim=zo_sgd, got {type(optimizer).__name__}")
        optimizer.attach(self.perturbation)
        return config

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        zo: ZOSGD = opt.optimizer
        self.model.eval()
        with torch.inference_mode():
            loss = zo.estimate(lambda: self.objective(self.model, batch, self.teacher)[0])
        opt.step()  # applies the replayed update (nothing if skipped) and counts the step
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        if math.isfinite(loss):
            self.log("train/loss", loss, prog_bar=True)
        self.log("train/skipped", float(zo.skipped), prog_bar=True)
        return None
