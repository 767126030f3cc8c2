"""Scale-only tuning: codes frozen (unchanged after training), exact step-size gradient, exact merge."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qat
from qat.adapters import ScaleOnly, ScaleOnlyLinear, load_adapters, merge_adapters_, save_adapters
from qat.errors import UserError
from qat.quantizers import LSQ, Frozen, MinMax


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(64, 48)
        self.down = nn.Linear(48, 32, bias=False)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        return self.head(torch.relu(self.down(torch.relu(self.up(x)))))


def quantized_tiny(factory, seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    m = Tiny()
    qat.quantize_(m, weight=factory, include=["up", "down"])
    return m


LSQ_RTN = functools.partial(LSQ, bits=4, granularity="group", group_size=16, init="minmax")
ASYM_RTN = functools.partial(MinMax, bits=3, granularity="group", group_size=16, symmetric=False)



def test_frozen_codes_init_is_round_to_nearest_bitwise():
    w = torch.randn(8, 32)
    rtn = MinMax(bits=4, granularity="group", group_size=16, symmetric=False)
    fq = Frozen(train_scale=True, bits=4, granularity="group", group_size=16, symmetric=False).init_(w)
    assert fq.q.dtype == torch.int8 and fq.zero is not None and not isinstance(fq.zero, nn.Parameter)
    assert torch.equal(fq(w), rtn.eval()(w))
    assert torch.equal(fq.codes().codes, rtn.codes(w).codes)
    assert [n for n, _ in fq.named_parameters()] == ["scale"]


@pytest.mark.parametrize("factory, train_zero", [(LSQ_RTN, False), (ASYM_RTN, False), (ASYM_RTN, True)], ids=["sym", "asym", "asym-train-zero"])
def test_fused_backward_equals_autograd_of_the_dequantize_expression(factory, train_zero):
    layer = quantized_tiny(factory).up
    so = ScaleOnlyLinear.from_quant_linear(layer, train_zero=train_zero)
    fq = so.weight_quantizer
    with torch.no_grad():
        fq.scale.mul_(1.1)  # off the float16 grid: the straight-through rounding is part of the check
    x = torch.randn(3, 5, 64, requires_grad=True)
    params = [p for p in fq.parameters()]
    y = so(x)
    gy = torch.randn_like(y)
    mine = torch.autograd.grad(y, [x, *params], gy)
    x2 = x.detach().clone().requires_grad_()
    y_ref = F.linear(x2, fq.dequantize(), so.bias)  # autograd through Codes.dequantize(), the export's expression
    assert torch.equal(y, y_ref)
    ref = torch.autograd.grad(y_ref, [x2, *params], gy)
    for m_, r_ in zip(mine, ref):
        torch.testing.assert_close(m_, r_, rtol=1e-5, atol=1e-5)
    assert len(params) == (2 if train_zero else 1)


def test_hand_computed_step_gradient_has_no_ste():
    # codes [1, -2, 0, 3] in one group, s = 0.5: W_hat = [0.5, -1, 0, 1.5]; x = 1, dL/dy = 1:
    # dL/ds = sum_i x_i * q_i = 1 - 2 + 0 + 3 = 2 (exact: no rounding between s and W_hat).
    from qat.quantizers.base import Codes

    fq = Frozen(train_scale=True, bits=3, granularity="tensor")
    fq.set_codes_(Codes(codes=torch.tensor([[1, -2, 0, 3]], dtype=torch.int8), scale=torch.tensor([[[0.5]]]), lo=-4, hi=3, bits=3, granularity="tensor"))
    layer = ScaleOnlyLinear(fq)
    x = torch.ones(1, 4)
    y = layer(x)
    assert y.item() == 1.0
    y.sum().backward()
    assert fq.scale.grad.item() == 2.0


def test_training_changes_scales_only_and_every_code_stays(train_steps):
    m = quantized_tiny(LSQ_RTN)
    rtn_codes = {n: m.get_submodule(n).weight_quantizer.codes(m.get_submodule(n).latent_weight()).codes.clone() for n in ("up", "down")}
    ScaleOnly().apply_(m)
    assert {n for n, p in m.named_parameters() if p.requires_grad} == {"up.weight_quantizer.scale", "down.weight_quantizer.scale"}
    assert m.up.weight is None  # no float weight is kept
    scales = {n: m.get_submodule(n).weight_quantizer.scale.detach().clone() for n in ("up", "down")}
    train_steps(m, 64, 4, steps=5)
    for n in ("up", "down"):
        fq = m.get_submodule(n).weight_quantizer
        assert torch.equal(fq.q, rtn_codes[n])
        assert not torch.equal(fq.scale, scales[n])
    m.eval()
    x = torch.randn(6, 64)
    trained = m(x)
    merge_adapters_(m)
    assert type(m.up) is qat.QuantLinear and not m.up.weight.requires_grad
    assert torch.equal(m(x), trained)
    for n in ("up", "down"):
        layer = m.get_submodule(n)
        codes = layer.weight_quantizer.codes(layer.latent_weight())
        assert torch.equal(codes.codes, rtn_codes[n])
        assert torch.equal(codes.dequantize(), layer.latent_weight())


def test_codes_from_a_trained_quantizer():
    m = quantized_tiny(LSQ_RTN)
    with torch.no_grad():  # stands for a finished QAT run: the trained step gives other codes than RTN
        m.up.weight_quantizer.scale.mul_(0.7)
    trained = m.up.weight_quantizer.codes(m.up.latent_weight())
    ScaleOnly().apply_(m)
    assert torch.equal(m.up.weight_quantizer.q, trained.codes)
    assert torch.equal(m.up.weight_quantizer.codes().scale, trained.scale)


def test_codes_from_a_run_checkpoint(tmp_path):
    donor = quantized_tiny(LSQ_RTN)
    with torch.no_grad():
        donor.down.weight_quantizer.scale.mul_(0.6)
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in donor.state_dict().items()}}, ckpt)
    m = quantized_tiny(LSQ_RTN)
    ScaleOnly(checkpoint=str(ckpt)).apply_(m)
    assert torch.equal(m.down.weight_quantizer.q, donor.down.weight_quantizer.codes(donor.down.latent_weight()).codes)
    other = quantized_tiny(functools.partial(LSQ, bits=4, granularity="group", group_size=8, init="minmax"))
    with pytest.raises(UserError, match="another base model or quantization.*same model and quant settings"):
        ScaleOnly(checkpoint=str(ckpt)).apply_(other)
    with pytest.raises(UserError, match="last.ckpt"):
        ScaleOnly(checkpoint=str(tmp_path / "none" / "last.ckpt")).apply_(quantized_tiny(LSQ_RTN))


def test_save_and_load_round_trip(tmp_path, train_steps):
    m = quantized_tiny(ASYM_RTN)
    ScaleOnly(train_zero=True).apply_(m)
    train_steps(m, 64, 4, steps=5)
    save_adapters(m, tmp_path / "adapter")
    fresh = quantized_tiny(ASYM_RTN)
    load_adapters(fresh, tmp_path / "adapter")
    x = torch.randn(4, 64)
    assert torch.equal(fresh(x), m(x))
    with pytest.raises(UserError, match="another base model"):
        load_adapters(quantized_tiny(ASYM_RTN, seed=5), tmp_path / "adapter")


def test_bad_input_is_a_clear_error():
    with pytest.raises(UserError, match="run qat.quantize_"):
        ScaleOnly().apply_(Tiny())
    fq = Frozen(train_scale=True, bits=4, granularity="channel").init_(torch.randn(4, 8))
    with pytest.raises(ValueError, match=r"shape \(4, 8\)"):
        fq(torch.randn(4, 9))


def test_backward_keeps_no_weight_sized_tensor():
    """The fused layer keeps its input only: W_hat is recomputed from the int8 codes in the backward."""
    so = ScaleOnlyLinear.from_quant_linear(quantized_tiny(LSQ_RTN).up)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = so(torch.randn(5, 64, requires_grad=True))
    assert all(t.numel() < so.weight_quantizer.q.numel() for t in saved if torch.is_floating_point(t))
    y.sum().backward()
    assert so.weight_quantizer.scale.grad is not None


def test_a_fresh_frozen_loads_a_state_dict():
    src = Frozen(train_scale=True, bits=3, granularity="group", group_size=16, symmetric=False).init_(torch.randn(4, 32))
    fresh = Frozen(train_scale=True, bits=3, granularity="group", group_size=16, symmetric=False)
    fresh.load_state_dict(src.state_dict())
    assert torch.equal(fresh(torch.empty(4, 32)), src(torch.empty(4, 32)))
    assert isinstance(fresh.scale, nn.Parameter) and not isinstance(fresh.zero, nn.Parameter)
