"""What every quantizer shares: the grid, the grouped view, initialisation and the export contract.

A quantizer is an ``nn.Module`` with three methods that the rest of qat relies on:

* ``forward(x)``: the fake-quantized tensor, same shape and dtype as ``x``, gradients by its
  estimator. A quantizer not yet initialised initialises itself from the first tensor it sees
  (weights at ``quantize_`` time, activations on the calibration batch).
* ``init_(x)``: set the parameters from data. Refuses non-finite data.
* ``codes(x)``: the integer codes and what an exporter needs, as a :class:`Codes`, whose
  ``dequantize()`` equals ``forward(x)`` in eval mode bitwise (same expression, same order).

Subclasses implement ``_init(g)``, ``_fake_quant(g)`` and ``_codes(g)`` on the grouped view
``g = group_view(x)`` of shape ``(rows, n_groups, group)`` (see ``qat.grid``).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

from qat.errors import UserError
from qat.estimators import ClippedSTE, Estimator
from qat.grid import Grid, check_granularity, check_shape, group_view
from qat.quantizers.fake_quant import to_export_precision

# Floor for statistics-derived scales (an all-zero group still divides safely): float16's smallest
# subnormal, so the float16-rounded scale the forward uses (fake_quant.to_export_precision) stays > 0.
EPS = 2.0**-24
LEARNED_EPS = 1e-5  # floor for learned scales (ParetoQ's clamp): s <= 0 would diverge


@dataclass
class Codes:
    """Integer codes of one tensor and the parameters that turn them back into values.

    ``value = (codes - zero) * scale + offset``, computed on the grouped view in float32. For
    floating-point formats (``qat.fp_formats``) the codes are the format's bit patterns and
    ``table`` gives their values: ``value = table[codes] * scale``.

    Attributes:
        codes: integer tensor with the shape of the quantized tensor, values in ``[lo, hi]``.
        scale: float32 step sizes, shape ``(rows, n_groups, 1)``, every value exactly representable
            in float16 (training uses the float16-rounded scale; see ``qat.quantizers.fake_quant``).
        zero: zero points (integers, or half-integers for SEQ 2-level shifts), or None.
        offset: float offsets (LSQ+), float16-representable like ``scale``, or None.
        bias: a per-output-row term the layer adds to its output (Tequila's folded dead-zone
            bias), or None.
        lo, hi: the code range; bits: storage bits; granularity, group_size: the grouping.
        table: float32 value of each code (FP formats: 16 E2M1 values, 256 FP8 values), or None
            for integer codes. ``scale`` is then the float32 scale the forward multiplies by (for
            NVFP4 the product of the E4M3 block scale and the tensor scale), not float16-bound.
        format: the FP format's name (``"nvfp4"``, ``"mxfp4"``, ``"fp8_e4m3"``, ...), or None.
        scale_codes: the block scales as stored (uint8: E4M3 bytes for NVFP4, E8M0 biased
            exponents for MXFP4), shape ``(rows, n_groups, 1)``, or None.
        tensor_scale: NVFP4's float32 per-tensor scale (``scale = E4M3(scale_codes) * tensor_scale``), or None.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    lo: int
    hi: int
    bits: float
    granularity: str
    group_size: int | None = None
    zero: torch.Tensor | None = None
    offset: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    table: torch.Tensor | None = None
    format: str | None = None
    scale_codes: torch.Tensor | None = None
    tensor_scale: torch.Tensor | None = None

    def dequantize(self) -> torch.Tensor:
        """The quantized values, float32, bitwise equal to the quantizer's eval forward."""
        g = group_view(self.codes, self.granularity, self.group_size)
        g = g.float() if self.table is None else self.table.to(g.device)[g.long()]
        if self.zero is not None:
            g = g - self.zero
        out = g * self.scale
        if self.offset is not None:
            out = out + self.offset
        return out.reshape(self.codes.shape)


def int_dtype(lo: int, hi: int) -> torch.dtype:
    """The smallest signed integer dtype that holds ``[lo, hi]``."""
    return torch.int8 if -128 <= lo and hi <= 127 else torch.int16


def _takes_no_arguments(f) -> bool:
    """Whether ``f`` can be called with no argument (checked on its signature, so a TypeError inside it is not mistaken for one)."""
    if not callable(f):
        return False
    try:
        inspect.signature(f).bind()
    except (TypeError, ValueError):  # it needs arguments, or a partial's arguments do not fit, or no signature to read
        return False
    return True


def check_finite(x: torch.Tensor, what: str = "calibration tensor") -> None:
    """Raise UserError when ``x`` holds NaN or inf (a bad batch must never set a scale)."""
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).sum().item()
        raise UserError(
            f"{what} holds {bad} non-finite value(s) (NaN or inf): quantizer parameters cannot be "
            "initialised from it; check the model's dtype (fp16 overflow) and the data"
        )


