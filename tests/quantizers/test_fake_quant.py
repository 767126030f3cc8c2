"""The fused fake-quantization kernel (qat/quantizers/fake_quant.py).

Rounding is piecewise constant, so finite differences say nothing about the kernel's gradients.
Instead each custom backward is compared with autograd run through a reference written from the
formula with ``round_ste(u) = sg(round(u) - u) + u`` and a clamp that keeps its true gradient.
"""

import pytest
import torch

from qat.estimators import DSQ, EWGS, STE, AdditiveNoise, ClippedSTE, StochasticRounding, hard_round
from qat.quantizers.fake_quant import fake_quant, reduce_to, scale_grad, unrounded_codes

ROWS, GROUPS, G = 3, 2, 8
LO, HI = -4, 3  # 3-bit signed: plenty of clipping on both sides


def round_ste(u):
    return (torch.round(u) - u).detach() + u


def gs(x, g):
    """LSQ's gradient scale, ALGORITHMS.md notation: value x, gradient times g."""
    return (x - g * x).detach() + g * x


class _EWGSDiscretizer(torch.autograd.Function):
    """cvlab-yonsei/EWGS ``EWGS_discretizer``: rounding in the [0, 1]-normalised domain."""

    @staticmethod
    def forward(ctx, x_in, span, delta):
        x_out = torch.round(x_in * span) / span
        ctx.delta = delta
        ctx.save_for_backward(x_in - x_out)
        return x_out

    @staticmethod
    def backward(ctx, g):
        (diff,) = ctx.saved_tensors
        return g * (1 + ctx.delta * torch.sign(g) * diff), None, None


def reference(x, s, lo, hi, est, beta=None, grad_scale=1.0, seed=0):
    """``q(u) * s + beta`` with autograd gradients, written independently of the kernel."""
    s = gs(s, grad_scale)
    if beta is not None:
        beta = gs(beta, grad_scale)
    u = ((x - beta) if beta is not None else x) / s
    if isinstance(est, EWGS):
        span = hi - lo
        xn = (torch.clamp(u, lo, hi) - lo) / span
        q = _EWGSDiscretizer.apply(xn, span, est.delta) * span + lo
    elif isinstance(est, ClippedSTE) and est.after_round:
        q = torch.clamp(round_ste(u), lo, hi)
    elif isinstance(est, ClippedSTE):
        q = round_ste(torch.clamp(u, lo, hi))
    elif isinstance(est, STE):
        q = u + (hard_round(u, lo, hi) - u).detach()
    elif est.stochastic:
        torch.manual_seed(seed)
        drawn = est.quantize(u.detach(), lo, hi)
        uc = torch.clamp(u, lo, hi)
        q = uc + (drawn - uc).detach()
    else:  # pragma: no cover
        raise AssertionError(est)
    out = q * s
    return out + beta if beta is not None else out


ESTIMATORS = [
    STE(),
    ClippedSTE(),
    ClippedSTE(after_round=True),
    EWGS(0.0),
    EWGS(0.05),
    StochasticRounding(),
    AdditiveNoise("uniform"),
    AdditiveNoise("gaussian"),
]


