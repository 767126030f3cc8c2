"""Gradient estimators: what replaces ``round`` (and its zero gradient) during training.

Every quantizer maps its input to *level units* ``u`` (``u = (x - beta) / s``), asks its estimator
for the codes ``q`` in ``[lo, hi]``, and returns ``s * q + beta``. An estimator therefore owns two
rules, both in level units:

* ``quantize(u, lo, hi)``: the training forward. Hard rounding for the straight-through family,
  a random rounding or a noisy value for the stochastic ones, a smooth staircase for DSQ. In eval
  mode every estimator rounds to nearest (``torch.round``: ties to even), so evaluation and export
  are deterministic and identical whichever estimator trained the model.
* ``vjp(u, q, grad_q, lo, hi)``: the gradient with respect to ``u`` given the gradient with respect
  to ``q`` (a vector-Jacobian product, so rules that look at the incoming gradient, like EWGS,
  fit). It must be positively homogeneous in ``grad_q`` (``vjp(c g) = c vjp(g)`` for ``c > 0``),
  which every rule here is: the fused kernel then feeds it the output gradient directly.
  Quantizers derive every other gradient (input, step size, offset) from it, so any estimator
  plugs into any quantizer.

Estimators whose forward is itself differentiable (DSQ, with its learnable temperature) set
``differentiable = True``: quantizers then let autograd run through ``quantize`` instead of their
fused kernel. Estimators whose forward draws random numbers set ``stochastic = True``: the fused
kernel then keeps ``q`` for the backward instead of recomputing it.

References are the ones in ALGORITHMS.md section 4: EWGS (Lee et al., CVPR 2021,
cvlab-yonsei/EWGS), DSQ (Gong et al., ICCV 2019), stochastic rounding (Gupta et al., 2015),
additive noise as pseudo-quantization (DiffQ, Defossez et al., 2021).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from qat.errors import UserError

Bound = int | float | torch.Tensor


def _inside(u: torch.Tensor, lo: Bound, hi: Bound) -> torch.Tensor:
    """``1[lo <= u <= hi]`` as a float tensor (float masks multiply several times faster than bool)."""
    if isinstance(lo, torch.Tensor) or isinstance(hi, torch.Tensor):
        return ((u >= lo) & (u <= hi)).to(u.dtype)
    return (u.clamp(lo, hi) == u).to(u.dtype)


def _clamp(u: torch.Tensor, lo: Bound, hi: Bound) -> torch.Tensor:
    if isinstance(lo, torch.Tensor) or isinstance(hi, torch.Tensor):
        return torch.clamp(u, lo, hi)
    return u.clamp(lo, hi)


def hard_round(u: torch.Tensor, lo: Bound, hi: Bound) -> torch.Tensor:
    """Round to nearest (ties to even, as ``torch.round``) and clip to ``[lo, hi]`` (one new tensor)."""
    return torch.round(u).clamp_(lo, hi)


class Estimator(nn.Module):
    """Base class: hard rounding in both modes; subclasses override the training rules."""

    stochastic = False
    differentiable = False

    def quantize(self, u: torch.Tensor, lo: Bound, hi: Bound, inplace: bool = False) -> torch.Tensor:
        """Codes of ``u``; ``inplace=True`` lets hard rounding reuse ``u``'s memory (the caller owns ``u``)."""
        if not self.training or type(self).train_quantize is Estimator.train_quantize:
            return torch.round(u, out=u).clamp_(lo, hi) if inplace else hard_round(u, lo, hi)
        return self.train_quantize(u, lo, hi)

    def train_quantize(self, u: torch.Tensor, lo: Bound, hi: Bound) -> torch.Tensor:
        return hard_round(u, lo, hi)

    def vjp(self, u: torch.Tensor, q: torch.Tensor, grad_q: torch.Tensor, lo: Bound, hi: Bound) -> torch.Tensor:
        raise NotImplementedError


class STE(Estimator):
    """Plain straight-through estimator: ``dq/du = 1`` everywhere, the clip included (BitNet b1.58).

    Example:
        >>> STE().vjp(torch.tensor([5.0]), torch.tensor([1.0]), torch.tensor([2.0]), -2, 1)
        tensor([2.])
    """

    def vjp(self, u, q, grad_q, lo, hi):
        return grad_q


class ClippedSTE(Estimator):
    """Clipped straight-through estimator: ``dq/du = 1[lo <= u <= hi]`` (LSQ, ParetoQ).

    The clip keeps its true derivative; only ``round`` is passed straight through.

    Args:
        after_round: differentiate the clip at the rounded value, ``dq/du = 1[lo <= round(u) <= hi]``:
            the gradient of ``clamp(round_ste(u), lo, hi)``, the order of OmniQuant's LWC and of
            ``torch.fake_quantize_*``. Elements less than half a step outside the grid still pass,
            so the element that sets a min/max statistic keeps its gradient (with the default
            mask it loses it whenever ``x / (max|x| / hi)`` rounds to just above ``hi``).

    Example:
        >>> ClippedSTE().vjp(torch.tensor([1.3]), torch.tensor([1.0]), torch.tensor([2.0]), -2, 1)
        tensor([0.])
        >>> ClippedSTE(after_round=True).vjp(torch.tensor([1.3]), torch.tensor([1.0]), torch.tensor([2.0]), -2, 1)
        tensor([2.])
    """

    def __init__(self, after_round: bool = False):
        super().__init__()
        self.after_round = bool(after_round)

    def vjp(self, u, q, grad_q, lo, hi):
        if self.after_round:
            return (torch.round(u) == q).to(grad_q.dtype).mul_(grad_q)
        return _inside(u, lo, hi).mul_(grad_q)

    def extra_repr(self):
        return f"after_round={self.after_round}" if self.after_round else ""


