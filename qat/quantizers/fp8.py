"""FP8 (E4M3 or E5M2) fake quantization with a float32 scale per tensor, channel or token.

::

    s     = amax / M                       M = 448 (E4M3) or 57344 (E5M2), amax over the tensor,
                                           an output row (weights) or a token (activations)
    x_hat = FP8(x / s) * s                 round to nearest even on the format, saturating at +-M

the scaling of FP8 inference (vLLM's and compressed-tensors' ``float-quantized`` weights with
per-tensor or per-channel scales, dynamic per-token activation scales; Micikevicius et al., "FP8
Formats for Deep Learning", 2022, for the formats). Scales are recomputed from the current tensor
at every forward (weights follow their training, activations are dynamic) and carry no gradient;
an all-zero tensor, row or token gets the scale ``2^-126`` (its values stay 0). The element
rounding takes any estimator of ``qat.estimators``, applied in the format's level units (see
``qat.quantizers.fp_quant``); the default is the clipped STE differentiated after rounding, as
``MinMax``. FP8's rounding itself is torch's cast (``torch.float8_e4m3fn`` / ``float8_e5m2``),
reproduced bitwise by ``qat.fp_formats`` so that estimators can replace it in training.

``codes()`` returns the FP8 bytes (uint8) with their value table and the float32 scales, which
``dequantize()`` turns back into the eval forward bitwise.
"""

from __future__ import annotations

import torch

from qat.errors import UserError
from qat.estimators import ClippedSTE
from qat.fp_formats import E4M3, E5M2, FP32_TINY
from qat.quantizers.base import Codes, Quantizer
from qat.quantizers.fp_quant import fp_fake_quant, fp_round

FP8_FORMATS = {"e4m3": E4M3, "e5m2": E5M2}


class FP8(Quantizer):
    """FP8 fake quantization with dynamic min-max (absmax) scales.

    Args:
        format: ``"e4m3"`` (weights and activations, the usual choice) or ``"e5m2"``.
        granularity: ``"tensor"``, ``"channel"`` (one scale per output row of a weight) or
            ``"token"`` (activations: one scale per token, over the last axis).
        estimator: gradient estimator of the element rounding (default: clipped STE after rounding).

    Raises:
        UserError: an unknown format, or ``granularity="group"``.

    Example:
        >>> q = FP8("e4m3", granularity="tensor")
        >>> q(torch.tensor([448.0, 100.0, 3.3]))  # 100: half-way between 96 and 104 (spacing 8), to the even mantissa
        tensor([448.0000,  96.0000,   3.2500])
    """

    def __init__(self, format: str = "e4m3", granularity: str = "channel", estimator=None):
        if format not in FP8_FORMATS:
            raise UserError(f"FP8 format={format!r} is not one of {tuple(FP8_FORMATS)}")
        if granularity == "group":
            raise UserError("FP8 takes granularity 'tensor', 'channel' or 'token' (block scales: FP4)")
        self.format = format
        super().__init__(bits=8, granularity=granularity, symmetric=False, estimator=estimator)

    @property
    def fmt(self):
        return FP8_FORMATS[self.format]

    def default_estimator(self):
        return ClippedSTE(after_round=True)

    def rtn(self) -> FP8:
        return FP8(self.format, self.granularity)

    def _scale(self, g: torch.Tensor) -> torch.Tensor:
        return (g.detach().float().abs().amax(-1, keepdim=True) / self.fmt.max).clamp_min(FP32_TINY)

    def _init(self, g):
        pass  # dynamic: nothing to learn or store

    def _fake_quant(self, g):
        return fp_fake_quant(g, self._scale(g), self.fmt, self.estimator)

    def _codes(self, g, x) -> Codes:
        s = self._scale(g)
        q = self.fmt.encode(fp_round(g, s, self.fmt, self.estimator))
        return Codes(
            codes=q.reshape(x.shape), scale=s, lo=0, hi=255, bits=8, granularity=self.granularity, group_size=None,
            table=self.fmt.table(q.device), format=f"fp8_{self.format}",
        )

    def extra_repr(self):
        return f"format={self.format!r}, granularity={self.granularity!r}"
