"""LoftQ: initialise LoRA factors so that the quantized base plus the adapter approximates the FP weight.

LoftQ (Li et al., "LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large Language Models",
arXiv 2310.08659; huggingface/peft ``utils/loftq_utils.py``)::

    B_0 A_0 = 0
    for t = 1..T:   Q_t = Q(W - c B_{t-1} A_{t-1})                 quantize what the adapter leaves
                    c B_t A_t = rank-r SVD of (W - Q_t)            B_t = U_r S_r^1/2 / sqrt(c),
                                                                   (randomized: see top_singular)
                                                                   A_t = S_r^1/2 V_r^T / sqrt(c)
    base W0 = W - c B_T A_T,   so that   Q(W0) + c B_T A_T ~ W   and   W0 + c B_T A_T = W exactly

Decisions:

* The quantizer is the layer's own (LSQ/LSQ+ re-initialised from each target, round-to-nearest for
  QLoRA-style bases), not peft's NormalFloat (bnb nf4 for 4 bits, NF with blocks of 64 otherwise):
  NF levels do not lie on our uniform grids, so peft's ``loftq_init`` cannot be used as is. The
  request is still declared the peft way, ``LoraConfig(init_lora_weights="loftq",
  loftq_config=LoftQConfig(loftq_bits=b, loftq_iter=T))``.
* peft assigns ``B = U S^1/2`` and ``A = S^1/2 V^T`` without dividing by ``c`` (ALGORITHMS.md's
  pitfall: W ~ Q + BA then holds only for ``lora_alpha = r``); here both are divided by
  ``sqrt(c)``, so ``W ~ Q + c B A`` for any alpha.
* The base latent becomes ``W0 = W - c B_T A_T`` and the quantizer is re-initialised on it: plain
  LoRA then starts from ``Q(W0) + c B A`` (LoftQ's approximation), and L4Q, whose joint forward is
  ``Q(W0 + c B A)``, starts from exactly ``Q(W)`` (its warm-up stage from LoftQ's approximation),
  with both factors already aligned with the quantization residual.
* The quantizer step re-initialises the quantizer from statistics (min/max), which is not an
  exact minimiser of the error (the SVD step is): on SmolLM2's 2-bit LSQ+ layers the error can rise
  again after 4-5 iterations. The iteration stops there and keeps the best iterate, so the error
  ``||W - Q(W0) - c B A||_F`` never grows with T (tested) and is below the ``B = 0`` error.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from qat.errors import UserError
from qat.quantizers.base import Quantizer


def _delta(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    return (b @ a) * scaling  # peft's get_delta_weight order (see qat.adapters.l4q)


@torch.no_grad()
def _quantize(quantizer: Quantizer, x: torch.Tensor) -> torch.Tensor:
    training = quantizer.training
    quantizer.eval()
    try:
        return quantizer(x).detach().float()
    finally:
        quantizer.train(training)


def top_singular(m: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``r`` leading singular triplets ``(U_r, S_r, V_r^T)`` of ``m``.

    Randomized (``torch.svd_lowrank``, 2r probes, 4 power iterations, a fixed seed that leaves the
    global generator alone) unless 2r reaches the smaller dimension: on SmolLM2's layers its rank-16
    residual is within 0.2% of the exact SVD's at a thirtieth of the cost, which makes LoftQ over
    210 layers take seconds rather than minutes.
    """
    probes = 2 * r
    if probes >= min(m.shape):
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        return u[:, :r], s[:r], vh[:r]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        u, s, v = torch.svd_lowrank(m, q=probes, niter=4)
    return u[:, :r], s[:r], v[:, :r].t()


