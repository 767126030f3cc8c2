"""``quantize_`` and ``dequantize_``: swap a model's layers for fake-quantized ones and back.

``quantize_`` validates everything first (patterns, dtypes, shapes, calibration data) and only
then swaps modules, so a bad argument raises before the model has changed at all.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from qat.errors import UserError
from qat.nn.embedding import QuantEmbedding
from qat.nn.linear import QuantLinear, is_conv1d
from qat.quantizers.base import Codes, Quantizer

Factory = Callable[[], Quantizer]
Rule = tuple[str, Mapping[str, Factory | None]]  # (glob pattern, {"weight" | "activation": factory or None})


def _as_patterns(patterns: str | Iterable[str] | None, what: str) -> tuple[str, ...]:
    if patterns is None:
        return ()
    if isinstance(patterns, str):
        return (patterns,)
    patterns = tuple(patterns)
    if not all(isinstance(p, str) for p in patterns):
        raise UserError(f"{what} must be a string or a list of strings (glob patterns over module names), got {patterns!r}")
    return patterns


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _output_head_names(model: nn.Module) -> set[str]:
    """Names of the output head (``get_output_embeddings()``), excluded unless asked for."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return set()
    return {name for name, m in model.named_modules() if m is head}


def _build(factory: Factory | None, what: str) -> Quantizer | None:
    if factory is None:
        return None
    q = factory()
    if not isinstance(q, Quantizer):
        raise UserError(f"the {what} factory must return a qat.quantizers.Quantizer, got {type(q).__name__}")
    return q


