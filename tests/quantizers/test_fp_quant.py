"""The FP fake-quantization kernel (qat/quantizers/fp_quant.py): custom backward against autograd, estimators on E2M1."""

import pytest
import torch

from qat.estimators import DSQ, EWGS, STE, ClippedSTE, StochasticRounding
from qat.fp_formats import E2M1, E4M3
from qat.quantizers.fp_quant import fp_fake_quant, fp_round


def _data(seed=0, shape=(3, 2, 16)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 2
    s = torch.rand(shape[0], shape[1], 1, generator=g) * 0.4 + 0.2  # some values saturate (|x / s| > 6)
    return x, s


def _reference(x, s, s_out, fmt, clip: str):
    """Autograd through the straight-through formula: round_ste in level units, the clip differentiated."""
    v = x / s
    d = fmt.step(v)
    u = v / d
    bound = fmt.max / d
    if clip == "none":  # STE: the clip's gradient too is the identity
        q = (torch.round(u).clamp(-bound, bound) - u).detach() + u
    else:
        uc = torch.clamp(u, -bound, bound)
        q = (torch.round(uc) - uc).detach() + uc
    return q * d * (s if s_out is None else s_out)


@pytest.mark.parametrize("fmt", [E2M1, E4M3], ids=["e2m1", "e4m3"])
@pytest.mark.parametrize("estimator,clip", [(ClippedSTE(), "clip"), (STE(), "none")], ids=["clipped", "ste"])
@pytest.mark.parametrize("dual", [False, True], ids=["lsq", "dual"])
def test_backward_matches_autograd_reference(fmt, estimator, clip, dual):
    x, s = _data()
    if fmt is E4M3:
        x = x * 100
    s_out = (s * 1.1).requires_grad_() if dual else None
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    leaves = []
    for fn in (lambda a, b, c: fp_fake_quant(a, b, fmt, estimator, c), lambda a, b, c: _reference(a, b, c, fmt, clip)):
        xr, sr = x.clone().requires_grad_(), s.clone().requires_grad_()
        so = s_out.detach().clone().requires_grad_() if dual else None
        out = fn(xr, sr, so)
        (out * grad).sum().backward()
        leaves.append((out.detach(), xr.grad, sr.grad, so.grad if dual else None))
    (o1, gx1, gs1, go1), (o2, gx2, gs2, go2) = leaves
    assert torch.equal(o1, o2)
    assert torch.allclose(gx1, gx2, rtol=1e-6, atol=1e-7)
    assert torch.allclose(gs1, gs2, rtol=1e-5, atol=1e-5)
    if dual:
        assert torch.allclose(go1, go2, rtol=1e-6, atol=1e-6)
    if clip == "clip":
        assert (gx1 == 0).any()  # saturated values are masked


def test_forward_is_the_format_rounding():
    x, s = _data(2)
    assert torch.equal(fp_fake_quant(x, s, E2M1, ClippedSTE()), E2M1.round(x / s) * s)
    assert torch.equal(fp_round(x, s, E2M1, ClippedSTE()), E2M1.round(x / s))


def test_ewgs_scales_by_the_error_over_the_whole_range():
    # one value at v = 1.3 (spacing 0.5, u = 2.6 -> q = 3): the error u - q over hi - lo = 2 * 6 / 0.5 = 24
    x, s = torch.tensor([[[1.3]]], requires_grad=True), torch.tensor([[[1.0]]])
    fp_fake_quant(x, s, E2M1, EWGS(delta=0.5)).sum().backward()
    u = torch.tensor(1.3) / 0.5
    assert x.grad.item() == pytest.approx(1 + 0.5 * (u - 3).item() / 24, rel=1e-6)


def test_stochastic_rounding_is_unbiased_between_neighbouring_levels():
    torch.manual_seed(0)
    v = torch.tensor([0.3, 1.3, 2.6, 4.4, 5.9]).repeat(20000, 1)
    out = fp_fake_quant(v.unsqueeze(1), torch.ones(1, 1, 1), E2M1, StochasticRounding().train()).squeeze(1)
    below, above = torch.tensor([0.0, 1.0, 2.0, 4.0, 4.0]), torch.tensor([0.5, 1.5, 3.0, 6.0, 6.0])
    assert ((out == below) | (out == above)).all()
    sigma = ((above - below) / 2) / 20000**0.5
    assert ((out.mean(0) - v[0]).abs() < 4 * sigma).all()


def test_dsq_trains_through_autograd_and_rounds_in_eval():
    x, s = _data(3)
    est = DSQ(0.2)
    sr = s.clone().requires_grad_()
    fp_fake_quant(x, sr, E2M1, est).sum().backward()
    assert est.alpha.grad is not None and est.alpha.grad.item() != 0 and sr.grad is not None
    est.eval()
    assert torch.equal(fp_fake_quant(x, s, E2M1, est), E2M1.round(x / s) * s)