@torch.no_grad()
def loftq(w: torch.Tensor, quantizer: Quantizer, r: int, scaling: float, iters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[float]]:
    """LoftQ's alternating quantize-and-SVD with ``quantizer`` (re-initialised on each target).

    Args:
        w: the FP weight ``(out, in)``.
        quantizer: the weight quantizer; left initialised on the returned base.
        r: adapter rank; scaling: ``lora_alpha / r``; iters: T >= 1.

    Returns:
        ``(w0, a, b, errors)``: the new base latent ``W - c B A``, the factors ``(r, in)`` and
        ``(out, r)``, and ``||W - Q(W0_t) - c B_t A_t||_F`` after each iteration t (the quantizer
        re-initialised on ``W0_t = W - c B_t A_t``); after an iteration that would raise the error
        the iteration stops and the best iterate's error fills the remaining entries.

    Raises:
        UserError: ``iters < 1`` or ``r`` above ``min(w.shape)``.

    Example:
        >>> from qat.quantizers import MinMax
        >>> w = torch.randn(64, 32)
        >>> w0, a, b, err = loftq(w, MinMax(bits=2, granularity="group", group_size=32), r=4, scaling=1.0, iters=2)
        >>> err[-1] < (w - MinMax(bits=2, granularity="group", group_size=32)(w)).norm().item()
        True
    """
    if iters < 1:
        raise UserError(f"LoftQ needs iters >= 1, got {iters}")
    if not 1 <= r <= min(w.shape):
        raise UserError(f"LoftQ rank r={r} must lie in [1, min{tuple(w.shape)}]")
    w = w.detach().float()
    ba = torch.zeros_like(w)
    errors: list[float] = []
    best = None
    for _ in range(iters):
        target = w - ba
        quantizer.init_(target)
        u, s, vh = top_singular(w - _quantize(quantizer, target), r)
        root = s.sqrt() / math.sqrt(scaling)
        b = (u * root).contiguous()
        a = (root[:, None] * vh).contiguous()
        ba = _delta(a, b, scaling)
        w0 = w - ba
        quantizer.init_(w0)
        error = (w - _quantize(quantizer, w0) - ba).norm().item()
        if best is not None and error > best[3]:
            break  # the statistics-based quantizer step is no exact minimiser: keep the best iterate
        best = (w0, a, b, error)
        errors.append(error)
    errors += errors[-1:] * (iters - len(errors))
    w0, a, b, _ = best
    quantizer.init_(w0)
    return w0, a, b, errors


@torch.no_grad()
def loftq_init_(layer: nn.Module, adapter_name: str, iters: int) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Run ``loftq`` on a peft LoRA layer over a ``QuantLinear``: set its factors, its base and its quantizer.

    Args:
        layer: a peft LoRA layer (``lora.Linear`` or ``L4QLinear``) whose base is a ``QuantLinear``.
        adapter_name: the adapter to initialise.
        iters: LoftQ iterations.

    Returns:
        ``(a, b, errors)``: the factors it set (kept by ``save_adapters`` so that a load rebuilds
        the same base) and the per-iteration errors.

    Example:
        >>> a, b, errors = loftq_init_(model.model.layers[0].self_attn.q_proj, "default", 2)  # doctest: +SKIP
    """
    base = layer.get_base_layer()
    A, B = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
    scaling = layer.scaling[adapter_name]
    w0, a, b, errors = loftq(base.latent_weight(), base.weight_quantizer, A.shape[0], scaling, iters)
    A.data.copy_(a.to(A.dtype))
    B.data.copy_(b.to(B.dtype))
    base.latent_weight().data.copy_(w0.to(base.weight.dtype))
    return a.clone(), b.clone(), errors


@torch.no_grad()
def shift_base_(layer: nn.Module, a: torch.Tensor, b: torch.Tensor, adapter_name: str) -> None:
    """Redo LoftQ's base change ``W0 = W - c B A`` from the factors ``loftq_init_`` returned (bitwise the same)."""
    base = layer.get_base_layer()
    w = base.latent_weight().detach().float()
    w0 = w - _delta(a.float(), b.float(), layer.scaling[adapter_name])
    base.latent_weight().data.copy_(w0.to(base.weight.dtype))
    base.weight_quantizer.init_(base.latent_weight().detach())
