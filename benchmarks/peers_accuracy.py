"""Accuracy recovery of our QAT methods against torchao's QAT on SmolLM2-135M, same data and budget.

Held-out perplexity of the embedded SmolLM2-135M at four weight widths (w4, w3, w2, ternary) on
all 210 decoder linear layers (embeddings and the tied head stay float):

* FP (once), and round-to-nearest (PTQ, no training) on every grid a row below uses;
* our methods, each built and trained from its recipe by ``qat-train``'s own functions
  (``qat.config.compose`` of ``recipe=NAME`` and any group override, ``load``,
  ``quantizer_factories``, ``quantize``, then ``qat.train.build_module`` and ``build_trainer``:
  the recipe's ``QATModule`` / ``ZOModule``, optimizer groups, schedule and trainer settings,
  adapter callbacks included, so learning rates, ``quant_lr`` / ``adapter_lr`` groups and
  schedules are the recipe's):

  ==========  ===================================================================================
  w4          LSQ (smollm2_w4_lsq), LSQ+ (smollm2_w4_lsq with quant=w4_lsqplus: no LSQ+ recipe
              of its own), L4Q (smollm2_w4_l4q), scale-only / PEQA (smollm2_w4_peqa), forward-only
              SPSA on the step sizes (smollm2_w4_zo_scales: two forward passes a step)
  w3          LSQ (smollm2_w3_lsq), LSQ+ (smollm2_w3_lsq with quant=w3_lsqplus), L4Q (smollm2_w3_l4q)
  w2          LSQ+ (smollm2_w2_lsq), LWC (smollm2_w2_lwc)
  ternary     absmean (smollm2_ternary_absmean), SEQ g64 (smollm2_ternary_seq), Tequila (smollm2_ternary_tequila)
  ==========  ===================================================================================

* torchao's QAT (``QATConfig(weight_config=IntxFakeQuantizeConfig(...))``, weight-only, on the
  same 210 layers) with the dtype, group size and symmetry of the width's reference recipe
  (w4: int4 sym g32, w3: int3 sym g64, w2: int2 asym g64), in two rows: ``is_dynamic=True``
  (scales recomputed from the weights every step: the STE baseline) and ``range_learning=True``
  (learned scales and zero points, initialised by ``initialize_fake_quantizers`` on the first
  training batch, as torchao requires; asymmetric range learning needs
  ``zero_point_precision=torch.float32``: the int32 default cannot require a gradient; and its
  asymmetric fake quantizer drops the zero point it computes, see ``NOTES``).
  At ``ternary`` torchao's QAT API has no ternary grid; its ternary QAT lives in two prototypes,
  which are the rows the target compares with (``same_grid``): PARQ (``torchao.prototype.parq``:
  ``QuantOptimizer`` over AdamW with ``TernaryUnifQuantizer`` in groups of 64, scales refreshed every
  step, and ``ProxHardQuant``, i.e. the straight-through estimator, or ``ProxPARQ`` annealed to hard
  quantization by the last step) and ParetoQ (``torchao.prototype.paretoq``: ``QuantizeLinear`` with
  ``w_bits=0``, StretchedElasticQuant with a per-row learned alpha initialised at max|w| as its
  ``train.py`` does). The int2 symmetric g64 fake quantizer (four levels {-2, -1, 0, 1} * s, one
  more than ternary) is run and reported as well, outside the target. torchao trains with the
  reference recipe's AdamW settings and schedule (weights ``lr``; ``quant_lr`` for its learned
  scales, which ``QATModule.parameter_groups`` puts in the ``quant`` group by name, as ours; the
  ParetoQ alphas are moved there too).

Every row, ours and torchao's, trains in one loop: ``qat-train``'s, the Lightning Trainer of its
recipe's ``trainer`` config (``fit``) on its data module (``TextDataModule`` of the shipped corpus
with ``--batch``, ``--seq-len`` and ``--heldout-blocks`` x ``--seq-len`` held-out tokens, seed
``--seed``: the same batches in the same order for every row), the same number of steps and
tokens, the seed set before the model is built as ``qat-train`` sets it, the recipe's gradient
clipping (1.0; none for the forward-only row, whose recipe runs ZOSGD at a constant rate, two
forward passes a step). torchao's fake quantizers go into the reference recipe's model in place
of ``quantize_``; the rest of their row is the reference recipe's. Held-out: the data module's
split, the FIRST blocks of the corpus, never trained on. Perplexity (``qat.metrics.perplexity``, a
Lightning callback; the Trainer's own validation is off) is measured with the fake quantizers
active at step 0, every ``--eval-every`` steps and at the end.

Per row: PTQ perplexity on its own grid, QAT perplexity, x FP, the fraction of the PTQ-to-FP
log-perplexity gap recovered, ``(log ppl_ptq - log ppl_qat) / (log ppl_ptq - log ppl_fp)``, both
against the row's own grid and against the width's reference PTQ (round-to-nearest on the
reference recipe's grid: one denominator for every row of a width, so the fractions compare end
points, not starting points), the ratio of its perplexity to torchao's best row, the curve and
wall seconds. Targets: the best of ours recovers more of the reference gap than torchao's best at
w2 and ternary, and at least as much at w4 (equivalently: a lower perplexity at w2 and ternary, not
a higher one at w4); w3 is reported without a target.

    .venv/bin/python benchmarks/peers_accuracy.py                  # --quick: 15 steps x 2 x 128 tokens, 8 held-out blocks (~20 min, 2 cores)
    .venv/bin/python benchmarks/peers_accuracy.py --full           # the recipes' steps (60/100/120/140), 4 x 256, 20,480 held-out tokens (hours on CPU)
    .venv/bin/python benchmarks/peers_accuracy.py --full --device cuda --model HuggingFaceTB/SmolLM2-360M
    .venv/bin/python benchmarks/peers_accuracy.py --only w4 --methods lsq,torchao_dynamic --steps 2 --seq-len 64 --batch 1 --heldout-blocks 1

Writes ``benchmarks/results/peers_accuracy.json`` (``--out``), a PNG beside it (perplexity against
step, one panel per width) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

# Per width: the reference recipe (torchao's optimizer settings, its grid and the reference PTQ)
# and our rows as (key, label, Hydra overrides).
WIDTHS = {
    "w4": ("smollm2_w4_lsq", [
        ("lsq", "LSQ", ["recipe=smollm2_w4_lsq"]),
        ("lsqplus", "LSQ+", ["recipe=smollm2_w4_lsq", "quant=w4_lsqplus"]),
        ("l4q", "L4Q (r16, LSQ+)", ["recipe=smollm2_w4_l4q"]),
        ("peqa", "scale-only (PEQA)", ["recipe=smollm2_w4_peqa"]),
        ("zo", "forward-only SPSA on step sizes", ["recipe=smollm2_w4_zo_scales"]),
    ]),
    "w3": ("smollm2_w3_lsq", [
        ("lsq", "LSQ", ["recipe=smollm2_w3_lsq"]),
        ("lsqplus", "LSQ+", ["recipe=smollm2_w3_lsq", "quant=w3_lsqplus"]),
        ("l4q", "L4Q (r16, LSQ+)", ["recipe=smollm2_w3_l4q"]),
    ]),
    "w2": ("smollm2_w2_lsq", [
        ("lsqplus", "LSQ+", ["recipe=smollm2_w2_lsq"]),
        ("lwc", "LWC", ["recipe=smollm2_w2_lwc"]),
    ]),
    "ternary": ("smollm2_ternary_absmean", [
        ("absmean", "absmean (BitNet b1.58)", ["recipe=smollm2_ternary_absmean"]),
        ("seq", "SEQ (ParetoQ) g64", ["recipe=smollm2_ternary_seq"]),
        ("tequila", "Tequila", ["recipe=smollm2_ternary_tequila"]),
    ]),
}
TORCHAO = (("torchao_dynamic", False), ("torchao_range", True))
PARQ_BLOCK = 64  # PARQ's quantization groups: the reference recipe's group size
# torchao's own ternary QAT (prototypes; three levels {-1, 0, 1} * s like ours): (key, label, kind)
TORCHAO_TERNARY = (
    ("torchao_parq_ste", "torchao PARQ hard-quant (STE)", "parq_ste"),
    ("torchao_parq", "torchao PARQ (annealed prox)", "parq"),
    ("torchao_paretoq", "torchao ParetoQ SEQ (learned range)", "paretoq"),
)
# at least as good at w4 (<=), strictly better at w2 and ternary; w3 is reported without a target
TARGETS = {"w4": "at_least", "w2": "more", "ternary": "more"}
NOTES = [
    "Every row of a width trains in qat-train's loop (the recipe's Lightning Trainer, module and data module): the same "
    "batches in the same order, steps, tokens, seed, objective (labels: kd_weight=0 for the recipes that distill by "
    "default) and gradient clipping (1.0; none for the forward-only row, which follows its recipe: ZOSGD at a constant "
    "rate, two forward passes a step).",
    "LSQ+ at w4 and w3 has no recipe of its own: it runs smollm2_w4_lsq / smollm2_w3_lsq with quant=w4_lsqplus / w3_lsqplus.",
    "torchao rows use the width's reference recipe's AdamW settings and schedule: weights lr, quant_lr for its learned scales "
    "and zero points (named *.weight_fake_quantizer.*, the quant group of QATModule.parameter_groups).",
    "At 'ternary' torchao's rows are its ternary prototypes (torchao.prototype.parq: TernaryUnifQuantizer in groups of 64, "
    "scale max|w| / 1.5, with ProxHardQuant (STE) or ProxPARQ annealed to hard quantization at the last step; "
    "torchao.prototype.paretoq: QuantizeLinear(w_bits=0), per-row learned alpha); its int2 symmetric g64 fake quantizer "
    "(four levels {-2, -1, 0, 1} * s: one level more than ternary) is reported too but is not the same grid, so it is not "
    "in the target (same_grid false).",
    "torchao's symmetric grids use scale max|w| / (2^(b-1) - 0.5) over the full signed range (int4: max/7.5), ours max|w| / "
    "(2^(b-1) - 1) (int4: max/7, 15 codes used): at the same group size torchao's round-to-nearest starts slightly lower.",
    "torchao 0.18's asymmetric IntxFakeQuantizer computes a float-domain (tinygemm) zero point in weight units and stores it "
    "with zero_point_precision (int32 by default: truncated toward 0, i.e. 0 for weights), then fake-quantizes with integer-domain zero points: its "
    "'asymmetric' int2 grid starts as [-2, 1] * (max - min) / 3 with no offset; range learning rounds that zero point to 0, "
    "needs zero_point_precision=float32 (an int32 Parameter cannot require a gradient) and learns the offset from there.",
]
PRESETS = {
    "quick": {"steps": 15, "batch": 2, "seq_len": 128, "heldout_blocks": 8, "eval_every": 5},
    "full": {"steps": None, "batch": 4, "seq_len": 256, "heldout_blocks": 80, "eval_every": None},  # steps: the recipe's
}


# ---------------------------------------------------------------- building the rows (qat-train's pieces)


def settings_overrides(args, steps: int) -> list[str]:
    """The Hydra overrides every row shares: model, seed, steps, batch, sequence length, held-out split, device."""
    out = [f"model.name={args.model}", f"seed={args.seed}", f"threads={args.threads}", f"trainer.max_steps={steps}",
           "data.source=shipped", f"data.batch_size={args.batch}", f"data.seq_len={args.seq_len}",
           f"data.heldout_tokens={args.heldout_blocks * args.seq_len}", f"paths.output_dir={args.run_root}"]
    return out + (["trainer=gpu"] if args.device.startswith("cuda") else [])


def compose(overrides: list[str], steps: int, args):
    """The ``qat-train`` config of ``overrides`` with the shared settings (``settings_overrides``).

    Every row trains on the labels (``kd_weight=0``), as torchao's rows do: the recipes that distill
    by default are compared here on the same objective as their peers. A schedule warming up for
    longer than ``steps`` warms up over all of them, as ``qat-train`` does (``qat.train.fit_warmup``).
    """
    from omegaconf import open_dict

    from qat.config import compose as compose_run
    from qat.train import fit_warmup

    cfg = compose_run([*overrides, *settings_overrides(args, steps)])
    with open_dict(cfg):
        if "kd_weight" in cfg.module.get("objective", {}):
            cfg.module.objective.kd_weight = 0.0
    fit_warmup(cfg)
    return cfg


def recipe_steps(overrides: list[str]) -> int:
    from qat.config import compose as compose_run

    return int(compose_run(overrides).trainer.max_steps)


def load_run(cfg):
    """Seed, the pretrained model and the run's data module, in ``qat.train.run``'s order; ``(model, data)``."""
    import lightning as L

    from qat.config import load, make

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    model, tokenizer = load(cfg)
    data = make(cfg.data, "data", tokenizer=tokenizer)
    data.setup("fit")
    return model, data


def build_ours(cfg):
    """Model, module (QATModule / ZOModule), adapter, quantizer factories and data: ``qat.train.run``'s steps."""
    from qat.config import make, quantize, quantizer_factories
    from qat.train import build_module

    model, data = load_run(cfg)
    factories = quantizer_factories(cfg)
    adapter = quantize(cfg, model, factories)  # qat.quantize_, then the recipe's adapter (or None)
    module = build_module(cfg, model, make(cfg.module.objective, "module.objective"))
    return module, adapter, factories, data


