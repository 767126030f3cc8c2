"""``qat-train``: compose a run with Hydra, train it with Lightning, report FP / PTQ / QAT.

    qat-train                                    # the main job: SmolLM2-135M, ternary (SEQ g64), distilled
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

from qat.config import config_dir, make, map_factories, quantizer_factories, register_recipes
from qat.errors import UserError, exit_on_user_error

log = logging.getLogger("qat.train")


def prepare(cfg: DictConfig) -> dict:
    """Everything that needs no model: quantizer factories (dry-run built), output directory, wandb mode."""
    check_trainer(cfg)
    check_forward_only(cfg)
    fit_warmup(cfg)
    run_dir = Path(cfg.paths.output_dir)
    if (run_dir / "metrics.json").exists():
        raise UserError(f"{run_dir} already holds a finished run (metrics.json); pick another hydra.run.dir")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(dir=run_dir, prefix=".write-test-"))  # a name of its own: every rank probes
    except OSError as e:
        raise UserError(f"output directory {run_dir} is not writable ({e.strerror}); set hydra.run.dir to a writable path") from None
    if launch_rank() == 0:  # the ranks of a distributed run share the run directory
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)  # what qat-eval rebuilds the model from
    check_data(cfg)
    check_objective(cfg)
    check_eval(cfg)
    quant = quantizer_factories(cfg)
    named = [(f"quant.{k}", f) for k, f in quant.items() if k != "rules"]
    named += [(f"quant.rules[{i}].{k}", f) for i, (_, parts) in enumerate(quant.get("rules", [])) for k, f in parts.items() if f]
    if cfg.quant.get("plan") and cfg.quant.plan.get("bits") is not None:  # mixed precision: each candidate, dry-run too
        from qat.plan import candidate_nodes

        named += [(f"quant.plan.candidates.{k}", make(node, f"quant.plan.candidates.{k}"))
                  for k, node in candidate_nodes(cfg.quant.plan, cfg.quant.get("weight")).items()]
    for key, factory in named:
        check_arguments(factory, key)
        try:
            factory()  # dry run: bad bits or granularity fail here, before the model loads
        except UserError as e:
            raise UserError(f"{key}: {e}") from None
    if "WANDB_MODE" not in os.environ and not os.environ.get("WANDB_API_KEY"):
        os.environ["WANDB_MODE"] = "offline"
    return quant


def fit_warmup(cfg: DictConfig) -> None:
    """A run shortened below its schedule's warm-up (``trainer.max_steps=2`` on a recipe that warms up
    for 5 steps) warms up over all of its steps, with a warning, instead of failing after the references."""
    from omegaconf import open_dict

    sched = cfg.optim.get("scheduler")
    steps = cfg.trainer.get("max_steps")
    if sched is None or not sched.get("warmup_steps") or not steps or steps < 0 or sched.warmup_steps <= steps:
        return
    log.warning("optim.scheduler.warmup_steps=%d is longer than trainer.max_steps=%d: warming up over all %d steps",
                sched.warmup_steps, steps, steps)
    with open_dict(cfg):
        cfg.optim.scheduler.warmup_steps = int(steps)


def check_arguments(factory, key: str) -> None:
    """A config node's keys against the signature of the class it makes: a typo is a user's mistake, named here."""
    import functools
    import inspect

    if not isinstance(factory, functools.partial):
        return
    try:
        inspect.signature(factory.func).bind(*factory.args, **factory.keywords)
    except TypeError as e:
        raise UserError(f"{key}: {e}; see the settings of {factory.func.__module__}.{factory.func.__qualname__}") from None


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
    except UserError as e:
        raise UserError(f"trainer: {e}") from None


def check_forward_only(cfg: DictConfig) -> None:
    """A forward-only module (``module=zo``) has no gradients to clip or accumulate: refuse those settings."""
    from hydra.utils import get_class

    if not getattr(get_class(cfg.module._target_), "forward_only", False):
        return
    if cfg.trainer.get("gradient_clip_val"):
        raise UserError("module=zo trains forward-only, there is no gradient to clip: add trainer.gradient_clip_val=null")
    if cfg.trainer.get("accumulate_grad_batches", 1) != 1:
        raise UserError("module=zo trains forward-only: use optim.optimizer.n (seeds per step) instead of trainer.accumulate_grad_batches")
    from qat.zo.perturb import check_options

    m = OmegaConf.to_container(cfg.module, resolve=True)
    try:
        check_options(m.get("perturbation", "auto"), m.get("share", "none"), m.get("scale"))
    except UserError as e:
        raise UserError(f"module: {e}") from None


def check_data(cfg: DictConfig) -> None:
    """The training data's ``source`` (a named text, a file or folder, a hub name), classified before any model loads."""
    if cfg.data.get("source") is None:
        return
    from qat.lit.data import resolve_source

    try:
        resolve_source(cfg.data.source)
    except UserError as e:
        raise UserError(f"data: {e}") from None


