"""OmniQuant's learnable weight clipping (qat/quantizers/lwc.py)."""

import math

import pytest
import torch

from qat.errors import UserError
from qat.estimators import ClippedSTE
from qat.quantizers import LWC, MinMax

SIG4 = 1 / (1 + math.exp(-4.0))  # 0.98201


def round_ste(u):
    return (torch.round(u) - u).detach() + u


def f16(v):
    """``v`` rounded to float16: the precision of the step the forward uses (and the export stores)."""
    return torch.as_tensor(v, dtype=torch.float32).half().float()


def omniquant(w, a, c, bits, symmetric, group=None, zero_ste=False):
    """OpenGVLab/OmniQuant ``UniformAffineQuantizer`` with LWC, written with autograd.

    The min/max statistics are taken without gradient (qat's documented decision); ``z`` is
    rounded with a plain ``round`` (no gradient), or with round_ste as EfficientQAT does. The step
    is used at float16 precision (straight-through), as qat trains with the step the export stores;
    ``z`` comes from the float32 step, as in qat.
    """
    rows = w.shape[0]
    wg = w.reshape(rows, -1, group or w.shape[1])
    xmax = wg.detach().amax(-1, keepdim=True)
    xmin = wg.detach().amin(-1, keepdim=True)
    xmax = torch.sigmoid(a) * xmax
    xmin = torch.sigmoid(c) * xmin
    if symmetric:
        abs_max = torch.max(xmax.abs(), xmin.abs())
        scale = (abs_max / (2 ** (bits - 1) - 1)).clamp(min=1e-5, max=1e4)
        zero_point = (2 ** (bits - 1) - 1) * torch.ones_like(scale)
    else:
        scale = ((xmax - xmin) / (2**bits - 1)).clamp(min=1e-5, max=1e4)
        zero_point = -xmin / scale
    zero_point = zero_point.clamp(min=-1e4, max=1e4)
    rzp = round_ste(zero_point) if zero_ste else zero_point.round()
    scale = scale + (f16(scale.detach()) - scale).detach()
    x_int = (round_ste(wg / scale) + rzp).clamp(0, 2**bits - 1)
    return ((x_int - rzp) * scale).reshape(w.shape)


