"""Which parameters of a model are weights, quantizer parameters or adapter factors.

A parameter's role is decided by the module that owns it, never by its name:

* ``quant``: owned by a ``qat.quantizers.Quantizer`` (step sizes, offsets, clipping bounds,
  Tequila's bias scale, PEQA's scales); L4Q registers its layer's quantizer a second time on the
  adapter layer, and it stays ``quant`` there;
* ``adapter``: inside one of the adapter sub-modules a peft tuner layer declares as its own
  (``BaseTunerLayer.adapter_layer_names``: LoRA's ``lora_A`` / ``lora_B``, and any tuner peft adds);
* ``weights``: everything else (the model's own linear, embedding and norm parameters).

The optimizer groups of ``QATModule`` (learning rate per role), the roles ``ZOModule`` moves and
the perturbation kinds of ``qat.zo`` all read this one mapping, so renaming an attribute cannot
move a parameter to another group.

    >>> import torch
    >>> from torch import nn
    >>> from qat.quantizers import LSQ
    >>> layer = nn.Linear(4, 2)
    >>> layer.weight_quantizer = LSQ(bits=4)
    >>> _ = layer.weight_quantizer(layer.weight)  # initialises its step from the weight
    >>> parameter_roles(layer)
    {'weight': 'weights', 'bias': 'weights', 'weight_quantizer.scale': 'quant'}
"""

from __future__ import annotations

from torch import nn

ROLES = ("weights", "quant", "adapter")


def parameter_roles(model: nn.Module) -> dict[str, str]:
    """``{qualified name: role}`` for every parameter of ``model`` (the names of ``named_parameters()``)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from qat.quantizers.base import Quantizer

    role: dict[int, str] = {}
    for module in model.modules():
        if isinstance(module, Quantizer):
            role.update((id(p), "quant") for p in module.parameters())
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            for attr in module.adapter_layer_names:
                sub = getattr(module, attr, None)
                if isinstance(sub, nn.Module):
                    for p in sub.parameters():
                        role.setdefault(id(p), "adapter")
    return {name: role.get(id(p), "weights") for name, p in model.named_parameters()}


def quantizer_tensors(model: nn.Module) -> list:
    """The parameters and buffers of every quantizer in ``model``, each once (what ranks must agree on)."""
    from qat.quantizers.base import Quantizer

    seen: dict[int, object] = {}
    for module in model.modules():
        if isinstance(module, Quantizer):
            for t in [*module.parameters(), *module.buffers()]:
                seen.setdefault(id(t), t)
    return list(seen.values())
