"""The dtype an export stores a model's unquantized tensors in (embeddings, norms, biases, a float head).

A model trained in float32 (the CPU default) is still a 16-bit model to its users: its checkpoint
and every runtime hold the unquantized tensors in float16 or bfloat16. Keeping them in float32
doubles the largest part of a low-bit export (SmolLM2-135M's tied 49152 x 576 table is 113 MB in
float32, 57 MB in float16, against 25 MB of ternary codes). So exports store them in 16 bits by
default; quantized tensors (codes, scales, zero points, offsets, Tequila's bias) are untouched, and
their exactness contract holds whatever this says.

``"auto"`` picks the model's own 16-bit dtype: its working dtype where that is float16 or bfloat16,
else the dtype its config declares where that is one of them, else float16 (for weights in the
usual range float16 keeps 3 more significand bits than bfloat16). ``"float32"`` keeps float32.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from qat.errors import UserError

log = logging.getLogger(__name__)

CHOICES = ("auto", "float16", "bfloat16", "float32")
_SIXTEEN = (torch.float16, torch.bfloat16)


def storage_dtype(model: nn.Module, unquantized_dtype: str | torch.dtype = "auto") -> torch.dtype:
    """The dtype for ``model``'s unquantized floating-point tensors in an export.

    Args:
        model: the model being exported.
        unquantized_dtype: one of ``CHOICES`` (see the module docstring), or a torch dtype (returned as is).

    Raises:
        UserError: an unknown choice.

    Example:
        >>> storage_dtype(nn.Linear(2, 2))
        torch.float16
        >>> storage_dtype(nn.Linear(2, 2).bfloat16())
        torch.bfloat16
        >>> storage_dtype(nn.Linear(2, 2), "float32")
        torch.float32
    """
    if isinstance(unquantized_dtype, torch.dtype):
        return unquantized_dtype
    if unquantized_dtype not in CHOICES:
        raise UserError(f"unquantized_dtype must be one of {', '.join(CHOICES)}; got {unquantized_dtype!r}")
    if unquantized_dtype != "auto":
        return getattr(torch, unquantized_dtype)
    working = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    if working in _SIXTEEN:
        return working
    declared = getattr(getattr(model, "config", None), "dtype", None)
    declared = getattr(torch, declared, None) if isinstance(declared, str) else declared
    return declared if declared in _SIXTEEN else torch.float16


def cast(t: torch.Tensor, dtype: torch.dtype, name: str = "tensor") -> torch.Tensor:
    """``t`` in ``dtype`` if it is floating point and every finite value stays finite; else ``t`` as it is.

    A tensor whose values overflow ``dtype`` (float16's 65504) is kept as it was, with a warning.
    """
    if not t.is_floating_point() or t.dtype == dtype:
        return t
    out = t.to(dtype)
    if not torch.equal(torch.isfinite(out), torch.isfinite(t)):
        log.warning("%s does not fit %s (values up to %.3g): kept in %s", name, dtype, t.abs().max().item(), t.dtype)
        return t
    return out
