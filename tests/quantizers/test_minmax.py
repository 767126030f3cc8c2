"""Round-to-nearest with min/max statistics (qat/quantizers/minmax.py)."""

import pytest
import torch

from qat.errors import UserError
from qat.estimators import ClippedSTE
from qat.quantizers import MinMax

GRANULARITIES = [("tensor", None), ("channel", None), ("group", 4), ("token", None)]


def _w(seed=0, shape=(4, 16)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def f16(v):
    """``v`` rounded to float16: the precision of the step the forward uses (and the export stores)."""
    return torch.as_tensor(v, dtype=torch.float32).half().float()


# -- RTN values by hand -----------------------------------------------------------------------

W = torch.tensor([[0.5, -1.2, 0.25, 0.1], [0.3, -0.1, 0.9, -0.7]])


def test_symmetric_per_tensor_by_hand():
    # bits 3: [-4, 3]; s = max|w| / 3 = 0.4
    # row 0: u = [1.25, -3, 0.625, 0.25] -> [1, -3, 1, 0]; row 1: u = [0.75, -0.25, 2.25, -1.75] -> [1, 0, 2, -2]
    q = MinMax(bits=3, granularity="tensor")
    expected = f16(0.4) * torch.tensor([[1.0, -3, 1, 0], [1, 0, 2, -2]])
    assert torch.equal(q(W), expected)
    c = q.codes(W)
    assert c.codes.tolist() == [[1, -3, 1, 0], [1, 0, 2, -2]]
    assert c.scale.flatten().tolist() == [f16(0.4).item()]


def test_symmetric_per_channel_by_hand():
    # row 0: s = 0.4 as above; row 1: s = 0.9 / 3 = 0.3, u = [1, -1/3, 3, -7/3] -> [1, 0, 3, -2]
    q = MinMax(bits=3, granularity="channel")
    expected = torch.tensor([[1.0, -3, 1, 0], [1, 0, 3, -2]]) * f16([[0.4], [0.3]])
    assert torch.equal(q(W), expected)
    assert q.codes(W).codes.tolist() == [[1, -3, 1, 0], [1, 0, 3, -2]]


def test_symmetric_per_group_by_hand():
    # groups of 2: s = [0.5/3, 1.2/3 | 0.3/3, 0.9/3]
    q = MinMax(bits=3, granularity="group", group_size=2)
    out = q(W)  # (a dynamic quantizer is initialised by its first forward)
    # [0.5, -1.2] / 0.4 = [1.25, -3] -> [1, -3]; [0.25, 0.1] / (0.25/3) = [3, 1.2] -> [3, 1]
    # [0.3, -0.1] / 0.1 = [3, -1];               [0.9, -0.7] / 0.3 = [3, -2.33] -> [3, -2]
    assert q.codes(W).codes.tolist() == [[1, -3, 3, 1], [3, -1, 3, -2]]
    steps = f16([[0.4, 0.4, 0.25 / 3, 0.25 / 3], [0.1, 0.1, 0.3, 0.3]])
    assert torch.equal(out, torch.tensor([[1.0, -3, 3, 1], [3, -1, 3, -2]]) * steps)


def test_narrow_grid():
    q = MinMax(bits=3, granularity="tensor", narrow=True)
    assert (q.grid.lo, q.grid.hi) == (-3, 3)
    assert torch.equal(q(W), f16(0.4) * torch.tensor([[1.0, -3, 1, 0], [1, 0, 2, -2]]))


def test_asymmetric_by_hand():
    # bits 2: [0, 3]. min -0.5, max 1.0 -> s = 0.5, z = round(1.0) = 1
    # u = [-1, 0.2, 2, 0.8] -> q = [-1, 0, 2, 1] in [-z, 3 - z]; codes = q + z = [0, 1, 3, 2]
    q = MinMax(bits=2, granularity="tensor", symmetric=False)
    w = torch.tensor([[-0.5, 0.1, 1.0, 0.4]])
    assert torch.allclose(q(w), torch.tensor([[-0.5, 0.0, 1.0, 0.5]]), atol=1e-6)
    c = q.codes(w)
    assert c.codes.tolist() == [[0, 1, 3, 2]]
    assert c.zero.flatten().tolist() == [1.0]
    assert c.scale.flatten().tolist() == pytest.approx([0.5])


def test_asymmetric_zero_point_rounding_shifts_the_range():
    # min -0.4, max 1.1: s = 0.5, z = round(0.8) = 1, so the grid is [-0.5, 1.0]:
    # u = [-0.8, 0.2, 2.2, 1.3] -> [-1, 0, 2, 1]; the max is clipped to 1.0, the min widened to -0.5.
    q = MinMax(bits=2, granularity="tensor", symmetric=False)
    w = torch.tensor([[-0.4, 0.1, 1.1, 0.65]], requires_grad=True)
    out = q(w)
    assert torch.allclose(out, torch.tensor([[-0.5, 0.0, 1.0, 0.5]]), atol=1e-6)
    assert q.codes(w).codes.tolist() == [[0, 1, 3, 2]]
    # The clipped max is less than half a step outside: it keeps its gradient (after-round mask).
    out.sum().backward()
    assert torch.allclose(w.grad, torch.ones(1, 4))
    # With the u-mask estimator it would lose it.
    w.grad = None
    MinMax(bits=2, granularity="tensor", symmetric=False, estimator=ClippedSTE())(w).sum().backward()
    assert w.grad.tolist() == [[1.0, 1.0, 0.0, 1.0]]


def test_asymmetric_all_positive_keeps_zero_in_range():
    # min is clamped to 0: s = 0.8 / 3, z = 0; u = [0.75, 1.875, 3] -> [1, 2, 3]
    q = MinMax(bits=2, granularity="tensor", symmetric=False)
    w = torch.tensor([[0.2, 0.5, 0.8]])
    assert torch.equal(q(w), f16(0.8 / 3) * torch.tensor([[1.0, 2.0, 3.0]]))
    c = q.codes(w)
    assert c.codes.tolist() == [[1, 2, 3]] and c.zero.flatten().tolist() == [0.0]
    # all negative: max clamped to 0, z = 3
    c = q.codes(-w)
    assert c.zero.flatten().tolist() == [3.0] and c.codes.tolist() == [[2, 1, 0]]


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity,gs", GRANULARITIES)
def test_granularity_equals_per_slice_tensor_quantization(symmetric, granularity, gs):
    x = _w(1, (2, 3, 8)) if granularity == "token" else _w(1, (3, 8))
    q = MinMax(bits=4, granularity=granularity, group_size=gs, symmetric=symmetric)
    out = q(x)
    ref = MinMax(bits=4, granularity="tensor", symmetric=symmetric)
    if granularity == "tensor":
        slices = [(...,)]
    elif granularity == "channel":
        slices = [(r,) for r in range(3)]
    elif granularity == "group":
        slices = [(r, slice(j * 4, j * 4 + 4)) for r in range(3) for j in range(2)]
    else:
        slices = [(b, t) for b in range(2) for t in range(3)]
    for idx in slices:
        assert torch.equal(out[idx], ref(x[idx])), idx


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("granularity,gs", GRANULARITIES)
def test_zero_point_integral_and_in_range(bits, granularity, gs):
    x = _w(2, (2, 4, 16)) if granularity == "token" else _w(2, (4, 16)) + 0.3
    q = MinMax(bits=bits, granularity=granularity, group_size=gs, symmetric=False, dynamic=False).init_(x)
    assert torch.equal(q.zero, q.zero.round())
    assert q.zero.min() >= 0 and q.zero.max() <= 2**bits - 1
    assert q.scale.dtype == torch.float32 and (q.scale > 0).all()
    c = q.codes(x)
    assert torch.equal(c.zero, c.zero.round())
    assert c.codes.min() >= 0 and c.codes.max() <= 2**bits - 1


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity,gs", GRANULARITIES)
def test_idempotent(symmetric, granularity, gs):
    x = _w(3, (2, 4, 16)) if granularity == "token" else _w(3, (4, 16))
    static = MinMax(bits=3, granularity=granularity, group_size=gs, symmetric=symmetric, dynamic=False).init_(x)
    once = static(x)
    assert torch.equal(static(once), once)
    # Dynamic statistics are recomputed from Q(x): the same grid up to rounding of the scale.
    dyn = MinMax(bits=3, granularity=granularity, group_size=gs, symmetric=symmetric)
    once = dyn(x)
    assert torch.allclose(dyn(once), once, rtol=0, atol=1e-6)


def test_dynamic_false_freezes_statistics():
    x = _w(4, (4, 16))
    static = MinMax(bits=4, granularity="channel", dynamic=False).init_(x)
    frozen = static.scale.clone()
    big = 3 * x
    out = static(big)
    assert torch.equal(static.scale, frozen)
    # Values beyond the calibrated range clip to the calibrated grid [-8 s, 7 s], s = max|x| / 7.
    s = f16(x.abs().amax(1) / 7)
    assert torch.equal(out.amax(1), 7 * s)
    assert torch.equal(out.amin(1), -8 * s)
    dyn = MinMax(bits=4, granularity="channel")
    assert getattr(dyn, "scale", None) is None
    assert torch.equal(dyn(big).abs().amax(1), 7 * f16(big.abs().amax(1) / 7))
    # Re-initialising updates in place (same buffer object).
    buf = static.scale
    static.init_(big)
    assert static.scale is buf and torch.allclose(buf, frozen * 3, rtol=1e-6)


def test_static_clip_masks_gradient_beyond_half_a_step():
    x = torch.tensor([[-1.0, 0.5, 1.0]])
    q = MinMax(bits=3, granularity="tensor", dynamic=False).init_(x)  # s = fp16(1/3), codes [-4, 3]
    y = torch.tensor([[1.1, 1.2, 1.3, -4.5 * f16(1 / 3).item(), -1.6]], requires_grad=True)
    # u = [3.3, 3.6, 3.9, -4.5, -4.8]; rounded [3, 4, 4, -4 (tie to even), -5]: inside [-4, 3]: 1 0 0 1 0
    q(y).sum().backward()
    assert y.grad.tolist() == [[1.0, 0.0, 0.0, 1.0, 0.0]]


def test_symmetric_gradient_reaches_every_element():
    # The element that sets max|x| sits at u = hi up to the rounding of x / (max|x| / hi); it must keep
    # its gradient whichever way that rounding goes.
    x = _w(5, (64, 32)).requires_grad_()
    g = _w(6, (64, 32))
    (MinMax(bits=4, granularity="channel")(x) * g).sum().backward()
    assert (x.grad != 0).all()
    assert torch.allclose(x.grad, g, rtol=1e-6, atol=0)


def test_statistics_carry_no_gradient():
    # Dynamic scale from x without gradient: dQ/dx is the STE identity, not the product rule.
    x = _w(7, (4, 16)).requires_grad_()
    MinMax(bits=2, granularity="channel")(x).sum().backward()
    assert torch.allclose(x.grad, torch.ones(4, 16), rtol=1e-6, atol=0)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dynamic", [True, False])
@pytest.mark.parametrize("granularity,gs", GRANULARITIES)
def test_codes_dequantize_bitwise(bits, symmetric, dynamic, granularity, gs):
    x = _w(8, (2, 3, 16)) if granularity == "token" else _w(8, (4, 16))
    q = MinMax(bits=bits, granularity=granularity, group_size=gs, symmetric=symmetric, dynamic=dynamic).init_(x)
    y = x * 1.1  # static quantizers see data beyond their calibration range
    q.eval()
    c = q.codes(y)
    assert torch.equal(c.dequantize(), q(y))
    assert c.codes.shape == y.shape
    lo, hi = (q.grid.lo, q.grid.hi) if symmetric else (0, 2**bits - 1)
    assert (c.lo, c.hi) == (lo, hi)
    assert c.codes.min() >= lo and c.codes.max() <= hi
    assert c.codes.dtype == (torch.int8 if hi <= 127 else torch.int16)
    assert (c.zero is None) == symmetric
    assert c.scale.dtype == torch.float32 and (c.scale > 0).all()


def test_all_zero_input_is_safe():
    for symmetric in (True, False):
        q = MinMax(bits=4, granularity="channel", symmetric=symmetric)
        out = q(torch.zeros(2, 8))
        assert torch.equal(out, torch.zeros(2, 8))
        assert torch.isfinite(q.codes(torch.zeros(2, 8)).scale).all()


def test_bf16():
    x = _w(9, (4, 16)).bfloat16().requires_grad_()
    out = MinMax(bits=4, granularity="group", group_size=8, symmetric=False)(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16


def test_default_estimator():
    est = MinMax().estimator
    assert isinstance(est, ClippedSTE) and est.after_round


# -- the contract every quantizer shares ------------------------------------------------------


@pytest.mark.parametrize("dynamic", [True, False])
def test_integer_input_refused(dynamic):
    with pytest.raises(UserError, match='floating-point'):
        MinMax(dynamic=dynamic).init_(torch.ones(4, 16, dtype=torch.int32))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_init_refused(bad):
    x = _w(10, (4, 16))
    x[0, 0] = bad
    with pytest.raises(UserError, match="non-finite"):
        MinMax(dynamic=False, symmetric=False).init_(x)
    with pytest.raises(UserError, match="non-finite"):
        MinMax().init_(x)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dynamic", [True, False])
def test_state_dict_round_trip_into_fresh_quantizer(symmetric, dynamic):
    x = _w(11, (4, 16))
    cfg = dict(bits=3, granularity="group", group_size=8, symmetric=symmetric, dynamic=dynamic)
    q = MinMax(**cfg).init_(x)
    sd = q.state_dict()
    if dynamic:
        assert set(sd) == {"initialized"}
    else:
        assert set(sd) == {"initialized", "scale"} | (set() if symmetric else {"zero"})
    fresh = MinMax(**cfg)
    fresh.load_state_dict(sd)
    assert fresh.initialized.item()
    y = 2 * _w(12, (4, 16))  # must not re-initialise from y
    assert torch.equal(fresh(y), q(y))
    if not dynamic:
        assert torch.equal(fresh.scale, q.scale) and fresh.scale.dtype == torch.float32
