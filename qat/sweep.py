"""Hyperparameter sweeps: a Hydra callback that checks a sweep before its first trial and sums it up after the last.

Hydra's sweepers (the basic grid sweeper, Optuna) choose the trials and its launchers run them
(in this process, or as SLURM jobs with submitit); each trial is one ``qat-train`` run in its own
directory ``<hydra.sweep.dir>/<trial number>``, whose ``metrics.json`` rank 0 writes. This
callback adds two things around them (``configs/hydra/default.yaml`` registers it):

* ``on_multirun_start``: every key the sweep sets must exist in the composed configuration (or
  name a config group), so a mistyped key fails with one line before any trial starts. Hydra
  itself would only find it while composing a trial: with submitit, inside a queued SLURM job.
* ``on_multirun_end``: ``<hydra.sweep.dir>/summary.json`` lists every trial (its number, run
  directory, overrides and metrics, or ``"failed"`` without metrics.json) and the best one by
  ``metric``, and prints the best. The Optuna sweeper also writes its own
  ``optimization_results.yaml`` (best parameters and value) there.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from qat.errors import UserError, exit_on_user_error

log = logging.getLogger("qat.sweep")
_ABSENT = object()


def swept_keys(config: DictConfig) -> list[str]:
    """The keys a sweep sets: ``hydra.sweeper.params`` and the command line's overrides, without
    Hydra's own (``hydra.*``, ``hydra/launcher=...``) and without ``+``/``~`` prefixes."""
    keys = list((config.hydra.sweeper.get("params") or {}).keys())
    keys += [o.split("=", 1)[0] for o in config.hydra.overrides.task if "=" in o]
    out = []
    for key in keys:
        key = key.lstrip("+")
        if key.startswith(("hydra.", "hydra/")) or key in out:
            continue
        out.append(key)
    return out


def check_sweep_keys(config: DictConfig) -> None:
    """Raise UserError naming every swept key that is neither a config value nor a config group.

    ``+key`` (adding a key) is allowed; ``~key`` must exist. Group options themselves (``quant=nope``)
    are checked by Hydra when it composes the trials.

    Example:
        >>> check_sweep_keys(cfg)  # with `optim.optimizer.lrr=1e-4,1e-3` on the command line  # doctest: +SKIP
        UserError: the sweep sets optim.optimizer.lrr, which is not in the configuration ...
    """
    groups = set(config.hydra.runtime.choices.keys())
    added = {o.split("=", 1)[0].lstrip("+") for o in config.hydra.overrides.task if o.startswith("+")}
    added |= {k.lstrip("+") for k in (config.hydra.sweeper.get("params") or {}) if k.startswith("+")}
    unknown = []
    for key in swept_keys(config):
        path = key.lstrip("~")
        if path in added or path in groups or path.split("@", 1)[0] in groups:
            continue
        if OmegaConf.select(config, path, default=_ABSENT, throw_on_missing=False) is _ABSENT:
            unknown.append(path)
    if unknown:
        names = ", ".join(unknown)
        raise UserError(f"the sweep sets {names}, which {'is' if len(unknown) == 1 else 'are'} not in the configuration "
                         "(a mistyped key? `qat-train --cfg job` prints the keys; a new key needs a leading +)")


def read_trials(sweep_dir: Path) -> list[dict[str, Any]]:
    """Every trial directory under ``sweep_dir`` (those Hydra wrote ``.hydra/overrides.yaml`` in), in trial order."""
    trials = []
    for overrides in sorted(sweep_dir.glob("*/.hydra/overrides.yaml"), key=lambda p: _trial_key(p.parent.parent.name)):
        run_dir = overrides.parent.parent
        trial: dict[str, Any] = {"trial": run_dir.name, "run_dir": str(run_dir),
                                 "overrides": OmegaConf.to_container(OmegaConf.load(overrides))}
        metrics = run_dir / "metrics.json"
        if metrics.is_file():
            trial["status"] = "done"
            trial["metrics"] = json.loads(metrics.read_text())
        else:
            trial["status"] = "failed"
        trials.append(trial)
    return trials


def _trial_key(name: str):
    return (0, int(name), "") if name.isdigit() else (1, 0, name)


def summarize(sweep_dir: str | os.PathLike, metric: str = "ppl_qat", direction: str = "minimize") -> dict[str, Any]:
    """Write ``sweep_dir/summary.json``: every trial and the best by ``metric``; returns the summary.

    Args:
        sweep_dir: the sweep's directory (``hydra.sweep.dir``).
        metric: a key of the trials' metrics.json (``ppl_qat``; ``cos_qat`` for embedding models).
        direction: ``"minimize"`` or ``"maximize"``.

    Raises:
        UserError: an unknown direction.

    Example:
        >>> summarize("multirun/smollm2_w4_lsq/2026-11-30_10-00-00")["best"]["trial"]  # doctest: +SKIP
        '1'
    """
    if direction not in ("minimize", "maximize"):
        raise UserError(f"direction={direction!r} is not 'minimize' or 'maximize'")
    sweep_dir = Path(sweep_dir)
    trials = read_trials(sweep_dir)
    scored = [t for t in trials if t["status"] == "done" and _finite(t["metrics"].get(metric))]
    pick = min if direction == "minimize" else max
    best = pick(scored, key=lambda t: t["metrics"][metric]) if scored else None
    summary = {
        "sweep_dir": str(sweep_dir),
        "metric": metric,
        "direction": direction,
        "best": None if best is None else {"trial": best["trial"], "run_dir": best["run_dir"],
                                           "overrides": best["overrides"], metric: best["metrics"][metric]},
        "trials": trials,
    }
    tmp = sweep_dir / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2, default=str))
    os.replace(tmp, sweep_dir / "summary.json")
    return summary


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


class SweepSummary(Callback):
    """Hydra callback: check the swept keys at the start of a multirun, write summary.json at its end.

    Args:
        metric: the metrics.json key that ranks the trials (``ppl_qat``, or ``cos_qat``).
        direction: ``"minimize"`` or ``"maximize"``.

    Example (``configs/hydra/default.yaml``)::

        callbacks:
          sweep_summary:
            _target_: qat.sweep.SweepSummary
            metric: ppl_qat
            direction: minimize
    """

    def __init__(self, metric: str = "ppl_qat", direction: str = "minimize"):
        self.metric, self.direction = metric, direction

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            check_sweep_keys(config)
        except UserError as e:
            exit_on_user_error("qat-train", e)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        summary = summarize(config.hydra.sweep.dir, self.metric, self.direction)
        best = summary["best"]
        done = sum(t["status"] == "done" for t in summary["trials"])
        where = Path(config.hydra.sweep.dir) / "summary.json"
        if best is None:
            print(f"\nsweep: {done} of {len(summary['trials'])} trials finished, none with a finite {self.metric}; {where}")
            return
        print(f"\nsweep: {done} of {len(summary['trials'])} trials finished; best {self.metric} {best[self.metric]:.4g} "
              f"(trial {best['trial']}: {' '.join(best['overrides'])})\nsummary: {where}")
