"""Processes and devices of a launch, checked before any worker starts.

Lightning's strategies, torchrun and SLURM start the worker processes; this module only compares
what a run asks for (``trainer.accelerator``, ``trainer.devices``, ``trainer.num_nodes``) with the
machine and with the launcher it runs under, so that a mistake ends in one clear line instead of
a CUDA error in every worker or a rendezvous that waits forever:

* more processes on a node than it has devices (CUDA GPUs, or CPU cores for ``accelerator=cpu``);
* torchrun or srun having started a different number of processes than the trainer expects;
* a Hydra sweep (``-m``) whose trials would each have Lightning start more processes: Lightning
  starts them by re-running the command line, which would re-run the whole sweep in every one.

``qat-train`` calls ``check_launch`` before the model loads (in every process, rank 0 included);
``python -m qat.distributed`` runs the same check for a launch script before it starts torchrun.
"""

from __future__ import annotations

import argparse
import os
import sys

from qat.errors import UserError

GPU = ("gpu", "cuda")


def local_devices(accelerator: str) -> int | None:
    """Devices of ``accelerator`` on this machine: visible CUDA GPUs, or usable CPU cores.

    ``"auto"`` counts GPUs when there are any, else CPU cores (Lightning's choice); other
    accelerators (``"mps"``, ``"tpu"``...) return None: not checked here.

    Example:
        >>> local_devices("cpu") >= 1
        True
    """
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if accelerator in GPU:
        return torch.cuda.device_count()
    if accelerator == "cpu":
        return cores
    if accelerator == "auto":
        return torch.cuda.device_count() or cores
    return None


def processes_per_node(accelerator: str, devices) -> int:
    """How many processes Lightning runs on each node for ``trainer.devices``.

    ``devices`` is a count, ``-1`` or ``"auto"`` (every GPU; one process on CPU, as Lightning does),
    a list of GPU indices, or a string of either (``"2"``, ``"0,1"``).

    Raises:
        UserError: a count below 1 or a value of another type.

    Example:
        >>> processes_per_node("gpu", [0, 1]), processes_per_node("cpu", "2"), processes_per_node("cpu", "auto")
        (2, 2, 1)
    """
    if isinstance(devices, str):
        text = devices.strip()
        if text == "auto" or text == "-1":
            devices = -1
        elif "," in text:
            devices = [int(i) for i in text.split(",") if i.strip()]
        elif text.lstrip("-").isdigit():
            devices = int(text)
    if isinstance(devices, bool) or not isinstance(devices, (int, list, tuple)):
        raise UserError(f"trainer.devices={devices!r} is not a count, -1, 'auto' or a list of device indices")
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if devices == -1:
        return max(local_devices(accelerator) or 1, 1) if accelerator in GPU else 1
    if devices < 1:
        raise UserError(f"trainer.devices={devices} must be at least 1 (or -1 / 'auto')")
    return devices


def launcher_processes() -> tuple[str, int, int] | None:
    """``(launcher, processes in all, processes on this node)`` when torchrun or srun started this process."""
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    env = os.environ
    if SLURMEnvironment.detect():  # Lightning looks for SLURM first too
        total = int(env["SLURM_NTASKS"])
        per_node = int(env.get("SLURM_NTASKS_PER_NODE", total // max(int(env.get("SLURM_NNODES", 1)), 1)))
        return "srun", total, per_node
    if TorchElasticEnvironment.detect():
        return "torchrun", int(env["WORLD_SIZE"]), int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"]))
    return None


def check_launch(accelerator: str, devices, num_nodes: int = 1, *, sweep: bool = False) -> int:
    """Check a trainer's processes against this machine and the launcher; returns processes per node.

    Args:
        accelerator: ``trainer.accelerator`` (``"cpu"``, ``"gpu"``, ``"cuda"``, ``"auto"``; others pass).
        devices: ``trainer.devices`` (see ``processes_per_node``).
        num_nodes: ``trainer.num_nodes``.
        sweep: the run is a trial of a Hydra multirun.

    Raises:
        UserError: more processes on a node than it has devices; a launcher that started a
            different number of processes; Lightning-started processes inside a Hydra sweep.

    Example:
        >>> check_launch("cpu", 1)
        1
        >>> check_launch("gpu", 4)  # doctest: +SKIP
        UserError: trainer.devices=4 asks for 4 processes on this node but it has 0 CUDA GPUs ...
    """
    if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes < 1:
        raise UserError(f"trainer.num_nodes={num_nodes!r} must be an integer >= 1")
    per_node = processes_per_node(accelerator, devices)
    have = local_devices(accelerator)
    if have is not None and per_node > have:
        if accelerator == "cpu":
            kind, hint = "CPU cores", "one process per core at most: lower trainer.devices"
        else:
            kind = "CUDA GPUs"
            hint = ("no CUDA device is visible: use trainer=cpu, or trainer=ddp_cpu for several CPU processes"
                    if have == 0 else "lower trainer.devices")
        raise UserError(f"trainer.devices={devices!r} asks for {per_node} processes on this node but it has {have} {kind} ({hint})")
    launched = launcher_processes()
    if launched is not None:
        name, total, local = launched
        if per_node != local or per_node * num_nodes != total:
            raise UserError(
                f"{name} started {total} processes ({local} on this node) but the trainer expects "
                f"trainer.devices={devices!r} x trainer.num_nodes={num_nodes} = {per_node * num_nodes} ({per_node} per node): "
                "pass the launcher's numbers (launch/torchrun.sh and launch/slurm.sbatch do)"
            )
    elif sweep and per_node * num_nodes > 1:
        raise UserError(
            f"a Hydra sweep (-m) cannot run trials on {per_node * num_nodes} Lightning-started processes "
            f"(trainer.devices={devices!r}, trainer.num_nodes={num_nodes}): Lightning starts them by re-running "
            "the command line, which would re-run the whole sweep. Sweep with one process per trial "
            "(trainer=cpu or trainer=gpu), or on SLURM with hydra/launcher=slurm, where srun starts each trial's processes"
        )
    return per_node


def main(argv: list[str] | None = None) -> int:
    """``python -m qat.distributed --nproc-per-node N [--nnodes M] OVERRIDES...``: the launch scripts' pre-flight.

    Composes ``qat-train``'s configuration with the same overrides (so a mistyped key fails here
    too), then checks that ``N`` processes per node fit the trainer's accelerator on this machine
    and that the trainer expects ``N x M`` processes. Exit status 0, or 2 with one line on stderr.
    """
    parser = argparse.ArgumentParser(prog="python -m qat.distributed", description=main.__doc__)
    parser.add_argument("--nproc-per-node", type=int, required=True)
    parser.add_argument("--nnodes", type=int, default=1)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from qat.config import compose

    try:
        cfg = compose([o for o in args.overrides if not o.startswith("hydra.")])
        trainer = cfg.trainer
        per_node = check_launch(trainer.accelerator, args.nproc_per_node, args.nnodes)
        expected = processes_per_node(trainer.accelerator, trainer.devices) * trainer.num_nodes
        if expected != per_node * args.nnodes:
            raise UserError(
                f"the launcher would start {args.nproc_per_node} x {args.nnodes} processes but the trainer expects "
                f"trainer.devices={trainer.devices!r} x trainer.num_nodes={trainer.num_nodes}: pass "
                f"trainer.devices={args.nproc_per_node} trainer.num_nodes={args.nnodes}"
            )
    except (UserError, HydraException, OmegaConfBaseException) as e:
        print(f"qat-train: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
