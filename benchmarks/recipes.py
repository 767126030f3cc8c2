"""Held-out results of the named recipes at their full budget: FP, FP fine-tuned, round-to-nearest PTQ and QAT.

Runs ``qat-train recipe=NAME`` for each recipe given (one after the other, each in its own
process, as a user would), reads the run's ``metrics.json`` and its last quantization statistics,
and merges them into ``benchmarks/results/recipes.json`` (other recipes' entries are kept), with
the exact command, the machine and the date. The README's recipe table is rendered from that file
by ``benchmarks/report.py``. Each recipe's budget is its own (``trainer.max_steps`` in the recipe);
extra Hydra overrides apply to every recipe given and are recorded.

Every run reports the in-domain held-out split and the out-of-domain text (``eval.ood``, on by
default); backprop causal-LM recipes also train the FP fine-tune reference (``eval.fp_finetune=true``:
the same data, steps and schedule without quantization; forward-only and embedding recipes have none).
``--gpu`` runs on one CUDA device (``trainer=gpu``, CSV logging only) and records which.

    .venv/bin/python benchmarks/recipes.py smollm2_w4_lsq smollm2_w3_l4q [--threads 2] [--gpu] [-- trainer.max_steps=200]

A run that fails is recorded with its return code and the tail of its log, and the next recipe
still runs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_json  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def machine(gpu: bool = False) -> dict:
    import torch

    info = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__}
    if gpu:
        info["gpu"] = torch.cuda.get_device_name()
    return info


def last_quant_stats(run_dir: Path) -> dict:
    path = run_dir / "quant_stats.jsonl"
    if not path.exists():
        found = sorted(run_dir.rglob("quant_stats.jsonl"))
        path = found[-1] if found else path
    if not path.exists():
        return {}
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        return {}
    first, last = json.loads(lines[0]), json.loads(lines[-1])
    return {"first": {"step": first.get("step"), **first.get("aggregate", {})}, "last": {"step": last.get("step"), **last.get("aggregate", {})}}


def has_fp_finetune(recipe: str, overrides: list[str]) -> bool:
    """Whether ``qat-train`` can train the FP fine-tune reference for this recipe (backprop, causal LM)."""
    from hydra.utils import get_class

    from qat.config import compose

    cfg = compose([f"recipe={recipe}", *overrides])
    forward_only = getattr(get_class(cfg.module._target_), "forward_only", False)
    return not forward_only and cfg.module.objective._target_ == "qat.lit.objectives.CausalLM"


def run(recipe: str, threads: int, overrides: list[str], out_root: Path) -> dict:
    run_dir = out_root / recipe
    if run_dir.exists() and any(run_dir.iterdir()):
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = out_root / f"{recipe}-{stamp}"  # never write into an earlier run
    cmd = [sys.executable, "-m", "qat.train", f"recipe={recipe}", f"threads={threads}", f"hydra.run.dir={run_dir}", *overrides]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE=os.environ.get("WANDB_MODE", "offline"))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    shown = " ".join(shlex.quote(c) for c in [".venv/bin/qat-train", *cmd[3:]])
    entry = {"command": shown, "run_dir": str(run_dir), "returncode": proc.returncode, "wall_s": round(time.perf_counter() - t0, 1),
             "date": datetime.datetime.now().isoformat(timespec="seconds"), "overrides": overrides}
    metrics = run_dir / "metrics.json"
    if proc.returncode != 0 or not metrics.exists():
        entry["error"] = (proc.stderr or proc.stdout)[-2000:]
        return entry
    entry["metrics"] = json.loads(metrics.read_text())
    entry["quant_stats"] = last_quant_stats(run_dir)
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="*", help="recipe names (recipes/experiment/NAME.yaml); default: all")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_recipes", help="run directories go under it")
    parser.add_argument("--gpu", action="store_true", help="run on one CUDA device (trainer=gpu logger=csv)")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)  # argparse would read what follows "--" as recipe names
    args = parser.parse_args(argv[:cut])
    overrides = argv[cut + 1:]
    from qat.config import recipe_names

    names = args.recipes or recipe_names()
    unknown = [n for n in names if n not in recipe_names()]
    if unknown:
        parser.error(f"unknown recipe(s) {unknown}: choose from {recipe_names()}")
    device = ["trainer=gpu", "logger=csv"] if args.gpu else []
    for name in names:
        reference = ["eval.fp_finetune=true"] if has_fp_finetune(name, overrides) else []
        entry = run(name, args.threads, [*device, *reference, *overrides], args.out)
        entry["machine"] = machine(args.gpu)
        key = name if not overrides else f"{name} {' '.join(overrides)}"
        write_json("recipes", entry, section=key)  # one entry per recipe (and overrides): a later run replaces it
        m = entry.get("metrics", {})
        metric = "ppl" if "ppl_qat" in m else "cos"
        summary = (", ".join(f"{k} {m[k]:.4g}" for k in (f"{metric}_{n}{t}" for t in ("", "_ood") for n in ("fp", "fp_ft", "ptq", "qat")) if k in m)
                   if m else f"FAILED rc={entry['returncode']}: {entry.get('error', '')[-500:]}")
        print(f"{key}: {summary} ({entry['wall_s']} s)", flush=True)


if __name__ == "__main__":
    main()
