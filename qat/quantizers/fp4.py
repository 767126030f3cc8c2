"""FP4 (E2M1) with quantized block scales: NVFP4 and MXFP4; min-max, LSQ and Dual-LSQ block scales.

Formats (their math, specifications and corner cases are in ``qat.fp_formats``):

* ``"nvfp4"``: blocks of 16 along the last axis, an E4M3 scale per block, an FP32 tensor scale
  ``s_t = 2^ceil(log2(amax / (6 * 448)))`` (NVIDIA's ``amax / 2688`` rounded up to a power of two,
  so that compressed-tensors' ``E2M1 * (E4M3 / global_scale)`` decompresses it exactly: see
  ``qat.fp_formats``); the block's scale is ``S = E4M3(s_block / s_t) * s_t``.
* ``"mxfp4"`` (OCP MX v1.0): blocks of 32, an E8M0 (power-of-two) scale per block, no tensor scale.

Forward, per block (``qat.quantizers.fp_quant``)::

    x_hat = E2M1(x / S_pre) * S_post

Block scales, ``scale=``:

* ``"minmax"``: the formats' own recipes, recomputed at every forward from the current tensor (as
  torchao's and ModelOpt's fake quantization): NVFP4 ``S = E4M3(amax_block / 6 / s_t) * s_t`` with
  ``s_t`` from the tensor's amax; MXFP4 ``S = 2^(floor(log2 amax_block) - 2)``. No parameters;
  ``S_pre = S_post = S``. Also the PTQ baseline (``rtn()``) of the learned modes.
* ``"lsq"``: LSQ (Esser et al., ICLR 2020) on the block scale. The float32 Parameter ``scale`` (one per
  block, in absolute units, initialised to the min-max scale) is rounded to its own format with a
  straight-through gradient, as the integer quantizers use the float16-rounded step: NVFP4
  ``S = E4M3(scale / s_t) * s_t`` (``s_t`` a buffer fixed at ``init_``), MXFP4
  ``S = E8M0(scale)``. ``S_pre = S_post = S``; its gradient is LSQ's in the format's units,
  ``Q(v) - v`` inside and ``+-6`` for saturated values (``v = x / S``), scaled by
  ``g = 1 / sqrt(n * Q_p)`` with ``n`` the block size and ``Q_p = 6`` (E2M1's largest value, the
  ``q_hi`` of LSQ): ``1 / sqrt(96)`` for NVFP4, ``1 / sqrt(192)`` for MXFP4. For NVFP4 the scale
  saturates at ``448 * s_t`` and is floored at ``2^-9 * s_t``; for MXFP4 at ``2^+-127``.
* ``"dual_lsq"``: ModelOpt's Dual-LSQ (NVIDIA Model-Optimizer PR 1884, ``LSQConfig``:
  ``w_q = Q_STE(w / s_pre) * s_post``, both learned): a pre-quantization scale ``scale`` (float32,
  used only to pick the codes, so it is not rounded) and a post-quantization scale ``scale_post``
  (rounded to the block format as in ``"lsq"``: the one stored). Both start at the min-max scale
  and share the gradient scale ``g``. Decision: the issue asked for a learned per-tensor scale
  here; ModelOpt's reference learns the pre/post pair per block with the tensor scale fixed, and
  we follow the reference.

Learned scales belong to one weight's blocks: activations take ``"minmax"`` (dynamic per block and,
for NVFP4, per tensor), as NVFP4's and MX's activation recipes do.

The element rounding takes any estimator of ``qat.estimators`` (what each one means on the
non-uniform E2M1 grid: ``qat.quantizers.fp_quant``); the default is the clipped STE, differentiated
after rounding for min-max scales (``ClippedSTE(after_round=True)``, as ``MinMax``: a block's
largest value can land just above 6 when its E4M3 scale rounds down) and LSQ's plain clipped STE
for learned ones.

``codes()`` returns the E2M1 codes (uint8, 0..15, sign-magnitude), the scale codes (NVFP4: E4M3
bytes, MXFP4: E8M0 biased exponents) and NVFP4's tensor scale; ``Codes.scale`` is ``S_post`` as the
forward multiplies by it, so ``dequantize()`` equals the eval forward bitwise.
"""

