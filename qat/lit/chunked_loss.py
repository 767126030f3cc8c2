"""Chunked causal-LM cross-entropy: the loss without the full vocabulary-wide logits in memory.

A causal LM's loss materialises ``logits = h W_head^T`` for every token: ``N x V`` floats (4 x 256
tokens x 49,152 SmolLM2 vocabulary = 201 MB in float32), then its log-softmax (as much again) and,
in the backward, its gradient. At a small model's batch that is a third of the activations a step
keeps. Here the final hidden states ``h`` (``N x d``, ``d = 576``) are split into chunks of
``chunk`` tokens; each chunk's logits and cross-entropy are computed under activation
checkpointing, so only one chunk's ``chunk x V`` logits exist at a time and the backward
recomputes them chunk by chunk (one extra head matmul per step)::

    L = (1 / |valid|) sum_c sum_{t in c} -log softmax(h_t W_head^T)[y_t]

with ``y_t`` the next token and ``|valid|`` the tokens whose label is not ``ignore_index``. The
value equals ``F.cross_entropy`` over the full logits up to float summation order; the gradients
of ``h`` and ``W_head`` likewise. The same idea as Liger-Kernel's fused linear cross-entropy
(Hsu et al., arXiv 2410.10989), in plain PyTorch so it runs on CPU.

Works for decoder models whose logits are ``lm_head(decoder(ids).last_hidden_state)`` with no
post-processing (Llama, SmolLM2, Qwen2, Mistral); models that cap or scale their logits
(``final_logit_softcapping``, ``logit_scale``) are refused with a clear error. The decoder and head
are called separately, so use it on an unwrapped model (DDP is fine: the LightningModule is
wrapped, not the model; FSDP's root-module hooks are bypassed, so not under FSDP).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from qat.errors import UserError

IGNORE_INDEX = -100


def _chunk_ce(head: torch.nn.Module, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = head(h).float()
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")


def check_chunkable(model) -> None:
    """Raise ``UserError`` when ``model``'s logits are not a plain head over the decoder's output."""
    config = getattr(model, "config", None)
    extras = [k for k in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale") if getattr(config, k, None) not in (None, 1, 1.0)]
    if extras:
        raise UserError(f"{type(model).__name__} post-processes its logits ({', '.join(extras)}): chunked loss would differ; set objective.chunk_tokens=null")
    if not hasattr(model, "get_decoder") or model.get_output_embeddings() is None:
        raise UserError(f"{type(model).__name__} has no decoder / output head pair; set objective.chunk_tokens=null")


def chunked_causal_lm_loss(model, input_ids: torch.Tensor, chunk: int, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy of ``model`` on ``input_ids``, ``chunk`` tokens of logits at a time.

    Args:
        model: a transformers causal LM (``get_decoder()`` and ``get_output_embeddings()``).
        input_ids: ``(batch, seq)`` token ids; labels are the ids shifted by one.
        chunk: tokens per chunk (> 0); the peak logits memory is ``chunk x vocab`` floats.
        attention_mask: optional padding mask; padded positions are not predicted.

    Returns:
        The scalar loss, equal to ``model(input_ids, labels=input_ids).loss`` up to summation order.
    """
    if chunk <= 0:
        raise UserError(f"chunk={chunk} tokens must be > 0")
    check_chunkable(model)
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    head = model.get_output_embeddings()
    labels = input_ids[:, 1:]
    if attention_mask is not None:
        labels = labels.masked_fill(attention_mask[:, 1:] == 0, IGNORE_INDEX)
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    valid = (labels != IGNORE_INDEX).sum()
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, h.shape[0], chunk):
        h_c, y_c = h[start : start + chunk], labels[start : start + chunk]
        if torch.is_grad_enabled() and h_c.requires_grad:
            total = total + checkpoint(_chunk_ce, head, h_c, y_c, use_reentrant=False)
        else:
            total = total + _chunk_ce(head, h_c, y_c)
    return total / valid.clamp_min(1)
