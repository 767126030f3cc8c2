"""``Frozen``: fixed integer codes held as a quantizer; their scales fixed or trainable.

The one place qat holds a tensor's integer codes apart from the weight that produced them. The
codes ``q`` and the ``Codes`` fields are buffers (the step sizes, and optionally the zero points
and offsets, Parameters)::

    forward(x) = (q - z) * s + beta      = Codes.dequantize(), whatever x is (its shape is checked)
    codes(x)   = Codes(q, s, z, beta, bias)   bitwise what was frozen (with the current s, z, beta)
    bias(...)  = the frozen per-row bias (Tequila's folded dead-zone bias), if any

Two uses, one class:

* **re-export** (``train_scale=False``, the default): ``qat.export.packed.requantize_`` rebuilds a
  packed model's layers with ``Frozen(packed_layer.codes())``, so every exporter (hf, gguf,
  compressed-tensors) writes exactly the codes the packed file holds. Nothing trains.
* **scale-only tuning** (``train_scale=True``; PEQA, Kim et al., arXiv 2305.14152, and the E2E-QP
  stage of EfficientQAT, Chen et al., arXiv 2407.11062): ``s`` (and with ``train_zero`` ``z`` or
  ``beta``) are Parameters, ``q`` stays fixed; ``qat.adapters.scale_only`` owns the layer and its
  exact gradients. Scales and offsets are used at float16 precision, straight-through
  (``qat.quantizers.fake_quant.to_export_precision``), as every quantizer uses them, so the
  forward and the export see the same values.

The packed export stores the same fields bit-packed (``qat.export.packed``); its layers'
``codes()`` return a ``Codes``, which ``Frozen`` takes as it is.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from qat.errors import UserError
from qat.quantizers.base import Codes, Quantizer, int_dtype
from qat.quantizers.fake_quant import to_export_precision

_FIELDS = ("q", "scale", "zero", "offset", "extra_bias")


class Frozen(Quantizer):
    """A quantizer whose integer codes are fixed: ``forward`` returns ``(q - z) * s + beta`` whatever it is given.

    ``Frozen(codes)`` holds given codes (any quantizer's ``codes(w)``, or a packed layer's);
    ``Frozen(bits=..., ...)`` is empty until ``init_(w)`` freezes the round-to-nearest codes of
    ``w`` on its grid, ``set_codes_(codes)`` freezes given ones, or a state dict is loaded.

    Args:
        codes: the ``Codes`` to hold; its grid and grouping replace the grid arguments.
        bits, granularity, group_size, symmetric, narrow: the grid of an empty ``Frozen``.
        train_scale: the step sizes are Parameters (scale-only tuning); else buffers.
        train_zero: the zero points / offsets are Parameters too (they become floats).

    Raises:
        UserError: codes whose range is none of qat's grids; trainable scales with a per-row bias
            (Tequila's depends on the latent weight); codes grouped unlike this quantizer.
        ValueError: a tensor of another shape than the codes.

    Example:
        >>> from qat.quantizers import MinMax
        >>> w = torch.randn(4, 8)
        >>> torch.equal(Frozen(MinMax(bits=4).init_(w).codes(w))(w), MinMax(bits=4)(w))
        True
        >>> q = Frozen(bits=4, granularity="group", group_size=32, train_scale=True).init_(torch.randn(8, 64))
        >>> q.scale.requires_grad, q.q.dtype
        (True, torch.int8)
    """

    def __init__(self, codes: Codes | None = None, *, bits=4, granularity="channel", group_size=None, symmetric=True,
                 narrow=False, train_scale: bool = False, train_zero: bool = False):
        if codes is not None:
            bits = max(2, math.ceil(math.log2(codes.hi - codes.lo + 1)))
            symmetric = codes.lo < 0
            narrow = symmetric and codes.lo == -codes.hi
            granularity, group_size = codes.granularity, codes.group_size
        super().__init__(bits, granularity, group_size, symmetric, narrow)
        if codes is not None and (self.grid.lo, self.grid.hi) != (codes.lo, codes.hi):
            raise UserError(f"codes in [{codes.lo}, {codes.hi}] lie on no qat grid (signed, narrow, unsigned or ternary); "
                            "freeze codes that a qat quantizer made (Quantizer.codes)")
        self.train_scale = bool(train_scale)
        self.train_zero = bool(train_zero)
        for name in _FIELDS:
            self.register_buffer(name, None)
        self.lo, self.hi, self._code_bits = self.grid.lo, self.grid.hi, None
        if codes is not None:
            self.set_codes_(codes)

    @classmethod
    def like(cls, quantizer: Quantizer, train_scale: bool = False, train_zero: bool = False) -> Frozen:
        """An empty ``Frozen`` on ``quantizer``'s grid and grouping."""
        new = cls(granularity=quantizer.granularity, group_size=quantizer.group_size, train_scale=train_scale, train_zero=train_zero)
        new.grid = quantizer.grid
        new.lo, new.hi = new.grid.lo, new.grid.hi
        return new

    @property
    def bits(self) -> float:
        return self.grid.bits if self._code_bits is None else self._code_bits

    def set_codes_(self, codes: Codes) -> Frozen:
        """Freeze ``codes``; scale, zero and offset become buffers (or Parameters, as trained)."""
        if codes.table is not None:  # FP4/FP8 codes index a value table: (q - z) * s would misread them
            raise UserError(f"{codes.format} codes cannot be frozen yet (Frozen holds integer codes): "
                            "scale-only tuning and re-export of FP formats are not supported")
        if codes.bias is not None and (self.train_scale or self.train_zero):
            raise UserError("codes with a per-row bias (Tequila) cannot be tuned scale-only: the bias depends on the latent weight; "
                            "use adapter=lora or adapter=l4q, or a quantizer without the folded bias")
        if (codes.granularity, codes.group_size) != (self.granularity, self.group_size):
            raise UserError(f"codes grouped as {codes.granularity}/{codes.group_size}, this quantizer as {self.granularity}/{self.group_size}: "
                            "build the Frozen with the granularity and group_size of the quantizer that made the codes")
        self._buffer("q", codes.codes.to(int_dtype(codes.lo, codes.hi)))
        self._hold("scale", codes.scale, self.train_scale)
        for name in ("zero", "offset"):
            self._hold(name, getattr(codes, name), self.train_zero)
        self._hold("extra_bias", codes.bias, False)
        self.lo, self.hi, self._code_bits = codes.lo, codes.hi, codes.bits
        self.initialized.fill_(True)
        self._ready = True
        return self

    def _hold(self, name: str, value: torch.Tensor | None, trainable: bool) -> None:
        if value is None:
            setattr(self, name, None)
        elif trainable:
            self._param(name, value)
        else:
            self._buffer(name, value.float())

    def rtn(self) -> Quantizer:
        """Itself: rounding fixed codes to the nearest code gives them again."""
        return self

    @torch.no_grad()
    def init_(self, x: torch.Tensor) -> Frozen:
        """Freeze the round-to-nearest codes of ``x`` on this grid (``MinMax``); codes already held stay."""
        if self._ready:
            return self
        from qat.quantizers.minmax import MinMax

        rtn = MinMax.like(self).init_(x)
        return self.set_codes_(rtn.codes(x))

    def as_codes(self) -> Codes:
        """The frozen codes with the current parameters (differentiable in ``scale``, ``zero``, ``offset``)."""
        return Codes(codes=self.q, scale=to_export_precision(self.scale), lo=self.lo, hi=self.hi, bits=self.bits,
                     granularity=self.granularity, group_size=self.group_size, zero=self.zero,
                     offset=to_export_precision(self.offset), bias=self.extra_bias)

    def dequantize(self) -> torch.Tensor:
        """``(q - z) * s + beta`` as float32, the export's ``Codes.dequantize()``."""
        return self.as_codes().dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The codes are the weight: ``enabled`` (a fake-quant delay) has nothing to switch off.
        if not self._ready:
            self.init_(x)
        if x.shape != self.q.shape:
            raise ValueError(f"Frozen holds codes of shape {tuple(self.q.shape)}, got a tensor of shape {tuple(x.shape)}")
        return self.dequantize().to(x.dtype)

    @torch.no_grad()
    def codes(self, x: torch.Tensor | None = None) -> Codes:
        if not self._ready:
            raise RuntimeError("Frozen holds no codes yet: call init_(w) or set_codes_(codes)")
        c = self.as_codes()
        for name in ("scale", "zero", "offset"):
            v = getattr(c, name)
            if v is not None:
                setattr(c, name, v.detach().float().expand(c.scale.shape).contiguous())
        return c

    def bias(self, w: torch.Tensor, w_hat: torch.Tensor) -> torch.Tensor | None:
        return self.extra_bias

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A fresh instance has no tensors yet: create them from the checkpoint's shapes, as
        # Parameters where they train, buffers elsewhere.
        for name in _FIELDS:
            key = prefix + name
            if key in state_dict and getattr(self, name, None) is None:
                value = torch.empty_like(state_dict[key])
                if (name == "scale" and self.train_scale) or (name in ("zero", "offset") and self.train_zero):
                    setattr(self, name, nn.Parameter(value))
                else:
                    self.register_buffer(name, value)
        if prefix + "q" in state_dict:
            self._ready = True
        nn.Module._load_from_state_dict(self, state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", frozen codes, train_scale={self.train_scale}, train_zero={self.train_zero}"
