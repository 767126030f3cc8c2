"""L4Q: B = 0 is LSQ+, the custom backward equals an autograd reference and hand values, merging is exact."""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig
from torch import nn

import qat
from qat.adapters import L4Q, L4QLinear, L4QWarmup, l4q_linear, merge_adapters_
from qat.errors import UserError
from qat.quantizers import LSQ

LSQ_PLUS = functools.partial(LSQ, bits=4, granularity="group", group_size=16, offset=True, symmetric=False)


class Tiny(nn.Module):
    def __init__(self, bias: bool = False):
        super().__init__()
        self.up = nn.Linear(32, 48, bias=bias)
        self.down = nn.Linear(48, 32, bias=bias)
        self.head = nn.Linear(32, 8)

    def forward(self, x):
        return self.head(torch.relu(self.down(torch.relu(self.up(x)))))


def quantized_tiny(seed: int = 0, bias: bool = False) -> Tiny:
    torch.manual_seed(seed)
    m = Tiny(bias)
    qat.quantize_(m, weight=LSQ_PLUS, include=["up", "down"])
    return m


def config(**kw) -> LoraConfig:
    return LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["up", "down"], **kw})


def gs(x, g):
    return (x - g * x).detach() + g * x


def round_ste(u):
    return (torch.round(u) - u).detach() + u


def reference(x, w0, a, b, c, s, beta, lo, hi, group, g):
    """L4Q written with autograd: W = W0 + c B A; LSQ+ with gs() and round_ste (ALGORITHMS.md notation)."""
    w = w0 + (b @ a) * c
    s, beta = gs(s, g), gs(beta, g)
    wv = w.reshape(w.shape[0], -1, group)
    u = (wv - beta) / s
    q = round_ste(torch.clamp(u, lo, hi))  # clamp first: the clip's mask is on u, as the clipped STE's
    return x @ (q * s + beta).reshape(w.shape).t()


def test_b_zero_equals_lsq_exactly():
    m = quantized_tiny()
    x = torch.randn(6, 32)
    before = m(x)
    grads_before = torch.autograd.grad(before.square().sum(), [m.up.weight_quantizer.scale, m.up.weight_quantizer.offset])
    L4Q(config()).apply_(m)
    assert isinstance(m.up, L4QLinear)
    assert torch.count_nonzero(m.up.lora_B["default"].weight) == 0
    after = m(x)
    assert torch.equal(before, after)
    grads_after = torch.autograd.grad(after.square().sum(), [m.up.base_layer.weight_quantizer.scale, m.up.base_layer.weight_quantizer.offset])
    for g0, g1 in zip(grads_before, grads_after):
        torch.testing.assert_close(g0, g1, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("bits", [2, 4])
def test_custom_backward_equals_autograd_reference(bits):
    torch.manual_seed(bits)
    w0 = torch.randn(12, 32)
    q = LSQ(bits=bits, granularity="group", group_size=16, offset=True, symmetric=False).init_(w0)
    with torch.no_grad():  # a step and offset that clip some entries on both sides
        q.scale.mul_(0.8)
        q.offset.add_(0.05)
    a = (0.3 * torch.randn(3, 32)).requires_grad_()
    b = (0.3 * torch.randn(12, 3)).requires_grad_()
    x = torch.randn(5, 32, requires_grad=True)
    c = 2.0 / 3
    y = l4q_linear(x, w0, q, a, b, c)
    gy = torch.randn_like(y)
    mine = torch.autograd.grad(y, [x, a, b, q.scale, q.offset], gy)

    from qat.quantizers.fake_quant import to_export_precision

    s = q.scale.detach().clone().requires_grad_()
    beta = q.offset.detach().clone().requires_grad_()
    x2, a2, b2 = (t.detach().clone().requires_grad_() for t in (x, a, b))
    g = q.grad_scale(torch.empty(1, 1, 16))
    y_ref = reference(x2, w0, a2, b2, c, to_export_precision(s), to_export_precision(beta), q.grid.lo, q.grid.hi, 16, g)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-6)
    ref = torch.autograd.grad(y_ref, [x2, a2, b2, s, beta], gy)
    for name, m_, r_ in zip(["x", "A", "B", "s", "beta"], mine, ref):
        torch.testing.assert_close(m_, r_, rtol=1e-5, atol=1e-6, msg=name)
    u = ((w0 + (b @ a).detach() * c).reshape(12, 2, 16) - to_export_precision(beta)) / to_export_precision(s)
    clipped = (u < q.grid.lo) | (u > q.grid.hi)
    assert clipped.any() and (~clipped).any()


