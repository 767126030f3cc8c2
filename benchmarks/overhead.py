"""Cost of weight fake quantization in a training step, ours and torchao's, against the same step without it.

SmolLM2-135M (the embedded default), float32, batch 4 x 256 tokens of the shipped corpus, forward +
backward (no optimizer step), three variants built from the same weights:

* ``fp``: the model as loaded, plain ``nn.Linear`` layers (no fake quantization);
* ``ours``: LSQ 4-bit symmetric group-32 on the 210 decoder linear layers (``qat.quantize_``,
  ``include="model.layers.*"``);
* ``torchao``: torchao's QAT prepare step on the same 210 layers (``QATConfig`` with
  ``IntxFakeQuantizeConfig(torch.int4, group_size=32, is_symmetric=True)``: ``FakeQuantizedLinear``,
  scales recomputed from the weight at every forward). Skipped, with a note, when torchao is not
  installed (``pip install -e ".[bench]"``).

**Time**: one process holds the three models; after one warm-up step each, steps are interleaved
(fp, ours, torchao, fp, ...) and the median of ``--repeats`` is reported, with ours / fp and
torchao / fp. Target: our overhead no larger than torchao's (``ours / fp <= torchao / fp``). The
allocator is set as ``qat-train`` sets it (``qat.runtime.tune_malloc``: freed memory stays in the
process; ``--no-tune`` keeps glibc's defaults); on CUDA each step is synchronized before the clock
stops.

**Memory** (CPU only): each variant in a process of its own (``--variant``), as the resident-set
high-water mark (VmHWM) during one step, reset before the step through ``/proc/self/clear_refs``,
with a fixed low glibc mmap threshold (``common.LOW_MMAP_ENV``) so that freed tensors leave the
process and the mark reflects live memory: the step's peak increase over the resident set before
it, and the process's peak.

    make install && .venv/bin/pip install -e ".[bench]"   # torchao
    .venv/bin/python benchmarks/overhead.py [--repeats 5] [--threads 2] [--batch 4] [--seq-len 256] [--device cuda] [--no-tune] [--format int4|nvfp4|mxfp4]

Writes two results files (``QAT_BENCH_RESULTS`` moves the folder):

* ``benchmarks/results/overhead.json`` (CPU): ours against fp, time and memory (``summary.fp`` and
  ``summary.lsq_w4g32``: ``step_s``, ``step_peak_increase_mb``, ``process_peak_rss_mb``; ``time_ratio``,
  ``peak_rss_ratio``, ``step_memory_ratio``);
* ``benchmarks/results/peers_overhead.json`` (``peers_overhead_cuda.json`` with ``--device cuda``):
  the three variants' step times (``step_s``), ``ours_over_fp``, ``torchao_over_fp``, ``met``.

``--no-tune`` adds ``_untuned`` to both names. Prints markdown tables.

``--format nvfp4`` / ``--format mxfp4`` (default ``int4``: everything above) times the same three
variants with FP4 weights instead: ``ours`` the format recipe's quantizers (``smollm2_nvfp4``: NVFP4
with Dual-LSQ block scales, ``smollm2_mxfp4``: MXFP4 with Dual-LSQ block scales, put in by
``qat.config.quantize`` as ``qat-train`` does), ``torchao`` its fake quantizer of the format
(``peers_fp4.torchao_fp4``, the first torchao row of ``peers_fp4.TORCHAO``); time only, written to
``benchmarks/results/overhead_FORMAT.json`` (same keys as ``peers_overhead.json``, plus ``format``).
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_batch_args, rss_peak_reset, run_mode, status_kb, write_json  # noqa: E402

VARIANTS = ("fp", "ours", "torchao")
FORMATS = ("int4", "nvfp4", "mxfp4")  # --format: int4 the LSQ w4 g32 comparison (overhead.json, peers_overhead.json); FP4 ones time only
MEMORY_REPEATS = 2  # steps measured in each memory process (after one warm-up step)


def decoder_linear(module, fqn: str) -> bool:
    """The layers both quantize: every ``nn.Linear`` of the decoder blocks (not the tied output head)."""
    import torch

    return isinstance(module, torch.nn.Linear) and fqn.startswith("model.layers.")


def build_ours(model, fmt: str = "int4") -> int:
    """int4: LSQ w4 sym g32; an FP4 format: its recipe's quantizers (``peers_fp4.FORMATS``) as ``qat-train`` puts them in."""
    import qat

    if fmt == "int4":
        from qat.quantizers import LSQ

        qat.quantize_(model, weight=functools.partial(LSQ, bits=4, granularity="group", group_size=32), include="model.layers.*")
    else:
        from peers_fp4 import FORMATS

        from qat.config import compose, quantize

        quantize(compose([f"recipe={FORMATS[fmt]}"]), model)
    return len(list(qat.quantized_layers(model)))


