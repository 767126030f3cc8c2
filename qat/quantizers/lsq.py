"""LSQ and LSQ+: learned step size (and offset).

LSQ (Esser et al., "Learned Step Size Quantization", ICLR 2020)::

    x_hat = s * clamp(round(x / s), lo, hi)
    dx_hat/dx = 1[lo <= x/s <= hi]                      (STE replaces round only)
    dx_hat/ds = round(u) - u inside, lo or hi outside   (u = x / s)
    s's gradient is scaled by g = 1 / sqrt(N * hi)

LSQ+ (Bhalgat et al., CVPRW 2020) adds a learned offset ``beta``::

    x_hat = s * clamp(round((x - beta) / s), lo, hi) + beta
    dx_hat/dbeta = 1 on clipped elements, 0 inside; its gradient is scaled by g too.

Decisions (ALGORITHMS.md section 1):

* ``N`` is the number of elements sharing one step size (a group's size, a row's length, or the
  whole tensor), which keeps LSQ's balance argument (the relative update of ``s`` matches that
  of the weights) at every granularity. For a per-tensor step this is the whole ``numel``, as in
  zhutmost/lsq-net, which also counts the batch for activations.
* Init (``init_``): ``init="lsq"``, the paper's ``s0 = 2 * mean|x| / sqrt(hi)`` per group, or
  ``init="minmax"``, ``s0 = max|x| / hi``: round-to-nearest's step, which ParetoQ uses for 3- and
  4-bit LLM weights (the paper's init is tuned for CNNs trained long enough to recover from it).
  With ``offset=True`` the min/max init of LSQ+: ``s = (max - min) / (hi - lo)``,
  ``beta = min - lo * s``, so the grid spans the data exactly; or ``init="rtn"``:
  ``beta = (round(min / s) - lo) * s``, which puts 0 on the grid and reproduces asymmetric
  round-to-nearest (MinMax). At 2-3 bits this matters: most weights sit near 0, and a grid that
  misses 0 moves all of them by up to s/2 (SmolLM2 w3 g64: 199 vs 66 held-out perplexity).
* ``s`` stays float32 and is floored at 1e-5 in the forward (ParetoQ); ``s <= 0`` would diverge.
* Any estimator can replace the clipped STE; the gradients above then follow from its ``vjp``
  (see ``qat.quantizers.fake_quant``).
"""

from __future__ import annotations

import math

import torch

from qat.errors import UserError
from qat.quantizers.base import LEARNED_EPS, Codes, Quantizer
from qat.quantizers.fake_quant import fake_quant, unrounded_codes
from qat.quantizers.minmax import MinMax


class LSQ(Quantizer):
    """Learned step-size quantizer; ``offset=True`` gives LSQ+.

    Args:
        bits, granularity, group_size, symmetric, narrow, estimator: see ``Quantizer``.
            ``symmetric=False`` uses the unsigned grid ``[0, 2^b - 1]`` (non-negative activations,
            or any tensor when combined with ``offset``).
        offset: learn an offset ``beta`` per scale (LSQ+).
        init: ``"lsq"`` (the paper's step) or ``"minmax"`` (round-to-nearest's step); with
            ``offset=True``, ``"rtn"`` starts from asymmetric round-to-nearest (0 on the grid) and
            anything else from the exact min/max span.

    Example (ALGORITHMS.md's worked example, step gradient -0.1):
        >>> q = LSQ(bits=2, granularity="tensor")
        >>> _ = q.init_(torch.ones(4)); _ = q.scale.data.fill_(0.5)
        >>> w = torch.tensor([-1.3, -0.2, 0.3, 0.9], requires_grad=True)
        >>> q(w).sum().backward(); q.scale.grad.flatten()
        tensor([-0.1000])
    """

    lazy_params = ("scale", "offset")

    def __init__(self, bits=4, granularity="channel", group_size=None, symmetric=True, narrow=False, estimator=None, offset=False, init="lsq"):
        super().__init__(bits, granularity, group_size, symmetric, narrow, estimator)
        if init not in ("lsq", "minmax", "rtn"):
            raise UserError(f"LSQ init={init!r} is not 'lsq', 'minmax' or 'rtn'")
        self.init = init
        if granularity == "token":
            raise UserError("LSQ learns one step per tensor, channel or group; per-token scales are dynamic (use MinMax)")
        self.use_offset = bool(offset)

    def rtn(self) -> MinMax:
        return MinMax.like(self)

    def _init(self, g):
        lo, hi = self.grid.lo, self.grid.hi
        if self.use_offset:
            xmin, xmax = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
            s = ((xmax - xmin) / (hi - lo)).clamp_min(LEARNED_EPS)
            self._param("scale", s)
            beta = (torch.round(xmin / s) - lo) * s if self.init == "rtn" else xmin - lo * s
            self._param("offset", beta)
        elif self.init in ("minmax", "rtn"):
            self._param("scale", (g.abs().amax(-1, keepdim=True) / hi).clamp_min(LEARNED_EPS))
        else:
            s = 2 * g.abs().mean(-1, keepdim=True) / math.sqrt(hi)
            self._param("scale", s.clamp_min(LEARNED_EPS))

    def grad_scale(self, g: torch.Tensor) -> float:
        """``1 / sqrt(N * hi)`` with ``N`` the elements sharing one step (see the module docstring)."""
        return 1.0 / math.sqrt(g.shape[-1] * self.grid.hi)

    def _fake_quant(self, g):
        s = self.scale.clamp_min(LEARNED_EPS)
        beta = self.offset if self.use_offset else None
        return fake_quant(g, s, self.grid.lo, self.grid.hi, self.estimator, beta=beta, grad_scale=self.grad_scale(g))

    def _codes(self, g, x) -> Codes:
        s = self.scale.clamp_min(LEARNED_EPS)
        beta = self.offset if self.use_offset else None
        q = self.estimator.quantize(unrounded_codes(g, s, beta), self.grid.lo, self.grid.hi)
        extra = {"offset": beta.detach().float().expand_as(s).contiguous()} if beta is not None else {}
        return self._make_codes(q, x, s, self.grid.lo, self.grid.hi, **extra)

    def extra_repr(self):
        return super().extra_repr() + f", offset={self.use_offset}"
