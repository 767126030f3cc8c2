"""Learning-rate schedules as multipliers of the base rate, for ``torch.optim.lr_scheduler.LambdaLR``.

``cosine``: linear warm-up from 0 over ``warmup_steps``, then a half cosine from 1 down to
``min_lr_ratio`` at ``total_steps`` (ParetoQ, EfficientQAT).

``wsd`` (warmup-stable-decay): linear warm-up, a constant plateau, then a linear decay to
``min_lr_ratio`` over the last ``decay_fraction`` of the steps (the schedule of Tequila's release
script, min_lr_ratio 0.1; Hu et al., MiniCPM 2024).

``constant``: warm-up, then 1 (MeZO's constant rate).
"""

from __future__ import annotations

import math
from functools import partial

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from qat.errors import UserError


def _check(total_steps: int, warmup_steps: int, min_lr_ratio: float) -> None:
    if total_steps < 1:
        raise UserError(f"a schedule needs total_steps >= 1, got {total_steps} (set trainer.max_steps)")
    if not 0 <= warmup_steps <= total_steps:
        raise UserError(f"warmup_steps={warmup_steps} must lie in [0, total_steps={total_steps}]")
    if not 0 <= min_lr_ratio <= 1:
        raise UserError(f"min_lr_ratio={min_lr_ratio} must lie in [0, 1]")


def _warmup(step: int, warmup_steps: int) -> float | None:
    return (step + 1) / warmup_steps if step < warmup_steps else None


def cosine_factor(step: int, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0) -> float:
    """Multiplier at optimizer step ``step`` (0-based).

    Example:
        >>> [round(cosine_factor(s, 10, 2, 0.1), 3) for s in (0, 1, 2, 10)]
        [0.5, 1.0, 1.0, 0.1]
    """
    w = _warmup(step, warmup_steps)
    if w is not None:
        return w
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def wsd_factor(step: int, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.1, decay_fraction: float = 0.2) -> float:
    """Warmup-stable-decay multiplier at optimizer step ``step``.

    Example:
        >>> [round(wsd_factor(s, 10, 1, 0.1, 0.5), 2) for s in (0, 4, 5, 7, 10)]
        [1.0, 1.0, 1.0, 0.64, 0.1]
    """
    w = _warmup(step, warmup_steps)
    if w is not None:
        return w
    decay_steps = max(1, round(decay_fraction * total_steps))
    decay_start = total_steps - decay_steps
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start) / decay_steps)
    return 1.0 - (1.0 - min_lr_ratio) * progress


def constant_factor(step: int, total_steps: int, warmup_steps: int = 0) -> float:
    w = _warmup(step, warmup_steps)
    return 1.0 if w is None else w


def cosine(optimizer: Optimizer, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0) -> LambdaLR:
    """Cosine schedule with linear warm-up (see the module docstring)."""
    _check(total_steps, warmup_steps, min_lr_ratio)
    return LambdaLR(optimizer, partial(cosine_factor, total_steps=total_steps, warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio))


def wsd(optimizer: Optimizer, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.1, decay_fraction: float = 0.2) -> LambdaLR:
    """Warmup-stable-decay schedule (see the module docstring)."""
    _check(total_steps, warmup_steps, min_lr_ratio)
    if not 0 < decay_fraction <= 1:
        raise UserError(f"decay_fraction={decay_fraction} must lie in (0, 1]")
    fn = partial(wsd_factor, total_steps=total_steps, warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio, decay_fraction=decay_fraction)
    return LambdaLR(optimizer, fn)


def constant(optimizer: Optimizer, total_steps: int, warmup_steps: int = 0) -> LambdaLR:
    """Constant rate after a linear warm-up."""
    _check(total_steps, warmup_steps, 0.0)
    return LambdaLR(optimizer, partial(constant_factor, total_steps=total_steps, warmup_steps=warmup_steps))
