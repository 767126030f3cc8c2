"""Packed export size for each quantization config on the embedded SmolLM2-135M, against float16.

For every ``configs/quant/*.yaml`` that applies to SmolLM2 (MiniLM's is skipped), quantize a copy
of the model as ``qat-train`` would, export it in the packed format (unquantized tensors in the
model's 16-bit dtype, the default of ``qat.export_``) and report (``size_report``): bits per
quantized weight (codes + float16 scales/zeros/offsets + Tequila's bias), the whole file's size,
the file over the theoretical size (grid bits x quantized weights / 8 + float16 scales and zeros +
unquantized tensors as stored), and the file over the float16 model's file (``ratio_to_fp16``: the
FP model saved here as float16 safetensors with ``save_pretrained``, the tied head once; the main
recipe's done-when bound is 0.35). ``--embedding-bits 8`` adds, for each config, a variant
``NAME+emb8`` with the token embedding (and the head tied to it) quantized as
``quant.embedding`` would (8 bits per row; 4 bits in groups of 32).

Exactness, on the model loaded back (``qat.load_packed``): ``quantized_exact`` counts the quantized
tensors (each layer's weight and Tequila's bias) whose dequantized value equals the fake-quantized
one of the exported model (eval mode) bitwise, out of ``quantized_tensors``; ``exactness`` is the
largest absolute logit difference on the first ``--tokens`` held-out tokens of the shipped corpus
(the split ``ptq_baselines.py`` evaluates on), float32 on CPU, against the exported model with its
unquantized tensors rounded to the stored dtype, as the file holds them (0: bitwise equal);
``logit_diff_fp32`` is the same against the model as it was, unquantized tensors in float32. The
packed format stores weights only: for a config with activation quantization the logit differences
are reported with its activation quantizers switched off.

    make install && .venv/bin/python benchmarks/export_size.py [--configs w4_lsq ternary_seq_g64] [--embedding-bits 8]

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


EMBEDDINGS = {  # --embedding-bits: the quant.embedding node of each variant
    8: {"_target_": "qat.quantizers.MinMax", "_partial_": True, "bits": 8, "granularity": "channel"},
    4: {"_target_": "qat.quantizers.MinMax", "_partial_": True, "bits": 4, "granularity": "group", "group_size": 32},
}


def measure(model, node, ids=None) -> dict:
    """Size report of ``node``'s packed export of ``model``; with held-out ``ids``, also its exactness."""
    from hydra.utils import instantiate

    import qat
    from qat.export.packed import size_report

    factories = {k: instantiate(node[k]) for k in ("weight", "activation", "embedding") if node.get(k) is not None}
    quantized = qat.quantize_(copy.deepcopy(model), include=list(node.include), exclude=node.exclude, **factories).eval()
    for _, layer in qat.quantized_layers(quantized):
        if getattr(layer, "act_quantizer", None) is not None:
            layer.act_quantizer.enabled = False  # the packed model is the weight-only model
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        out = qat.export_(quantized, Path(tmp) / "export")
        seconds = time.perf_counter() - t0
        report = {**size_report(out), "export_seconds": round(seconds, 1)}
        report["unquantized_dtype"] = json.loads((out / "quant_config.json").read_text())["unquantized_dtype"]
        loaded = qat.load_packed(out)
        report.update(quantized_exactness(quantized, loaded))
        if ids is not None:
            report.update(logit_exactness(quantized, loaded, out, ids), exactness_tokens=ids.numel())
    return report


def quantized_exactness(model, loaded) -> dict:
    """How many quantized tensors (weights, Tequila's biases) ``loaded`` rebuilds bitwise."""
    import torch

    import qat

    total = exact = 0
    with torch.no_grad():
        for name, layer in qat.quantized_layers(model):
            if layer.weight_quantizer is None:
                continue
            if isinstance(layer, qat.QuantLinear):
                w_hat, extra = layer.quantized_weight()
            else:
                w_hat, extra = layer.weight_quantizer(layer.weight), None
            packed = loaded.get_submodule(name)
            pairs = [(w_hat, packed.dequantized_weight())]
            if extra is not None:
                pairs.append((extra, packed.extra_bias))
            total += len(pairs)
            exact += sum(torch.equal(a, b) for a, b in pairs)
    return {"quantized_tensors": total, "quantized_exact": exact}