def check_objective(cfg: DictConfig) -> None:
    """``module.objective``: the kind of model it trains (``model.task``), its keys against its class and
    its settings, before any model loads: a sentence-embedding objective on a causal LM is named here."""
    from hydra.utils import get_class

    cls = get_class(cfg.module.objective._target_)
    tasks, task = getattr(cls, "model_tasks", None), cfg.model.get("task", "auto")
    if tasks and task != "auto" and task not in tasks:
        raise UserError(f"module.objective: {cls.__name__} trains a {' or '.join(tasks)} model, and model={cfg.model.name} "
                        f"is a {task} model; pick the module for it (module=embedding_kd for sentence encoders, module=qat for "
                        "causal LMs) or a recipe that sets both (recipe=minilm_w4_kd)")
    factory = make(cfg.module.objective, "module.objective", _partial_=True)
    check_arguments(factory, "module.objective")
    try:
        factory()  # its own checks (kd_weight in [0, 1], ...)
    except UserError as e:
        raise UserError(f"module.objective: {e}") from None


def check_eval(cfg: DictConfig) -> None:
    """The evaluation settings (``eval.*``), checked before any model loads."""
    from hydra.utils import get_class

    if cfg.eval.get("ood"):
        from qat.lit.data import resolve_source

        try:
            resolve_source(cfg.eval.ood)  # a missing file fails here
            if cfg.eval.ood == "licenses":
                from qat.corpus import licenses_text

                licenses_text()
        except UserError as e:
            raise UserError(f"eval.ood: {e} (eval.ood=null skips the out-of-domain text)") from None
    if cfg.eval.get("tasks"):
        from qat.tasks import check_tasks

        try:
            check_tasks(list(cfg.eval.tasks), cfg.eval.get("tasks_include"))
        except (ImportError, UserError) as e:  # ImportError: lm-eval is not installed (the message says how)
            raise UserError(f"eval.tasks: {e}") from None
    if cfg.eval.get("fp_finetune"):
        if getattr(get_class(cfg.module._target_), "forward_only", False):
            raise UserError("eval.fp_finetune trains the FP model with backprop; a forward-only run (module=zo) has no "
                           "such reference: set eval.fp_finetune=false")
        if cfg.module.objective._target_ != "qat.lit.objectives.CausalLM":
            raise UserError(f"eval.fp_finetune is the causal-LM reference; {cfg.module.objective._target_} distills from "
                           "the FP model itself: set eval.fp_finetune=false")
        if cfg.trainer.devices not in (1, "1") or cfg.trainer.num_nodes != 1:
            raise UserError("eval.fp_finetune runs in one process; for a distributed run measure it in a one-process run "
                           "with the same recipe (trainer=cpu or trainer=gpu)")


def ptq_factory(factory):
    """Round-to-nearest on the same grid as ``factory``'s quantizers (``Quantizer.rtn``)."""
    return lambda: factory().rtn()