def torchao_config(ref_factory, range_learning: bool):
    """torchao's weight config on the grid of our reference quantizer; (config, description, nearest_grid)."""
    import torch
    from torchao.quantization.qat import IntxFakeQuantizeConfig

    from qat.quantizers import Ternary

    q = ref_factory()
    nearest = isinstance(q, Ternary)
    bits, symmetric = (2, True) if nearest else (q.grid.bits, q.grid.signed)
    gran = {"granularity": "per_channel"} if q.granularity == "channel" else {"group_size": q.group_size}
    kwargs = dict(is_symmetric=symmetric, is_dynamic=not range_learning, range_learning=range_learning, **gran)
    if range_learning and not symmetric:
        kwargs["zero_point_precision"] = torch.float32  # an int32 zero point cannot require a gradient
    dtype = {2: torch.int2, 3: torch.int3, 4: torch.int4, 8: torch.int8}[bits]
    where = f"g{q.group_size}" if q.granularity == "group" else "per-channel"
    desc = f"int{bits} {'sym' if symmetric else 'asym'} {where}" + (" (nearest grid to ternary)" if nearest else "")
    return IntxFakeQuantizeConfig(dtype, **kwargs), desc, nearest


def build_torchao(ref_cfg, range_learning: bool):
    """Our reference recipe's module around a torchao-prepared model (210 decoder linears); ``(module, info, data)``."""
    from torch import nn
    from torchao.quantization import quantize_ as ao_quantize_
    from torchao.quantization.qat import QATConfig, initialize_fake_quantizers

    from qat.config import make, quantizer_factories
    from qat.train import build_module

    model, data = load_run(ref_cfg)
    weight_config, desc, nearest = torchao_config(quantizer_factories(ref_cfg)["weight"], range_learning)
    ao_quantize_(model, QATConfig(weight_config=weight_config, step="prepare"),
                 filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and fqn.startswith("model.layers."))
    n = sum(1 for _, m in model.named_modules() if hasattr(m, "weight_fake_quantizer"))
    if range_learning:  # scales and zero points become Parameters here, before the optimizer is built: on the first training batch
        first = next(iter(data.train_dataloader()))["input_ids"]
        initialize_fake_quantizers(model, (first,))
    module = build_module(ref_cfg, model, make(ref_cfg.module.objective, "module.objective"))
    return module, {"weight_config": repr(weight_config), "grid": desc, "nearest_grid": nearest, "layers": n}, data


