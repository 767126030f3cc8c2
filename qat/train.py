"""``qat-train``: compose a run with Hydra, train it with Lightning, report FP / PTQ / QAT.

    qat-train                                    # the main job: SmolLM2-135M, ternary + Tequila
    qat-train recipe=smollm2_w4_lsq              # a named experiment (recipes/experiment/)
    qat-train recipe=smollm2_w3_lsq quant.weight.bits=2 trainer.max_steps=50

Each step below is one call; the pieces live in the library. Bad configuration fails before the
model loads; every user error ends in a one-line message (exit status 2), not a traceback
(set ``QAT_TRACEBACK=1`` to see one).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("qat.train")
CONFIGS = str(Path(__file__).resolve().parent.parent / "configs")
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, PermissionError, KeyError)


class RunError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def prepare(cfg: DictConfig) -> dict:
    """Everything that needs no model: quantizer factories (dry-run built), output directory, wandb mode."""
    from hydra.utils import instantiate

    check_trainer(cfg)
    check_forward_only(cfg)
    run_dir = Path(cfg.paths.output_dir)
    if (run_dir / "metrics.json").exists():
        raise RunError(f"{run_dir} already holds a finished run (metrics.json); pick another hydra.run.dir")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(dir=run_dir, prefix=".write-test-"))  # a name of its own: every rank probes
    except OSError as e:
        raise RunError(f"output directory {run_dir} is not writable ({e.strerror}); set hydra.run.dir to a writable path") from None
    if launch_rank() == 0:  # the ranks of a distributed run share the run directory
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)  # what qat-eval rebuilds the model from
    quant = {}
    for key in ("weight", "activation", "embedding"):
        node = cfg.quant.get(key)
        if node is not None:
            factory = instantiate(node)
            try:
                factory()  # dry run: bad bits or granularity fail here, before the model loads
            except (ValueError, TypeError) as e:
                raise RunError(f"quant.{key}: {e}") from None
            quant[key] = factory
    if "WANDB_MODE" not in os.environ and not os.environ.get("WANDB_API_KEY"):
        os.environ["WANDB_MODE"] = "offline"
    return quant


def launch_rank() -> int:
    """This process's global rank as its launcher set it (0 before Lightning starts other processes)."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return rank_zero_only.rank


def check_trainer(cfg: DictConfig) -> None:
    """Processes against devices and launcher (``qat.distributed.check_launch``), before any model loads."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from qat.distributed import check_launch

    sweep = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        check_launch(cfg.trainer.accelerator, cfg.trainer.devices, cfg.trainer.num_nodes, sweep=sweep)
    except ValueError as e:
        raise RunError(str(e)) from None


def check_forward_only(cfg: DictConfig) -> None:
    """A forward-only module (``module=zo``) has no gradients to clip or accumulate: refuse those settings."""
    from hydra.utils import get_class

    if not getattr(get_class(cfg.module._target_), "forward_only", False):
        return
    if cfg.trainer.get("gradient_clip_val"):
        raise RunError("module=zo trains forward-only, there is no gradient to clip: add trainer.gradient_clip_val=null")
    if cfg.trainer.get("accumulate_grad_batches", 1) != 1:
        raise RunError("module=zo trains forward-only: use optim.optimizer.n (seeds per step) instead of trainer.accumulate_grad_batches")
    from qat.zo.perturb import check_options

    m = OmegaConf.to_container(cfg.module, resolve=True)
    try:
        check_options(m.get("perturbation", "auto"), m.get("share", "none"), m.get("scale"))
    except ValueError as e:
        raise RunError(f"module: {e}") from None


def ptq_factory(factory):
    """Round-to-nearest on the same grid as ``factory``'s quantizers (``Quantizer.rtn``)."""
    return lambda: factory().rtn()


