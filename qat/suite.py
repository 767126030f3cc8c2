"""What a run is measured on: in-domain and out-of-domain held-out text, lm-eval tasks, the gap recovered.

Perplexity on the held-out split of the training corpus alone overstates QAT: training adapts the
model to that corpus, so a quantized model can end *below* the FP model there while it lost
ground everywhere else. Every model of a run (FP, round-to-nearest PTQ, the FP model fine-tuned
with the same data and steps, QAT) is therefore measured on the same ``Suite``:

* ``""``: the held-out split of the training corpus (never trained on, but the same kind of text);
* ``"ood"``: the held-out split of a second text the run never saw (``eval.ood``; by default
  Debian's common licences, ``qat.corpus.licenses_text``);
* ``tasks``: lm-eval task accuracy (``eval.tasks``, ``qat.tasks.lm_eval``).

Metric names follow ``{metric}_{model}[_ood]``: ``ppl_fp``, ``ppl_ptq_ood``, ``ppl_fp_ft``,
``ppl_qat_ood``; tasks go to ``metrics["tasks"][task][model]``. ``gaps`` adds the share of the
quantization gap recovered (``qat.metrics.gap_recovered``) per text and per task, against the FP
model (``gap_recovered[_ood]``) and, where it was trained, the FP fine-tune
(``gap_recovered_fp_ft[_ood]``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

from qat.metrics import gap_recovered

TEXTS = ("", "ood")  # the suffixes of the texts a suite measures
MODELS = ("fp", "fp_ft", "ptq", "qat")  # the rows of a run, in the order they are printed


def key(metric: str, model: str, text: str = "") -> str:
    """``ppl_fp``, ``ppl_qat_ood``: the metrics.json name of one model's metric on one text."""
    return f"{metric}_{model}" + (f"_{text}" if text else "")


@dataclass
class Suite:
    """The held-out data of a run and the lm-eval tasks, measured the same way for every model.

    Args:
        objective: the run's objective (``qat.lit.objectives``): its ``metric`` and ``evaluate``.
        heldout: in-domain held-out batches (the data module's ``val_dataloader``).
        ood: out-of-domain held-out batches, or None to skip that text.
        tasks: lm-eval task names (empty: none).
        task_options: ``include_path``, ``limit``, ``num_fewshot``, ``batch_size`` for ``qat.tasks.lm_eval``.
        device: where to measure (``"cuda"`` on a GPU run: the references and the trained model are
            measured there, not on the CPU where they were loaded or where Lightning leaves them);
            each model goes back to its own device afterwards. None: where the model is.
    """

    objective: object
    heldout: list
    ood: list | None = None
    tasks: list[str] = field(default_factory=list)
    task_options: dict = field(default_factory=dict)
    device: str | None = None

    @contextlib.contextmanager
    def on_device(self, *models):
        """Move ``models`` (None entries skipped) to the suite's device for the block, then back."""
        import torch

        models = [m for m in models if m is not None]
        homes = [next(m.parameters()).device for m in models]
        if self.device is not None:
            for m in models:
                m.to(self.device)
        try:
            yield
        finally:
            if self.device is not None:
                for m, home in zip(models, homes):
                    m.to(home)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()

    @property
    def metric(self) -> str:
        return self.objective.metric

    def batches(self) -> dict[str, list]:
        """``{text suffix: batches}`` of the texts this suite measures."""
        return {t: b for t, b in zip(TEXTS, (self.heldout, self.ood)) if b is not None}

    def texts(self, model, name: str, teacher=None, measure=None) -> dict[str, float]:
        """``{ppl_<name>: v, ppl_<name>_ood: v}``: ``model`` on every held-out text.

        ``measure(batches, compute)`` wraps each measurement (the FP model's goes through the cache
        of ``qat.fp_reference``); ``teacher`` is what embedding objectives compare against.
        """
        out = {}
        for text, batches in self.batches().items():
            def compute(batches=batches):
                with self.on_device(model, teacher if teacher is not model else None):
                    return self.objective.evaluate(model, batches, teacher if teacher is not None else model)
            out[key(self.metric, name, text)] = measure(batches, compute) if measure else compute()
        return out

    def task_scores(self, model, tokenizer) -> dict[str, dict]:
        """``{task: lm_eval summary}`` of ``model``; empty when the suite has no tasks."""
        if not self.tasks:
            return {}
        from qat.tasks import lm_eval

        with self.on_device(model):
            return lm_eval(model, tokenizer, self.tasks, **self.task_options)


