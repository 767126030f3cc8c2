"""Floating-point element formats (E2M1, E4M3, E5M2) and the quantized block scales of NVFP4 and MXFP4.

These are the floating-point counterparts of ``qat.grid``'s integer grids.

**Element formats.** A format ``EeMm`` with exponent bias ``b`` holds ``+-2^(E-b) * (1 + M/2^m)``
(normals, biased exponent ``E >= 1``) and ``+-2^(1-b) * M/2^m`` (subnormals, ``E = 0``):

=======  ====  =====  ===========  =====================================================
format   bias  max    smallest     values / torch dtype
=======  ====  =====  ===========  =====================================================
E2M1     1     6      0.5          0, 0.5, 1, 1.5, 2, 3, 4, 6 (and negatives); no inf/NaN
E4M3     7     448    2^-9         ``torch.float8_e4m3fn`` (no inf; S.1111.111 is NaN)
E5M2     15    57344  2^-16        ``torch.float8_e5m2`` (IEEE-like, with inf and NaN)
=======  ====  =====  ===========  =====================================================

Rounding is round-to-nearest, ties to even (the mantissa's last bit 0), with saturation to ``+-max``
(OCP MX v1.0 section 6.3 allows saturation; it is what NVFP4 and MX hardware conversions do for
E2M1, and the ``satfinite`` conversions for FP8). It is computed in a *normalised domain*: inside one
binade the levels are uniform, with spacing ::

    step(v) = 2^(max(floor(log2 |v|), 1 - bias) - m)          (|v| clamped to max first)

so ``v / step(v)`` is an integer exactly on the levels, and ``round(v / step(v)) * step(v)`` with
``torch.round`` (ties to even) is the format's RNE: inside a binade an even integer is an even
mantissa, and the binade edges are levels themselves. E2M1 ties: 0.25 -> 0, 0.75 -> 1, 1.25 -> 1,
1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4. For E4M3 and E5M2 this equals torch's own casts bitwise
(tested); the casts encode the codes, and the normalised domain is what lets any estimator of
``qat.estimators`` stand in for ``round`` (``qat.quantizers.fp_quant``).

E2M1 codes are 4 bits, sign-magnitude as in both specifications: bit 3 the sign, bits 2..0 the
magnitude's index in (0, 0.5, 1, 1.5, 2, 3, 4, 6), which is also its E2M1 bit pattern
(``0b111`` = 2^(3-1) * 1.5 = 6). FP8 codes are the dtype's bytes.

**Block scales** (a block: consecutive elements along the last axis, the GEMM's K axis).

* NVFP4 (NVIDIA, "Introducing NVFP4", 2025; the layout vLLM and ModelOpt use): blocks of 16, an E4M3
  scale per block and an FP32 scale per tensor::

      s_tensor = 2^ceil(log2(amax(tensor) / (6 * 448)))                a power of two
      s_block  = E4M3(amax(block) / 6 / s_tensor)                      stored as an E4M3 byte
      x_hat    = E2M1(x / (s_block * s_tensor)) * (s_block * s_tensor)

  The tensor scale is NVIDIA's ``amax / (6 * 448)`` rounded *up* to a power of two. Why: the
  formats that store NVFP4 keep its inverse, and compute in other dtypes than we do.
  compressed-tensors (what vLLM loads) stores ``global_scale = 1 / s_tensor`` and decompresses
  ``E2M1 * (E4M3 / global_scale)`` in float32 and then casts to bfloat16; with a power of two both
  the inverse and the division are exact, and ``E2M1 * E4M3 * 2^k`` has at most 2 + 4 significant
  bits, so it is the same number in float32 and bfloat16: the decompressed weight equals our
  forward bitwise (``qat.export.compressed``). With NVIDIA's exact ``amax / 2688`` neither holds
  (the product has 24 significant bits that bfloat16 rounds away). The cost: the largest block
  scale lands in (224, 448] instead of at 448, so a block loses at most one binade of E4M3's
  range at the bottom (blocks 2^-6 * 224 ~ 1/300 of the tensor's maximum and smaller use E4M3's
  subnormals one binade earlier); the elements' precision is the same.

  With min/max statistics ``amax(block) <= amax(tensor)``, so ``s_block <= 448``: no overflow; a
  learned or static scale above 448 saturates to 448 and its block's values then saturate to
  +-6. Rounding ``s_block`` down can leave the block's largest value slightly above 6 after
  scaling: it saturates to 6. Underflow: a scale below E4M3's smallest value 2^-9 (a block
  2^-9 * 448 ~ 1/1150 of the tensor's maximum or smaller, an all-zero block) is clamped to 2^-9
  instead of rounding to 0, so no block divides by zero; an all-zero block has scale byte 0x01 and
  codes 0. An all-zero tensor has ``s_tensor`` floored at float32's smallest normal (2^-126).
* MXFP4 (OCP Microscaling Formats v1.0, 2023, section 6.3): blocks of 32, one E8M0 scale per block
  (a power of two ``2^e``, biased exponent ``e + 127`` in a byte, 0xFF = NaN), no tensor scale::

      e     = clamp(floor(log2 amax(block)) - emax_elem, -127, 127)       emax_elem = 2 for E2M1
      x_hat = E2M1(x / 2^e) * 2^e

  ``amax / 2^e`` lies in [4, 8), so values above 6 saturate to +-6 (as the spec prescribes). An
  all-zero block (log2 0 = -inf) gets ``e = -127``; a block below 2^-125 is clamped to -127 (its
  values round toward 0); float32 cannot reach the upper clamp (floor(log2 max) = 127, e = 125).
  A learned E8M0 scale is rounded to the nearest power of two in the linear domain, ties up
  (torch's ``float8_e8m0fnu`` cast), and clamped to [2^-127, 2^127].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NVFP4_BLOCK = 16
MXFP4_BLOCK = 32
E8M0_MIN_EXP, E8M0_MAX_EXP, E8M0_BIAS = -127, 127, 127
FP32_TINY = 2.0**-126  # floor of the NVFP4 tensor scale (an all-zero tensor)


@dataclass(frozen=True)
class FPFormat:
    """A small floating-point format ``EeMm``: rounding to its values, and its codes.

    Args:
        name: ``"e2m1"``, ``"e4m3"`` or ``"e5m2"``.
        ebits, mbits: exponent and mantissa bits (plus one sign bit).
        bias: exponent bias.
        max: largest finite magnitude (saturation bound).
        dtype_name: the torch dtype whose cast rounds the same way, or None (E2M1).

    Example:
        >>> E2M1.round(torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0]))
        tensor([0., 1., 1., 2., 2., 4., 4., 6.])
    """

    name: str
    ebits: int
    mbits: int
    bias: int
    max: float
    dtype_name: str | None = None

    @property
    def bits(self) -> int:
        return 1 + self.ebits + self.mbits

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal binade (subnormals share its spacing)."""
        return 1 - self.bias

    @property
    def dtype(self) -> torch.dtype | None:
        return getattr(torch, self.dtype_name) if self.dtype_name else None

    def step(self, v: torch.Tensor) -> torch.Tensor:
        """Spacing of the levels around ``v`` (a power of two; no gradient), ``|v|`` clamped to ``max``."""
        a = v.detach().abs().clamp(max=self.max)
        if a.dtype == torch.float32:  # from the bits, several times faster than frexp + ldexp on CPU
            # floor(log2 a) is the biased exponent field minus 127 (0 and float32 subnormals read -127, below emin)
            e = (a.view(torch.int32) >> 23).sub_(127).clamp_(min=self.emin).sub_(self.mbits)
            return e.add_(127).bitwise_left_shift_(23).view(torch.float32)
        _, e = torch.frexp(a)  # a = m * 2^e with m in [0.5, 1): floor(log2 a) = e - 1
        e = torch.where(a > 0, e - 1, self.emin).clamp_min(self.emin) - self.mbits
        return torch.ldexp(torch.ones_like(a), e)

    def round(self, v: torch.Tensor) -> torch.Tensor:
        """``v`` rounded to the nearest value of the format (ties to even), saturating at ``+-max``."""
        v = v.clamp(-self.max, self.max)
        d = self.step(v)
        return torch.round(v / d) * d

    def table(self, device=None) -> torch.Tensor:
        """float32 value of every code ``0 .. 2^bits - 1`` (NaN for FP8's NaN codes)."""
        if self.dtype is not None:
            return torch.arange(256, dtype=torch.uint8, device=device).view(self.dtype).float()
        mags = _e2m1_magnitudes(device)
        return torch.cat([mags, -mags])  # codes 8..15 carry the sign bit; code 8 is -0.0

    def encode(self, q: torch.Tensor) -> torch.Tensor:
        """uint8 codes of values already on the format (``round``'s output); ``decode`` inverts it bitwise."""
        if self.dtype is not None:
            return q.float().to(self.dtype).view(torch.uint8)
        m = q.abs().float()  # 0, .5, 1, 1.5 -> 2m (codes 0-3); 2, 3, 4 -> m + 2 (4-6); 6 -> 7
        mag = torch.where(m < 2, m * 2, torch.where(m < 5, m + 2, 7.0)).to(torch.uint8)
        return mag | (torch.signbit(q).to(torch.uint8) << 3)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """float32 values of ``codes`` (a table lookup)."""
        return self.table(codes.device)[codes.long()]