def build_torchao_ternary(ref_cfg, kind: str, steps: int):
    """torchao's ternary QAT prototypes on the 210 decoder linears, around our reference recipe's module.

    ``parq_ste`` / ``parq``: PARQ's ``QuantOptimizer`` wraps the recipe's AdamW (same groups, rates and
    schedule, the schedule built on the wrapper so that Lightning steps it); the decoder linear weights
    form its quantized groups (``quant_bits=0``, ``quant_block_size=64``, scale max|w| / 1.5 per group
    recomputed every step). After each AdamW step on the latent weights it writes the prox of them into
    the model: ``ProxHardQuant`` (nearest level: the straight-through estimator) or ``ProxPARQ``
    (piecewise-affine, annealed from 0 to hard quantization at the last step). ``paretoq``: each
    linear becomes ParetoQ's ``QuantizeLinear`` (``w_bits=0``), alpha = max|w| per row (its
    ``train.py``), alphas in the ``quant`` group.

    Returns (module, info, data, start): ``start`` quantizes the weights for the step-0 evaluation
    (PARQ holds float weights until its first step) and restores them.
    """
    import contextlib

    import torch
    from torch import nn

    from qat.config import make
    from qat.train import build_module

    model, data = load_run(ref_cfg)
    linears = [(fqn, m) for fqn, m in model.named_modules() if isinstance(m, nn.Linear) and fqn.startswith("model.layers.")]
    objective = make(ref_cfg.module.objective, "module.objective")
    start = contextlib.nullcontext
    if kind == "paretoq":
        from torchao.prototype.paretoq.models.utils_quant import QuantizeLinear

        for fqn, m in linears:
            assert m.bias is None, f"{fqn}: ParetoQ's QuantizeLinear has no bias"
            q = QuantizeLinear(m.in_features, m.out_features, bias=False, w_bits=0, weight_layerwise=False)
            q.weight = m.weight
            with torch.no_grad():
                q.weight_clip_val.copy_(m.weight.abs().amax(-1, keepdim=True))
            parent, _, child = fqn.rpartition(".")
            setattr(model.get_submodule(parent), child, q)
        module = build_module(ref_cfg, model, objective)
        alphas = {id(p) for n, p in model.named_parameters() if n.endswith("weight_clip_val")}
        lr, wd = module.group_settings["quant"]
        groups = [{**g, "params": [p for p in g["params"] if id(p) not in alphas]} for g in module.parameter_groups()]
        quant = {"params": [p for p in model.parameters() if id(p) in alphas], "name": "quant", "weight_decay": wd, **({"lr": lr} if lr is not None else {})}
        groups = [g for g in groups if g["params"]] + [quant]
        module.parameter_groups = lambda: groups
        desc = "ternary ParetoQ SEQ per-row"
    else:
        from torchao.prototype.parq.optim import ProxHardQuant, ProxPARQ, QuantOptimizer
        from torchao.prototype.parq.quant import TernaryUnifQuantizer

        block = PARQ_BLOCK
        module = build_module(ref_cfg, model, objective)
        weights = {id(m.weight) for _, m in linears}
        groups = []
        for g in module.parameter_groups():
            q = [p for p in g["params"] if id(p) in weights]
            rest = [p for p in g["params"] if id(p) not in weights]
            if q:
                groups.append({**g, "params": q, "name": g["name"] + "_ternary", "quant_bits": 0, "quant_block_size": block})
            if rest:
                groups.append({**g, "params": rest})
        prox = ProxHardQuant() if kind == "parq_ste" else ProxPARQ(anneal_start=0, anneal_end=max(1, steps - 1))
        quantizer = TernaryUnifQuantizer()

        def configure_optimizers():
            optimizer = QuantOptimizer(module.optimizer_factory(groups), quantizer, prox, quant_period=1, quant_per_channel=True)
            if module.scheduler_factory is None:
                return optimizer
            scheduler = module.scheduler_factory(optimizer, total_steps=module.total_steps)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

        module.configure_optimizers = configure_optimizers
        qparams = [m.weight for _, m in linears]

        @contextlib.contextmanager
        def start():
            saved = [p.detach().clone() for p in qparams]
            with torch.no_grad():
                for p in qparams:
                    p.copy_(quantizer.quantize(p.view(-1, block), 0, dim=-1)[0].view_as(p))
            try:
                yield
            finally:
                with torch.no_grad():
                    for p, s in zip(qparams, saved):
                        p.copy_(s)

        desc = f"ternary max/1.5 g{block}"
    return module, {"kind": kind, "grid": desc, "nearest_grid": False, "layers": len(linears)}, data, start


