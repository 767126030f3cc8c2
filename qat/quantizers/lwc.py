"""LWC: OmniQuant's learnable weight clipping (Shao et al., ICLR 2024), for weights.

Per output row or group, two logits ``a`` (upper) and ``c`` (lower), initialised to 4
(``sigmoid(4) = 0.982``), shrink the min/max range::

    asymmetric:  h = (sigmoid(a) * max W - sigmoid(c) * min W) / (2^b - 1),   z = round(-sigmoid(c) * min W / h)
    symmetric:   h = max(|sigmoid(a) * max W|, |sigmoid(c) * min W|) / (2^(b-1) - 1),   z = 2^(b-1) - 1
    W_hat = h * (clamp(round_ste(W / h) + z, 0, 2^b - 1) - z),   h clamped to [1e-5, 1e4]

Gradients reach ``a`` and ``c`` through ``h`` only: ``z`` is rounded without a straight-through
gradient, as in the reference (OpenGVLab/OmniQuant ``quantize/quantizer.py``,
``UniformAffineQuantizer``); EfficientQAT's round_ste on ``z`` is not used. The clamp keeps its
true derivative at the rounded value, as in the reference's ``clamp(round_ste(W / h) + z)``: the
default estimator is ``ClippedSTE(after_round=True)``, so ``dW_hat/dW = 1[0 <= round(u) + z <= 2^b - 1]``
and ``dW_hat/dh = round(u) - u`` there, the clipped code outside (no extra gradient scaling:
OmniQuant has none). At init the extreme weights lie a fraction of a step outside the grid and keep
their gradient this way.

Decision: the min/max statistics are taken from the weights without gradient. OmniQuant freezes
the weights while it learns the clipping, so its gradient through ``amax`` never matters there; in
QAT, where weights train too, a gradient through the extremes would single out one weight per
group. The symmetric grid follows the reference: codes ``[0, 2^b - 1]`` around ``z = 2^(b-1) - 1``,
i.e. values ``[-(2^(b-1) - 1), 2^(b-1)]`` steps.
"""

from __future__ import annotations

import torch

from qat.estimators import ClippedSTE
from qat.quantizers.base import Codes, Quantizer
from qat.quantizers.fake_quant import fake_quant, unrounded_codes
from qat.quantizers.minmax import MinMax

H_MIN, H_MAX = 1e-5, 1e4


class LWC(Quantizer):
    """Learnable weight clipping (OmniQuant).

    Args:
        bits, granularity, group_size, estimator: see ``Quantizer`` (``granularity`` "channel" or "group";
            default estimator ``ClippedSTE(after_round=True)``, the reference's gradient).
        symmetric: the symmetric variant (see the module docstring).
        init: initial value of both clipping logits (4.0 in OmniQuant).

    Example:
        >>> q = LWC(bits=4, granularity="channel")
        >>> w = torch.randn(8, 32)
        >>> bool(((q(w) - w).abs() <= w.abs().amax(1, keepdim=True) / 7).all())
        True
    """

    lazy_params = ("upper", "lower")

    def __init__(self, bits=4, granularity="channel", group_size=None, symmetric=False, estimator=None, init: float = 4.0):
        super().__init__(bits, granularity, group_size, symmetric=symmetric, estimator=estimator)
        self.init_logit = float(init)
        self.max_code = 2**bits - 1  # the largest unsigned code; the clipping range spans max_code steps

    def default_estimator(self):
        return ClippedSTE(after_round=True)

    def rtn(self) -> MinMax:
        return MinMax.like(self)

    def _init(self, g):
        shape = (g.shape[0], g.shape[1], 1)
        self._param("upper", torch.full(shape, self.init_logit, device=g.device))
        self._param("lower", torch.full(shape, self.init_logit, device=g.device))

    def _step_and_zero(self, g):
        with torch.no_grad():
            gf = g.float()
            xmax, xmin = gf.amax(-1, keepdim=True), gf.amin(-1, keepdim=True)
        up, low = torch.sigmoid(self.upper) * xmax, torch.sigmoid(self.lower) * xmin
        if self.grid.signed:
            half = 2 ** (self.bits - 1) - 1
            h = torch.maximum(up.abs(), low.abs()) / half
            h = h.clamp(H_MIN, H_MAX)
            z = torch.full_like(h, float(half)).detach()
        else:
            h = ((up - low) / self.max_code).clamp(H_MIN, H_MAX)
            z = torch.round(-low / h).clamp(-1e4, 1e4).detach()
        return h, z

    def _fake_quant(self, g):
        h, z = self._step_and_zero(g)
        return fake_quant(g, h, -z, self.max_code - z, self.estimator)

    def _codes(self, g, x) -> Codes:
        h, z = self._step_and_zero(g)
        q = self.estimator.quantize(unrounded_codes(g, h, None), -z, self.max_code - z)
        return self._make_codes(q + z, x, h, 0, self.max_code, zero=z.contiguous())

    def extra_repr(self):
        return super().extra_repr() + f", symmetric={self.grid.signed}"
