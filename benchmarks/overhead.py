"""Cost of fake quantization in a training step: time and peak memory, against the same step without it.

One process, one model: SmolLM2-135M (the embedded default), float32 on CPU, batch 4 x 256 tokens of
the shipped corpus, forward + backward. The quantized variant is LSQ 4-bit group-32 on all 210
decoder linear layers; the baseline is the *same* model with its quantizers switched off
(``enabled = False``), so both share weights, data and allocator state. Variants are interleaved
(A B A B ...) and the median of each is reported.

Time is measured with the allocator settings ``qat-train`` applies (``qat.runtime.tune_malloc``:
freed memory stays in the process); ``--no-tune`` measures glibc's defaults instead. Peak memory
is measured in a second process of the same script (``--memory``), as the resident-set
high-water mark (VmHWM) during one step, reset before the step through ``/proc/self/clear_refs``,
with a fixed low glibc mmap threshold so that freed tensors leave the process and the mark
reflects live memory.

    make install && .venv/bin/python benchmarks/overhead.py [--repeats 5] [--threads 2]

Writes ``benchmarks/results/overhead.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import LOW_MMAP_ENV, add_batch_args, write_json  # noqa: E402
from common import rss_peak_reset as _rss_peak_reset  # noqa: E402
from common import status_kb as _status_kb  # noqa: E402


def _memory_in_subprocess(argv: list[str]) -> dict:
    import subprocess

    env = dict(os.environ, **LOW_MMAP_ENV)
    out = subprocess.run([sys.executable, __file__, *argv, "--memory"], env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    add_batch_args(parser)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--no-tune", action="store_true", help="time with glibc's default allocator settings")
    parser.add_argument("--memory", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.memory and not args.no_tune:
        from qat.runtime import tune_malloc

        tune_malloc()

    import torch

    import qat
    from qat.corpus import shipped_text, token_blocks
    from qat.models import load_model
    from qat.quantizers import LSQ

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tokenizer = load_model(args.model)
    model.train()
    ids = token_blocks(tokenizer, shipped_text(), args.seq_len)[: args.batch]
    qat.quantize_(model, weight=functools.partial(LSQ, bits=4, granularity="group", group_size=32), include="model.layers.*")
    quantizers = [layer.weight_quantizer for _, layer in qat.quantized_layers(model)]

    def step(quantized: bool) -> tuple[float, float]:
        for q in quantizers:
            q.enabled = quantized
        model.zero_grad(set_to_none=True)
        before = _status_kb("VmRSS")
        _rss_peak_reset()
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        seconds = time.perf_counter() - t0
        peak = _status_kb("VmHWM")
        return seconds, (peak - before) / 1024, peak / 1024

    step(False), step(True)  # warm-up: allocator, thread pools, lazily built kernels
    runs = {"fp": [], "lsq_w4g32": []}
    for _ in range(args.repeats):
        for name, quantized in (("fp", False), ("lsq_w4g32", True)):
            runs[name].append(step(quantized))

    if args.memory:
        print(json.dumps({k: [[r[1], r[2]] for r in rs] for k, rs in runs.items()}))
        return
    argv = ["--repeats", "2", "--threads", str(args.threads), "--batch", str(args.batch), "--seq-len", str(args.seq_len), "--model", args.model]
    memory = _memory_in_subprocess(argv)
    summary = {}
    for name, rs in runs.items():
        summary[name] = {
            "step_s": statistics.median(r[0] for r in rs),
            "step_peak_increase_mb": statistics.median(m[0] for m in memory[name]),
            "process_peak_rss_mb": statistics.median(m[1] for m in memory[name]),
        }
    fp, lq = summary["fp"], summary["lsq_w4g32"]
    result = {
        "what": "SmolLM2-135M train step (fwd+bwd), float32 CPU, LSQ w4 g32 on 210 decoder linears vs quantizers off",
        "batch": args.batch,
        "seq_len": args.seq_len,
        "threads": args.threads,
        "repeats": args.repeats,
        "layers": len(quantizers),
        "torch": torch.__version__,
        "allocator": "glibc defaults" if args.no_tune else "qat.runtime.tune_malloc (as qat-train)",
        "runs_time_s": {k: [r[0] for r in rs] for k, rs in runs.items()},
        "runs_memory_mb": memory,
        "summary": summary,
        "time_ratio": lq["step_s"] / fp["step_s"],
        "peak_rss_ratio": lq["process_peak_rss_mb"] / fp["process_peak_rss_mb"],
        "step_memory_ratio": lq["step_peak_increase_mb"] / fp["step_peak_increase_mb"],
    }
    out = write_json("overhead_untuned" if args.no_tune else "overhead", result)
    print("| variant | step (s) | step peak increase (MB) | process peak RSS (MB) |")
    print("|---|---|---|---|")
    for name, s in summary.items():
        print(f"| {name} | {s['step_s']:.2f} | {s['step_peak_increase_mb']:.0f} | {s['process_peak_rss_mb']:.0f} |")
    print(f"\ntime ratio {result['time_ratio']:.3f}x, process peak RSS ratio {result['peak_rss_ratio']:.3f}x, "
          f"step memory ratio {result['step_memory_ratio']:.3f}x  -> {out}")


if __name__ == "__main__":
    main()
