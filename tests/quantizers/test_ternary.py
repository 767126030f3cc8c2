"""Ternary weights: BitNet absmean, TWN, ParetoQ SEQ and Tequila's dead-zone bias (qat/quantizers/ternary.py)."""

import math

import pytest
import torch

from qat.errors import UserError
from qat.estimators import STE
from qat.quantizers import Ternary

METHODS = ["absmean", "twn", "seq"]
GRANULARITIES = [("tensor", None), ("channel", None), ("group", 8)]


def _w(seed=0, shape=(4, 16)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def f16(v):
    """``v`` rounded to float16: the precision of the output scale the forward uses (and the export stores)."""
    return torch.as_tensor(v, dtype=torch.float32).half().float()


# -- ParetoQ SEQ --------------------------------------------------------------------------------


class StretchedElasticQuant(torch.autograd.Function):
    """facebookresearch/ParetoQ ``models/utils_quant.py``, transcribed for ``num_bits=0`` (ternary)."""

    @staticmethod
    def forward(ctx, input, alpha):
        eps = torch.tensor(0.00001).float()
        alpha = torch.where(alpha > eps, alpha, eps)
        grad_scale = 1.0 / math.sqrt(input.numel())  # Qp = 1 for num_bits 0
        ctx.save_for_backward(input, alpha)
        clip_val = 1 - 1e-2
        n_levels, shift = 1.5, 0
        Qp = (n_levels - shift) / n_levels
        ctx.other = grad_scale, -Qp, Qp
        q_w = (torch.round(torch.clamp(input / alpha, -clip_val, clip_val) * n_levels - shift) + shift) / n_levels
        return q_w * alpha

    @staticmethod
    def backward(ctx, grad_output):
        input_, alpha = ctx.saved_tensors
        grad_scale, Qn, Qp = ctx.other
        q_w = input_ / alpha
        clip_val = 1 - 1e-2
        n_levels, shift = 1.5, 0
        indicate_small = (q_w < -clip_val).float()
        indicate_big = (q_w > clip_val).float()
        indicate_middle = 1.0 - indicate_small - indicate_big
        grad_input = indicate_middle * grad_output
        grad_alpha = (
            (
                indicate_small * Qn
                + indicate_big * Qp
                + indicate_middle
                * (-q_w + (torch.round(torch.clamp(q_w, -clip_val, clip_val) * n_levels - shift) + shift) / n_levels)
            )
            * grad_output
            * grad_scale
        )
        grad_alpha = torch.sum(grad_alpha, dim=-1, keepdim=True)
        return grad_input, grad_alpha


def test_seq_example():
    q = Ternary("seq", granularity="channel")
    w = torch.tensor([[-0.8, -0.2, 0.3, 0.5]])
    q.init_(w)
    assert q.alpha.flatten().tolist() == [pytest.approx(0.8)]  # init max|w_row|
    with torch.no_grad():
        q.alpha.fill_(1.0)
    out = q(w)
    step = f16(1 / 1.5)  # alpha / 1.5 at float16 precision
    assert torch.equal(out, torch.tensor([[-1.0, 0.0, 0.0, 1.0]]) * step)
    assert torch.allclose(out, torch.tensor([[-2 / 3, 0.0, 0.0, 2 / 3]]), rtol=2**-11)
    c = q.codes(w)
    assert c.codes.tolist() == [[-1, 0, 0, 1]]
    assert c.scale.item() == step.item()


@pytest.mark.parametrize("method", METHODS)
def test_rtn_is_the_same_grid_untrained_without_bias(method):
    """qat-train's PTQ row: round-to-nearest on the run's own grid (SEQ: alpha at its init max|w|)."""
    q = Ternary(method, granularity="group", group_size=4, deadzone="tequila")
    w = torch.tensor([[-0.8, -0.2, 0.3, 0.5, 0.1, -0.05, 0.4, 0.2]])
    q.init_(w)
    if method == "seq":
        with torch.no_grad():
            q.alpha.mul_(2.0)  # training moved alpha: the RTN baseline must not inherit it
    r = q.rtn().init_(w)
    assert (r.method, r.granularity, r.group_size, r.deadzone) == (method, "group", 4, None)
    expected = {  # by hand, group [-0.8, -0.2, 0.3, 0.5] then [0.1, -0.05, 0.4, 0.2]
        # gamma = 0.45 / 0.1875, threshold gamma / 2
        "absmean": [[-1, 0, 1, 1, 1, 0, 1, 1]],
        # Delta = 0.7 * mean|w| = 0.315 / 0.13125
        "twn": [[-1, 0, 0, 1, 0, 0, 1, 1]],
        # alpha = max|w| = 0.8 / 0.4, threshold alpha / 3 = 0.2667 / 0.1333
        "seq": [[-1, 0, 1, 1, 0, 0, 1, 1]],
    }[method]
    assert r.codes(w).codes.tolist() == expected
    if method == "seq":
        assert r.alpha.flatten().tolist() == pytest.approx([0.8, 0.4])


def test_seq_backward_matches_paretoq():
    w = _w(1, (4, 16))
    grad = _w(2, (4, 16))
    q = Ternary("seq", granularity="channel").init_(w)
    with torch.no_grad():  # some rows clip (|w / alpha| > 0.99), some do not
        q.alpha.mul_(torch.tensor([0.6, 0.9, 1.0, 1.3]).view(4, 1, 1))
    wk = w.clone().requires_grad_()
    out = q(wk)
    out.backward(grad)
    alpha = q.alpha.detach().reshape(4, 1).clone().requires_grad_()
    wr = w.clone().requires_grad_()
    ref = StretchedElasticQuant.apply(wr, alpha)
    ref.backward(grad)
    # values: ours use the step alpha / 1.5 at float16 precision (half an ulp, 2^-11 relative)
    assert torch.allclose(out, ref, rtol=2**-11, atol=1e-7)
    assert torch.allclose(wk.grad, wr.grad, rtol=1e-6, atol=0)
    assert torch.allclose(q.alpha.grad.reshape(4, 1), alpha.grad, rtol=1e-5, atol=1e-7)
    r = (w / alpha.detach()).abs()
    assert (r > 0.99).any() and (r <= 0.99).any()


def test_seq_alpha_gradient_quirk_by_hand():
    # Outside the clip the alpha-gradient is sign(w) * Qp with Qp = 1, although the value is 2/3.
    q = Ternary("seq", granularity="channel").init_(torch.ones(1, 2))
    with torch.no_grad():
        q.alpha.fill_(1.0)
    w = torch.tensor([[2.0, 0.3]], requires_grad=True)
    q(w).sum().backward()
    # inside (0.3): round(0.45) / 1.5 - 0.3 = -0.3; outside: 1. Times 1 / sqrt(numel = 2).
    assert q.alpha.grad.item() == pytest.approx((1.0 - 0.3) / math.sqrt(2))
    assert w.grad.tolist() == [[0.0, 1.0]]


def test_seq_group_gradients_per_group():
    w = _w(3, (2, 16))
    q = Ternary("seq", granularity="group", group_size=8).init_(w)
    assert q.alpha.shape == (2, 2, 1)
    assert torch.allclose(q.alpha, w.reshape(2, 2, 8).abs().amax(-1, keepdim=True))
    q(w).sum().backward()
    assert q.alpha.grad.shape == (2, 2, 1)
    # Per group, each group's alpha only sees its own elements: compare with per-group SEQ.
    for r in range(2):
        for j in range(2):
            a = q.alpha[r, j].detach().reshape(1, 1).clone().requires_grad_()
            StretchedElasticQuant.apply(w[r : r + 1, 8 * j : 8 * j + 8], a).sum().backward()
            # ParetoQ's 1/sqrt(numel) on the slice (8) vs the whole tensor (32)
            assert q.alpha.grad[r, j].item() == pytest.approx(a.grad.item() * math.sqrt(8 / 32), rel=1e-5)


# -- BitNet absmean -----------------------------------------------------------------------------


def test_absmean_threshold_is_half_gamma():
    w = torch.linspace(-2, 2, 4001).reshape(1, -1)
    q = Ternary("absmean", granularity="channel")
    out = q(w)
    gamma = w.abs().mean().item()
    a = w.abs()
    assert (out[a < 0.49 * gamma] == 0).all()
    g16 = f16(gamma).item()  # the scale at float16 precision
    assert (out[a > 0.51 * gamma].abs() == pytest.approx(g16, rel=1e-6))
    assert out.unique().tolist() == pytest.approx([-g16, 0.0, g16], rel=1e-6)
    threshold = a[out != 0].min().item()
    assert 0.49 * gamma < threshold < 0.51 * gamma


def test_absmean_identity_backward():
    w = (_w(4, (4, 16)) * 3).requires_grad_()
    g = _w(5, (4, 16))
    Ternary("absmean", granularity="channel")(w).backward(g)
    assert torch.allclose(w.grad, g, rtol=1e-6, atol=0)  # no clip mask, no gradient to gamma


# -- TWN ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("granularity,gs", GRANULARITIES)
def test_twn_alpha_is_mean_of_survivors(granularity, gs):
    w = _w(6, (4, 16))
    q = Ternary("twn", granularity=granularity, group_size=gs)
    out = q(w)
    g = q._view(w)
    og = q._view(out)
    alphas = []
    for r in range(g.shape[0]):
        for j in range(g.shape[1]):
            x = g[r, j]
            delta = 0.7 * x.abs().mean()
            keep = x.abs() > delta
            alpha = x.abs()[keep].mean()
            alphas.append(alpha)
            assert torch.allclose(og[r, j], f16(alpha) * torch.sign(x) * keep, rtol=1e-6, atol=0)
    assert torch.allclose(q.codes(w).scale.flatten(), f16(torch.stack(alphas)), rtol=1e-6)


def test_twn_by_hand():
    # mean|w| = 0.5, Delta = 0.35: survivors 0.9, -0.6, 0.4, 0.7 -> alpha = 2.6 / 4
    w = torch.tensor([[0.9, -0.6, 0.4, 0.1, -0.3, 0.7]])  # mean 0.5, Delta 0.35
    out = Ternary("twn", granularity="channel")(w)
    alpha = f16((0.9 + 0.6 + 0.4 + 0.7) / 4)  # at float16 precision
    assert torch.allclose(out, alpha * torch.tensor([[1.0, -1, 1, 0, 0, 1]]), rtol=1e-6)


def test_twn_identity_backward():
    w = _w(7, (4, 16)).requires_grad_()
    g = _w(8, (4, 16))
    Ternary("twn")(w).backward(g)
    assert torch.allclose(w.grad, g, rtol=1e-6, atol=0)


# -- Tequila --------------------------------------------------------------------------------------


def test_tequila_example():
    q = Ternary("absmean", granularity="group", group_size=4, deadzone="tequila", lam=1e-3)
    w = torch.tensor([[0.4, -0.05, 0.1, -0.6]])
    out = q(w)
    gamma = 0.2875
    # the forward uses gamma at float16 precision: 0.28759765625
    assert torch.equal(out, torch.tensor([[1.0, 0.0, 0.0, -1.0]]) * f16(gamma))
    assert f16(gamma).item() == 0.28759765625
    assert q._stats(q._view(w))[0].item() == pytest.approx(gamma)
    b = q.bias(w, out)
    assert b.shape == (1,)
    assert b.item() == pytest.approx(5e-5, rel=1e-4)  # 1e-3 * (-0.05 + 0.1)


@pytest.mark.parametrize("granularity,gs", GRANULARITIES)
def test_tequila_dead_zone_gradient(granularity, gs):
    torch.manual_seed(0)
    lam = 1e-3
    q = Ternary("absmean", granularity=granularity, group_size=gs, deadzone="tequila", lam=lam)
    w = _w(9, (3, 16)).requires_grad_()
    x = torch.randn(5, 16)
    bias = torch.randn(3)
    gy = torch.randn(5, 3)
    w_hat = q(w)
    y = x @ w_hat.T + q.bias(w, w_hat) + bias
    y.backward(gy)
    dead = (w_hat == 0).detach()
    assert dead.any() and (~dead).any()
    g_a = gy.T @ x  # identity STE through w_hat
    expected = g_a + lam * gy.sum(0)[:, None] * dead
    assert torch.allclose(w.grad, expected, rtol=1e-5, atol=1e-6)
    # the folded-bias layer equals the training layer in fp32
    c = q.codes(w.detach())
    y_export = x @ c.dequantize().T + c.bias + bias
    assert torch.equal(y_export, y.detach())


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("granularity,gs", GRANULARITIES)
@pytest.mark.parametrize("deadzone", [None, "tequila"])
def test_codes_dequantize_bitwise(method, granularity, gs, deadzone):
    w = _w(10, (4, 16))
    q = Ternary(method, granularity=granularity, group_size=gs, deadzone=deadzone).init_(w)
    if method == "seq":
        with torch.no_grad():
            q.alpha.mul_(0.8)
    q.eval()
    c = q.codes(w)
    out = q(w)
    assert torch.equal(c.dequantize(), out)
    assert c.codes.dtype == torch.int8
    assert set(c.codes.unique().tolist()) <= {-1, 0, 1}
    assert (c.lo, c.hi) == (-1, 1)
    assert c.bits == pytest.approx(math.log2(3))
    assert c.scale.dtype == torch.float32 and (c.scale > 0).all()
    if deadzone is None:
        assert c.bias is None and q.bias(w, out) is None
    else:
        assert c.bias.shape == (4,)
        assert torch.equal(c.bias, q.bias(w, out))


@pytest.mark.parametrize("method", METHODS)
def test_idempotent_and_on_grid(method):
    w = _w(11, (4, 16))
    q = Ternary(method, granularity="channel").init_(w)
    once = q(w).detach()
    if method == "seq":  # a learned alpha: the value is idempotent
        assert torch.equal(q(once), once)
    else:  # gamma / alpha are statistics of the input: Q(Q(w)) keeps the pattern, with its own scale
        assert torch.equal(torch.sign(q(once)), torch.sign(once))
    # each row takes at most three values {-a, 0, a}
    for row in once:
        assert len(row.abs().unique()) <= 2


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(method="bitnet"),
        dict(method="absmean", deadzone="other"),
        dict(method="absmean", bits=3),
        dict(method="absmean", bits=True),
        dict(method="absmean", bits=1),
        dict(method="absmean", symmetric=False),
        dict(method="absmean", granularity="token"),
        dict(method="absmean", granularity="group"),
        dict(method="absmean", granularity="row"),
    ],
)
def test_bad_config(kwargs):
    with pytest.raises(UserError):
        Ternary(**kwargs)


