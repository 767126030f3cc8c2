"""``QuantLinear``: a linear layer whose weight (and optionally input) is fake-quantized.

``y = A(x) @ Q(W)^T + bias (+ Q.bias(W))``, with ``Q`` the weight quantizer, ``A`` an optional
activation quantizer and ``Q.bias`` the extra term some quantizers add (Tequila's dead-zone bias).

The layer keeps the original ``weight`` and ``bias`` Parameters (``from_float`` shares them, no
copy), so optimizers, tied weights and checkpoints see the same tensors before and after
``quantize_``. It subclasses ``nn.Linear`` so that libraries that look for linear layers (peft's
LoRA among them) wrap it like any other. transformers' ``Conv1D`` (GPT-2), which stores its
weight as ``(in, out)``, is handled by quantizing the transposed view, so groups always run
along ``in_features``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qat.quantizers.base import Quantizer


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' ``Conv1D`` (a linear layer with a transposed weight)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


class QuantLinear(nn.Linear):
    """Linear layer with fake-quantized weight and optional fake-quantized input.

    Args:
        weight: the ``(out, in)`` weight Parameter (``(in, out)`` when ``transposed``).
        bias: the bias Parameter or None.
        weight_quantizer: a ``qat.quantizers.Quantizer`` for the weight, or None.
        act_quantizer: a quantizer for the input activations, or None.
        transposed: the weight is stored ``(in, out)`` (transformers' ``Conv1D``).

    Example:
        >>> from qat.quantizers import LSQ
        >>> layer = QuantLinear.from_float(nn.Linear(64, 8), LSQ(bits=4, granularity="group", group_size=32))
        >>> layer(torch.randn(2, 64)).shape
        torch.Size([2, 8])
    """

    def __init__(self, weight, bias=None, weight_quantizer=None, act_quantizer=None, transposed=False):
        nn.Module.__init__(self)
        self.transposed = transposed
        self.out_features, self.in_features = weight.shape[::-1] if transposed else weight.shape
        self.weight = weight
        self.bias = bias
        self.weight_quantizer = weight_quantizer
        self.act_quantizer = act_quantizer

    @classmethod
    def from_float(cls, module: nn.Module, weight_quantizer: Quantizer | None, act_quantizer: Quantizer | None = None) -> QuantLinear:
        """Wrap an ``nn.Linear`` or ``Conv1D``, sharing its Parameters; initialise the weight quantizer."""
        transposed = is_conv1d(module)
        layer = cls(module.weight, module.bias, weight_quantizer, act_quantizer, transposed)
        if weight_quantizer is not None and not weight_quantizer._ready:
            weight_quantizer.init_(layer.latent_weight())
        return layer

    def latent_weight(self) -> torch.Tensor:
        """The trainable weight as ``(out, in)`` (a view for ``Conv1D``)."""
        return self.weight.t() if self.transposed else self.weight

    def quantized_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(Q(W), extra_bias)``: the fake-quantized ``(out, in)`` weight and the quantizer's bias term."""
        w = self.latent_weight()
        if self.weight_quantizer is None:
            return w, None
        w_hat = self.weight_quantizer(w)
        return w_hat, self.weight_quantizer.bias(w, w_hat)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w_hat, extra = self.quantized_weight()
        if self.act_quantizer is not None:
            x = self.act_quantizer(x)
        y = F.linear(x, w_hat.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        return y if extra is None else y + extra.to(y.dtype)

    @torch.no_grad()
    def to_float(self) -> nn.Module:
        """A plain ``nn.Linear`` (or ``Conv1D``) with the quantized weight baked in (eval rounding).

        The extra bias (Tequila) folds into the layer's bias. Activation quantization has no
        place in a plain layer and is dropped.
        """
        training = self.training
        self.eval()
        try:
            w_hat, extra = self.quantized_weight()
        finally:
            self.train(training)
        bias = self.bias.detach().clone() if self.bias is not None else None
        if extra is not None:
            bias = extra.detach().to(w_hat.dtype) if bias is None else bias + extra.to(bias.dtype)
        w_hat = w_hat.detach().to(self.weight.dtype)
        if self.transposed:
            from transformers.pytorch_utils import Conv1D

            out = Conv1D(self.out_features, self.in_features)
            out.weight = nn.Parameter(w_hat.t().contiguous())
        else:
            out = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device=w_hat.device, dtype=w_hat.dtype)
            out.weight = nn.Parameter(w_hat.contiguous())
        if bias is not None:
            out.bias = nn.Parameter(bias)
        elif self.transposed:
            out.bias = None
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}" + (
            ", transposed" if self.transposed else ""
        )
