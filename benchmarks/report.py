"""Write the measured tables of ``docs/RESULTS.md`` and ``README.md`` from the JSON files the benchmarks wrote.

Each table sits between ``<!-- results:NAME -->`` and ``<!-- /results:NAME -->`` in either file and
is regenerated from ``benchmarks/results/NAME.json`` (``SOURCES`` maps the tables that read another
table's file); a missing file leaves its table as it is. The accuracy target of a recipe is its
YAML's ``target:`` (``recipe_target``), checked on the recipe's default run.

    .venv/bin/python benchmarks/report.py
"""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def ptq_baselines(r: dict) -> str:
    fp = r["perplexity"]["fp32"]
    rows = ["| weights (210 decoder linears) | held-out perplexity | x FP |", "|---|---|---|"]
    for name, ppl in r["perplexity"].items():
        rows.append(f"| {name} | {ppl:.4g} | {ppl / fp:.3g} |")
    rows.append(f"\n{r['heldout_tokens']} held-out tokens, torch {r['torch']}.")
    return "\n".join(rows)


def overhead(r: dict) -> str:
    s = r["summary"]
    rows = ["| step | time (s) | step peak memory increase (MB) | process peak RSS (MB) |", "|---|---|---|---|"]
    for name, label in (("fp", "none (plain nn.Linear)"), ("lsq_w4g32", "LSQ w4 g32")):
        v = s[name]
        rows.append(f"| {label} | {v['step_s']:.2f} | {v['step_peak_increase_mb']:.0f} | {v['process_peak_rss_mb']:.0f} |")
    rows.append(
        f"| **ratio** | **{r['time_ratio']:.2f}x** | {r['step_memory_ratio']:.2f}x | **{r['peak_rss_ratio']:.2f}x** |\n\n"
        f"Allocator: {r['allocator']}; {r['repeats']} interleaved repeats, {r['threads']} threads, torch {r['torch']}."
    )
    return "\n".join(rows)


def peers_overhead(r: dict) -> str:
    t = r["step_s"]
    rows = ["| weight fake quantization (210 decoder linears, w4 sym g32) | step (s) | x none |", "|---|---|---|"]
    for name, label in (("fp", "none"), ("ours", "ours: LSQ"), ("torchao", f"torchao {r['torchao']}: QATConfig, IntxFakeQuantizeConfig")):
        rows.append(f"| {label} | {t[name]:.2f} | {t[name] / t['fp']:.2f}x |")
    rows.append(f"\nTarget: our overhead <= torchao's: **{'met' if r['met'] else 'not met'}** "
                f"(ours {r['ours_over_fp']:.2f}x, torchao {r['torchao_over_fp']:.2f}x). Batch {r['batch']} x {r['seq_len']}, "
                f"{r['device']}, float32, median of {r['repeats']} interleaved repeats, {r['threads']} threads; "
                f"allocator: {r['allocator']}; torch {r['torch']}.")
    return "\n".join(rows)


def overhead_fp4(r: dict) -> str:
    """``overhead_nvfp4.json`` / ``overhead_mxfp4.json`` (``benchmarks/overhead.py --format FORMAT``)."""
    t = r["step_s"]
    ao = f"torchao {r['torchao']}: {r['torchao_row'].removeprefix('torchao ')}" if r.get("torchao") else "torchao (not installed)"
    rows = [f"| weight fake quantization (210 decoder linears, {r['format']}) | step (s) | x none |", "|---|---|---|"]
    for name, label in (("fp", "none"), ("ours", f"ours: recipe `{r['ours_recipe']}`"), ("torchao", ao)):
        if name in t:
            rows.append(f"| {label} | {t[name]:.2f} | {t[name] / t['fp']:.2f}x |")
    verdict = "not measured" if r["met"] is None else ("met" if r["met"] else "not met")
    tao = "-" if r["torchao_over_fp"] is None else f"{r['torchao_over_fp']:.2f}x"
    rows.append(f"\nTarget: our overhead <= torchao's: **{verdict}** (ours {r['ours_over_fp']:.2f}x, torchao {tao}). Batch {r['batch']} x "
                f"{r['seq_len']}, {r['device']}, float32, median of {r['repeats']} interleaved repeats, {r['threads']} threads; "
                f"allocator: {r['allocator']}; torch {r['torch']}. `.venv/bin/python benchmarks/overhead.py --format {r['format']}`.")
    return "\n".join(rows)


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def memory_table(result: dict) -> str:
    """One variant of ``benchmarks/results/memory.json`` (also printed by ``benchmarks/memory.py``)."""
    rows = ["| mode | peak RSS (MB) | x inference | x full QAT | target | met | trained params |", "|---|---|---|---|---|---|---|"]
    for mode, v in result["modes"].items():
        t = result["targets"].get(mode)
        target = f"<= {t['at_most']}x {t['of'].replace('_', ' ')}" if t else ""
        met = result["meets_targets"].get(mode)
        rows.append(f"| {mode} | {v['peak_rss_mb']:.0f} | {_ratio(v['ratio_to_inference'])} | {_ratio(v['ratio_to_full_qat'])} | "
                    f"{target} | {'' if met is None else ('yes' if met else '**no**')} | {v['trained_params']:,} |")
    return "\n".join(rows)


