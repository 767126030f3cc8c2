"""Ternary weights {-1, 0, +1} times a scale, with three grids and Tequila's dead-zone bias.

``method="absmean"`` (BitNet b1.58, Ma et al. 2024; transformers ``integrations/bitnet.py``)::

    gamma = mean|W|  (per tensor/channel/group, clamped >= 1e-5)
    W_hat = gamma * clamp(round(W / gamma), -1, 1)          threshold 0.5 * gamma, scale gamma
    backward: identity to W (plain STE); gamma is a statistic without gradient

``method="twn"`` (Li et al. 2016; TernaryBERT's ``TwnQuantizer``)::

    Delta = 0.7 * mean|W|,   I = {|W| > Delta},   alpha = mean_I |W|
    W_hat = alpha * sign(W) * 1_I                            threshold Delta, scale alpha
    backward: identity to W; Delta and alpha are statistics without gradient

``method="seq"`` (ParetoQ's stretched elastic quantizer, Liu et al. 2025; facebookresearch/ParetoQ
``StretchedElasticQuant`` with ``w_bits=0``), a learned ``alpha`` per row or group, init ``max|W|``::

    u = clamp(W / alpha, -0.99, 0.99),   W_hat = (alpha / 1.5) * round(1.5 * u)   in alpha * {-2/3, 0, 2/3}
    dW_hat/dW     = 1[|W / alpha| <= 0.99]
    dW_hat/dalpha = round(1.5 u) / 1.5 - W / alpha inside, sign(W) * 1 outside, times 1/sqrt(numel)

  We follow the reference code, quirk included: outside the clip the alpha-gradient uses
  ``Qp = 1`` although the clipped value is 2/3. The value is computed as ``q * fp16(alpha / 1.5)``
  (the reference divides first, then multiplies by alpha; the step is rounded to the float16 the
  export stores, with a straight-through gradient) so the export ``codes * scale`` is bitwise the
  training forward.

``deadzone="tequila"`` (Tequila, arXiv 2509.23809; Tencent/AngelSlim ``UltraQuantV2``): the weights
the grid rounds to zero, ``D = {q = 0}``, are repurposed as a dynamic bias::

    y = x @ W_hat^T + b_dead,     b_dead[j] = lam * sum_{i in D_j} W[j, i]     (lam = 1e-3)
    dL/dW[j, i] = G_A[j, i] + lam * sum_t g[t, j] * 1[(j, i) in D]

  so trapped weights get a direct, informative gradient and can leave the dead zone. The bias is
  input-independent; at export it folds into the layer bias (near-zero inference cost). ``D`` is
  taken from the codes, so a weight exactly at the threshold (ties round to even, i.e. to 0)
  counts as dead; the reference uses ``|w| < Delta`` (a measure-zero difference).

The ternary pitfall (ALGORITHMS.md section 3): thresholds and scales differ between the three
grids (0.5 gamma / 0.7 mean / alpha/3); tests pin each of them.
"""

from __future__ import annotations

import math

import torch

from qat.errors import UserError
from qat.estimators import STE
from qat.grid import Grid, check_granularity
from qat.quantizers.base import LEARNED_EPS, Codes, Quantizer
from qat.quantizers.fake_quant import fake_quant, to_export_precision, unrounded_codes

METHODS = ("absmean", "twn", "seq")
DEADZONES = (None, "tequila")
SEQ_CLIP, SEQ_LEVELS = 0.99, 1.5
TWN_RATIO = 0.7


class _SEQ(torch.autograd.Function):
    """ParetoQ's ternary stretched elastic quantizer with a pluggable rounding estimator."""

    @staticmethod
    def forward(ctx, w, alpha, estimator, grad_scale):
        r = w.float() / alpha
        v = SEQ_LEVELS * r.clamp(-SEQ_CLIP, SEQ_CLIP)
        q = estimator.quantize(v, -1, 1)
        step = to_export_precision(alpha / SEQ_LEVELS)  # the exported scale (float16), straight-through
        ctx.estimator, ctx.grad_scale, ctx.w_dtype = estimator, grad_scale, w.dtype
        ctx.save_for_backward(w, alpha, q if estimator.stochastic else None)
        return (q * step).to(w.dtype)

    @staticmethod
    def backward(ctx, grad):
        w, alpha, q = ctx.saved_tensors
        est = ctx.estimator
        grad = grad.float()
        r = w.float() / alpha
        inside = r.abs() <= SEQ_CLIP
        v = SEQ_LEVELS * r.clamp(-SEQ_CLIP, SEQ_CLIP)
        if q is None:
            q = est.quantize(v, -1, 1)
        # value = (alpha / n) q(v), v = n w / alpha: the factors cancel in dL/dw (vjp is homogeneous).
        g_w = est.vjp(v, q, grad, -1, 1) * inside
        g_alpha = None
        if ctx.needs_input_grad[1]:
            # inside: q/n - q'(v) * r ; outside: sign(w) * Qp with Qp = 1 (reference quirk)
            t = torch.where(inside, grad * q / SEQ_LEVELS - g_w * r, grad * torch.sign(r))
            g_alpha = t.sum(-1, keepdim=True) * ctx.grad_scale
        return g_w.to(ctx.w_dtype), g_alpha, None, None


