"""LSQ and LSQ+ (qat/quantizers/lsq.py)."""

import math

import pytest
import torch

from qat.errors import UserError
from qat.estimators import DSQ, STE, ClippedSTE
from qat.grid import Grid
from qat.quantizers import LSQ

CONFIGS = [
    dict(bits=2, granularity="tensor"),
    dict(bits=3, granularity="channel"),
    dict(bits=4, granularity="group", group_size=8),
    dict(bits=8, granularity="channel", symmetric=False),
    dict(bits=4, granularity="group", group_size=8, offset=True),
    dict(bits=3, granularity="channel", symmetric=False, offset=True),
    dict(bits=2, granularity="tensor", narrow=True),
]
IDS = [",".join(f"{k}={v}" for k, v in c.items()) for c in CONFIGS]


def _w(seed=0, shape=(4, 16)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_worked_example():
    # ALGORITHMS.md section 1: bits 2 signed [-2, 1], s = 0.5, g = 1 / sqrt(4 * 1) = 0.5.
    q = LSQ(bits=2, granularity="tensor")
    q.init_(torch.ones(4))
    q.scale.data.fill_(0.5)
    w = torch.tensor([-1.3, -0.2, 0.3, 0.9], requires_grad=True)
    out = q(w)
    assert out.tolist() == [-1.0, 0.0, 0.5, 0.5]
    out.sum().backward()
    assert q.scale.grad.item() == pytest.approx(-0.1, abs=1e-7)
    assert w.grad.tolist() == [0.0, 1.0, 1.0, 0.0]
    assert q.grad_scale(q._view(w)) == 0.5


@pytest.mark.parametrize("bits,symmetric", [(2, True), (4, True), (8, True), (3, False), (8, False)])
@pytest.mark.parametrize("granularity,gs", [("tensor", None), ("channel", None), ("group", 4)])
def test_init_is_two_mean_abs_over_sqrt_hi(bits, symmetric, granularity, gs):
    w = _w(1, (3, 12))
    q = LSQ(bits=bits, granularity=granularity, group_size=gs, symmetric=symmetric).init_(w)
    hi = Grid(bits, signed=symmetric).hi
    if granularity == "tensor":
        groups = [[w.flatten()]]
    elif granularity == "channel":
        groups = [[w[r]] for r in range(3)]
    else:
        groups = [[w[r, j * 4 : (j + 1) * 4] for j in range(3)] for r in range(3)]
    expected = torch.tensor([[[2 * g.abs().mean().item() / math.sqrt(hi)] for g in row] for row in groups])
    assert q.scale.shape == expected.shape
    assert torch.allclose(q.scale, expected, rtol=1e-6, atol=0)
    assert q.scale.dtype == torch.float32 and (q.scale > 0).all()


def test_init_floor_for_zero_weights():
    q = LSQ(bits=4, granularity="channel").init_(torch.zeros(2, 8))
    assert torch.equal(q.scale, torch.full((2, 1, 1), 1e-5))
    assert torch.equal(q(torch.zeros(2, 8)), torch.zeros(2, 8))


def test_grad_scale_uses_elements_sharing_a_step():
    w = torch.zeros(4, 16)
    assert LSQ(bits=4, granularity="tensor").init_(w).grad_scale(w.reshape(1, 1, -1)) == pytest.approx(1 / math.sqrt(64 * 7))
    assert LSQ(bits=4, granularity="channel").grad_scale(w.reshape(4, 1, 16)) == pytest.approx(1 / math.sqrt(16 * 7))
    assert LSQ(bits=3, granularity="group", group_size=8).grad_scale(w.reshape(4, 2, 8)) == pytest.approx(1 / math.sqrt(8 * 3))
    assert LSQ(bits=3, granularity="group", group_size=8, symmetric=False).grad_scale(w.reshape(4, 2, 8)) == pytest.approx(
        1 / math.sqrt(8 * 7)
    )


def test_per_group_gradients_match_manual_loop():
    bits, G = 3, 8
    lo, hi = -4, 3
    w = _w(2, (3, 16)) * 2
    q = LSQ(bits=bits, granularity="group", group_size=G).init_(w)
    with torch.no_grad():
        q.scale.mul_(torch.tensor([0.3, 1.0]).view(1, 2, 1))  # clip more in some groups
    wr = w.clone().requires_grad_()
    grad = _w(3, (3, 16))
    (q(wr) * grad).sum().backward()
    g = 1 / math.sqrt(G * hi)
    ds = torch.zeros(3, 2, 1)
    dw = torch.zeros(3, 16)
    for r in range(3):
        for i in range(16):
            j = i // G
            s = q.scale[r, j, 0].half().item()  # the forward's step: float16-rounded
            u = w[r, i].item() / s
            if u < lo:
                d = lo
            elif u > hi:
                d = hi
            else:
                d = round(u) - u  # no exact ties in random data
                dw[r, i] = grad[r, i]
            ds[r, j, 0] += g * grad[r, i].item() * d
    assert torch.allclose(q.scale.grad, ds, rtol=1e-5, atol=1e-6)
    # (G * s) / s: equal to G up to an ulp, so not bitwise
    assert torch.allclose(wr.grad, dw, rtol=1e-6, atol=0)
    assert torch.equal(wr.grad == 0, dw == 0)
    assert (dw == 0).any() and (dw != 0).any()


def test_lsq_plus_beta_gradient_is_sum_over_clipped():
    q = LSQ(bits=2, granularity="channel", offset=True)
    w = torch.tensor([[-2.0, 0.3, 0.6, 3.0], [0.2, 0.4, 0.6, 0.8]])
    q.init_(w)
    with torch.no_grad():
        q.scale.copy_(torch.tensor([0.5, 0.25]).view(2, 1, 1))
        q.offset.copy_(torch.tensor([0.125, 0.4375]).view(2, 1, 1))  # float16-exact offsets
    # row 0: u = (w - 0.125) / 0.5 = [-4.25, 0.35, 0.95, 5.75] in [-2, 1]: first and last clipped.
    # row 1: u = (w - 0.4375) / 0.25 = [-0.95, -0.15, 0.65, 1.45]: the last clipped... make row 1 fully inside
    w[1] = torch.tensor([0.2, 0.4, 0.6, 0.65])  # u = [-0.95, -0.15, 0.65, 0.85]
    grad = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    (q(w) * grad).sum().backward()
    g = 1 / math.sqrt(4 * 1)
    assert q.offset.grad[0].item() == pytest.approx(g * (1.0 + 4.0))
    assert q.offset.grad[1].item() == 0.0  # nothing clipped


def test_lsq_plus_min_max_init_reproduces_min_and_max():
    for bits, symmetric in [(2, True), (4, True), (3, False), (8, False)]:
        w = _w(4, (4, 32)) * 3 + 0.7
        q = LSQ(bits=bits, granularity="group", group_size=8, symmetric=symmetric, offset=True).init_(w)
        g = w.reshape(4, 4, 8)
        lo, hi = q.grid.lo, q.grid.hi
        xmin, xmax = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        assert torch.allclose(q.scale, (xmax - xmin) / (hi - lo), rtol=1e-6)
        assert torch.allclose(q.offset, xmin - lo * q.scale, rtol=1e-6, atol=1e-6)
        out = q(w).reshape(4, 4, 8)
        # exactly, up to the float16 rounding of s and beta that the forward applies (half an ulp each)
        tol = (max(-lo, hi) * q.scale.abs() + q.offset.abs()) * 2.0**-11 + 1e-6
        assert ((out.amin(-1, keepdim=True) - xmin).abs() <= tol).all()
        assert ((out.amax(-1, keepdim=True) - xmax).abs() <= tol).all()


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_output_on_the_grid(config):
    w = _w(5, (4, 16)) * 2
    q = LSQ(**config).init_(w)
    with torch.no_grad():
        q.scale.mul_(0.8)  # some clipping
    out = q(w).detach().double()
    s = q.scale.half().double()  # the forward's step and offset: float16-rounded
    beta = q.offset.half().double() if q.use_offset else 0.0
    u = (q._view(out) - beta) / s
    assert torch.allclose(u, u.round(), rtol=0, atol=1e-4)
    assert u.round().min() >= q.grid.lo and u.round().max() <= q.grid.hi


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_idempotent(config):
    w = _w(6, (4, 16)) * 2
    q = LSQ(**config).init_(w)
    once = q(w)
    assert torch.equal(q(once), once)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("granularity,gs", [("tensor", None), ("channel", None), ("group", 8)])
@pytest.mark.parametrize("offset,symmetric", [(False, True), (False, False), (True, True), (True, False)])
def test_codes_dequantize_bitwise(bits, granularity, gs, offset, symmetric):
    w = _w(7, (4, 16))
    q = LSQ(bits=bits, granularity=granularity, group_size=gs, symmetric=symmetric, offset=offset).init_(w)
    with torch.no_grad():
        q.scale.mul_(0.9)
    q.eval()
    c = q.codes(w)
    assert torch.equal(c.dequantize(), q(w))
    assert c.codes.shape == w.shape
    assert c.codes.dtype == (torch.int8 if q.grid.hi <= 127 else torch.int16)
    assert c.codes.min() >= q.grid.lo and c.codes.max() <= q.grid.hi
    assert (c.lo, c.hi, c.bits) == (q.grid.lo, q.grid.hi, bits)
    assert c.scale.dtype == torch.float32 and c.scale.shape == q.scale.shape
    assert (c.offset is not None) == offset
    assert c.zero is None and c.bias is None
    # codes() leaves the training flag alone
    q.train()
    q.codes(w)
    assert q.training and q.estimator.training


def test_codes_before_init():
    with pytest.raises(RuntimeError, match="init_"):
        LSQ().codes(torch.zeros(2, 8))


def test_forward_initialises_lazily():
    w = _w(8, (4, 16))
    q = LSQ(bits=4)
    out = q(w)
    assert q.initialized.item()
    ref = LSQ(bits=4).init_(w)
    assert torch.equal(q.scale, ref.scale)
    assert torch.equal(out, ref(w))


def test_token_granularity_refused():
    with pytest.raises(UserError, match="MinMax"):
        LSQ(granularity="token")


@pytest.mark.parametrize("kwargs", [dict(bits=1), dict(bits=9), dict(granularity="group"), dict(granularity="row")])
def test_bad_config(kwargs):
    with pytest.raises(UserError):
        LSQ(**kwargs)


def test_bad_estimator_type():
    with pytest.raises(UserError, match="Estimator"):
        LSQ(estimator=torch.round)


def test_other_estimators_plug_in():
    w = _w(9, (4, 16)) * 3
    q = LSQ(bits=2, granularity="channel", estimator=STE()).init_(w)
    wr = w.clone().requires_grad_()
    q(wr).sum().backward()
    assert torch.allclose(wr.grad, torch.ones_like(w), rtol=1e-6, atol=0)  # no clip mask with the plain STE
    q = LSQ(bits=2, granularity="channel", estimator=DSQ(0.2)).init_(w)
    q(w).sum().backward()
    assert q.estimator.alpha.grad is not None and q.estimator.alpha.grad.item() != 0
    assert q.scale.grad is not None
    q.eval()
    hard = LSQ(bits=2, granularity="channel").init_(w)
    assert torch.equal(q(w), hard(w))
    assert isinstance(LSQ().estimator, ClippedSTE) and not LSQ().estimator.after_round


def test_bf16_weights():
    w = _w(10, (4, 16)).bfloat16()
    q = LSQ(bits=4, granularity="group", group_size=8, offset=True).init_(w)
    assert q.scale.dtype == torch.float32 and q.offset.dtype == torch.float32
    wr = w.clone().requires_grad_()
    out = q(wr)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert wr.grad.dtype == torch.bfloat16
    assert q.scale.grad.dtype == torch.float32


# -- the contract every quantizer shares ------------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_integer_input_refused(config):
    with pytest.raises(UserError, match='floating-point'):
        LSQ(**config).init_(torch.ones(4, 16, dtype=torch.int32))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_init_refused(bad):
    w = _w(11, (4, 16))
    w[1, 3] = bad
    q = LSQ(bits=4, offset=True)
    with pytest.raises(UserError, match="non-finite"):
        q.init_(w)
    assert not q.initialized.item()
    with pytest.raises(UserError, match='non-finite'):
        q(w)


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_scales_float32_positive(config):
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        q = LSQ(**config).init_(_w(12, (4, 16)).to(dtype))
        assert q.scale.dtype == torch.float32 and (q.scale > 0).all()
        if q.use_offset:
            assert q.offset.dtype == torch.float32


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_state_dict_round_trip_into_fresh_quantizer(config):
    w = _w(13, (4, 16))
    q = LSQ(**config).init_(w)
    with torch.no_grad():  # move away from the init values so loading must copy them
        q.scale.mul_(1.1)
        if q.use_offset:
            q.offset.add_(0.01)
    fresh = LSQ(**config)
    fresh.load_state_dict(q.state_dict())
    assert fresh.initialized.item()
    assert isinstance(fresh.scale, torch.nn.Parameter)
    w2 = _w(14, (4, 16)) * 5  # different data: no re-initialisation must happen
    assert torch.equal(fresh(w2), q(w2))
    assert torch.equal(fresh(w), q(w))
    assert {n for n, _ in fresh.named_parameters()} == {n for n, _ in q.named_parameters()}


def test_lsq_plus_rtn_init_puts_zero_on_the_grid_and_matches_round_to_nearest():
    from qat.quantizers import MinMax

    torch.manual_seed(0)
    w = torch.randn(16, 64) * 0.05 + 0.01
    plus = LSQ(bits=3, granularity="group", group_size=32, symmetric=False, offset=True, init="rtn").init_(w)
    rtn = MinMax(bits=3, granularity="group", group_size=32, symmetric=False).init_(w)
    # the same codes as asymmetric round-to-nearest up to the float16 offset (a tie may fall either way)
    assert (plus.codes(w).codes != rtn.codes(w).codes).float().mean() < 0.01
    assert ((plus(w) - rtn(w)).abs() > 1e-3).float().mean() < 0.01  # equal values but for those ties
    zero = plus(torch.zeros(16, 64))  # 0 lands on a level (up to the offset's float16 rounding)
    assert zero.abs().max() < 1e-3
    span = LSQ(bits=3, granularity="group", group_size=32, symmetric=False, offset=True, init="minmax").init_(w)
    assert span(torch.zeros(16, 64)).abs().max() > 1e-3  # the min/max span generally misses 0
