"""The fused fake-quantization kernel shared by every uniform quantizer.

Forward, with ``x`` already in the grouped view ``(rows, n_groups, group)`` and per-group ``s``,
``beta``, ``lo``, ``hi`` of shape ``(rows, n_groups, 1)`` (or scalars)::

    u     = (x - beta) / s                      level units
    q     = estimator.quantize(u, lo, hi)       codes (integers for the hard estimators)
    x_hat = q * s_out + beta                    s_out = s unless a separate output scale is given

Backward, from the estimator's vector-Jacobian product (``G`` the incoming gradient; the step
cancels, ``d(s q)/du * du/dx = q'(u)``, and ``vjp`` is homogeneous in its gradient)::

    dL/dx    = g_x = vjp(u, q, G)
    dL/ds    = grad_scale * sum_group(G * q - g_x * u)      LSQ: round(u) - u inside, the clip value outside
    dL/dbeta = grad_scale * sum_group(G - g_x)              LSQ+: the sum of G over clipped elements

With the clipped STE these are exactly LSQ's and LSQ+'s rules (Esser et al., ICLR 2020;
Bhalgat et al., CVPRW 2020; zhutmost/lsq-net, ParetoQ ``LsqBinaryTernaryExtension``). The
``"clip"`` scale mode keeps only the clipped elements' term ``G * q`` (PACT drops the in-range
rounding term). With ``s_out`` (TWN: threshold and output scale differ) the output scale is a
statistic without gradient and the input still gets ``g_x``.

Why a custom kernel: autograd through the same expression keeps ``u`` and ``q`` alive for every
layer (two weight-sized tensors each); this kernel saves only its inputs and recomputes ``u`` and
``q`` in the backward (stochastic estimators save ``q``), which is what keeps the memory of a
fake-quantized step close to the unquantized one. Integer zero points are folded into
per-group bounds (``lo = -z``, ``hi = 2^b - 1 - z``), so ``x_hat = q * s`` equals the exporter's
``(c - z) * s`` bitwise.

Export precision (ALGORITHMS.md section 8, "bit-exact recipe"): the packed export stores scales and
float offsets in float16, so training uses them at that precision: ``s``, ``beta`` and ``s_out``
are rounded to the nearest float16 value (``to_export_precision``) wherever they are used, in
``unrounded_codes`` and in the output product. The rounding is straight-through: the value is
``fp16(s)`` held in float32, and the gradient computed for that value goes to the float32 master
``s`` unchanged (the custom kernel rounds inside, so it still saves only its inputs). Because
``unrounded_codes`` rounds, every quantizer's ``codes()`` sees the same step as its forward.
Dequantizing ``(c - z) * fp16(s)`` in float32 is then exact while ``|c - z| < 2^13``, and equal to
the training forward bitwise in any case (same operation on the same values).
"""

from __future__ import annotations

import torch

from qat.estimators import Bound, Estimator, _inside


