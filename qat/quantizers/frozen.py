"""``Frozen``: exported codes held as a quantizer, so an export can be exported again.

A packed export stores codes and float16 scales, not the latent weights and learned parameters
that produced them. ``Frozen(codes)`` is the quantizer whose output is those codes, dequantized::

    forward(x) = codes.dequantize()     (whatever x is: the layer's weight is the dequantized codes)
    codes(x)   = codes                  (bitwise the codes that were exported)
    bias(...)  = codes.bias             (Tequila's folded bias, if any)

``qat.export.packed.requantize_`` rebuilds ``QuantLinear`` layers with it from a packed model, so
every exporter (hf, gguf, compressed-tensors) writes exactly the codes the packed file holds. It
has nothing to learn; training a model made of ``Frozen`` quantizers changes nothing.
"""

from __future__ import annotations

import math

import torch

from qat.errors import UserError
from qat.grid import group_view
from qat.quantizers.base import Codes, Quantizer


class Frozen(Quantizer):
    """A quantizer that returns fixed, already exported codes.

    Args:
        codes: the ``Codes`` of one weight (e.g. ``PackedLinear.codes()``).

    Raises:
        UserError: codes whose range is none of qat's grids.

    Example:
        >>> from qat.quantizers import MinMax
        >>> w = torch.randn(4, 8)
        >>> q = Frozen(MinMax(bits=4).init_(w).codes(w))
        >>> torch.equal(q(w), MinMax(bits=4)(w))
        True
    """

    def __init__(self, codes: Codes):
        bits = max(2, math.ceil(math.log2(codes.hi - codes.lo + 1)))
        signed = codes.lo < 0
        super().__init__(bits, codes.granularity, codes.group_size, symmetric=signed, narrow=signed and codes.lo == -codes.hi)
        if (self.grid.lo, self.grid.hi) != (codes.lo, codes.hi):
            raise UserError(f"codes in [{codes.lo}, {codes.hi}] lie on no qat grid (signed, narrow, unsigned or ternary); "
                            "freeze codes that a qat quantizer made (Quantizer.codes)")
        self.frozen_codes = codes
        self.initialized.fill_(True)
        self._ready = True

    @property
    def bits(self) -> float:
        return self.frozen_codes.bits

    def _init(self, g):
        pass  # nothing to set from data: the codes are fixed

    def _fake_quant(self, g: torch.Tensor) -> torch.Tensor:
        if g.numel() != self.frozen_codes.codes.numel():
            raise ValueError(f"Frozen codes of shape {tuple(self.frozen_codes.codes.shape)} cannot stand for a tensor of {g.numel()} elements")
        w = self.frozen_codes.dequantize().to(g.dtype)
        return group_view(w, self.granularity, self.group_size)

    def _codes(self, g, x) -> Codes:
        return self.frozen_codes

    def bias(self, w: torch.Tensor, w_hat: torch.Tensor) -> torch.Tensor | None:
        return self.frozen_codes.bias

    def rtn(self) -> Quantizer:
        return self