def run(cfg: DictConfig) -> float:
    """The pipeline of DESIGN.md; returns the held-out metric of the trained model (for sweeps)."""
    import lightning as L
    import torch
    from hydra.utils import instantiate

    import qat
    from qat.config import load, quantize
    from qat.fp_reference import cache_dir, fp_metric
    from qat.runtime import tune_malloc
    from qat.suite import add_tasks, gaps, summary

    t0 = time.perf_counter()
    quant = prepare(cfg)
    tune_malloc()
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    L.seed_everything(cfg.seed, workers=True)
    run_dir = Path(cfg.paths.output_dir)

    model, tokenizer = load(cfg)
    log.info("model %s loaded (%.1f s)", cfg.model.name, time.perf_counter() - t0)
    datamodule = make(cfg.data, "data", tokenizer=tokenizer)
    datamodule.setup("fit")
    plan = None
    if cfg.quant.get("plan") and cfg.quant.plan.get("bits") is not None:  # mixed precision: plan, then the rules are the run's
        from qat.plan import plan_into_run

        t_plan = time.perf_counter()
        plan = plan_into_run(cfg, model, datamodule, run_dir)
        quant = quantizer_factories(cfg)
        log.info("planned in %.1f s: %.3f bits per weight", time.perf_counter() - t_plan, plan.average_bits)
    objective = make(cfg.module.objective, "module.objective")
    metric = objective.metric
    suite = build_suite(cfg, tokenizer, objective, list(datamodule.val_dataloader()))
    fp = copy.deepcopy(model).eval().requires_grad_(False)
    metrics: dict = {}
    rank0 = launch_rank() == 0  # the other ranks would only repeat the references
    if cfg.eval.before and rank0:
        def cached(batches, compute):
            value, hit = fp_metric(fp, batches, objective, compute, cfg.eval.get("cache_fp", True))
            if hit:
                log.info("held-out %s of the FP model from the cache (%s): same weights, split and objective", metric, cache_dir())
            return value

        metrics.update(suite.texts(fp, "fp", teacher=fp, measure=cached))
        add_tasks(metrics, "fp", suite.task_scores(fp, tokenizer))
        ptq = copy.deepcopy(fp)
        rtn = map_factories(quant, ptq_factory)
        qat.quantize_(ptq, **rtn, include=list(cfg.quant.include), exclude=cfg.quant.exclude)
        metrics.update(suite.texts(ptq, "ptq", teacher=fp))
        add_tasks(metrics, "ptq", suite.task_scores(ptq, tokenizer))
        del ptq
        log.info("references: %s (%.1f s)", {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)}, time.perf_counter() - t0)
    fp_ft_seconds = 0.0
    if cfg.eval.get("fp_finetune") and rank0:
        t_ft = time.perf_counter()
        reference = fp_finetune(cfg, fp, datamodule, suite, tokenizer)
        fp_ft_seconds = round(time.perf_counter() - t_ft, 1)
        metrics.update(reference["texts"])
        add_tasks(metrics, "fp_ft", reference["tasks"])
        log.info("FP fine-tuned: %s (%.1f s)", {k: round(v, 4) for k, v in metrics.items() if "fp_ft" in k and isinstance(v, float)}, time.perf_counter() - t0)
    if suite.tasks or cfg.eval.get("fp_finetune"):  # lm-eval and the fine-tune draw random numbers (lm-eval seeds its own)
        L.seed_everything(cfg.seed, workers=True)  # so QAT starts alike with or without them

    adapter = quantize(cfg, model, quant)  # qat.quantize_, then the run's adapters (L4Q / LoRA / scale-only) or None
    module = build_module(cfg, model, objective, teacher=fp)
    if metric == "ppl":  # the in-domain references of the perplexity curve
        module.reference_ppl = {name: metrics[f"ppl_{name}"] for name in ("fp", "fp_ft", "ptq") if f"ppl_{name}" in metrics}
    loggers = [instantiate(c) for c in cfg.logger.values()] if cfg.get("logger") else []
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        if plan is not None and (run_dir / "plan.png").exists() and hasattr(lg, "log_image"):  # wandb: the plan's plot
            lg.log_image(key="plan", images=[str(run_dir / "plan.png")])
    callbacks = [instantiate(c) for c in cfg.callbacks.values()] if cfg.get("callbacks") else []
    callbacks += adapter.callbacks() if adapter is not None else []
    trainer = build_trainer(cfg, loggers, callbacks)
    t_fit = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    train_seconds = round(time.perf_counter() - t_fit, 1)

    # every rank evaluates: a sharded (trainer=fsdp) model runs its forward collectively; rank 0 reports
    trained = suite.texts(module.model, "qat", teacher=fp)
    if trainer.global_rank != 0:
        return float("nan")
    metrics.update(trained)
    if suite.tasks:
        if trainer.world_size > 1 and cfg.trainer.get("strategy") == "fsdp":
            log.warning("tasks skipped under FSDP (rank 0 holds shards only): run `qat-eval %s --tasks ...`", run_dir)
        else:
            add_tasks(metrics, "qat", suite.task_scores(module.model, tokenizer))
    metrics.update(gaps(metrics, metric))
    tokens_per_step = cfg.data.batch_size * trainer.world_size * trainer.accumulate_grad_batches * datamodule.tokens_per_sample
    metrics.update(
        steps=trainer.global_step,
        tokens=trainer.global_step * tokens_per_step,
        seconds=round(time.perf_counter() - t0, 1),
        train_seconds=train_seconds,  # trainer.fit alone (validation included): the budget two methods are compared at
        fp_ft_seconds=fp_ft_seconds,  # the FP fine-tune reference (0 when off or cached): `seconds` less this is the run without it
        peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        model=cfg.model.name,
        quant=OmegaConf.to_container(cfg.quant, resolve=True),
        recipe=cfg.get("recipe_name"),
        objective=OmegaConf.to_container(cfg.module.objective, resolve=True),
    )
    if plan is not None:
        metrics["plan"] = {k: v for k, v in plan.summary().items() if k in ("bits", "average_bits", "method")}
        metrics["plan"]["layers_per_candidate"] = {c: sum(1 for x in plan.choice if plan.candidates[x] == c) for c in plan.candidates}
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
        exported = export_run(module.model, tokenizer, run_dir, cfg.export.format, trainer, cfg.export.unquantized_dtype)
        if exported is not None:  # None: skipped (a sharded model; qat-export works from the checkpoint)
            metrics["export"] = str(exported)
    write_json(run_dir / "metrics.json", metrics)
    print("\n" + summary(metrics, metric, run_dir))
    return metrics[f"{metric}_qat"]


