"""Dead-zone-trapped weights after a ternary run: which weights the dead zone held from start to end.

A ternary grid rounds a weight with ``|w| < Delta`` to 0; under the straight-through estimator such a
weight receives only the gradient of the output through a zero and tends to stay there ("trapped").
Tequila (arXiv 2509.23809) turns the dead-zone weights into a dynamic bias with a direct gradient,
so that they carry signal and can leave. For each finished run of the named recipes (the run
directories ``benchmarks/recipes.py`` recorded in ``benchmarks/results/recipes.json``) this compares
the codes of the round-to-nearest start (the pretrained weights under the run's quantizer config)
with the codes of the trained checkpoint, over all quantized weights:

    start_zero   |{Q(w_0) = 0}| / n            end_zero   |{Q(w_T) = 0}| / n
    trapped      |{Q(w_0) = 0 and Q(w_T) = 0}| / n      (in the dead zone from start to end)
    escaped      |{Q(w_0) = 0 and Q(w_T) != 0}| / n     entered  |{Q(w_0) != 0 and Q(w_T) = 0}| / n
    trapped_of_start = trapped / start_zero

Codes are ``quantizer.codes(w)``, the same rounding as the forward, the statistics callback and the
export.

    .venv/bin/python benchmarks/deadzone.py [smollm2_ternary_tequila smollm2_ternary_absmean]

Writes ``benchmarks/results/deadzone.json`` (one section per recipe) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, write_json  # noqa: E402

DEFAULT = ["smollm2_ternary_tequila", "smollm2_ternary_absmean"]


def measure(run_dir: Path) -> dict:
    """The dead-zone counts of one finished run (start: its quantizer config on the pretrained weights)."""
    import torch

    from qat.evaluate import _locate, build_model, load_config
    from qat.lit.callbacks import _latent

    run_dir, ckpt = _locate(run_dir)
    cfg = load_config(run_dir)
    trained, _, _ = build_model(cfg, ckpt)
    begin = dict(build_model(cfg, None)[0].named_modules())
    counts = dict.fromkeys(("n", "start_zero", "end_zero", "trapped", "escaped", "entered"), 0)
    with torch.no_grad():
        for name, layer in trained.named_modules():
            if getattr(layer, "weight_quantizer", None) is None:
                continue
            first = begin[name]
            z0 = first.weight_quantizer.codes(_latent(first)).dequantize() == 0
            z1 = layer.weight_quantizer.codes(_latent(layer)).dequantize() == 0
            counts["n"] += z0.numel()
            for key, mask in (("start_zero", z0), ("end_zero", z1), ("trapped", z0 & z1), ("escaped", z0 & ~z1), ("entered", ~z0 & z1)):
                counts[key] += int(mask.sum())
    n = counts["n"]
    out = {k: v / n for k, v in counts.items() if k != "n"}
    out["trapped_of_start"] = counts["trapped"] / counts["start_zero"]
    return {"run_dir": str(run_dir), "quantized_weights": n, "counts": counts, **out}


def table(r: dict) -> str:
    rows = ["| recipe | dead zone at start | at end | trapped (start and end) | of the start's | escaped | entered |", "|---|---|---|---|---|---|---|"]
    for name, v in r.items():
        rows.append(f"| `{name}` | {v['start_zero']:.5f} | {v['end_zero']:.5f} | {v['trapped']:.5f} | {v['trapped_of_start']:.4f} | "
                    f"{v['escaped']:.5f} | {v['entered']:.5f} |")
    n = next(iter(r.values()))["quantized_weights"] if r else 0
    rows.append(f"\nFractions of the {n:,} quantized weights (trapped of the start's: of the weights in the dead zone at the start); "
                "`.venv/bin/python benchmarks/deadzone.py` on the runs in `benchmarks/results/recipes.json`.")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="*", default=DEFAULT, help="recipes with a finished run in recipes.json")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    runs = json.loads((RESULTS / "recipes.json").read_text()) if (RESULTS / "recipes.json").exists() else {}
    missing = [n for n in args.recipes if "metrics" not in runs.get(n, {})]
    if missing:
        parser.error(f"no finished run of {missing} in {RESULTS / 'recipes.json'}: run benchmarks/recipes.py {' '.join(missing)} first")
    results = {}
    for name in args.recipes:
        results[name] = measure(Path(runs[name]["run_dir"]))
        write_json("deadzone", results[name], section=name)
    print(table(results))


if __name__ == "__main__":
    main()
