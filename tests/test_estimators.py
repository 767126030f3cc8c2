"""Gradient estimators for rounding (qat/estimators.py), checked against hand-computed values."""

import math

import pytest
import torch

from qat.errors import UserError
from qat.estimators import (
    DSQ,
    EWGS,
    STE,
    AdditiveNoise,
    ClippedSTE,
    Estimator,
    StochasticRounding,
    ewgs_delta_from_hessian,
    hard_round,
)
from qat.quantizers.fake_quant import fake_quant

ALL = [STE, ClippedSTE, EWGS, StochasticRounding, AdditiveNoise, DSQ]


def test_hard_round_ties_to_even_and_clips():
    u = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.6, 3.7, 0.49])
    assert hard_round(u, -2, 1).tolist() == [0.0, 1.0, 1.0, 0.0, -2.0, -2.0, 1.0, 0.0]
    lo = torch.tensor([[[-1.0], [0.0]]])
    hi = torch.tensor([[[2.0], [3.0]]])
    u = torch.tensor([[[-3.0, 0.6, 9.0], [-3.0, 0.6, 9.0]]])
    assert hard_round(u, lo, hi).tolist() == [[[-1.0, 1.0, 2.0], [0.0, 1.0, 3.0]]]


@pytest.mark.parametrize("cls", ALL)
def test_eval_rounds_to_nearest(cls):
    torch.manual_seed(0)
    u = torch.randn(1000) * 4
    est = cls().eval()
    assert torch.equal(est.quantize(u, -4, 3), hard_round(u, -4, 3))
    assert torch.equal(est.quantize(u, -4, 3), est.quantize(u, -4, 3))


@pytest.mark.parametrize("cls", [STE, ClippedSTE, EWGS])
def test_hard_estimators_round_in_training(cls):
    u = torch.randn(100) * 4
    assert torch.equal(cls().train().quantize(u, -4, 3), hard_round(u, -4, 3))


def test_base_vjp_is_abstract():
    with pytest.raises(NotImplementedError):
        Estimator().vjp(torch.zeros(1), torch.zeros(1), torch.zeros(1), -1, 1)


# -- straight-through family ------------------------------------------------------------------


def test_ste_vjp_is_identity_including_the_clip():
    u = torch.tensor([-5.0, -2.0, 0.3, 1.0, 4.0])
    g = torch.tensor([1.0, -2.0, 3.0, 0.5, 7.0])
    assert torch.equal(STE().vjp(u, hard_round(u, -2, 1), g, -2, 1), g)


def test_clipped_ste_vjp_mask_is_inclusive():
    u = torch.tensor([-2.5, -2.0, 0.3, 1.0, 1.2, -2.0001])
    g = torch.tensor([1.0, -2.0, 3.0, 0.5, 7.0, 4.0])
    out = ClippedSTE().vjp(u, hard_round(u, -2, 1), g, -2, 1)
    assert out.tolist() == [0.0, -2.0, 3.0, 0.5, 0.0, 0.0]


def test_clipped_ste_after_round_masks_the_rounded_value():
    # round: -3, -2 (tie to even), -2, 1, 1, 2 (tie to even) -> inside [-2, 1]: 0 1 1 1 1 0
    u = torch.tensor([-2.6, -2.5, -2.4, 1.2, 1.4, 1.5])
    g = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    out = ClippedSTE(after_round=True).vjp(u, hard_round(u, -2, 1), g, -2, 1)
    assert out.tolist() == [0.0, 2.0, 3.0, 4.0, 5.0, 0.0]
    assert "after_round=True" in repr(ClippedSTE(after_round=True))


