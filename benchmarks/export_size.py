"""Packed export size for each quantization config on the embedded SmolLM2-135M.

For every ``configs/quant/*.yaml`` that applies to SmolLM2 (MiniLM's is skipped), quantize a copy
of the model as ``qat-train`` would, export it in the packed format and report (``size_report``):
bits per quantized weight (codes + float16 scales/zeros/offsets + Tequila's bias), the file size,
and the file size over the theoretical size (grid bits x quantized weights / 8 + float16 scales
and zeros + unquantized tensors as stored; the done-when bound is 1.05). The packed file's
unquantized part is dominated by the float32 embedding table (113 MB), tied to the output head.

    make install && .venv/bin/python benchmarks/export_size.py

Writes ``benchmarks/results/export_size.json`` and prints a markdown table.
"""

from __future__ import annotations

import copy
import json
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def measure(model, node) -> dict:
    from hydra.utils import instantiate

    import qat
    from qat.export.packed import size_report

    factories = {k: instantiate(node[k]) for k in ("weight", "activation", "embedding") if node.get(k) is not None}
    quantized = qat.quantize_(copy.deepcopy(model), include=list(node.include), exclude=node.exclude, **factories)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        out = qat.export_(quantized, Path(tmp) / "export")
        seconds = time.perf_counter() - t0
        report = size_report(out)
    return {**report, "export_seconds": round(seconds, 1)}


def main() -> None:
    import torch
    from omegaconf import OmegaConf

    from qat.models import load_model

    torch.set_num_threads(1)
    model, _ = load_model("smollm2-135m")
    results = {}
    for path in sorted((ROOT / "configs" / "quant").glob("*.yaml")):
        if path.stem.startswith("minilm"):
            continue  # quantizes a BERT encoder's layers: not SmolLM2's
        results[path.stem] = measure(model, OmegaConf.load(path))
        print(path.stem, results[path.stem], flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "export_size.json").write_text(json.dumps({"model": "smollm2-135m", "results": results}, indent=2) + "\n")
    print("\n| quant config | bits per weight | packed MB | size / theoretical |\n|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['bits_per_weight']:.3f} | {r['file_bytes'] / 1e6:.1f} | {r['ratio']:.4f} |")


if __name__ == "__main__":
    main()