class Ternary(Quantizer):
    """Ternary weight quantizer.

    Args:
        method: ``"absmean"`` (BitNet b1.58), ``"twn"`` or ``"seq"`` (ParetoQ).
        granularity: ``"tensor"``, ``"channel"`` or ``"group"`` (Tequila's reference: groups of 128).
        group_size: elements per group along ``in_features``.
        deadzone: None, or ``"tequila"`` to turn dead-zone weights into a dynamic bias.
        lam: Tequila's ``lambda`` (``eps`` in the reference), 1e-3.
        estimator: rounding estimator (default: the plain STE, the identity of all three references).

    Raises:
        UserError: unknown method or dead-zone mode, bad granularity.

    Example (ALGORITHMS.md's Tequila example):
        >>> q = Ternary("absmean", granularity="channel", deadzone="tequila")
        >>> w = torch.tensor([[0.4, -0.05, 0.1, -0.6]])
        >>> q(w) + 0.0  # (+ 0.0 prints the -0.0 of round(-0.05 / gamma) as 0.0)
        tensor([[ 0.2876,  0.0000,  0.0000, -0.2876]])
        >>> q.bias(w, q(w))
        tensor([5.0000e-05])
    """

    lazy_params = ("alpha",)

    def __init__(self, method="absmean", granularity="channel", group_size=None, deadzone=None, lam=1e-3, estimator=None, bits=None, symmetric=True):
        if method not in METHODS:
            raise UserError(f"Ternary method={method!r} is not one of {METHODS}")
        if deadzone not in DEADZONES:
            raise UserError(f"Ternary deadzone={deadzone!r} is not one of {DEADZONES}")
        if bits not in (None, 2):
            raise UserError(f"Ternary weights take 1.58 bits (stored in 2); got bits={bits}: drop bits or use LSQ/MinMax")
        if not symmetric:
            raise UserError("Ternary grids are symmetric; drop symmetric=False")
        check_granularity(granularity, group_size)
        if granularity == "token":
            raise UserError("Ternary quantizes weights: use granularity 'tensor', 'channel' or 'group'")
        super().__init__(2, granularity, group_size, symmetric=True, narrow=True, estimator=estimator)
        self.grid = Grid.ternary()
        self.method, self.deadzone, self.lam = method, deadzone, float(lam)

    def default_estimator(self):
        return STE()

    @property
    def bits(self) -> float:
        return math.log2(3)

    def _init(self, g):
        if self.method == "seq":
            self._param("alpha", g.abs().amax(-1, keepdim=True).clamp_min(LEARNED_EPS))

    def _stats(self, g):
        """(rounding step, output scale) for the statistic-based grids, without gradient."""
        with torch.no_grad():
            a = g.detach().float().abs()
            mean = a.mean(-1, keepdim=True)
            if self.method == "absmean":
                gamma = mean.clamp_min(LEARNED_EPS)
                return gamma, None
            delta = TWN_RATIO * mean
            keep = a > delta
            alpha = (a * keep).sum(-1, keepdim=True) / keep.sum(-1, keepdim=True).clamp_min(1)
            return (2 * delta).clamp_min(LEARNED_EPS), alpha.clamp_min(LEARNED_EPS)

    def grad_scale(self, g) -> float:
        return 1.0 / math.sqrt(g.numel())

    def _fake_quant(self, g):
        if self.method == "seq":
            return _SEQ.apply(g, self.alpha.clamp_min(LEARNED_EPS), self.estimator, self.grad_scale(g))
        step, scale = self._stats(g)
        return fake_quant(g, step, -1, 1, self.estimator, s_out=scale)

    def _codes(self, g, x) -> Codes:
        if self.method == "seq":
            alpha = self.alpha.clamp_min(LEARNED_EPS)
            v = SEQ_LEVELS * (g.float() / alpha).clamp(-SEQ_CLIP, SEQ_CLIP)
            q, scale = self.estimator.quantize(v, -1, 1), alpha / SEQ_LEVELS
        else:
            step, scale = self._stats(g)
            q = self.estimator.quantize(unrounded_codes(g, step, None), -1, 1)
            scale = step if scale is None else scale
        # Per output row of x, whatever the grouping (the same expression as ``bias``).
        bias = self.bias(x.float(), q.reshape(x.shape))
        return self._make_codes(q, x, scale, -1, 1, bias=bias)

    def rtn(self) -> Ternary:
        """Round-to-nearest on the same grid and grouping: untrained (SEQ's alpha at its init
        ``max|W|``), without a dead-zone bias (Tequila's grid is absmean's)."""
        return Ternary(self.method, granularity=self.granularity, group_size=self.group_size)

    def bias(self, w: torch.Tensor, w_hat: torch.Tensor) -> torch.Tensor | None:
        """Tequila's dead-zone bias ``lam * sum_{q = 0} W`` per output row (None without a dead zone)."""
        if self.deadzone is None:
            return None
        return self.lam * torch.where(w_hat == 0, w, 0.0).sum(-1)

    def extra_repr(self):
        s = f"method={self.method!r}, granularity={self.granularity!r}"
        s += f", group_size={self.group_size}" if self.group_size else ""
        return s + (f", deadzone={self.deadzone!r}, lam={self.lam}" if self.deadzone else "")
