"""Held-out metrics: perplexity of a causal LM on token blocks, and the share of the gap recovered.

``ppl = exp(sum of token NLL / number of predicted tokens)``: every block predicts its tokens
1..L-1 from their prefixes (no context carried across blocks), the convention of lm-eval's
rolling windows without overlap. The sum runs in float64 so the result does not depend on the
batch size.

Gap recovered (torchao's "recovers 96% of hellaswag degradation", EfficientQAT, ParetoQ): the
share of what round-to-nearest quantization lost that QAT wins back, against a reference
(the FP model, or the FP model fine-tuned with the same data and steps)::

    perplexity (log scale, as the cross-entropy it is):  (log ppl_ptq - log ppl_qat) / (log ppl_ptq - log ppl_ref)
    accuracy, cosine (linear):                          (acc_qat - acc_ptq) / (acc_ref - acc_ptq)

1 recovers the whole gap, 0 none, above 1 passes the reference, below 0 is worse than PTQ.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from qat.errors import UserError


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, batch_size: int = 4) -> float:
    """Perplexity of ``model`` on ``blocks`` ``(n, seq_len)`` of token ids.

    The model runs in eval mode (restored afterwards) on its own device.

    Raises:
        UserError: empty blocks or blocks shorter than 2 tokens.

    Example:
        >>> perplexity(model, token_blocks(tokenizer, text, 256)[-8:])  # doctest: +SKIP
        17.3
    """
    if blocks.ndim != 2 or blocks.shape[0] == 0 or blocks.shape[1] < 2:
        raise UserError(f"blocks must be (n >= 1, seq_len >= 2) token ids, got shape {tuple(blocks.shape)}")
    device = next(model.parameters()).device
    training = model.training
    model.eval()
    nll, count = 0.0, 0
    try:
        for i in range(0, blocks.shape[0], batch_size):
            ids = blocks[i : i + batch_size].to(device)
            logits = model(input_ids=ids).logits[:, :-1].float()
            target = ids[:, 1:]
            nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum").double().item()
            count += target.numel()
    finally:
        model.train(training)
    return math.exp(nll / count)


def gap_recovered(ptq: float, qat: float, ref: float, log: bool = True) -> float | None:
    """Share of the quantization gap ``ptq -> ref`` that ``qat`` recovers (module docstring).

    Args:
        ptq, qat, ref: the metric of round-to-nearest, of the trained model and of the reference.
        log: compare logarithms (perplexities) rather than the values (accuracies).

    Returns:
        The share, or None where it is undefined: no gap (``ptq == ref``), a missing or
        non-finite value, or a non-positive perplexity.

    Example:
        >>> round(gap_recovered(ptq=40.0, qat=20.0, ref=10.0), 3)
        0.5
        >>> round(gap_recovered(ptq=0.25, qat=0.40, ref=0.45, log=False), 3)
        0.75
    """
    values = (ptq, qat, ref)
    if any(v is None or not math.isfinite(v) for v in values) or (log and min(values) <= 0):
        return None
    if log:
        ptq, qat, ref = (math.log(v) for v in values)
    if ptq == ref:
        return None
    return (ptq - qat) / (ptq - ref) + 0.0  # + 0.0: no -0.0 when nothing moved
