"""Peak memory of one batch across training modes: inference, full QAT, L4Q, scale-only and zeroth-order.

SmolLM2-135M (the embedded default), float32 on CPU, w4 group-32 on the 210 decoder linear layers,
batch 4 x 256 tokens of the shipped corpus, each mode in its own process, measured by the
functions of the two benchmarks that define them (imported, not copied):

* ``inference``: forward with the loss under ``torch.inference_mode`` (``zo_memory.measure``);
* ``full_qat``: LSQ, every parameter trained, forward + backward + AdamW (``adapter_memory.measure``);
* ``l4q``: LSQ+ with L4Q adapters r 16 on all seven projections (``adapter_memory.measure``);
* ``scale_only``: round-to-nearest codes frozen, step sizes trained (``adapter_memory.measure``);
* ``zo_scales``: one SPSA step (two forward passes) moving the step sizes (``zo_memory.measure``);
* ``zo_weights``: the same moving every latent weight, in whole grid steps (``zo_memory.measure``).

The number is the process's resident-set high-water mark (VmHWM) over ``--steps`` steps, with the
low glibc mmap threshold of ``benchmarks/overhead.py`` so freed tensors leave the process. Every
mode gives its parameters their own memory first (``adapter_memory.materialize_``: no file-backed
weights). The backprop modes reset the mark once the model is built (their first step allocates the
optimizer state), the forward-only modes after a warm-up step (``zo_memory``'s convention).
``--chunked-loss N`` computes the cross-entropy N tokens of logits at a time in every mode;
``--checkpointing`` recomputes each decoder block in the backward of the three backprop modes (the
forward-only modes keep no activations: nothing to recompute). Each variant is kept in its own
section of the JSON. Targets: L4Q <= 0.6x full QAT, scale-only <= 0.5x full QAT (issue 4), a ZO
step <= 1.1x inference (issue 5).

    .venv/bin/python benchmarks/memory.py [--steps 2] [--threads 2] [--checkpointing] [--chunked-loss 256]

Writes ``benchmarks/results/memory.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import adapter_memory  # noqa: E402
import zo_memory  # noqa: E402
from common import add_batch_args, batch_argv, run_mode, settings, write_json  # noqa: E402
from report import memory_table  # noqa: E402

MODES = ("inference", "full_qat", "l4q", "scale_only", "zo_scales", "zo_weights")
BACKPROP = ("full_qat", "l4q", "scale_only")  # adapter_memory's modes; the others are zo_memory's
TARGETS = {  # mode -> (reference mode, at most this ratio)
    **{m: ("full_qat", t) for m, t in adapter_memory.TARGETS.items()},
    "zo_scales": ("inference", zo_memory.TARGET),
    "zo_weights": ("inference", zo_memory.TARGET),
}

def measure(mode: str, args) -> dict:
    """One mode in this process, through the function of the benchmark that defines it."""
    if mode in BACKPROP:
        r = adapter_memory.measure(mode, args.steps, args.threads, args.batch, args.seq_len, args.checkpointing, args.chunked_loss, args.model)
        trained = r["trainable_params"]
    else:
        ns = argparse.Namespace(model=args.model, threads=args.threads, batch=args.batch, seq_len=args.seq_len, steps=args.steps)
        r = zo_memory.measure(mode, ns, chunk=args.chunked_loss, materialize=True)
        trained = r["moving_params"]
    return {**r, "trained_params": trained}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_batch_args(parser, steps=2)
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing per block, in the backprop modes")
    parser.add_argument("--chunked-loss", type=int, default=None, metavar="TOKENS", help="chunked cross-entropy, TOKENS per chunk, in every mode")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="a subset (the ratios need inference and full_qat)")
    parser.add_argument("--model", default="smollm2-135m", help="an embedded name, a local Hugging Face directory or a hub name")
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(measure(args.mode, args)))
        return
    common = batch_argv(args) + ["--model", args.model]
    common += ["--checkpointing"] if args.checkpointing else []
    common += ["--chunked-loss", str(args.chunked_loss)] if args.chunked_loss else []
    variant = ("checkpointed" if args.checkpointing else "activations_kept") + ("_chunked_loss" if args.chunked_loss else "")

    runs = {}
    for mode in args.modes:
        runs[mode] = run_mode(__file__, common, mode)
        print(f"{mode}: {runs[mode]['peak_rss_mb']:.0f} MB", file=sys.stderr)
    for r in runs.values():
        for ref in ("inference", "full_qat"):
            r[f"ratio_to_{ref}"] = r["peak_rss_mb"] / runs[ref]["peak_rss_mb"] if ref in runs else None
    met = {m: runs[m][f"ratio_to_{ref}"] <= t for m, (ref, t) in TARGETS.items() if m in runs and runs[m][f"ratio_to_{ref}"] is not None}
    result = {
        "what": f"{args.model}, w4 g32 on the decoder linears (model.layers.*), float32 CPU: process peak RSS of a step of the same batch, per mode",
        "checkpointing": args.checkpointing,
        "checkpointing_applies_to": list(BACKPROP) if args.checkpointing else [],
        "chunked_loss_tokens": args.chunked_loss,
        **settings(args),
        "modes": runs,
        "targets": {m: {"of": ref, "at_most": t} for m, (ref, t) in TARGETS.items()},
        "meets_targets": met,
    }
    out = write_json("memory", result, section=variant)  # one section per variant: a run of another keeps its numbers
    print(memory_table(result))
    print(f"\n{variant} -> {out}")


if __name__ == "__main__":
    main()