def logit_exactness(model, loaded, out, ids) -> dict:
    """Max |logits| differences of ``loaded`` to ``model`` with its stored tensors rounded as the file holds them, and as it was."""
    import torch
    from safetensors import safe_open

    from qat.export.packed import _SAFETENSORS_DTYPES

    with torch.no_grad():
        logits = loaded(input_ids=ids).logits
        as_was = (model(input_ids=ids).logits - logits).abs().max().item()
        rounded = copy.deepcopy(model)
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            stored = {k: _SAFETENSORS_DTYPES[f.get_slice(k).get_dtype()] for k in f.keys()}
        for key, t in rounded.state_dict().items():
            if key in stored and t.is_floating_point():
                t.copy_(t.to(stored[key]).to(t.dtype))
        diff = (rounded(input_ids=ids).logits - logits).abs().max().item()
    return {"exactness": diff, "logit_diff_fp32": as_was}


def fp16_file_bytes(model) -> int:
    """Size of the FP model's ``model.safetensors`` saved in float16 (``save_pretrained``: the tied head once)."""
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        copy.deepcopy(model).to(torch.float16).save_pretrained(tmp)
        return sum(f.stat().st_size for f in Path(tmp).glob("*.safetensors"))


def main() -> None:
    from qat.config import config_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    configs = sorted(p.stem for p in (config_dir() / "quant").glob("*.yaml") if not p.stem.startswith("minilm"))  # MiniLM's quantizes a BERT encoder
    parser.add_argument("--configs", nargs="+", choices=configs, default=configs, metavar="NAME", help=f"a subset of {', '.join(configs)}")
    parser.add_argument("--tokens", type=int, default=256, help="held-out tokens for the exactness check (one block; 0: skip it)")
    parser.add_argument("--embedding-bits", type=int, nargs="*", choices=sorted(EMBEDDINGS), default=[],
                        help="also measure each config with the token embedding (and its tied head) quantized to these bits")
    args = parser.parse_args()

    import torch
    from omegaconf import OmegaConf

    from qat.corpus import shipped_text, token_blocks
    from qat.models import load_model

    torch.set_num_threads(1)
    model, tokenizer = load_model("smollm2-135m")
    ids = token_blocks(tokenizer, shipped_text(), args.tokens)[:1] if args.tokens else None  # the first block: the held-out split
    fp16 = fp16_file_bytes(model)
    print("float16 model file", fp16, flush=True)
    results = {}
    for name in args.configs:
        node = OmegaConf.load(config_dir() / "quant" / f"{name}.yaml")
        variants = {name: node}
        for bits in args.embedding_bits:
            variants[f"{name}+emb{bits}"] = OmegaConf.merge(node, {"embedding": EMBEDDINGS[bits]})
        for key, variant in variants.items():
            results[key] = measure(model, variant, ids)
            results[key]["ratio_to_fp16"] = results[key]["file_bytes"] / fp16
            print(key, results[key], flush=True)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "export_size.json"
    if set(args.configs) != set(configs) and out.exists():  # a subset: the other entries stay as they were
        old = json.loads(out.read_text())["results"]
        results = {**{k: v for k, v in old.items() if "ratio_to_fp16" in v}, **results}  # entries of the float32 era go
        results = {k: results[k] for k in sorted(results)}
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"model": "smollm2-135m", "fp16_file_bytes": fp16, "results": results}, indent=2) + "\n")
    os.replace(tmp, out)
    print(f"\nfloat16 model file: {fp16 / 1e6:.1f} MB")
    print("| quant config | bits per weight | packed MB | / float16 | size / theoretical | quantized tensors exact | max abs logit diff |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        exact = f"{r['exactness']:.3g}" if "exactness" in r else "-"
        print(f"| {name} | {r['bits_per_weight']:.3f} | {r['file_bytes'] / 1e6:.1f} | {r['ratio_to_fp16']:.3f} | {r['ratio']:.4f} | "
              f"{r['quantized_exact']}/{r['quantized_tensors']} | {exact} |")


if __name__ == "__main__":
    main()