def build_module(cfg: DictConfig, model, objective, teacher=None):
    """The run's LightningModule (``cfg.module``) around ``model``, already quantized and adapted.

    Gradient checkpointing is switched on first when the model config asks for it; ``teacher``
    (the FP model) is passed only when the objective distills. ``benchmarks/peers_accuracy.py``
    builds every row's module here, ours and torchao's.

    Raises:
        UserError: gradient checkpointing on a model without it; the module's own checks.
    """
    if cfg.model.get("gradient_checkpointing"):  # recompute each block in the backward: activations shrink to block inputs
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise UserError(f"model.gradient_checkpointing=true: {type(model).__name__} does not support it; set it to false")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return make(cfg.module, "module", model=model, teacher=teacher if objective.needs_teacher else None, objective=objective)


def build_trainer(cfg: DictConfig, loggers: list, callbacks: list, **overrides):
    """The run's ``lightning.Trainer`` (``cfg.trainer``) with these loggers and callbacks; ``overrides`` replace trainer keys.

    Without our checkpoint callback (``~callbacks.checkpoint``) no checkpoint is written, rather
    than Lightning's default one (the full model and optimizer state, into the logger's folder).
    """
    import lightning as L
    from hydra.utils import instantiate

    from qat.lit.checkpoint import AtomicCheckpointIO

    checkpointing = any(isinstance(c, L.pytorch.callbacks.ModelCheckpoint) for c in callbacks)
    kwargs = dict(logger=loggers or False, callbacks=callbacks, plugins=[AtomicCheckpointIO()], enable_checkpointing=checkpointing)
    return instantiate(cfg.trainer, **{**kwargs, **overrides})


def export_run(model, tokenizer, run_dir: Path, format: str, trainer, unquantized_dtype: str = "auto") -> Path | None:
    """Rank 0: the trained model in ``run_dir/export`` (packed) or ``run_dir/export-<format>``."""
    from torch.distributed.tensor import DTensor

    from qat.export import export_

    if any(isinstance(p, DTensor) for p in model.parameters()):  # sharded (trainer=fsdp): rank 0 holds shards only
        log.warning("export skipped under FSDP: run `qat-export %s --format %s` on the checkpoint", run_dir, format)
        return None
    out = run_dir / ("export" if format == "packed" else f"export-{format}")
    try:
        return export_(model, out, format=format, tokenizer=tokenizer, overwrite=True, unquantized_dtype=unquantized_dtype)
    except UserError as e:
        raise UserError(f"export: {e} (set export.enabled=false to skip the export)") from None


def build_suite(cfg: DictConfig, tokenizer, objective, heldout: list):
    """The run's ``qat.suite.Suite``: its held-out split, the out-of-domain text (``eval.ood``), its tasks."""
    from qat.suite import Suite

    ood = None
    if cfg.eval.get("ood"):
        other = make(cfg.data, "eval.ood", tokenizer=tokenizer, source=cfg.eval.ood)
        try:
            other.setup("validate")
        except UserError as e:
            raise UserError(f"eval.ood: {e}") from None
        ood = list(other.val_dataloader())
    options = {"include_path": cfg.eval.get("tasks_include"), "limit": cfg.eval.get("tasks_limit"),
               "batch_size": cfg.eval.get("tasks_batch_size") or 4}
    return Suite(objective, heldout, ood, list(cfg.eval.get("tasks") or []), options, device=eval_device(cfg))


