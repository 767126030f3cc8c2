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
