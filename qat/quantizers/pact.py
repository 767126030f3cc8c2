"""PACT: parameterized clipping activation (Choi et al., 2018), for activations.

Unsigned (the paper; inputs after a ReLU), ``L = 2^b - 1`` levels above zero::

    y = clip(x, 0, alpha),   x_hat = round(y * L / alpha) * alpha / L
    dx_hat/dx     = 1[0 <= x <= alpha]
    dx_hat/dalpha = 1[x > alpha]               (PACT drops the in-range rounding term LSQ keeps)

Signed (``signed=True``, for transformer activations that are not post-ReLU), the symmetric
extension with ``L = 2^(b-1) - 1``::

    y = clip(x, -alpha, alpha),  dx_hat/dalpha = sign(x) * 1[|x| > alpha]

``alpha`` is one float32 scalar per tensor (the reference, IntelLabs/distiller
``LearnedClippedLinearQuantizeSTE``). It is initialised from the calibration batch as its largest
magnitude (or fixed by ``alpha=``, e.g. Distiller's 8.0). Give it its own parameter group with an
L2 decay: its gradient is a sum over all clipped activations. Range ends count as in range
(``x = alpha``: input gradient 1, alpha gradient 0, up to the float rounding of ``x * L / alpha``);
the paper and Distiller count ``x = alpha`` as clipped, a measure-zero difference except for the
calibration maximum right after ``init_``.
"""

from __future__ import annotations

import torch

from qat.errors import UserError
from qat.quantizers.base import LEARNED_EPS, Codes, Quantizer
from qat.quantizers.fake_quant import fake_quant, unrounded_codes
from qat.quantizers.minmax import MinMax


class PACT(Quantizer):
    """Learned clipping for activations.

    Args:
        bits: bit width, 2..8.
        signed: clip to ``[-alpha, alpha]`` with a signed narrow grid instead of ``[0, alpha]``.
        alpha: initial clipping value; None initialises it from the first batch (max |x|).
        estimator: see ``Quantizer``.

    Example:
        >>> q = PACT(bits=2, alpha=3.0)
        >>> q(torch.tensor([-1.0, 0.9, 1.6, 5.0]))
        tensor([0., 1., 2., 3.], grad_fn=<ViewBackward0>)
    """

    def __init__(self, bits=8, signed=False, alpha: float | None = None, estimator=None, granularity="tensor", group_size=None):
        if granularity != "tensor":
            raise UserError("PACT learns one clipping value per tensor: use granularity='tensor'")
        super().__init__(bits, "tensor", None, symmetric=signed, narrow=signed, estimator=estimator)
        self.init_alpha = alpha
        self.alpha = torch.nn.Parameter(torch.tensor([[[float(alpha if alpha is not None else 1.0)]]]))
        if alpha is not None:
            self.initialized.fill_(True)
            self._ready = True

    def rtn(self) -> MinMax:
        return MinMax.like(self)

    def _init(self, g):
        self._param("alpha", g.abs().amax(-1, keepdim=True).clamp_min(LEARNED_EPS))

    def _step(self):
        return self.alpha.clamp_min(LEARNED_EPS) / self.grid.hi

    def _fake_quant(self, g):
        return fake_quant(g, self._step(), self.grid.lo, self.grid.hi, self.estimator, scale_mode="clip")

    def _codes(self, g, x) -> Codes:
        s = self._step()
        q = self.estimator.quantize(unrounded_codes(g, s, None), self.grid.lo, self.grid.hi)
        return self._make_codes(q, x, s, self.grid.lo, self.grid.hi)

    def extra_repr(self):
        return super().extra_repr() + f", signed={self.grid.signed}"
