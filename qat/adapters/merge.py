"""``merge_adapters_``: fold every adapter into its layer, leaving ordinary quantized layers.

After the merge the model holds ``QuantLinear`` layers only, so export, ``dequantize_`` and
``qat-eval`` treat it like any QAT model:

* L4Q: ``W0 += c * B @ A`` (peft's ``merge``), quantizer = the trained LSQ+ quantizer. The output
  equals the trained L4Q model's bitwise (same expression, same rounding).
* plain LoRA beside a quantized base: the same fold, so ``W0 + c B A`` is re-quantized by the base
  quantizer: the merged model differs from the trained one by that rounding (QLoRA's gap).
* scale-only: each ``ScaleOnlyLinear`` becomes a ``QuantLinear`` whose frozen latent weight is the
  dequantized codes and whose quantizer is the ``qat.quantizers.Frozen`` (``codes()`` returns them unchanged).
"""

from __future__ import annotations

import torch
from torch import nn

from qat.adapters.scale_only import ScaleOnlyLinear
from qat.convert import _set_module


@torch.no_grad()
def merge_adapters_(model: nn.Module) -> nn.Module:
    """Merge L4Q / LoRA adapters and scale-only layers into plain ``QuantLinear`` layers, in place.

    A model without adapters is returned unchanged, so exporters may call this on any model.

    Args:
        model: a model after ``L4Q`` / ``LoRA`` / ``ScaleOnly`` ``apply_`` (and training).

    Returns:
        The same model object, with the adapter layers replaced.

    Example:
        >>> merge_adapters_(model)  # doctest: +SKIP
        >>> qat.quantized_layers(model)  # QuantLinear layers, export-ready  # doctest: +SKIP
    """
    from peft.tuners.lora import LoraLayer

    for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]:
        layer.merge()
        _set_module(model, name, layer.get_base_layer())
    for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, ScaleOnlyLinear)]:
        _set_module(model, name, layer.to_quant_linear())
    for attr in ("_qat_adapter", "peft_config"):
        if attr in model.__dict__:
            delattr(model, attr)
    return model
