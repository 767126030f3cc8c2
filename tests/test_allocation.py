"""Bit allocation: the exact knapsack against brute force, and the storage accounting by hand."""

import itertools
import random

import pytest
import torch
from torch import nn

from qat.allocation import allocate, average_bits, code_bits, storage_bits
from qat.errors import UserError
from qat.quantizers import LSQ, MinMax, Ternary


def brute_force(bits, sens, budget):
    best = None
    for plan in itertools.product(*(range(len(b)) for b in bits)):
        if sum(b[c] for b, c in zip(bits, plan)) <= budget:
            value = sum(s[c] for s, c in zip(sens, plan))
            best = value if best is None else min(best, value)
    return best


@pytest.mark.parametrize("seed", range(40))
def test_knapsack_matches_brute_force(seed):
    rng = random.Random(seed)
    layers = rng.randint(1, 6)
    unit = rng.choice([1, 8, 96])  # a common factor, as layer sizes share one
    bits = [[unit * rng.randint(1, 20) for _ in range(rng.randint(1, 4))] for _ in range(layers)]
    sens = [[rng.random() for _ in b] for b in bits]
    lo, hi = sum(min(b) for b in bits), sum(max(b) for b in bits)
    budget = rng.randint(lo, hi + unit)
    plan = allocate(bits, sens, budget)
    assert sum(b[c] for b, c in zip(bits, plan)) <= budget
    assert sum(s[c] for s, c in zip(sens, plan)) == pytest.approx(brute_force(bits, sens, budget))


@pytest.mark.parametrize("seed", range(20))
def test_knapsack_in_a_coarser_unit_never_overspends_and_is_within_its_slack(seed):
    """Costs that share no unit (ternary's ceil(1.6 n)) and a table capped at 7 columns: rounded up to a coarser unit,
    the plan stays within the budget and is at least as good as the exact optimum under budget - layers x (unit - 1)."""
    rng = random.Random(seed)
    layers = rng.randint(2, 6)
    bits = [sorted(rng.randint(50, 400) for _ in range(rng.randint(2, 4))) for _ in range(layers)]
    sens = [sorted((rng.random() for _ in b), reverse=True) for b in bits]
    lo, hi = sum(min(b) for b in bits), sum(max(b) for b in bits)
    budget = rng.randint(lo, hi)
    plan = allocate(bits, sens, budget, max_columns=7)
    assert sum(b[c] for b, c in zip(bits, plan)) <= budget
    unit = -(-(budget - lo) // 7)
    tighter = budget - layers * (unit - 1)
    if tighter >= lo:
        assert sum(s[c] for s, c in zip(sens, plan)) <= brute_force(bits, sens, tighter) + 1e-12


def test_knapsack_at_model_scale_is_fast_and_small():
    """SmolLM2-135M's 210 decoder linears x 5 candidates, with ternary's ceil(1.6 n) costs (no common unit): seconds."""
    import math
    import time

    shapes = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)] * 30
    bits = [[math.ceil(1.6 * o * i) + 16 * o * i // 64, 2 * o * i + 32 * o * i // 64, 3 * o * i + 32 * o * i // 64,
             4 * o * i + 16 * o * i // 32, 8 * o * i + 16 * o] for o, i in shapes]
    rng = random.Random(0)
    sens = [sorted((rng.random() * 10 ** -k for k in range(5)), reverse=True) for _ in shapes]
    weights = sum(o * i for o, i in shapes)
    t0 = time.perf_counter()
    plan = allocate(bits, sens, int(2.5 * weights))
    assert time.perf_counter() - t0 < 20
    assert 2.49 < average_bits(bits, plan, [o * i for o, i in shapes]) <= 2.5


def test_knapsack_takes_the_sensitive_layer_wide():
    # three layers of 100 weights, candidates 2 or 4 bits; only the middle one is sensitive
    bits = [[200, 400]] * 3
    sens = [[1.0, 0.9], [50.0, 0.1], [1.0, 0.9]]
    assert allocate(bits, sens, budget=800) == [0, 1, 0]
    assert allocate(bits, sens, budget=1200) == [1, 1, 1]


def test_knapsack_refuses_a_budget_below_the_cheapest_plan():
    with pytest.raises(UserError, match="below the cheapest plan"):
        allocate([[200, 400]] * 2, [[1.0, 0.0]] * 2, budget=399)
    with pytest.raises(UserError, match="same number"):
        allocate([[200, 400]], [[1.0]], budget=1000)


def test_code_bits_by_grid():
    assert code_bits(-1, 1) == 1.6  # ternary, five codes a byte
    assert (code_bits(0, 3), code_bits(-4, 3), code_bits(-8, 7), code_bits(-128, 127)) == (2, 3, 4, 8)


def test_average_bits_of_a_three_layer_model_by_hand():
    torch.manual_seed(0)
    layers = [nn.Linear(64, 32), nn.Linear(64, 16), nn.Linear(128, 8)]
    quantizers = [
        LSQ(bits=4, granularity="group", group_size=32, symmetric=True),  # 2048 w: 4 b + one 16-bit scale per 32
        MinMax(bits=2, granularity="group", group_size=64, symmetric=False),  # 1024 w: 2 b + scale and zero per 64
        Ternary(method="absmean", granularity="channel"),  # 1024 w: 1.6 b + one scale per row (8 rows)
    ]
    bits = []
    for layer, q in zip(layers, quantizers):
        q.init_(layer.weight.data)
        bits.append(storage_bits(q.codes(layer.weight.data)))
    assert bits[0] == 2048 * 4 + 16 * (2048 // 32)        # 8192 + 1024 = 9216
    assert bits[1] == 1024 * 2 + 16 * 2 * (1024 // 64)    # 2048 + 512 = 2560
    assert bits[2] == 1639 + 16 * 8                        # ceil(1.6 * 1024) = 1639, + 128 = 1767
    assert bits == [9216, 2560, 1767]
    avg = average_bits([[b] for b in bits], [0, 0, 0], [2048, 1024, 1024])
    assert avg == pytest.approx((9216 + 2560 + 1767) / 4096)  # 3.305 bits per weight