def eval_device(cfg: DictConfig) -> str | None:
    """Where a one-process run measures its models: the GPU it trains on, else where they are (None).

    Lightning moves the model to the GPU for ``fit`` and back to the CPU after it; the references
    are loaded on the CPU. Measuring them there would leave the GPU idle for minutes. A distributed
    run measures where each rank's model is (rank 0's references stay one process's work).
    """
    import torch

    accelerator = str(cfg.trainer.get("accelerator", "cpu"))
    one_process = cfg.trainer.get("devices") in (1, "1") and cfg.trainer.get("num_nodes", 1) == 1
    gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    return "cuda" if gpu and one_process and torch.cuda.is_available() else None


def fp_finetune_settings(cfg: DictConfig) -> dict:
    """Every setting the FP fine-tune depends on, and nothing else: the key of its cache entry.

    The fine-tune trains every weight on the labels and has no quantizers or adapters, so none of
    these change it: the run's objective, the learning rates and weight decays of quantizer
    parameters and adapters (``optim.quant_*``, ``optim.adapter_*``) and ``quant_delay_steps``.
    Recipes that differ only in those (CE and KD runs, LSQ and L4Q at one weight learning rate)
    train it once.
    """
    settings = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("data", "optim", "module")}
    settings["module"].pop("objective")
    for key in ("quant_lr", "quant_weight_decay", "adapter_lr", "adapter_weight_decay"):
        settings["optim"].pop(key, None)
        settings["module"].pop(key, None)  # the module reads them from optim
    settings["module"].pop("quant_delay_steps", None)
    settings["chunk_tokens"] = cfg.module.objective.get("chunk_tokens")
    settings["trainer"] = {k: cfg.trainer.get(k) for k in ("max_steps", "accumulate_grad_batches", "gradient_clip_val", "precision")}
    settings.update(seed=cfg.seed, ood=cfg.eval.get("ood"))
    return settings


def fp_finetune(cfg: DictConfig, fp, datamodule, suite, tokenizer) -> dict:
    """The fair reference: the FP model trained with the run's data, steps, optimizer and schedule.

    Every weight trains, with the run's weight learning rate, on the labels alone (cross-entropy:
    distilling the FP model into itself would not move it). Its metrics are cached like the FP
    model's, under the FP fingerprint plus every setting the training depends on, so recipes
    that share them (a CE and a KD run, say) train it once.

    Returns:
        ``{"texts": {ppl_fp_ft[_ood]: v}, "tasks": {task: qat.tasks.lm_eval summary}}``.
    """
    import hashlib

    import lightning as L
    from hydra.utils import instantiate

    from qat.fp_reference import cached, fingerprint
    from qat.lit.objectives import CausalLM

    settings = fp_finetune_settings(cfg)
    settings.update(tasks=list(suite.tasks), task_options=suite.task_options)
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()
    key = fingerprint(fp, suite.heldout, suite.objective)[:32] + "-fp_ft-" + digest[:32]

    def train() -> dict:
        log.info("FP fine-tune: %d steps with the run's data, optimizer and schedule (the fair reference)", cfg.trainer.max_steps)
        L.seed_everything(cfg.seed, workers=True)
        model = copy.deepcopy(fp).train().requires_grad_(True)
        objective = CausalLM(chunk_tokens=cfg.module.objective.get("chunk_tokens"))
        module = make(cfg.module, "eval.fp_finetune: module", model=model, teacher=None, objective=objective)
        trainer = instantiate(cfg.trainer, logger=False, callbacks=[], enable_checkpointing=False, limit_val_batches=0)
        trainer.fit(module, datamodule=datamodule)
        model = module.model.eval().requires_grad_(False)
        return {"texts": suite.texts(model, "fp_ft"), "tasks": suite.task_scores(model, tokenizer)}

    record, hit = cached(key, train) if cfg.eval.get("cache_fp", True) else (train(), False)
    if hit:
        log.info("FP fine-tune's metrics from the cache (%s): same weights, data, steps and optimizer", key)
    return record


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
def main(cfg: DictConfig) -> float:
    try:
        return run(cfg)
    except UserError as e:  # a mistake in the input: one line; anything else is a bug and keeps its traceback
        exit_on_user_error("qat-train", e)


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
    register_recipes()  # recipe=NAME and hparams_search=NAME (qat.config)
    main()


if __name__ == "__main__":
    cli()
