"""Held-out results of the named recipes at their full budget: FP, round-to-nearest PTQ and QAT.

Runs ``qat-train recipe=NAME`` for each recipe given (one after the other, each in its own
process, as a user would), reads the run's ``metrics.json`` and its last quantization statistics,
and merges them into ``benchmarks/results/recipes.json`` (other recipes' entries are kept), with
the exact command, the machine and the date. The README's recipe table is rendered from that file
by ``benchmarks/report.py``. Each recipe's budget is its own (``trainer.max_steps`` in the recipe);
extra Hydra overrides apply to every recipe given and are recorded.

    .venv/bin/python benchmarks/recipes.py smollm2_w4_lsq smollm2_w3_l4q [--threads 2] [-- trainer.max_steps=200]

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
RECIPES = ROOT / "recipes" / "experiment"


def machine() -> dict:
    import torch

    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__}


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


def run(recipe: str, threads: int, overrides: list[str], out_root: Path) -> dict:
    run_dir = out_root / recipe
    if run_dir.exists() and any(run_dir.iterdir()):
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = out_root / f"{recipe}-{stamp}"  # never write into an earlier run
    cmd = [str(Path(sys.executable).with_name("qat-train")), f"recipe={recipe}", f"threads={threads}", f"hydra.run.dir={run_dir}", *overrides]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE=os.environ.get("WANDB_MODE", "offline"))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    shown = " ".join(shlex.quote(c) for c in [".venv/bin/qat-train", *cmd[1:]])
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
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)  # argparse would read what follows "--" as recipe names
    args = parser.parse_args(argv[:cut])
    overrides = argv[cut + 1:]
    names = args.recipes or sorted(p.stem for p in RECIPES.glob("*.yaml"))
    unknown = [n for n in names if not (RECIPES / f"{n}.yaml").exists()]
    if unknown:
        parser.error(f"unknown recipe(s) {unknown}: choose from {sorted(p.stem for p in RECIPES.glob('*.yaml'))}")
    for name in names:
        entry = run(name, args.threads, overrides, args.out)
        entry["machine"] = machine()
        key = name if not overrides else f"{name} {' '.join(overrides)}"
        write_json("recipes", entry, section=key)  # one entry per recipe (and overrides): a later run replaces it
        m = entry.get("metrics", {})
        metric = "ppl" if "ppl_qat" in m else "cos"
        summary = f"FP {m.get(f'{metric}_fp')}, PTQ {m.get(f'{metric}_ptq')}, QAT {m.get(f'{metric}_qat')}" if m else f"FAILED rc={entry['returncode']}"
        print(f"{key}: {summary} ({entry['wall_s']} s)", flush=True)


if __name__ == "__main__":
    main()
