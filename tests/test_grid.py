"""Integer grids, granularities and the shapes that share one scale (qat/grid.py)."""

import dataclasses

import pytest
import torch

from qat.errors import UserError
from qat.grid import (
    GRANULARITIES,
    Grid,
    check_granularity,
    check_shape,
    group_view,
    param_shape,
    valid_group_sizes,
)

# ALGORITHMS.md section 7, the table, written out by hand.
TABLE = {
    # bits: (signed full, signed narrow, unsigned)
    2: ((-2, 1), (-1, 1), (0, 3)),
    3: ((-4, 3), (-3, 3), (0, 7)),
    4: ((-8, 7), (-7, 7), (0, 15)),
    5: ((-16, 15), (-15, 15), (0, 31)),
    6: ((-32, 31), (-31, 31), (0, 63)),
    7: ((-64, 63), (-63, 63), (0, 127)),
    8: ((-128, 127), (-127, 127), (0, 255)),
}


@pytest.mark.parametrize("bits", sorted(TABLE))
def test_ranges(bits):
    full, narrow, unsigned = TABLE[bits]
    g = Grid(bits)
    assert (g.lo, g.hi) == full
    assert g.n_levels == 2**bits
    g = Grid(bits, signed=True, narrow=True)
    assert (g.lo, g.hi) == narrow
    assert g.n_levels == 2**bits - 1
    g = Grid(bits, signed=False)
    assert (g.lo, g.hi) == unsigned
    assert g.n_levels == 2**bits


def test_ranges_are_python_ints():
    g = Grid(4)
    assert type(g.lo) is int and type(g.hi) is int


def test_ternary():
    t = Grid.ternary()
    assert (t.lo, t.hi, t.n_levels) == (-1, 1, 3)
    assert t == Grid(2, narrow=True)
    assert t.bits == 2 and t.signed and t.narrow


@pytest.mark.parametrize("bits", [0, 1, 9, 16, -4, 2.5, 4.0, True, False, "4", None])
def test_bad_bits(bits):
    with pytest.raises(UserError, match="bits="):
        Grid(bits)


@pytest.mark.parametrize("bits", [0, 1, 9, 2.5, True])
def test_bad_bits_unsigned(bits):
    with pytest.raises(UserError):
        Grid(bits, signed=False)


def test_narrow_unsigned_refused():
    with pytest.raises(UserError, match="narrow"):
        Grid(4, signed=False, narrow=True)


def test_grid_is_frozen():
    g = Grid(4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        g.bits = 3


# -- granularity ------------------------------------------------------------------------------


@pytest.mark.parametrize("granularity", ["tensor", "channel", "token"])
def test_check_granularity_accepts(granularity):
    check_granularity(granularity, None)


def test_check_granularity_group():
    check_granularity("group", 32)
    for bad in (None, 0, -8, True, 8.0, "32"):
        with pytest.raises(UserError, match="group_size"):
            check_granularity("group", bad)


@pytest.mark.parametrize("bad", ["row", "Channel", "", None, "per_tensor"])
def test_check_granularity_unknown(bad):
    with pytest.raises(UserError, match="granularity"):
        check_granularity(bad, None)


def test_valid_group_sizes():
    assert valid_group_sizes(64) == [8, 16, 32, 64]
    assert valid_group_sizes(96) == [8, 12, 16, 24, 32, 48, 96]
    assert valid_group_sizes(100) == [10, 20, 25, 50, 100]
    assert valid_group_sizes(6) == []
    assert valid_group_sizes(13) == [13]


def test_check_shape_message_names_layer_size_and_fixes():
    with pytest.raises(UserError) as info:
        check_shape((16, 96), "group", 64, name="model.layers.0.self_attn.q_proj")
    msg = str(info.value)
    assert "model.layers.0.self_attn.q_proj" in msg
    assert "group_size=64" in msg
    assert "in_features=96" in msg
    assert "[8, 12, 16, 24, 32, 48, 96]" in msg
    assert "channel" in msg  # the other way out


def test_check_shape_accepts_divisible():
    check_shape((16, 96), "group", 32, name="l")
    check_shape((16, 96), "group", 96, name="l")
    check_shape((16, 96), "channel", None)
    check_shape((16, 96), "tensor", None)
    check_shape((7,), "tensor", None)
    check_shape((2, 3, 8), "token", None)


@pytest.mark.parametrize("granularity,gs", [("channel", None), ("group", 4)])
def test_check_shape_needs_2d(granularity, gs):
    for shape in [(8,), (2, 4, 8)]:
        with pytest.raises(UserError, match="lm_head"):
            check_shape(shape, granularity, gs, name="lm_head")


def test_check_shape_validates_granularity():
    with pytest.raises(UserError, match='group_size'):
        check_shape((4, 8), "group", None)
    with pytest.raises(UserError, match='bogus'):
        check_shape((4, 8), "bogus", None)


# -- views and parameter shapes -----------------------------------------------------------------


def test_group_view_shapes():
    w = torch.arange(4 * 64.0).reshape(4, 64)
    assert group_view(w, "tensor").shape == (1, 1, 256)
    assert group_view(w, "channel").shape == (4, 1, 64)
    assert group_view(w, "group", 32).shape == (4, 2, 32)
    assert group_view(w, "group", 8).shape == (4, 8, 8)
    x = torch.zeros(2, 3, 16)
    assert group_view(x, "token").shape == (6, 1, 16)
    assert group_view(x, "tensor").shape == (1, 1, 96)


def test_group_view_groups_run_along_in():
    w = torch.arange(3 * 12.0).reshape(3, 12)
    g = group_view(w, "group", 4)
    for r in range(3):
        for j in range(3):
            assert torch.equal(g[r, j], w[r, 4 * j : 4 * j + 4])
    t = group_view(torch.arange(24.0).reshape(2, 3, 4), "token")
    assert torch.equal(t[4, 0], torch.tensor([16.0, 17, 18, 19]))  # batch 1, token 1


def test_group_view_round_trip_and_is_a_view():
    w = torch.randn(4, 16)
    for gran, gs in [("tensor", None), ("channel", None), ("group", 8)]:
        g = group_view(w, gran, gs)
        assert g.data_ptr() == w.data_ptr()
        assert torch.equal(g.reshape(w.shape), w)


def test_group_view_unknown():
    with pytest.raises(UserError, match='row'):
        group_view(torch.zeros(2, 2), "row")


def test_param_shape_matches_reduction():
    w = torch.randn(6, 48)
    for gran, gs, expected in [("tensor", None, (1, 1, 1)), ("channel", None, (6, 1, 1)), ("group", 16, (6, 3, 1))]:
        assert param_shape(w.shape, gran, gs) == expected
        assert group_view(w, gran, gs).amax(-1, keepdim=True).shape == expected


def test_param_shape_token_and_unknown():
    with pytest.raises(UserError, match="token"):
        param_shape((4, 8), "token")
    with pytest.raises(UserError, match='row'):
        param_shape((4, 8), "row")


def test_granularities_constant():
    assert GRANULARITIES == ("tensor", "channel", "group", "token")
