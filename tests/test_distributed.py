"""Distributed launches: trainer configs, the launch checks, and real 2-process runs on CPU (gloo).

The slow tests run SmolLM2 recipes as users do, in subprocesses: launch/torchrun.sh, Lightning's own
launcher (``trainer=ddp_cpu``: Lightning re-runs the command for rank 1), and launch/slurm.sbatch
under a stand-in ``srun``; and FSDP2 (``trainer=fsdp`` on CPU) through a sharded checkpoint.
Every process runs one torch thread (the machine has 2 cores).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from qat import distributed
from qat.config import compose, config_dir
from qat.distributed import check_launch, processes_per_node
from qat.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
HELPERS = ROOT / "tests" / "distributed"
TRAINERS = sorted(p.stem for p in (config_dir() / "trainer").glob("*.yaml"))
HAS_CUDA = torch.cuda.is_available()
CORES = len(os.sched_getaffinity(0))

# a few steps on short blocks; learning rates high enough that 3 steps move held-out perplexity a lot,
# so that a 1% match between runs says something
RUN = ["recipe=smollm2_w4_lsq", "debug=fast", "logger=csv", "~callbacks.checkpoint", "data.seq_len=32",
       "data.eval_batch_size=2", "data.heldout_tokens=256", "trainer.max_steps=3", "optim.optimizer.lr=1e-4",
       "optim.quant_lr=1e-3", "threads=1", "export.enabled=true"]


def compose_train(overrides: list[str]):
    return compose(overrides)


def env(**extra: str) -> dict:
    e = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline", OMP_NUM_THREADS="1",
             PYTHON=sys.executable, PYTHONPATH=str(HELPERS))
    for k in ("QAT_TRACEBACK", "TORCHELASTIC_RUN_ID", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "RANK", "LOCAL_RANK", "SLURM_NTASKS", "SLURM_JOB_ID"):
        e.pop(k, None)
    e.update(extra)
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], cwd: Path, timeout: int = 900, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=env(**extra), cwd=cwd, timeout=timeout)


# ---------------------------------------------------------------- trainer configs and launch checks


@pytest.mark.parametrize("name", TRAINERS)
def test_every_trainer_config_builds_or_is_refused_clearly(name, tmp_path):
    cfg = compose_train([f"trainer={name}"])
    t = cfg.trainer
    if t.accelerator == "cpu" or HAS_CUDA:
        check_launch(t.accelerator, t.devices, t.num_nodes)
        trainer = instantiate(t, logger=False, enable_checkpointing=False, default_root_dir=str(tmp_path))
        assert trainer.num_devices == processes_per_node(t.accelerator, t.devices)
    else:  # this machine has no GPU: the check refuses before anything starts, naming the way out
        with pytest.raises(UserError, match="0 CUDA GPUs.*trainer=ddp_cpu"):
            check_launch(t.accelerator, t.devices, t.num_nodes)


def test_fsdp_config_is_fsdp2_and_slurm_config_uses_lightnings_slurm_environment(tmp_path):
    from lightning.fabric.plugins.environments import SLURMEnvironment
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    fsdp = instantiate(compose_train(["trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2"]).trainer, logger=False,
                       default_root_dir=str(tmp_path))
    assert isinstance(fsdp.strategy, ModelParallelStrategy) and fsdp.num_devices == 2
    slurm = compose_train(["trainer=slurm"]).trainer
    strategy = instantiate(slurm.strategy)
    assert isinstance(strategy, DDPStrategy) and isinstance(strategy.cluster_environment, SLURMEnvironment)
    assert slurm.devices == 1 and slurm.num_nodes == 1  # outside an allocation; inside, SLURM_NTASKS_PER_NODE / SLURM_NNODES


def test_processes_per_node_reads_lightnings_device_forms():
    assert processes_per_node("cpu", 2) == processes_per_node("cpu", "2") == 2
    assert processes_per_node("gpu", [0, 3]) == processes_per_node("gpu", "0,3") == 2
    assert processes_per_node("cpu", "auto") == processes_per_node("cpu", -1) == 1
    with pytest.raises(UserError, match="at least 1"):
        processes_per_node("cpu", 0)
    with pytest.raises(UserError, match="not a count"):
        processes_per_node("cpu", 1.5)


def test_check_launch_refuses_more_processes_than_devices_and_a_mismatched_launcher(monkeypatch):
    assert check_launch("cpu", CORES) == CORES
    with pytest.raises(UserError, match=f"asks for {CORES + 1} processes on this node but it has {CORES} CPU cores"):
        check_launch("cpu", CORES + 1)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert check_launch("cpu", 2, sweep=True) == 2  # torchrun started them: a sweep trial may use them
    with pytest.raises(UserError, match="torchrun started 2 processes .* trainer.devices=1"):
        check_launch("cpu", 1)


def test_check_launch_refuses_lightning_started_processes_in_a_sweep():
    assert check_launch("cpu", 1, sweep=True) == 1
    with pytest.raises(UserError, match="re-run the whole sweep"):
        check_launch("cpu", 2, sweep=True)


def test_preflight_composes_the_run_and_checks_the_layout(capsys):
    assert distributed.main(["--nproc-per-node", "2", "--", "trainer=ddp_cpu", "trainer.devices=2"]) == 0
    assert distributed.main(["--nproc-per-node", str(CORES + 1), "--", "trainer=ddp_cpu", f"trainer.devices={CORES + 1}"]) == 2
    assert "CPU cores" in capsys.readouterr().err
    assert distributed.main(["--nproc-per-node", "2", "--", "trainer=ddp_cpu", "trainer.devices=1"]) == 2
    assert "trainer.devices=2" in capsys.readouterr().err
    assert distributed.main(["--nproc-per-node", "1", "--", "optim.lrr=1"]) == 2
    assert "optim.lrr" in capsys.readouterr().err


# ---------------------------------------------------------------- bad input through the CLI: one line, nothing started


def _one_line_error(out: subprocess.CompletedProcess, *words: str) -> None:
    assert out.returncode == 2, (out.returncode, out.stderr[-3000:])
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    for w in words:
        assert w in out.stderr, (w, out.stderr[-3000:])


@pytest.mark.skipif(HAS_CUDA, reason="needs a machine without CUDA")
def test_cli_refuses_gpu_ddp_without_gpus(tmp_path):
    out = run([sys.executable, "-m", "qat.train", f"hydra.run.dir={tmp_path / 'run'}", "trainer=ddp", "trainer.devices=4"], tmp_path)
    _one_line_error(out, "trainer.devices=4", "0 CUDA GPUs", "trainer=ddp_cpu")
    assert not (tmp_path / "run" / "config.yaml").exists()  # refused before the run directory was used


def test_cli_refuses_more_cpu_processes_than_cores(tmp_path):
    out = run([sys.executable, "-m", "qat.train", f"hydra.run.dir={tmp_path / 'run'}", "trainer=ddp_cpu", f"trainer.devices={CORES + 2}"], tmp_path)
    _one_line_error(out, f"trainer.devices={CORES + 2}", "CPU cores")


def test_torchrun_script_refuses_more_processes_than_devices_before_torchrun(tmp_path):
    out = run(["bash", str(ROOT / "launch" / "torchrun.sh"), "recipe=smollm2_w4_lsq"], tmp_path,
              NPROC_PER_NODE=str(CORES + 2), TRAINER="ddp_cpu", RUN_DIR=str(tmp_path / "run"))
    _one_line_error(out, "CPU cores")
    assert "torch.distributed" not in out.stderr and not (tmp_path / "run").exists()  # no worker ever started
    out = run(["bash", str(ROOT / "launch" / "torchrun.sh")], tmp_path, NNODES="2")
    _one_line_error(out, "RUN_DIR")


def test_cli_refuses_a_sweep_of_lightning_started_ddp(tmp_path):
    out = run([sys.executable, "-m", "qat.train", "-m", f"hydra.sweep.dir={tmp_path / 'sweep'}", "trainer=ddp_cpu",
               "trainer.devices=2", "optim.quant_lr=1e-4,1e-3"], tmp_path)
    _one_line_error(out, "re-run the whole sweep", "hydra/launcher=slurm")
    assert not list((tmp_path / "sweep").glob("*/config.yaml"))  # refused before the trial used its run directory


# ---------------------------------------------------------------- real 2-process runs (slow)


def _quantizers(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def _metrics_files(root: Path) -> list[Path]:
    return sorted(root.rglob("metrics.json"))


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    """The reference: one process with the global batch (2) of the 2-process runs (1 per rank)."""
    tmp = tmp_path_factory.mktemp("single")
    out = run([sys.executable, "-m", "qat.train", f"hydra.run.dir={tmp / 'run'}", *RUN, "data.batch_size=2"], tmp)
    assert out.returncode == 0, out.stderr[-5000:]
    return json.loads((tmp / "run" / "metrics.json").read_text())


def _check_ddp_run(tmp: Path, single: dict) -> dict:
    assert _metrics_files(tmp) == [tmp / "run" / "metrics.json"]  # one run directory, metrics written by rank 0 only
    assert sorted(p.name for p in tmp.iterdir() if not p.name.startswith(".")) == ["quant", "run"]
    metrics = json.loads((tmp / "run" / "metrics.json").read_text())
    exports = sorted(p for p in tmp.rglob("export*") if p.is_dir())
    assert exports == [tmp / "run" / "export"]  # exported once, by rank 0
    assert metrics["steps"] == 3 and metrics["tokens"] == single["tokens"]  # 3 steps of the same global batch
    ranks = [_quantizers(tmp / "quant" / f"quant_rank{r}.pt") for r in (0, 1)]
    assert ranks[0]["end"].keys() == ranks[1]["end"].keys() and len(ranks[0]["end"]) == 210
    for when in ("start", "end"):  # initialised identically, and identical after training, bitwise
        for name, value in ranks[0][when].items():
            assert torch.equal(value, ranks[1][when][name]), (when, name)
    assert any(not torch.equal(ranks[0]["start"][n], v) for n, v in ranks[0]["end"].items())  # and trained
    assert abs(single["ppl_qat"] / single["ppl_ptq"] - 1) > 0.05  # training moved perplexity far beyond 1%
    assert metrics["ppl_qat"] == pytest.approx(single["ppl_qat"], rel=0.01)
    return metrics


DUMP = ["+callbacks.quant_dump._target_=quant_dump.SaveQuantizers"]


@pytest.mark.slow
def test_torchrun_two_cpu_processes_match_one_process(single_process, tmp_path):
    out = run(["bash", str(ROOT / "launch" / "torchrun.sh"), *RUN, "data.batch_size=1", *DUMP,
               f"+callbacks.quant_dump.dirpath={tmp_path / 'quant'}"], tmp_path,
              NPROC_PER_NODE="2", TRAINER="ddp_cpu", MASTER_PORT=str(free_port()), RUN_DIR=str(tmp_path / "run"))
    assert out.returncode == 0, out.stderr[-5000:]
    metrics = _check_ddp_run(tmp_path, single_process)
    assert (tmp_path / "run" / "train_rank1.log").exists()
    print(f"\nppl_qat single {single_process['ppl_qat']:.6g}, torchrun 2x1 {metrics['ppl_qat']:.6g}")


@pytest.mark.slow
def test_lightning_launcher_two_cpu_processes_match_one_process(single_process, tmp_path):
    out = run([sys.executable, "-m", "qat.train", f"hydra.run.dir={tmp_path / 'run'}", "trainer=ddp_cpu", "trainer.devices=2",
               *RUN, "data.batch_size=1", *DUMP, f"+callbacks.quant_dump.dirpath={tmp_path / 'quant'}"], tmp_path,
              MASTER_PORT=str(free_port()))
    assert out.returncode == 0, out.stderr[-5000:]
    metrics = _check_ddp_run(tmp_path, single_process)
    print(f"\nppl_qat single {single_process['ppl_qat']:.6g}, Lightning ddp 2x1 {metrics['ppl_qat']:.6g}")


@pytest.mark.slow
def test_fsdp_sharded_checkpoint_round_trip_of_quantizer_state(tmp_path):
    out = run([sys.executable, str(HELPERS / "fsdp_checkpoint.py"), str(tmp_path)], tmp_path, timeout=600, MASTER_PORT=str(free_port()))
    assert out.returncode == 0, out.stderr[-5000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    r0 = ranks[0]
    assert len(r0["trained"]) == 14  # 2 layers x 7 QuantLinear, one LSQ step-size tensor each
    assert sorted(r0["files"]) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]  # one shard file per rank
    for name, full in r0["trained"].items():
        assert r0["placements"][name][-1] == "S(0)"  # sharded along output channels, with its layer
        halves = [r["local"][name] for r in ranks]
        assert all(h.shape[0] == full.shape[0] // 2 for h in halves)
        assert torch.equal(torch.cat(halves), full)  # each rank held half of it
        assert not torch.equal(full, r0["initial"][name])  # trained away from the fresh model's values
        assert torch.equal(r0["loaded"][name], full), name  # and loaded back exactly
        assert torch.equal(ranks[1]["loaded"][name], full)
    assert r0["ppl_loaded"] == r0["ppl_trained"] == ranks[1]["ppl_trained"]


@pytest.mark.slow
def test_slurm_sbatch_two_tasks_match_one_process(single_process, tmp_path):
    # the variables sbatch sets for `--nodes=1 --ntasks-per-node=2`, and a stand-in srun on PATH
    slurm = dict(SLURM_JOB_ID="4242", SLURM_JOB_NAME="qat", SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="2", SLURM_NNODES="1",
                 SLURM_NODELIST="127.0.0.1", MASTER_PORT=str(free_port()), PATH=f"{HELPERS}{os.pathsep}{os.environ['PATH']}")
    out = run(["bash", str(ROOT / "launch" / "slurm.sbatch"), "trainer.accelerator=cpu", *RUN, "data.batch_size=1", *DUMP,
               f"+callbacks.quant_dump.dirpath={tmp_path / 'quant'}"], tmp_path, RUN_DIR=str(tmp_path / "run"), **slurm)
    assert out.returncode == 0, out.stderr[-5000:]
    metrics = _check_ddp_run(tmp_path, single_process)
    assert (tmp_path / "run" / "train_rank1.log").exists()
    print(f"\nppl_qat single {single_process['ppl_qat']:.6g}, srun 2 tasks {metrics['ppl_qat']:.6g}")
