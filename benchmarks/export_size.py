"""Packed export size for each quantization config on the embedded SmolLM2-135M.

For every ``configs/quant/*.yaml`` that applies to SmolLM2 (MiniLM's is skipped), quantize a copy
of the model as ``qat-train`` would, export it in the packed format and report (``size_report``):
bits per quantized weight (codes + float16 scales/zeros/offsets + Tequila's bias), the file size,
and the file size over the theoretical size (grid bits x quantized weights / 8 + float16 scales
and zeros + unquantized tensors as stored; the done-when bound is 1.05). The packed file's
unquantized part is dominated by the float32 embedding table (113 MB), tied to the output head.

Exactness: the largest absolute difference between the logits of the fake-quantized model that was
exported (eval mode) and those of the model loaded back from the export (``qat.load_packed``), on
the first ``--tokens`` held-out tokens of the shipped corpus (the split ``ptq_baselines.py``
evaluates on), float32 on CPU; 0 means bitwise equal. The packed format stores weights only: for a
config with activation quantization the difference to the model as trained is reported, and, as
``exactness_weights_only``, the difference with its activation quantizers switched off.

    make install && .venv/bin/python benchmarks/export_size.py [--configs w4_lsq ternary_tequila] [--tokens 256]

Writes ``benchmarks/results/export_size.json`` (with ``--configs``, the named entries are replaced
and the others kept) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def measure(model, node, ids=None) -> dict:
    """Size report of ``node``'s packed export of ``model``; with held-out ``ids``, also its exactness."""
    import torch
    from hydra.utils import instantiate

    import qat
    from qat.export.packed import size_report

    factories = {k: instantiate(node[k]) for k in ("weight", "activation", "embedding") if node.get(k) is not None}
    quantized = qat.quantize_(copy.deepcopy(model), include=list(node.include), exclude=node.exclude, **factories)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        out = qat.export_(quantized, Path(tmp) / "export")
        seconds = time.perf_counter() - t0
        report = {**size_report(out), "export_seconds": round(seconds, 1)}
        if ids is not None:
            with torch.no_grad():
                loaded = qat.load_packed(out)(input_ids=ids).logits
                report.update(exactness(quantized.eval(), ids, loaded), exactness_tokens=ids.numel())
    return report


def exactness(model, ids, loaded_logits) -> dict:
    """Max |logits(model) - loaded_logits| (and with activation quantizers off, where there are any)."""
    import torch

    import qat

    def diff() -> float:
        with torch.no_grad():
            return (model(input_ids=ids).logits - loaded_logits).abs().max().item()

    result = {"exactness": diff()}
    acts = [layer.act_quantizer for _, layer in qat.quantized_layers(model) if getattr(layer, "act_quantizer", None) is not None]
    if acts:
        for q in acts:
            q.enabled = False
        result["exactness_weights_only"] = diff()
    return result


def main() -> None:
    from qat.config import config_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    configs = sorted(p.stem for p in (config_dir() / "quant").glob("*.yaml") if not p.stem.startswith("minilm"))  # MiniLM's quantizes a BERT encoder
    parser.add_argument("--configs", nargs="+", choices=configs, default=configs, metavar="NAME", help=f"a subset of {', '.join(configs)}")
    parser.add_argument("--tokens", type=int, default=256, help="held-out tokens for the exactness check (one block; 0: skip it)")
    args = parser.parse_args()

    import torch
    from omegaconf import OmegaConf

    from qat.corpus import shipped_text, token_blocks
    from qat.models import load_model

    torch.set_num_threads(1)
    model, tokenizer = load_model("smollm2-135m")
    ids = token_blocks(tokenizer, shipped_text(), args.tokens)[:1] if args.tokens else None  # the first block: the held-out split
    results = {}
    for name in args.configs:
        results[name] = measure(model, OmegaConf.load(config_dir() / "quant" / f"{name}.yaml"), ids)
        print(name, results[name], flush=True)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "export_size.json"
    if set(args.configs) != set(configs) and out.exists():  # a subset: the other entries stay as they were
        results = {**json.loads(out.read_text())["results"], **results}
        results = {k: results[k] for k in sorted(results)}
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"model": "smollm2-135m", "results": results}, indent=2) + "\n")
    os.replace(tmp, out)
    print("\n| quant config | bits per weight | packed MB | size / theoretical | max abs logit diff |\n|---|---|---|---|---|")
    for name, r in results.items():
        exact = f"{r['exactness']:.3g}" if "exactness" in r else "-"
        if "exactness_weights_only" in r:
            exact += f" (weights only: {r['exactness_weights_only']:.3g})"
        print(f"| {name} | {r['bits_per_weight']:.3f} | {r['file_bytes'] / 1e6:.1f} | {r['ratio']:.4f} | {exact} |")


if __name__ == "__main__":
    main()