class EWGS(Estimator):
    """Element-wise gradient scaling (Lee et al., CVPR 2021).

    ``g_u = g_q * (1 + delta * sign(g_q) * (u_n - q_n))`` inside the clip range, 0 outside, where
    ``u_n - q_n = (u - q) / (hi - lo)`` is the discretisation error in the ``[0, 1]``-normalised
    domain of the reference code (cvlab-yonsei/EWGS ``EWGS_discretizer``), not in level units.
    ``delta = 0`` is the clipped STE. This module keeps ``delta`` fixed (the paper's Hessian-based
    update is a training-loop concern).

    Args:
        delta: the scaling factor, 1e-3 in the paper's fixed setting. Must be >= 0.
    """

    def __init__(self, delta: float = 1e-3):
        super().__init__()
        if not delta >= 0:
            raise UserError(f"EWGS delta must be >= 0, got {delta}")
        self.delta = float(delta)

    def vjp(self, u, q, grad_q, lo, hi):
        span = hi - lo
        scale = 1 + self.delta * torch.sign(grad_q) * (u - q) / span
        return _inside(u, lo, hi).mul_(scale).mul_(grad_q)

    def extra_repr(self):
        return f"delta={self.delta}"


class StochasticRounding(Estimator):
    """Stochastic rounding: ``q = floor(u) + Bernoulli(u - floor(u))``, so ``E[q] = u`` inside the range.

    Training only; eval rounds to nearest. Backward: clipped identity (``1[lo <= u <= hi]``).
    """

    stochastic = True

    def train_quantize(self, u, lo, hi):
        u = _clamp(u, lo, hi)
        floor = torch.floor(u)
        return floor + (torch.rand_like(u) < (u - floor)).to(u.dtype)

    def vjp(self, u, q, grad_q, lo, hi):
        return _inside(u, lo, hi).mul_(grad_q)


class AdditiveNoise(Estimator):
    """Pseudo-quantization noise (DiffQ): ``q = clip(u) + eps`` in training, exact gradients.

    ``eps ~ U(-1/2, 1/2)`` (std ``1/sqrt(12)`` of a step) or ``N(0, 1) / 2`` (std half a step),
    the two noises of facebookresearch/diffq. Eval rounds to nearest. Backward: the clip's true
    derivative, ``1[lo <= u <= hi]`` (noise is additive, so ``dq/du = 1`` inside).

    Args:
        distribution: ``"uniform"`` or ``"gaussian"``.
    """

    stochastic = True

    def __init__(self, distribution: str = "uniform"):
        super().__init__()
        if distribution not in ("uniform", "gaussian"):
            raise UserError(f"AdditiveNoise distribution must be 'uniform' or 'gaussian', got {distribution!r}")
        self.distribution = distribution

    def train_quantize(self, u, lo, hi):
        u = _clamp(u, lo, hi)
        if self.distribution == "uniform":
            return u + (torch.rand_like(u) - 0.5)
        return u + torch.randn_like(u) * 0.5

    def vjp(self, u, q, grad_q, lo, hi):
        return _inside(u, lo, hi).mul_(grad_q)

    def extra_repr(self):
        return f"distribution={self.distribution!r}"


class DSQ(Estimator):
    """Differentiable soft quantization (Gong et al., ICCV 2019).

    In level units each bin has width 1. For ``u`` clipped to ``[lo, hi]``, bin ``i = floor(u - lo)``
    (the top edge joins the last bin), centre ``m = lo + i + 1/2``::

        k   = ln(2 / alpha - 1)            k_s = 1 / (1 - alpha)  (so phi(m +- 1/2) = +-1)
        phi = k_s * tanh(k * (u - m))
        q   = lo + i + (phi + 1) / 2

    ``alpha`` (init 0.2) is learned through autograd; ``alpha -> 0`` gives hard rounding. Eval
    rounds to nearest, the deploy rule ``sign(phi)``, with the clipped STE as its backward. The
    bin centre follows the paper (the unofficial ricky40403/DSQ code uses the upper bound by
    mistake).

    Args:
        alpha: initial temperature in (0, 1).
    """

    differentiable = True

    def __init__(self, alpha: float = 0.2):
        super().__init__()
        if not 0 < alpha < 1:
            raise UserError(f"DSQ alpha must lie in (0, 1), got {alpha}")
        self.alpha = nn.Parameter(torch.tensor(float(alpha)))

    def train_quantize(self, u, lo, hi):
        u = _clamp(u, lo, hi)
        alpha = self.alpha.clamp(1e-4, 1 - 1e-4)
        i = torch.floor(u - lo).detach()
        i = torch.minimum(i, torch.as_tensor(hi - lo - 1, dtype=u.dtype, device=u.device))
        m = lo + i + 0.5
        k = torch.log(2 / alpha - 1)
        phi = torch.tanh(k * (u - m)) / (1 - alpha)
        return lo + i + (phi + 1) / 2

    def vjp(self, u, q, grad_q, lo, hi):
        # Training runs through autograd; in eval (hard rounding, DSQ's alpha -> 0 limit) a
        # backward pass (e.g. a Hessian estimate on an eval-mode model) gets the clipped STE.
        return grad_q * _inside(u, lo, hi)


def ewgs_delta_from_hessian(trace_over_n: float, grad_std: float) -> float:
    """EWGS's Hessian-based ``delta = (Tr(H) / N) / (3 * std(g))``, clipped at 0 (paper eq. 9)."""
    if grad_std <= 0 or not math.isfinite(grad_std):
        return 0.0
    return max(trace_over_n, 0.0) / (3.0 * grad_std)