def build_torchao(model, fmt: str = "int4") -> int:
    """int4: ``IntxFakeQuantizeConfig`` w4 sym g32; an FP4 format: torchao's fake quantizer of it (``peers_fp4``'s first torchao row)."""
    if fmt != "int4":
        from peers_fp4 import TORCHAO, torchao_fp4

        return torchao_fp4(model, fmt, TORCHAO[fmt][0][2])["layers"]
    import torch
    from torchao.quantization import quantize_ as ao_quantize_
    from torchao.quantization.qat import FakeQuantizedLinear, IntxFakeQuantizeConfig, QATConfig

    weight = IntxFakeQuantizeConfig(torch.int4, group_size=32, is_symmetric=True)
    ao_quantize_(model, QATConfig(weight_config=weight, step="prepare"), filter_fn=decoder_linear)
    return sum(isinstance(m, FakeQuantizedLinear) and m.weight_fake_quantizer is not None for m in model.modules())


BUILD = {"ours": build_ours, "torchao": build_torchao}


def torchao_version() -> str | None:
    try:
        import torchao
    except ImportError:
        return None
    return torchao.__version__


def setup(args, variants: tuple[str, ...]):
    """``(models, layers, ids)``: the variants built from one loaded model, and the batch."""
    import torch

    from qat.corpus import shipped_text, token_blocks
    from qat.models import load_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base, tokenizer = load_model(args.model)
    ids = token_blocks(tokenizer, shipped_text(), args.seq_len)[: args.batch].to(args.device)
    models, layers = {}, {}
    for name in variants:
        models[name] = base if name == variants[-1] else copy.deepcopy(base)  # the last one takes the loaded model itself
        if name in BUILD:
            layers[name] = BUILD[name](models[name], args.format)
    for m in models.values():
        m.to(args.device).train()
    return models, layers, ids


def make_step(model, ids, device: str):
    """One forward + backward of ``model`` on ``ids``; returns ``(seconds, loss)``; gradients freed after it."""
    import torch

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def step() -> tuple[float, float]:
        model.zero_grad(set_to_none=True)
        sync()
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        sync()
        seconds = time.perf_counter() - t0
        model.zero_grad(set_to_none=True)  # one model's gradients alive at a time
        return seconds, loss.item()
    return step


def memory_of(variant: str, args) -> dict:
    """In this process (started by ``run_mode``): the step-memory figures of one variant alone."""
    models, _, ids = setup(args, (variant,))
    step = make_step(models[variant], ids, args.device)
    step()  # warm-up: allocator, thread pools, lazily built kernels
    runs = []
    for _ in range(MEMORY_REPEATS):
        before = status_kb("VmRSS")
        rss_peak_reset()
        models[variant].zero_grad(set_to_none=True)
        models[variant](input_ids=ids, labels=ids).loss.backward()
        peak = status_kb("VmHWM")
        runs.append([(peak - before) / 1024, peak / 1024])
        models[variant].zero_grad(set_to_none=True)
    return {"runs": runs}


