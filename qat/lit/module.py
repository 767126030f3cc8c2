"""``QATModule``: quantization-aware training of a (quantized) model with backpropagation.

One LightningModule for every method: what differs between LSQ, LWC, ternary or adapters lives in
the model's quantizers and in which parameters require gradients, not here. The module adds:

* the objective (``qat.lit.objectives``: causal LM with optional distillation from the frozen FP
  teacher, or embedding distillation);
* parameter groups with their own learning rate and weight decay: ``weights`` (decayed, except
  biases and norms), ``quant`` (step sizes, offsets, clipping logits: never decayed, own rate),
  ``adapter`` (LoRA-style factors, own rate);
* a schedule stepped per optimizer step (``qat.lit.schedules``);
* quantizer initialisation on a calibration batch before the first step (activation quantizers;
  weight quantizers are initialised by ``quantize_``), the same on every rank;
* an optional delay: fake quantization starts after ``quant_delay_steps`` optimizer steps;
* held-out validation logged as ``val/<metric>`` (``val/ppl`` for language models).

The teacher is kept outside the module's children, so checkpoints hold the trained model only.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable

import lightning as L
import torch
from torch import nn

from qat.convert import calibrate_, quantized_layers
from qat.errors import UserError
from qat.lit.objectives import CausalLM
from qat.roles import parameter_roles, quantizer_tensors


def no_decay(name: str, param: nn.Parameter) -> bool:
    """Biases, norms and other 1-D parameters are never decayed (nor quantizer or adapter scales)."""
    return param.ndim < 2 or name.endswith(".bias")


class QATModule(L.LightningModule):
    """Backprop QAT of ``model``.

    Args:
        model: the model, already passed through ``qat.quantize_`` (and adapters, if any).
        optimizer: a factory ``params -> torch.optim.Optimizer`` (e.g. ``partial(AdamW, lr=2e-5)``);
            its own ``lr`` and ``weight_decay`` apply to the ``weights`` group.
        scheduler: a factory ``(optimizer, total_steps) -> LRScheduler`` or None for a constant rate.
        total_steps: optimizer steps of the run (the schedule's length).
        quant_lr, quant_weight_decay: the ``quant`` group's rate (None: the optimizer's) and decay.
        adapter_lr, adapter_weight_decay: the same for the ``adapter`` group.
        objective: the loss and held-out metric (default ``CausalLM()``).
        teacher: the frozen FP model, needed when the objective distills.
        quant_delay_steps: optimizer steps to train without fake quantization first.
        freeze: glob patterns of parameter names to keep frozen (e.g. ``"model.embed_tokens.*"``).

    Raises:
        UserError: the objective needs a teacher and none is given; a freeze pattern that matches
            nothing; nothing left to train.

    Example:
        >>> module = QATModule(model, optimizer=partial(torch.optim.AdamW, lr=1e-4), total_steps=100)  # doctest: +SKIP
        >>> lightning.Trainer(max_steps=100).fit(module, datamodule)  # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable | None = None,
        total_steps: int = 1,
        quant_lr: float | None = None,
        quant_weight_decay: float = 0.0,
        adapter_lr: float | None = None,
        adapter_weight_decay: float = 0.0,
        objective=None,
        teacher: nn.Module | None = None,
        quant_delay_steps: int = 0,
        freeze: Iterable[str] = (),
    ):
        super().__init__()
        self.model = model
        self.objective = objective if objective is not None else CausalLM()
        if self.objective.needs_teacher and teacher is None:
            raise UserError(f"{type(self.objective).__name__} distills from the FP model: pass teacher=")
        self._teacher = [teacher.eval().requires_grad_(False)] if teacher is not None else []
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.total_steps = int(total_steps)
        self.group_settings = {"quant": (quant_lr, quant_weight_decay), "adapter": (adapter_lr, adapter_weight_decay)}
        if quant_delay_steps < 0:
            raise UserError(f"quant_delay_steps={quant_delay_steps} must be >= 0")
        self.quant_delay_steps = int(quant_delay_steps)
        self._freeze(tuple(freeze))
        self.reference_ppl: dict = {}  # FP / PTQ perplexity for the curve plot (set by the caller)

    @property
    def teacher(self) -> nn.Module | None:
        return self._teacher[0] if self._teacher else None

    def _freeze(self, patterns: tuple[str, ...]) -> None:
        names = [n for n, _ in self.model.named_parameters()]
        for p in patterns:
            if not any(fnmatch.fnmatchcase(n, p) for n in names):
                raise UserError(f"freeze pattern {p!r} matches no parameter; names look like {names[:3]}")
        for n, param in self.model.named_parameters():
            if any(fnmatch.fnmatchcase(n, p) for p in patterns):
                param.requires_grad_(False)
        if not any(p.requires_grad for p in self.model.parameters()):
            raise UserError("no parameter requires a gradient: nothing to train; freeze fewer parameters (module.freeze)")

    # -- training ---------------------------------------------------------------------------
    def forward(self, **batch):
        return self.model(**batch)

    def _set_quantization(self, enabled: bool) -> None:
        for _, layer in quantized_layers(self.model):
            for q in (getattr(layer, "weight_quantizer", None), getattr(layer, "act_quantizer", None)):
                if q is not None:
                    q.enabled = enabled

    def on_fit_start(self) -> None:
        self.model.train()  # from_pretrained returns eval mode; stochastic estimators need training mode
        if self.teacher is not None:
            self.teacher.to(self.device)
        batch = next(iter(self.trainer.datamodule.train_dataloader())) if self.trainer.datamodule else None
        needs_init = any(
            layer.act_quantizer is not None and not layer.act_quantizer._ready
            for _, layer in quantized_layers(self.model)
            if hasattr(layer, "act_quantizer")
        )
        if needs_init and batch is not None:
            calibrate_(self.model, {k: v.to(self.device) for k, v in batch.items()})
            self._broadcast_quantizers()

    def configure_model(self) -> None:
        """Shard the model with FSDP2 when the strategy gives a device mesh (``trainer=fsdp``).

        Every block the model declares unsplittable (``_no_split_modules``: a transformers model's
        decoder layers) becomes one ``fully_shard`` unit, so its QuantLinear layers and their
        quantizers' parameters are sharded, gathered for compute and checkpointed with the layer;
        the rest (embeddings, final norm, head) forms the root unit. A 2-D mesh (nodes x devices)
        shards within a node and replicates across nodes (HSDP). Without a mesh nothing changes.

        Raises:
            UserError: the model names no unsplittable block to shard; activation quantizers still
                to be initialised from data (that happens in ``on_fit_start``, after sharding).
        """
        from torch.distributed.fsdp import FSDPModule, fully_shard

        mesh = self.device_mesh
        if mesh is None or isinstance(self.model, FSDPModule):  # one process, DDP, or sharded already
            return

        if any(getattr(layer, "act_quantizer", None) is not None and not layer.act_quantizer._ready
               for _, layer in quantized_layers(self.model)):
            raise UserError("trainer=fsdp shards the model before activation quantizers are calibrated on data, "
                             "which it does not support yet: quantize activations with trainer=ddp (or quant.activation=null)")

        names = set(getattr(self.model, "_no_split_modules", None) or ())
        blocks = [m for m in self.model.modules() if type(m).__name__ in names]
        if not blocks:
            raise UserError(f"FSDP shards the model's blocks, but {type(self.model).__name__} declares none "
                             "(_no_split_modules): set it to the class names of its layers")
        for block in blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(self.model, mesh=mesh)

    def _broadcast_quantizers(self) -> None:
        """Make data-initialised quantizer parameters identical on every rank (rank 0's)."""
        if self.trainer.world_size <= 1:
            return
        for t in quantizer_tensors(self.model):
            t.data.copy_(self.trainer.strategy.broadcast(t.data, src=0))

    def on_train_batch_start(self, batch, batch_idx) -> None:
        if self.quant_delay_steps:
            self._set_quantization(self.global_step >= self.quant_delay_steps)

    def training_step(self, batch, batch_idx):
        loss, logs = self.objective(self.model, batch, self.teacher)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()} at step {self.global_step}: lower the learning rate")
        self.log("train/loss", loss, prog_bar=True)
        for k, v in logs.items():
            self.log(f"train/{k}", v)
        return loss

    def validation_step(self, batch, batch_idx):
        self._val.append({k: v for k, v in batch.items()})

    def on_validation_epoch_start(self) -> None:
        self._val = []

    def on_validation_epoch_end(self) -> None:
        if self._val:
            value = self.objective.evaluate(self.model, self._val, self.teacher)
            self.log(f"val/{self.objective.metric}", value, prog_bar=True, sync_dist=True)
        self._val = []

    # -- optimisation -----------------------------------------------------------------------
    def parameter_groups(self) -> list[dict]:
        """Optimizer groups: (weights, quant, adapter) x (decayed, not decayed), empty ones dropped (roles: ``qat.roles``)."""
        groups: dict[tuple[str, bool], list] = {}
        roles = parameter_roles(self.model)
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                kind = roles[name]
                groups.setdefault((kind, kind == "weights" and not no_decay(name, p)), []).append(p)
        out = []
        for (kind, decay), params in sorted(groups.items()):
            g = {"params": params, "name": f"{kind}{'' if decay else '_no_decay'}"}
            if kind == "weights":
                if not decay:
                    g["weight_decay"] = 0.0
            else:
                lr, wd = self.group_settings[kind]
                if lr is not None:
                    g["lr"] = lr
                g["weight_decay"] = wd
            out.append(g)
        return out

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.parameter_groups())
        if getattr(optimizer, "forward_only", False) and self.automatic_optimization:
            raise UserError(f"{type(optimizer).__name__} is a forward-only optimizer: use it with module=zo")
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer, total_steps=self.total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
