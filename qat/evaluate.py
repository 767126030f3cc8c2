"""``qat-eval``: a trained run's held-out metric and task accuracy, from its directory, checkpoint or export alone.

    qat-eval outputs/smollm2_w4_lsq/2026-11-30_07-00-00            # the run's own held-out split
    qat-eval outputs/.../checkpoints/last.ckpt --source notes.txt  # any data the DataModule reads
    qat-eval outputs/smollm2_w4_lsq/<run> --tasks hellaswag,arc_easy,piqa,winogrande --limit 500
    qat-eval outputs/smollm2_w4_lsq/<run>/export --tasks arc_easy   # the packed low-bit export itself

The run directory's ``config.yaml`` (the resolved config ``qat-train`` writes) says how to rebuild the
model: the same model, the same ``quantize_`` call; the checkpoint's weights and quantizer state
are then loaded into it. A packed export directory (``quant_config.json``) loads with
``qat.load_packed`` instead and is evaluated on tasks. ``--tasks`` runs lm-evaluation-harness
(``qat.tasks.lm_eval``; ``--include-path`` adds task YAMLs of your own). Prints one JSON line
(``{"ppl": ...}`` or ``{"cos": ...}``, with ``"tasks"``) and, with ``--out``, writes it to a file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from qat.errors import UserError, exit_on_user_error


def lm_eval(model, tokenizer, tasks, **options) -> dict:
    """lm-eval task accuracy of a model in memory: ``qat.tasks.lm_eval`` (its docstring has the options).

    Example:
        >>> qat.evaluate.lm_eval(qat.load_packed("outputs/run/export"), tokenizer, ["arc_easy"])  # doctest: +SKIP
    """
    from qat.tasks import lm_eval as run_tasks

    return run_tasks(model, tokenizer, tasks, **options)


def evaluate_export(path: Path, tasks: list[str], **options) -> dict:
    """Task accuracy of a packed export directory (``qat.load_packed``, its tokenizer from the same folder)."""
    from transformers import AutoTokenizer

    from qat.export.packed import load_packed

    model = load_packed(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return {"tasks": lm_eval(model, tokenizer, tasks, **options), "export": str(path)}


def evaluate(path: str | Path, source: str | None = None, seq_len: int | None = None, heldout_tokens: int | None = None,
             tasks: list[str] | None = None, **task_options) -> dict:
    """Rebuild the run's model from its config, load the checkpoint, return ``{metric: value}``.

    With ``tasks``, also ``{"tasks": {task: summary}}`` from lm-eval (``task_options``: see
    ``qat.tasks.lm_eval``). A packed export directory is evaluated on ``tasks`` alone.

    Raises:
        UserError: no checkpoint or no ``config.yaml`` in its run directory; an export directory
            without ``tasks``; an unknown task.
    """
    from omegaconf import open_dict

    from qat.config import build_model, load_run_config, locate_run, make

    if tasks:
        from qat.tasks import check_tasks

        tasks = check_tasks(tasks, task_options.get("include_path"))  # before any model loads
    path = Path(path)
    if (path / "quant_config.json").is_file():
        if not tasks:
            raise UserError(f"{path} is an export: evaluate it on tasks (--tasks ...); the held-out metric needs the run's checkpoint")
        return evaluate_export(path, tasks, **task_options)
    run_dir, ckpt = locate_run(path)
    cfg = load_run_config(run_dir)
    with open_dict(cfg):
        for key, value in (("source", source), ("seq_len", seq_len), ("heldout_tokens", heldout_tokens)):
            if value is not None:
                cfg.data[key] = value
    objective = make(cfg.module.objective, "module.objective")
    model, tokenizer, fp = build_model(cfg, ckpt, float_copy=objective.needs_teacher)
    datamodule = make(cfg.data, "data", tokenizer=tokenizer)
    datamodule.setup("validate")
    value = objective.evaluate(model, list(datamodule.val_dataloader()), fp if fp is not None else model)
    result = {objective.metric: value, "checkpoint": str(ckpt), "data": str(cfg.data.source)}
    if tasks:
        result["tasks"] = lm_eval(model, tokenizer, tasks, **task_options)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="qat-eval", description=__doc__.splitlines()[0])
    parser.add_argument("path", help="a qat-train run directory, one of its .ckpt files, or a packed export directory")
    parser.add_argument("--source", help="data to evaluate on (default: the run's own held-out split)")
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--heldout-tokens", type=int)
    parser.add_argument("--tasks", help="lm-eval tasks, comma-separated (e.g. hellaswag,arc_easy,piqa,winogrande)")
    parser.add_argument("--include-path", help="a folder of lm-eval task YAMLs of your own")
    parser.add_argument("--limit", type=int, help="questions per task (default: all)")
    parser.add_argument("--num-fewshot", type=int)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--out", help="also write the JSON result to this file")
    args = parser.parse_args(argv)
    tasks = args.tasks.split(",") if args.tasks else None
    options = {"include_path": args.include_path, "limit": args.limit, "num_fewshot": args.num_fewshot, "batch_size": args.batch_size}
    try:
        result = evaluate(args.path, args.source, args.seq_len, args.heldout_tokens, tasks=tasks, **options)
    except ImportError as e:  # lm-eval missing: its message says which extra to install
        exit_on_user_error("qat-eval", UserError(str(e)))
    except UserError as e:  # a mistake in the input: one line; anything else is a bug and keeps its traceback
        exit_on_user_error("qat-eval", e)
    line = json.dumps(result)
    print(line)
    if args.out:
        Path(args.out).write_text(line + "\n")


if __name__ == "__main__":
    main()
