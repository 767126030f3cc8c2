"""Callbacks that watch the quantized weights while they train, and plot the perplexity they reach.

``QuantStats`` measures, every few optimizer steps and for every layer with a weight quantizer,
the four numbers that tell whether QAT is healthy (taken from ``quantizer.codes(W)``, the same
rounding as the forward and the export)::

    step       mean step size s                       (collapsing or exploding scales)
    zero_frac  |{Q(w) = 0}| / n                       (the ternary dead zone; Tequila's target)
    flip_frac  |{q_t != q_(t-1)}| / n                 (codes still moving between two logs)
    clip_frac  |{|Q(w) - w| > s / 2}| / n             (weights the grid clips rather than rounds)

``zero_frac`` counts weights that dequantize to exactly 0, so it is the dead zone of a ternary
grid and the zero-point code of an asymmetric one alike. ``clip_frac`` compares the error with
half the step of the weight's own group: rounding inside the grid errs by at most ``s / 2``, so
larger errors are the clipped weights (for TWN, whose scale is not its rounding step, it counts
weights far from their level instead). For floating-point codes (FP4, FP8), whose spacing grows
with the value, it counts the weights beyond the largest level (``|w| > 6 s`` for E2M1).

``PerplexityPlot`` keeps the validation perplexity of each validation run and draws it at the end
of ``fit`` against the FP and round-to-nearest (PTQ) references as a W&B line plot.

Both write their numbers next to the logs as well (``quant_stats.jsonl``, ``ppl_curve.json``), so
runs without W&B keep them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from qat.convert import quantized_layers
from qat.errors import UserError
from qat.grid import group_view

METRICS = ("step", "zero_frac", "flip_frac", "clip_frac")
CLIP_TOL = 1e-4  # relative slack on s / 2: a weight exactly half-way rounds, it is not clipped
WEIGHT_SAMPLE = 4096  # latent weights per layer in the weight histograms
WEIGHT_HIST_LAYERS = 3  # first, middle and last quantized layer


def _latent(layer: nn.Module) -> torch.Tensor:
    """The weight as its quantizer sees it: ``(out, in)`` for linear layers, the table for embeddings."""
    latent = getattr(layer, "latent_weight", None)
    return latent() if callable(latent) else layer.weight


@torch.no_grad()
def layer_stats(layer: nn.Module, previous_codes: torch.Tensor | None = None) -> tuple[dict[str, float], torch.Tensor]:
    """Step size, dead-zone, flip and clip fractions of one quantized layer's weight.

    Args:
        layer: a ``QuantLinear`` or ``QuantEmbedding`` with a weight quantizer.
        previous_codes: the codes this function returned at the previous log, or None (the first
            log: ``flip_frac`` is 0).

    Returns:
        ``(stats, codes)``: ``stats`` maps ``"step"``, ``"zero_frac"``, ``"flip_frac"`` and
        ``"clip_frac"`` to floats; ``codes`` is the integer codes on the CPU (int8, or int16 for
        grids wider than 8 signed bits), to pass back as ``previous_codes`` next time.

    Raises:
        UserError: the layer has no weight quantizer.
        ValueError: ``previous_codes`` has another shape than the layer's codes.

    Example:
        >>> from qat.nn import QuantLinear
        >>> from qat.quantizers import Ternary
        >>> layer = QuantLinear.from_float(nn.Linear(4, 1, bias=False), Ternary("absmean"))
        >>> _ = layer.weight.data.copy_(torch.tensor([[0.4, -0.05, 0.1, -0.6]]))
        >>> stats, codes = layer_stats(layer)
        >>> round(stats["zero_frac"], 2), codes.tolist()
        (0.5, [[1, 0, 0, -1]])
    """
    quantizer = getattr(layer, "weight_quantizer", None)
    if quantizer is None:
        raise UserError(f"{type(layer).__name__} has no weight quantizer: nothing to measure; pass a layer of qat.quantized_layers(model)")
    w = _latent(layer).detach()
    c = quantizer.codes(w)
    w_hat = c.dequantize()
    n = w_hat.numel()
    if c.table is None:
        clipped = group_view((w_hat - w.float()).abs_(), c.granularity, c.group_size) > c.scale * (0.5 + CLIP_TOL)
    else:  # FP formats: the spacing grows with the value; clipped = beyond the largest level (saturated)
        top = c.table[torch.isfinite(c.table)].abs().max()
        clipped = group_view(w.float().abs(), c.granularity, c.group_size) > c.scale * top * (1 + CLIP_TOL)
    counts = torch.stack(
        [
            c.scale.mean(),
            torch.count_nonzero(w_hat == 0).float(),
            torch.count_nonzero(clipped).float(),
        ]
    ).tolist()  # one device sync per layer
    codes = c.codes.to("cpu")
    if previous_codes is None:
        flips = 0
    elif previous_codes.shape != codes.shape:
        raise ValueError(f"previous_codes has shape {tuple(previous_codes.shape)}, the layer's codes {tuple(codes.shape)}")
    else:
        flips = torch.count_nonzero(codes != previous_codes).item()
    stats = {"step": counts[0], "zero_frac": counts[1] / n, "flip_frac": flips / n, "clip_frac": counts[2] / n}
    return stats, codes


def aggregate(per_layer: dict[str, dict[str, float]], sizes: dict[str, int]) -> dict[str, float]:
    """Means over layers (``step_mean``, ``zero_frac_mean``, ``flip_frac``, ``clip_frac``) and the
    size-weighted ``zero_frac`` (the fraction of all quantized weights that are zero)."""
    if not per_layer:
        return {}
    k = len(per_layer)
    mean = {m: sum(s[m] for s in per_layer.values()) / k for m in METRICS}
    total = sum(sizes.values())
    return {
        "step_mean": mean["step"],
        "zero_frac": sum(s["zero_frac"] * sizes[n] for n, s in per_layer.items()) / total,
        "zero_frac_mean": mean["zero_frac"],
        "flip_frac": mean["flip_frac"],
        "clip_frac": mean["clip_frac"],
    }


class QuantStats(L.Callback):
    """Log step size, dead-zone, flip and clip fractions of every quantized layer during training.

    Logged every ``every_n_steps`` optimizer steps (``trainer.global_step % every_n_steps == 0``,
    after the step) and once when training starts (the initial state, step 0), on the model
    ``pl_module.model``:

    * to every logger (CSV, W&B, ...): ``quant/step_mean``, ``quant/flip_frac`` and
      ``quant/clip_frac`` (means over layers), ``quant/zero_frac`` (the fraction of all
      quantized weights that are zero, i.e. weighted by layer size) and
      ``quant/zero_frac_mean`` (its mean over layers);
    * to W&B loggers only: ``quant/<layer>/<metric>`` for every layer and, with ``histograms``,
      ``quant_hist/<metric>`` (the distribution of the metric over layers) and
      ``quant_weights/<layer>`` (a fixed sample of latent weights of the first, middle and last
      layer);
    * one JSON line per log (``{"step", "aggregate", "layers": {layer: {metric: value}}}``) to
      ``quant_stats.jsonl`` in ``trainer.log_dir`` (the trainer's ``default_root_dir`` without
      loggers), from rank 0.

    Everything is logged with ``step=trainer.global_step``, the number of optimizer steps the
    weights have seen. The numbers go to the loggers directly rather than through
    ``pl_module.log``, so they are written at the step they describe whatever
    ``log_every_n_steps`` is. The statistics are computed on rank 0 only (the other ranks hold
    the same weights). One pass over SmolLM2-135M's 210 layers (106M weights) takes about 1.8 s
    on one CPU thread, 70% of it in the quantizers' own ``codes()``; the previous codes are kept
    on the CPU for the flips (int8: one byte per weight).

    Args:
        every_n_steps: optimizer steps between two logs.
        histograms: also log W&B histograms.

    Raises:
        UserError: ``every_n_steps < 1``.

    Example:
        >>> trainer = lightning.Trainer(callbacks=[QuantStats(every_n_steps=50)], logger=WandbLogger())  # doctest: +SKIP
    """

    def __init__(self, every_n_steps: int = 50, histograms: bool = True):
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise UserError(f"every_n_steps={every_n_steps!r} must be a positive integer")
        self.every_n_steps = every_n_steps
        self.histograms = histograms
        self._previous: dict[str, torch.Tensor] = {}
        self._samples: dict[str, torch.Tensor] = {}
        self._last_step: int | None = None
        self._dir: Path | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # trainer.log_dir broadcasts from rank 0: every rank must ask for it.
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)
        self._previous, self._last_step, self._dir = {}, None, None
        if not any(True for _ in self._layers(pl_module)):
            rank_zero_warn("QuantStats: the model has no quantized layer with a weight quantizer; nothing to log")
            return
        self._dir = log_dir
        self._log(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        # With gradient accumulation several batches end on the same global step: log it once.
        step = trainer.global_step
        if step % self.every_n_steps == 0 and step != self._last_step and self._dir is not None:
            self._log(trainer, pl_module)

    @staticmethod
    def _layers(pl_module: L.LightningModule):
        for name, layer in quantized_layers(pl_module.model):
            if getattr(layer, "weight_quantizer", None) is not None:
                yield name, layer

    def compute(self, pl_module: L.LightningModule) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
        """One pass: ``(per-layer stats, aggregate)``; updates the codes kept for the next flips."""
        per_layer, sizes = {}, {}
        for name, layer in self._layers(pl_module):
            per_layer[name], codes = layer_stats(layer, self._previous.get(name))
            self._previous[name] = codes
            sizes[name] = codes.numel()
        return per_layer, aggregate(per_layer, sizes)

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        self._last_step = step
        if not trainer.is_global_zero:  # replicas hold the same weights; rank 0 speaks for them
            return
        per_layer, agg = self.compute(pl_module)
        scalars = {f"quant/{k}": v for k, v in agg.items()}
        detailed = None
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                detailed = detailed or {**scalars, **self._wandb_payload(pl_module, per_layer)}
                logger.log_metrics(detailed, step=step)
            else:
                logger.log_metrics(scalars, step=step)
        self._dir.mkdir(parents=True, exist_ok=True)
        with open(self._dir / "quant_stats.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "aggregate": agg, "layers": per_layer}) + "\n")

    def _wandb_payload(self, pl_module: L.LightningModule, per_layer: dict[str, dict[str, float]]) -> dict:
        payload = {f"quant/{name}/{m}": v for name, stats in per_layer.items() for m, v in stats.items()}
        if not self.histograms:
            return payload
        import wandb

        for m in METRICS:
            payload[f"quant_hist/{m}"] = wandb.Histogram([stats[m] for stats in per_layer.values()])
        layers = dict(self._layers(pl_module))
        names = list(layers)
        picks = sorted({names[0], names[len(names) // 2], names[-1]}, key=names.index)[:WEIGHT_HIST_LAYERS]
        for name in picks:
            w = _latent(layers[name]).detach().reshape(-1)
            if name not in self._samples:  # the same weights at every log, so the histograms compare
                g = torch.Generator().manual_seed(0)
                self._samples[name] = torch.randperm(w.numel(), generator=g)[:WEIGHT_SAMPLE]
            sample = w[self._samples[name].to(w.device)].float().cpu().numpy()
            payload[f"quant_weights/{name}"] = wandb.Histogram(sample)
        return payload


class PerplexityPlot(L.Callback):
    """Plot validation perplexity against step, with the FP and PTQ perplexities as flat lines.

    After every validation run of ``fit`` (the sanity check excepted) it reads ``metric`` from
    ``trainer.callback_metrics`` together with ``trainer.global_step``. It reads it in
    ``on_validation_end``, after the module's own ``on_validation_epoch_end`` has logged it
    (callbacks' ``on_validation_epoch_end`` run before the module's). At the end of ``fit`` it

    * logs ``ppl_curve``, a ``wandb.plot.line_series`` of QAT perplexity against step, to every
      W&B logger; if ``pl_module.reference_ppl`` is a dict such as ``{"fp": 17.3, "ptq": 3e7}``,
      each of its finite entries becomes a constant line (keys upper-cased: ``FP``, ``PTQ``);
      W&B panels can switch the y axis to log scale, which a PTQ perplexity in the millions needs;
    * writes ``ppl_curve.json`` (``{"metric", "steps", "qat", "reference"}``, non-finite
      references as null) to ``trainer.log_dir``, from rank 0.

    The points survive a resume from checkpoint (the callback has a ``state_dict``).

    Args:
        metric: the logged name of the validation perplexity.

    Example:
        >>> module.reference_ppl = {"fp": ppl_fp, "ptq": ppl_ptq}  # doctest: +SKIP
        >>> lightning.Trainer(callbacks=[PerplexityPlot()], logger=WandbLogger()).fit(module, data)  # doctest: +SKIP
    """

    def __init__(self, metric: str = "val/ppl"):
        self.metric = metric
        self.points: list[tuple[int, float]] = []

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        value = trainer.callback_metrics.get(self.metric)
        if trainer.sanity_checking or trainer.state.fn != "fit" or value is None:
            return
        step = trainer.global_step
        self.points = [(s, v) for s, v in self.points if s != step] + [(step, float(value))]

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)  # a collective: every rank asks
        if not trainer.is_global_zero:
            return
        reference = getattr(pl_module, "reference_ppl", None)
        reference = {str(k): float(v) for k, v in reference.items()} if isinstance(reference, dict) else {}
        steps, qat = [s for s, _ in self.points], [v for _, v in self.points]
        log_dir.mkdir(parents=True, exist_ok=True)
        record = {
            "metric": self.metric,
            "steps": steps,
            "qat": qat,
            "reference": {k: v if math.isfinite(v) else None for k, v in reference.items()},
        }
        (log_dir / "ppl_curve.json").write_text(json.dumps(record, indent=1) + "\n")
        wandb_loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not steps or not wandb_loggers:
            return
        import wandb

        flat = {k.upper(): v for k, v in reference.items() if math.isfinite(v)}
        plot = wandb.plot.line_series(
            xs=steps,
            ys=[[v] * len(steps) for v in flat.values()] + [qat],
            keys=[*flat, "QAT"],
            title="Validation perplexity",
            xname="step",
        )
        for logger in wandb_loggers:
            logger.log_metrics({"ppl_curve": plot}, step=trainer.global_step)

    def state_dict(self) -> dict:
        return {"points": list(self.points)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.points = [(int(s), float(v)) for s, v in state_dict.get("points", [])]
