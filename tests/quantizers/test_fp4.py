"""FP4: NVFP4 and MXFP4 with min-max, LSQ and Dual-LSQ block scales (qat/quantizers/fp4.py)."""

import math
from functools import partial

import pytest
import torch

from qat.errors import UserError
from qat.estimators import DSQ, STE, ClippedSTE, StochasticRounding
from qat.fp_formats import E2M1
from qat.quantizers import FP4

MODES = [(f, s) for f in ("nvfp4", "mxfp4") for s in ("minmax", "lsq", "dual_lsq")]
IDS = [f"{f}-{s}" for f, s in MODES]
# the worked example: one NVFP4 block (9 zeros pad it to 16), scale 0.5
X = [-3.4, -0.3, 0.2, 0.65, 1.3, 2.2, 3.5] + [0.0] * 9


def _w(seed=0, shape=(8, 64)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _worked(scale="lsq", fmt="nvfp4"):
    q = FP4(fmt, scale=scale)
    n = q.block_size
    q.init_(torch.ones(1, n))
    if fmt == "nvfp4":
        q.tensor_scale.fill_(2.0**-8)  # 0.5 / 2^-8 = 128, an E4M3 value: the block scale is exactly 0.5
    for name in ("scale", "scale_post"):
        if hasattr(q, name):
            getattr(q, name).data.fill_(0.5)
    x = torch.tensor([X + [0.0] * (n - 16)], requires_grad=True)
    return q, x


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_lsq_block_scale_gradient_worked_example(fmt):
    # v = x / 0.5 = [-6.8, -0.6, 0.4, 1.3, 2.6, 4.4, 7.0]; E2M1: [-6 (saturated), -0.5, 0.5, 1.5, 3, 4, 6 (saturated)]
    # dx_hat/ds = Q(v) - v inside, +-6 outside: [-6, 0.1, 0.1, 0.2, 0.4, -0.4, 6], sum 0.4; g = 1 / sqrt(n * 6)
    q, x = _worked("lsq", fmt)
    out = q(x)
    assert out[0, :7].tolist() == [-3.0, -0.25, 0.25, 0.75, 1.5, 2.0, 3.0]
    out.sum().backward()
    n = q.block_size
    assert q.scale.grad.item() == pytest.approx(0.4 / math.sqrt(n * 6), rel=1e-5)
    assert x.grad[0].tolist() == [0.0, 1, 1, 1, 1, 1, 0] + [1.0] * (n - 7)  # saturated values get no gradient


def test_lsq_gradient_against_autograd_of_the_straight_through_formula():
    w = _w(1, (4, 32)) * 0.05
    q = FP4("nvfp4", scale="lsq").init_(w)
    with torch.no_grad():
        q.scale.mul_(torch.linspace(0.7, 1.3, 8).reshape(4, 2, 1))  # move the scales off min-max: some saturate
    grad = _w(2, (4, 32))
    wr = w.clone().requires_grad_()
    (q(wr) * grad).sum().backward()
    # reference: S = round_ste(E4M3(p / s_t) * s_t), gs(S, g), round_ste in E2M1 level units, clamp differentiated
    p = q.scale.detach().clone().requires_grad_()
    wr2 = w.clone().requires_grad_()
    s_t = q.tensor_scale
    rounded = (p / s_t).clamp(2.0**-9, 448).to(torch.float8_e4m3fn).float() * s_t
    s = (rounded - p).detach() + p
    g = 1 / math.sqrt(16 * 6)
    s = (s - s * g).detach() + s * g
    v = wr2.reshape(4, 2, 16) / s
    d = E2M1.step(v)
    u = (v / d).clamp(-6 / d, 6 / d)
    ref = ((torch.round(u) - u).detach() + u) * d * s
    (ref.reshape(4, 32) * grad).sum().backward()
    assert torch.equal(q(w).detach(), ref.detach().reshape(4, 32))
    assert torch.allclose(q.scale.grad, p.grad, rtol=1e-5, atol=1e-7)
    assert torch.allclose(wr.grad, wr2.grad, rtol=1e-6, atol=0)


def test_dual_lsq_gradients_worked_example():
    # s_pre = s_post = 0.5: dL/ds_post = g * sum Q(v) = g * 8.5; dL/ds_pre = -g * sum_inside v = -g * 8.1
    q, x = _worked("dual_lsq")
    q(x).sum().backward()
    g = 1 / math.sqrt(96)
    assert q.scale_post.grad.item() == pytest.approx(8.5 * g, rel=1e-5)
    assert q.scale.grad.item() == pytest.approx(-8.1 * g, rel=1e-5)
    # with equal scales the two add up to LSQ's
    assert (q.scale.grad + q.scale_post.grad).item() == pytest.approx(0.4 * g, rel=1e-4)


def test_dual_lsq_codes_follow_the_pre_scale_and_values_the_post_scale():
    q, x = _worked("dual_lsq")
    with torch.no_grad():
        q.scale.fill_(0.25)  # v = 4x: 0.65 -> 2.6 -> 3, 1.3 -> 5.2 -> 6
        q.scale_post.fill_(1.0)
    q.eval()
    assert q(x)[0, :7].tolist() == [-6.0, -1.0, 1.0, 3.0, 6.0, 6.0, 6.0]
    c = q.codes(x.detach())
    assert torch.equal(c.dequantize(), q(x.detach()))
    assert c.scale.flatten().tolist() == [1.0] and c.scale_codes.flatten().tolist() == [0x38 + 0x40]  # 256 in E4M3: 0 1111 000


def test_nvfp4_minmax_scales_by_hand():
    # s_t: 10 / 2688 = 0.00372 rounded up to 2^-8; block (0, 0): amax 10 -> 10 / 6 * 256 = 426.67 -> 416 (0x7D);
    # block (1, 0): amax 2 -> 85.33 -> 88 (0x6B); row 2: all zero
    w = torch.zeros(3, 16)
    w[0, 0] = 10.0
    w[1, :3] = torch.tensor([2.0, 1.0, -0.5])
    q = FP4("nvfp4").init_(w).eval()
    c = q.codes(w)
    assert c.tensor_scale.item() == 2.0**-8
    assert c.scale_codes.flatten().tolist() == [0x7D, 0x6B, 0x01]  # the all-zero block: E4M3's smallest scale, 2^-9
    S = 88 * 2.0**-8
    # 2 / S = 5.82 -> 6; 1 / S = 2.91 -> 3; -0.5 / S = -1.45 -> -1.5 (all exact: S is 11 * 2^-5)
    assert c.codes[1, :3].tolist() == [7, 5, 8 + 3]
    assert q(w)[1, :3].tolist() == [6 * S, 3 * S, -1.5 * S]
    # 10 / (416 / 256) = 6.15 saturates to 6 (the E4M3 scale rounded down): 6 * 1.625 = 9.75
    assert c.codes[0, 0].item() == 7 and q(w)[0, 0].item() == 9.75
    assert torch.equal(q(w)[2], torch.zeros(16)) and (c.codes[2] == 0).all()


def test_mxfp4_minmax_scales_by_hand():
    w = torch.zeros(3, 32)
    w[0, :4] = torch.tensor([5.0, -2.5, 1.25, 0.3])  # amax 5: e = 2 - 2 = 0, scale 1 (code 127); 5 ties to 4
    w[1, 0] = 0.1  # amax 0.1: e = -4 - 2 = -6 (code 121); 0.1 * 64 = 6.4 saturates to 6
    q = FP4("mxfp4").init_(w).eval()
    c = q.codes(w)
    assert c.scale_codes.flatten().tolist() == [127, 121, 0]  # the all-zero block: e = -127
    assert c.tensor_scale is None
    assert q(w)[0, :4].tolist() == [4.0, -2.0, 1.0, 0.5]
    assert q(w)[1, 0].item() == 6 / 64
    assert torch.equal(q(w)[2], torch.zeros(32))


def test_all_zero_tensor_and_block_have_finite_gradients():
    for fmt, scale in MODES:
        q = FP4(fmt, scale=scale)
        w = torch.zeros(2, 32, requires_grad=True)
        out = q(w)
        assert torch.equal(out, torch.zeros(2, 32))
        out.sum().backward()
        assert torch.isfinite(w.grad).all()
        if scale != "minmax":
            assert torch.isfinite(q.scale.grad).all()


def test_learned_scale_overflow_saturates():
    q, x = _worked("lsq")
    with torch.no_grad():
        q.scale.fill_(1e6)  # / 2^-8 far above 448
    q.eval()
    assert q.codes(x.detach()).scale_codes.item() == 0x7E
    assert q.codes(x.detach()).scale.item() == 448 * 2.0**-8
    q, x = _worked("lsq", "mxfp4")
    with torch.no_grad():
        q.scale.fill_(3e38)
    q.eval()
    assert q.codes(x.detach()).scale_codes.item() == 254  # 2^127


@pytest.mark.parametrize("fmt,scale", MODES, ids=IDS)
@pytest.mark.parametrize("estimator", [None, STE()], ids=["default", "ste"])
def test_codes_dequantize_bitwise(fmt, scale, estimator):
    w = _w(3) * 0.05
    w[0, :32] = 0.0  # an all-zero block
    q = FP4(fmt, scale=scale, estimator=estimator).init_(w)
    if scale != "minmax":
        with torch.no_grad():
            for name in ("scale", "scale_post"):
                if hasattr(q, name):
                    getattr(q, name).mul_(torch.rand(getattr(q, name).shape, generator=torch.Generator().manual_seed(4)) + 0.5)
    q.eval()
    c = q.codes(w)
    assert torch.equal(c.dequantize(), q(w))
    assert torch.equal(torch.signbit(c.dequantize()), torch.signbit(q(w)))  # -0.0 too
    assert c.codes.dtype == torch.uint8 and c.codes.shape == w.shape and c.codes.max() <= 15
    n = q.block_size
    assert c.scale.shape == (8, 64 // n, 1) and c.scale_codes.shape == (8, 64 // n, 1) and c.scale_codes.dtype == torch.uint8
    assert (c.format, c.lo, c.hi, c.bits, c.group_size) == (fmt, 0, 15, 4, n)
    if fmt == "nvfp4":  # the stored scale is the E4M3 byte times the tensor scale, exactly
        assert torch.equal(c.scale, c.scale_codes.view(torch.float8_e4m3fn).float() * c.tensor_scale)
    else:
        assert torch.equal(c.scale, torch.ldexp(torch.ones_like(c.scale), c.scale_codes.int() - 127))
    q.train()
    q.codes(w)
    assert q.training


@pytest.mark.parametrize("fmt,scale", MODES, ids=IDS)
def test_learned_scales_start_at_minmax(fmt, scale):
    w = _w(5) * 0.05
    q = FP4(fmt, scale=scale).init_(w)
    assert torch.equal(q(w), FP4(fmt).init_(w)(w))
    assert torch.equal(q(q(w)), q(w)) or scale == "minmax"  # idempotent with fixed scales
    assert isinstance(q.rtn(), FP4) and q.rtn().scale_mode == "minmax" and q.rtn().format == fmt


def test_other_estimators_plug_in():
    w = _w(6) * 0.05
    q = FP4("nvfp4", scale="lsq", estimator=partial(StochasticRounding)).init_(w)
    wr = w.clone().requires_grad_()
    torch.manual_seed(0)
    q(wr).sum().backward()
    assert q.scale.grad is not None and torch.isfinite(q.scale.grad).all()
    q = FP4("mxfp4", scale="lsq", estimator=DSQ(0.2)).init_(w)
    q(w).sum().backward()
    assert q.estimator.alpha.grad is not None and q.scale.grad is not None
    q.eval()
    assert torch.equal(q(w), FP4("mxfp4").init_(w)(w))
    assert isinstance(FP4().estimator, ClippedSTE) and FP4().estimator.after_round
    assert not FP4(scale="lsq").estimator.after_round


def test_activations_any_rank_minmax():
    x = _w(7, (2, 5, 64))
    q = FP4("nvfp4")
    out = q(x)
    assert out.shape == x.shape
    assert torch.equal(out.reshape(10, 64), q(x.reshape(10, 64)))  # blocks along the last axis, one tensor scale
    lsq = FP4("nvfp4", scale="lsq").init_(_w(8, (4, 64)))
    with pytest.raises(UserError, match="minmax"):
        lsq(x)


@pytest.mark.parametrize("kwargs", [dict(format="fp4"), dict(scale="mse"), dict(format="mxfp8")])
def test_bad_config(kwargs):
    with pytest.raises(UserError):
        FP4(**kwargs)


def test_block_size_must_divide_the_last_axis():
    with pytest.raises(UserError, match="multiple of 32"):
        FP4("mxfp4").init_(torch.zeros(4, 48))
    FP4("nvfp4").init_(torch.zeros(4, 48))


def test_state_dict_round_trip():
    w = _w(9) * 0.05
    q = FP4("nvfp4", scale="dual_lsq").init_(w)
    with torch.no_grad():
        q.scale.mul_(1.1)
    fresh = FP4("nvfp4", scale="dual_lsq")
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh(w), q(w))


def test_quantize_smollm2(smollm2):
    """NVFP4 with learned block scales (and NVFP4 activations) on the embedded SmolLM2-135M: two decoder layers
    (the whole model is exercised by the recipes' tests), a finite loss, gradients to the block scales."""
    import copy

    import qat

    model, tok = smollm2
    model = copy.deepcopy(model)
    qat.quantize_(model, weight=partial(FP4, "nvfp4", scale="lsq"), activation=partial(FP4, "nvfp4"), include=["model.layers.0.*", "model.layers.29.*"])
    layers = list(qat.quantized_layers(model))
    assert len(layers) == 14
    ids = tok("The capital of France is Paris.", return_tensors="pt").input_ids
    model.train()
    loss = model(ids, labels=ids).loss
    assert torch.isfinite(loss) and loss.item() < 20
    loss.backward()
    q = layers[0][1].weight_quantizer
    assert q.scale.grad is not None and torch.isfinite(q.scale.grad).all() and q.scale.grad.abs().sum() > 0


def test_quant_stats_count_saturated_values_as_clipped():
    from qat.lit.callbacks import layer_stats
    from qat.nn import QuantLinear

    layer = QuantLinear.from_float(torch.nn.Linear(16, 1, bias=False), FP4("nvfp4", scale="lsq"))
    q = layer.weight_quantizer
    q.tensor_scale.fill_(2.0**-8)
    q.scale.data.fill_(0.5)
    # -3.4 and 3.5 saturate; 2.5 (v = 5, a tie, to 4) errs by 0.5 > s / 2 but is rounded, not clipped
    layer.weight.data.copy_(torch.tensor([X[:-1] + [2.5]]))
    stats, codes = layer_stats(layer)
    assert stats["clip_frac"] == 2 / 16 and stats["step"] == 0.5 and stats["zero_frac"] == 8 / 16
    assert codes.dtype == torch.uint8


def test_frozen_refuses_fp_codes():
    from qat.quantizers import Frozen

    w = _w(10) * 0.05
    with pytest.raises(UserError, match="nvfp4 codes cannot be frozen"):
        Frozen(FP4("nvfp4").init_(w).codes(w))
