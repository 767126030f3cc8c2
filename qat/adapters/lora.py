"""Plain LoRA beside a frozen quantized base (QLoRA-style), and the peft glue every LoRA mode shares.

QLoRA (Dettmers et al., arXiv 2305.14314), with our uniform grids instead of NF4::

    y = x @ Q(W0)^T + c * x @ A^T @ B^T        Q frozen (round-to-nearest), c = lora_alpha / r

peft does the LoRA part: ``QuantLinear`` subclasses ``nn.Linear``, so peft's own ``lora.Linear``
wraps it and calls it as its base layer. ``inject_`` is the shared entry (L4Q passes its own layer
class through peft's custom-module mapping): it checks what peft would accept silently or reject
with a generic message (targets that match nothing or match unquantized layers, a rank above a
layer's smaller dimension), injects with ``peft.inject_adapter_in_model`` (the model keeps its
class, forward and key names), runs LoftQ when the config asks for it, and leaves trainable only
the factors (and, for L4Q, the quantizer parameters).

Merging plain LoRA into a quantized base re-quantizes ``W0 + c B A``: the merged model differs
from the trained one by that rounding. This is QLoRA's known gap and the reason for L4Q.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Sequence

import lightning as L
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.constants import INCLUDE_LINEAR_LAYERS_SHORTHAND
from torch import nn

from qat.errors import UserError
from qat.nn.linear import QuantLinear

ADAPTER = "default"


def _quant_linears(model: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear) and m.weight_quantizer is not None}


def _rank_of(config: LoraConfig, name: str) -> int:
    for pattern, r in (config.rank_pattern or {}).items():
        if name == pattern or name.endswith("." + pattern):
            return int(r)
    return int(config.r)


def match_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Names of the quantized linear layers ``config.target_modules`` selects.

    Raises:
        UserError: the targets match no module, or match modules that are not quantized linear layers.
    """
    quantized = _quant_linears(model)
    if config.target_modules == INCLUDE_LINEAR_LAYERS_SHORTHAND:
        return list(quantized)
    matched = [n for n, _ in model.named_modules() if n and check_target_module_exists(config, n)]
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in quantized})
    if not matched:
        raise UserError(
            f"adapter target_modules={_show(config.target_modules)} match no layer of the model; the quantized layers "
            f"are named ...{', ...'.join(suffixes[:8])}: set adapter.config.target_modules to some of these"
        )
    plain = [n for n in matched if n not in quantized]
    if plain:
        raise UserError(
            f"adapter target_modules={_show(config.target_modules)} match {len(plain)} layer(s) that are not quantized "
            f"(e.g. {plain[0]!r}); adapters here sit on quantized layers: narrow target_modules to "
            f"{', '.join(suffixes[:8])} or widen quant.include"
        )
    return matched


def _show(targets) -> str:
    return repr(sorted(targets)) if isinstance(targets, (set, list, tuple)) else repr(targets)


def check_ranks(model: nn.Module, config: LoraConfig, names: Sequence[str]) -> None:
    """Raise UserError when a target's rank exceeds ``min(in_features, out_features)``."""
    for name in names:
        layer = model.get_submodule(name)
        r, limit = _rank_of(config, name), min(layer.in_features, layer.out_features)
        if r < 1:
            raise UserError(f"adapter rank r={r} must be >= 1")
        if r > limit:
            raise UserError(
                f"adapter rank r={r} is larger than min(in_features, out_features)={limit} of layer {name!r} "
                f"({layer.in_features} -> {layer.out_features}): a rank-r product B @ A cannot exceed it; "
                f"set adapter.config.r <= {limit}"
            )


