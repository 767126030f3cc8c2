"""Training objectives and their held-out metric: what a step minimises and what a run reports.

``CausalLM``: next-token cross-entropy, optionally mixed with knowledge distillation from the
frozen FP model (Hinton et al., 2015)::

    loss = (1 - w) * CE(student) + w * T^2 * KL(softmax(teacher / T) || softmax(student / T))

Metric: perplexity on held-out blocks (``qat.metrics.perplexity``). ``chunk_tokens`` computes the
cross-entropy without the full logits in memory (``qat.lit.chunked_loss``).

``EmbeddingDistill``: sentence-embedding distillation for encoders (all-MiniLM-L6-v2): the
student's mean-pooled, L2-normalised embedding is pulled towards the FP teacher's,
``loss = 1 - cos(e_student, e_teacher)``. Metric: mean cosine similarity to the FP embeddings on
held-out sentences (1.0 for the FP model itself).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from qat.errors import UserError


class CausalLM:
    """Causal-LM loss with optional logit distillation.

    Args:
        kd_weight: weight ``w`` of the distillation term in [0, 1]; 0 trains on labels only.
        temperature: distillation temperature ``T`` > 0.
        chunk_tokens: compute the label loss ``chunk_tokens`` tokens of logits at a time under
            checkpointing (``qat.lit.chunked_loss``: a few hundred MB less per step at a 49k
            vocabulary, one extra head matmul); None materialises the full logits. Distillation
            needs the full logits and ignores it.

    Raises:
        UserError: ``kd_weight`` outside [0, 1], ``temperature <= 0`` or ``chunk_tokens <= 0``.
    """

    metric = "ppl"
    higher_is_better = False
    model_tasks = ("causal-lm",)  # the ``model.task`` values it trains (``qat.models.load_model``)

    def __init__(self, kd_weight: float = 0.0, temperature: float = 1.0, chunk_tokens: int | None = None):
        if chunk_tokens is not None and chunk_tokens <= 0:
            raise UserError(f"chunk_tokens={chunk_tokens} must be > 0, or null for the full logits")
        self.chunk_tokens = chunk_tokens
        if not 0 <= kd_weight <= 1:
            raise UserError(f"kd_weight={kd_weight} must lie in [0, 1]")
        if not temperature > 0:
            raise UserError(f"temperature={temperature} must be > 0")
        self.kd_weight, self.temperature = float(kd_weight), float(temperature)

    @property
    def needs_teacher(self) -> bool:
        return self.kd_weight > 0

    def __call__(self, model, batch, teacher=None) -> tuple[torch.Tensor, dict]:
        ids = batch["input_ids"]
        if self.chunk_tokens is not None and not self.needs_teacher:
            from qat.lit.chunked_loss import chunked_causal_lm_loss

            loss = chunked_causal_lm_loss(model, ids, self.chunk_tokens)
            return loss, {"ce": loss.detach()}
        out = model(input_ids=ids, labels=ids)
        logs = {"ce": out.loss.detach()}
        if not self.needs_teacher:
            return out.loss, logs
        with torch.no_grad():
            t_logits = teacher(input_ids=ids).logits
        kd = kd_loss(out.logits, t_logits, self.temperature)
        logs["kd"] = kd.detach()
        return (1 - self.kd_weight) * out.loss + self.kd_weight * kd, logs

    @torch.no_grad()
    def evaluate(self, model, batches, teacher=None) -> float:
        """Perplexity over all predicted tokens of ``batches`` (dicts with ``input_ids``)."""
        from qat.metrics import perplexity

        return perplexity(model, torch.cat([b["input_ids"] for b in batches]))


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(p_teacher || p_student)`` at temperature ``T``, averaged over tokens."""
    t = temperature
    s = F.log_softmax(student_logits.float() / t, dim=-1).flatten(0, -2)
    p = F.log_softmax(teacher_logits.float() / t, dim=-1).flatten(0, -2)
    return F.kl_div(s, p, log_target=True, reduction="batchmean") * t * t


def mean_pooled(model, batch) -> torch.Tensor:
    """Mean of the last hidden states over non-padding tokens, L2-normalised (sentence-transformers' pooling)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(out.dtype)
    return F.normalize((out * mask).sum(1) / mask.sum(1).clamp_min(1), dim=-1)


class EmbeddingDistill:
    """Cosine distillation of sentence embeddings from the FP teacher (needs a teacher)."""

    metric = "cos"
    higher_is_better = True
    model_tasks = ("embedding", "encoder")
    needs_teacher = True

    def __call__(self, model, batch, teacher=None) -> tuple[torch.Tensor, dict]:
        with torch.no_grad():
            target = mean_pooled(teacher, batch)
        cos = (mean_pooled(model, batch) * target).sum(-1)
        loss = (1 - cos).mean()
        return loss, {"cos": cos.mean().detach()}

    @torch.no_grad()
    def evaluate(self, model, batches, teacher=None) -> float:
        """Mean cosine similarity between ``model``'s and ``teacher``'s embeddings."""
        training = model.training
        model.eval()
        try:
            total, n = 0.0, 0
            for b in batches:
                cos = (mean_pooled(model, b) * mean_pooled(teacher, b)).sum(-1)
                total, n = total + cos.double().sum().item(), n + cos.numel()
        finally:
            model.train(training)
        if n == 0 or not math.isfinite(total):
            raise UserError("no held-out sentences to evaluate: the held-out batches are empty; check data.source and data.heldout_sentences")
        return total / n
