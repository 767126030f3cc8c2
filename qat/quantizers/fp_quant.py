"""The fake-quantization kernel of floating-point element formats (E2M1, E4M3, E5M2), with any estimator.

Forward, ``x`` in the grouped view with per-block pre- and post-quantization scales ``s``, ``s_out``
(``s_out = s`` except for Dual-LSQ)::

    v     = x / s                             scaled values
    d     = fmt.step(v)                       the level spacing of v's binade (a power of two, constant)
    u     = v / d                             level units: integers exactly on the format's levels
    q     = estimator.quantize(u, -M/d, M/d)  M = fmt.max; codes of the local uniform grid
    x_hat = (q * d) * s_out                   q * d is a value of the format, exactly

**Estimators on a non-uniform grid.** Inside one binade an FP format is a uniform grid of spacing
``d``, so the estimators of ``qat.estimators``, written for integer grids, act on ``u = v / d``, the
coordinate in which the levels around ``v`` are consecutive integers, with per-element bounds
``+-M/d`` (the format's saturation, in the same units). In eval every estimator rounds to nearest,
ties to even, which is the format's own RNE (``qat.fp_formats``). In training:

* ``STE`` / ``ClippedSTE``: the rounding passes the gradient unchanged; the clipped variants zero it
  where ``|v| > M`` (saturated values), ``after_round`` where the rounded value left the range.
* ``EWGS``: the error ``u - q`` normalised by ``hi - lo = 2M/d`` is ``(v - Q(v)) / 2M``, the error
  relative to the format's whole range, as EWGS normalises by its integer grid's span.
* ``StochasticRounding``: ``v`` goes to one of its two neighbouring levels with probabilities that
  make it unbiased (the rounding FP4 training recipes use for gradients).
* ``AdditiveNoise``: noise of the width of the local spacing (larger for larger values, like the
  format's own rounding error).
* ``DSQ``: its soft staircase in every binade, with bins of the local spacing.

Backward (``G`` the incoming gradient, ``g_u = vjp(u, q, G)``; ``d`` is constant and cancels)::

    dL/dx     = g_u * s_out / s
    dL/ds     = -sum_block(dL/dx * v)              with s_out = s: sum_block(G * Q(v) - dL/dx * v)
    dL/ds_out = sum_block(G * Q(v))

With the clipped STE and ``s_out = s`` this is LSQ's rule in the format's units: ``Q(v) - v`` inside,
the saturation value ``+-6`` (E2M1) outside. Like ``qat.quantizers.fake_quant``, the kernel saves only
its inputs and recomputes ``v``, ``d`` and ``q`` in the backward; an estimator whose forward is
differentiable (DSQ) runs through autograd instead.
"""

from __future__ import annotations

import torch

from qat.estimators import Estimator
from qat.fp_formats import FPFormat


def _levels(x: torch.Tensor, s: torch.Tensor, fmt: FPFormat):
    v = x.to(torch.promote_types(x.dtype, torch.float32)) / s
    d = fmt.step(v)
    bound = fmt.max / d
    return v, d, v / d, bound


class _FPFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, s, s_out, fmt, estimator):
        _, d, u, bound = _levels(x, s, fmt)
        q = estimator.quantize(u, -bound, bound)
        ctx.fmt, ctx.estimator, ctx.x_dtype = fmt, estimator, x.dtype
        ctx.save_for_backward(x, s, s_out, q if estimator.stochastic else None)
        return (q * d * (s if s_out is None else s_out)).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, s, s_out, q = ctx.saved_tensors
        est = ctx.estimator
        v, d, u, bound = _levels(x, s, ctx.fmt)
        if q is None:
            q = est.quantize(u, -bound, bound)
        grad = grad.to(v.dtype)
        g_x = est.vjp(u, q, grad, -bound, bound)
        if s_out is not None:
            g_x = g_x * (s_out / s)
        g_s = g_out = None
        qv = q * d
        if ctx.needs_input_grad[1]:
            t = -g_x * v if s_out is not None else grad * qv - g_x * v
            g_s = t.sum_to_size(s.shape)
        if s_out is not None and ctx.needs_input_grad[2]:
            g_out = (grad * qv).sum_to_size(s_out.shape)
        g_x = g_x.to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        return g_x, g_s, g_out, None, None


def fp_fake_quant(x: torch.Tensor, s: torch.Tensor, fmt: FPFormat, estimator: Estimator, s_out: torch.Tensor | None = None) -> torch.Tensor:
    """Fake-quantize ``x`` (grouped view) to ``fmt`` with block scale ``s`` (and post-scale ``s_out``).

    Args:
        x: input in the grouped view ``(rows, n_groups, group)``.
        s: positive float32 scales broadcastable to ``x`` (the division before rounding).
        fmt: the element format (``qat.fp_formats.E2M1``, ``E4M3``, ``E5M2``).
        estimator: the rounding rule and its gradient, applied in level units (module docstring).
        s_out: the scale the rounded values are multiplied by, when it differs from ``s``
            (Dual-LSQ); None uses ``s``.

    Returns:
        ``Q(x / s) * s_out`` in the dtype of ``x``.

    Example:
        >>> from qat.estimators import ClippedSTE
        >>> from qat.fp_formats import E2M1
        >>> fp_fake_quant(torch.tensor([[[0.26, 1.3, 9.0]]]), torch.tensor(0.5), E2M1, ClippedSTE())
        tensor([[[0.2500, 1.5000, 3.0000]]])
    """
    if estimator.differentiable and estimator.training:
        _, d, u, bound = _levels(x, s, fmt)
        q = estimator.quantize(u, -bound, bound)
        return (q * d * (s if s_out is None else s_out)).to(x.dtype)
    return _FPFakeQuant.apply(x, s, s_out, fmt, estimator)


@torch.no_grad()
def fp_round(x: torch.Tensor, s: torch.Tensor, fmt: FPFormat, estimator: Estimator) -> torch.Tensor:
    """``Q(x / s)``: the values of the format the forward multiplies by its output scale (for ``codes()``)."""
    _, d, u, bound = _levels(x, s, fmt)
    return estimator.quantize(u, -bound, bound) * d