def run(cfg: DictConfig) -> float:
    """The pipeline of DESIGN.md; returns the held-out metric of the trained model (for sweeps)."""
    import lightning as L
    import torch
    from hydra.utils import instantiate

    import qat
    from qat.fp_reference import cache_dir, fp_metric
    from qat.lit.checkpoint import AtomicCheckpointIO
    from qat.models import load_model
    from qat.runtime import tune_malloc

    t0 = time.perf_counter()
    quant = prepare(cfg)
    tune_malloc()
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    L.seed_everything(cfg.seed, workers=True)
    run_dir = Path(cfg.paths.output_dir)

    model, tokenizer = load_model(cfg.model.name, task=cfg.model.task, dtype=cfg.model.dtype)
    log.info("model %s loaded (%.1f s)", cfg.model.name, time.perf_counter() - t0)
    datamodule = instantiate(cfg.data, tokenizer=tokenizer)
    datamodule.setup("fit")
    heldout = list(datamodule.val_dataloader())
    objective = instantiate(cfg.module.objective)
    metric = objective.metric
    fp = copy.deepcopy(model).eval().requires_grad_(False)
    metrics: dict = {}
    if cfg.eval.before and launch_rank() == 0:  # the other ranks would only repeat it
        metrics[f"{metric}_fp"], cached = fp_metric(fp, heldout, objective, lambda: objective.evaluate(fp, heldout, fp), cfg.eval.get("cache_fp", True))
        if cached:
            log.info("held-out %s of the FP model from the cache (%s): same weights, split and objective", metric, cache_dir())
        ptq = copy.deepcopy(fp)
        rtn = {k: ptq_factory(f) for k, f in quant.items()}
        qat.quantize_(ptq, **rtn, include=list(cfg.quant.include), exclude=cfg.quant.exclude)
        metrics[f"{metric}_ptq"] = objective.evaluate(ptq, heldout, fp)
        del ptq
        log.info("held-out %s: FP %.4g, PTQ %.4g (%.1f s)", metric, metrics[f"{metric}_fp"], metrics[f"{metric}_ptq"], time.perf_counter() - t0)

    try:
        qat.quantize_(model, weight=quant.get("weight"), activation=quant.get("activation"), embedding=quant.get("embedding"), include=list(cfg.quant.include), exclude=cfg.quant.exclude)
    except (ValueError, TypeError) as e:
        raise RunError(str(e)) from None
    adapter = instantiate(cfg.adapter) if cfg.get("adapter") else None  # L4Q / LoRA / scale-only (qat.adapters)
    if adapter is not None:
        adapter.apply_(model)
    if cfg.model.get("gradient_checkpointing"):  # recompute each block in the backward: activations shrink to block inputs
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise RunError(f"model.gradient_checkpointing=true: {type(model).__name__} does not support it; set it to false")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    module = instantiate(cfg.module, model=model, teacher=fp if objective.needs_teacher else None, objective=objective)
    if metric == "ppl":
        module.reference_ppl = {k.rsplit("_", 1)[1]: v for k, v in metrics.items()}
    loggers = [instantiate(c) for c in cfg.logger.values()] if cfg.get("logger") else []
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    callbacks = [instantiate(c) for c in cfg.callbacks.values()] if cfg.get("callbacks") else []
    callbacks += adapter.callbacks() if adapter is not None else []
    # without our checkpoint callback (~callbacks.checkpoint) no checkpoint is written, rather than
    # Lightning's default one (the full model and optimizer state, into the logger's folder)
    checkpointing = any(isinstance(c, L.pytorch.callbacks.ModelCheckpoint) for c in callbacks)
    trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks, plugins=[AtomicCheckpointIO()],
                          enable_checkpointing=checkpointing)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))

    # every rank evaluates: a sharded (trainer=fsdp) model runs its forward collectively; rank 0 reports
    value = objective.evaluate(module.model, heldout, fp)
    if trainer.global_rank != 0:
        return float("nan")
    metrics[f"{metric}_qat"] = value
    tokens_per_step = cfg.data.batch_size * trainer.world_size * trainer.accumulate_grad_batches * datamodule.tokens_per_sample
    metrics.update(
        steps=trainer.global_step,
        tokens=trainer.global_step * tokens_per_step,
        seconds=round(time.perf_counter() - t0, 1),
        peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        model=cfg.model.name,
        quant=OmegaConf.to_container(cfg.quant, resolve=True),
        recipe=cfg.get("recipe_name"),
    )
    for lg in loggers:
        lg.log_metrics({k: v for k, v in metrics.items() if isinstance(v, float)}, step=trainer.global_step)
        lg.finalize("success")
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()  # Lightning leaves the run open; close it so the offline files are complete
    if adapter is not None:
        from qat.adapters import save_adapters

        save_adapters(module.model, run_dir / "adapter")  # peft's format (scale-only: its own file)
    if cfg.export.enabled:  # after save_adapters: export merges adapters into the model
        exported = export_run(module.model, tokenizer, run_dir, cfg.export.format, trainer)
        if exported is not None:  # None: skipped (a sharded model; qat-export works from the checkpoint)
            metrics["export"] = str(exported)
    write_json(run_dir / "metrics.json", metrics)
    print_summary(metrics, metric, run_dir)
    return metrics[f"{metric}_qat"]