_MEMORY_VARIANTS = {
    "activations_kept": "activations kept for the backward",
    "activations_kept_chunked_loss": "chunked loss",
    "checkpointed": "activation checkpointing (backprop modes)",
    "checkpointed_chunked_loss": "activation checkpointing (backprop modes) and chunked loss",
}


def memory(r: dict) -> str:
    parts = []
    for variant, v in r.items():
        chunk = f", {v['chunked_loss_tokens']} tokens a chunk" if v.get("chunked_loss_tokens") else ""
        parts.append(f"*{_MEMORY_VARIANTS.get(variant, variant)}{chunk}*: batch {v['batch']} x {v['seq_len']}, "
                     f"{v['steps']} steps, {v['threads']} threads, torch {v['torch']}.\n\n{memory_table(v)}")
    return "\n\n".join(parts)


def _recipes_by_quant() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for path in sorted((ROOT / "recipes" / "experiment").glob("*.yaml")):
        m = re.search(r"override /quant: (\S+)", path.read_text())
        found.setdefault(m.group(1) if m else "ternary_tequila", []).append(path.stem)  # no override: the default
    return found


def export_size(r: dict) -> str:
    recipes = _recipes_by_quant()
    rows = ["| quant config | recipes | bits per quantized weight | packed file (MB) | / float16 model | file / theoretical | "
            "quantized tensors bitwise | max abs logit diff: loaded vs exported (vs float32) |", "|---|---|---|---|---|---|---|---|"]
    for name, v in r["results"].items():
        base, _, variant = name.partition("+")
        used = ", ".join(f"`{x}`" for x in recipes.get(base, [])) or "-"
        label = f"`{base}`" + (" + 8-bit embedding" if variant == "emb8" else f" + {variant}" if variant else "")
        exact = f"{v['exactness']:.3g}" if "exactness" in v else "-"
        if "logit_diff_fp32" in v:
            exact += f" ({v['logit_diff_fp32']:.2g})"
        tensors = f"{v['quantized_exact']}/{v['quantized_tensors']}" if "quantized_tensors" in v else "-"
        fp16 = f"**{v['ratio_to_fp16']:.3f}x**" if "ratio_to_fp16" in v else "-"
        rows.append(f"| {label} | {used if not variant else '-'} | {v['bits_per_weight']:.3f} | {v['file_bytes'] / 1e6:.1f} | {fp16} | "
                    f"{v['ratio']:.4f} | {tensors} | {exact} |")
    dtypes = sorted({v.get("unquantized_dtype", "float32") for v in r["results"].values()})
    rows.append(f"\nThe float16 model (safetensors, same script): {r['fp16_file_bytes'] / 1e6:.1f} MB. Bits per quantized weight: codes, "
                f"scales, zero points, offsets and the Tequila bias. Unquantized tensors (the tied embedding table unless quantized) "
                f"stored in {', '.join(dtypes)}. Logit difference: `qat.load_packed` of the export against the fake-quantized model "
                "with its plain tensors rounded as stored (0: bitwise), in brackets against the float32 model; float32 CPU, "
                f"{'/'.join(map(str, sorted({v['exactness_tokens'] for v in r['results'].values() if 'exactness_tokens' in v})))} "
                "held-out tokens. `.venv/bin/python benchmarks/export_size.py --embedding-bits 8`.")
    return "\n".join(rows)


def peers_accuracy(r: dict) -> str:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from peers_accuracy import table  # the benchmark prints the same table

    return table(r) + ("\n\nA partial run (`--only` / `--methods`): not every width or method." if r.get("partial") else "")


def peers_fp4(r: dict) -> str:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from peers_fp4 import table  # the benchmark prints the same table

    return table(r) + ("\n\nA partial run (`--only` / `--methods`): not every format or method." if r.get("partial") else "")


