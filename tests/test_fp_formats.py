"""Floating-point element formats and block scales (qat/fp_formats.py), against hand-computed values and torch's casts."""

import pytest
import torch

from qat.fp_formats import (
    E2M1,
    E4M3,
    E5M2,
    e4m3_scale,
    e8m0_encode,
    e8m0_scale,
    mx_exponent,
    nvfp4_block_scale,
    nvfp4_tensor_scale,
)


def test_e2m1_rounding_by_hand():
    # ties to even: 0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4; saturation at 6
    v = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.3, 2.9, 5.1, 7.0, -100.0, -0.25, -5.0, -1.6, 0.0])
    want = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 0.5, 3.0, 6.0, 6.0, -6.0, -0.0, -4.0, -1.5, 0.0]
    assert E2M1.round(v).tolist() == want
    assert torch.signbit(E2M1.round(v))[12]  # -0.25 rounds to -0.0: the sign survives into the code


def test_e2m1_values_and_codes():
    values = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    table = E2M1.table()
    assert table[:8].tolist() == values and table[8:].tolist() == [-x for x in values]
    # sign-magnitude, the magnitude's index is its E2M1 bit pattern: 6 = 0b0111, -6 = 0b1111, -0.5 = 0b1001
    assert E2M1.encode(torch.tensor([6.0, -6.0, -0.5, 1.0, 0.0, -0.0])).tolist() == [7, 15, 9, 2, 0, 8]
    levels = torch.cat([table, table])  # every level is its own rounding, and round-trips through its code
    assert torch.equal(E2M1.round(levels), levels)
    codes = E2M1.encode(levels)
    assert codes.dtype == torch.uint8 and torch.equal(E2M1.decode(codes), levels)
    assert torch.equal(torch.signbit(E2M1.decode(codes)), torch.signbit(levels))


def test_e2m1_round_is_nearest():
    v = torch.linspace(-7, 7, 20001)
    levels = E2M1.table()
    nearest = (v[:, None] - levels[None]).abs().min(1).values
    assert torch.equal((E2M1.round(v) - v).abs(), nearest)


@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=["e4m3", "e5m2"])
def test_fp8_rounding_equals_torch_cast(fmt):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100_000, generator=g) * torch.exp(torch.randn(100_000, generator=g) * 4)
    finite = fmt.table()
    finite = finite[torch.isfinite(finite)].unique()
    mids = (finite[1:] + finite[:-1]) / 2  # every tie of the format
    x = torch.cat([x, finite, mids, torch.tensor([1e9, -1e9, fmt.max * 1.06])])
    ref = x.clamp(-fmt.max, fmt.max).to(fmt.dtype).float()
    assert torch.equal(fmt.round(x), ref)
    assert torch.equal(fmt.decode(fmt.encode(ref)), ref)
    assert torch.equal(fmt.encode(ref), ref.to(fmt.dtype).view(torch.uint8))


def test_format_constants():
    assert (E2M1.bits, E2M1.max, E2M1.emin) == (4, 6.0, 0)
    assert (E4M3.bits, E4M3.max, E4M3.emin) == (8, 448.0, -6)
    assert (E5M2.bits, E5M2.max, E5M2.emin) == (8, 57344.0, -14)
    assert E4M3.round(torch.tensor([2.0**-10, 2.0**-9 * 0.75])).tolist() == [0.0, 2.0**-9]  # the subnormals


def test_e4m3_block_scale_by_hand():
    # tensor amax 10: 10 / 2688 = 0.00372 rounds up to s_t = 2^-8; a block of amax 2: 2 / 6 * 256 = 85.33,
    # between 80 and 88 (spacing 8) -> 88
    s_t = nvfp4_tensor_scale(torch.tensor(10.0))
    assert s_t.item() == 2.0**-8
    assert nvfp4_block_scale(torch.tensor(2.0), s_t).item() == 88.0
    assert torch.tensor(88.0).to(torch.float8_e4m3fn).view(torch.uint8).item() == 0x6B  # 1.375 * 2^6: 0 1101 011
    # the tensor's own amax block: 10 / 6 * 256 = 426.67, between 416 and 448 (spacing 32) -> 416 (0x7D)
    assert nvfp4_block_scale(torch.tensor(10.0), s_t).item() == 416.0
    assert nvfp4_tensor_scale(torch.tensor(2688.0 * 2.0**-5)).item() == 2.0**-5  # already a power of two: kept


def test_e4m3_scale_saturates_and_never_reaches_zero():
    assert e4m3_scale(torch.tensor([500.0, 1e30])).tolist() == [448.0, 448.0]
    assert e4m3_scale(torch.tensor([0.0, 1e-30])).tolist() == [2.0**-9, 2.0**-9]  # E4M3's smallest value
    assert nvfp4_tensor_scale(torch.tensor(0.0)).item() == 2.0**-126  # all-zero tensor


def test_e8m0_scale_by_hand():
    # OCP MX: e = floor(log2 amax) - 2 (E2M1's emax): amax 5 -> 0, amax 0.1 -> -6, amax 6 -> 0, amax 8 -> 1
    assert mx_exponent(torch.tensor([5.0, 0.1, 6.0, 8.0, 7.99])).tolist() == [0.0, -6.0, 0.0, 1.0, 0.0]
    assert e8m0_encode(torch.tensor([1.0, 2.0**-6, 2.0])).tolist() == [127, 121, 128]
    # an all-zero block, underflow and the float32 ceiling
    assert mx_exponent(torch.tensor([0.0, 1e-39, 3e38])).tolist() == [-127.0, -127.0, 125.0]
    assert e8m0_encode(torch.tensor([2.0**-127, 2.0**127])).tolist() == [0, 254]


def test_e8m0_learned_scale_rounding():
    # nearest power of two in the linear domain, ties up; clamped to 2^+-127
    s = torch.tensor([1.4, 1.45, 1.5, 0.75, 0.7, 1e-45, 3e38])
    assert e8m0_scale(s).tolist() == [1.0, 1.0, 2.0, 1.0, 0.5, 2.0**-127, 2.0**127]
