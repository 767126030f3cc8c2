
import torch
from torch import nn

from qat.nn import QuantLinear
from qat.quantizers import LSQ, MinMax, Ternary


def test_from_float_shares_parameters_and_matches_manual_forward():
    lin = nn.Linear(64, 16)
    q = LSQ(bits=4, granularity="group", group_size=32)
    layer = QuantLinear.from_float(lin, q)
    assert layer.weight is lin.weight and layer.bias is lin.bias
    x = torch.randn(3, 64)
    expected = x @ q(lin.weight).T + lin.bias
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)


def test_weight_and_quantizer_get_gradients():
    layer = QuantLinear.from_float(nn.Linear(32, 8), LSQ(bits=3, granularity="channel"))
    layer(torch.randn(4, 32)).pow(2).sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    assert layer.weight_quantizer.scale.grad is not None and layer.weight_quantizer.scale.grad.abs().sum() > 0


def test_activation_quantizer_is_applied_to_input():
    torch.manual_seed(0)
    act = MinMax(bits=2, granularity="tensor")
    layer = QuantLinear.from_float(nn.Linear(8, 4, bias=False), None, act)
    x = torch.randn(5, 8)
    torch.testing.assert_close(layer(x), act(x) @ layer.weight.T)


def test_tequila_bias_is_added_and_folds_on_to_float():
    torch.manual_seed(0)
    lin = nn.Linear(16, 4)
    layer = QuantLinear.from_float(lin, Ternary(deadzone="tequila", lam=0.1))
    x = torch.randn(3, 16)
    w_hat = layer.weight_quantizer(lin.weight)
    dead = torch.where(w_hat == 0, lin.weight, 0).sum(1) * 0.1
    assert dead.abs().sum() > 0
    torch.testing.assert_close(layer(x), x @ w_hat.T + lin.bias + dead)
    plain = layer.to_float()
    assert type(plain) is nn.Linear
    torch.testing.assert_close(plain(x), layer(x))


def test_conv1d_groups_run_along_in_features():
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(nf=8, nx=64)  # weight (in=64, out=8)
    nn.init.normal_(conv.weight)
    layer = QuantLinear.from_float(conv, MinMax(bits=4, granularity="group", group_size=32))
    assert (layer.in_features, layer.out_features) == (64, 8)
    assert layer.weight_quantizer.check((8, 64)) is None
    x = torch.randn(2, 64)
    w_hat = layer.weight_quantizer(conv.weight.t())
    torch.testing.assert_close(layer(x), x @ w_hat.T + conv.bias)
    back = layer.to_float()
    assert type(back) is Conv1D and back.weight.shape == (64, 8)
    torch.testing.assert_close(back(x), layer(x))


def test_to_float_uses_eval_rounding_and_keeps_training_mode():
    from qat.estimators import StochasticRounding

    layer = QuantLinear.from_float(nn.Linear(32, 8), LSQ(bits=2, granularity="channel", estimator=StochasticRounding()))
    layer.train()
    plain = layer.to_float()
    assert layer.training
    layer.eval()
    x = torch.randn(4, 32)
    torch.testing.assert_close(plain(x), layer(x), rtol=0, atol=0)
