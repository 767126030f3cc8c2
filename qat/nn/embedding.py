"""``QuantEmbedding``: an embedding table with a fake-quantized (weight-only) table.

The table is ``(num_embeddings, embedding_dim)``; groups run along ``embedding_dim``, one scale
per row (token) or per group of a row, as weight-only embedding quantization in llama.cpp and
torchao does. The original Parameter is shared, so tied output heads keep seeing the same tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qat.quantizers.base import Quantizer


class QuantEmbedding(nn.Embedding):
    """Embedding with a fake-quantized table.

    Example:
        >>> from qat.quantizers import MinMax
        >>> emb = QuantEmbedding.from_float(nn.Embedding(10, 32), MinMax(bits=4, granularity="channel"))
        >>> emb(torch.tensor([1, 2])).shape
        torch.Size([2, 32])
    """

    def __init__(self, source: nn.Embedding, weight_quantizer: Quantizer):
        nn.Module.__init__(self)
        for attr in ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse"):
            setattr(self, attr, getattr(source, attr))
        self.weight = source.weight
        self.weight_quantizer = weight_quantizer

    @classmethod
    def from_float(cls, module: nn.Embedding, weight_quantizer: Quantizer) -> QuantEmbedding:
        """Wrap ``module`` (sharing its table) and initialise the quantizer from it."""
        if not weight_quantizer._ready:
            weight_quantizer.init_(module.weight)
        return cls(module, weight_quantizer)

    def latent_weight(self) -> torch.Tensor:
        """The trainable table, ``(num_embeddings, embedding_dim)``, as the weight quantizer sees it."""
        return self.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        table = self.weight_quantizer(self.weight)
        return F.embedding(ids, table, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse)

    @torch.no_grad()
    def to_float(self) -> nn.Embedding:
        """A plain ``nn.Embedding`` holding the quantized table (eval rounding)."""
        training = self.training
        self.eval()
        try:
            table = self.weight_quantizer(self.weight).detach().clone()
        finally:
            self.train(training)
        out = nn.Embedding(self.num_embeddings, self.embedding_dim, self.padding_idx, device=table.device, dtype=table.dtype)
        out.weight = nn.Parameter(table)
        return out
