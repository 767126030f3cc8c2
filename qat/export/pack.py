"""Bit packing of integer codes into bytes, pure torch and vectorised.

Codes in ``[lo, lo + 2^bits - 1]`` are stored offset by ``-lo``, so every stored field is an
unsigned integer ``t = c - lo``. Two layouts:

``"bits"`` (any width 1..8): a dense little-endian bitstream. Element ``i`` occupies bits
``[bits*i, bits*(i+1))`` of the stream, bit ``k`` of the stream is bit ``k % 8`` of byte ``k // 8``.
For widths that divide 8 this is the familiar layout::

    4 bits: byte k = t[2k] | t[2k+1] << 4            (element 2k in the low nibble)
    2 bits: byte k = t[4k] | t[4k+1] << 2 | t[4k+2] << 4 | t[4k+3] << 6
    8 bits: byte k = t[k]

and 3, 5, 6, 7 bits straddle byte boundaries (3 bits: 8 codes in 3 bytes).

``"base3"`` (ternary, ``t`` in {0, 1, 2}): five trits per byte, ``byte = sum_j t[5k+j] * 3^j``
(at most 242), 1.6 bits per weight (llama.cpp's TQ1_0 packs the same way, blockwise).

The last byte is padded with zero fields when ``numel`` is not a multiple of the codes per byte;
``unpack`` needs ``numel`` to drop them.
"""

from __future__ import annotations

import math

import torch

from qat.errors import UserError

LAYOUTS = ("bits", "base3")


def packed_numel(numel: int, bits: int, layout: str = "bits") -> int:
    """Bytes that ``numel`` codes take in ``layout``.

    Example:
        >>> packed_numel(5, 4), packed_numel(5, 3), packed_numel(11, 2, "base3")
        (3, 2, 3)
    """
    _check_layout(bits, layout)
    if layout == "base3":
        return math.ceil(numel / 5)
    return math.ceil(numel * bits / 8)


def _check_layout(bits: int, layout: str) -> None:
    if layout not in LAYOUTS:
        raise UserError(f"layout={layout!r} is not one of {LAYOUTS}")
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise UserError(f"bits={bits!r}: packed fields are 1 to 8 bits wide")
    if layout == "base3" and bits != 2:
        raise UserError("layout='base3' packs ternary codes (3 levels, bits=2)")


def pack(codes: torch.Tensor, bits: int, lo: int, layout: str = "bits") -> torch.Tensor:
    """Pack integer ``codes`` (any shape, flattened row-major) into a 1-D ``uint8`` tensor.

    Args:
        codes: integer tensor with values in ``[lo, lo + 2^bits - 1]`` (``[lo, lo + 2]`` for base3).
        bits: field width, 1 to 8 (2 for ternary codes).
        lo: the smallest code; fields store ``codes - lo``.
        layout: ``"bits"`` (dense little-endian bitstream) or ``"base3"`` (5 ternary codes per byte).

    Returns:
        ``uint8`` tensor of ``packed_numel(codes.numel(), bits, layout)`` bytes.

    Raises:
        UserError: a code outside the range the fields hold, a bad width or layout.

    Example:
        >>> pack(torch.tensor([-8, 7, 1]), 4, -8)  # 0 | 15 << 4, then 9 in the low nibble
        tensor([240,   9], dtype=torch.uint8)
    """
    _check_layout(bits, layout)
    t = codes.reshape(-1).to(torch.int16) - lo
    top = 2 if layout == "base3" else 2**bits - 1
    if t.numel() and (t.min() < 0 or t.max() > top):
        raise UserError(
            f"codes span [{int(t.min()) + lo}, {int(t.max()) + lo}], outside [{lo}, {lo + top}] that "
            f"{bits}-bit {layout!r} fields hold; pass the bits and lo of the grid the codes came from"
        )
    return _pack_base3(t) if layout == "base3" else _pack_bits(t, bits)


def unpack(packed: torch.Tensor, bits: int, lo: int, numel: int, layout: str = "bits") -> torch.Tensor:
    """Inverse of ``pack``: the first ``numel`` codes, 1-D, ``int16``.

    Raises:
        UserError: ``packed`` is not ``uint8`` or has a size other than ``packed_numel(numel, ...)``.

    Example:
        >>> unpack(torch.tensor([240, 9], dtype=torch.uint8), 4, -8, 3)
        tensor([-8,  7,  1], dtype=torch.int16)
    """
    _check_layout(bits, layout)
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise UserError(f"packed codes must be a 1-D uint8 tensor, got {packed.dtype} of shape {tuple(packed.shape)}")
    if packed.numel() != packed_numel(numel, bits, layout):
        raise UserError(f"{packed.numel()} bytes cannot hold exactly {numel} {bits}-bit {layout!r} codes; "
                        "pass the numel, bits and layout they were packed with")
    t = _unpack_base3(packed) if layout == "base3" else _unpack_bits(packed, bits)
    return t[:numel] + lo


def _pad(t: torch.Tensor, multiple: int) -> torch.Tensor:
    extra = -t.numel() % multiple
    return torch.cat([t, t.new_zeros(extra)]) if extra else t


def _pack_bits(t: torch.Tensor, bits: int) -> torch.Tensor:
    # Eight fields make exactly `bits` bytes: assemble them in one int64 (8 * bits <= 64 bits of
    # stream), then cut it into bytes, low byte first. Loops run over at most 8 positions; each
    # step is vectorised over all groups.
    n_bytes = packed_numel(t.numel(), bits)
    fields = _pad(t, 8).reshape(-1, 8).to(torch.int64)
    word = torch.zeros(fields.shape[0], dtype=torch.int64)
    for j in range(8):
        word |= fields[:, j] << (bits * j)
    out = torch.stack([(word >> (8 * k)) & 0xFF for k in range(bits)], dim=-1)
    return out.reshape(-1)[:n_bytes].to(torch.uint8)


def _unpack_bits(packed: torch.Tensor, bits: int) -> torch.Tensor:
    chunks = _pad(packed, bits).reshape(-1, bits).to(torch.int64)
    word = torch.zeros(chunks.shape[0], dtype=torch.int64)
    for k in range(bits):
        word |= chunks[:, k] << (8 * k)
    fields = torch.stack([(word >> (bits * j)) & (2**bits - 1) for j in range(8)], dim=-1)
    return fields.reshape(-1).to(torch.int16)


def _pack_base3(t: torch.Tensor) -> torch.Tensor:
    trits = _pad(t, 5).reshape(-1, 5)
    byte = trits[:, 4].clone()
    for j in (3, 2, 1, 0):  # Horner: ((t4 * 3 + t3) * 3 + ...) * 3 + t0
        byte.mul_(3).add_(trits[:, j])
    return byte.to(torch.uint8)


def _unpack_base3(packed: torch.Tensor) -> torch.Tensor:
    b = packed.to(torch.int16)
    return torch.stack([b // p % 3 for p in (1, 3, 9, 27, 81)], dim=-1).reshape(-1)
