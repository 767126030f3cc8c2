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

``--lam`` sweeps Tequila's ``lambda`` against plain absmean at a short budget (``--steps``, the same
data, schedule and seed in every run): ``qat-train recipe=smollm2_ternary_absmean`` and
``recipe=smollm2_ternary_tequila quant.weight.lam=L`` for each L, each with
``trainer.max_steps=STEPS``, run one after the other under ``--runs`` (a finished run there, one with
a ``metrics.json``, is measured again rather than retrained), then the counts above and the
held-out perplexity of each. Writes ``benchmarks/results/deadzone_lam.json``::

    .venv/bin/python benchmarks/deadzone.py --lam 1e-3,1e-2,1e-1,3e-1,5e-1,1 --steps 40   # ~5 min a run, 2 cores

``--seeds S1,S2,..`` repeats the sweep with ``seed=S`` (the order of the training batches; the
held-out split and the start do not change) to tell an effect from run-to-run noise: per seed the
difference of each Tequila run from the absmean run of the same seed, and over the seeds its mean and
standard deviation. Writes ``benchmarks/results/deadzone_seeds.json``::

    .venv/bin/python benchmarks/deadzone.py --lam 1e-3 --steps 40 --seeds 0,1,2
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

    from qat.config import build_model, load_run_config, locate_run
    from qat.lit.callbacks import _latent

    run_dir, ckpt = locate_run(run_dir)
    cfg = load_run_config(run_dir)
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


def grad_ratio(run_dir: Path, batch: int = 4, seq_len: int = 256) -> dict:
    """How strong Tequila's direct dead-zone gradient is against the straight-through one, at the run's start.

    On one training batch (blocks after the held-out ones) through the run's quantized start model,
    over the dead-zone weights D: ``mean |lam * sum_t g[t, j]|`` (Tequila's term: ``g`` the gradient
    at the layer's output) over ``mean |G_A[j, i]|`` (the gradient the weight gets through the
    ternary matrix, all that plain STE gives it). The ratio is linear in ``lam``.
    """
    import torch

    from qat.config import build_model, load_run_config, locate_run
    from qat.corpus import shipped_text, token_blocks

    run_dir, _ = locate_run(run_dir)
    cfg = load_run_config(run_dir)
    model, tokenizer, _ = build_model(cfg, None)
    layers = {n: m for n, m in model.named_modules() if getattr(m, "weight_quantizer", None) is not None}
    lam = next(iter(layers.values())).weight_quantizer.lam
    grads = {}
    for name, m in layers.items():
        m.register_full_backward_hook(lambda mod, gi, go, name=name: grads.__setitem__(name, go[0].detach()))
    ids = token_blocks(tokenizer, shipped_text(), seq_len)[100:100 + batch]
    model(input_ids=ids, labels=ids).loss.backward()
    direct = ste = 0.0
    with torch.no_grad():
        for name, m in layers.items():
            dead = m.weight_quantizer.codes(m.weight).dequantize() == 0
            term = (lam * grads[name].reshape(-1, grads[name].shape[-1]).sum(0))[:, None].expand_as(m.weight)
            direct += term[dead].abs().sum().item()
            ste += (m.weight.grad - term)[dead].abs().sum().item()
    return {"lam": lam, "tokens": batch * seq_len, "direct_over_ste": direct / ste}


def lam_table(r: dict) -> str:
    rows = ["| run | lambda | held-out perplexity | dead zone at end | trapped (start and end) | escaped | entered |",
            "|---|---|---|---|---|---|---|"]
    for name, v in r["runs"].items():
        rows.append(f"| {name} | {v['lam'] if v['lam'] is not None else '-'} | {v['ppl_qat']:.4g} | {v['end_zero']:.5f} | "
                    f"**{v['trapped']:.5f}** | {v['escaped']:.5f} | {v['entered']:.5f} |")
    g = r["grad_ratio"]
    rows.append(f"\nEvery run {r['steps']} steps x 4 x 256 tokens from the same round-to-nearest start (dead zone "
                f"{r['start_zero']:.5f} of the {r['quantized_weights']:,} quantized weights); `{r['command']}`. "
                f"Tequila's direct dead-zone gradient against the straight-through one on the same weights, at the start "
                f"(one {g['tokens']}-token batch, lambda {g['at_lam']:g}): {g['direct_over_ste']:.4f} (linear in lambda).")
    return "\n".join(rows)