from __future__ import annotations

import math

import torch

from qat.errors import UserError
from qat.estimators import ClippedSTE
from qat.fp_formats import (
    E2M1,
    E4M3_MIN,
    MXFP4_BLOCK,
    NVFP4_BLOCK,
    e4m3_scale,
    e8m0_encode,
    e8m0_scale,
    mx_exponent,
    nvfp4_block_scale,
    nvfp4_tensor_scale,
)
from qat.quantizers.base import Codes, Quantizer
from qat.quantizers.fake_quant import scale_grad
from qat.quantizers.fp_quant import fp_fake_quant, fp_round

BLOCKS = {"nvfp4": NVFP4_BLOCK, "mxfp4": MXFP4_BLOCK}
SCALES = ("minmax", "lsq", "dual_lsq")


class _RoundScale(torch.autograd.Function):
    """A block scale rounded to its format (E4M3 under a tensor scale, or E8M0); gradient the identity."""

    @staticmethod
    def forward(ctx, s, fmt, s_t):
        return _round_scale(s, fmt, s_t)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


def _round_scale(s: torch.Tensor, fmt: str, s_t: torch.Tensor | None) -> torch.Tensor:
    if fmt == "nvfp4":
        return e4m3_scale(s / s_t) * s_t
    return e8m0_scale(s)


