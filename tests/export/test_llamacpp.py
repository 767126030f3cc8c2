"""llama.cpp runs our GGUF exports: its perplexity is within 2% of the fake-quant model's.

Slow: needs llama-cpp-python (``pip install 'qat[llamacpp]'``, built from source, several
minutes). The same held-out blocks as ``qat-eval`` (the first blocks of the shipped corpus, see
``qat.lit.data.TextDataModule``) are fed as token ids to both models; perplexity is computed the
same way from both sets of logits (``qat.metrics``: tokens 1..L-1 of each block, no carried context).
llama.cpp quantizes activations to 8 bits inside its quantized dot products, hence a tolerance.
"""

import copy
import functools
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from qat.convert import quantize_
from qat.corpus import shipped_text, token_blocks
from qat.export import gguf as qgguf
from qat.metrics import perplexity
from qat.quantizers import FP4, MinMax, Ternary

pytestmark = pytest.mark.slow
llama_cpp = pytest.importorskip("llama_cpp")

SEQ_LEN, N_BLOCKS = 256, 8
# (weight quantizer, layers). Untrained ternary weights everywhere leave SmolLM2 at a perplexity of
# ~1e7, where llama.cpp's 8-bit activations move it by ~30%: the ternary case quantizes the MLPs
# of the last four blocks (TQ2_0 down_proj, Q4_0 gate/up, Tequila biases), a model that still works.
GRIDS = {
    "int4_sym_g32": (functools.partial(MinMax, bits=4, granularity="group", group_size=32), "*"),
    "mxfp4": (functools.partial(FP4, "mxfp4"), "*"),  # E2M1 in blocks of 32 with E8M0 scales: ggml's MXFP4 as it is
    "ternary_tequila_mlp_last4": (
        functools.partial(Ternary, "absmean", granularity="channel", deadzone="tequila"),
        "model.layers.2[6-9].mlp.*",
    ),
}


def llamacpp_perplexity(llm, blocks: torch.Tensor) -> float:
    nll, count = 0.0, 0
    for ids in blocks.tolist():
        llm.reset()
        llm.eval(ids)
        logits = torch.from_numpy(np.asarray(llm.scores[: len(ids)], dtype=np.float32))
        target = torch.tensor(ids[1:])
        nll += F.cross_entropy(logits[:-1], target, reduction="sum").double().item()
        count += len(ids) - 1
    return math.exp(nll / count)


@pytest.fixture
def plain_cpu_kernels(monkeypatch):
    """Load models without llama.cpp's extra CPU buffer types (AMX / repacked weights).

    A native build on these Xeons compiles the AMX path, whose tile instructions die with SIGILL
    in the sandbox the tests run in; the plain CPU kernels compute the same model.
    ``Llama()`` exposes no switch for ``use_extra_bufts``, so its default model parameters are patched.
    """
    default = llama_cpp.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    monkeypatch.setattr(llama_cpp.llama.llama_cpp, "llama_model_default_params", params)


@pytest.mark.parametrize("grid", GRIDS)
def test_llamacpp_perplexity_matches_ours(smollm2, tmp_path, grid, plain_cpu_kernels):
    factory, include = GRIDS[grid]
    model = quantize_(copy.deepcopy(smollm2[0]), weight=factory, include=include)
    tokenizer = smollm2[1]
    info = qgguf.save(model, tokenizer, tmp_path)
    blocks = token_blocks(tokenizer, shipped_text(), SEQ_LEN)[:N_BLOCKS]
    ours = perplexity(model, blocks)

    llm = llama_cpp.Llama(
        model_path=str(tmp_path / qgguf.FILENAME), n_ctx=SEQ_LEN, n_batch=SEQ_LEN, logits_all=True,
        n_threads=int(os.environ.get("OMP_NUM_THREADS", "2")), verbose=False,
    )
    text = "The quick brown fox jumps over the lazy dog."
    assert llm.tokenize(text.encode(), add_bos=False) == tokenizer(text, add_special_tokens=False).input_ids
    theirs = llamacpp_perplexity(llm, blocks)
    print(f"{grid}: ours {ours:.4f}, llama.cpp {theirs:.4f}, ratio {theirs / ours:.4f}, {info['tensor_types']}")
    assert abs(theirs / ours - 1) < 0.02


@pytest.mark.skipif(not os.environ.get("QAT_TERNARY_RUN"), reason="set QAT_TERNARY_RUN to a trained ternary run directory")
def test_llamacpp_perplexity_of_a_trained_ternary_run(tmp_path, plain_cpu_kernels):
    """A fully ternary SmolLM2 after QAT (e.g. ``qat-train`` with the default recipe): all 210 layers.

    Untrained ternary weights leave the model at ~1e7 where 8-bit activations dominate; a trained one
    is a real model. Measured 2026-11-30 on the 140-step Tequila run: ours 311.82, llama.cpp 312.02.
    """
    from pathlib import Path

    from qat.config import build_model, load_run_config

    run = Path(os.environ["QAT_TERNARY_RUN"])
    model, tokenizer, _ = build_model(load_run_config(run), run / "checkpoints" / "last.ckpt")
    qgguf.save(model.eval(), tokenizer, tmp_path)
    blocks = token_blocks(tokenizer, shipped_text(), SEQ_LEN)[:N_BLOCKS]
    ours = perplexity(model, blocks)
    llm = llama_cpp.Llama(model_path=str(tmp_path / qgguf.FILENAME), n_ctx=SEQ_LEN, n_batch=SEQ_LEN, logits_all=True,
                          n_threads=int(os.environ.get("OMP_NUM_THREADS", "2")), verbose=False)
    theirs = llamacpp_perplexity(llm, blocks)
    print(f"trained ternary: ours {ours:.4f}, llama.cpp {theirs:.4f}, ratio {theirs / ours:.4f}")
    assert abs(theirs / ours - 1) < 0.02
