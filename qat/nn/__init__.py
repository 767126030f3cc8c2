"""Quantized modules: drop-in replacements that share the original Parameters."""

from qat.nn.embedding import QuantEmbedding
from qat.nn.linear import QuantLinear, is_conv1d

__all__ = ["QuantLinear", "QuantEmbedding", "is_conv1d"]