def on_grid(model) -> bool:
    """Whether PARQ's final weights hold at most three values per group (its model is its export)."""
    from torch import nn

    for fqn, m in model.named_modules():
        if isinstance(m, nn.Linear) and fqn.startswith("model.layers."):
            g = m.weight.detach().reshape(-1, PARQ_BLOCK)
            s = g.sort(-1).values
            if int(((s[:, 1:] != s[:, :-1]).sum(-1) + 1).max()) > 3:
                return False
    return True


# ---------------------------------------------------------------- the one loop: qat-train's Trainer


def curve_callback(heldout, eval_steps, start=None):
    """A Lightning callback: held-out perplexity (``qat.metrics.perplexity``) at step 0 and at ``eval_steps``, and step times.

    ``start``: a context manager around the step-0 evaluation (a row whose weights are quantized by
    its optimizer step, not its forward). Evaluation time is kept apart from training time.
    """
    import contextlib

    import lightning as L

    from qat.metrics import perplexity

    class Curve(L.Callback):
        def __init__(self):
            self.curve, self.step_s, self.eval_s, self._t = [], [], 0.0, 0.0

        def _evaluate(self, step, model):
            t = time.perf_counter()
            self.curve.append([step, perplexity(model, heldout)])
            self.eval_s += time.perf_counter() - t

        def on_train_start(self, trainer, pl_module):
            if 0 in eval_steps:
                with (start or contextlib.nullcontext)():
                    self._evaluate(0, pl_module.model)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self._t = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.step_s.append(time.perf_counter() - self._t)
            if trainer.global_step in eval_steps:
                self._evaluate(trainer.global_step, pl_module.model)

    return Curve()


