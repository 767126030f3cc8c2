"""Held-out metrics: perplexity of a causal LM on token blocks.

``ppl = exp(sum of token NLL / number of predicted tokens)``: every block predicts its tokens
1..L-1 from their prefixes (no context carried across blocks), the convention of lm-eval's
rolling windows without overlap. The sum runs in float64 so the result does not depend on the
batch size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, batch_size: int = 4) -> float:
    """Perplexity of ``model`` on ``blocks`` ``(n, seq_len)`` of token ids.

    The model runs in eval mode (restored afterwards) on its own device.

    Raises:
        ValueError: empty blocks or blocks shorter than 2 tokens.

    Example:
        >>> perplexity(model, token_blocks(tokenizer, text, 256)[-8:])  # doctest: +SKIP
        17.3
    """
    if blocks.ndim != 2 or blocks.shape[0] == 0 or blocks.shape[1] < 2:
        raise ValueError(f"blocks must be (n >= 1, seq_len >= 2) token ids, got shape {tuple(blocks.shape)}")
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
