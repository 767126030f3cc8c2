"""Cost of weight fake quantization in a training step, ours against torchao's, over the same step without it.

One process, three models built from the same weights: SmolLM2-135M (the embedded default),
float32, batch 4 x 256 tokens of the shipped corpus, forward + backward (no optimizer step):

* ``fp``: the model as loaded, plain ``nn.Linear`` layers;
* ``ours``: LSQ 4-bit symmetric group-32 on the 210 decoder linear layers (``qat.quantize_``,
  ``include="model.layers.*"``, the quantizer ``benchmarks/overhead.py`` measures);
* ``torchao``: torchao's QAT prepare step on the same 210 layers (``QATConfig`` with
  ``IntxFakeQuantizeConfig(torch.int4, group_size=32, is_symmetric=True)``: ``FakeQuantizedLinear``,
  scales recomputed from the weight at every forward).

Steps are interleaved (fp, ours, torchao, fp, ours, torchao, ...) after one warm-up step each, and
the median of ``--repeats`` is reported, with ours / fp and torchao / fp. Target: our overhead no
larger than torchao's (``ours / fp <= torchao / fp``). On CPU the allocator is set as
``benchmarks/overhead.py`` times it (``qat.runtime.tune_malloc``, as ``qat-train``; ``--no-tune``
keeps glibc's defaults); on CUDA each step is synchronized before the clock stops.

    make install && .venv/bin/pip install -e ".[bench]"   # torchao
    .venv/bin/python benchmarks/peers_overhead.py [--repeats 5] [--threads 2] [--device cuda]

Writes ``benchmarks/results/peers_overhead.json`` (``peers_overhead_cuda.json`` with ``--device cuda``;
``_untuned`` with ``--no-tune``) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_batch_args, write_json  # noqa: E402

VARIANTS = ("fp", "ours", "torchao")


def decoder_linear(module, fqn: str) -> bool:
    """The layers both quantize: every ``nn.Linear`` of the decoder blocks (not the tied output head)."""
    import torch

    return isinstance(module, torch.nn.Linear) and fqn.startswith("model.layers.")


def build_ours(model):
    import qat
    from qat.quantizers import LSQ

    qat.quantize_(model, weight=functools.partial(LSQ, bits=4, granularity="group", group_size=32), include="model.layers.*")
    return len(list(qat.quantized_layers(model)))


def build_torchao(model):
    import torch
    from torchao.quantization import quantize_ as ao_quantize_
    from torchao.quantization.qat import FakeQuantizedLinear, IntxFakeQuantizeConfig, QATConfig

    weight = IntxFakeQuantizeConfig(torch.int4, group_size=32, is_symmetric=True)
    ao_quantize_(model, QATConfig(weight_config=weight, step="prepare"), filter_fn=decoder_linear)
    return sum(isinstance(m, FakeQuantizedLinear) and m.weight_fake_quantizer is not None for m in model.modules())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    add_batch_args(parser)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--no-tune", action="store_true", help="time with glibc's default allocator settings")
    args = parser.parse_args()
    if not args.no_tune:
        from qat.runtime import tune_malloc

        tune_malloc()

    import torch
    import torchao

    from qat.corpus import shipped_text, token_blocks
    from qat.models import load_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    base, tokenizer = load_model(args.model)
    ids = token_blocks(tokenizer, shipped_text(), args.seq_len)[: args.batch].to(device)
    models = {"fp": base, "ours": copy.deepcopy(base), "torchao": copy.deepcopy(base)}
    layers = {"ours": build_ours(models["ours"]), "torchao": build_torchao(models["torchao"])}
    if layers["ours"] != layers["torchao"]:
        raise RuntimeError(f"the two quantize different layer sets: {layers}")
    for m in models.values():
        m.to(device).train()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step(name: str) -> tuple[float, float]:
        model = models[name]
        model.zero_grad(set_to_none=True)
        sync()
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        sync()
        seconds = time.perf_counter() - t0
        model.zero_grad(set_to_none=True)  # one model's gradients alive at a time
        return seconds, loss.item()

    losses = {name: step(name)[1] for name in VARIANTS}  # warm-up: allocator, thread pools, lazy init (LSQ steps)
    runs = {name: [] for name in VARIANTS}
    for _ in range(args.repeats):
        for name in VARIANTS:
            runs[name].append(step(name)[0])

    summary = {name: statistics.median(rs) for name, rs in runs.items()}
    ours, ao = summary["ours"] / summary["fp"], summary["torchao"] / summary["fp"]
    result = {
        "what": f"{args.model} train step (fwd+bwd), float32 {args.device}, weight fake quant w4 sym g32 on the decoder linears: "
                "ours (LSQ) vs torchao (QATConfig IntxFakeQuantizeConfig) vs none",
        "model": args.model,
        "device": args.device,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "threads": args.threads,
        "repeats": args.repeats,
        "layers": layers["ours"],
        "torch": torch.__version__,
        "torchao": torchao.__version__,
        "allocator": "glibc defaults" if args.no_tune else "qat.runtime.tune_malloc (as qat-train)",
        "warmup_loss": losses,
        "runs_time_s": runs,
        "step_s": summary,
        "ours_over_fp": ours,
        "torchao_over_fp": ao,
        "ours_over_torchao": summary["ours"] / summary["torchao"],
        "target": "ours / fp <= torchao / fp",
        "met": ours <= ao,
    }
    out = write_json("peers_overhead" + ("_cuda" if args.device == "cuda" else "") + ("_untuned" if args.no_tune else ""), result)
    print("| variant | step (s) | x fp |")
    print("|---|---|---|")
    for name, s in summary.items():
        print(f"| {name} | {s:.3f} | {s / summary['fp']:.3f} |")
    print(f"\nours {ours:.3f}x, torchao {ao:.3f}x over fp; ours <= torchao: {result['met']}  -> {out}")


if __name__ == "__main__":
    main()