def fit(cfg, module, data, heldout, eval_steps, callbacks=(), start=None) -> dict:
    """Train ``module`` as ``qat-train`` does: the Trainer of ``cfg.trainer`` (``qat.train.build_trainer``) on ``data``.

    The recipe's trainer settings hold (gradient clipping, precision, accelerator); Lightning's own
    validation is off (``limit_val_batches=0``): the curve is measured by ``curve_callback`` on
    ``heldout``. A non-finite loss (``QATModule`` raises ``FloatingPointError``) ends the row as diverged.
    """
    from qat.train import build_trainer

    curve = curve_callback(heldout, eval_steps, start)
    trainer = build_trainer(cfg, [], [curve, *callbacks], limit_val_batches=0, num_sanity_val_steps=0,
                            enable_progress_bar=False, enable_model_summary=False)
    status = "ok"
    try:
        trainer.fit(module, datamodule=data)
    except FloatingPointError as e:
        status = f"diverged: {e}"
    forward_only = getattr(module, "forward_only", False)
    skipped = trainer.optimizers[0].skipped if forward_only and trainer.optimizers else None
    last = curve.curve[-1][1] if curve.curve else float("nan")
    return {"qat_ppl": last if status == "ok" and curve.curve and curve.curve[-1][0] == cfg.trainer.max_steps and math.isfinite(last) else None,
            "curve": curve.curve, "status": status, "steps": trainer.global_step, "train_seconds": sum(curve.step_s),
            "eval_seconds": curve.eval_s, "step_seconds": curve.step_s, "zo_skipped": skipped}


def optim_summary(cfg) -> dict:
    """What the row's optimizer was built from (the recipe's values)."""
    from omegaconf import OmegaConf

    o = OmegaConf.to_container(cfg.optim, resolve=True)
    m = OmegaConf.to_container(cfg.module, resolve=False)
    summary = {"optimizer": o["optimizer"]["_target_"], "lr": o["optimizer"].get("lr"), "quant_lr": o.get("quant_lr"),
               "adapter_lr": o.get("adapter_lr"), "schedule": o.get("scheduler"), "module": m["_target_"].rsplit(".", 1)[-1],
               "grad_clip": cfg.trainer.get("gradient_clip_val")}
    if "train" in m:  # forward-only: what moves, how directions are shared, SPSA's eps and seeds per step
        summary["zo"] = {"train": m["train"], "share": m["share"], "eps": o["optimizer"].get("eps"), "n": o["optimizer"].get("n")}
    return summary


def grid_name(q) -> str:
    """A short name of a quantizer's grid: ``int4 sym g32``, ``ternary absmean g64``."""
    from qat.quantizers import Ternary

    where = f"g{q.group_size}" if q.granularity == "group" else q.granularity.replace("channel", "per-channel")
    if isinstance(q, Ternary):
        return f"ternary {q.method} {where}" + (" + Tequila" if q.deadzone else "")
    return f"int{q.grid.bits} {'sym' if q.grid.signed else 'asym'} {where}"


def check_heldout(data, heldout) -> None:
    """Every row must be measured on the same held-out blocks (a recipe that changed the data would not be)."""
    import torch

    if not torch.equal(data.heldout_blocks(), heldout):
        raise RuntimeError("this row's held-out blocks differ from the FP model's: its recipe changes the data settings")


def trainable(module) -> int:
    return sum(p.numel() for p in module.model.parameters() if p.requires_grad)


def run_ours(overrides, steps, heldout, eval_steps, ptq_of, args) -> dict:
    """One of our rows: its recipe's model, adapter and module as ``qat-train`` builds them, trained by ``fit``."""
    from omegaconf import OmegaConf

    cfg = compose(overrides, steps, args)
    module, adapter, factories, data = build_ours(cfg)
    check_heldout(data, heldout)
    ptq_grid, ptq = ptq_of(factories["weight"])
    out = fit(cfg, module, data, heldout, eval_steps, callbacks=adapter.callbacks() if adapter is not None else [])
    return {"overrides": overrides, "grid": grid_name(factories["weight"]()), "ptq_grid": ptq_grid, "ptq_ppl": ptq,
            "quant": OmegaConf.to_container(cfg.quant, resolve=True),
            "adapter": OmegaConf.to_container(cfg.adapter, resolve=True) if cfg.get("adapter") else None,
            "optim": optim_summary(cfg), "trainable_params": trainable(module), **out}