def test_accepted_config():
    q = Ternary("seq", bits=2, granularity="group", group_size=128, deadzone="tequila", lam=2e-3)
    assert q.lam == 2e-3 and q.grid.lo == -1 and q.grid.hi == 1
    assert isinstance(q.estimator, STE)
    assert q.bits == pytest.approx(1.585, abs=1e-3)


def test_bf16():
    w = _w(12, (4, 16)).bfloat16().requires_grad_()
    for method in METHODS:
        q = Ternary(method)
        out = q(w)
        assert out.dtype == torch.bfloat16
        out.float().sum().backward()
        assert w.grad.dtype == torch.bfloat16
        w.grad = None
        if method == "seq":
            assert q.alpha.dtype == torch.float32


# -- the contract every quantizer shares ------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_integer_input_refused(method):
    with pytest.raises(UserError, match='floating-point'):
        Ternary(method).init_(torch.ones(4, 16, dtype=torch.int32))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bad", [float("nan"), float("-inf")])
def test_non_finite_init_refused(method, bad):
    w = _w(13, (4, 16))
    w[0, 5] = bad
    with pytest.raises(UserError, match="non-finite"):
        Ternary(method).init_(w)


def test_seq_alpha_float32_positive():
    q = Ternary("seq", granularity="group", group_size=8).init_(_w(14, (4, 16)).double())
    assert q.alpha.dtype == torch.float32 and (q.alpha > 0).all()
    q = Ternary("seq").init_(torch.zeros(2, 8))
    assert torch.allclose(q.alpha, torch.full((2, 1, 1), 1e-5))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("deadzone", [None, "tequila"])
def test_state_dict_round_trip_into_fresh_quantizer(method, deadzone):
    w = _w(15, (4, 16))
    cfg = dict(method=method, granularity="group", group_size=8, deadzone=deadzone)
    q = Ternary(**cfg).init_(w)
    if method == "seq":
        with torch.no_grad():
            q.alpha.mul_(0.7)
    fresh = Ternary(**cfg)
    fresh.load_state_dict(q.state_dict())
    assert fresh.initialized.item()
    w2 = 2 * _w(16, (4, 16))
    assert torch.equal(fresh(w2), q(w2))
    assert torch.equal(fresh(w), q(w))
