"""Bit allocation: one quantization setting per layer that minimises the summed sensitivity under a budget.

Each layer ``l`` may take one of the candidate settings ``c`` (ternary, 2, 3, 4, 8 bits, ...); taking
``c`` costs ``bits[l][c]`` storage bits and adds ``sens[l][c]`` to the loss (``qat.sensitivity``).
The plan minimises ``sum_l sens[l][c_l]`` subject to ``sum_l bits[l][c_l] <= B * sum_l n_l``, with
``B`` the budget in average bits per weight and ``n_l`` the layer's weights: a multiple-choice
knapsack (SliM-LLM, ModelOpt's ``auto_quantize`` and HAWQ-V3 solve the same problem; HAWQ-V3 with an
integer program). It is solved by dynamic programming over the bits spent beyond the cheapest plan::

    best[0][r] = 0;   best[l+1][r] = min_c best[l][r - d[l][c]] + sens[l][c],   d[l][c] = bits[l][c] - min_c' bits[l][c']

in a unit ``u`` of bits: the greatest common divisor of the ``d`` when that gives at most
``max_columns`` columns (the solution is then exact), else ``ceil(R / max_columns)`` with every ``d``
rounded up to it (``R``: the budget beyond the cheapest plan). Rounding up never overspends, and the
plan found is at least as good as the exact optimum under the budget less ``layers x (u - 1)`` bits:
for SmolLM2-135M at 2.5 bits (a ternary code costs ``ceil(1.6 n)`` bits, so the divisor collapses to a
few bits) ``u`` is about 170 bits and the slack 0.0005 bits per weight. The table is one float64 row
and one int8 choice per (layer, column): at most ``layers x max_columns`` bytes (55 MB for 210 layers).

Storage is counted as the packed export stores it (``qat.export.packed``): the codes at their
packed width (``ceil(log2(levels))`` bits; ternary five codes per byte, 1.6 bits), and every scale,
zero point and offset in float16 (16 bits), Tequila's folded bias in float32 (32 bits).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from qat.errors import UserError

SCALE_BITS = 16  # scales, zero points and offsets are stored in float16
BIAS_BITS = 32  # Tequila's folded dead-zone bias, float32


def code_bits(lo: int, hi: int) -> float:
    """Storage bits of one code on the grid ``[lo, hi]``: 1.6 for ternary (base 3), else ``ceil(log2(levels))``.

    >>> code_bits(-1, 1), code_bits(-8, 7), code_bits(0, 3), code_bits(-4, 3)
    (1.6, 4, 2, 3)
    """
    levels = hi - lo + 1
    return 1.6 if levels == 3 else max(1, math.ceil(math.log2(levels)))


def storage_bits(codes) -> int:
    """Storage bits of one quantized tensor (a :class:`qat.quantizers.base.Codes`): codes and their parameters.

    ``ceil(code_bits * n) + 16 * (scales + zero points + offsets) + 32 * bias entries``.
    """
    bits = math.ceil(code_bits(codes.lo, codes.hi) * codes.codes.numel())
    for extra in (codes.scale, codes.zero, codes.offset):
        if extra is not None:
            bits += SCALE_BITS * extra.numel()
    if codes.bias is not None:
        bits += BIAS_BITS * codes.bias.numel()
    return bits


def allocate(bits: Sequence[Sequence[int]], sens: Sequence[Sequence[float]], budget: int, max_columns: int = 1 << 18) -> list[int]:
    """The choice per layer that minimises ``sum sens[l][c]`` with ``sum bits[l][c] <= budget``.

    Exact when the extra costs ``d`` share a unit that gives at most ``max_columns`` columns (the
    module docstring); otherwise never over the budget and at least as good as the exact optimum
    under ``budget - layers * (unit - 1)``.

    Args:
        bits: per layer, the integer storage bits of each candidate (at most 127 candidates).
        sens: per layer, the sensitivity of each candidate (same shape as ``bits``); lower is better.
        budget: the total storage bits allowed.
        max_columns: the largest dynamic-programming table width (memory: layers x max_columns bytes).

    Returns:
        One candidate index per layer. Among plans of equal sensitivity, the one found first
        (candidates in the order given) is kept.

    Raises:
        UserError: the budget is below the cheapest plan (the message gives its average), or the
            shapes of ``bits`` and ``sens`` differ.

    Example:
        >>> allocate([[2, 4], [2, 4]], [[5.0, 1.0], [3.0, 0.0]], budget=6)   # one layer at 4 bits
        [1, 0]
    """
    if len(bits) != len(sens) or any(len(b) != len(s) or not b for b, s in zip(bits, sens)) or any(len(b) > 127 for b in bits):
        raise UserError("allocate: bits and sens need the same number of layers and of candidates per layer (1 to 127)")
    cheapest = sum(min(b) for b in bits)
    if budget < cheapest:
        raise UserError(f"the budget of {budget} bits is below the cheapest plan ({cheapest} bits): raise the budget or add a "
                        "cheaper candidate")
    extra = [[int(c) - min(b) for c in b] for b in bits]  # bits beyond each layer's cheapest candidate
    room = int(budget - cheapest)
    unit = math.gcd(*(c for d in extra for c in d)) or 1
    if room // unit > max_columns:
        unit = -(-room // max_columns)  # rounding every extra cost up to it: never over the budget
    costs = [[-(-c // unit) for c in d] for d in extra]
    cap = room // unit
    best = np.full(cap + 1, np.inf)
    best[0] = 0.0
    choice = np.zeros((len(costs), cap + 1), dtype=np.int8)
    for layer, (cost, s) in enumerate(zip(costs, sens)):
        new = np.full(cap + 1, np.inf)
        for c, (k, v) in enumerate(zip(cost, s)):
            if k > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[k:] = best[: cap + 1 - k] + float(v)
            better = cand < new
            new[better] = cand[better]
            choice[layer][better] = c
        best = new
    col = int(np.argmin(best))  # the lowest total sensitivity over every spend within the budget
    plan = []
    for layer in range(len(costs) - 1, -1, -1):
        c = int(choice[layer][col])
        plan.append(c)
        col -= costs[layer][c]
    return plan[::-1]


def average_bits(bits: Sequence[Sequence[int]], plan: Sequence[int], weights: Sequence[int]) -> float:
    """Average storage bits per weight of ``plan``: ``sum bits[l][plan[l]] / sum weights``.

    >>> average_bits([[150, 300]], [0], [64])   # 64 weights at 2 bits + a 16-bit scale and zero point
    2.34375
    """
    return sum(b[c] for b, c in zip(bits, plan)) / sum(weights)