def _inputs(dtype, tensor_bounds, with_beta, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # float32-representable values: unrounded_codes() computes u from x in float32 (see its docstring)
    x = (torch.randn(ROWS, GROUPS, G, generator=gen) * 1.5).to(dtype)
    # float16-representable s and beta: the kernel uses them at export precision (test below)
    s = (0.2 + 0.3 * torch.rand(ROWS, GROUPS, 1, generator=gen)).half().to(dtype)
    beta = (0.3 * torch.randn(ROWS, GROUPS, 1, generator=gen)).half().to(dtype) if with_beta else None
    if tensor_bounds:  # folded integer zero points: [-z, 7 - z]
        z = torch.randint(0, 8, (ROWS, GROUPS, 1), generator=gen).to(dtype)
        lo, hi = -z, 7 - z
    else:
        lo, hi = LO, HI
    grad = torch.randn(ROWS, GROUPS, G, generator=gen).to(dtype)
    return x, s, beta, lo, hi, grad


def _grads(fn, x, s, beta, grad):
    leaves = [t.detach().clone().requires_grad_() for t in (x, s) + ((beta,) if beta is not None else ())]
    out = fn(*leaves)
    return out, torch.autograd.grad(out, leaves, grad)


@pytest.mark.parametrize("est", ESTIMATORS, ids=lambda e: f"{type(e).__name__}({e.extra_repr()})")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("tensor_bounds", [False, True], ids=["int_bounds", "tensor_bounds"])
@pytest.mark.parametrize("with_beta", [False, True], ids=["no_beta", "beta"])
def test_backward_matches_autograd_reference(est, dtype, tensor_bounds, with_beta):
    x, s, beta, lo, hi, grad = _inputs(dtype, tensor_bounds, with_beta)
    gsc = 0.37

    def kernel(x, s, *b):
        torch.manual_seed(0)
        return fake_quant(x, s, lo, hi, est, beta=b[0] if b else None, grad_scale=gsc)

    def ref(x, s, *b):
        return reference(x, s, lo, hi, est, beta=b[0] if b else None, grad_scale=gsc, seed=0)

    out_k, grads_k = _grads(kernel, x, s, beta, grad)
    out_r, grads_r = _grads(ref, x, s, beta, grad)
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    assert out_k.dtype == dtype
    assert torch.allclose(out_k, out_r, **tol)
    for name, a, b in zip(("x", "s", "beta"), grads_k, grads_r):
        assert a.shape == b.shape, name
        assert a.dtype == b.dtype, name
        assert torch.allclose(a, b, **tol), (name, (a - b).abs().max())
    # The reference clips something on each side, so the clip rules were exercised.
    u = ((x - beta) if beta is not None else x) / s
    assert (u < lo).any() and (u > hi).any()


def test_step_gradient_lsq_rule_by_hand():
    # ALGORITHMS.md section 1's worked example at kernel level: dx_hat/ds = [-2, 0.4, 0.4, 1].
    x = torch.tensor([[[-1.3, -0.2, 0.3, 0.9]]], requires_grad=True)
    s = torch.tensor([[[0.5]]], requires_grad=True)
    out = fake_quant(x, s, -2, 1, ClippedSTE())
    assert torch.allclose(out, torch.tensor([[[-1.0, 0.0, 0.5, 0.5]]]))
    out.sum().backward()
    assert torch.allclose(s.grad, torch.tensor([[[-0.2]]]), atol=1e-6)
    assert x.grad.tolist() == [[[0.0, 1.0, 1.0, 0.0]]]


def test_docstring_example_values():
    out = fake_quant(torch.tensor([[[0.26, -1.3]]]), torch.tensor(0.5), -2, 1, ClippedSTE())
    assert out.tolist() == [[[0.5, -1.0]]]


def test_beta_gradient_is_sum_over_clipped():
    # LSQ+: inside, the two beta terms cancel; outside, dx_hat/dbeta = 1.
    x = torch.tensor([[[-3.0, -0.4, 0.2, 0.6, 2.0]]])
    s = torch.tensor([[[0.5]]], requires_grad=True)
    beta = torch.tensor([[[0.125]]], requires_grad=True)  # float16-exact (the kernel rounds beta to float16)
    g = torch.tensor([[[1.0, 2.0, 3.0, 4.0, 5.0]]])
    # u = (x - 0.125) / 0.5 = [-6.25, -1.05, 0.15, 0.95, 3.75] in [-2, 1]: clipped are the first and last.
    fake_quant(x, s, -2, 1, ClippedSTE(), beta=beta).backward(g)
    assert beta.grad.item() == pytest.approx(1.0 + 5.0)
    beta.grad = None
    fake_quant(x.clamp(-0.8, 0.5), s, -2, 1, ClippedSTE(), beta=beta).backward(g)
    assert beta.grad.item() == 0.0


def test_clip_mode_pact():
    # PACT drops the in-range rounding term: ds = sum of G * q over the clipped elements only.
    x = torch.tensor([[[-1.0, 0.4, 1.33, 2.93, 3.9, 7.0]]])
    # alpha = 15 * 0.25 = 3.75, 4-bit unsigned (a float16-exact step: the kernel rounds steps to float16)
    s = torch.tensor([[[0.25]]], requires_grad=True)
    xr = x.clone().requires_grad_()
    g = torch.tensor([[[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]]])
    out = fake_quant(xr, s, 0, 15, ClippedSTE(), scale_mode="clip")
    out.backward(g)
    assert torch.allclose(out, torch.tensor([[[0.0, 0.5, 1.25, 3.0, 3.75, 3.75]]]), atol=1e-6)
    assert s.grad.item() == pytest.approx(15 * (5.0 + 6.0))
    assert xr.grad.tolist() == [[[0.0, 2.0, 3.0, 4.0, 0.0, 0.0]]]
    # Against a Distiller-style autograd reference: y = clamp(x, lo s, hi s), rounding passed through.
    s2 = s.detach().clone().requires_grad_()
    xr2 = x.clone().requires_grad_()
    y = torch.clamp(xr2, 0 * s2, 15 * s2)
    ref = y + (torch.round(y / s2) * s2 - y).detach()
    ref.backward(g)
    assert torch.allclose(ref, out)
    assert torch.allclose(s2.grad, s.grad)
    assert torch.equal(xr2.grad, xr.grad)


def test_clip_mode_signed():
    x = torch.tensor([[[-5.0, -0.4, 0.8, 4.0]]])
    s = torch.tensor([[[0.5]]], requires_grad=True)  # [-3, 3] * 0.5: alpha = 1.5
    g = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]])
    fake_quant(x, s, -3, 3, ClippedSTE(), scale_mode="clip").backward(g)
    assert s.grad.item() == pytest.approx(-3 * 1.0 + 3 * 4.0)


