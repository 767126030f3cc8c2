"""Saving and loading adapters: peft's adapter format for the LoRA modes, a small state file for scale-only.

A saved adapter directory holds:

* ``adapter_config.json`` and ``adapter_model.safetensors``: peft's format (``LoraConfig`` and the
  factors, keys ``base_model.model.<layer>.lora_A.weight``), for ``lora`` and ``l4q``. L4Q's
  trained quantizer parameters travel in the same file (``<layer>.lora_quantizer.*``): peft saves
  every tensor of a tuner layer except its base layer.
* ``loftq_init.safetensors`` when LoftQ moved the base (``W0 = W - c B A`` with LoftQ's factors),
  so a load rebuilds the same base from the original weights.
* ``scale_only.safetensors`` for scale-only tuning: the frozen codes and the trained scales.
* ``qat_adapter.json``: the mode, how to rebuild it, the targeted layers and a fingerprint of the
  base model they were trained on, checked before anything is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from qat.adapters.lora import ADAPTER, adapter_state, base_fingerprint
from qat.errors import UserError

META = "qat_adapter.json"
PEFT_PREFIX = "base_model.model."


def save_adapters(model: nn.Module, path: str | Path) -> Path:
    """Write the model's adapters to directory ``path`` (created if needed).

    Args:
        model: a model after an adapter mode's ``apply_`` (not yet merged).
        path: output directory.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        UserError: the model has no adapters.

    Example:
        >>> save_adapters(model, "outputs/run/adapter")  # doctest: +SKIP
    """
    from safetensors.torch import save_file

    state = adapter_state(model)
    if state is None:
        raise UserError("the model has no adapters to save: apply L4Q, LoRA or ScaleOnly first (or it was already merged)")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if state["config"] is not None:
        from peft import get_peft_model_state_dict

        tensors = get_peft_model_state_dict(model, adapter_name=ADAPTER, save_embedding_layers=False)
        save_file({PEFT_PREFIX + k: v.detach().contiguous() for k, v in tensors.items()}, path / "adapter_model.safetensors")
        config = state["config"]
        config.base_model_name_or_path = getattr(getattr(model, "config", None), "name_or_path", None)
        config.save_pretrained(str(path))
    else:
        tensors = {f"{name}.weight_quantizer.{k}": v.detach().contiguous() for name in state["targets"]
                   for k, v in model.get_submodule(name).weight_quantizer.state_dict().items()}
        save_file(tensors, path / "scale_only.safetensors")
    if state["loftq"]:
        factors = {}
        for name, (a, b) in state["loftq"].items():
            factors[f"{name}.lora_A"], factors[f"{name}.lora_B"] = a.contiguous(), b.contiguous()
        save_file(factors, path / "loftq_init.safetensors")
    meta = {k: state[k] for k in ("mode", "spec", "targets", "fingerprint")}
    (path / META).write_text(json.dumps(meta, indent=2))
    return path


def load_adapters(model: nn.Module, path: str | Path) -> nn.Module:
    """Rebuild the adapters saved in ``path`` on ``model`` (the same base, through the same ``quantize_``).

    Args:
        model: the base model, quantized as when the adapters were trained, without adapters.
        path: a directory written by ``save_adapters``.

    Returns:
        The same model with the adapters in place and their trained values loaded.

    Raises:
        UserError: ``path`` is not an adapter directory; the adapters were trained on another base
            model (layers, shapes or weights differ), or the model already has adapters.

    Example:
        >>> qat.quantize_(model, weight=...)  # the run's quant settings  # doctest: +SKIP
        >>> load_adapters(model, "outputs/run/adapter")  # doctest: +SKIP
    """
    from hydra.utils import get_class
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / META).is_file():
        raise UserError(f"{path} is not an adapter directory ({META} missing): pass the directory save_adapters wrote")
    meta = json.loads((path / META).read_text())
    _check_base(model, meta, path)
    spec = dict(meta["spec"])
    cls = get_class(spec.pop("_target_"))
    if meta["mode"] == "scale_only":
        cls(**spec).apply_(model)
        tensors = load_file(path / "scale_only.safetensors")
        _check_shapes(model.state_dict(), tensors, path)
        model.load_state_dict(tensors, strict=False)
        return model

    from peft import LoraConfig, set_peft_model_state_dict

    config = LoraConfig.from_pretrained(str(path))
    cls(config=config, **spec).apply_(model, loftq=False)
    if (path / "loftq_init.safetensors").is_file():
        from qat.adapters.loftq import shift_base_

        factors = load_file(path / "loftq_init.safetensors")
        for name in meta["targets"]:
            a, b = factors[f"{name}.lora_A"], factors[f"{name}.lora_B"]
            shift_base_(model.get_submodule(name), a, b, ADAPTER)
            model._qat_adapter["loftq"][name] = (a, b)
    tensors = load_file(path / "adapter_model.safetensors")
    expected = {PEFT_PREFIX + k.replace(f".{ADAPTER}.", ".").removesuffix(f".{ADAPTER}"): v for k, v in model.state_dict().items()}
    _check_shapes(expected, tensors, path)
    result = set_peft_model_state_dict(model, tensors, adapter_name=ADAPTER)
    if result.unexpected_keys:
        raise UserError(f"{path} holds tensors this model has no place for (e.g. {result.unexpected_keys[0]!r}): it was saved from another model")
    return model


def _check_base(model: nn.Module, meta: dict, path: Path) -> None:
    if adapter_state(model) is not None:
        raise UserError("the model already has adapters: load adapters into a freshly quantized model")
    names = dict(model.named_modules())
    missing = [n for n in meta["targets"] if n not in names]
    hint = "load them into the base model (and quant settings) they were trained on"
    if missing:
        raise UserError(f"the adapters in {path} were trained on another base model: it has no layer {missing[0]!r}; {hint}")
    try:
        fingerprint = base_fingerprint(model, meta["targets"])
    except AttributeError:
        raise UserError(f"the adapters in {path} target {meta['targets'][0]!r}, which is not a quantized linear layer here; {hint}") from None
    if fingerprint != meta["fingerprint"]:
        raise UserError(f"the adapters in {path} were trained on another base model (layer shapes or weights differ); {hint}")


def _check_shapes(expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], path: Path) -> None:
    for key, value in tensors.items():
        if key in expected and expected[key].shape != value.shape:
            raise UserError(
                f"{path}: {key} has shape {tuple(value.shape)} but the model expects {tuple(expected[key].shape)}: "
                "the adapters were saved from another base model or adapter config"
            )