def run_torchao(ref_cfg, ref_recipe, range_learning, heldout, eval_steps, missing) -> dict:
    """A torchao row: its fake quantizers in our reference recipe's model and module, trained by ``fit``."""
    if missing:
        return {"grid": "-", "status": "skipped: " + missing, "curve": []}
    module, info, data = build_torchao(ref_cfg, range_learning)
    check_heldout(data, heldout)
    out = fit(ref_cfg, module, data, heldout, eval_steps)
    start = out["curve"][0][1] if out["curve"] and out["curve"][0][0] == 0 else None
    return {"overrides": [f"recipe={ref_recipe}"], "grid": info["grid"], "ptq_grid": info["grid"] + " (torchao's rounding, step 0)",
            "ptq_ppl": start, "torchao": info, "same_grid": not info["nearest_grid"], "optim": optim_summary(ref_cfg),
            "trainable_params": trainable(module), **out}


def run_torchao_ternary(ref_cfg, ref_recipe, kind, steps, heldout, eval_steps, missing) -> dict:
    """A torchao ternary prototype row (PARQ or ParetoQ) in our reference recipe's module, trained by ``fit``."""
    if missing:
        return {"grid": "-", "status": "skipped: " + missing, "curve": []}
    module, info, data, start = build_torchao_ternary(ref_cfg, kind, steps)
    check_heldout(data, heldout)
    out = fit(ref_cfg, module, data, heldout, eval_steps, start=start)
    # ParetoQ quantizes in its forward (latent weights stay float); PARQ writes the grid into the weights
    info["final_weights_on_grid"] = True if kind == "paretoq" else on_grid(module.model)
    if not info["final_weights_on_grid"]:
        out["status"], out["qat_ppl"] = "not quantized at the end", None
    start_ppl = out["curve"][0][1] if out["curve"] and out["curve"][0][0] == 0 else None
    return {"overrides": [f"recipe={ref_recipe}"], "grid": info["grid"], "ptq_grid": info["grid"] + " (torchao's rounding, step 0)",
            "ptq_ppl": start_ppl, "torchao": info, "same_grid": True, "optim": optim_summary(ref_cfg),
            "trainable_params": trainable(module), **out}


# ---------------------------------------------------------------- summary


def gap(ptq, qat, fp):
    if ptq is None or qat is None or not ptq > fp:
        return None
    return (math.log(ptq) - math.log(qat)) / (math.log(ptq) - math.log(fp))


def summarise(width: dict, fp: float) -> None:
    rows = width["rows"]
    ref = width["reference_ptq_ppl"]
    for r in rows.values():
        q = r.get("qat_ppl")
        r["ratio_to_fp"] = q / fp if q else None
        r["gap_recovered"] = gap(ref, q, fp)
        r["gap_recovered_own_grid"] = gap(r.get("ptq_ppl"), q, fp)
    ours = {k: r for k, r in rows.items() if r["family"] == "ours" and r.get("qat_ppl")}
    ao = {k: r for k, r in rows.items() if r["family"] == "torchao" and r.get("qat_ppl") and r.get("same_grid", True)}
    best_ours = min(ours, key=lambda k: ours[k]["qat_ppl"]) if ours else None
    best_ao = min(ao, key=lambda k: ao[k]["qat_ppl"]) if ao else None
    width["best_ours"], width["best_torchao"] = best_ours, best_ao
    for r in rows.values():
        r["over_torchao_best"] = r["qat_ppl"] / ao[best_ao]["qat_ppl"] if best_ao and r.get("qat_ppl") else None
    width["ours_over_torchao"] = ours[best_ours]["qat_ppl"] / ao[best_ao]["qat_ppl"] if best_ours and best_ao else None


def target(width_key: str, width: dict) -> dict | None:
    kind = TARGETS.get(width_key)
    if kind is None:
        return None
    bo, ba = width["best_ours"], width["best_torchao"]
    statement = ("best of ours recovers at least as much of the PTQ-to-FP gap as torchao's best" if kind == "at_least"
                 else "best of ours recovers more of the PTQ-to-FP gap than torchao's best")
    if bo is None or (ba is None and not width["torchao_rows_ran"]):
        return {"statement": statement, "met": None, "why": "a side is missing from this run"}
    if ba is None:  # every torchao row ran and diverged
        return {"statement": statement, "met": True, "why": "every torchao row diverged"}
    g_ours, g_ao = width["rows"][bo]["gap_recovered"], width["rows"][ba]["gap_recovered"]
    met = g_ours >= g_ao if kind == "at_least" else g_ours > g_ao
    return {"statement": statement, "met": bool(met), "ours": bo, "torchao": ba, "gap_ours": g_ours, "gap_torchao": g_ao}


def fmt(v, spec=".4g") -> str:
    return "-" if v is None else format(v, spec)


