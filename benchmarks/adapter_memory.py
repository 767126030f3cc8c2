"""Peak memory of a training step: full QAT against L4Q and scale-only tuning, same model and batch.

SmolLM2-135M (the embedded default), float32 on CPU, batch 4 x 256 tokens of the shipped corpus, a
full training step (forward, backward, AdamW step), for three modes, each in its own process:

* ``full_qat``: LSQ w4 group-32 on the 210 decoder linear layers, every parameter trained (the
  ``smollm2_w4_lsq`` recipe's setting);
* ``l4q``: LSQ+ w4 group-32 with L4Q adapters (r 16) on all seven projections of every block;
* ``scale_only``: w4 group-32 round-to-nearest codes frozen, only the step sizes trained (PEQA).

``--chunked-loss N`` computes the cross-entropy N tokens of logits at a time (``qat.lit.chunked_loss``,
``objective.chunk_tokens`` in the configs), in all three modes: the 49k-vocabulary logits, their
log-softmax and gradient (about 600 MB at this batch) are then never whole.
``--checkpointing`` recomputes each decoder block in the backward, in all three modes: at this
batch the activations kept for the backward (about 1.7 GB: 30 blocks plus the 49k-vocabulary
logits and their log-softmax) are the same in every mode and alone weigh 40% of full QAT's peak,
so the plain run bounds what any backprop mode can reach; the checkpointed run shows what the
modes themselves cost (weights, gradients, optimizer state). Both variants are kept in the JSON.

The number is the process's resident-set high-water mark (VmHWM) over the training steps, reset
through ``/proc/self/clear_refs`` once the model is built (loading peaks are not training memory),
with the low glibc mmap threshold of ``benchmarks/overhead.py`` (whose helpers it uses) so freed
tensors leave the process. Targets (issue 4): L4Q <= 0.6x full QAT, scale-only <= 0.5x.

    .venv/bin/python benchmarks/adapter_memory.py [--steps 3] [--threads 2] [--checkpointing] [--chunked-loss 256]

Writes ``benchmarks/results/adapter_memory.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from common import add_batch_args, batch_argv, rss_peak_reset, run_mode, settings, status_kb, write_json  # noqa: E402

MODES = ("full_qat", "l4q", "scale_only")
TARGETS = {"l4q": 0.6, "scale_only": 0.5}
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(mode: str, model) -> None:
    """Quantize ``model`` and add the mode's adapters, as the matching recipes do."""
    import qat
    from qat.quantizers import LSQ

    lsq = functools.partial(LSQ, bits=4, granularity="group", group_size=32)
    if mode == "full_qat":
        qat.quantize_(model, weight=functools.partial(lsq, init="minmax"), include="model.layers.*")
    elif mode == "l4q":
        from peft import LoraConfig

        from qat.adapters import L4Q

        qat.quantize_(model, weight=functools.partial(lsq, offset=True, symmetric=False), include="model.layers.*")
        L4Q(LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=PROJECTIONS)).apply_(model)
    elif mode == "scale_only":
        from qat.adapters import ScaleOnly

        qat.quantize_(model, weight=functools.partial(lsq, init="minmax"), include="model.layers.*")
        ScaleOnly().apply_(model)
    else:
        raise ValueError(f"unknown mode {mode!r}: one of {MODES}")


def materialize_(model) -> None:
    """Give every parameter its own memory (tied ones stay tied).

    ``from_pretrained`` maps the safetensors file: weights are file-backed pages that count in RSS
    once touched and stay mapped while any tensor of the file lives, so a mode that drops weights
    (scale-only keeps int8 codes instead) would still show them. Copies make every mode's model
    ordinary process memory, as after any write.
    """
    copies = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                if id(p) not in copies:
                    copies[id(p)] = torch.nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
                module._parameters[name] = copies[id(p)]


def measure(mode: str, steps: int, threads: int, batch: int, seq_len: int, checkpointing: bool = False, chunk: int | None = None,
            model_name: str = "smollm2-135m") -> dict:
    """Run ``steps`` training steps of ``mode`` on ``model_name`` in this process; return its memory figures."""
    import torch

    from qat.corpus import shipped_text, token_blocks
    from qat.lit.chunked_loss import chunked_causal_lm_loss
    from qat.models import load_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, tokenizer = load_model(model_name)
    materialize_(model)
    build(mode, model)
    model.train()
    if checkpointing:  # recompute each block in the backward: activations shrink to the block inputs
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = token_blocks(tokenizer, shipped_text(), seq_len)[:batch]
    import gc

    gc.collect()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
    before = status_kb("VmRSS")
    rss_peak_reset()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss if chunk is None else chunked_causal_lm_loss(model, ids, chunk)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {
        "peak_rss_mb": status_kb("VmHWM") / 1024,
        "rss_before_steps_mb": before / 1024,
        "step_s": (time.perf_counter() - t0) / steps,
        "trainable_params": sum(p.numel() for p in params),
        "total_params": sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers()),
        "loss": loss.item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_batch_args(parser, steps=3)
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing per block, in every mode")
    parser.add_argument("--chunked-loss", type=int, default=None, metavar="TOKENS", help="chunked cross-entropy, TOKENS per chunk, in every mode")
    parser.add_argument("--model", default="smollm2-135m", help="an embedded name, a local Hugging Face directory or a hub name")
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    common = batch_argv(args) + ["--model", args.model]
    common += ["--checkpointing"] if args.checkpointing else []
    common += ["--chunked-loss", str(args.chunked_loss)] if args.chunked_loss else []
    if args.mode:
        print(json.dumps(measure(args.mode, args.steps, args.threads, args.batch, args.seq_len, args.checkpointing, args.chunked_loss, args.model)))
        return
    variant = ("checkpointed" if args.checkpointing else "activations_kept") + ("_chunked_loss" if args.chunked_loss else "")

    runs = {}
    for mode in MODES:
        runs[mode] = run_mode(__file__, common, mode)
        print(f"{mode}: {runs[mode]['peak_rss_mb']:.0f} MB", file=sys.stderr)
    full = runs["full_qat"]["peak_rss_mb"]
    ratios = {m: runs[m]["peak_rss_mb"] / full for m in MODES}
    result = {
        "what": "SmolLM2-135M training step (fwd+bwd+AdamW), float32 CPU, peak RSS over the steps; w4 g32 on 210 decoder linears",
        "checkpointing": args.checkpointing,
        "chunked_loss_tokens": args.chunked_loss,
        **settings(args),
        "runs": runs,
        "ratio_to_full_qat": ratios,
        "targets": TARGETS,
        "meets_targets": {m: ratios[m] <= t for m, t in TARGETS.items()},
    }
    out = write_json("adapter_memory", result, section=variant)  # one section per variant: a run of another keeps its numbers
    print("| mode | peak RSS (MB) | x full QAT | target | step (s) | trainable params |")
    print("|---|---|---|---|---|---|")
    for m in MODES:
        r = runs[m]
        target = f"<= {TARGETS[m]}x" if m in TARGETS else ""
        print(f"| {m} | {r['peak_rss_mb']:.0f} | {ratios[m]:.2f} | {target} | {r['step_s']:.1f} | {r['trainable_params']:,} |")
    print(f"\n{variant} -> {out}")


if __name__ == "__main__":
    main()
