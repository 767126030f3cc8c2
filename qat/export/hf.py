"""Dense 16-bit export: a ``save_pretrained`` directory that plain transformers loads.

Every quantized layer is replaced by a plain layer holding its quantized weight (``to_float``:
eval rounding, Tequila's dead-zone bias folded into the layer bias), and the model is saved in its
16-bit dtype (``qat.export.precision``: float16 for a model trained in float32, bfloat16 for one
that works in bfloat16; ``unquantized_dtype="float32"`` keeps float32) with its config and tokenizer. Nothing qat-specific is needed to load it::

    AutoModelForCausalLM.from_pretrained(out_dir)

Precision: a weight ``(c - z) * s`` with a float16 scale ``s`` is a float16 value when
``|c - z| * s`` fits float16's 11-bit significand, i.e. exactly for ternary and for ``|c - z| <= 2``
whatever ``s``; wider codes round to the nearest float16 (relative error <= 2^-11). Folded biases
and unquantized tensors round to float16 as any float16 checkpoint does. In bfloat16 (8-bit
significand) the baked weights round too: use the packed or GGUF format for exact codes.

Architectures whose linear layers have no bias (Llama's) get one where Tequila needs it: the
config's ``attention_bias`` / ``mlp_bias`` switches are turned on and the layers without a folded
bias get zeros. An architecture with no such switch cannot hold the folded bias, and is refused.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from qat.convert import dequantize_
from qat.errors import UserError
from qat.export.precision import storage_dtype

BIAS_SWITCHES = ("attention_bias", "mlp_bias")  # config flags that give linear layers a bias


def save(model: nn.Module, tokenizer, tmp_dir: Path, unquantized_dtype: str | torch.dtype = "auto") -> dict:
    """Write a dense 16-bit copy of ``model`` (quantized weights baked in) with ``save_pretrained``.

    Args:
        model: a transformers model with quantized layers; it is not modified (a copy is saved).
        tokenizer: saved beside the model when not None.
        tmp_dir: an existing, empty directory.
        unquantized_dtype: the dtype of the saved copy (``qat.export.precision.storage_dtype``).

    Returns:
        ``{"architecture", "dtype", "layers"}`` for ``quant_config.json``.

    Raises:
        UserError: the model has no ``save_pretrained``, or it needs biases its architecture lacks.
    """
    if not hasattr(model, "save_pretrained"):
        raise UserError("the hf format saves with transformers' save_pretrained: the model has none; "
                        "export a transformers model (qat.models.load_model loads one)")
    from qat.convert import quantized_layers

    names = [n for n, _ in quantized_layers(model)]
    dense = dequantize_(copy.deepcopy(model))  # the copy has its own config: flags may change below
    _make_room_for_biases(dense)
    dtype = storage_dtype(model, unquantized_dtype)
    dense.to(dtype).save_pretrained(tmp_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp_dir)
    return {"architecture": type(model).__name__, "dtype": str(dtype).removeprefix("torch."), "layers": names}


def _make_room_for_biases(dense: nn.Module) -> None:
    """Switch on the config's bias flags if a folded bias has no place in the architecture; zero-fill the rest."""
    expected = _state_keys(type(dense), dense.config)
    ours = set(dense.state_dict())
    extra = ours - expected
    if not extra:
        return
    for flag in BIAS_SWITCHES:
        if getattr(dense.config, flag, None) is False:
            setattr(dense.config, flag, True)
    expected = _state_keys(type(dense), dense.config)
    if ours - expected:
        raise UserError(
            f"the hf format cannot represent this model: {type(dense).__name__} has no bias in "
            f"{sorted(ours - expected)[:3]} (Tequila's folded dead-zone bias goes there); use format='packed'"
        )
    for key in sorted(expected - ours):
        if key.endswith(".bias"):  # a layer the flag gave a bias that has nothing to fold: zeros
            layer = dense.get_submodule(key.rsplit(".", 1)[0])
            layer.bias = nn.Parameter(torch.zeros(layer.out_features, dtype=layer.weight.dtype))


def _state_keys(cls, config) -> set[str]:
    """State-dict keys of ``cls(config)``, built on the meta device (no memory, no initialisation)."""
    with torch.device("meta"):
        return set(cls(config).state_dict())