def peers_fp4_short(r: dict) -> str:
    """The README's FP4 table: per format, ours against torchao's best row on both texts, and the step cost of each
    (``overhead_FORMAT.json``, ``benchmarks/overhead.py --format FORMAT``)."""
    rows = ["| format | method | held out: RTN -> QAT | out of domain: RTN -> QAT | gap recovered (held out / OOD) | step x none |",
            "|---|---|---|---|---|---|"]
    fp = r["fp"]
    for fk, f in r["formats"].items():
        over = RESULTS / f"overhead_{fk}.json"
        cost = json.loads(over.read_text()) if over.exists() else {}
        ao = [k for k, row in f["rows"].items() if k.startswith("torchao") and row.get("status") == "ok"]
        best = min(ao, key=lambda k: f["rows"][k]["texts"]["ood"]["qat"]) if ao else None
        for key in ("ours", best):
            row = f["rows"].get(key) if key else None
            if not row or row.get("status") != "ok":
                continue
            t = row["texts"]
            step = cost.get(f"{'ours' if key == 'ours' else 'torchao'}_over_fp")
            rows.append(f"| {fk} | {row['label']} | {_num(f['rtn']['heldout'])} -> **{_num(t['heldout']['qat'])}** | "
                        f"{_num(f['rtn']['ood'])} -> **{_num(t['ood']['qat'])}** | {_num(t['heldout']['gap_recovered'], '.0%')} / "
                        f"{_num(t['ood']['gap_recovered'], '.0%')} | {_ratio(step)} |")
    s = r["settings"]
    verdicts = "; ".join(f"{fk}: {'ours ahead on both texts' if t.get('met') else 'not ahead on both texts' if t.get('met') is False else 'not measured'}"
                         for fk, t in r["targets"].items())
    rows.append(f"\nSmolLM2-135M, FP4 weights on the 210 decoder linears, {s['batch']} x {s['seq_len']} tokens a step, "
                f"steps {', '.join(f'{k} {v}' for k, v in s['steps'].items())}, same batches and seed for every row; FP {_num(fp['heldout'])} "
                f"held out, {_num(fp['ood'])} out of domain ({s['heldout_tokens']} tokens each); gap recovered from the format's "
                f"min-max round-to-nearest (RTN) to FP (above 100%: below FP, the training text's doing, alike for every row); step x none: "
                f"a training step's time over the unquantized model's, interleaved (`benchmarks/overhead.py --format F`). {verdicts}. "
                f"`.venv/bin/python benchmarks/peers_fp4.py"
                f"{' --full' if r.get('preset') == 'full' else ''}`; every row and torchao's setup: [docs/RESULTS.md](docs/RESULTS.md#fp4-against-torchao).")
    return "\n".join(rows)


def deadzone(r: dict) -> str:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from deadzone import table  # the benchmark prints the same table

    return table(r)


def deadzone_lam(r: dict) -> str:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from deadzone import lam_table

    return lam_table(r)


def deadzone_seeds(r: dict) -> str:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from deadzone import seeds_table

    return seeds_table(r)


def _weights(quant: dict) -> str:
    """A short name of a run's quantization config (``metrics.json``'s ``quant``); per-layer rules (a plan) say so."""
    if quant.get("rules"):
        from collections import Counter

        rules = quant["rules"]
        widths = Counter(_weights({"weight": r.get("weight")}) if r.get("weight") else "float" for r in rules)
        return "mixed, " + ", ".join(f"{n} x {w}" for w, n in widths.most_common())
    w = quant.get("weight") or {}
    name = w.get("_target_", "").rsplit(".", 1)[-1]
    group = f"g{w['group_size']}" if w.get("granularity") == "group" else w.get("granularity", "")
    if name == "Ternary":
        return " ".join(p for p in ("ternary", w.get("method", ""), group, w.get("deadzone") or "") if p)
    a = quant.get("activation")
    if name in ("FP4", "FP8"):  # floating point: the format names the grid
        act = f" + a {a.get('format', '')}" if a else ""
        return f"{w.get('format', name)} {w.get('scale', '')}".strip().replace("_", "-") + act
    bits = f"w{w.get('bits')}"
    parts = [name, w.get("method", ""), bits, "asym" if w.get("symmetric") is False or w.get("offset") else "", group, w.get("deadzone") or ""]
    if a:
        parts.append(f"+ a{a.get('bits')} {a.get('_target_', '').rsplit('.', 1)[-1]}")
    return " ".join(p for p in parts if p)


_RELATIONS = {"at_most": (lambda a, b: a <= b, "<="), "below": (lambda a, b: a < b, "<"), "at_least": (lambda a, b: a >= b, ">=")}


def recipe_target(name: str) -> dict | None:
    """The ``target:`` of recipe ``name``'s YAML: ``{"what": str, "checks": [...]}``, or None.

    Each check is ``{metric, over?, at_most | below | at_least}``: ``metric`` a key of the run's
    ``metrics.json``; ``over`` (optional) divides it by another key of the same run, or, as
    ``recipe:NAME``, by the same metric of that recipe's default run.

    >>> recipe_target("smollm2_w4_lsq")["checks"]
    [{'metric': 'gap_recovered_ood', 'at_least': 0.9}]
    """
    import yaml

    from qat.config import recipes_dir

    path = recipes_dir() / "experiment" / f"{name}.yaml"
    target = (yaml.safe_load(path.read_text()) or {}).get("target") if path.is_file() else None
    if target is None:
        return None
    for check in target["checks"]:
        if len(set(check) & set(_RELATIONS)) != 1:
            raise ValueError(f"{path}: target check {check} needs exactly one of {sorted(_RELATIONS)}")
    return target


