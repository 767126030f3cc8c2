"""Integer grids and the shapes that share one scale.

A grid is the set of integer codes a quantizer may emit, ``[lo, hi]``:

============  ==================  =======================  ===================
bits          signed full          signed narrow            unsigned
============  ==================  =======================  ===================
b             [-2^(b-1), 2^(b-1)-1]  [-(2^(b-1)-1), 2^(b-1)-1]  [0, 2^b - 1]
2             [-2, 1]             [-1, 1] (= ternary)      [0, 3]
4             [-8, 7]             [-7, 7]                  [0, 15]
8             [-128, 127]         [-127, 127]              [0, 255]
============  ==================  =======================  ===================

Granularity decides which elements share a scale. Every quantizer works on a *grouped view*
``(rows, n_groups, group)`` of its input and keeps its parameters in shape ``(rows, n_groups, 1)``,
so one code path serves every granularity:

* ``"tensor"``  -> ``(1, 1, numel)``
* ``"channel"`` -> ``(out, 1, in)``           one scale per output row of a weight ``(out, in)``
* ``"group"``   -> ``(out, in // G, G)``      groups always run along ``in`` (the GEMM's K axis)
* ``"token"``   -> ``(numel // d, 1, d)``     activations: one scale per token (last axis)

A group size that does not divide ``in`` is refused (ALGORITHMS.md section 7, option 1: what GPTQ,
EfficientQAT and AngelSlim do); the error lists the group sizes that would work.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qat.errors import UserError

GRANULARITIES = ("tensor", "channel", "group", "token")
SUPPORTED_BITS = range(2, 9)


@dataclass(frozen=True)
class Grid:
    """An integer code range ``[lo, hi]``.

    Args:
        bits: bit width, 2 to 8. Ternary is ``Grid.ternary()`` (``bits=2``, narrow).
        signed: codes centred on zero (symmetric quantization) or ``[0, 2^b - 1]`` (asymmetric).
        narrow: for signed grids, drop the most negative code so the range is symmetric.

    Raises:
        UserError: on a bit width outside 2..8, or ``narrow`` on an unsigned grid.

    Example:
        >>> Grid(4).lo, Grid(4).hi
        (-8, 7)
        >>> Grid(2, narrow=True) == Grid.ternary()
        True
    """

    bits: int
    signed: bool = True
    narrow: bool = False

    def __post_init__(self):
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or self.bits not in SUPPORTED_BITS:
            raise UserError(
                f"bits={self.bits!r} is not supported: use an integer from 2 to 8 "
                "(or a Ternary quantizer for 1.58-bit weights)"
            )
        if self.narrow and not self.signed:
            raise UserError("narrow=True only applies to signed grids: drop narrow or set signed=True")

    @classmethod
    def ternary(cls) -> Grid:
        """The ternary grid {-1, 0, 1}."""
        return cls(2, signed=True, narrow=True)

    @property
    def lo(self) -> int:
        if not self.signed:
            return 0
        return -(2 ** (self.bits - 1)) + int(self.narrow)

    @property
    def hi(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def n_levels(self) -> int:
        """How many codes the grid has, ``hi - lo + 1`` (3 for ternary)."""
        return self.hi - self.lo + 1


def check_granularity(granularity: str, group_size: int | None) -> None:
    """Validate a granularity name and its group size (no tensor needed).

    Raises:
        UserError: unknown granularity, or a group granularity without a positive group size.
    """
    if granularity not in GRANULARITIES:
        raise UserError(f"granularity={granularity!r} is not one of {GRANULARITIES}")
    if granularity == "group":
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
            raise UserError(f"granularity='group' needs a positive integer group_size, got {group_size!r}")


def valid_group_sizes(in_features: int) -> list[int]:
    """Divisors of ``in_features`` that are at least 8: the group sizes that would work."""
    return [g for g in range(8, in_features + 1) if in_features % g == 0]


def check_shape(shape: torch.Size | tuple, granularity: str, group_size: int | None, name: str = "tensor") -> None:
    """Check that a weight of ``shape`` can be grouped; the message names the layer and the fix.

    Raises:
        UserError: a group size that does not divide ``in_features``, or a 1-D weight with
            per-channel or per-group granularity.
    """
    check_granularity(granularity, group_size)
    if granularity in ("channel", "group") and len(shape) != 2:
        raise UserError(f"{name}: granularity={granularity!r} needs a 2-D weight (out, in), got shape {tuple(shape)}")
    if granularity == "group":
        in_features = shape[-1]
        if in_features % group_size:
            raise UserError(
                f"{name}: group_size={group_size} does not divide in_features={in_features}; "
                f"valid group sizes: {valid_group_sizes(in_features)} (or granularity='channel')"
            )


def group_view(x: torch.Tensor, granularity: str, group_size: int | None = None) -> torch.Tensor:
    """View ``x`` as ``(rows, n_groups, group)``; reductions over the last axis give one value per scale.

    Example:
        >>> group_view(torch.zeros(4, 64), "group", 32).shape
        torch.Size([4, 2, 32])
    """
    if granularity == "tensor":
        return x.reshape(1, 1, -1)
    if granularity == "channel":
        return x.reshape(x.shape[0], 1, -1)
    if granularity == "group":
        return x.reshape(x.shape[0], -1, group_size)
    if granularity == "token":
        return x.reshape(-1, 1, x.shape[-1])
    raise UserError(f"granularity={granularity!r} is not one of {GRANULARITIES}")


def param_shape(shape: torch.Size | tuple, granularity: str, group_size: int | None = None) -> tuple[int, int, int]:
    """Shape ``(rows, n_groups, 1)`` of the per-scale parameters for a weight of ``shape``."""
    if granularity == "tensor":
        return (1, 1, 1)
    if granularity == "channel":
        return (shape[0], 1, 1)
    if granularity == "group":
        return (shape[0], shape[-1] // group_size, 1)
    raise UserError(f"granularity={granularity!r} has no fixed parameter shape (it depends on the input); "
                    "per-weight parameters take granularity 'tensor', 'channel' or 'group'")
