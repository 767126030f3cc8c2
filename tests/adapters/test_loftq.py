"""LoftQ with our quantizers: lower error than B = 0, never growing with iterations, alpha-independent, reloadable."""

from __future__ import annotations

import functools

import pytest
import torch
from peft import LoftQConfig, LoraConfig
from torch import nn

import qat
from qat.adapters import L4Q, LoRA, load_adapters, loftq, save_adapters
from qat.errors import UserError
from qat.quantizers import LSQ, MinMax

QUANTIZERS = {
    "lsq+ w2 g64": lambda: LSQ(bits=2, granularity="group", group_size=64, offset=True, symmetric=False),
    "rtn w3 g64": lambda: MinMax(bits=3, granularity="group", group_size=64, symmetric=False),
    "lsq w4 g32": lambda: LSQ(bits=4, granularity="group", group_size=32, init="minmax"),
}


@pytest.fixture(scope="module")
def weights(smollm2):
    model, _ = smollm2
    names = ["model.layers.0.self_attn.q_proj", "model.layers.29.mlp.up_proj"]
    return {n: model.get_submodule(n).weight.detach().clone() for n in names}


def rtn_error(w, make):
    q = make().init_(w).eval()
    return (w - q(w)).norm().item()


@pytest.mark.parametrize("quant", list(QUANTIZERS))
def test_error_is_below_b_zero_and_never_grows(weights, quant):
    make = QUANTIZERS[quant]
    for name, w in weights.items():
        e0 = rtn_error(w, make)
        finals = []
        for iters in range(1, 6):
            w0, a, b, errors = loftq(w, make(), r=16, scaling=2.0, iters=iters)
            assert all(e1 <= e0_ for e0_, e1 in zip(errors, errors[1:])), (name, errors)
            finals.append(errors[-1])
            q = make().init_(w0).eval()  # the error is what the layer will compute: Q(W0) + c B A
            assert (w - q(w0) - (b @ a) * 2.0).norm().item() == pytest.approx(errors[-1], rel=1e-5)
        assert finals[0] < e0, (name, finals[0], e0)
        assert all(f1 <= f0 for f0, f1 in zip(finals, finals[1:])), (name, finals)


class Tiny(nn.Module):
    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.proj = nn.Linear(w.shape[1], w.shape[0], bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(w)

    def forward(self, x):
        return self.proj(x)


def loftq_config(bits: int, iters: int = 2, **kw) -> LoraConfig:
    return LoraConfig(**{"r": 8, "lora_alpha": 32, "target_modules": ["proj"], "init_lora_weights": "loftq",
                         "loftq_config": LoftQConfig(loftq_bits=bits, loftq_iter=iters), **kw})


@pytest.mark.parametrize("mode", ["lora", "l4q"])
def test_adapter_modes_start_from_the_loftq_approximation(weights, mode, tmp_path):
    w = weights["model.layers.0.self_attn.q_proj"][:, :256].contiguous()
    factory = functools.partial(MinMax, bits=3, granularity="group", group_size=64, symmetric=False) if mode == "lora" else \
        functools.partial(LSQ, bits=3, granularity="group", group_size=64, offset=True, symmetric=False)
    m = Tiny(w)
    qat.quantize_(m, weight=factory)
    x = torch.eye(256)  # the layer's output is its effective weight, transposed
    b_zero = (m(x).t() - w).norm().item()
    build = LoRA if mode == "lora" else functools.partial(L4Q, warmup_steps=5)  # L4Q's warm-up: Q(W0) + c B A
    build(loftq_config(3)).apply_(m)
    m.eval()
    approx = (m(x).t() - w).norm().item()
    a, b = m.proj.lora_A["default"].weight, m.proj.lora_B["default"].weight
    assert torch.count_nonzero(b) > 0
    assert approx < 0.97 * b_zero  # alpha = 32 != r = 8: c B A, not B A, approximates the residual
    if mode == "l4q":
        m.proj.joint = True  # the joint stage quantizes W0 + c B A (= W up to rounding): LSQ+ of W
        torch.testing.assert_close(m.proj.base_layer.weight + (b @ a) * m.proj.scaling["default"], w, rtol=0, atol=1e-6)
        m.proj.joint = False
    save_adapters(m, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "loftq_init.safetensors").is_file()
    fresh = Tiny(w)
    qat.quantize_(fresh, weight=factory)
    load_adapters(fresh, tmp_path / "adapter")
    fresh.eval()
    if mode == "l4q":
        fresh.proj.joint = False
    assert torch.equal(fresh.proj.base_layer.weight, m.proj.base_layer.weight)  # LoftQ's base rebuilt bitwise
    assert torch.equal(fresh(x), m(x))


def test_loftq_bits_must_match_the_quantizer(weights):
    m = Tiny(weights["model.layers.0.self_attn.q_proj"][:, :64].contiguous())
    qat.quantize_(m, weight=functools.partial(MinMax, bits=3, granularity="group", group_size=64))
    with pytest.raises(UserError, match="loftq_bits=4 but layer 'proj' quantizes to 3 bits.*set loftq_bits=3"):
        LoRA(loftq_config(4)).apply_(m)


def test_bad_arguments():
    w = torch.randn(8, 16)
    with pytest.raises(UserError, match="iters >= 1"):
        loftq(w, MinMax(bits=2), r=2, scaling=1.0, iters=0)
    with pytest.raises(UserError, match="rank r=9"):
        loftq(w, MinMax(bits=2), r=9, scaling=1.0, iters=1)