def target_met(target: dict, m: dict, r: dict) -> bool | None:
    """Whether every check of ``target`` holds for metrics ``m`` (all runs ``r``); None where a value is missing."""
    for check in target["checks"]:
        value, over = m.get(check["metric"]), check.get("over")
        if over is not None:
            ref = _qat_of(r, over.split(":", 1)[1], check["metric"]) if over.startswith("recipe:") else m.get(over)
            value = None if value is None or not ref else value / ref
        if value is None:
            return None
        (name,) = set(check) & set(_RELATIONS)
        if not _RELATIONS[name][0](value, check[name]):
            return False
    return True


def _qat_of(r: dict, name: str, metric: str) -> float | None:
    return (r.get(name, {}).get("metrics") or {}).get(metric)


def _order(item: tuple[str, dict]) -> tuple:
    """Rows by model, then width (ternary first), then name."""
    key, e = item
    w = ((e.get("metrics") or {}).get("quant") or {}).get("weight") or {}
    bits = 1.58 if w.get("_target_", "").endswith("Ternary") else float(w.get("bits") or 99)
    return (not key.startswith("smollm2"), bits, key)


def _num(x: float | None, fmt: str = ".4g") -> str:
    return "-" if x is None else format(x, fmt)


def _gap(m: dict, suffix: str) -> str:
    """``gap vs FP / gap vs FP fine-tuned`` of one text, in percent."""
    g = [m.get(f"gap_recovered{ref}{suffix}") for ref in ("", "_fp_ft")]
    return " / ".join("-" if v is None else f"{v:.0%}" for v in g)


def _device(e: dict) -> str:
    mach = e.get("machine", {})
    return mach.get("gpu") or f"{mach.get('cpus')} CPUs"