def test_s_out_twn():
    # Threshold step s and output scale s_out differ; s_out is a statistic without gradient.
    x = torch.tensor([[[-0.9, -0.2, 0.1, 0.35, 0.6]]], requires_grad=True)
    s = torch.tensor([[[0.5]]])
    s_out = torch.tensor([[[0.75]]], requires_grad=True)  # float16-exact
    out = fake_quant(x, s, -1, 1, STE(), s_out=s_out)
    # round(x / 0.5) clipped to [-1, 1] = [-1(-1.8->-2->-1), 0, 0, 1(0.7), 1(1.2)]
    assert torch.allclose(out, torch.tensor([[[-0.75, 0.0, 0.0, 0.75, 0.75]]]))
    g = torch.tensor([[[1.0, 2.0, 3.0, 4.0, 5.0]]])
    out.backward(g)
    assert torch.equal(x.grad, g)  # identity STE to the latent weights
    assert s_out.grad is None


def test_grad_scale_multiplies_s_and_beta_grads_only():
    x, s, beta, lo, hi, grad = _inputs(torch.float32, False, True)
    res = {}
    for g in (1.0, 0.25):
        leaves = [t.clone().requires_grad_() for t in (x, s, beta)]
        fake_quant(leaves[0], leaves[1], lo, hi, ClippedSTE(), beta=leaves[2], grad_scale=g).backward(grad)
        res[g] = [t.grad for t in leaves]
    assert torch.equal(res[1.0][0], res[0.25][0])
    assert torch.allclose(res[0.25][1], 0.25 * res[1.0][1], rtol=1e-6, atol=0)
    assert torch.allclose(res[0.25][2], 0.25 * res[1.0][2], rtol=1e-6, atol=0)


