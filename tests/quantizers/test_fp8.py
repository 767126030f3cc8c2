"""FP8: E4M3 / E5M2 weights (per tensor or channel) and dynamic per-token activations (qat/quantizers/fp8.py)."""

import pytest
import torch

from qat.errors import UserError
from qat.estimators import STE, ClippedSTE, StochasticRounding
from qat.quantizers import FP8


def _w(seed=0, shape=(8, 64)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_e4m3_by_hand():
    # scale 448 / 448 = 1: 100 is half-way between 96 and 104 (spacing 8 in [64, 128)): to the even mantissa, 96;
    # 3.3 -> 3.25 (spacing 0.25 in [2, 4)); 0.001 -> 2^-9 * round(0.512) = 2^-9 (a subnormal)
    q = FP8("e4m3", granularity="tensor")
    assert q(torch.tensor([448.0, 100.0, 3.3, 0.001, -104.0])).tolist() == [448.0, 96.0, 3.25, 2.0**-9, -104.0]
    c = q.codes(torch.tensor([448.0, 100.0, 3.3, 0.001, -104.0]))
    assert c.codes.tolist() == [0x7E, 0x6C, 0x45, 0x01, 0xED]  # 96 = 1.5 * 2^6: 0 1101 100; -104: 1 1101 101


@pytest.mark.parametrize("format", ["e4m3", "e5m2"])
@pytest.mark.parametrize("granularity", ["tensor", "channel", "token"])
def test_matches_torch_cast_and_codes_dequantize_bitwise(format, granularity):
    w = _w(1) * torch.logspace(-3, 1, 64)  # a wide dynamic range, subnormals included
    q = FP8(format, granularity).init_(w)
    dtype = torch.float8_e4m3fn if format == "e4m3" else torch.float8_e5m2
    amax = w.abs().amax() if granularity == "tensor" else w.abs().amax(-1, keepdim=True)
    s = amax / (448.0 if format == "e4m3" else 57344.0)
    assert torch.equal(q(w), (w / s).to(dtype).float() * s)
    q.eval()
    c = q.codes(w)
    assert torch.equal(c.codes, (w / s).to(dtype).view(torch.uint8))
    assert torch.equal(c.dequantize(), q(w))
    assert c.codes.dtype == torch.uint8 and (c.lo, c.hi, c.bits, c.format) == (0, 255, 8, f"fp8_{format}")


def test_per_token_activations():
    x = _w(2, (2, 3, 64))
    x[1, 2] = 0.0  # an all-zero token stays zero
    q = FP8("e4m3", "token")
    out = q(x)
    s = x.abs().amax(-1, keepdim=True).clamp_min(2.0**-126) / 448
    assert torch.equal(out, (x / s).to(torch.float8_e4m3fn).float() * s)
    assert torch.equal(out[1, 2], torch.zeros(64))


def test_gradients():
    # the default clipped STE after rounding: the identity (nothing saturates with absmax scales)
    w = _w(3)
    wr = w.clone().requires_grad_()
    FP8("e4m3", "channel")(wr).sum().backward()
    assert torch.equal(wr.grad, torch.ones_like(w))
    assert isinstance(FP8().estimator, ClippedSTE) and FP8().estimator.after_round
    wr.grad = None
    FP8("e5m2", "tensor", estimator=STE())(wr * 2).sum().backward()
    assert torch.allclose(wr.grad, torch.full_like(w, 2.0))
    torch.manual_seed(0)
    q = FP8("e4m3", "tensor", estimator=StochasticRounding())
    x = torch.full((20000,), 100.5)  # between 96 and 104 once scaled by max 448
    x[0] = 448.0
    out = q(x)[1:]
    assert ((out == 96) | (out == 104)).all() and abs(out.mean().item() - 100.5) < 0.2


def test_rtn_and_bad_config():
    assert isinstance(FP8("e5m2", "tensor").rtn(), FP8) and FP8("e5m2", "tensor").rtn().format == "e5m2"
    with pytest.raises(UserError):
        FP8("e3m4")
    with pytest.raises(UserError, match="FP4"):
        FP8(granularity="group")