def reduce_to(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum ``t`` over the axes that ``shape`` broadcasts (size 1 or missing), giving ``shape``."""
    return t.sum_to_size(shape)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


FP16_MAX = 65504.0  # largest finite float16: larger scales saturate instead of becoming inf


class _RoundToHalf(torch.autograd.Function):
    """Value rounded to the nearest float16 (kept in the input dtype), gradient the identity."""

    @staticmethod
    def forward(ctx, t):
        return t.clamp(-FP16_MAX, FP16_MAX).to(torch.float16).to(t.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad


def to_export_precision(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` rounded to float16 precision (the exported scale), with a straight-through gradient.

    Idempotent, so rounding twice (on entry to ``fake_quant`` and again in ``unrounded_codes``) is harmless.
    Scales are floored well above float16's smallest subnormal (``qat.quantizers.base.EPS``), so a
    positive scale stays positive.

    Example:
        >>> to_export_precision(torch.tensor([0.1]))  # 0.1 in float16 is 0.0999755859375
        tensor([0.1000])
    """
    if t is None or not torch.is_tensor(t) or not torch.is_floating_point(t):
        return t
    if t.requires_grad:
        return _RoundToHalf.apply(t)
    return t.clamp(-FP16_MAX, FP16_MAX).to(torch.float16).to(t.dtype)


def unrounded_codes(x: torch.Tensor, s: torch.Tensor, beta: torch.Tensor | None) -> torch.Tensor:
    """``u = (x - beta) / s`` in float32 (float64 stays float64): the one expression forward, backward and export share.

    ``u`` is the code before rounding and clamping (``q = clamp(round(u), lo, hi)``; with an integer
    zero point the stored code is ``q + z``). ``s`` and ``beta`` are taken at export precision (float16-rounded; see the module docstring).
    """
    x = x.to(_compute_dtype(x.dtype))
    if beta is not None:
        x = x - to_export_precision(beta)
    return x / to_export_precision(s)


class _GradScale(torch.autograd.Function):
    """Identity in the forward (bitwise), gradient times ``g`` in the backward."""

    @staticmethod
    def forward(ctx, x, g):
        ctx.g = g
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.g, None


def scale_grad(x: torch.Tensor, g: float) -> torch.Tensor:
    """LSQ's ``gs(x, g)``: the value of ``x`` unchanged, its gradient multiplied by ``g``."""
    return _GradScale.apply(x, g) if g != 1.0 else x


class _FakeQuant(torch.autograd.Function):
    # The ops below are written in place where a tensor is no longer needed: on CPU a fresh
    # weight-sized allocation costs as much as the arithmetic, and this runs for every layer twice
    # per step (benchmarks/overhead.py).
    @staticmethod
    def forward(ctx, x, s, beta, s_out, lo, hi, estimator, grad_scale, scale_mode):
        u = unrounded_codes(x, s, beta)
        q = estimator.quantize(u, lo, hi, inplace=not estimator.stochastic)  # u is ours and dies here
        ctx.lo, ctx.hi, ctx.estimator = lo, hi, estimator
        ctx.grad_scale, ctx.scale_mode = grad_scale, scale_mode
        ctx.x_dtype = x.dtype
        saved_q = q if estimator.stochastic else None
        ctx.save_for_backward(x, s, beta, saved_q)
        scale = to_export_precision(s if s_out is None else s_out)
        out = q * scale if saved_q is not None else q.mul_(scale)
        if beta is not None:
            out.add_(to_export_precision(beta))
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, s, beta, q = ctx.saved_tensors
        lo, hi, est = ctx.lo, ctx.hi, ctx.estimator
        grad = grad.to(_compute_dtype(grad.dtype))
        u = unrounded_codes(x, s, beta)
        recomputed = q is None
        if recomputed:
            q = est.quantize(u, lo, hi)
        # d(s q(u))/du = s q'(u) and du/dx = 1/s cancel: vjp is homogeneous in its gradient.
        g_x = est.vjp(u, q, grad, lo, hi)
        g_s = g_beta = None
        if ctx.needs_input_grad[1]:
            if ctx.scale_mode == "clip":
                t = grad * q * (1 - _inside(u, lo, hi))
            else:
                t = q.mul_(grad) if recomputed else grad * q  # d x_hat/ds = q - q'(u) u
                t.addcmul_(g_x, u, value=-1)
            g_s = reduce_to(t, s.shape) * ctx.grad_scale
        if beta is not None and ctx.needs_input_grad[2]:
            g_beta = reduce_to(grad - g_x, beta.shape) * ctx.grad_scale
        g_x = g_x.to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        return g_x, g_s, g_beta, None, None, None, None, None, None


def fake_quant(
    x: torch.Tensor,
    s: torch.Tensor,
    lo: Bound,
    hi: Bound,
    estimator: Estimator,
    beta: torch.Tensor | None = None,
    grad_scale: float = 1.0,
    scale_mode: str = "lsq",
    s_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fake-quantize ``x`` (grouped view) with per-group step ``s`` and optional offset ``beta``.

    Args:
        x: input in the grouped view ``(rows, n_groups, group)``.
        s: step size(s), float32, broadcastable to ``x``; gradients flow to it when it requires grad.
        lo, hi: code bounds (ints, or per-group tensors for integer zero points).
        estimator: the rounding rule and its gradient (``qat.estimators``).
        beta: optional float offset (LSQ+), broadcastable to ``x``.
        grad_scale: multiplies the gradients of ``s`` and ``beta`` (LSQ's ``1/sqrt(N * q_hi)``).
        scale_mode: ``"lsq"`` (full step gradient) or ``"clip"`` (PACT: clipped elements only).
        s_out: output scale, when it differs from the rounding step (TWN); gets no gradient.

    Returns:
        ``q * s_out + beta`` in the dtype of ``x``, with ``s``, ``s_out`` and ``beta`` rounded to
        float16 precision (straight-through), the precision the export stores.

    Example:
        >>> from qat.estimators import ClippedSTE
        >>> fake_quant(torch.tensor([[[0.26, -1.3]]]), torch.tensor(0.5), -2, 1, ClippedSTE())
        tensor([[[ 0.5000, -1.0000]]])
    """
    if estimator.differentiable and estimator.training:
        s, beta, s_out = to_export_precision(s), to_export_precision(beta), to_export_precision(s_out)
        s = scale_grad(s, grad_scale)
        if beta is not None:
            beta = scale_grad(beta, grad_scale)
        u = unrounded_codes(x, s, beta)
        q = estimator.quantize(u, lo, hi)
        out = q * (s if s_out is None else s_out.detach())
        if beta is not None:
            out = out + beta
        return out.to(x.dtype)
    return _FakeQuant.apply(x, s, beta, s_out, lo, hi, estimator, grad_scale, scale_mode)