def test_scale_grad_value_bitwise_and_gradient():
    s = torch.randn(5, 3).requires_grad_()
    out = scale_grad(s, 0.1)
    assert torch.equal(out, s)
    assert out.data_ptr() == s.data_ptr()
    g = torch.randn(5, 3)
    out.backward(g)
    assert torch.allclose(s.grad, 0.1 * g)
    assert scale_grad(s, 1.0) is s
    # Differs from the gs() formula's value in general (which rounds), never from s itself.
    assert torch.equal(scale_grad(s, 1 / 3), s)


def test_dsq_path_uses_autograd_and_grad_scale():
    est = DSQ(0.2).train()
    x, s, beta, lo, hi, grad = _inputs(torch.float32, False, True)
    res = {}
    for g in (1.0, 0.5):
        est.zero_grad()
        leaves = [t.clone().requires_grad_() for t in (x, s, beta)]
        out = fake_quant(leaves[0], leaves[1], lo, hi, est, beta=leaves[2], grad_scale=g)
        out.backward(grad)
        res[g] = [t.grad for t in leaves] + [est.alpha.grad.clone()]
    u = unrounded_codes(x, s, beta)
    expected = est.quantize(u, lo, hi).detach() * s + beta
    assert torch.allclose(out.detach(), expected)
    assert torch.equal(res[1.0][0], res[0.5][0])
    assert torch.allclose(res[0.5][1], 0.5 * res[1.0][1], rtol=1e-6, atol=1e-8)
    assert torch.allclose(res[0.5][2], 0.5 * res[1.0][2], rtol=1e-6, atol=1e-8)
    assert res[1.0][3].abs().item() > 0
    # Eval: hard rounding, the same value as the fused kernel with a hard estimator.
    est.eval()
    assert torch.equal(fake_quant(x, s, lo, hi, est, beta=beta), fake_quant(x, s, lo, hi, ClippedSTE(), beta=beta))


def test_dsq_gradcheck_wrt_step_and_offset_float64():
    est = DSQ(0.3).double().train()
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(2, 2, 4, generator=gen) * 0.8).double()
    # float16-exact s and beta: the kernel uses float16-rounded values, with a straight-through
    # gradient, so its gradient is that of the unrounded formula at those values.
    s = torch.full((2, 2, 1), 0.3125, dtype=torch.float64, requires_grad=True)
    beta = torch.full((2, 2, 1), 0.0625, dtype=torch.float64, requires_grad=True)

    def formula(s, b):
        return est.quantize((x - b) / s, -4, 3) * s + b

    assert torch.autograd.gradcheck(formula, (s, beta))
    kernel = torch.autograd.grad(fake_quant(x, s, -4, 3, est, beta=beta).sum(), (s, beta))
    expected = torch.autograd.grad(formula(s, beta).sum(), (s, beta))
    for a, b in zip(kernel, expected):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(), (1,), (GROUPS, 1), (1, GROUPS, 1), (ROWS, GROUPS, 1)])
def test_broadcast_step_shapes(shape):
    x, _, _, lo, hi, grad = _inputs(torch.float32, False, False)
    s = torch.full(shape, 0.3, requires_grad=True)
    fake_quant(x, s, lo, hi, ClippedSTE()).backward(grad)
    full = torch.full((ROWS, GROUPS, 1), 0.3, requires_grad=True)
    fake_quant(x, full, lo, hi, ClippedSTE()).backward(grad)
    assert s.grad.shape == s.shape
    assert torch.allclose(s.grad, full.grad.sum_to_size(shape), rtol=1e-5, atol=1e-6)


def test_reduce_to():
    t = torch.arange(24.0).reshape(2, 3, 4)
    assert torch.equal(reduce_to(t, torch.Size([2, 3, 1])), t.sum(-1, keepdim=True))
    assert torch.equal(reduce_to(t, torch.Size([1, 1, 1])), t.sum().reshape(1, 1, 1))
    assert torch.equal(reduce_to(t, torch.Size([])), t.sum())
    assert torch.equal(reduce_to(t, torch.Size([2, 3, 4])), t)