def recipes(r: dict) -> str:
    rows = ["| recipe | weights | steps (tokens) | held-out: FP-ft | PTQ (RTN) | **QAT** | x FP | gap recovered vs FP / FP-ft "
            "| out-of-domain: FP-ft | PTQ (RTN) | **QAT** | x FP | gap recovered vs FP / FP-ft | target | met | wall | peak RSS | device |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    failed = []
    for key, e in sorted(r.items(), key=_order):
        m = e.get("metrics")
        if not m:
            failed.append(f"`{key}` (exit {e.get('returncode')})")
            continue
        metric = "ppl" if "ppl_qat" in m else "cos"
        label = key.split(" ", 1)
        name = f"`{label[0]}`" + (f" ({label[1]})" if len(label) > 1 else "")
        target, met = "", ""
        goal = recipe_target(label[0]) if len(label) == 1 else None
        if goal is not None:
            target, ok = goal["what"], target_met(goal, m, r)
            met = "-" if ok is None else ("yes" if ok else "**no**")
        cells = []
        for t in ("", "_ood"):
            fp, ft, ptq, q = (m.get(f"{metric}_{n}{t}") for n in ("fp", "fp_ft", "ptq", "qat"))
            if metric == "cos":
                cells += ["-", f"cos {_num(ptq, '.4f')}", f"**cos {_num(q, '.4f')}**", "-", _gap(m, t)]
            else:
                cells += [_num(ft), _num(ptq), f"**{_num(q)}**", f"{q / fp:.2f}" if q and fp else "-", _gap(m, t)]
        rows.append(f"| {name} | {_weights(m.get('quant', {}))} | {m['steps']} ({m['tokens'] // 1000}k) | {' | '.join(cells)} | {target} | {met} | "
                    f"{m['seconds']:.0f} s | {m.get('peak_rss_mb', 0) / 1000:.1f} GB | {_device(e)} |")
    fp_in = next((e["metrics"].get("ppl_fp") for e in r.values() if e.get("metrics", {}).get("ppl_fp")), None)
    fp_ood = next((e["metrics"].get("ppl_fp_ood") for e in r.values() if e.get("metrics", {}).get("ppl_fp_ood")), None)
    machines = {f"{_device(e)}, torch {e['machine']['torch']}" for e in r.values() if "machine" in e}
    rows.append(f"\nFP: held-out {_num(fp_in, '.2f')} (the first 20,480 tokens of the shipped text, the training corpus), out of domain "
                f"{_num(fp_ood, '.2f')} (the first 20,480 tokens of Debian's common licences, never trained on). FP-ft: the FP model "
                "fine-tuned with the recipe's data, steps and schedule (`eval.fp_finetune=true`), the fair reference; gap recovered: "
                "`(log PTQ - log QAT) / (log PTQ - log reference)`. MiniLM: mean cosine of the sentence embeddings to the FP model's "
                f"on held-out sentences. Machines: {'; '.join(sorted(machines))}. Each run: `.venv/bin/python benchmarks/recipes.py NAME` "
                "(the exact `qat-train` command is in `benchmarks/results/recipes.json`).")
    if failed:
        rows.append(f"Failed runs: {', '.join(failed)}.")
    return "\n".join(rows)


def _backprop(recipe: str) -> bool:
    """Whether the recipe trains with backprop (the FP fine-tune reference exists only for those)."""
    from hydra.utils import get_class

    from qat.config import compose

    return not getattr(get_class(compose([f"recipe={recipe}"]).module._target_), "forward_only", False)


def headline(r: dict) -> str:
    """The README's short table: each recipe's default run measured on both texts with the FP fine-tuned reference, out of
    domain first; then, for each target missed, the variants of that recipe tried on the same grid (other steps or
    objective) and how far each got out of domain. The other runs are in docs/RESULTS.md's full table."""
    rows = ["| recipe | weights | steps | out of domain: QAT (x FP) | gap recovered | held out: QAT (x FP) | FP fine-tuned: held out / OOD "
            "| target | met |", "|---|---|---|---|---|---|---|---|---|"]
    older, missed = [], []
    for key, e in sorted(r.items(), key=_order):
        m = e.get("metrics")
        if " " in key or not m or "ppl_qat" not in m:
            continue
        if m.get("ppl_qat_ood") is None or (m.get("ppl_fp_ft") is None and _backprop(key)):
            older.append(f"`{key}`")
            continue
        cells = []
        for t in ("_ood", ""):
            q, fp = m.get(f"ppl_qat{t}"), m.get(f"ppl_fp{t}")
            cells.append(f"{_num(q)} ({q / fp:.2f}x)" if q and fp else "-")
        goal = recipe_target(key)
        ok = target_met(goal, m, r) if goal else None
        met = "" if goal is None else "-" if ok is None else ("yes" if ok else "**no**")
        if ok is False:
            missed.append(f"`{key}` ({goal['what']}; default {_variant(e)}): " + (", ".join(_tried(key, r)) or "no variant yet"))
        gap = m.get("gap_recovered_ood")
        rows.append(f"| `{key}` | {_weights(m.get('quant', {}))} | {m['steps']} | **{cells[0]}** | {_num(gap, '.0%') if gap is not None else '-'} | "
                    f"{cells[1]} | {_num(m.get('ppl_fp_ft'))} / {_num(m.get('ppl_fp_ft_ood'))} | {goal['what'] if goal else ''} | {met} |")
    rows.append("\nPerplexity, SmolLM2-135M on 2 CPU cores; out of domain: Debian's licences, never trained on; gap recovered: "
                "`(log PTQ - log QAT) / (log PTQ - log FP)` out of domain; FP fine-tuned: the FP model trained with the same data, steps "
                "and schedule, the fair reference for a QAT result below FP (a forward-only recipe has none: that reference trains with backprop). "
                + (f"Measured before the out-of-domain text and the FP fine-tune existed, in-domain only, being re-measured: "
                   f"{', '.join(older)}. " if older else "")
                + ("Targets missed, and what else was tried on the same grid (out of domain, x FP): " + "; ".join(missed) + ". "
                   if missed else "")
                + "Every run, its FP fine-tuned reference and the variants: [docs/RESULTS.md](docs/RESULTS.md).")
    return "\n".join(rows)


def _variant(e: dict) -> str:
    """``55 KD steps (56k tokens): 22.2x``: a run's steps, objective, tokens and out-of-domain perplexity over FP's."""
    m = e["metrics"]
    tokens = f" ({m['tokens'] / 1000:.0f}k tokens)" if m.get("tokens") else ""
    return f"{m['steps']} {'KD' if _distilled(e) else 'label'} steps{tokens}: {m['ppl_qat_ood'] / m['ppl_fp_ood']:.1f}x"


def _own_grid(key: str, e: dict) -> bool:
    """Whether a run of ``recipes.json`` kept its recipe's quantization (no per-layer rules, no ``quant`` override)."""
    overrides = key.split()[1:]
    return not (e.get("metrics") or {}).get("quant", {}).get("rules") and not any("quant" in o.split("=", 1)[0] for o in overrides)


def _tried(recipe: str, r: dict) -> list[str]:
    """The variants of ``recipe`` on its own grid (overrides that leave ``quant`` alone), each as ``_variant`` says."""
    out = []
    for key, e in sorted(r.items(), key=lambda kv: kv[1].get("metrics", {}).get("steps", 0)):
        m = e.get("metrics") or {}
        words = key.split(" ")
        if words[0] != recipe or all(w.startswith("eval.") for w in words[1:]) or not _own_grid(key, e) or m.get("ppl_qat_ood") is None:
            continue  # the default itself, or the same training evaluated otherwise, or another grid
        out.append(_variant(e))
    return out


def run_summary(r: dict) -> str:
    """What ``qat-train recipe=smollm2_w4_lsq eval.fp_finetune=true`` printed (``qat.suite.summary`` of its metrics)."""
    from qat.suite import summary

    return "```\n" + summary(r["smollm2_w4_lsq"]["metrics"], "ppl").rstrip() + "\n```"


def uniform_bits(quant: dict) -> float | None:
    """Storage bits per weight of a uniform weight grid (``metrics.json``'s ``quant``), as ``qat.allocation`` counts them:
    code bits (ternary 1.6) + 16 per scale and per zero point or offset, over the group."""
    w = quant.get("weight") or {}
    if quant.get("rules") or w.get("granularity") != "group":
        return None
    ternary = w.get("_target_", "").endswith("Ternary")
    params = 1 if ternary or (w.get("symmetric", True) and not w.get("offset")) else 2
    return (1.6 if ternary else w["bits"]) + 16 * params / w["group_size"]


MIXED_RECIPE = "smollm2_w2_lsq"


def _candidates(key: str, plan: dict) -> list[str]:
    """A plan's candidate names: from its metrics (``layers_per_candidate``), else from the run's ``plan@quant.plan=`` option."""
    if plan.get("layers_per_candidate"):
        return list(plan["layers_per_candidate"])
    from omegaconf import OmegaConf

    from qat.config import config_dir

    option = next((o.split("=", 1)[1] for o in key.split() if o.startswith("plan@quant.plan=")), "default")
    return list(OmegaConf.load(config_dir() / "plan" / f"{option}.yaml").candidates)


def _mixed_runs(r: dict) -> list[tuple]:
    """Every ``MIXED_RECIPE`` run measured on both texts whose bits per weight are known: ``(bits, plan, kd, metrics, key)``."""
    runs = []
    for key, e in r.items():
        m = e.get("metrics")
        if key.split(" ", 1)[0] != MIXED_RECIPE or not m or not m.get("ppl_qat_ood"):
            continue
        plan = m.get("plan")
        bits = plan["average_bits"] if plan else uniform_bits(m.get("quant", {}))
        if bits is not None:
            runs.append((bits, plan, _distilled(e), m, key))
    return sorted(runs, key=lambda x: (x[0], x[2], x[3]["steps"]))


def _seed(key: str) -> int:
    """The run's ``seed=`` override (``configs/train.yaml``'s 0 without one)."""
    return next((int(o.split("=", 1)[1]) for o in key.split() if o.startswith("seed=")), 0)


def _seed_note(key: str) -> str:
    """``, seed N`` for a run whose seed is not the default, else nothing."""
    return f", seed {_seed(key)}" if _seed(key) else ""


def _uniform_peer(x: tuple, run: tuple) -> bool:
    """``x`` is a uniform run trained like the plan ``run``: same objective, steps and seed."""
    return not x[1] and x[2] == run[2] and x[3]["steps"] == run[3]["steps"] and _seed(x[4]) == _seed(run[4])


def _uniform_match(run: tuple, runs: list[tuple]) -> list[dict]:
    """The uniform runs a plan is matched against: the narrowest grid of at least its bits, same objective, steps and seed."""
    wider = [x for x in runs if _uniform_peer(x, run) and x[0] >= run[0] - 1e-9]
    return [x[3] for x in wider if x[0] == min(u[0] for u in wider)]


def _beats(m: dict, uniform: list[dict]) -> list[bool]:
    """[PTQ, QAT]: the plan's perplexity below every matched uniform run's on both texts."""
    return [all(m[f"ppl_{s}{t}"] < u[f"ppl_{s}{t}"] for u in uniform for t in ("", "_ood")) for s in ("ptq", "qat")]


def _verdict(ok: list[bool]) -> str:
    return " / ".join("yes" if x else "**no**" for x in ok)


def _plan_label(key: str, plan: dict) -> str:
    return f"plan at {plan['bits']} ({plan['method']}; {', '.join(_candidates(key, plan))})"


def mixed(r: dict) -> str:
    """Planned mixed precision (``quant.plan.bits``) against uniform grids, same recipe and budget, from ``recipes.json``."""
    runs = _mixed_runs(r)
    rows = ["| weights | bits per weight | objective | steps | PTQ held out | PTQ out of domain | QAT held out | QAT out of domain | "
            "beats the uniform grid of the same or the next larger width (PTQ / QAT, both texts) |", "|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        bits, plan, kd, m, key = run
        label = _plan_label(key, plan) if plan else _weights(m.get("quant", {}))
        verdict = ""
        if plan:
            uniform = _uniform_match(run, runs)
            verdict = _verdict(_beats(m, uniform)) if uniform else "no uniform run to compare"
        objective = ("distillation" if kd else "labels") + _seed_note(key)
        rows.append(f"| {label} | {bits:.3f} | {objective} | {m['steps']} | {_num(m.get('ppl_ptq'))} | {_num(m.get('ppl_ptq_ood'))} | "
                    f"**{_num(m.get('ppl_qat'))}** | **{_num(m.get('ppl_qat_ood'))}** | {verdict} |")
    rows.append("\nThe verdict compares a plan with the narrowest uniform run of at least its bits per weight trained with the same seed; wider uniform "
                "rows stay in the table and a plan claims nothing against them.")
    rows.append(f"\nEvery row one `qat-train recipe={MIXED_RECIPE}` run with the recipe's steps, schedule and objective "
                "(`benchmarks/recipes.py " + MIXED_RECIPE + " -- quant.plan.bits=B` for a plan, `-- quant=NAME` for a uniform grid); "
                "bits per weight count codes, scales, zero points and offsets (`qat.allocation`). The plan chooses per layer among "
                "the candidates its row names (ternary, w2, w3, w4, w8: `configs/plan/default.yaml`, groups of 64, 64, 64, 32 and "
                "channels; w3_g192 and w4_g192: `configs/plan/integer.yaml`, `plan@quant.plan=integer`) by the row's sensitivity "
                "(`fisher`: the empirical Fisher of the loss, `quant.plan.calibration_blocks=16 quant.plan.batch_size=1`, 16 blocks "
                "of the training split one gradient each; `kl`: the KL to FP of that layer alone quantized, on 2 blocks); each run's "
                "exact command is in `benchmarks/results/recipes.json`.")
    return "\n".join(rows)


def mixed_short(r: dict) -> str:
    """The README's mixed-precision table: each plan after QAT against the uniform grid it is matched with (``_uniform_match``);
    under it, for a plan that wins, the narrowest wider uniform grid (within half a bit of its budget) that still beats it."""
    runs = _mixed_runs(r)
    rows = ["| budget | plan | uniform grid matched (bits) | PTQ, plan / uniform: held out, OOD | QAT, plan / uniform: held out, OOD | "
            "plan wins (PTQ / QAT) |", "|---|---|---|---|---|---|"]
    wider = []
    for run in runs:
        bits, plan, kd, m, key = run
        uniform = _uniform_match(run, runs) if plan else []
        if not uniform:
            continue
        u, ub = uniform[0], uniform_bits(uniform[0]["quant"])
        cells = [", ".join(f"{_num(m[f'ppl_{s}{t}'])} / {_num(u[f'ppl_{s}{t}'])}" for t in ("", "_ood")) for s in ("ptq", "qat")]
        ok = _beats(m, uniform)
        rows.append(f"| {plan['bits']} | {plan['method']}, {'distillation' if kd else 'labels'} {m['steps']} steps{_seed_note(key)} | "
                    f"{_weights(u.get('quant', {}))} ({ub:.3f}) | {cells[0]} | **{cells[1]}** | {_verdict(ok)} |")
        beaten_by = [x for x in runs if all(ok) and _uniform_peer(x, run) and ub + 1e-9 < x[0] < bits + 0.5
                     and any(x[3][f"ppl_qat{t}"] < m[f"ppl_qat{t}"] for t in ("", "_ood"))]
        if beaten_by:  # runs are sorted by bits: the narrowest first
            xb, x = beaten_by[0][0], beaten_by[0][3]
            wider.append(f"{_weights(x['quant'])} ({xb:.3f} bits: {_num(x['ppl_qat'])}, {_num(x['ppl_qat_ood'])}) beats "
                         f"the {plan['method']} plan at {plan['bits']}")
    rows.append("\nSmolLM2-135M, perplexity, 2 CPU cores; each plan against the narrowest uniform grid of at least its bits per weight "
                "(scales and zero points counted), same recipe, objective, steps and seed. "
                + ("A wider uniform grid can still win: " + "; ".join(wider) + ". " if wider else "")
                + "Candidates, every grid and the commands: [docs/RESULTS.md](docs/RESULTS.md#mixed-precision).")
    return "\n".join(rows)


DISTILL = ("smollm2_w4_lsq", "smollm2_w2_lsq", "smollm2_ternary_seq")
KD = "module.objective.kd_weight=1"


def _distilled(entry: dict) -> bool:
    """Whether the run distilled: its recorded objective; else the overrides it ran with against the recipe's default
    of that time (``overrides_at_run`` for runs made before the default changed, against labels)."""
    objective = (entry.get("metrics") or {}).get("objective")
    if objective is not None:
        return float(objective.get("kd_weight") or 0) > 0
    ran = entry.get("overrides_at_run") or entry.get("overrides") or []
    return any(o.replace(" ", "") in (KD, "module.objective.kd_weight=1.0") for o in ran)


def distill(r: dict) -> str:
    """Cross-entropy against KL distillation from the FP model, from the runs in ``recipes.json``.

    For each recipe every run of it, labels first: the steps and the train time say which budget
    two rows share (a distillation step also runs the teacher).
    """
    rows = ["| recipe | objective | steps (tokens) | train time | held-out QAT | gap recovered vs FP / FP-ft | out-of-domain QAT | x FP "
            "| gap recovered vs FP / FP-ft |", "|---|---|---|---|---|---|---|---|---|"]
    for name in DISTILL:
        # the recipe's own grid only: a run with per-layer rules or another quant config belongs to another table
        runs = [e for k, e in r.items() if k.split(" ", 1)[0] == name and e.get("metrics") and _own_grid(k, e)]
        for e in sorted(runs, key=lambda e: (_distilled(e), e["metrics"]["steps"])):
            m = e["metrics"]
            objective = "distillation (KL)" if _distilled(e) else "labels (CE)"
            ratio = f"{m['ppl_qat_ood'] / m['ppl_fp_ood']:.2f}" if m.get("ppl_qat_ood") and m.get("ppl_fp_ood") else "-"
            tokens = f" ({m['tokens'] / 1000:.0f}k)" if m.get("tokens") else ""
            rows.append(f"| `{name}` | {objective} | {m['steps']}{tokens} | {_num(m.get('train_seconds'), '.0f')} s | {_num(m.get('ppl_qat'))} | "
                        f"{_gap(m, '')} | **{_num(m.get('ppl_qat_ood'))}** | {ratio} | **{_gap(m, '_ood')}** |")
    rows.append("\nEach row one `qat-train` run (`benchmarks/recipes.py NAME [-- module.objective.kd_weight=1 [trainer.max_steps=N]]`), "
                "2 CPU cores; train time is `trainer.fit` alone. FP-ft: the FP model fine-tuned with the recipe's data, steps and "
                "schedule (the same for both objectives). The recipe's default is the objective that recovers more of the "
                "out-of-domain gap at the same train time.")
    return "\n".join(rows)


# tables rendered from another table's results file
SOURCES = {"distill": "recipes", "headline": "recipes", "run_summary": "recipes", "mixed": "recipes", "mixed_short": "recipes", "peers_fp4_short": "peers_fp4"}

TABLES = {
    "recipes": recipes,
    "distill": distill,
    "headline": headline,
    "mixed": mixed,
    "mixed_short": mixed_short,
    "run_summary": run_summary,
    "deadzone": deadzone,
    "deadzone_lam": deadzone_lam,
    "deadzone_seeds": deadzone_seeds,
    "ptq_baselines": ptq_baselines,
    "overhead": overhead,
    "peers_overhead": peers_overhead,
    "peers_overhead_cuda": peers_overhead,
    "memory": memory,
    "export_size": export_size,
    "peers_accuracy": peers_accuracy,
    "peers_fp4": peers_fp4,
    "peers_fp4_short": peers_fp4_short,
    "overhead_nvfp4": overhead_fp4,
    "overhead_mxfp4": overhead_fp4,
}


DOCUMENTS = (ROOT / "README.md", ROOT / "docs" / "RESULTS.md")


def render(text: str, results: dict[str, dict]) -> tuple[str, list[str]]:
    """``text`` with every ``results:NAME`` block whose file is in ``results`` re-rendered; and the names it holds."""
    found = []
    for name, render_table in TABLES.items():
        source = SOURCES.get(name, name)
        if source not in results:
            continue
        block = f"<!-- results:{name} -->\n{render_table(results[source])}\n<!-- /results:{name} -->"
        text, n = re.subn(rf"<!-- results:{name} -->.*?<!-- /results:{name} -->", lambda _, block=block: block, text, flags=re.S)
        if n:
            found.append(name)
    return text, found


def main() -> None:
    results = {p.stem: json.loads(p.read_text()) for p in RESULTS.glob("*.json")}
    placed = set()
    for doc in DOCUMENTS:
        text, found = render(doc.read_text(), results)
        placed.update(found)
        doc.write_text(text)
    for name in TABLES:
        if SOURCES.get(name, name) in results and name not in placed:
            print(f"no <!-- results:{name} --> marker in {', '.join(d.name for d in DOCUMENTS)}; skipped")


if __name__ == "__main__":
    main()