def add_tasks(metrics: dict, name: str, scores: dict[str, dict]) -> None:
    """File one model's task scores under ``metrics["tasks"][task][name]`` (the headline value)."""
    for task, s in scores.items():
        entry = metrics.setdefault("tasks", {}).setdefault(task, {"metric": s["metric"], "higher_is_better": s["higher_is_better"]})
        entry[name] = s["value"]
        entry[f"{name}_stderr"] = s["stderr"]
        entry["n"] = s["n"]


def gaps(metrics: dict, metric: str) -> dict:
    """The gap-recovered entries of ``metrics`` (module docstring): per text and per task, vs FP and FP-ft."""
    log = metric == "ppl"
    out = {}
    for text in TEXTS:
        ptq, qat = metrics.get(key(metric, "ptq", text)), metrics.get(key(metric, "qat", text))
        for ref, name in (("fp", "gap_recovered"), ("fp_ft", "gap_recovered_fp_ft")):
            value = gap_recovered(ptq, qat, metrics.get(key(metric, ref, text)), log=log)
            if value is not None:
                out[name + (f"_{text}" if text else "")] = value
    for entry in metrics.get("tasks", {}).values():
        log_task = entry["metric"].endswith("perplexity")
        for ref, name in (("fp", "gap_recovered"), ("fp_ft", "gap_recovered_fp_ft")):
            value = gap_recovered(entry.get("ptq"), entry.get("qat"), entry.get(ref), log=log_task)
            if value is not None:
                entry[name] = value
    return out


def _ratio(x: float) -> str:
    """``x`` in at most 7 characters: two decimals, or powers of ten from 10,000 on (ternary PTQ is 1e5x FP)."""
    return f"{x:.2f}" if x < 1e4 else f"{x:.1e}"


def summary(metrics: dict, metric: str, run_dir: Path | None = None) -> str:
    """The table a run prints: each model on each text (x FP), the gap recovered, the tasks."""
    title = {"ppl": "perplexity", "cos": "cosine to FP"}[metric]
    labels = {"fp": "FP", "fp_ft": "FP fine-tuned (same data, steps)", "ptq": "PTQ (round-to-nearest)", "qat": "QAT"}
    texts = [t for t in TEXTS if key(metric, "fp", t) in metrics or key(metric, "qat", t) in metrics]
    heads = {"": f"held-out {title}", "ood": f"out-of-domain {title}"}
    ratio = metric == "ppl"
    lines = [f"{'model':<34}" + "".join(f"{heads[t]:>28}" + ("    x FP" if ratio else "") for t in texts)]
    for name in MODELS:
        if not any(key(metric, name, t) in metrics for t in texts):
            continue
        row = f"{labels[name]:<34}"
        for t in texts:
            value, fp = metrics.get(key(metric, name, t)), metrics.get(key(metric, "fp", t))
            row += f"{value:>28.4g}" if value is not None else f"{'-':>28}"
            if ratio:
                row += f" {_ratio(value / fp):>7}" if value is not None and fp else f"{'':>8}"
        lines.append(row)
    for ref, label in (("", "gap recovered (vs FP)"), ("_fp_ft", "gap recovered (vs FP fine-tuned)")):
        cells = [metrics.get(f"gap_recovered{ref}" + (f"_{t}" if t else "")) for t in texts]
        if any(c is not None for c in cells):
            lines.append(f"{label:<34}" + "".join((f"{c:>28.1%}" if c is not None else f"{'-':>28}") + ("" if not ratio else " " * 8) for c in cells))
    tasks = metrics.get("tasks", {})
    if tasks:
        cols = [m for m in MODELS if any(m in e for e in tasks.values())]
        lines += ["", f"{'task (metric)':<34}" + "".join(f"{labels[m].split(' (')[0]:>14}" for m in cols) + f"{'gap recovered':>16}"]
        for task, e in tasks.items():
            gap = e.get("gap_recovered")
            lines.append(f"{task + ' (' + e['metric'] + ')':<34}" + "".join(f"{e[m]:>14.4f}" if m in e else f"{'-':>14}" for m in cols)
                         + (f"{gap:>16.1%}" if gap is not None else f"{'-':>16}"))
    if "steps" in metrics:
        lines += ["", f"{metrics['steps']} steps, {metrics['tokens']} tokens, {metrics['seconds']} s, peak RSS {metrics['peak_rss_mb']:.0f} MB"]
    if run_dir is not None:
        lines.append(f"outputs: {run_dir} (metrics.json, checkpoints/, csv/, wandb/)")
    return "\n".join(lines)