def export_run(model, tokenizer, run_dir: Path, format: str, trainer) -> Path | None:
    """Rank 0: the trained model in ``run_dir/export`` (packed) or ``run_dir/export-<format>``."""
    from torch.distributed.tensor import DTensor

    from qat.export import export_

    if any(isinstance(p, DTensor) for p in model.parameters()):  # sharded (trainer=fsdp): rank 0 holds shards only
        log.warning("export skipped under FSDP: run `qat-export %s --format %s` on the checkpoint", run_dir, format)
        return None
    out = run_dir / ("export" if format == "packed" else f"export-{format}")
    try:
        return export_(model, out, format=format, tokenizer=tokenizer, overwrite=True)
    except ValueError as e:
        raise RunError(f"export: {e} (set export.enabled=false to skip the export)") from None


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def print_summary(metrics: dict, metric: str, run_dir: Path) -> None:
    name = {"ppl": "held-out perplexity", "cos": "held-out cosine to FP"}[metric]
    fp = metrics.get(f"{metric}_fp")
    rows = [("FP", fp), ("PTQ (round-to-nearest)", metrics.get(f"{metric}_ptq")), ("QAT", metrics.get(f"{metric}_qat"))]
    print(f"\n{'model':<24}{name:>24}" + ("      x FP" if metric == "ppl" and fp else ""))
    for label, value in rows:
        if value is None:
            continue
        ratio = f"{value / fp:>10.2f}" if metric == "ppl" and fp else ""
        print(f"{label:<24}{value:>24.4g}{ratio}")
    print(f"\n{metrics['steps']} steps, {metrics['tokens']} tokens, {metrics['seconds']} s, peak RSS {metrics['peak_rss_mb']:.0f} MB")
    print(f"outputs: {run_dir} (metrics.json, checkpoints/, csv/, wandb/)")


@hydra.main(version_base="1.3", config_path=CONFIGS, config_name="train")
def main(cfg: DictConfig) -> float:
    try:
        return run(cfg)
    except RunError as e:
        print(f"qat-train: error: {e}", file=sys.stderr)
        sys.exit(2)
    except USER_ERRORS as e:
        if os.environ.get("QAT_TRACEBACK") == "1":
            raise
        print(f"qat-train: error: {e}", file=sys.stderr)
        sys.exit(2)


def _check_output_parent(argv: list[str]) -> None:
    """Hydra creates the run directory before our code runs: refuse an unwritable one with one line."""
    run_dirs = [a.split("=", 1)[1] for a in argv if a.startswith(("hydra.run.dir=", "hydra.sweep.dir="))]
    for target in run_dirs or ["outputs"]:
        path = Path(target).expanduser().absolute()
        while not path.exists():
            path = path.parent
        try:
            os.rmdir(tempfile.mkdtemp(dir=path, prefix=".qat-probe-"))
            writable = True
        except OSError:
            writable = False
        if not writable:
            print(f"qat-train: error: cannot create the run directory {target}: {path} is not a writable directory; "
                  "set hydra.run.dir to a writable path", file=sys.stderr)
            sys.exit(2)


def cli() -> None:
    """Console entry point (``qat-train``)."""
    _check_output_parent(sys.argv[1:])
    main()


if __name__ == "__main__":
    cli()