def test_clipped_ste_tensor_bounds():
    lo = torch.tensor([[[-1.0], [0.0]]])
    hi = torch.tensor([[[2.0], [3.0]]])
    u = torch.tensor([[[-0.5, 2.5, -1.0], [-0.5, 2.5, 3.0]]])
    g = torch.ones_like(u)
    assert ClippedSTE().vjp(u, u, g, lo, hi).tolist() == [[[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]]


def test_ewgs_delta_zero_equals_clipped_ste():
    torch.manual_seed(0)
    u = torch.randn(4, 3, 8) * 5
    q = hard_round(u, -4, 3)
    g = torch.randn_like(u)
    assert torch.equal(EWGS(0.0).vjp(u, q, g, -4, 3), ClippedSTE().vjp(u, q, g, -4, 3))


def test_ewgs_hand_values():
    # [lo, hi] = [-2, 1]: span 3. scale = 1 + delta * sign(g) * (u - q) / 3 inside, 0 outside.
    est = EWGS(0.1)
    u = torch.tensor([0.3, 0.3, -0.4, 0.9, 1.7, -2.6])
    q = hard_round(u, -2, 1)  # 0, 0, 0, 1, 1, -2
    g = torch.tensor([2.0, -2.0, 1.0, 1.0, 1.0, 1.0])
    expected = [
        2.0 * (1 + 0.1 * 0.3 / 3),  # 2.02
        -2.0 * (1 - 0.1 * 0.3 / 3),  # -1.98
        1.0 * (1 + 0.1 * -0.4 / 3),  # 0.98667
        1.0 * (1 + 0.1 * -0.1 / 3),  # 0.99667
        0.0,
        0.0,
    ]
    assert torch.allclose(est.vjp(u, q, g, -2, 1), torch.tensor(expected), rtol=0, atol=1e-7)
    assert torch.allclose(est.vjp(u, q, g, -2, 1)[:2], torch.tensor([2.02, -1.98]), atol=1e-6)


def test_ewgs_normalises_by_the_grid_span():
    # The same level-unit error is scaled by 1 / (hi - lo): the [0, 1]-normalised domain.
    u, q, g = torch.tensor([0.3]), torch.tensor([0.0]), torch.tensor([1.0])
    narrow = EWGS(1.0).vjp(u, q, g, -1, 1) - 1  # 0.3 / 2
    wide = EWGS(1.0).vjp(u, q, g, -128, 127) - 1  # 0.3 / 255
    assert torch.allclose(narrow, torch.tensor([0.15]))
    assert torch.allclose(wide, torch.tensor([0.3 / 255]))


@pytest.mark.parametrize("delta", [-1e-3, float("nan")])
def test_ewgs_bad_delta(delta):
    with pytest.raises(UserError, match="delta"):
        EWGS(delta)


def test_ewgs_delta_from_hessian():
    assert ewgs_delta_from_hessian(0.6, 0.1) == pytest.approx(2.0)
    assert ewgs_delta_from_hessian(-0.6, 0.1) == 0.0  # Tr(H) clipped at 0
    assert ewgs_delta_from_hessian(0.6, 0.0) == 0.0
    assert ewgs_delta_from_hessian(0.6, float("inf")) == 0.0
    assert ewgs_delta_from_hessian(0.6, float("nan")) == 0.0


# -- stochastic -------------------------------------------------------------------------------


@pytest.mark.parametrize("u0", [0.3, -1.7, 2.75])
def test_stochastic_rounding_is_unbiased(u0):
    torch.manual_seed(0)
    n = 100_000
    u = torch.full((n,), u0)
    q = StochasticRounding().train().quantize(u, -4, 3)
    lo = math.floor(u0)
    assert set(q.unique().tolist()) <= {lo, lo + 1.0}
    p = u0 - lo
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(q.double().mean().item() - u0) < 3 * sigma


def test_stochastic_rounding_clips_and_keeps_integers():
    torch.manual_seed(0)
    u = torch.tensor([-9.0, -4.0, 3.0, 9.0, 1.0])
    q = StochasticRounding().train().quantize(u, -4, 3)
    assert q.tolist() == [-4.0, -4.0, 3.0, 3.0, 1.0]


def test_stochastic_rounding_deterministic_at_eval():
    torch.manual_seed(0)
    est = StochasticRounding()
    u = torch.randn(10_000) * 3
    torch.manual_seed(1)
    a = est.quantize(u, -4, 3)
    torch.manual_seed(2)
    b = est.quantize(u, -4, 3)
    assert not torch.equal(a, b)  # training: random
    est.eval()
    torch.manual_seed(1)
    a = est.quantize(u, -4, 3)
    torch.manual_seed(2)
    b = est.quantize(u, -4, 3)
    assert torch.equal(a, b)
    assert torch.equal(a, hard_round(u, -4, 3))


def test_stochastic_rounding_inside_a_quantizer_module_eval():
    from qat.quantizers import LSQ

    q = LSQ(bits=4, granularity="tensor", estimator=StochasticRounding())
    w = torch.randn(8, 8)
    q.init_(w)
    q.eval()
    assert torch.equal(q(w), q(w))
    assert torch.equal(q(w), q.codes(w).dequantize())


@pytest.mark.parametrize("cls", [StochasticRounding, AdditiveNoise])
def test_stochastic_vjp_is_clipped_identity(cls):
    u = torch.tensor([-5.0, -4.0, 0.3, 3.0, 3.2])
    g = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert cls().vjp(u, u, g, -4, 3).tolist() == [0.0, 2.0, 3.0, 4.0, 0.0]
    assert cls.stochastic


@pytest.mark.parametrize("distribution,std", [("uniform", 1 / math.sqrt(12)), ("gaussian", 0.5)])
def test_additive_noise_std_in_level_units(distribution, std):
    torch.manual_seed(0)
    n = 100_000
    u = torch.rand(n) * 6 - 3  # inside [-4, 3]: no clipping
    est = AdditiveNoise(distribution).train()
    eps = est.quantize(u, -4, 3) - u
    assert abs(eps.std().item() - std) < 0.01 * std
    assert abs(eps.mean().item()) < 4 * std / math.sqrt(n)
    if distribution == "uniform":
        assert eps.abs().max().item() <= 0.5
    # Through the kernel the noise is in steps: value noise = s * eps, so (x_hat - x) / s has the same std.
    s = torch.tensor(0.25)
    x = (u * s).reshape(1, 1, -1)
    torch.manual_seed(1)
    noise = (fake_quant(x, s, -4, 3, est) - x) / s
    assert abs(noise.std().item() - std) < 0.01 * std


def test_additive_noise_clips_before_adding():
    torch.manual_seed(0)
    u = torch.full((10_000,), 50.0)
    q = AdditiveNoise("uniform").train().quantize(u, -4, 3)
    assert (q - 3).abs().max().item() <= 0.5


def test_additive_noise_bad_distribution():
    with pytest.raises(UserError, match="distribution"):
        AdditiveNoise("laplace")


# -- DSQ --------------------------------------------------------------------------------------


def _dsq(alpha, u, lo=-4, hi=3):
    est = DSQ(alpha).train()
    with torch.no_grad():
        return est.quantize(u, lo, hi)


def test_dsq_hand_value():
    # alpha = 0.2, [lo, hi] = [-2, 1], u = 0.3: bin i = floor(2.3) = 2, centre m = 0.5,
    # k = ln(2 / 0.2 - 1) = ln 9, phi = tanh(k * (u - m)) / (1 - alpha), q = lo + i + (phi + 1) / 2.
    k = math.log(9.0)
    phi = math.tanh(k * (0.3 - 0.5)) / 0.8
    expected = -2 + 2 + (phi + 1) / 2
    got = _dsq(0.2, torch.tensor([0.3]), -2, 1)
    assert got.item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(0.24176, abs=1e-5)


def test_dsq_is_exact_at_the_levels_and_continuous():
    # phi(m +- 1/2) = +-1: the soft staircase passes through every integer level, the top edge too.
    u = torch.arange(-4.0, 4.0)  # -4 .. 3
    assert torch.allclose(_dsq(0.2, u), u, atol=1e-5)
    # Outside the range it is clipped.
    assert torch.allclose(_dsq(0.2, torch.tensor([-7.0, 9.0])), torch.tensor([-4.0, 3.0]), atol=1e-5)
    # Continuity across a bin edge.
    e = 1e-4
    left, right = _dsq(0.3, torch.tensor([1.0 - e, 1.0 + e]))
    assert abs(left.item() - right.item()) < 1e-2


def test_dsq_approaches_hard_rounding_as_alpha_goes_to_zero():
    u = torch.linspace(-3.9, 2.9, 1361)
    far = (u - (torch.floor(u) + 0.5)).abs() >= 0.2  # away from the rounding thresholds
    hard = hard_round(u, -4, 3)
    errors = [(_dsq(a, u) - hard)[far].abs().max().item() for a in (0.5, 0.2, 0.05, 0.01, 1e-3, 1e-4)]
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.02
    mean_err = [(_dsq(a, u) - hard).abs().mean().item() for a in (0.5, 0.05, 1e-4)]
    assert mean_err[0] > mean_err[1] > mean_err[2]
    # The deploy rule sign(phi) is hard rounding for every alpha.
    for a in (0.5, 0.2, 0.05):
        soft = _dsq(a, u)
        side = torch.sign(soft - (torch.floor(u) + 0.5))
        assert torch.equal(side[far], torch.sign(hard - (torch.floor(u) + 0.5))[far])


def test_dsq_equals_hard_rounding_at_eval():
    u = torch.randn(1000) * 3
    est = DSQ(0.4).eval()
    assert torch.equal(est.quantize(u, -4, 3), hard_round(u, -4, 3))


def test_dsq_alpha_receives_a_gradient():
    est = DSQ(0.2).train()
    u = (torch.randn(64) * 2).requires_grad_()
    est.quantize(u, -4, 3).pow(2).sum().backward()
    assert est.alpha.grad is not None
    assert torch.isfinite(est.alpha.grad).all() and est.alpha.grad.abs().item() > 0
    assert u.grad is not None and (u.grad.abs() > 0).any()


def test_dsq_gradcheck_float64():
    est = DSQ(0.3).double().train()
    u = torch.tensor([-3.7, -2.2, -0.6, 0.3, 0.45, 1.9, 2.6], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: est.quantize(v, -4, 3), (u,))
    # alpha: analytic gradient against a central difference.
    u = u.detach()
    est.zero_grad()
    est.quantize(u, -4, 3).sum().backward()
    analytic = est.alpha.grad.item()
    h = 1e-6
    with torch.no_grad():
        est.alpha += h
        up = est.quantize(u, -4, 3).sum().item()
        est.alpha -= 2 * h
        down = est.quantize(u, -4, 3).sum().item()
    assert analytic == pytest.approx((up - down) / (2 * h), rel=1e-6)


def test_dsq_backward_in_eval_is_clipped_ste():
    # Eval forward is hard rounding; a backward through it (Hessian estimate, saliency) must work.
    est = DSQ(0.2).eval()
    x = torch.tensor([[[0.3, -5.0, 0.7, 9.0]]], requires_grad=True)
    fake_quant(x, torch.tensor(0.5), -4, 3, est).sum().backward()
    assert x.grad.tolist() == [[[1.0, 0.0, 1.0, 0.0]]]


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.1, 1.5])
def test_dsq_bad_alpha(alpha):
    with pytest.raises(UserError, match="alpha"):
        DSQ(alpha)


def test_flags():
    assert DSQ.differentiable and not DSQ.stochastic
    assert StochasticRounding.stochastic and AdditiveNoise.stochastic
    assert not (STE.stochastic or ClippedSTE.stochastic or EWGS.stochastic)
    assert not (STE.differentiable or ClippedSTE.differentiable or EWGS.differentiable)