def sweep(lams: list[str], steps: int, threads: int, runs: Path, seed: int = 0, ratio: bool = True) -> dict:
    """Plain absmean and Tequila at each ``lambda``, ``steps`` steps each; the dead-zone counts and perplexity.

    ``seed`` != 0 adds ``seed=SEED`` to every run (its directory gets a ``_seedSEED`` suffix).
    ``ratio``: also measure ``grad_ratio`` (a property of the start, the same for every seed).
    """
    from recipes import run

    variants = [("absmean", "smollm2_ternary_absmean", None)] + [(f"tequila lam={lam}", "smollm2_ternary_tequila", lam) for lam in lams]
    out = {"steps": steps, "seed": seed, "runs": {}}
    for label, recipe, lam in variants:
        overrides = [f"trainer.max_steps={steps}"] + ([f"quant.weight.lam={lam}"] if lam is not None else [])
        overrides += [f"seed={seed}"] if seed else []
        root = runs / (label.replace(" ", "_").replace("=", "") + (f"_seed{seed}" if seed else ""))
        run_dir = root / recipe
        if (run_dir / "metrics.json").exists():
            metrics = json.loads((run_dir / "metrics.json").read_text())
            command = " ".join([".venv/bin/qat-train", f"recipe={recipe}", f"threads={threads}", f"hydra.run.dir={run_dir}", *overrides]) + "  (reused)"
        else:
            entry = run(recipe, threads, overrides, root)
            if "metrics" not in entry:
                raise SystemExit(f"{label}: qat-train failed (exit {entry['returncode']}):\n{entry.get('error', '')}")
            run_dir, metrics, command = Path(entry["run_dir"]), entry["metrics"], entry["command"]
        counts = measure(run_dir)
        out["runs"][label] = {"recipe": recipe, "lam": float(lam) if lam is not None else None, "overrides": overrides,
                              "ppl_qat": metrics["ppl_qat"], "ppl_ptq": metrics["ppl_ptq"], "ppl_fp": metrics["ppl_fp"],
                              "run_dir": str(run_dir), "train_command": command,
                              **{k: counts[k] for k in ("start_zero", "end_zero", "trapped", "escaped", "entered", "trapped_of_start")}}
        out["start_zero"], out["quantized_weights"] = counts["start_zero"], counts["quantized_weights"]
        print(f"{label}: ppl {metrics['ppl_qat']:.4g}, trapped {counts['trapped']:.5f}", flush=True)
        if ratio and lam is not None and "grad_ratio" not in out:
            out["grad_ratio"] = grad_ratio(run_dir)
            out["grad_ratio"]["at_lam"] = out["grad_ratio"].pop("lam")
    return out


def across_seeds(sweeps: list[dict]) -> dict:
    """Per seed, each Tequila run minus the absmean run of that seed; over the seeds, mean and sample sd."""
    import statistics

    def stats(xs: list[float]) -> dict:
        return {"mean": statistics.fmean(xs), "sd": statistics.stdev(xs) if len(xs) > 1 else 0.0, "values": xs}

    keys = ("ppl_qat", "trapped", "escaped", "end_zero")
    labels = list(sweeps[0]["runs"])
    out = {"steps": sweeps[0]["steps"], "seeds": [s["seed"] for s in sweeps], "start_zero": sweeps[0]["start_zero"],
           "quantized_weights": sweeps[0]["quantized_weights"], "per_seed": sweeps, "summary": {}}
    for label in labels:
        row = {k: stats([s["runs"][label][k] for s in sweeps]) for k in keys}
        if label != "absmean":
            row["minus_absmean"] = {k: stats([s["runs"][label][k] - s["runs"]["absmean"][k] for s in sweeps]) for k in keys}
        out["summary"][label] = row
    return out


def seeds_table(r: dict) -> str:
    rows = ["| run | held-out perplexity | trapped (start and end) | escaped | minus absmean, same seed: perplexity | trapped |",
            "|---|---|---|---|---|---|"]
    for label, v in r["summary"].items():
        d = v.get("minus_absmean")
        diff = (f"{d['ppl_qat']['mean']:+.4g} ± {d['ppl_qat']['sd']:.3g} | {d['trapped']['mean']:+.5f} ± {d['trapped']['sd']:.5f}"
                if d else "- | -")
        rows.append(f"| {label} | {v['ppl_qat']['mean']:.4g} ± {v['ppl_qat']['sd']:.3g} | {v['trapped']['mean']:.5f} ± "
                    f"{v['trapped']['sd']:.5f} | {v['escaped']['mean']:.5f} ± {v['escaped']['sd']:.5f} | {diff} |")
    rows.append(f"\nMean ± sample standard deviation over seeds {r['seeds']} (the order of the training batches), "
                f"{r['steps']} steps x 4 x 256 tokens each from the same round-to-nearest start; trapped and escaped are "
                f"fractions of the {r['quantized_weights']:,} quantized weights; `{r['command']}`.")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="*", default=DEFAULT, help="recipes with a finished run in recipes.json")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lam", help="comma-separated Tequila lambdas: sweep them against absmean (see the module docstring)")
    parser.add_argument("--steps", type=int, default=40, help="--lam: optimizer steps of every run")
    parser.add_argument("--runs", type=Path, default=Path(__file__).resolve().parent.parent / "outputs" / "bench_deadzone",
                        help="--lam: where the runs go (finished ones are reused)")
    parser.add_argument("--seeds", help="--lam: comma-separated seeds (batch order) to repeat the sweep with, e.g. 0,1,2")
    args = parser.parse_args()
    lams = args.lam.split(",") if args.lam else []
    try:
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else []
    except ValueError:
        parser.error(f"--seeds: {args.seeds!r} is not a list of integers; give e.g. --seeds 0,1,2")
    if seeds and not lams:
        parser.error("--seeds repeats a --lam sweep: give --lam too, e.g. --lam 1e-3 --seeds 0,1,2")
    for lam in lams:
        try:
            float(lam)
        except ValueError:
            parser.error(f"--lam: {lam!r} is not a number; give e.g. --lam 1e-3,1e-1")
    import torch

    torch.set_num_threads(args.threads)
    if seeds:
        sweeps = [sweep(lams, args.steps, args.threads, args.runs, s, ratio=False) for s in seeds]
        result = across_seeds(sweeps)
        result["command"] = f".venv/bin/python benchmarks/deadzone.py --lam {args.lam} --steps {args.steps} --seeds {args.seeds}"
        write_json("deadzone_seeds", result)
        print(seeds_table(result))
        return
    if lams:
        result = sweep(lams, args.steps, args.threads, args.runs)
        result["command"] = f".venv/bin/python benchmarks/deadzone.py --lam {args.lam} --steps {args.steps}"
        write_json("deadzone_lam", result)
        print(lam_table(result))
        return
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
