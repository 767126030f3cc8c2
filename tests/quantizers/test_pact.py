"""PACT (qat/quantizers/pact.py)."""

import pytest
import torch

from qat.errors import UserError
from qat.quantizers import PACT


def f16(v):
    """``v`` rounded to float16: the precision of the step the forward uses (and the export stores)."""
    return torch.as_tensor(v, dtype=torch.float32).half().float()


def test_docstring_example():
    q = PACT(bits=2, alpha=3.0)
    assert q(torch.tensor([-1.0, 0.9, 1.6, 5.0])).tolist() == [0.0, 1.0, 2.0, 3.0]


def test_unsigned_values_and_gradients():
    # bits 4: L = 15, step alpha / 15 = 0.25 (float16-exact). Values: round(clip(x, 0, 3.75) * 4) / 4.
    q = PACT(bits=4, alpha=3.75)
    x = torch.tensor([-1.0, 0.4, 1.33, 2.93, 3.9, 7.0], requires_grad=True)
    g = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    out = q(x)
    assert torch.equal(out, torch.tensor([0.0, 0.5, 1.25, 3.0, 3.75, 3.75]))
    out.backward(g)
    # dalpha = sum of G over x >= alpha; dx = G on [0, alpha]
    assert q.alpha.grad.item() == pytest.approx(5.0 + 6.0)
    assert q.alpha.grad.shape == (1, 1, 1)
    assert torch.allclose(x.grad, torch.tensor([0.0, 2.0, 3.0, 4.0, 0.0, 0.0]), rtol=1e-6, atol=0)


def test_signed_values_and_gradients():
    # bits 4 signed: L = 7, clip to [-2.5, 2.5]; dalpha = sign(x) * 1[|x| >= alpha]
    q = PACT(bits=4, signed=True, alpha=2.5)
    assert (q.grid.lo, q.grid.hi) == (-7, 7)
    x = torch.tensor([-5.0, -2.9, -0.4, 0.8, 2.2, 4.0], requires_grad=True)
    g = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    out = q(x)
    s = f16(2.5 / 7)  # the step at float16 precision
    expected = s * torch.clamp(torch.round(torch.tensor([-5.0, -2.9, -0.4, 0.8, 2.2, 4.0]) / s), -7, 7)
    assert torch.equal(out, expected)
    assert out[0].item() == pytest.approx(-2.5, rel=2**-11) and out[-1].item() == pytest.approx(2.5, rel=2**-11)
    out.backward(g)
    assert q.alpha.grad.item() == pytest.approx(-1.0 - 2.0 + 6.0)
    assert torch.allclose(x.grad, torch.tensor([0.0, 0.0, 3.0, 4.0, 5.0, 0.0]), rtol=1e-6, atol=0)


@pytest.mark.parametrize("signed", [False, True])
def test_matches_distiller_reference(signed):
    # IntelLabs/distiller LearnedClippedLinearQuantizeSTE, away from the measure-zero x = alpha.
    torch.manual_seed(0)
    alpha, bits = 1.7, 3
    x = torch.randn(200) * 1.5
    x = x[((x.abs() - alpha).abs() > 1e-3)]
    g = torch.randn_like(x)
    q = PACT(bits=bits, signed=signed, alpha=alpha)
    xr = x.clone().requires_grad_()
    q(xr).backward(g)
    L = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
    low = -alpha if signed else 0.0
    y = x.clamp(low, alpha)
    s = f16(alpha / L)  # Distiller's step alpha / L, at the float16 precision the forward uses
    ref = torch.round(y / s) * s
    assert torch.equal(q(x).detach(), ref)
    inside = (x > low) & (x < alpha)
    assert torch.allclose(xr.grad, g * inside, rtol=1e-6, atol=0)
    d_alpha = (g * (x >= alpha)).sum() - ((g * (x <= -alpha)).sum() if signed else 0)
    assert q.alpha.grad.item() == pytest.approx(d_alpha.item(), rel=1e-5)


