"""The FP reference metric is measured once per (weights, held-out data, objective class) and read back after."""

from __future__ import annotations

import torch
from torch import nn

from qat.fp_reference import fingerprint, fp_metric
from qat.lit.objectives import CausalLM


def test_measured_once_then_read_back_and_keyed_on_weights_data_and_objective(tmp_path, monkeypatch):
    monkeypatch.setenv("QAT_CACHE", str(tmp_path))
    torch.manual_seed(0)
    model = nn.Linear(4, 4)
    batches = [{"input_ids": torch.arange(8).view(2, 4)}]
    calls = []

    def compute():
        calls.append(1)
        return 17.25

    assert fp_metric(model, batches, CausalLM(), compute) == (17.25, False)
    assert fp_metric(model, batches, CausalLM(), lambda: 0.0) == (17.25, True)
    assert len(calls) == 1 and len(list((tmp_path / "fp_reference").glob("*.json"))) == 1
    base = fingerprint(model, batches, CausalLM())
    other_data = [{"input_ids": torch.arange(8).view(2, 4) + 1}]
    assert fingerprint(model, other_data, CausalLM()) != base
    assert fingerprint(model, batches, CausalLM(kd_weight=0.5)) == base  # training settings do not change a measurement
    from qat.lit.objectives import EmbeddingDistill

    assert fingerprint(model, batches, EmbeddingDistill()) != base
    with torch.no_grad():
        model.weight[0, 0] += 1e-6
    assert fingerprint(model, batches, CausalLM()) != base
    assert fp_metric(model, batches, CausalLM(), lambda: 3.0, use_cache=False) == (3.0, False)