def write_fp4(args, ao, header, allocator, losses, runs, step_s, suffix) -> None:
    """``overhead_FORMAT.json`` (``--format nvfp4|mxfp4``): the three variants' step times and the target."""
    from peers_fp4 import FORMATS as RECIPES
    from peers_fp4 import TORCHAO

    ours = step_s["ours"] / step_s["fp"]
    tao = step_s["torchao"] / step_s["fp"] if "torchao" in step_s else None
    result = {
        "what": f"{args.model} train step (fwd+bwd), float32 {args.device}, {args.format} weight fake quant on the decoder linears: "
                f"ours (recipe {RECIPES[args.format]}) vs torchao ({TORCHAO[args.format][0][1]}) vs none",
        "format": args.format, "model": args.model, "device": args.device, **header, "torchao": ao, "allocator": allocator,
        "ours_recipe": RECIPES[args.format], "torchao_row": TORCHAO[args.format][0][1], "torchao_options": TORCHAO[args.format][0][2],
        "warmup_loss": losses, "runs_time_s": runs, "step_s": step_s,
        "ours_over_fp": ours, "torchao_over_fp": tao, "ours_over_torchao": step_s["ours"] / step_s["torchao"] if tao else None,
        "target": "ours / fp <= torchao / fp", "met": None if tao is None else ours <= tao,
    }
    out = write_json(f"overhead_{args.format}" + ("_cuda" if args.device == "cuda" else "") + suffix, result)
    print("| variant | step (s) | x fp |")
    print("|---|---|---|")
    for name, s in step_s.items():
        print(f"| {name} | {s:.3f} | {s / step_s['fp']:.3f} |")
    print(f"\nours {ours:.3f}x, torchao {'-' if tao is None else f'{tao:.3f}x'} over fp; ours <= torchao: {result['met']}  -> {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    add_batch_args(parser)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--no-tune", action="store_true", help="time with glibc's default allocator settings")
    parser.add_argument("--format", choices=FORMATS, default="int4",
                        help="int4 (default): LSQ w4 g32 against IntxFakeQuantizeConfig, overhead.json and peers_overhead.json; "
                        "nvfp4 / mxfp4: the format's recipe quantizers against torchao's fake quantizer of it, time only, overhead_FORMAT.json")
    parser.add_argument("--mode", choices=VARIANTS, help=argparse.SUPPRESS)  # a memory process of one variant (run_mode)
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(memory_of(args.mode, args)))
        return
    if not args.no_tune:
        from qat.runtime import tune_malloc

        tune_malloc()

    import torch

    ao = torchao_version()
    variants = VARIANTS if ao else VARIANTS[:2]
    if not ao:
        print("torchao is not installed (pip install -e '.[bench]'): measuring fp and ours only "
              "(peers_overhead.json is not written; overhead_FORMAT.json has no torchao row)",
              file=sys.stderr)
    models, layers, ids = setup(args, variants)
    if ao and layers["ours"] != layers["torchao"]:
        raise RuntimeError(f"the two quantize different layer sets: {layers}")
    steps = {name: make_step(models[name], ids, args.device) for name in variants}
    losses = {name: steps[name]()[1] for name in variants}  # warm-up: allocator, thread pools, lazy init (LSQ steps)
    runs = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name in variants:
            runs[name].append(steps[name]()[0])
    del models, steps
    step_s = {name: statistics.median(rs) for name, rs in runs.items()}
    suffix = "_untuned" if args.no_tune else ""
    allocator = "glibc defaults" if args.no_tune else "qat.runtime.tune_malloc (as qat-train)"
    header = {"batch": args.batch, "seq_len": args.seq_len, "threads": args.threads, "repeats": args.repeats,
              "layers": layers["ours"], "torch": torch.__version__}
    if args.format != "int4":
        write_fp4(args, ao, header, allocator, losses, runs, step_s, suffix)
        return

    if args.device == "cpu":
        argv = ["--threads", str(args.threads), "--batch", str(args.batch), "--seq-len", str(args.seq_len), "--model", args.model]
        memory = {name: run_mode(__file__, argv, name)["runs"] for name in ("fp", "ours")}
        summary = {}
        for key, name in (("fp", "fp"), ("lsq_w4g32", "ours")):
            summary[key] = {"step_s": step_s[name],
                            "step_peak_increase_mb": statistics.median(m[0] for m in memory[name]),
                            "process_peak_rss_mb": statistics.median(m[1] for m in memory[name])}
        fp, lq = summary["fp"], summary["lsq_w4g32"]
        result = {
            "what": f"{args.model} train step (fwd+bwd), float32 CPU, LSQ w4 g32 on the decoder linears vs plain nn.Linear",
            **header, "allocator": allocator,
            "runs_time_s": {"fp": runs["fp"], "lsq_w4g32": runs["ours"]},
            "runs_memory_mb": {"fp": memory["fp"], "lsq_w4g32": memory["ours"]},
            "summary": summary,
            "time_ratio": lq["step_s"] / fp["step_s"],
            "peak_rss_ratio": lq["process_peak_rss_mb"] / fp["process_peak_rss_mb"],
            "step_memory_ratio": lq["step_peak_increase_mb"] / fp["step_peak_increase_mb"],
        }
        out = write_json("overhead" + suffix, result)
        print("| variant | step (s) | step peak increase (MB) | process peak RSS (MB) |")
        print("|---|---|---|---|")
        for name, s in summary.items():
            print(f"| {name} | {s['step_s']:.2f} | {s['step_peak_increase_mb']:.0f} | {s['process_peak_rss_mb']:.0f} |")
        print(f"\ntime ratio {result['time_ratio']:.3f}x, process peak RSS ratio {result['peak_rss_ratio']:.3f}x, "
              f"step memory ratio {result['step_memory_ratio']:.3f}x  -> {out}\n")

    if not ao:
        return
    ours, tao = step_s["ours"] / step_s["fp"], step_s["torchao"] / step_s["fp"]
    result = {
        "what": f"{args.model} train step (fwd+bwd), float32 {args.device}, weight fake quant w4 sym g32 on the decoder linears: "
                "ours (LSQ) vs torchao (QATConfig IntxFakeQuantizeConfig) vs none",
        "model": args.model, "device": args.device, **header, "torchao": ao, "allocator": allocator,
        "warmup_loss": losses,
        "runs_time_s": runs,
        "step_s": step_s,
        "ours_over_fp": ours,
        "torchao_over_fp": tao,
        "ours_over_torchao": step_s["ours"] / step_s["torchao"],
        "target": "ours / fp <= torchao / fp",
        "met": ours <= tao,
    }
    out = write_json("peers_overhead" + ("_cuda" if args.device == "cuda" else "") + suffix, result)
    print("| variant | step (s) | x fp |")
    print("|---|---|---|")
    for name, s in step_s.items():
        print(f"| {name} | {s:.3f} | {s / step_s['fp']:.3f} |")
    print(f"\nours {ours:.3f}x, torchao {tao:.3f}x over fp; ours <= torchao: {result['met']}  -> {out}")


if __name__ == "__main__":
    main()