class FP4(Quantizer):
    """E2M1 fake quantization with NVFP4 or MXFP4 block scales, fixed (min-max) or learned (LSQ, Dual-LSQ).

    Args:
        format: ``"nvfp4"`` (blocks of 16, E4M3 scales, FP32 tensor scale) or ``"mxfp4"`` (blocks
            of 32, E8M0 scales).
        scale: ``"minmax"``, ``"lsq"`` or ``"dual_lsq"`` (module docstring).
        estimator: gradient estimator of the element rounding (default: clipped STE).

    Raises:
        UserError: an unknown format or scale mode; a last axis the block size does not divide;
            learned scales on a tensor of another shape than the one they were initialised on.

    Example (one NVFP4 block with scale 0.5: 0.3 -> 0.6 -> 0.5, 1.3 -> 2.6 -> 3, 4 -> 8 -> 6):
        >>> q = FP4("nvfp4", scale="lsq")
        >>> _ = q.init_(torch.ones(1, 16)); _ = q.tensor_scale.fill_(2.0**-8); _ = q.scale.data.fill_(0.5)
        >>> q(torch.tensor([[0.3, 1.3, 4.0] + [0.0] * 13]))[0, :3].tolist()
        [0.25, 1.5, 3.0]
    """

    lazy_params = ("scale", "scale_post")
    lazy_buffers = ("tensor_scale",)

    def __init__(self, format: str = "nvfp4", scale: str = "minmax", estimator=None):
        if format not in BLOCKS:
            raise UserError(f"FP4 format={format!r} is not one of {tuple(BLOCKS)}")
        if scale not in SCALES:
            raise UserError(f"FP4 scale={scale!r} is not one of {SCALES}")
        self.format, self.scale_mode = format, scale  # before super(): default_estimator reads scale_mode
        super().__init__(bits=4, granularity="group", group_size=BLOCKS[format], symmetric=False, estimator=estimator)

    @property
    def block_size(self) -> int:
        return self.group_size

    def default_estimator(self):
        return ClippedSTE(after_round=self.scale_mode == "minmax")

    def rtn(self) -> FP4:
        return FP4(self.format, scale="minmax")

    def check(self, shape, name="tensor"):
        if len(shape) == 0 or shape[-1] % self.block_size:
            raise UserError(
                f"{name}: {self.format} quantizes blocks of {self.block_size} along the last axis, which must be a "
                f"multiple of {self.block_size}; got shape {tuple(shape)} (exclude this layer)"
            )

    def _view(self, x):
        return x.reshape(-1, x.shape[-1] // self.block_size, self.block_size)

    def grad_scale(self, g: torch.Tensor) -> float:
        """LSQ's ``1 / sqrt(n * Q_p)``: ``n`` the block size, ``Q_p = 6``."""
        return 1.0 / math.sqrt(g.shape[-1] * E2M1.max)

    # -- scales -----------------------------------------------------------------------------
    def _minmax(self, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """``(S, s_t, stored)``: the min-max block scale, the tensor scale (NVFP4), the stored block scale."""
        g = g.detach().float()
        amax = g.abs().amax(-1, keepdim=True)
        if self.format == "nvfp4":
            s_t = nvfp4_tensor_scale(amax.amax()).reshape(1, 1, 1)
            s_block = nvfp4_block_scale(amax, s_t)
            return s_block * s_t, s_t, s_block
        s = torch.ldexp(torch.ones_like(amax), mx_exponent(amax).int())
        return s, None, s

    def _init(self, g):
        if self.scale_mode == "minmax":
            return
        s, s_t, _ = self._minmax(g)
        if s_t is not None:
            self._buffer("tensor_scale", s_t)
        self._param("scale", s)
        if self.scale_mode == "dual_lsq":
            self._param("scale_post", s)

    def _floor(self) -> float | torch.Tensor:
        return E4M3_MIN * self.tensor_scale if self.format == "nvfp4" else 2.0**-127

    def _scales(self, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(S_pre, S_post)`` for the forward (``S_post`` None when it is ``S_pre``)."""
        if self.scale_mode == "minmax":
            return self._minmax(g)[0], None
        if self.scale.shape[:2] != g.shape[:2]:
            raise UserError(
                f"FP4(scale={self.scale_mode!r}) learned {tuple(self.scale.shape[:2])} block scales but got a tensor with "
                f"{tuple(g.shape[:2])} blocks: learned scales belong to one weight; use scale='minmax' for activations"
            )
        gs = self.grad_scale(g)
        s_t = getattr(self, "tensor_scale", None)
        rounded = _RoundScale.apply if torch.is_grad_enabled() else _round_scale
        if self.scale_mode == "lsq":
            return scale_grad(rounded(self.scale, self.format, s_t), gs), None
        pre = scale_grad(self.scale.clamp_min(self._floor()), gs)
        return pre, scale_grad(rounded(self.scale_post, self.format, s_t), gs)

    # -- the contract -----------------------------------------------------------------------
    def _fake_quant(self, g):
        s, s_out = self._scales(g)
        return fp_fake_quant(g, s, E2M1, self.estimator, s_out)

    def _codes(self, g, x) -> Codes:
        s, s_out = self._scales(g)
        s_out = s if s_out is None else s_out
        q = E2M1.encode(fp_round(g, s, E2M1, self.estimator))
        rows, n_groups = g.shape[:2]
        s_out = s_out.detach().float().expand(rows, n_groups, 1).contiguous()
        if self.format == "nvfp4":
            if self.scale_mode == "minmax":
                _, s_t, stored = self._minmax(g)
            else:
                s_t = self.tensor_scale.detach().float()
                stored = e4m3_scale(getattr(self, "scale_post" if self.scale_mode == "dual_lsq" else "scale").detach() / s_t)
            scale_codes = stored.expand(rows, n_groups, 1).to(torch.float8_e4m3fn).view(torch.uint8)
        else:
            s_t, scale_codes = None, e8m0_encode(s_out)
        return Codes(
            codes=q.reshape(x.shape), scale=s_out, lo=0, hi=15, bits=4, granularity="group", group_size=self.block_size,
            table=E2M1.table(q.device), format=self.format, scale_codes=scale_codes, tensor_scale=s_t,
        )

    def extra_repr(self):
        return f"format={self.format!r}, scale={self.scale_mode!r}, block_size={self.block_size}"