def test_hand_computed_tiny_case():
    # W0 = [0.2, -0.4], A = [1, 0.5], B = [0.2], c = 1: W = [0.4, -0.3].
    # LSQ+ 2-bit signed [-2, 1], s = 0.25, beta = 0.0625: u = [1.35, -1.45] -> q = [1 (clipped), -1].
    # W_hat = [0.3125, -0.1875]; x = [1, 2]; y = x . W_hat = -0.0625; G_W_hat = x = [1, 2].
    # G_W = [0, 2] (mask); G_A = c B^T G_W = [0, 0.4]; G_B = c G_W A^T = 1.0.
    # g = 1/sqrt(2 * 1); G_s = g (1 * 1 + (round(-1.45) + 1.45) * 2) = g * 1.9; G_beta = g * 1.
    w0 = torch.tensor([[0.2, -0.4]])
    q = LSQ(bits=2, granularity="tensor", offset=True).init_(w0)
    with torch.no_grad():
        q.scale.fill_(0.25)
        q.offset.fill_(0.0625)
    a = torch.tensor([[1.0, 0.5]], requires_grad=True)
    b = torch.tensor([[0.2]], requires_grad=True)
    x = torch.tensor([[1.0, 2.0]], requires_grad=True)
    y = l4q_linear(x, w0, q, a, b, 1.0)
    assert y.item() == pytest.approx(-0.0625, abs=1e-6)
    y.sum().backward()
    g = 1 / math.sqrt(2)
    assert a.grad.tolist()[0] == pytest.approx([0.0, 0.4], abs=1e-6)
    assert b.grad.item() == pytest.approx(1.0, abs=1e-6)
    assert q.scale.grad.item() == pytest.approx(1.9 * g, abs=1e-6)
    assert q.offset.grad.item() == pytest.approx(g, abs=1e-6)
    assert x.grad.tolist()[0] == pytest.approx([0.3125, -0.1875], abs=1e-6)



@pytest.mark.parametrize("bias", [False, True])
def test_merged_model_equals_trained_model_and_lies_on_the_grid(bias, train_steps):
    m = quantized_tiny(bias=bias)
    L4Q(config()).apply_(m)
    train_steps(m, 32, 8)
    assert torch.count_nonzero(m.up.lora_B["default"].weight) > 0
    m.eval()
    x = torch.randn(7, 32)
    trained = m(x)
    merge_adapters_(m)
    assert type(m.up) is qat.QuantLinear and type(m.down) is qat.QuantLinear
    assert not hasattr(m, "_qat_adapter")
    assert torch.equal(m(x), trained)
    for layer in (m.up, m.down):
        w = layer.latent_weight()
        codes = layer.weight_quantizer.codes(w)
        assert codes.codes.min() >= codes.lo and codes.codes.max() <= codes.hi
        assert torch.equal(codes.dequantize(), layer.weight_quantizer(w).detach())


def test_only_adapter_and_quantizer_parameters_train(train_steps):
    m = quantized_tiny()
    L4Q(config()).apply_(m)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {
        f"{layer}.{suffix}"
        for layer in ("up", "down")
        for suffix in ("lora_A.default.weight", "lora_B.default.weight", "base_layer.weight_quantizer.scale", "base_layer.weight_quantizer.offset")
    }
    train_steps(m, 32, 8, steps=1)
    assert m.up.base_layer.weight.grad is None  # W0 never gets a dense gradient


def test_warmup_stage_keeps_the_adapter_beside_the_quantized_base():
    m = quantized_tiny()
    L4Q(config(), warmup_steps=3).apply_(m)
    layer = m.up
    assert layer.joint is False
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    x = torch.randn(4, 32)
    base = layer.base_layer
    a, b, c = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    expected = x @ base.weight_quantizer(base.weight).t() + (x @ a.t() @ b.t()) * c
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    callback = L4QWarmup(3)
    for step, joint in ((0, False), (2, False), (3, True)):
        callback.on_train_batch_start(SimpleNamespace(global_step=step), m, None, 0)
        assert layer.joint is joint
    joint_out = base(x)  # not merged yet: the base alone is Q(W0)
    assert not torch.allclose(layer(x), joint_out)
    torch.testing.assert_close(layer(x), x @ base.weight_quantizer(base.weight + (b @ a) * c).t(), rtol=1e-5, atol=1e-6)
    assert L4Q(config(), warmup_steps=3).callbacks() and not L4Q(config()).callbacks()


def test_bad_input_is_a_clear_error():
    with pytest.raises(UserError, match=r"r=40 is larger than min\(in_features, out_features\)=32 .*set adapter.config.r <= 32"):
        L4Q(config(r=40)).apply_(quantized_tiny())
    with pytest.raises(UserError, match="match no layer.*set adapter.config.target_modules"):
        L4Q(config(target_modules=["q_proj"])).apply_(quantized_tiny())
    with pytest.raises(UserError, match="not quantized.*'head'"):
        L4Q(config(target_modules=["up", "head"])).apply_(quantized_tiny())
    with pytest.raises(UserError, match="lora_dropout"):
        L4Q(config(lora_dropout=0.1)).apply_(quantized_tiny())
    with pytest.raises(UserError, match="warmup_steps"):
        L4Q(config(), warmup_steps=-1)
    m = quantized_tiny()
    L4Q(config()).apply_(m)
    with pytest.raises(UserError, match="already has l4q adapters"):
        L4Q(config()).apply_(m)


def test_backward_keeps_no_weight_sized_tensor():
    """Autograd keeps the input, the factors and the quantizer parameters: no W, W_hat or dW copy per layer."""
    m = quantized_tiny()
    L4Q(config()).apply_(m)
    layer = m.up
    saved = []

    def pack(t):
        saved.append(t)
        return t

    x = torch.randn(5, 32, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    w0 = layer.base_layer.weight
    weight_sized = [t for t in saved if t.numel() >= w0.numel() and t.data_ptr() != w0.data_ptr()]
    assert weight_sized == []
    y.sum().backward()
    assert w0.grad is None and layer.lora_A["default"].weight.grad is not None


def test_lsq_layer_for_comparison_keeps_its_quantized_weight():
    """The plain QuantLinear keeps Q(W) for its backward (what L4Q's recomputation avoids)."""
    layer = quantized_tiny().up
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(torch.randn(5, 32, requires_grad=True))
    assert any(t.numel() == layer.weight.numel() and t.data_ptr() != layer.weight.data_ptr() for t in saved)
