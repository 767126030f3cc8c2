"""Sweeps: the recipes in recipes/hparams_search run through qat-train (Optuna, grid), each trial in its own
run directory, the summary written at the end; a sweep over a key that does not exist stops before any
trial; the SLURM launcher config composes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra.utils import instantiate

from qat.config import compose
from qat.errors import UserError
from qat.sweep import summarize

ROOT = Path(__file__).resolve().parent.parent
TINY = ["debug=fast", "logger=csv", "~callbacks.checkpoint", "eval.before=false", "data.seq_len=32", "data.batch_size=2",
        "data.eval_batch_size=2", "data.heldout_tokens=64", "threads=1"]


def qat_train(*args: str, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline", OMP_NUM_THREADS="1")
    env.pop("QAT_TRACEBACK", None)
    return subprocess.run([sys.executable, "-m", "qat.train", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)


def test_summary_lists_every_trial_and_the_best(tmp_path):
    for trial, (ppl, bits) in enumerate([(30.5, 2), (12.25, 4), (None, 3), (float("nan"), 3)]):
        run_dir = tmp_path / str(trial)
        (run_dir / ".hydra").mkdir(parents=True)
        (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"quant.weight.bits={bits}"]))
        if ppl is not None:
            (run_dir / "metrics.json").write_text(json.dumps({"ppl_qat": ppl, "steps": 2}))
    (tmp_path / "10" / ".hydra").mkdir(parents=True)  # numeric order, not string order
    (tmp_path / "10" / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["quant.weight.bits=8"]))
    (tmp_path / "10" / "metrics.json").write_text(json.dumps({"ppl_qat": 11.0}))
    summary = summarize(tmp_path)
    assert json.loads((tmp_path / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert [t["trial"] for t in summary["trials"]] == ["0", "1", "2", "3", "10"]
    assert [t["status"] for t in summary["trials"]] == ["done", "done", "failed", "done", "done"]
    assert summary["best"] == {"trial": "10", "run_dir": str(tmp_path / "10"), "overrides": ["quant.weight.bits=8"], "ppl_qat": 11.0}
    assert summarize(tmp_path, direction="maximize")["best"]["trial"] == "0"  # NaN never wins
    with pytest.raises(UserError, match="direction"):
        summarize(tmp_path, direction="lowest")


@pytest.mark.parametrize(
    "args, words",
    [
        (["hparams_search=smollm2_bits_grid", "optim.quant_lrr=1e-4,1e-3"], ["optim.quant_lrr", "not in the configuration"]),
        (["hparams_search=smollm2_lsq_optuna", "quant.weight.bitz=choice(2,3)"], ["quant.weight.bitz", "not in the configuration"]),
        (["-m", "optim.optimizer.lr=1e-4,1e-3", "optim.nope=1"], ["optim.nope"]),  # not swept: Hydra's own message
    ],
    ids=["grid", "optuna", "fixed-key-in-a-sweep"],
)
def test_a_sweep_over_a_missing_key_stops_before_any_trial(args, words, tmp_path):
    out = qat_train(*args, f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert out.returncode != 0, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    for w in words:
        assert w in out.stderr, (w, out.stderr[-3000:])
    assert not (tmp_path / "sweep").exists()  # no trial ran, nothing was written


def test_sweep_recipes_compose_with_their_sweepers():
    optuna = compose(["hparams_search=smollm2_lsq_optuna"], return_hydra_config=True)
    grid = compose(["hparams_search=smollm2_bits_grid"], return_hydra_config=True)
    assert optuna.hydra.sweeper._target_.endswith("OptunaSweeper") and optuna.hydra.sweeper.sampler.seed == 0
    assert optuna.hydra.sweeper.sampler._target_ == "optuna.samplers.TPESampler"
    assert set(optuna.hydra.sweeper.params) == {"optim.optimizer.lr", "optim.quant_lr", "quant.weight.estimator._target_", "quant.weight.bits"}
    assert optuna.recipe_name == grid.recipe_name == "smollm2_w4_lsq"
    assert dict(grid.hydra.sweeper.params) == {"quant.weight.bits": "2,3,4", "optim.quant_lr": "1e-4,1e-3"}
    for est in ("ClippedSTE", "STE", "EWGS"):  # every estimator the Optuna recipe can pick builds a quantizer
        node = optuna.quant.weight.copy()
        node.estimator._target_ = f"qat.estimators.{est}"
        assert type(instantiate(node)().estimator).__name__ == est


def test_slurm_launcher_config_composes_and_instantiates():
    cfg = compose(["hydra/launcher=slurm", "hydra.launcher.tasks_per_node=4"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher.gpus_per_node == 4 and launcher.signal_delay_s == 120
    assert type(instantiate(launcher)).__name__ == "SlurmLauncher"


def _trial_dirs(sweep: Path) -> list[Path]:
    return sorted((p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


@pytest.mark.slow
def test_optuna_sweep_of_two_trials_writes_its_summaries(tmp_path):
    sweep = tmp_path / "sweep"
    out = qat_train("hparams_search=smollm2_lsq_optuna", "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={sweep}", *TINY, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-5000:]
    trials = _trial_dirs(sweep)
    assert [p.name for p in trials] == ["0", "1"]
    ppl = [json.loads((p / "metrics.json").read_text())["ppl_qat"] for p in trials]
    params = [yaml.safe_load((p / ".hydra" / "overrides.yaml").read_text()) for p in trials]
    assert all(any(o.startswith("quant.weight.bits=") for o in ps) for ps in params) and params[0] != params[1]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(min(ppl))
    summary = json.loads((sweep / "summary.json").read_text())
    assert [t["status"] for t in summary["trials"]] == ["done", "done"]
    assert summary["best"]["ppl_qat"] == min(ppl) and summary["best"]["run_dir"] == str(trials[ppl.index(min(ppl))])
    assert f"quant.weight.bits={best['best_params']['quant.weight.bits']}" in summary["best"]["overrides"]
    assert "best ppl_qat" in out.stdout


@pytest.mark.slow
def test_grid_sweep_of_two_points_writes_its_summary(tmp_path):
    sweep = tmp_path / "sweep"
    out = qat_train("hparams_search=smollm2_bits_grid", "quant.weight.bits=3,4", "optim.quant_lr=1e-3", f"hydra.sweep.dir={sweep}", *TINY, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-5000:]
    trials = _trial_dirs(sweep)
    assert [p.name for p in trials] == ["0", "1"]
    bits = [json.loads((p / "metrics.json").read_text())["quant"]["weight"]["bits"] for p in trials]
    assert sorted(bits) == [3, 4]
    summary = json.loads((sweep / "summary.json").read_text())
    ppl = [t["metrics"]["ppl_qat"] for t in summary["trials"]]
    assert summary["best"]["ppl_qat"] == min(ppl) and len(ppl) == 2
    assert "best ppl_qat" in out.stdout