class Quantizer(nn.Module):
    """Base class. See the module docstring for the contract.

    Args:
        bits: bit width, 2..8.
        granularity: ``"tensor"``, ``"channel"``, ``"group"`` or ``"token"``.
        group_size: elements per group along ``in_features`` when ``granularity="group"``.
        symmetric: signed grid centred on zero (True) or unsigned ``[0, 2^b - 1]`` (False).
        narrow: signed grid without its most negative code.
        estimator: gradient estimator for rounding, or a zero-argument factory of one (default:
            clipped STE). A factory gives every layer its own estimator (DSQ learns per layer).

    Raises:
        UserError: unsupported bits, unknown granularity, group granularity without group size.
    """

    def __init__(
        self,
        bits: int = 4,
        granularity: str = "channel",
        group_size: int | None = None,
        symmetric: bool = True,
        narrow: bool = False,
        estimator: Estimator | None = None,
    ):
        super().__init__()
        self.grid = Grid(bits, signed=symmetric, narrow=narrow)
        check_granularity(granularity, group_size)
        self.granularity = granularity
        self.group_size = group_size if granularity == "group" else None
        if estimator is None:
            estimator = self.default_estimator()
        elif not isinstance(estimator, Estimator) and _takes_no_arguments(estimator):
            estimator = estimator()  # a factory (Hydra `_partial_: true`): one estimator per quantizer
        if not isinstance(estimator, Estimator):
            raise UserError(f"estimator must be a qat.estimators.Estimator or a zero-argument factory of one, got {estimator!r}")
        self.estimator = estimator
        self.register_buffer("initialized", torch.tensor(False))
        self._ready = False
        self.enabled = True  # False passes tensors through (a delay before fake quantization starts)
        self.register_load_state_dict_post_hook(_sync_ready)

    # Parameters and buffers whose shape depends on the tensor the quantizer first sees; a
    # checkpoint can be loaded into a fresh quantizer because they are created from its shapes.
    lazy_params: tuple[str, ...] = ()
    lazy_buffers: tuple[str, ...] = ()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in self.lazy_params + self.lazy_buffers:
            key = prefix + name
            if key in state_dict and getattr(self, name, None) is None:
                value = torch.empty_like(state_dict[key])
                if name in self.lazy_params:
                    setattr(self, name, nn.Parameter(value))
                else:
                    self.register_buffer(name, value)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def default_estimator(self) -> Estimator:
        return ClippedSTE()

    @property
    def bits(self) -> float:
        return self.grid.bits

    # -- public contract -------------------------------------------------------------------
    def check(self, shape: torch.Size | tuple, name: str = "tensor") -> None:
        """Raise UserError if a weight of ``shape`` cannot be quantized with these settings."""
        check_shape(shape, self.granularity, self.group_size, name)

    @torch.no_grad()
    def init_(self, x: torch.Tensor) -> Quantizer:
        """Initialise the parameters from ``x`` (a weight, or a calibration activation)."""
        if not torch.is_floating_point(x):
            raise UserError(f"cannot quantize a {x.dtype} tensor: quantizers take floating-point tensors")
        if self.granularity in ("channel", "group"):
            self.check(x.shape, f"{type(self).__name__} input")
        check_finite(x)
        self._init(self._view(x.detach()).float())
        self.initialized.fill_(True)
        self._ready = True
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if not self._ready:
            self.init_(x)
        return self._fake_quant(self._view(x)).reshape(x.shape)

    @torch.no_grad()
    def codes(self, x: torch.Tensor) -> Codes:
        """Integer codes of ``x`` and the parameters that dequantize them (eval rounding)."""
        if not self._ready:
            raise RuntimeError(f"{type(self).__name__} is not initialised: call init_(x) or run a forward first")
        training = self.training
        self.eval()
        try:
            return self._codes(self._view(x), x)
        finally:
            self.train(training)

    def rtn(self) -> Quantizer:
        """A fresh round-to-nearest quantizer on the same grid and grouping: this one's PTQ baseline.

        Integer quantizers return ``MinMax.like(self)``; ternary grids their own statistic.
        """
        raise NotImplementedError(f"{type(self).__name__} defines no round-to-nearest baseline (rtn)")

    def bias(self, w: torch.Tensor, w_hat: torch.Tensor) -> torch.Tensor | None:
        """An extra per-output-row bias the layer adds (Tequila); None for plain quantizers."""
        return None

    # -- for subclasses ---------------------------------------------------------------------
    def _view(self, x: torch.Tensor) -> torch.Tensor:
        return group_view(x, self.granularity, self.group_size)

    def _param(self, name: str, value: torch.Tensor) -> None:
        """Create parameter ``name`` from ``value``, or copy into it in place (keeps optimizer refs)."""
        value = value.detach().float()
        p = getattr(self, name, None)
        if isinstance(p, nn.Parameter) and p.shape == value.shape:
            p.data.copy_(value)
        else:
            setattr(self, name, nn.Parameter(value.clone()))

    def _buffer(self, name: str, value: torch.Tensor) -> None:
        value = value.detach()
        b = getattr(self, name, None)
        if isinstance(b, torch.Tensor) and b.shape == value.shape and b.dtype == value.dtype:
            b.copy_(value)
        else:
            self.register_buffer(name, value.clone())

    def _make_codes(self, q: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, lo: int, hi: int, **extra) -> Codes:
        if extra.get("offset") is not None:
            extra["offset"] = to_export_precision(extra["offset"].detach().float())
        scale = to_export_precision(scale.detach().float())
        return Codes(
            codes=q.reshape(x.shape).to(int_dtype(lo, hi)),
            scale=scale.expand(q.shape[0], q.shape[1], 1).contiguous(),
            lo=lo,
            hi=hi,
            bits=self.bits,
            granularity=self.granularity,
            group_size=self.group_size,
            **extra,
        )

    def _init(self, g: torch.Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _fake_quant(self, g: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _codes(self, g: torch.Tensor, x: torch.Tensor) -> Codes:  # pragma: no cover - abstract
        raise NotImplementedError

    def extra_repr(self) -> str:
        g = self.grid
        s = f"bits={g.bits}, grid=[{g.lo}, {g.hi}], granularity={self.granularity!r}"
        return s + (f", group_size={self.group_size}" if self.group_size else "")


def _sync_ready(module: Quantizer, incompatible_keys) -> None:
    module._ready = bool(module.initialized)