def quantize_(
    model: nn.Module,
    weight: Factory | None = None,
    activation: Factory | None = None,
    include: str | Iterable[str] = ("*",),
    exclude: str | Iterable[str] | None = None,
    embedding: Factory | None = None,
    rules: Sequence[Rule] = (),
) -> nn.Module:
    """Replace matching ``nn.Linear`` / ``Conv1D`` layers (and optionally embeddings) in place.

    Each factory is called once per layer (``functools.partial(LSQ, bits=4)`` or a Hydra node with
    ``_partial_: true``), so every layer gets its own quantizer. Weight quantizers are initialised
    from the weights here; activation quantizers on the first batch they see (see ``calibrate_``).

    Args:
        model: the model to change in place.
        weight: factory of the weight quantizer.
        activation: factory of the input-activation quantizer, or None for weight-only.
        include: glob patterns over module names (``fnmatch``, e.g. ``"model.layers.*.mlp.*"``).
        exclude: glob patterns to leave alone. None (the default) excludes the model's output head
            (``get_output_embeddings()``, tied to the embeddings in most LMs); pass ``()`` to
            quantize it too.
        embedding: factory of a weight quantizer for the model's input embedding
            (``get_input_embeddings()``, whatever ``include`` says) and for ``nn.Embedding``
            layers ``include`` matches, or None. An output head tied to a quantized embedding
            (the same weight Parameter) becomes a ``QuantLinear`` sharing the embedding's
            quantizer: one table, one set of codes, stored once by the exporters; name the head
            in ``exclude`` to keep it multiplying by the float table instead.
        rules: per-layer settings, an ordered list of ``(pattern, {"weight": factory, "activation":
            factory})``: a linear layer selected by include/exclude takes the factories of the first
            rule whose glob pattern matches its name (a key the rule leaves out keeps ``weight`` /
            ``activation``; a factory None leaves that part float, both None the whole layer).
            Mixed precision: ``[("model.layers.0.*", {"weight": w4}), ("*.mlp.*", {"weight": w2})]``.

    Returns:
        The same model.

    Raises:
        UserError: a pattern that matches no layer, no layer selected, a group size that does not
            divide a layer's ``in_features``, a model already quantized, NaN/inf in a weight, a
            factory that does not build a Quantizer, a non-floating-point weight, a rule whose
            pattern matches no selected layer or whose keys are not ``weight`` / ``activation``, an
            embedding quantizer that adds a bias (Tequila's dead zone: a lookup has no bias).

    Example:
        >>> from functools import partial
        >>> from qat.quantizers import LSQ
        >>> m = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
        >>> _ = quantize_(m, weight=partial(LSQ, bits=4, granularity="group", group_size=32))
        >>> type(m[0]).__name__
        'QuantLinear'
    """
    rules = list(rules)
    for pattern, parts in rules:
        if not isinstance(pattern, str) or not set(parts) <= {"weight", "activation"}:
            raise UserError(f"a rule is (glob pattern, {{'weight': factory, 'activation': factory}}), got ({pattern!r}, {dict(parts)!r})")
    if weight is None and activation is None and embedding is None and not rules:
        raise UserError("quantize_ needs at least one of weight=, activation= or embedding= (quantizer factories)")
    include = _as_patterns(include, "include")
    explicit_exclude = exclude is not None
    exclude = _as_patterns(exclude, "exclude")
    if not include:
        raise UserError("include is empty: pass glob patterns such as ('*',) or ('model.layers.*',)")

    already = [n for n, m in model.named_modules() if isinstance(m, (QuantLinear, QuantEmbedding))]
    if already:
        raise UserError(f"the model is already quantized ({len(already)} layers, e.g. {already[0]!r}): call dequantize_ first")

    linears = {n: m for n, m in model.named_modules() if n and (isinstance(m, nn.Linear) or is_conv1d(m))}
    embeddings = {n: m for n, m in model.named_modules() if n and isinstance(m, nn.Embedding)} if embedding else {}
    input_embedding = _input_embedding_names(model) & set(embeddings)
    candidates = {**linears, **embeddings}
    if not candidates:
        raise UserError("the model has no nn.Linear / Conv1D layers to quantize")

    for kind, patterns in (("include", include), ("exclude", exclude if explicit_exclude else ())):
        for p in patterns:
            if not any(fnmatch.fnmatchcase(n, p) for n in candidates):
                sample = ", ".join(list(candidates)[:5])
                raise UserError(f"{kind} pattern {p!r} matches no layer; layer names look like: {sample}, ...")
    skip = set() if explicit_exclude else _output_head_names(model)
    targets = [n for n in candidates if (_matches(n, include) or n in input_embedding) and not _matches(n, exclude) and n not in skip]
    if not targets:
        raise UserError(f"include={include} and exclude={exclude} leave no layer to quantize")
    for pattern, _ in rules:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in targets if n not in embeddings):
            raise UserError(f"rule pattern {pattern!r} matches no layer that include/exclude select; layer names look like: "
                            f"{', '.join(targets[:3])}, ...")

    # Build and initialise every quantizer before touching the model.
    plan = []
    for name in targets:
        module = candidates[name]
        w = module.weight
        if not torch.is_floating_point(w):
            raise UserError(f"{name}: weight has dtype {w.dtype}; only floating-point weights can be fake-quantized")
        is_emb = name in embeddings
        rule = {} if is_emb else next((parts for pattern, parts in rules if fnmatch.fnmatchcase(name, pattern)), {})
        wq = _build(embedding if is_emb else rule.get("weight", weight), "embedding" if is_emb else "weight")
        aq = None if is_emb else _build(rule.get("activation", activation), "activation")
        if wq is None and aq is None:
            continue  # a rule (or no weight= and activation=) leaves this layer float
        if wq is not None:
            latent = w if is_emb or not is_conv1d(module) else w.t()
            wq.check(latent.shape, name)
            if is_emb and wq.bias(latent[:1].detach(), torch.zeros_like(latent[:1])) is not None:
                raise UserError(f"{name}: the embedding quantizer {wq.extra_repr()} adds a per-row bias (Tequila's dead zone), "
                                "which a table lookup cannot add, nor a head tied to the table; quantize the embedding "
                                "without it (deadzone=null) or leave it float (embedding=None)")
            try:
                wq.init_(latent)
            except UserError as e:  # NaN/inf in the weight: name the layer
                raise UserError(f"{name}: {e}") from None
        plan.append((name, module, wq, aq, is_emb))

    plan = _tie_heads(model, plan, exclude)
    for name, module, wq, aq, is_emb in plan:
        new = QuantEmbedding.from_float(module, wq) if is_emb else QuantLinear.from_float(module, wq, aq)
        _set_module(model, name, new)
    return model