def table(result: dict) -> str:
    """The markdown table (also the README's, through benchmarks/report.py)."""
    lines = ["| width | method | grid | PTQ | QAT | x FP | gap recovered (own PTQ) | gap recovered (ref. PTQ) | / torchao best | train s |",
             "|---|---|---|---|---|---|---|---|---|---|",
             f"| - | FP | float32 | - | {result['fp_ppl']:.4g} | 1 | - | - | - | - |"]
    for wk, w in result["widths"].items():
        lines.append(f"| {wk} | PTQ reference | {w['reference_grid']} | {w['reference_ptq_ppl']:.4g} | - | "
                     f"{w['reference_ptq_ppl'] / result['fp_ppl']:.3g} | 0 | 0 | - | - |")
        for key, r in w["rows"].items():
            name = r["label"] + (" **best**" if key in (w["best_ours"], w["best_torchao"]) else "")
            qat = fmt(r.get("qat_ppl")) if r["status"] == "ok" else r["status"]
            lines.append(f"| {wk} | {name} | {r['grid']} | {fmt(r.get('ptq_ppl'))} | {qat} | {fmt(r.get('ratio_to_fp'), '.3g')} | "
                         f"{fmt(r.get('gap_recovered_own_grid'), '.3f')} | {fmt(r.get('gap_recovered'), '.3f')} | "
                         f"{fmt(r.get('over_torchao_best'), '.3g')} | {fmt(r.get('train_seconds'), '.0f')} |")
    s = result["settings"]
    lines.append(f"\nFP perplexity {result['fp_ppl']:.4g} on {s['heldout_tokens']} held-out tokens; every row of a width: "
                 f"{s['batch']} x {s['seq_len']} tokens a step, steps {', '.join(f'{k} {v}' for k, v in s['steps'].items())}, "
                 f"seed {s['seed']}, {result['device']}, {s['threads']} threads.")
    for wk, t in result["targets"].items():
        if t is not None:
            verdict = "not measured" if t["met"] is None else ("**met**" if t["met"] else "**not met**")
            detail = (f" ({t['ours']} {t['gap_ours']:.3f} vs {t['torchao']} {t['gap_torchao']:.3f})" if "gap_ours" in t else
                      f" ({t['why']})" if "why" in t else "")
            lines.append(f"Target {wk}: {t['statement']}: {verdict}{detail}.")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widths = list(result["widths"])
    fig, axes = plt.subplots(1, len(widths), figsize=(4.2 * len(widths), 3.6), squeeze=False)
    for ax, wk in zip(axes[0], widths):
        w = result["widths"][wk]
        for r in w["rows"].values():
            if r.get("curve"):
                xs, ys = zip(*r["curve"])
                ax.plot(xs, ys, ("--" if r["family"] == "torchao" else "-"), marker="o", ms=3, label=r["label"])
        ax.axhline(result["fp_ppl"], color="k", ls=":", lw=1, label="FP")
        ax.axhline(w["reference_ptq_ppl"], color="gray", ls="-.", lw=1, label=f"PTQ {w['reference_grid']}")
        ax.set_yscale("log")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_title(wk)
        ax.set_xlabel("step")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("held-out perplexity")
    fig.suptitle(f"{result['model']}: QAT, ours (solid) vs torchao (dashed)", fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


# ---------------------------------------------------------------- main


def prepare(args, parser) -> tuple[str | None, str | None]:
    """The process as ``qat-train`` sets it up (allocator, threads), the device checked; ``(torchao version, why missing)``."""
    import torch

    from qat.runtime import tune_malloc

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch {torch.__version__} sees no CUDA device; run it on a GPU machine with a CUDA "
                     "build of torch, or leave --device out (cpu)")
    tune_malloc()
    torch.set_num_threads(args.threads)
    try:
        import torchao

        return torchao.__version__, None
    except ImportError as e:
        return None, f"torchao not installed ({e}); pip install -e '.[bench]'"