def base_fingerprint(model: nn.Module, names: Sequence[str]) -> str:
    """A short hash of the targeted layers' names, shapes and first weight rows: ties an adapter to its base model."""
    h = hashlib.sha256()
    for name in names:
        w = model.get_submodule(name).latent_weight().detach()
        h.update(f"{name}:{tuple(w.shape)}".encode())
        h.update(w[:1].float().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def inject_(model: nn.Module, config: LoraConfig, mode: str, layer_cls: type | None = None, loftq: bool = True, spec: dict | None = None) -> nn.Module:
    """Add LoRA adapters declared by ``config`` to the quantized layers of ``model``, in place.

    Args:
        model: a model already passed through ``qat.quantize_``.
        config: the ``peft.LoraConfig``. ``init_lora_weights="loftq"`` runs ``qat.adapters.loftq``
            with the layer's own quantizer (``loftq_config["loftq_iter"]`` iterations).
        mode: the adapter mode's name, recorded for saving (``"lora"``, ``"l4q"``).
        layer_cls: a custom peft LoRA layer for ``QuantLinear`` bases (L4Q), or None for peft's own.
        loftq: run LoftQ when the config asks for it (``load_adapters`` passes False).
        spec: how to rebuild the mode (``_target_`` and its arguments), kept for ``load_adapters``.

    Returns:
        The same model, with only the adapter factors (and, for L4Q, quantizer parameters) trainable.

    Raises:
        UserError: ``config`` is not a ``LoraConfig``; the model already has adapters; targets that
            match nothing or unquantized layers; a rank above a layer's smaller dimension; LoftQ bits
            that differ from the quantizer's.

    Example:
        >>> inject_(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]), "lora")  # doctest: +SKIP
    """
    if not isinstance(config, LoraConfig):
        raise UserError(f"adapters are declared with a peft.LoraConfig, got {type(config).__name__}")
    if getattr(model, "_qat_adapter", None) is not None:
        raise UserError(f"the model already has {model._qat_adapter['mode']} adapters: merge_adapters_ it first")
    names = match_targets(model, config)
    check_ranks(model, config, names)
    if any(model.get_submodule(n).transposed for n in names):
        raise UserError("adapters on transformers' Conv1D layers (weights stored (in, out)) are not supported; target nn.Linear layers")
    iters = loftq_iterations(model, config, names) if loftq else 0
    fingerprint = base_fingerprint(model, names)
    cfg = copy.deepcopy(config)
    cfg.init_lora_weights = True  # LoftQ, when asked for, runs below with our quantizer (peft's is NF4)
    cfg.loftq_config = {}
    if layer_cls is not None:
        cfg._register_custom_module({QuantLinear: layer_cls})
    inject_adapter_in_model(cfg, model, adapter_name=ADAPTER)
    model.requires_grad_(False)
    for _, layer in _lora_layers(model):
        layer.lora_A[ADAPTER].weight.requires_grad_(True)
        layer.lora_B[ADAPTER].weight.requires_grad_(True)
    state = {"mode": mode, "config": config, "targets": names, "fingerprint": fingerprint, "loftq": {}, "spec": spec or {}}
    if iters:
        from qat.adapters.loftq import loftq_init_

        for name, layer in _lora_layers(model):
            a, b, _ = loftq_init_(layer, ADAPTER, iters)
            state["loftq"][name] = (a, b)
    model._qat_adapter = state
    return model


def loftq_iterations(model: nn.Module, config: LoraConfig, names: Sequence[str]) -> int:
    """LoftQ iterations the config asks for (0: none); checks its bits against the layers' quantizers."""
    if config.init_lora_weights != "loftq":
        return 0
    lq = config.loftq_config or {}
    iters = int(lq.get("loftq_iter", 1))
    bits = lq.get("loftq_bits")
    if bits is not None:
        for name in names:
            q = model.get_submodule(name).weight_quantizer
            if q.grid.bits != int(bits):
                raise UserError(
                    f"loftq_config.loftq_bits={bits} but layer {name!r} quantizes to {q.grid.bits} bits: LoftQ here "
                    f"uses the layer's own quantizer; set loftq_bits={q.grid.bits}"
                )
    if iters < 1:
        raise UserError(f"loftq_config.loftq_iter={iters} must be >= 1")
    return iters


def _lora_layers(model: nn.Module):
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


class LoRA:
    """Plain LoRA beside a frozen quantized base (QLoRA-style).

    ``apply_(model)`` replaces every weight quantizer by its round-to-nearest twin on the same grid
    (``Quantizer.rtn()``, unless ``rtn=False`` keeps the trained quantizers, e.g. of a finished QAT
    run), freezes them and injects peft's LoRA layers on the targets.

    Args:
        config: a ``peft.LoraConfig``; ``init_lora_weights="loftq"`` runs ``qat.adapters.loftq``.
        rtn: use round-to-nearest base quantizers (True) or keep the model's quantizers (False).

    Raises:
        UserError: see ``inject_``.

    Example:
        >>> qat.quantize_(model, weight=partial(LSQ, bits=3, granularity="group", group_size=64))  # doctest: +SKIP
        >>> LoRA(LoraConfig(r=16, lora_alpha=16, target_modules=["q_proj", "v_proj"])).apply_(model)  # doctest: +SKIP
    """

    mode = "lora"

    def __init__(self, config: LoraConfig, rtn: bool = True):
        self.config = config
        self.rtn = bool(rtn)

    def apply_(self, model: nn.Module, loftq: bool = True) -> nn.Module:
        if self.rtn:
            for layer in _quant_linears(model).values():
                layer.weight_quantizer = layer.weight_quantizer.rtn().init_(layer.latent_weight().detach())
        spec = {"_target_": "qat.adapters.lora.LoRA", "rtn": self.rtn}
        return inject_(model, self.config, self.mode, loftq=loftq, spec=spec)

    def callbacks(self) -> Sequence[L.Callback]:
        return []


def adapter_state(model: nn.Module) -> dict | None:
    """What ``inject_`` / ``ScaleOnly.apply_`` recorded on the model (mode, config, targets), or None."""
    return getattr(model, "_qat_adapter", None)