def _input_embedding_names(model: nn.Module) -> set[str]:
    get = getattr(model, "get_input_embeddings", None)
    try:
        emb = get() if callable(get) else None
    except NotImplementedError:
        return set()
    return {name for name, m in model.named_modules() if emb is not None and m is emb}


def _tie_heads(model: nn.Module, plan: list, exclude: tuple[str, ...]) -> list:
    """``plan`` where a head tied to a planned embedding shares that embedding's quantizer.

    The tied head multiplies by the same table the embedding looks up, so both see one quantized
    table (and an export stores its codes once). A head ``exclude`` names stays float.
    """
    tables = {id(module.weight): wq for _, module, wq, _, is_emb in plan if is_emb and wq is not None}
    heads = [n for n in _output_head_names(model) if not _matches(n, exclude)]
    for name in heads:
        head = model.get_submodule(name)
        wq = tables.get(id(getattr(head, "weight", None)))
        if wq is not None and isinstance(head, nn.Linear):
            plan = [entry for entry in plan if entry[0] != name] + [(name, head, wq, None, False)]
    return plan


def dequantize_(model: nn.Module) -> nn.Module:
    """Replace every ``QuantLinear`` / ``QuantEmbedding`` by a plain layer with the quantized weight baked in.

    Weights are rounded as in eval mode; Tequila's dead-zone bias folds into the layer bias;
    activation quantizers are dropped (a plain layer has no place for them).

    Raises:
        UserError: the model holds no quantized layer.
    """
    names = [n for n, m in model.named_modules() if isinstance(m, (QuantLinear, QuantEmbedding))]
    if not names:
        raise UserError("the model holds no QuantLinear / QuantEmbedding layer: nothing to dequantize")
    tables = {}  # (weight, quantizer) of each quantized embedding -> its plain replacement
    for name in names:
        layer = model.get_submodule(name)
        key = (id(layer.weight), id(layer.weight_quantizer))
        plain = layer.to_float()
        if isinstance(layer, QuantLinear) and key in tables:  # a head tied to a quantized embedding stays tied
            plain.weight = tables[key].weight
        if isinstance(layer, QuantEmbedding):
            tables[key] = plain
        _set_module(model, name, plain)
    return model


def quantized_layers(model: nn.Module) -> Iterator[tuple[str, QuantLinear | QuantEmbedding]]:
    """``(name, layer)`` for every quantized layer, in module order."""
    for name, m in model.named_modules():
        if isinstance(m, (QuantLinear, QuantEmbedding)):
            yield name, m


@torch.no_grad()
def iter_codes(model: nn.Module) -> Iterator[tuple[str, QuantLinear | QuantEmbedding, Codes]]:
    """``(name, layer, codes)`` for every quantized weight, in module order: what every exporter writes.

    ``codes`` is the weight quantizer's ``codes(W)`` of the layer's ``(out, in)`` latent weight
    (``latent_weight()``; an embedding's table), eval rounding: its ``dequantize()`` is the weight
    the layer computes with in eval mode, bitwise. Layers that quantize only their input
    activations have no weight codes and are skipped. One layer's codes are made at a time.

    Example:
        >>> from functools import partial
        >>> from qat.quantizers import MinMax
        >>> model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> _ = quantize_(model, weight=partial(MinMax, bits=4), include=["0"])
        >>> [(name, codes.codes.dtype, codes.scale.shape) for name, _, codes in iter_codes(model)]
        [('0', torch.int8, torch.Size([4, 1, 1]))]
    """
    for name, layer in quantized_layers(model):
        if layer.weight_quantizer is not None:
            yield name, layer, layer.weight_quantizer.codes(layer.latent_weight().detach())


@torch.no_grad()
def calibrate_(model: nn.Module, *batches) -> nn.Module:
    """Initialise every quantizer that has not seen data yet by running ``model(**batch)`` once per batch.

    Activation quantizers take their parameters from the first batch (LSQ's ``2 mean|x| /
    sqrt(hi)``, PACT's max); later batches only run the model. Runs in eval mode, then restores
    the previous mode.

    Example:
        >>> calibrate_(model, {"input_ids": ids})  # doctest: +SKIP
    """
    training = model.training
    model.eval()
    try:
        for batch in batches:
            model(**batch) if isinstance(batch, dict) else model(batch)
    finally:
        model.train(training)
    return model