def save(result: dict, args, t_start: float) -> Path:
    """Targets summed up, seconds, the JSON written atomically to ``args.out``, the trainers' scratch folder removed."""
    measured = [t["met"] for t in result["targets"].values() if t is not None and t["met"] is not None]
    result["all_targets_met"] = all(measured) if measured else None
    result["seconds"] = time.perf_counter() - t_start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str))
    os.replace(tmp, args.out)
    shutil.rmtree(args.run_root, ignore_errors=True)
    return args.out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    preset = parser.add_mutually_exclusive_group()
    preset.add_argument("--quick", action="store_true", help="the default: " + str(PRESETS["quick"]))
    preset.add_argument("--full", action="store_true", help="the recipes' steps, 4 x 256 tokens, 80 held-out blocks")
    parser.add_argument("--steps", type=int, help="optimizer steps of every row (default: the preset's)")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--heldout-blocks", type=int)
    parser.add_argument("--eval-every", type=int, help="held-out perplexity every N steps (also at 0 and at the end)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--only", help="comma-separated widths among " + ",".join(WIDTHS))
    parser.add_argument("--methods", help="comma-separated row keys (lsq, lsqplus, l4q, peqa, zo, lwc, absmean, seq, tequila, "
                        "torchao_dynamic, torchao_range, torchao_parq_ste, torchao_parq, torchao_paretoq)")
    parser.add_argument("--out", type=Path, default=RESULTS / "peers_accuracy.json")
    args = parser.parse_args()
    name = "full" if args.full else "quick"
    p = PRESETS[name]
    for k in p:
        if getattr(args, k) is None:
            setattr(args, k, p[k])
    widths = args.only.split(",") if args.only else list(WIDTHS)
    unknown = [w for w in widths if w not in WIDTHS]
    if unknown:
        parser.error(f"--only: unknown widths {unknown}; choose among {list(WIDTHS)}")
    keys = {k for _, rows in WIDTHS.values() for k, _, _ in rows} | {k for k, _ in TORCHAO} | {k for k, _, _ in TORCHAO_TERNARY}
    methods = set(args.methods.split(",")) if args.methods else None
    if methods and methods - keys:
        parser.error(f"--methods: unknown rows {sorted(methods - keys)}; choose among {sorted(keys)}")

    import torch
    from hydra.utils import instantiate

    import qat
    from qat.metrics import perplexity
    from qat.train import ptq_factory

    ao_version, ao_missing = prepare(args, parser)
    torchao_rows = {k for k, _ in TORCHAO} | {k for k, _, _ in TORCHAO_TERNARY}
    if ao_missing and (methods is None or methods & torchao_rows):  # said before the rows' minutes of training, not after
        parser.error(f"{ao_missing}, or leave torchao's rows out with --methods")

    t_start = time.perf_counter()
    args.run_root = tempfile.mkdtemp(prefix="peers_accuracy-")  # the trainers' default_root_dir (they write nothing: no logger, no checkpoint)
    first = WIDTHS[widths[0]][0]
    fp_model, data = load_run(compose([f"recipe={first}"], args.steps or 1, args))  # the data every row trains and is measured on
    heldout, n_train = data.heldout_blocks(), len(data.train_blocks())
    del data
    fp_model.to(args.device)
    fp_ppl = perplexity(fp_model, heldout)
    print(f"FP: {fp_ppl:.4g} ({heldout.numel()} held-out tokens)", flush=True)

    result = {
        "what": "held-out perplexity after QAT, ours vs torchao, same data/steps/batch/schedule/seed per width; 210 decoder linears",
        "model": args.model, "device": args.device, "preset": name,
        "partial": bool(args.only or args.methods),
        "fp_ppl": fp_ppl, "widths": {}, "targets": {},
        "torch": torch.__version__, "torchao": ao_version, "notes": NOTES,
    }
    ptq_cache: dict[str, float] = {}

    def ptq_of(factory) -> tuple[str, float]:
        """Round-to-nearest on the grid of ``factory`` (``qat-train``'s PTQ), cached per grid."""
        key = grid_name(factory().rtn()) + " RTN"
        if key not in ptq_cache:
            m = copy.deepcopy(fp_model)
            qat.quantize_(m, weight=ptq_factory(factory), include="model.layers.*")
            ptq_cache[key] = perplexity(m, heldout)
            del m
            print(f"PTQ {key}: {ptq_cache[key]:.4g}", flush=True)
        return key, ptq_cache[key]

    steps_used, failed = {}, []
    for wk in widths:
        ref_recipe, ours = WIDTHS[wk]
        steps = args.steps or recipe_steps([f"recipe={ref_recipe}"])
        steps_used[wk] = steps
        eval_every = args.eval_every or max(1, steps // 4)
        eval_steps = set(range(0, steps + 1, eval_every)) | {0, steps}
        ref_cfg = compose([f"recipe={ref_recipe}"], steps, args)
        ref_factory = instantiate(ref_cfg.quant.weight)
        ref_grid, ref_ptq = ptq_of(ref_factory)
        width = {"reference_recipe": ref_recipe, "reference_grid": ref_grid, "reference_ptq_ppl": ref_ptq,
                 "steps": steps, "tokens": steps * args.batch * args.seq_len, "rows": {}, "torchao_rows_ran": False}
        result["widths"][wk] = width
        rows = [(key, label, lambda o=overrides: run_ours(o, steps, heldout, eval_steps, ptq_of, args))
                for key, label, overrides in ours]
        other = " (int2, not the same grid)" if wk == "ternary" else ""
        rows += [(key, "torchao " + ("range learning" if rl else "dynamic (STE)") + other,
                  lambda rl=rl: run_torchao(ref_cfg, ref_recipe, rl, heldout, eval_steps, ao_missing))
                 for key, rl in TORCHAO]
        if wk == "ternary":
            rows += [(key, label, lambda k=kind: run_torchao_ternary(ref_cfg, ref_recipe, k, steps, heldout, eval_steps, ao_missing))
                     for key, label, kind in TORCHAO_TERNARY]
        for key, label, run in rows:
            if methods and key not in methods:
                continue
            t0 = time.perf_counter()
            try:
                row = run()
            except Exception as e:  # one broken row must not cost the others: recorded, and the exit status says so
                import traceback

                traceback.print_exc()
                row = {"grid": "-", "status": f"error: {type(e).__name__}: {e}", "curve": []}
                failed.append(f"{wk}/{key}")
            gc.collect()  # the row's model, module and trainer: the next row's memory
            family = "torchao" if key.startswith("torchao") else "ours"
            width["rows"][key] = {"family": family, "label": label, **row, "seconds": time.perf_counter() - t0}
            width["torchao_rows_ran"] |= family == "torchao" and row["status"] == "ok" and row.get("same_grid", True)
            print(f"{wk} {label}: {fmt(row.get('qat_ppl'))} ({row['status']}, {time.perf_counter() - t0:.0f} s)", flush=True)
        summarise(width, fp_ppl)
        result["targets"][wk] = target(wk, width)

    result["settings"] = {"steps": steps_used, "batch": args.batch, "seq_len": args.seq_len, "heldout_blocks": args.heldout_blocks,
                          "heldout_tokens": int(heldout.numel()), "train_blocks": n_train,
                          "eval_every": args.eval_every, "seed": args.seed, "threads": args.threads,
                          "grad_clip": ref_cfg.trainer.get("gradient_clip_val"), "ptq": ptq_cache}
    out = save(result, args, t_start)
    png = out.with_suffix(".png")
    try:
        plot(result, png)
    except ImportError as e:  # matplotlib: the bench extra
        png = f"no plot ({e}; pip install -e '.[bench]')"
    print("\n" + table(result))
    print(f"\n{result['seconds']:.0f} s -> {out}, {png}")
    if failed:
        print(f"rows that failed: {', '.join(failed)} (see their status in the JSON)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