def _e2m1_magnitudes(device=None) -> torch.Tensor:
    return torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], device=device)


E2M1 = FPFormat("e2m1", 2, 1, 1, 6.0)
E4M3 = FPFormat("e4m3", 4, 3, 7, 448.0, "float8_e4m3fn")
E5M2 = FPFormat("e5m2", 5, 2, 15, 57344.0, "float8_e5m2")
FORMATS = {f.name: f for f in (E2M1, E4M3, E5M2)}
E4M3_MIN = 2.0**-9  # smallest positive E4M3 value (a subnormal)


# -- NVFP4: E4M3 block scales under an FP32 tensor scale ------------------------------------------
def nvfp4_tensor_scale(amax: torch.Tensor) -> torch.Tensor:
    """``2^ceil(log2(amax / (6 * 448)))``, in ``[2^-126, 2^127]`` (2^-126: an all-zero tensor).

    A power of two, so that exports storing its inverse decompress exactly (module docstring).

    Example (10 / 2688 = 0.00372 lies in (2^-9, 2^-8]):
        >>> nvfp4_tensor_scale(torch.tensor([2688.0, 10.0, 0.0])).tolist() == [1.0, 2.0**-8, 2.0**-126]
        True
    """
    s = (amax.float() / (E2M1.max * E4M3.max)).clamp(FP32_TINY, 2.0**127)
    m, e = torch.frexp(s)  # s = m * 2^e, m in [0.5, 1): ceil(log2 s) = e, or e - 1 when s is a power of two
    return torch.ldexp(torch.ones_like(s), torch.where(m == 0.5, e - 1, e))


