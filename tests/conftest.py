"""Shared fixtures: the embedded real models, loaded once per test session.

The tests never reach the network: the hub is switched off before transformers is imported.
SmolLM2 loads through the default cache (``$QAT_CACHE`` or ``~/.cache/qat/models``), as users
get it: the first session on a machine dequantizes the GGUF file once (about 15 s), later
sessions read the cache in well under a second.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402

from qat.models import load_model  # noqa: E402


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of SmolLM2-135M-Instruct, float32, eval mode. Shared: do not modify it."""
    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def minilm():
    """(model, tokenizer) of all-MiniLM-L6-v2 (a bare BertModel), float32. Shared: do not modify it."""
    return load_model("all-minilm-l6-v2")


QUESTIONS = [  # a three-question multiple-choice task in lm-eval's own format, written by the tests
    {"question": "What color is the sky on a clear day?", "choices": ["blue", "green", "red"], "label": 0},
    {"question": "How many legs does a spider have?", "choices": ["six", "eight", "four"], "label": 1},
    {"question": "Which animal barks?", "choices": ["cat", "fish", "dog"], "label": 2},
]  # lm-eval joins prompt and choice with its target_delimiter, a space
TASK_YAML = """task: qat_three_questions
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="session")
def local_task(tmp_path_factory):
    """A folder holding lm-eval's task YAML (``dataset_path: json``) and its three questions: ``(folder, task name)``."""
    import json

    folder = tmp_path_factory.mktemp("tasks")
    data = folder / "questions.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (folder / "qat_three_questions.yaml").write_text(TASK_YAML.format(data=data))
    return folder, "qat_three_questions"
