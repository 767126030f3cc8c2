"""Peak memory of a forward-only (zeroth-order) training step against inference and backprop QAT.

SmolLM2-135M (the embedded default), float32 on CPU, LSQ w4 group-32 on the 210 decoder linear
layers, batch 4 x 256 tokens of the shipped corpus, each mode in its own process:

* ``inference``: one forward pass with the loss under ``torch.inference_mode`` (what evaluation
  costs: the baseline of issue 5's target);
* ``zo_scales``: one SPSA step (``qat.zo``: two forward passes, seed-replayed update) moving the
  step sizes (the ``smollm2_w4_zo_scales`` recipe);
* ``zo_weights``: the same moving every latent weight in grid steps (the largest ZO setting);
* ``backprop_qat``: forward, backward and AdamW step of full QAT (the ``smollm2_w4_lsq`` setting).

The number is the process's resident-set high-water mark (VmHWM) over the measured steps, reset
through ``/proc/self/clear_refs`` after a warm-up step (model loading is not training memory),
with the low glibc mmap threshold of ``benchmarks/overhead.py`` so freed tensors leave the
process. Target (issue 5): a ZO step at most 1.1x inference.

    .venv/bin/python benchmarks/zo_memory.py [--steps 2] [--threads 2]

Writes ``benchmarks/results/zo_memory.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_batch_args, batch_argv, rss_peak_reset, run_mode, settings, status_kb, write_json  # noqa: E402

MODES = ("inference", "zo_scales", "zo_weights", "backprop_qat")
TARGET = 1.1


def make_step(mode: str, model, ids, chunk: int | None = None):
    """A zero-argument callable running one step of ``mode`` on ``model`` (already quantized).

    ``chunk``: compute the loss ``chunk`` tokens of logits at a time (``qat.lit.chunked_loss``).
    """
    import torch

    from qat.lit.chunked_loss import chunked_causal_lm_loss
    from qat.zo import ZOSGD, Perturbation

    if chunk is None:
        loss_fn = lambda: model(input_ids=ids, labels=ids).loss  # noqa: E731
    else:
        loss_fn = lambda: chunked_causal_lm_loss(model, ids, chunk)  # noqa: E731
    if mode == "inference":
        model.eval().requires_grad_(False)

        def step():
            with torch.inference_mode():
                loss_fn()
        return step
    if mode.startswith("zo_"):
        model.eval()
        for name, p in model.named_parameters():
            p.requires_grad_(("_quantizer." in name) if mode == "zo_scales" else ("_quantizer." not in name and ".layers." in name))
        pert = Perturbation(model)
        opt = ZOSGD([p for p in model.parameters() if p.requires_grad], lr=1e-6, eps=1e-3, perturbation=pert)

        def step():
            with torch.inference_mode():
                opt.estimate(loss_fn)
            opt.step()
        return step
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        opt.step()
    return step


def measure(mode: str, args, chunk: int | None = None, materialize: bool = False) -> dict:
    """Run ``args.steps`` steps of ``mode`` in this process after a warm-up step; return its memory figures.

    ``args`` needs ``model``, ``threads``, ``batch``, ``seq_len`` and ``steps``. ``chunk``: chunked
    cross-entropy (``make_step``). ``materialize``: give every parameter its own memory before
    quantizing, as ``benchmarks/adapter_memory.py`` does (``materialize_``), so the figures compare
    with its modes'.
    """
    import torch

    import qat
    from qat.corpus import shipped_text, token_blocks
    from qat.models import load_model
    from qat.quantizers import LSQ

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tokenizer = load_model(args.model)
    if materialize:
        from adapter_memory import materialize_

        materialize_(model)
    ids = token_blocks(tokenizer, shipped_text(), args.seq_len)[: args.batch]
    qat.quantize_(model, weight=functools.partial(LSQ, bits=4, granularity="group", group_size=32, init="minmax"), include="model.layers.*")
    step = make_step(mode, model, ids, chunk)
    step()  # warm-up: optimizer state, thread pools, allocator
    rss_peak_reset()
    for _ in range(args.steps):
        step()
    moving = sum(p.numel() for p in model.parameters() if p.requires_grad) if mode != "inference" else 0
    return {"peak_rss_mb": status_kb("VmHWM") / 1024, "moving_params": moving}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_batch_args(parser, steps=2)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(measure(args.mode, args)))
        return
    common = batch_argv(args) + ["--model", args.model]
    runs = {mode: run_mode(__file__, common, mode) for mode in MODES}
    base = runs["inference"]["peak_rss_mb"]
    for r in runs.values():
        r["ratio_to_inference"] = r["peak_rss_mb"] / base
        r["ratio_to_backprop_qat"] = r["peak_rss_mb"] / runs["backprop_qat"]["peak_rss_mb"]
    result = {
        "what": "SmolLM2-135M, LSQ w4 g32 on 210 decoder linears, float32 CPU: process peak RSS during a step",
        **settings(args), "target_zo_over_inference": TARGET, "modes": runs,
        "met": all(runs[m]["ratio_to_inference"] <= TARGET for m in ("zo_scales", "zo_weights")),
    }
    out = write_json("zo_memory", result)
    print("| mode | moving parameters | peak RSS (MB) | x inference | x backprop QAT |")
    print("|---|---|---|---|---|")
    for mode, r in runs.items():
        print(f"| {mode} | {r['moving_params']:,} | {r['peak_rss_mb']:.0f} | {r['ratio_to_inference']:.3f} | {r['ratio_to_backprop_qat']:.3f} |")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
