"""Round-to-nearest baselines on the embedded SmolLM2-135M: the gap QAT has to close.

Held-out perplexity of the FP model and of round-to-nearest (``MinMax`` / ``Ternary``, no training)
on all 210 decoder linear layers (embeddings and the tied head stay float), on the first
``--tokens`` tokens of the shipped corpus in blocks of 256. One process, one FP model, each
setting applied to a copy.

    make install && .venv/bin/python benchmarks/ptq_baselines.py [--tokens 20480]

Writes ``benchmarks/results/ptq_baselines.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def settings():
    from qat.quantizers import MinMax, Ternary

    return {
        "int8 sym per-channel": functools.partial(MinMax, bits=8, granularity="channel"),
        "int4 sym g64": functools.partial(MinMax, bits=4, granularity="group", group_size=64),
        "int4 sym per-channel": functools.partial(MinMax, bits=4, granularity="channel"),
        "int4 asym g32": functools.partial(MinMax, bits=4, granularity="group", group_size=32, symmetric=False),
        "int3 asym g64": functools.partial(MinMax, bits=3, granularity="group", group_size=64, symmetric=False),
        "int2 asym g64": functools.partial(MinMax, bits=2, granularity="group", group_size=64, symmetric=False),
        "ternary absmean per-channel": functools.partial(Ternary, method="absmean", granularity="channel"),
        "ternary absmean g64": functools.partial(Ternary, method="absmean", granularity="group", group_size=64),
        "ternary twn per-channel": functools.partial(Ternary, method="twn", granularity="channel"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=20480)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args()

    import torch

    import qat
    from qat.corpus import shipped_text, token_blocks
    from qat.metrics import perplexity
    from qat.models import load_model

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    blocks = token_blocks(tokenizer, shipped_text(), args.seq_len)[: args.tokens // args.seq_len]  # the held-out split
    rows = {}
    t0 = time.perf_counter()
    rows["fp32"] = perplexity(model, blocks)
    for name, factory in settings().items():
        m = copy.deepcopy(model)
        qat.quantize_(m, weight=factory, include="model.layers.*")
        rows[name] = perplexity(m, blocks)
        del m
        print(f"{name}: {rows[name]:.4g}", flush=True)
    result = {
        "model": args.model,
        "heldout_tokens": int(blocks.numel()),
        "seq_len": args.seq_len,
        "layers": "model.layers.* (210 linear layers); embeddings and tied lm_head float",
        "perplexity": rows,
        "ratio_to_fp": {k: v / rows["fp32"] for k, v in rows.items()},
        "seconds": time.perf_counter() - t0,
        "torch": torch.__version__,
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "ptq_baselines.json"
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, out)
    print("\n| weights (decoder linears) | held-out perplexity | x FP |\n|---|---|---|")
    for k, v in rows.items():
        print(f"| {k} | {v:.4g} | {v / rows['fp32']:.3g} |")
    print(f"\n{result['heldout_tokens']} held-out tokens -> {out}")


if __name__ == "__main__":
    main()
