"""Peak memory of one batch across training modes: inference, full QAT, L4Q, scale-only and zeroth-order.

SmolLM2-135M (the embedded default), float32 on CPU, w4 group-32 on the 210 decoder linear layers,
batch 4 x 256 tokens of the shipped corpus, each mode in its own process, measured by the
backprop modes built by ``benchmarks/adapter_memory.py`` (imported, not copied) and the forward-only
modes defined here (``make_step``, ``measure_forward``):

* ``inference``: forward with the loss under ``torch.inference_mode`` (what evaluation costs);
* ``full_qat``: LSQ, every parameter trained, forward + backward + AdamW (``adapter_memory.measure``;
  the ``smollm2_w4_lsq`` setting);
* ``l4q``: LSQ+ with L4Q adapters r 16 on all seven projections (``adapter_memory.measure``);
* ``scale_only``: round-to-nearest codes frozen, step sizes trained (``adapter_memory.measure``);
* ``zo_scales``: one SPSA step (``qat.zo``: two forward passes, seed-replayed update) moving the
  step sizes (the ``smollm2_w4_zo_scales`` recipe);
* ``zo_weights``: the same moving every latent weight of the quantized layers, in whole grid steps
  (the largest forward-only setting).

The number is the process's resident-set high-water mark (VmHWM) over ``--steps`` steps, with the
low glibc mmap threshold (``common.LOW_MMAP_ENV``) so freed tensors leave the process. Every
mode gives its parameters their own memory first (``adapter_memory.materialize_``: no file-backed
weights). The backprop modes reset the mark once the model is built (their first step allocates the
optimizer state), the forward-only modes after a warm-up step.
``--chunked-loss N`` computes the cross-entropy N tokens of logits at a time in every mode;
``--checkpointing`` recomputes each decoder block in the backward of the three backprop modes (the
forward-only modes keep no activations: nothing to recompute). Each variant is kept in its own
section of the JSON. Targets: L4Q <= 0.6x full QAT, scale-only <= 0.5x full QAT (issue 4), a ZO
step <= 1.1x inference (issue 5).

    .venv/bin/python benchmarks/memory.py [--steps 2] [--threads 2] [--checkpointing] [--chunked-loss 256] [--modes ...]
    .venv/bin/python benchmarks/memory.py --modes inference full_qat zo_scales zo_weights   # the forward-only comparison alone

Writes ``benchmarks/results/memory.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import adapter_memory  # noqa: E402
from common import add_batch_args, batch_argv, rss_peak_reset, run_mode, settings, status_kb, write_json  # noqa: E402
from report import memory_table  # noqa: E402

MODES = ("inference", "full_qat", "l4q", "scale_only", "zo_scales", "zo_weights")
BACKPROP = ("full_qat", "l4q", "scale_only")  # adapter_memory's modes; the others are forward-only (below)
ZO_TARGET = 1.1  # issue 5: a forward-only step at most 1.1x inference
TARGETS = {  # mode -> (reference mode, at most this ratio)
    **{m: ("full_qat", t) for m, t in adapter_memory.TARGETS.items()},
    "zo_scales": ("inference", ZO_TARGET),
    "zo_weights": ("inference", ZO_TARGET),
}


def make_step(mode: str, model, ids, chunk: int | None = None):
    """A zero-argument callable running one step of a forward-only ``mode`` on ``model`` (already quantized).

    ``chunk``: compute the loss ``chunk`` tokens of logits at a time (``qat.lit.chunked_loss``).
    What moves is chosen by structure (``qat.roles``): the quantizers' parameters for ``zo_scales``,
    the latent weights of the quantized layers for ``zo_weights``.
    """
    import torch

    from qat.convert import quantized_layers
    from qat.lit.chunked_loss import chunked_causal_lm_loss
    from qat.roles import parameter_roles
    from qat.zo import ZOSGD, Perturbation

    if chunk is None:
        loss_fn = lambda: model(input_ids=ids, labels=ids).loss  # noqa: E731
    else:
        loss_fn = lambda: chunked_causal_lm_loss(model, ids, chunk)  # noqa: E731
    model.eval()
    if mode == "inference":
        model.requires_grad_(False)

        def step():
            with torch.inference_mode():
                loss_fn()
        return step
    if mode not in ("zo_scales", "zo_weights"):
        raise ValueError(f"{mode!r} is not a forward-only mode")
    roles = parameter_roles(model)
    latent = {id(layer.weight) for _, layer in quantized_layers(model)}
    for name, p in model.named_parameters():
        p.requires_grad_(roles[name] == "quant" if mode == "zo_scales" else id(p) in latent)
    opt = ZOSGD([p for p in model.parameters() if p.requires_grad], lr=1e-6, eps=1e-3, perturbation=Perturbation(model))

    def step():
        with torch.inference_mode():
            opt.estimate(loss_fn)
        opt.step()
    return step


def measure_forward(mode: str, args) -> dict:
    """``args.steps`` steps of a forward-only ``mode`` in this process after a warm-up step; its memory figures.

    The parameters get their own memory first (``adapter_memory.materialize_``), as in the backprop
    modes, so the figures compare.
    """
    import torch

    import qat
    from qat.corpus import shipped_text, token_blocks
    from qat.models import load_model
    from qat.quantizers import LSQ

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tokenizer = load_model(args.model)
    adapter_memory.materialize_(model)
    ids = token_blocks(tokenizer, shipped_text(), args.seq_len)[: args.batch]
    qat.quantize_(model, weight=functools.partial(LSQ, bits=4, granularity="group", group_size=32, init="minmax"), include="model.layers.*")
    step = make_step(mode, model, ids, args.chunked_loss)
    step()  # warm-up: thread pools, allocator, the perturbation's buffers
    rss_peak_reset()
    for _ in range(args.steps):
        step()
    moving = sum(p.numel() for p in model.parameters() if p.requires_grad) if mode != "inference" else 0
    return {"peak_rss_mb": status_kb("VmHWM") / 1024, "moving_params": moving}


def measure(mode: str, args) -> dict:
    """One mode in this process: a backprop mode through ``adapter_memory.measure``, the others here."""
    if mode in BACKPROP:
        r = adapter_memory.measure(mode, args.steps, args.threads, args.batch, args.seq_len, args.checkpointing, args.chunked_loss, args.model)
        trained = r["trainable_params"]
    else:
        r = measure_forward(mode, args)
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
