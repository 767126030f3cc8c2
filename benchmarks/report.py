"""Write the README's measured tables from the JSON files the benchmarks wrote.

Each table sits between ``<!-- results:NAME -->`` and ``<!-- /results:NAME -->`` in README.md and is
regenerated from ``benchmarks/results/NAME.json``; a missing file leaves its table as it is.

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
    for name, label in (("fp", "quantizers off"), ("lsq_w4g32", "LSQ w4 g32")):
        v = s[name]
        rows.append(f"| {label} | {v['step_s']:.2f} | {v['step_peak_increase_mb']:.0f} | {v['process_peak_rss_mb']:.0f} |")
    rows.append(
        f"| **ratio** | **{r['time_ratio']:.2f}x** | {r['step_memory_ratio']:.2f}x | **{r['peak_rss_ratio']:.2f}x** |\n\n"
        f"Allocator: {r['allocator']}; {r['repeats']} interleaved repeats, {r['threads']} threads, torch {r['torch']}."
    )
    return "\n".join(rows)


def _recipes_by_quant() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for path in sorted((ROOT / "recipes" / "experiment").glob("*.yaml")):
        m = re.search(r"override /quant: (\S+)", path.read_text())
        found.setdefault(m.group(1) if m else "ternary_tequila", []).append(path.stem)  # no override: the default
    return found


def export_size(r: dict) -> str:
    recipes = _recipes_by_quant()
    rows = ["| quant config | recipes | bits per weight | packed file (MB) | file / theoretical |", "|---|---|---|---|---|"]
    for name, v in r["results"].items():
        used = ", ".join(f"`{x}`" for x in recipes.get(name, [])) or "-"
        rows.append(f"| `{name}` | {used} | {v['bits_per_weight']:.3f} | {v['file_bytes'] / 1e6:.1f} | {v['ratio']:.4f} |")
    rows.append(f"\nBits per weight: codes, scales, zero points, offsets and the Tequila bias over the quantized weights; "
                f"the file also holds the float32 embedding table ({r['results'][next(iter(r['results']))]['unquantized_bytes'] / 1e6:.0f} MB).")
    return "\n".join(rows)


TABLES = {"ptq_baselines": ptq_baselines, "overhead": overhead, "export_size": export_size}


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    for name, render in TABLES.items():
        path = RESULTS / f"{name}.json"
        if not path.exists():
            continue
        block = f"<!-- results:{name} -->\n{render(json.loads(path.read_text()))}\n<!-- /results:{name} -->"
        text, n = re.subn(rf"<!-- results:{name} -->.*?<!-- /results:{name} -->", lambda _: block, text, flags=re.S)
        if n == 0:
            print(f"README.md has no <!-- results:{name} --> marker; skipped")
    readme.write_text(text)


if __name__ == "__main__":
    main()
