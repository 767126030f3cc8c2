"""What every benchmark script shares: where results go, how they are written, the batch options.

Results are JSON files in ``benchmarks/results/`` (read by ``benchmarks/report.py`` for the README),
written atomically (a temporary file, then a rename) so that an interrupted run never leaves half a
file; a script that keeps several variants in one file passes ``section`` and the other sections
are kept. Memory is measured in a subprocess per mode with a low glibc mmap threshold
(``LOW_MMAP_ENV``) so that freed tensors leave the process and the resident high-water mark
reflects live memory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

RESULTS = Path(os.environ.get("QAT_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")  # env: try a script elsewhere
LOW_MMAP_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "QAT_NO_MALLOC_TUNING": "1"}


def add_batch_args(parser: argparse.ArgumentParser, steps: int | None = None, threads: int = 2, batch: int = 4, seq_len: int = 256) -> None:
    """``--threads --batch --seq-len`` (and ``--steps`` when ``steps`` is given) with these defaults."""
    if steps is not None:
        parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--threads", type=int, default=threads)
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--seq-len", type=int, default=seq_len)


def batch_argv(args: argparse.Namespace) -> list[str]:
    """The options of ``add_batch_args`` as a command line, to hand to a subprocess of the same script."""
    argv = ["--threads", str(args.threads), "--batch", str(args.batch), "--seq-len", str(args.seq_len)]
    return (["--steps", str(args.steps)] if getattr(args, "steps", None) is not None else []) + argv


def write_json(name: str, result: dict, section: str | None = None) -> Path:
    """Write ``result`` to ``RESULTS/name.json`` atomically (into ``section``, keeping the others).

    Read-modify-write under an exclusive lock, so benchmark processes running side by side (one GPU
    shared by several recipe workers) never drop each other's sections.
    """
    import fcntl

    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{name}.json"
    with open(RESULTS / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = result
        if section is not None:
            data = json.loads(out.read_text()) if out.exists() else {}
            data[section] = result
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, out)
    return out


def run_mode(script: str, argv: list[str], mode: str) -> dict:
    """Run ``script --mode MODE`` with the low mmap threshold; its last stdout line is the JSON result."""
    env = dict(os.environ, **LOW_MMAP_ENV)
    out = subprocess.run([sys.executable, script, *argv, "--mode", mode], env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def rss_peak_reset() -> None:
    """Reset this process's resident-set high-water mark (VmHWM) to its current size (Linux)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def status_kb(field: str) -> int:
    """A ``/proc/self/status`` field in kB (``VmRSS``, ``VmHWM``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def settings(args: argparse.Namespace) -> dict:
    """The batch options of a run and the torch version, for the result's header."""
    import torch

    keys = ("model", "batch", "seq_len", "steps", "threads")
    return {**{k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}, "torch": torch.__version__}
