"""Round-to-nearest with min/max statistics: the post-training baseline (RTN).

Symmetric (signed grid ``[lo, hi]``)::

    s = max|x| / hi,          x_hat = s * clamp(round(x / s), lo, hi)

Asymmetric (unsigned grid ``[0, 2^b - 1]``, the range widened to include 0)::

    s = (max - min) / (2^b - 1),   z = clamp(round(-min / s), 0, 2^b - 1)
    x_hat = s * (clamp(round(x / s) + z, 0, 2^b - 1) - z)

Statistics are taken per tensor, channel, group or token (``qat.grid``). With ``dynamic=True``
(the default) they are recomputed at every forward, so the quantizer follows weights that train
(this is the fixed-scale fake quantization of torchao and of QAT before LSQ); with
``dynamic=False`` they are frozen by ``init_`` (static activation ranges from calibration). The
statistics carry no gradient; the input's gradient comes from the estimator, by default the clipped
STE differentiated after rounding (``ClippedSTE(after_round=True)``, the mask of
``torch.fake_quantize_*``): the extreme elements, which can land up to half a step outside the grid
(asymmetric) or a rounding error above ``hi`` (symmetric), keep their gradient.

Symmetric scales use ``max|x| / hi`` so the largest magnitude is representable (the most
negative code of a full signed grid is then used only by clipped values); the zero point is folded
into per-group bounds so that ``x_hat = q * s`` equals ``(c - z) * s`` bitwise (ALGORITHMS.md 8).
"""

from __future__ import annotations

import torch

from qat.estimators import ClippedSTE
from qat.quantizers.base import EPS, Codes, Quantizer
from qat.quantizers.fake_quant import fake_quant, unrounded_codes


class MinMax(Quantizer):
    """Round-to-nearest quantizer with min/max (or absmax) statistics.

    Args:
        bits, granularity, group_size, symmetric, narrow, estimator: see ``Quantizer``.
        dynamic: recompute statistics at each forward (True) or freeze them at ``init_``.

    Example:
        >>> q = MinMax(bits=8, granularity="channel")
        >>> w = torch.randn(4, 16)
        >>> (q(w) - w).abs().max() < w.abs().max() / 127
        tensor(True)
    """

    lazy_buffers = ("scale", "zero")

    def __init__(self, bits=4, granularity="channel", group_size=None, symmetric=True, narrow=False, estimator=None, dynamic=True):
        super().__init__(bits, granularity, group_size, symmetric, narrow, estimator)
        self.dynamic = dynamic

    @classmethod
    def like(cls, q: Quantizer) -> MinMax:
        """Round-to-nearest on ``q``'s grid and grouping (min/max statistics): ``q``'s PTQ baseline."""
        g = q.grid
        return cls(bits=g.bits, granularity=q.granularity, group_size=q.group_size, symmetric=g.signed, narrow=g.narrow)

    def rtn(self) -> MinMax:
        return MinMax.like(self)

    def default_estimator(self):
        return ClippedSTE(after_round=True)

    def _stats(self, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        g = g.detach().float()
        if self.grid.signed:
            s = g.abs().amax(-1, keepdim=True) / self.grid.hi
            return s.clamp_min(EPS), None
        lo = g.amin(-1, keepdim=True).clamp(max=0)
        hi = g.amax(-1, keepdim=True).clamp(min=0)
        s = ((hi - lo) / self.grid.hi).clamp_min(EPS)
        z = torch.round(-lo / s).clamp(0, self.grid.hi)
        return s, z

    def _current(self, g):
        if self.dynamic:
            return self._stats(g)
        return self.scale, getattr(self, "zero", None)

    def _init(self, g):
        if not self.dynamic:
            s, z = self._stats(g)
            self._buffer("scale", s)
            if z is not None:
                self._buffer("zero", z)

    def _bounds(self, z):
        if z is None:
            return self.grid.lo, self.grid.hi
        return -z, self.grid.hi - z

    def _fake_quant(self, g):
        s, z = self._current(g)
        lo, hi = self._bounds(z)
        return fake_quant(g, s, lo, hi, self.estimator)

    def _codes(self, g, x) -> Codes:
        s, z = self._current(g)
        lo, hi = self._bounds(z)
        q = self.estimator.quantize(unrounded_codes(g, s, None), lo, hi)
        if z is None:
            return self._make_codes(q, x, s, self.grid.lo, self.grid.hi)
        return self._make_codes(q + z, x, s, 0, self.grid.hi, zero=z.expand(q.shape[0], q.shape[1], 1).contiguous())

    def extra_repr(self):
        return super().extra_repr() + f", symmetric={self.grid.signed}, dynamic={self.dynamic}"
