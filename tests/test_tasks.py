"""lm-eval task accuracy of a model in memory: lm-eval's own evaluator on a local task, checked by hand."""

from __future__ import annotations

import copy

import pytest
import torch

from qat.errors import UserError
from qat.tasks import _summary, check_tasks, lm_eval
from tests.conftest import QUESTIONS

pytest.importorskip("lm_eval")


def hand_accuracy(model, tok) -> float:
    """Each choice scored by the summed log-probability of its tokens after the prompt and a space; argmax against the label."""
    right = 0
    for q in QUESTIONS:
        context = f"Question: {q['question']}\nAnswer:"
        scores = []
        for choice in q["choices"]:
            whole = tok(context + " " + choice, add_special_tokens=False)["input_ids"]
            n_ctx = len(tok(context, add_special_tokens=False)["input_ids"])
            ids = torch.tensor([whole])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), dim=-1)
            scores.append(sum(logp[i - 1, whole[i]].item() for i in range(n_ctx, len(whole))))
        right += int(max(range(len(scores)), key=scores.__getitem__) == q["label"])
    return right / len(QUESTIONS)


def test_fp_accuracy_on_a_local_task_is_the_hand_computed_one(smollm2, local_task):
    model, tok = smollm2
    folder, task = local_task
    expected = hand_accuracy(model, tok)
    out = lm_eval(model, tok, [task], include_path=folder)
    assert out[task]["metric"] == "acc" and out[task]["n"] == 3
    assert out[task]["value"] == pytest.approx(expected)
    assert out[task]["higher_is_better"] is True


def test_a_quantized_model_is_evaluated_as_it_runs(smollm2, local_task):
    import qat
    from qat.quantizers import MinMax

    model, tok = smollm2
    folder, task = local_task
    ptq = copy.deepcopy(model).train()
    qat.quantize_(ptq, weight=lambda: MinMax(bits=2, granularity="group", group_size=64), include=["model.layers.*"])
    scored = lm_eval(ptq, tok, [task], include_path=folder)[task]["value"]
    assert ptq.training  # its mode is restored
    assert scored == pytest.approx(hand_accuracy(ptq.eval(), tok))


def test_unknown_tasks_and_folders_are_refused_before_any_model_work(local_task, tmp_path):
    folder, task = local_task
    assert check_tasks([f" {task} "], folder) == [task]
    with pytest.raises(UserError, match="no_such_task"):
        check_tasks(["no_such_task"], folder)
    with pytest.raises(UserError, match="no task given"):
        check_tasks([""])
    with pytest.raises(UserError, match="not a folder"):
        check_tasks([task], tmp_path / "missing")


def test_summary_takes_acc_norm_as_the_headline_and_strips_filters():
    results = {"alias": "hellaswag", "acc,none": 0.4, "acc_stderr,none": 0.01, "acc_norm,none": 0.5, "acc_norm_stderr,none": "N/A"}
    s = _summary(results, {"acc": True, "acc_norm": True}, {"original": 100, "effective": 20})
    assert s == {"metric": "acc_norm", "value": 0.5, "stderr": None, "n": 20, "higher_is_better": True,
                 "metrics": {"acc": 0.4, "acc_norm": 0.5}}
    ppl = _summary({"word_perplexity,none": 30.0, "bits_per_byte,none": 0.9}, {"word_perplexity": False}, {})
    assert ppl["metric"] == "word_perplexity" and ppl["higher_is_better"] is False