@pytest.mark.parametrize("signed", [False, True])
def test_init_from_data_sets_alpha_to_max_abs(signed):
    x = torch.tensor([[0.5, -4.0, 2.0], [3.0, 0.1, -0.2]])
    q = PACT(bits=8, signed=signed)
    assert not q.initialized.item()
    q.init_(x)
    assert q.alpha.item() == 4.0
    assert q.alpha.shape == (1, 1, 1) and q.alpha.dtype == torch.float32
    assert isinstance(q.alpha, torch.nn.Parameter)


def test_first_forward_initialises_only_without_alpha():
    x = torch.tensor([0.5, 6.0, 2.0])
    q = PACT(bits=4)
    q(x)
    assert q.alpha.item() == 6.0
    p = PACT(bits=4, alpha=8.0)
    assert p.initialized.item()
    p(x)
    assert p.alpha.item() == 8.0  # a given alpha is not overwritten by data
    p.init_(x)  # but an explicit init_ sets it
    assert p.alpha.item() == 6.0


def test_init_keeps_parameter_object():
    q = PACT(bits=4, alpha=2.0)
    param = q.alpha
    q.init_(torch.tensor([1.0, 5.0]))
    assert q.alpha is param  # an optimizer holding it keeps training the same tensor


def test_all_zero_init_floor():
    q = PACT(bits=4).init_(torch.zeros(8))
    assert q.alpha.item() == pytest.approx(1e-5)
    assert torch.equal(q(torch.zeros(8)), torch.zeros(8))


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("signed", [False, True])
def test_codes_dequantize_bitwise(bits, signed):
    torch.manual_seed(1)
    x = torch.randn(4, 3, 8) * 2
    q = PACT(bits=bits, signed=signed).init_(x)
    with torch.no_grad():
        q.alpha.mul_(0.7)
    q.eval()
    c = q.codes(x)
    assert torch.equal(c.dequantize(), q(x))
    assert (c.lo, c.hi) == (q.grid.lo, q.grid.hi)
    assert c.codes.min() >= q.grid.lo and c.codes.max() <= q.grid.hi
    assert c.codes.min() == q.grid.lo and c.codes.max() == q.grid.hi  # clipped on both sides
    assert c.scale.dtype == torch.float32
    assert c.scale.item() == f16(q.alpha.item() / q.grid.hi).item()


def test_output_on_grid_and_idempotent():
    torch.manual_seed(2)
    x = torch.randn(64) * 2
    q = PACT(bits=3, alpha=1.5)
    out = q(x).detach()
    lv = out / f16(1.5 / 7)
    assert torch.allclose(lv, lv.round(), atol=1e-4)
    assert lv.round().min() >= 0 and lv.round().max() <= 7
    assert torch.equal(q(out), out)


@pytest.mark.parametrize("granularity", ["channel", "group", "token"])
def test_only_tensor_granularity(granularity):
    with pytest.raises(UserError, match="tensor"):
        PACT(granularity=granularity, group_size=8)


def test_bad_bits():
    with pytest.raises(UserError, match='bits=1'):
        PACT(bits=1)


def test_bf16():
    x = (torch.randn(16) * 2).bfloat16().requires_grad_()
    q = PACT(bits=4, alpha=2.0)
    out = q(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and q.alpha.grad.dtype == torch.float32


# -- the contract every quantizer shares ------------------------------------------------------


def test_integer_input_refused():
    with pytest.raises(UserError, match='floating-point'):
        PACT(bits=4).init_(torch.ones(8, dtype=torch.int32))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_init_refused(bad):
    x = torch.ones(8)
    x[2] = bad
    q = PACT(bits=4)
    with pytest.raises(UserError, match="non-finite"):
        q.init_(x)
    assert q.alpha.item() == 1.0 and not q.initialized.item()


@pytest.mark.parametrize("signed", [False, True])
def test_state_dict_round_trip_into_fresh_quantizer(signed):
    torch.manual_seed(3)
    x = torch.randn(32) * 3
    q = PACT(bits=4, signed=signed).init_(x)
    with torch.no_grad():
        q.alpha.mul_(0.9)
    fresh = PACT(bits=4, signed=signed)
    fresh.load_state_dict(q.state_dict())
    assert fresh.initialized.item()
    y = torch.randn(32) * 10  # must not re-initialise from y
    assert torch.equal(fresh(y), q(y))
    assert fresh.alpha.dtype == torch.float32 and fresh.alpha.item() > 0
