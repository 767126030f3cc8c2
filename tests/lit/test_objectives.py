import functools

import torch
import torch.nn.functional as F
from torch import nn

import qat
from qat.lit.module import QATModule
from qat.lit.objectives import CausalLM, kd_loss
from qat.lit.schedules import cosine_factor, wsd_factor
from qat.quantizers import LSQ


def test_kd_loss_is_zero_for_equal_logits_and_matches_hand_kl():
    s = torch.tensor([[[1.0, 0.0, -1.0]]])
    assert kd_loss(s, s, 2.0).item() == 0.0
    t = torch.tensor([[[0.0, 1.0, 0.0]]])
    T = 2.0
    p = F.softmax(t / T, -1)
    expected = (p * (p.log() - F.log_softmax(s / T, -1))).sum() * T * T
    torch.testing.assert_close(kd_loss(s, t, T), expected)


def test_parameter_groups_separate_quantizer_parameters_without_decay():
    model = nn.Sequential(nn.Linear(32, 32), nn.LayerNorm(32), nn.Linear(32, 4))
    qat.quantize_(model, weight=functools.partial(LSQ, bits=4, granularity="group", group_size=16))
    module = QATModule(model, optimizer=functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.1), quant_lr=5e-2, total_steps=10)
    groups = {g["name"]: g for g in module.parameter_groups()}
    assert set(groups) == {"weights", "weights_no_decay", "quant_no_decay"}
    assert groups["quant_no_decay"]["lr"] == 5e-2 and groups["quant_no_decay"]["weight_decay"] == 0.0
    assert groups["weights_no_decay"]["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in groups["weights"]["params"])
    n_scales = sum(1 for n, _ in model.named_parameters() if "_quantizer." in n)
    assert len(groups["quant_no_decay"]["params"]) == n_scales == 2


def test_schedules_hand_values():
    assert cosine_factor(0, 10, 2, 0.1) == 0.5
    assert abs(cosine_factor(6, 10, 2, 0.0) - 0.5) < 1e-12  # halfway through the cosine
    assert wsd_factor(3, 10, 0, 0.1, 0.5) == 1.0 and abs(wsd_factor(10, 10, 0, 0.1, 0.5) - 0.1) < 1e-12


def test_causal_lm_objective_requires_teacher_only_when_distilling():
    assert not CausalLM().needs_teacher and CausalLM(kd_weight=0.5).needs_teacher