def test_bf16_input_keeps_dtype():
    torch.manual_seed(0)
    x = (torch.randn(ROWS, GROUPS, G) * 1.5).bfloat16().requires_grad_()
    s = torch.full((ROWS, GROUPS, 1), 0.3, requires_grad=True)
    out = fake_quant(x, s, LO, HI, ClippedSTE())
    assert out.dtype == torch.bfloat16
    expected = (hard_round(x.detach().float() / s.detach(), LO, HI) * s.detach()).bfloat16()
    assert torch.equal(out, expected)
    out.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16
    assert s.grad.dtype == torch.float32


def test_unrounded_codes_in_float32():
    x = torch.tensor([1.0, 2.0], dtype=torch.bfloat16)
    u = unrounded_codes(x, torch.tensor(0.3), torch.tensor(0.1))
    assert u.dtype == torch.float32
    # s and beta at export precision: float16-rounded
    s16, b16 = torch.tensor(0.3).half().float(), torch.tensor(0.1).half().float()
    assert torch.equal(u, (torch.tensor([1.0, 2.0]) - b16) / s16)


def test_scales_are_used_at_float16_precision_with_straight_through_gradient():
    # 0.1 is not a float16 value: the forward uses fp16(0.1) = 0.0999755859375, as the export stores it.
    x = torch.tensor([[[0.33, -0.52, 0.07]]])
    s16 = torch.tensor([[[0.1]]]).half().float()
    assert s16.item() == 0.0999755859375
    for est in (ClippedSTE(), DSQ(0.2).train()):  # the fused kernel and the autograd path
        s = torch.tensor([[[0.1]]], requires_grad=True)
        beta = torch.tensor([[[0.01]]], requires_grad=True)
        out = fake_quant(x, s, -4, 3, est, beta=beta)
        ref_s, ref_b = s16.clone().requires_grad_(), torch.tensor([[[0.01]]]).half().float().requires_grad_()
        ref = fake_quant(x, ref_s, -4, 3, est, beta=ref_b)
        assert torch.equal(out, ref)
        g = torch.tensor([[[1.0, -2.0, 0.5]]])
        out.backward(g)
        ref.backward(g)
        assert torch.equal(s.grad, ref_s.grad) and torch.equal(beta.grad, ref_b.grad)
    # Hard quantization: values are integers times the float16 step, bitwise.
    out = fake_quant(x, torch.tensor([[[0.1]]]), -4, 3, ClippedSTE())
    assert torch.equal(out, torch.round(x / s16).clamp(-4, 3) * s16)


@pytest.mark.parametrize("est,n_extra", [(ClippedSTE(), 0), (StochasticRounding(), 1)])
def test_saves_only_inputs(est, n_extra):
    """Deterministic estimators recompute u and q in the backward; stochastic ones keep q."""
    x, s, _, lo, hi, grad = _inputs(torch.float32, False, False)
    x.requires_grad_()
    s.requires_grad_()
    packed = []

    def pack(t):
        packed.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fake_quant(x, s, lo, hi, est)
    ptrs = {x.data_ptr(), s.data_ptr()}
    extra = [t for t in packed if t.data_ptr() not in ptrs]
    assert len(extra) == n_extra
    out.backward(grad)  # still works with what was saved
    assert x.grad is not None and s.grad is not None


def test_stochastic_backward_uses_the_forward_draw():
    x, s, _, lo, hi, grad = _inputs(torch.float32, False, False)
    s = s.requires_grad_()
    torch.manual_seed(0)
    out = fake_quant(x, s, lo, hi, StochasticRounding())
    q = (out / s).detach().round()
    torch.manual_seed(123)  # another seed must not change the gradient
    out.backward(grad)
    u = x / s.detach()
    inside = (u >= lo) & (u <= hi)
    expected = (grad * torch.where(inside, q - u, q)).sum(-1, keepdim=True)
    assert torch.allclose(s.grad, expected, rtol=1e-5, atol=1e-5)