def e4m3_scale(s: torch.Tensor) -> torch.Tensor:
    """A block scale (in units of the tensor scale) rounded to E4M3, clamped to ``[2^-9, 448]``.

    Example (hand-computed: 89.6 lies between 88 and 96, spacing 8 in [64, 128)):
        >>> e4m3_scale(torch.tensor([89.6, 500.0, 0.0]))
        tensor([8.8000e+01, 4.4800e+02, 1.9531e-03])
    """
    return s.float().clamp(E4M3_MIN, E4M3.max).to(torch.float8_e4m3fn).float()


def nvfp4_block_scale(amax_block: torch.Tensor, tensor_scale: torch.Tensor) -> torch.Tensor:
    """The E4M3 value of ``amax_block / 6 / tensor_scale`` (multiply by ``tensor_scale`` to use it)."""
    return e4m3_scale(amax_block.float() / E2M1.max / tensor_scale)


# -- MXFP4: E8M0 power-of-two block scales ---------------------------------------------------------
def mx_exponent(amax_block: torch.Tensor, emax_elem: int = 2) -> torch.Tensor:
    """OCP MX shared exponent ``clamp(floor(log2 amax) - emax_elem, -127, 127)``, as float32 (-127 for a zero block).

    Example (amax 5 -> floor(log2 5) = 2 -> e = 0; amax 0.1 -> -4 - 2 = -6):
        >>> mx_exponent(torch.tensor([5.0, 0.1, 0.0]))
        tensor([   0.,   -6., -127.])
    """
    a = amax_block.float()
    _, e = torch.frexp(a)
    e = torch.where(a > 0, e - 1 - emax_elem, torch.full_like(e, E8M0_MIN_EXP))
    return e.clamp(E8M0_MIN_EXP, E8M0_MAX_EXP).float()


def e8m0_scale(s: torch.Tensor) -> torch.Tensor:
    """A positive scale rounded to a power of two (nearest, ties up: torch's E8M0 cast), in ``[2^-127, 2^127]``."""
    return s.float().clamp(2.0**E8M0_MIN_EXP, 2.0**E8M0_MAX_EXP).to(torch.float8_e8m0fnu).float()


def e8m0_encode(scale: torch.Tensor) -> torch.Tensor:
    """uint8 biased exponents ``log2(scale) + 127`` of power-of-two scales.

    Example:
        >>> e8m0_encode(torch.tensor([1.0, 2.0**-6]))
        tensor([127, 121], dtype=torch.uint8)
    """
    return scale.float().to(torch.float8_e8m0fnu).view(torch.uint8)
