"""``Frozen``: fixed codes hold bitwise what they were given, fixed or with trainable scales."""

import functools

import pytest
import torch
from torch import nn

from qat.convert import iter_codes
from qat.errors import UserError
from qat.export.packed import PackedLinear, pack_layer
from qat.nn.linear import QuantLinear
from qat.quantizers import LSQ, LWC, Frozen, MinMax, Ternary
from qat.quantizers.base import Codes

FACTORIES = {
    "minmax_asym": functools.partial(MinMax, bits=3, granularity="channel", symmetric=False),
    "lsq_plus": functools.partial(LSQ, bits=4, granularity="group", group_size=16, symmetric=False, offset=True),
    "lwc": functools.partial(LWC, bits=2, granularity="group", group_size=16),
    "seq": functools.partial(Ternary, "seq", granularity="group", group_size=16),
    "tequila": functools.partial(Ternary, "absmean", granularity="group", group_size=16, deadzone="tequila"),
}


def _layer(factory):
    torch.manual_seed(0)
    return QuantLinear.from_float(nn.Linear(32, 8), factory()).eval()


@pytest.mark.parametrize("factory", FACTORIES.values(), ids=FACTORIES.keys())
def test_frozen_layer_computes_what_the_quantized_layer_did_bitwise(factory):
    layer = _layer(factory)
    (_, _, codes), = iter_codes(nn.Sequential(layer))
    frozen = QuantLinear(nn.Parameter(codes.dequantize(), requires_grad=False), layer.bias, Frozen(codes)).eval()
    x = torch.randn(3, 32)
    assert torch.equal(frozen(x), layer(x))  # Tequila's folded bias included
    again = frozen.weight_quantizer.codes(frozen.latent_weight())
    for field in ("codes", "scale", "zero", "offset", "bias"):
        a, b = getattr(again, field), getattr(codes, field)
        assert (a is None and b is None) or torch.equal(a, b.to(a.dtype)), field
    assert (again.lo, again.hi, again.bits) == (codes.lo, codes.hi, codes.bits)
    assert not list(frozen.weight_quantizer.parameters())  # nothing to train


def test_frozen_holds_a_packed_layers_codes():
    layer = _layer(FACTORIES["lsq_plus"])
    (_, _, codes), = iter_codes(nn.Sequential(layer))
    packed = PackedLinear(*pack_layer("l", layer, codes), bias=layer.bias.detach())
    assert torch.equal(Frozen(packed.codes()).dequantize(), packed.dequantized_weight())


def test_trainable_scales_are_parameters_and_codes_stay():
    w = torch.randn(8, 32)
    q = Frozen(bits=4, granularity="group", group_size=16, train_scale=True).init_(w)
    assert [n for n, _ in q.named_parameters()] == ["scale"]
    before = q.q.clone()
    assert q.init_(torch.randn(8, 32)) is q and torch.equal(q.q, before)  # codes held stay
    assert torch.equal(q.q, MinMax(bits=4, granularity="group", group_size=16).init_(w).codes(w).codes)


def test_a_tequila_bias_cannot_be_tuned_scale_only():
    codes = _layer(FACTORIES["tequila"]).weight_quantizer.codes(torch.randn(8, 32))
    with pytest.raises(UserError, match="per-row bias"):
        Frozen(codes, train_scale=True)


def test_codes_on_no_grid_and_mis_grouped_codes_are_refused():
    odd = Codes(codes=torch.zeros(2, 4, dtype=torch.int8), scale=torch.ones(2, 1, 1), lo=-3, hi=5, bits=4, granularity="channel")
    with pytest.raises(UserError, match="no qat grid"):
        Frozen(odd)
    codes = MinMax(bits=4).init_(torch.randn(2, 16)).codes(torch.randn(2, 16))
    with pytest.raises(UserError, match="grouped as channel"):
        Frozen(bits=4, granularity="group", group_size=16).set_codes_(codes)


def test_a_fresh_frozen_loads_a_state_dict_and_checks_shapes():
    src = Frozen(bits=3, granularity="group", group_size=16, symmetric=False).init_(torch.randn(4, 32))
    fresh = Frozen(bits=3, granularity="group", group_size=16, symmetric=False)
    fresh.load_state_dict(src.state_dict())
    assert torch.equal(fresh(torch.empty(4, 32)), src(torch.empty(4, 32)))
    with pytest.raises(ValueError, match=r"shape \(4, 32\)"):
        fresh(torch.empty(4, 31))
