"""Bit packing (qat/export/pack.py): round trips for every width, the documented byte layouts, bad input."""

import pytest
import torch

from qat.errors import UserError
from qat.export.pack import pack, packed_numel, unpack

# odd sizes: none a multiple of 8 codes or of 5 trits, plus the empty and one-element cases
SHAPES = [(0,), (1,), (7,), (3, 5), (13, 11), (2, 3, 37)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("bits,lo", [(b, lo) for b in range(2, 9) for lo in (0, -(2 ** (b - 1)))])
def test_round_trip_every_width(bits, lo, shape):
    gen = torch.Generator().manual_seed(bits * 100 + len(shape))
    codes = torch.randint(lo, lo + 2**bits, shape, generator=gen)
    packed = pack(codes, bits, lo)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    numel = codes.numel()
    assert packed.numel() == packed_numel(numel, bits) == -(-numel * bits // 8)  # dense: ceil(bits * n / 8)
    out = unpack(packed, bits, lo, numel)
    assert out.dtype == torch.int16
    assert torch.equal(out.reshape(shape), codes.to(torch.int16))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("layout", ["bits", "base3"])
def test_ternary_round_trip_both_layouts(layout, shape):
    codes = torch.randint(-1, 2, shape, generator=torch.Generator().manual_seed(len(shape)))
    packed = pack(codes, 2, -1, layout)
    per_byte = 5 if layout == "base3" else 4
    assert packed.numel() == -(-codes.numel() // per_byte)
    assert torch.equal(unpack(packed, 2, -1, codes.numel(), layout).reshape(shape), codes.to(torch.int16))


def test_full_range_of_every_width_round_trips():
    # every value of the grid, both extremes included
    for bits in range(1, 9):
        codes = torch.arange(2**bits).repeat(3)
        assert torch.equal(unpack(pack(codes, bits, 0), bits, 0, codes.numel()), codes.to(torch.int16))


def test_int4_layout_element_2k_in_the_low_nibble():
    codes = torch.tensor([1, 2, 3, 4, 15])  # unsigned, lo = 0
    assert pack(codes, 4, 0).tolist() == [1 | 2 << 4, 3 | 4 << 4, 15]  # last byte padded with a zero nibble
    # signed codes are stored offset by -lo (offset binary): -8 -> 0, 7 -> 15
    assert pack(torch.tensor([-8, 7]), 4, -8).tolist() == [0 | 15 << 4]


def test_int2_and_ternary_four_per_byte_lsb_first():
    assert pack(torch.tensor([0, 1, 2, 3]), 2, 0).tolist() == [0 | 1 << 2 | 2 << 4 | 3 << 6]
    # ternary {-1, 0, 1} stored as t + 1 in {0, 1, 2}
    assert pack(torch.tensor([-1, 0, 1, 1, 0]), 2, -1).tolist() == [0 | 1 << 2 | 2 << 4 | 2 << 6, 1]


def test_base3_five_trits_per_byte():
    # byte = sum_j (t_j + 1) * 3^j
    codes = torch.tensor([1, -1, 0, 1, 1, 0])
    assert pack(codes, 2, -1, "base3").tolist() == [2 + 0 * 3 + 1 * 9 + 2 * 27 + 2 * 81, 1]
    assert pack(torch.ones(5, dtype=torch.int64), 2, -1, "base3").item() == 242  # the largest byte


def test_int3_is_a_dense_bitstream():
    # eight 3-bit codes fill exactly three bytes, little-endian: code i at stream bits [3i, 3i + 3)
    codes = torch.tensor([1, 2, 3, 4, 5, 6, 7, 0])
    stream = sum(int(c) << (3 * i) for i, c in enumerate(codes))
    assert pack(codes, 3, 0).tolist() == [(stream >> 8 * k) & 0xFF for k in range(3)]
    assert packed_numel(9, 3) == 4  # 27 bits


def test_codes_outside_the_fields_are_refused():
    with pytest.raises(UserError, match=r"outside \[-8, 7\]"):
        pack(torch.tensor([0, 8]), 4, -8)
    with pytest.raises(UserError, match="outside"):
        pack(torch.tensor([-1, 2]), 2, -1, "base3")
    with pytest.raises(UserError, match="1 to 8"):
        pack(torch.tensor([0]), 9, 0)
    with pytest.raises(UserError, match="base3"):
        pack(torch.tensor([0]), 4, 0, "base3")
    with pytest.raises(UserError, match="layout"):
        pack(torch.tensor([0]), 4, 0, "nibbles")


def test_unpack_checks_its_input():
    packed = pack(torch.arange(10), 4, 0)
    with pytest.raises(UserError, match="cannot hold exactly"):
        unpack(packed, 4, 0, 12)
    with pytest.raises(UserError, match="uint8"):
        unpack(packed.to(torch.int16), 4, 0, 10)
