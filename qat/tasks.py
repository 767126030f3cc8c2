"""Task accuracy with EleutherAI's lm-evaluation-harness, on the model in memory.

QAT papers and peers (torchao, ModelOpt, EfficientQAT, ParetoQ) judge a quantized model by zero-shot
task accuracy: hellaswag, arc_easy, piqa, winogrande, with wikitext word perplexity next to them.
``lm_eval`` wraps a model that is already in memory (fake-quantized during training, a
``qat.load_packed`` export, or the plain FP model) in lm-eval's ``HFLM`` and runs lm-eval's own
``simple_evaluate``: the prompts, the answer scoring (sum of the continuation's log-likelihood,
``acc``; divided by its length in bytes, ``acc_norm``) and the aggregation are lm-eval's, so the
numbers compare with every paper that used the harness.

The named tasks download their data from the Hugging Face hub on first use. Offline, a task of
your own runs from a local file: a folder holding lm-eval task YAMLs (``include_path``) with
``dataset_path: json`` and ``dataset_kwargs: {data_files: {test: questions.jsonl}}``.

Each task is summarised by one headline metric (``acc_norm`` where the task has it, else ``acc``,
else its first metric), whose gap recovered is linear for accuracies and on the log scale for
perplexities (``qat.metrics.gap_recovered``).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from qat.errors import UserError

HEADLINE = ("acc_norm", "acc", "exact_match", "word_perplexity")  # the first one a task reports is its headline


def check_tasks(tasks: Sequence[str], include_path: str | Path | None = None) -> list[str]:
    """Resolve ``tasks`` against lm-eval's registry (plus ``include_path``) before any model work.

    Raises:
        ImportError: lm-eval is not installed (``pip install 'qat[eval]'``).
        UserError: an empty list, a task lm-eval does not know (names the closest known ones), or
            an ``include_path`` that is not a folder.
    """
    tasks = [t.strip() for t in tasks if t and t.strip()]
    if not tasks:
        raise UserError("no task given: name lm-eval tasks, e.g. hellaswag,arc_easy,piqa,winogrande")
    manager = _task_manager(str(include_path) if include_path is not None else None)
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        import difflib

        hints = {t: difflib.get_close_matches(t, known, n=3) for t in unknown}
        where = f" or in {include_path}" if include_path else " (a task of your own: pass its folder as include_path)"
        raise UserError(f"lm-eval knows no task {', '.join(unknown)}{where}; closest: {hints}")
    return tasks


@functools.lru_cache(maxsize=4)
def _task_manager(include_path):
    """lm-eval's task index (it reads every task YAML it ships: seconds), built once per include path."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ImportError("task accuracy needs lm-eval: pip install 'qat[eval]' (make install brings it)") from e
    if include_path is not None and not Path(include_path).is_dir():
        raise UserError(f"include_path {include_path} is not a folder of lm-eval task YAMLs")
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    return TaskManager(include_path=str(include_path) if include_path is not None else None, verbosity="WARNING")


def lm_eval(model: nn.Module, tokenizer, tasks: Sequence[str], *, include_path: str | Path | None = None,
            limit: int | None = None, num_fewshot: int | None = None, batch_size: int = 4) -> dict[str, dict]:
    """Evaluate ``model`` on lm-eval ``tasks`` with the harness's own evaluator.

    Args:
        model: a transformers causal LM (quantized or not), on its device.
        tokenizer: its tokenizer.
        tasks: lm-eval task names.
        include_path: a folder of task YAMLs of your own (offline tasks from local JSON).
        limit: evaluate the first ``limit`` questions of each task (None: all).
        num_fewshot: few-shot examples (None: each task's default, zero for the ones above).
        batch_size: sequences per forward pass.

    Returns:
        ``{task: {"metric": headline name, "value": v, "stderr": s or None, "n": questions,
        "higher_is_better": bool, "metrics": {every metric: value}}}``.

    Raises:
        ImportError, UserError: as ``check_tasks``.
        ValueError: lm-eval returned no numeric metric for a task.

    Example:
        >>> lm_eval(model, tokenizer, ["hellaswag", "arc_easy"], limit=200)  # doctest: +SKIP
        {'hellaswag': {'metric': 'acc_norm', 'value': 0.41, ...}, 'arc_easy': {...}}
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    tasks = check_tasks(tasks, include_path)
    manager = _task_manager(str(include_path) if include_path is not None else None)
    device = next(model.parameters()).device
    training = model.training
    model.eval()
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, device=str(device), batch_size=batch_size)
        out = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                              log_samples=False, verbosity="WARNING")
    finally:
        model.train(training)
    return {task: _summary(out["results"][task], out["higher_is_better"].get(task, {}), out["n-samples"].get(task, {}))
            for task in tasks}


def _summary(results: dict, higher: dict, samples: dict) -> dict:
    """One task's lm-eval results (``"acc,none": v, "acc_stderr,none": s``) as plain names."""
    metrics, stderr = {}, {}
    for key, value in results.items():
        if "," not in key or not isinstance(value, (int, float)):
            continue
        name = key.split(",", 1)[0]
        if name.endswith("_stderr"):
            stderr[name.removesuffix("_stderr")] = value
        else:
            metrics[name] = float(value)
    if not metrics:
        raise ValueError(f"lm-eval returned no metric ({sorted(results)})")
    headline = next((m for m in HEADLINE if m in metrics), next(iter(metrics)))
    err = stderr.get(headline)
    return {
        "metric": headline,
        "value": metrics[headline],
        "stderr": float(err) if isinstance(err, (int, float)) and math.isfinite(err) else None,
        "n": samples.get("effective", samples.get("original")),
        "higher_is_better": bool(higher.get(headline, True)),
        "metrics": metrics,
    }
