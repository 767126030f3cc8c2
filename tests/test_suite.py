"""What a run reports: the gap recovered per text and per task, and the table it prints, from hand-made metrics."""

import math

import pytest

from qat.suite import add_tasks, gaps, key, summary

METRICS = {"ppl_fp": 10.0, "ppl_ptq": 40.0, "ppl_qat": 20.0, "ppl_fp_ft": 8.0,
           "ppl_fp_ood": 20.0, "ppl_ptq_ood": 80.0, "ppl_qat_ood": 40.0}


def test_keys_name_the_model_and_the_text():
    assert key("ppl", "fp") == "ppl_fp" and key("ppl", "qat", "ood") == "ppl_qat_ood" and key("cos", "fp_ft") == "cos_fp_ft"


def test_gaps_per_text_against_fp_and_the_fp_fine_tune():
    out = gaps(dict(METRICS), "ppl")
    assert out["gap_recovered"] == pytest.approx(0.5)
    assert out["gap_recovered_ood"] == pytest.approx(0.5)
    assert out["gap_recovered_fp_ft"] == pytest.approx(math.log(2) / math.log(5))
    assert "gap_recovered_fp_ft_ood" not in out  # no FP fine-tune measured out of domain


def test_task_gaps_are_linear_for_accuracy_and_logarithmic_for_perplexity():
    metrics = {}
    add_tasks(metrics, "fp", {"arc_easy": {"metric": "acc", "value": 0.6, "stderr": 0.01, "n": 100, "higher_is_better": True},
                              "wikitext": {"metric": "word_perplexity", "value": 20.0, "stderr": None, "n": 5, "higher_is_better": False}})
    add_tasks(metrics, "ptq", {"arc_easy": {"metric": "acc", "value": 0.3, "stderr": 0.01, "n": 100, "higher_is_better": True},
                               "wikitext": {"metric": "word_perplexity", "value": 80.0, "stderr": None, "n": 5, "higher_is_better": False}})
    add_tasks(metrics, "qat", {"arc_easy": {"metric": "acc", "value": 0.5, "stderr": 0.01, "n": 100, "higher_is_better": True},
                               "wikitext": {"metric": "word_perplexity", "value": 40.0, "stderr": None, "n": 5, "higher_is_better": False}})
    gaps(metrics, "ppl")
    assert metrics["tasks"]["arc_easy"]["gap_recovered"] == pytest.approx(2 / 3)
    assert metrics["tasks"]["wikitext"]["gap_recovered"] == pytest.approx(0.5)
    assert metrics["tasks"]["arc_easy"]["ptq"] == 0.3 and metrics["tasks"]["arc_easy"]["n"] == 100


def test_cosine_gap_is_linear():
    assert gaps({"cos_fp": 1.0, "cos_ptq": 0.9, "cos_qat": 0.95}, "cos")["gap_recovered"] == pytest.approx(0.5)


def test_summary_shows_every_model_on_both_texts_with_the_gaps():
    metrics = dict(METRICS) | gaps(dict(METRICS), "ppl")
    add_tasks(metrics, "fp", {"arc_easy": {"metric": "acc", "value": 0.6, "stderr": None, "n": 3, "higher_is_better": True}})
    text = summary(metrics, "ppl")
    lines = text.splitlines()
    assert "held-out perplexity" in lines[0] and "out-of-domain perplexity" in lines[0]
    qat_row = next(line for line in lines if line.startswith("QAT"))
    assert qat_row.split()[1:] == ["20", "2.00", "40", "2.00"]
    ft_row = next(line for line in lines if line.startswith("FP fine-tuned"))
    assert ft_row.split()[-3:] == ["8", "0.80", "-"]  # not measured out of domain: a dash, not a number
    gap_row = next(line for line in lines if line.startswith("gap recovered (vs FP)"))
    assert gap_row.split()[-2:] == ["50.0%", "50.0%"]
    assert any(line.startswith("arc_easy (acc)") and "0.6000" in line for line in lines)
    huge = summary({"ppl_fp": 17.44, "ppl_ptq": 3.209e6, "ppl_fp_ood": 24.37, "ppl_ptq_ood": 2.444e6}, "ppl")
    ptq_row = next(line for line in huge.splitlines() if line.startswith("PTQ"))
    assert ptq_row.split()[-4:] == ["3.209e+06", "1.8e+05", "2.444e+06", "1.0e+05"]  # ratios stay columns of their own