def _w(seed=0, shape=(4, 16)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_init_logits():
    w = _w(0, (4, 16))
    q = LWC(bits=4, granularity="group", group_size=8).init_(w)
    for p in (q.upper, q.lower):
        assert isinstance(p, torch.nn.Parameter) and p.dtype == torch.float32
        assert torch.equal(p, torch.full((4, 2, 1), 4.0))
    assert LWC(bits=4, init=2.0).init_(w).upper.flatten().tolist() == [2.0] * 4


def test_forward_by_hand():
    # bits 2: L = 3. max 1.0, min -0.5 -> up = 0.982, low = -0.491, h = 1.473 / 3, z = round(low / -h) = 1
    w = torch.tensor([[-0.5, -0.1, 0.3, 0.7, 1.0]])
    q = LWC(bits=2)
    out = q(w)
    h = f16(SIG4 * 1.5 / 3)  # the step at float16 precision
    assert torch.allclose(out, h * torch.tensor([[-1.0, 0, 1, 1, 2]]), rtol=1e-6)
    c = q.codes(w)
    assert c.codes.tolist() == [[0, 1, 2, 2, 3]]
    assert c.zero.flatten().tolist() == [1.0]
    assert c.scale.item() == h.item()


def test_init_is_close_to_but_not_min_max():
    w = _w(1, (4, 32))
    q = LWC(bits=4).init_(w)
    h, z = q._step_and_zero(q._view(w))
    xmax, xmin = w.amax(1), w.amin(1)
    rtn = (xmax - xmin) / 15
    assert torch.allclose(h.flatten(), SIG4 * rtn, rtol=1e-6)  # shrunk by sigmoid(4)
    assert (h.flatten() < rtn).all()
    # the clipping range [h * -z, h * (15 - z)] is within a step of [min, max] but not equal to it
    top, bottom = (h * (15 - z)).flatten(), (-h * z).flatten()
    assert ((top - xmax).abs() <= h.flatten()).all() and ((bottom - xmin).abs() <= h.flatten()).all()
    assert not torch.allclose(top, xmax) and not torch.allclose(bottom, xmin)
    out = q(w)
    assert not torch.equal(out, MinMax(bits=4, symmetric=False)(w))
    assert torch.allclose(out, MinMax(bits=4, symmetric=False)(w), atol=2 * rtn.max().item())


@pytest.mark.parametrize("shift", [0.0, -4.0], ids=["near_init", "clipping"])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("granularity,gs", [("channel", None), ("group", 8)])
def test_backward_matches_omniquant_reference(shift, symmetric, bits, granularity, gs):
    w = _w(2, (4, 16)) + 0.2
    grad = _w(3, (4, 16))
    q = LWC(bits=bits, granularity=granularity, group_size=gs, symmetric=symmetric).init_(w)
    with torch.no_grad():  # away from the init so the logits differ; shift -4 clips about half the range
        q.upper.add_(shift + 0.5 * torch.randn(q.upper.shape, generator=torch.Generator().manual_seed(4)))
        q.lower.add_(shift + 0.5 * torch.randn(q.lower.shape, generator=torch.Generator().manual_seed(5)))
    wk = w.clone().requires_grad_()
    out = q(wk)
    out.backward(grad)
    a = q.upper.detach().clone().requires_grad_()
    c = q.lower.detach().clone().requires_grad_()
    wr = w.clone().requires_grad_()
    ref = omniquant(wr, a, c, bits, symmetric, gs)
    ref.backward(grad)
    assert torch.allclose(out, ref, rtol=1e-6, atol=1e-7)
    assert torch.allclose(wk.grad, wr.grad, rtol=1e-6, atol=0)
    assert torch.allclose(q.upper.grad, a.grad, rtol=1e-4, atol=1e-6)
    assert torch.allclose(q.lower.grad, c.grad, rtol=1e-4, atol=1e-6)
    if symmetric:  # only the larger of |up| and |low| sets h
        assert (q.upper.grad.abs() + q.lower.grad.abs()).gt(0).all()
    else:
        assert q.upper.grad.abs().sum() > 0 and q.lower.grad.abs().sum() > 0
    if shift:
        assert (wr.grad == 0).any() and (wr.grad != 0).any()


def test_extreme_weights_keep_their_gradient_at_init():
    # sigmoid(4) puts the extremes outside the grid; those less than half a step out still get the
    # gradient of the reference's clamp(round_ste(W / h) + z), which differentiates the clamp at the
    # rounded value.
    w = _w(6, (8, 32)).requires_grad_()
    q = LWC(bits=4)
    q(w).sum().backward()
    h, z = q._step_and_zero(q._view(w.detach()))
    v = w.detach() / h.reshape(8, 1) + z.reshape(8, 1)
    inside = (v.round() >= 0) & (v.round() <= 15)
    assert torch.allclose(w.grad, inside.float(), rtol=1e-6, atol=0)
    half_step_out = ((v > 15) | (v < 0)) & inside
    assert half_step_out.sum() >= 4  # the case that the after-round mask decides


def test_zero_point_carries_no_gradient():
    # ALGORITHMS.md: assert whether z carries a gradient. It does not (the reference's plain round),
    # so with clipping the logits' gradients differ from EfficientQAT's round_ste variant.
    w = _w(7, (4, 16)) + 0.3
    grad = _w(8, (4, 16))
    a = torch.full((4, 1, 1), 0.0, requires_grad=True)
    c = torch.full((4, 1, 1), 0.0, requires_grad=True)
    omniquant(w, a, c, 3, False, zero_ste=True).backward(grad)
    c0 = c.grad.clone()  # the offset gradient with the zero point's STE, which LWC does not take
    a.grad = c.grad = None
    omniquant(w, a, c, 3, False).backward(grad)
    q = LWC(bits=3, init=0.0).init_(w)
    q(w).backward(grad)
    assert torch.allclose(q.lower.grad, c.grad, rtol=1e-4, atol=1e-6)
    assert torch.allclose(q.upper.grad, a.grad, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(q.lower.grad, c0, rtol=1e-2)
    h, z = q._step_and_zero(q._view(w))
    assert not z.requires_grad
    assert h.requires_grad


def test_statistics_carry_no_gradient_to_weights():
    # dW_hat/dW is the clipped STE mask only: no product-rule term through amax/amin.
    w = _w(9, (4, 16)).requires_grad_()
    q = LWC(bits=4, init=1.0)  # sigmoid(1) = 0.73: clips
    q(w).sum().backward()
    assert set(w.grad.unique().tolist()) == {0.0, 1.0}


def test_symmetric_grid():
    w = _w(10, (4, 16))
    q = LWC(bits=3, symmetric=True).init_(w)
    h, z = q._step_and_zero(q._view(w))
    expected = torch.maximum(SIG4 * w.amax(1).abs(), SIG4 * w.amin(1).abs()) / 3
    assert torch.allclose(h.flatten(), expected, rtol=1e-6)
    assert torch.equal(z, torch.full_like(z, 3.0))
    c = q.codes(w)
    assert c.codes.min() >= 0 and c.codes.max() <= 7
    u = (q(w) / f16(h.reshape(4, 1))).detach()
    assert torch.allclose(u, u.round(), atol=1e-4)
    assert u.round().min() >= -3 and u.round().max() <= 4


def test_all_zero_weights_use_the_step_floor():
    q = LWC(bits=4)
    out = q(torch.zeros(2, 8))
    assert torch.equal(out, torch.zeros(2, 8))
    h, z = q._step_and_zero(q._view(torch.zeros(2, 8)))
    assert torch.allclose(h, torch.full_like(h, 1e-5))


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("granularity,gs", [("channel", None), ("group", 8), ("tensor", None)])
def test_codes_dequantize_bitwise(symmetric, bits, granularity, gs):
    w = _w(11, (4, 16)) - 0.1
    q = LWC(bits=bits, granularity=granularity, group_size=gs, symmetric=symmetric).init_(w)
    with torch.no_grad():
        q.upper.sub_(1.0)
    q.eval()
    c = q.codes(w)
    assert torch.equal(c.dequantize(), q(w))
    assert (c.lo, c.hi) == (0, 2**bits - 1)
    assert c.codes.min() >= 0 and c.codes.max() <= 2**bits - 1
    assert torch.equal(c.zero, c.zero.round())
    assert c.scale.dtype == torch.float32 and (c.scale > 0).all()


def test_idempotent_with_fixed_step():
    # Q(W) has a narrower range than W, so the statistics change; with the same h and z (fixed by
    # the original W) quantizing again changes nothing.
    w = _w(12, (4, 16))
    q = LWC(bits=3).init_(w)
    once = q(w).detach()
    h, z = q._step_and_zero(q._view(w))
    h = f16(h.detach())
    again = (torch.clamp(torch.round(q._view(once) / h), -z, 7 - z) * h).reshape(w.shape)
    assert torch.equal(again, once)


def test_default_estimator():
    est = LWC().estimator
    assert isinstance(est, ClippedSTE) and est.after_round


def test_bf16():
    w = _w(13, (4, 16)).bfloat16().requires_grad_()
    q = LWC(bits=4, granularity="group", group_size=8)
    out = q(w)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert w.grad.dtype == torch.bfloat16
    assert q.upper.dtype == torch.float32 and q.upper.grad.dtype == torch.float32


# -- the contract every quantizer shares ------------------------------------------------------


def test_integer_input_refused():
    with pytest.raises(UserError, match='floating-point'):
        LWC().init_(torch.ones(4, 16, dtype=torch.int32))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_init_refused(bad):
    w = _w(14, (4, 16))
    w[3, 3] = bad
    with pytest.raises(UserError, match="non-finite"):
        LWC().init_(w)


@pytest.mark.parametrize("symmetric", [False, True])
def test_state_dict_round_trip_into_fresh_quantizer(symmetric):
    w = _w(15, (4, 16))
    cfg = dict(bits=3, granularity="group", group_size=8, symmetric=symmetric)
    q = LWC(**cfg).init_(w)
    with torch.no_grad():
        q.upper.sub_(0.7)
        q.lower.add_(0.3)
    fresh = LWC(**cfg)
    fresh.load_state_dict(q.state_dict())
    assert fresh.initialized.item()
    assert torch.equal(fresh.upper, q.upper) and torch.equal(fresh.lower, q.lower)
    assert torch.equal(fresh(w), q(w))
    w2 = 3 * _w(16, (4, 16))
    assert torch.equal(fresh(w2), q(w2))
