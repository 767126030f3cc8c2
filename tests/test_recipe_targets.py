"""Each recipe's ``target:`` (what it is measured against) and how ``benchmarks/report.py`` checks it."""

import sys
from pathlib import Path

import pytest

from qat.config import compose, recipe_names

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import report  # noqa: E402

METRICS = {"ppl_qat", "ppl_qat_ood", "ppl_fp", "ppl_fp_ood", "ppl_fp_ft", "ppl_fp_ft_ood", "gap_recovered", "gap_recovered_ood",
           "gap_recovered_fp_ft", "gap_recovered_fp_ft_ood", "cos_qat"}


@pytest.mark.parametrize("name", recipe_names())
def test_target_is_well_formed_and_composes(name):
    target = report.recipe_target(name)
    assert compose([f"recipe={name}"]).get("target") == target  # the same node qat-train carries, null when absent
    if target is None:
        return
    assert target["what"]
    for check in target["checks"]:
        assert check["metric"] in METRICS
        over = check.get("over")
        assert over is None or over in METRICS or over.split(":", 1)[1] in recipe_names()


def test_target_met_by_hand():
    runs = {"base": {"metrics": {"ppl_qat": 20.0}}}
    ratio = {"what": "<= 1.3x FP", "checks": [{"metric": "ppl_qat", "over": "ppl_fp", "at_most": 1.3}]}
    assert report.target_met(ratio, {"ppl_qat": 13.0, "ppl_fp": 10.0}, runs) is True     # 1.3 <= 1.3
    assert report.target_met(ratio, {"ppl_qat": 13.1, "ppl_fp": 10.0}, runs) is False
    assert report.target_met(ratio, {"ppl_qat": 13.0}, runs) is None                     # no FP: not measured
    other = {"what": "< base", "checks": [{"metric": "ppl_qat", "over": "recipe:base", "below": 1},
                                          {"metric": "gap_recovered", "at_least": 0.5}]}
    assert report.target_met(other, {"ppl_qat": 19.9, "gap_recovered": 0.5}, runs) is True
    assert report.target_met(other, {"ppl_qat": 20.0, "gap_recovered": 0.9}, runs) is False  # 20 / 20 is not below 1
    assert report.target_met(other, {"ppl_qat": 19.0, "gap_recovered": 0.4}, runs) is False


def test_the_headline_lists_what_was_tried_where_a_target_is_missed():
    def run(steps, qat_ood, kd, **extra):
        m = {"ppl_fp": 10.0, "ppl_fp_ood": 20.0, "ppl_qat": 50.0, "ppl_qat_ood": qat_ood, "ppl_fp_ft": 9.0, "ppl_fp_ft_ood": 30.0,
             "gap_recovered_ood": 0.7, "steps": steps, "tokens": steps * 1024, "quant": {}, "objective": {"kd_weight": kd}, **extra}
        return {"metrics": m}

    runs = {"smollm2_ternary_seq": run(55, 440.0, 1.0),                          # 22x: its target (<= 4x FP) is missed
            "smollm2_ternary_seq trainer.max_steps=120": run(120, 200.0, 1.0),   # 10x
            "smollm2_ternary_seq eval.fp_finetune=false": run(55, 441.0, 1.0),   # the same training: not a variant
            "smollm2_ternary_seq quant=ternary_absmean": run(55, 999.0, 1.0),    # another grid: not this target's variant
            "smollm2_w4_lsq": run(60, 21.0, 0.0, gap_recovered_ood=0.95)}        # its target is met: nothing listed
    text = report.headline(runs)
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == ["smollm2_ternary_seq", "smollm2_w4_lsq"]
    assert "**no**" in rows[0] and rows[1].endswith("| yes |")
    assert ("Targets missed, and what else was tried on the same grid (out of domain, x FP): `smollm2_ternary_seq` "
            "(out of domain <= 4x FP; default 55 KD steps (56k tokens): 22.0x): 120 KD steps (123k tokens): 10.0x.") in text
    assert "being re-measured" not in text


def test_mixed_tables_match_a_plan_with_the_narrowest_uniform_grid_of_at_least_its_bits():
    def run(held, ood, ptq=(100.0, 200.0), plan=None, weight=None):
        m = {"ppl_ptq": ptq[0], "ppl_ptq_ood": ptq[1], "ppl_qat": held, "ppl_qat_ood": ood, "steps": 90,
             "objective": {"kd_weight": 1.0}, "quant": {"weight": weight} if weight else {"rules": [{"pattern": "*"}]}}
        if plan:
            m["plan"] = {"bits": plan, "average_bits": plan, "method": "kl", "layers_per_candidate": {"w2": 1, "w3": 1}}
        return {"metrics": m}

    w3 = {"_target_": "qat.quantizers.LSQ", "bits": 3, "granularity": "group"}
    runs = {"smollm2_w2_lsq quant.plan.bits=3.0": run(21.0, 52.0, ptq=(280.0, 420.0), plan=3.0),
            "smollm2_w2_lsq quant=w3_lsq quant.weight.group_size=192": run(22.0, 54.0, ptq=(500.0, 600.0), weight={**w3, "group_size": 192}),
            "smollm2_w2_lsq quant=w3_lsq": run(20.0, 42.0, ptq=(160.0, 190.0), weight={**w3, "group_size": 64}),
            "smollm2_w2_lsq quant=w4_lsq": run(15.0, 30.0, weight={**w3, "bits": 4, "group_size": 32})}  # 4.5 bits: not said
    assert report.uniform_bits(runs["smollm2_w2_lsq quant=w3_lsq"]["metrics"]["quant"]) == 3 + 16 / 64  # by hand
    short = report.mixed_short(runs)
    rows = [line for line in short.splitlines() if line.startswith("| 3.0")]
    # matched with g192 (3.083 bits, the narrowest of at least 3.0), not g64 (3.25): it wins on both texts, PTQ and QAT
    assert rows == ["| 3.0 | kl, distillation 90 steps | LSQ w3 g192 (3.083) | 280 / 500, 420 / 600 | **21 / 22, 52 / 54** | yes / yes |"]
    assert "A wider uniform grid can still win: LSQ w3 g64 (3.250 bits: 20, 42) beats the kl plan at 3.0." in short
    assert "w4" not in short
    full = report.mixed(runs)
    assert "| plan at 3.0 (kl; w2, w3) | 3.000 | distillation | 90 | 280 | 420 | **21** | **52** | yes / yes |" in full
    runs["smollm2_w2_lsq quant.plan.bits=3.0"]["metrics"]["ppl_qat_ood"] = 55.0  # loses out of domain after QAT
    assert report.mixed_short(runs).splitlines()[2].endswith("| yes / **no** |")
