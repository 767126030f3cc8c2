"""The packed format: bit-packed codes, float16 scales, and a model that runs from them.

An export directory holds::

    model.safetensors    per quantized layer NAME (a QuantLinear or QuantEmbedding):
                           NAME.qweight     uint8, the codes packed by qat.export.pack
                           NAME.scales      float16 (rows, n_groups)
                           NAME.zeros       integer zero points (rows, n_groups), narrowest exact dtype
                           NAME.offsets     float16 offsets (LSQ+), (rows, n_groups)
                           NAME.extra_bias  float32 (out,), Tequila's folded dead-zone bias
                         floating-point grids (``qat.fp_formats``; the codes index the format's
                         value table instead of ``(c - z) * s``):
                           NAME.qweight      the E2M1 (4-bit) or FP8 (8-bit) codes, packed as above
                           NAME.scale_codes  uint8 (rows, n_groups): FP4's block scales as stored,
                                             NVFP4 E4M3 bytes, MXFP4 E8M0 biased exponents
                           NAME.tensor_scale float32 (1,): NVFP4's tensor scale (a power of two)
                           NAME.scales       float32 (rows, 1): FP8's per-tensor/channel scales
                           NAME.bias        the layer's own bias, as it was
                         every other tensor of the model's state dict (tied copies once), floating
                         point ones in ``unquantized_dtype`` (the model's 16-bit dtype by default)
    quant_config.json    format, architecture, dtype (the working dtype ``load_packed`` restores),
                         unquantized_dtype and, per layer: kind, shape, bits (field width),
                         grid_bits, lo, hi, granularity, group_size, layout, padding (unused bits
                         at the end of the packed stream; unused trits for base3), zero, dtype,
                         format (``nvfp4``, ``mxfp4``, ``fp8_e4m3``, ``fp8_e5m2``; None for integer grids);
                         a head tied to a quantized embedding: kind linear, tied_to (the
                         embedding's name), no tensors of its own
    config.json, tokenizer files

Each layer's weight is rebuilt as ``Codes.dequantize()``, i.e. ``(c - z) * s + offset`` on the
grouped view in float32, the expression the quantizer's eval forward computes. Training rounds
scales and offsets to float16 (``qat.quantizers.fake_quant.to_export_precision``), so storing
them in float16 loses nothing and the rebuilt weight equals the fake-quantized weight bitwise;
``save`` checks this rather than assuming it. Ternary codes use the base-3 layout (1.6 bits per
weight) by default; other grids use ``ceil(log2(levels))``-bit fields.

Floating-point grids are rebuilt as ``table[c] * S`` (``Codes.dequantize``), with ``S`` from the
stored scale codes: NVFP4 ``E4M3(scale_codes) * tensor_scale``, MXFP4 ``2^(scale_codes - 127)``,
FP8 the float32 ``scales``: the products the forward multiplies by, so again bitwise (checked).
"""

from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from qat.convert import iter_codes, quantized_layers
from qat.errors import UserError
from qat.export.pack import pack, packed_numel, unpack
from qat.export.precision import cast, storage_dtype
from qat.fp_formats import E2M1, E4M3, E5M2
from qat.nn.embedding import QuantEmbedding
from qat.nn.linear import QuantLinear
from qat.quantizers.base import Codes, int_dtype

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
QUANT_CONFIG = "quant_config.json"
_PARTS = ("qweight", "scales", "zeros", "offsets", "extra_bias", "scale_codes", "tensor_scale")
_ELEMENTS = {"nvfp4": E2M1, "mxfp4": E2M1, "fp8_e4m3": E4M3, "fp8_e5m2": E5M2}  # Codes.format -> element format
_EMBEDDING_ATTRS = ("padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse")


# -- writing ---------------------------------------------------------------------------------------


def save(model: nn.Module, tokenizer, tmp_dir: Path, ternary_layout: str = "base3",
         unquantized_dtype: str | torch.dtype = "auto") -> dict:
    """Write ``model`` (with quantized layers) in the packed format into ``tmp_dir``.

    Args:
        model: a transformers model whose layers ``qat.quantize_`` swapped.
        tokenizer: saved beside the model when not None.
        tmp_dir: an existing, empty directory (``qat.export_`` renames it into place).
        ternary_layout: ``"base3"`` (5 codes per byte) or ``"bits"`` (4 per byte) for ternary grids.
        unquantized_dtype: the dtype of the floating-point tensors that are not part of a quantized
            layer: ``"auto"`` (the model's 16-bit dtype, see ``qat.export.precision``), ``"float16"``,
            ``"bfloat16"``, ``"float32"`` or a torch dtype. Quantized layers' tensors are not affected.

    Returns:
        The metadata ``qat.export_`` writes to ``quant_config.json``: architecture, dtype, layers.

    Raises:
        UserError: the model has no ``config`` (not a transformers model), or a quantizer whose
            scales are not float16 values (it did not train at export precision).
    """
    from safetensors.torch import save_file

    if not hasattr(model, "config") or not hasattr(model.config, "save_pretrained"):
        raise UserError("the packed format rebuilds a transformers model from its config: model has no .config")
    tensors, layers, skip = {}, {}, set()
    tables = {(id(m.weight), id(m.weight_quantizer)): n for n, m in quantized_layers(model) if isinstance(m, QuantEmbedding)}
    for name, _ in quantized_layers(model):
        skip.add(f"{name}.act_quantizer.")  # activation quantization is not exported (see pack_layer)
    for name, layer, codes in iter_codes(model):  # activation-only layers' weights stay plain tensors
        table = tables.get((id(layer.weight), id(layer.weight_quantizer))) if isinstance(layer, QuantLinear) else None
        if table is not None:  # a head tied to a quantized embedding (qat.quantize_ shares the quantizer): its codes once
            layers[name] = {"kind": "linear", "tied_to": table}
            skip |= {f"{name}.weight", f"{name}.weight_quantizer."}
            continue
        spec, parts = pack_layer(name, layer, codes, ternary_layout)
        layers[name] = spec
        tensors.update({f"{name}.{k}": v for k, v in parts.items()})
        skip |= {f"{name}.weight", f"{name}.weight_quantizer."}
    dropped = [n for n, spec in layers.items() if spec.get("activation_dropped")]
    if dropped:
        log.warning("activation quantization of %d layers (e.g. %s) is not part of the packed format (weights only)", len(dropped), dropped[0])
    plain_dtype = storage_dtype(model, unquantized_dtype)
    tensors.update(_plain_tensors(model, skip, plain_dtype))
    save_file(tensors, str(tmp_dir / WEIGHTS), metadata={"format": "pt"})
    config = copy.deepcopy(model.config)  # the user's model keeps its config as it was
    config.architectures = [type(model).__name__]
    config.save_pretrained(tmp_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp_dir)
    dtype = next(model.parameters()).dtype
    return {"architecture": type(model).__name__, "dtype": str(dtype).removeprefix("torch."),
            "unquantized_dtype": str(plain_dtype).removeprefix("torch."),
            "weights": WEIGHTS, "layers": layers}


def pack_layer(name: str, layer: QuantLinear | QuantEmbedding, codes: Codes, ternary_layout: str = "base3") -> tuple[dict, dict]:
    """``(spec, tensors)`` of one quantized layer: its ``codes`` (from ``iter_codes``) packed, its scales in float16.

    Raises:
        UserError: scales or offsets that float16 does not hold exactly.
    """
    embedding = isinstance(layer, QuantEmbedding)
    weight = layer.latent_weight()
    levels = codes.hi - codes.lo + 1
    bits = max(1, math.ceil(math.log2(levels)))
    layout = ternary_layout if levels == 3 else "bits"
    numel = codes.codes.numel()
    n_bytes = packed_numel(numel, bits, layout)
    spec = {
        "kind": "embedding" if embedding else "linear",
        "shape": list(codes.codes.shape),
        "dtype": str(weight.dtype).removeprefix("torch."),
        "bits": bits,
        "grid_bits": codes.bits,
        "lo": codes.lo,
        "hi": codes.hi,
        "granularity": codes.granularity,
        "group_size": codes.group_size,
        "layout": layout,
        "padding": 5 * n_bytes - numel if layout == "base3" else 8 * n_bytes - bits * numel,
        "zero": None,
        "format": codes.format,
    }
    if embedding:
        spec.update({a: getattr(layer, a) for a in _EMBEDDING_ATTRS})
    if not embedding and getattr(layer, "act_quantizer", None) is not None:
        spec["activation_dropped"] = True  # the packed format is weight-only
    if codes.format is not None:
        return spec, _fp_parts(name, codes, pack(codes.codes, bits, codes.lo, layout))
    parts = {"qweight": pack(codes.codes, bits, codes.lo, layout), "scales": _float16(codes.scale, name, "scales")}
    if codes.zero is not None:
        parts["zeros"] = _narrowest_exact(codes.zero.squeeze(-1))
        spec["zero"] = str(parts["zeros"].dtype).removeprefix("torch.")
    if codes.offset is not None:
        parts["offsets"] = _float16(codes.offset, name, "offsets")
    if codes.bias is not None:
        parts["extra_bias"] = codes.bias.detach().float().contiguous()
    return spec, parts


def _fp_parts(name: str, codes: Codes, qweight: torch.Tensor) -> dict[str, torch.Tensor]:
    """The stored tensors of a floating-point grid, checked to rebuild ``codes.scale`` bitwise."""
    if codes.format not in _ELEMENTS:
        raise UserError(f"{name}: the packed format does not know the floating-point format {codes.format!r}")
    if codes.scale_codes is not None:  # FP4: the block scales as their format stores them
        parts = {"qweight": qweight, "scale_codes": codes.scale_codes.squeeze(-1).to(torch.uint8).contiguous()}
        if codes.tensor_scale is not None:
            parts["tensor_scale"] = codes.tensor_scale.detach().float().reshape(1).contiguous()
    else:  # FP8: float32 scales (amax / 448 is no float16 value)
        parts = {"qweight": qweight, "scales": codes.scale.detach().float().squeeze(-1).contiguous()}
    if not torch.equal(_fp_scale(codes.format, parts), codes.scale.float()):
        raise UserError(f"{name}: the {codes.format} scales do not rebuild from their stored codes; the quantizer's codes() "
                        "must return scale = decode(scale_codes) (* tensor_scale), as qat's FP4 does")
    return parts


def _fp_scale(format: str, parts: dict[str, torch.Tensor | None]) -> torch.Tensor:
    """The float32 scale ``(rows, n_groups, 1)`` the forward multiplied by, from the stored tensors."""
    sc = parts.get("scale_codes")
    if sc is None:
        return parts["scales"].float().unsqueeze(-1)
    if format == "mxfp4":
        return sc.view(torch.float8_e8m0fnu).float().unsqueeze(-1)
    return sc.view(torch.float8_e4m3fn).float().unsqueeze(-1) * parts["tensor_scale"].float()

def _float16(t: torch.Tensor, name: str, what: str) -> torch.Tensor:
    half = t.squeeze(-1).half().contiguous()
    if not torch.equal(half.float(), t.squeeze(-1).float()):
        raise UserError(
            f"{name}: {what} are not float16 values, so a float16 export would not be exact; the quantizer "
            "must use qat.quantizers.fake_quant.to_export_precision (every qat quantizer does)"
        )
    return half


def _narrowest_exact(t: torch.Tensor) -> torch.Tensor:
    """``t`` in the first of uint8, int16, float16, float32 that holds every value exactly."""
    for dtype in (torch.uint8, torch.int16, torch.float16):
        info = torch.iinfo(dtype) if not dtype.is_floating_point else torch.finfo(dtype)
        if t.min() >= info.min and t.max() <= info.max and torch.equal(t.to(dtype).to(t.dtype), t):
            return t.to(dtype).contiguous()
    return t.float().contiguous()


def _plain_tensors(model: nn.Module, skip: set[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The state dict without ``skip`` (exact keys, or prefixes ending in '.'), tied tensors once,
    floating-point ones in ``dtype`` (None: as they are)."""
    prefixes = tuple(p for p in skip if p.endswith("."))
    out, views, storages = {}, set(), set()
    for key, t in model.state_dict().items():
        if key in skip or key.startswith(prefixes):
            continue
        storage = t.untyped_storage().data_ptr()
        view = (storage, t.storage_offset(), tuple(t.shape), t.stride())
        if view in views:
            continue  # tied (lm_head = embed_tokens): the model ties it again on load
        # safetensors refuses two tensors on one storage: a different view of a stored one is copied
        t = t.detach() if dtype is None else cast(t.detach(), dtype, key)
        out[key] = t.clone() if storage in storages else t.contiguous()
        views.add(view)
        storages.add(storage)
    return out


# -- reading ---------------------------------------------------------------------------------------


class _PackedWeight(nn.Module):
    """The packed tensors of one layer and the exact dequantization shared by linear and embedding."""

    def _init_packed(self, spec: dict, tensors: dict[str, torch.Tensor]) -> None:
        self.spec = spec
        self.shape = torch.Size(spec["shape"])
        self.weight_dtype = getattr(torch, spec["dtype"])
        for part in _PARTS:
            self.register_buffer(part, tensors.get(part))

    def codes(self) -> Codes:
        """The layer's integer codes and parameters, as the quantizer's ``codes()`` returned them."""
        sp = self.spec
        c = unpack(self.qweight, sp["bits"], sp["lo"], self.shape.numel(), sp["layout"])
        fmt = sp.get("format")
        if fmt is not None:
            parts = {p: getattr(self, p) for p in ("scales", "scale_codes", "tensor_scale")}
            return Codes(
                codes=c.reshape(self.shape).to(torch.uint8), scale=_fp_scale(fmt, parts), lo=sp["lo"], hi=sp["hi"],
                bits=sp["grid_bits"], granularity=sp["granularity"], group_size=sp["group_size"],
                table=_ELEMENTS[fmt].table(c.device), format=fmt, scale_codes=None if parts["scale_codes"] is None else parts["scale_codes"].unsqueeze(-1),
                tensor_scale=parts["tensor_scale"],
            )
        return Codes(
            codes=c.reshape(self.shape).to(int_dtype(sp["lo"], sp["hi"])),
            scale=self.scales.float().unsqueeze(-1),
            lo=sp["lo"],
            hi=sp["hi"],
            bits=sp["grid_bits"],
            granularity=sp["granularity"],
            group_size=sp["group_size"],
            zero=None if self.zeros is None else self.zeros.float().unsqueeze(-1),
            offset=None if self.offsets is None else self.offsets.float().unsqueeze(-1),
            bias=self.extra_bias,
        )

    def dequantized_weight(self) -> torch.Tensor:
        """``(c - z) * s (+ offset)`` in float32, then the original weight dtype: the fake-quant weight, bitwise."""
        return self.codes().dequantize().to(self.weight_dtype)


class PackedLinear(_PackedWeight):
    """A linear layer stored as packed codes; unpacks and dequantizes its weight at every forward.

    ``y = x @ W^T + bias (+ extra_bias)``, the order ``QuantLinear`` computes it in, with ``W`` from
    ``dequantized_weight()``. Built by ``load_packed``; the buffers are those of the export file.

    Example:
        >>> model = load_packed("outputs/run/export")  # doctest: +SKIP
        >>> model.model.layers[0].mlp.down_proj  # doctest: +SKIP
        PackedLinear(in_features=1536, out_features=576, bits=4, granularity='group', group_size=32)
    """

    def __init__(self, spec: dict, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None = None):
        super().__init__()
        self._init_packed(spec, tensors)
        self.out_features, self.in_features = self.shape
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantized_weight()
        y = F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        return y if self.extra_bias is None else y + self.extra_bias.to(y.dtype)

    def extra_repr(self) -> str:
        sp = self.spec
        s = f"in_features={self.in_features}, out_features={self.out_features}, bits={sp['bits']}, granularity={sp['granularity']!r}"
        return s + (f", group_size={sp['group_size']}" if sp["group_size"] else "")


class PackedEmbedding(_PackedWeight):
    """An embedding table stored as packed codes (the export of a ``QuantEmbedding``)."""

    def __init__(self, spec: dict, tensors: dict[str, torch.Tensor]):
        super().__init__()
        self._init_packed(spec, tensors)
        self.num_embeddings, self.embedding_dim = self.shape
        for attr in _EMBEDDING_ATTRS:
            setattr(self, attr, spec[attr])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        table = self.dequantized_weight()
        return F.embedding(ids, table, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse)


def load_packed(path: str | Path) -> nn.Module:
    """Rebuild a runnable transformers model from a packed export directory.

    The architecture class named in ``quant_config.json`` is built from the saved ``config.json``
    (without random initialisation), its quantized layers are replaced by ``PackedLinear`` /
    ``PackedEmbedding`` modules holding the packed tensors, and every other tensor is loaded into
    the model's working dtype (``dtype`` in ``quant_config.json``, e.g. float32 for a model trained
    in float32 whose unquantized tensors were stored in float16). The tokenizer, where one was exported, loads with ``AutoTokenizer.from_pretrained(path)``.

    Args:
        path: a directory written by ``qat.export_(model, path, format="packed")``.

    Returns:
        The model, in eval mode.

    Raises:
        UserError: no ``quant_config.json`` or weights file in ``path``, the directory holds another
            format, or its tensors do not match the architecture.

    Example:
        >>> model = qat.load_packed("outputs/run/export")  # doctest: +SKIP
        >>> model(input_ids).logits  # doctest: +SKIP
    """
    import transformers
    from safetensors.torch import load_file
    from transformers.initialization import no_init_weights

    from qat.convert import _set_module

    path = Path(path)
    meta = read_quant_config(path)
    if meta.get("format") != "packed":
        raise UserError(f"{path} holds a {meta.get('format')!r} export, not a packed one: load it with its own runtime")
    cls = getattr(transformers, meta["architecture"], None)
    if cls is None:
        raise UserError(f"{path}: transformers has no class {meta['architecture']!r} (installed version {transformers.__version__}); "
                        "install the transformers version that exported it")
    config = transformers.AutoConfig.from_pretrained(path)
    with no_init_weights():
        model = cls(config)
    model.to(getattr(torch, meta["dtype"]))
    model.tie_weights()  # before the swap: a tied head keeps its own Parameter if the embedding is packed
    weights = path / meta["weights"]
    if not weights.is_file():
        raise UserError(f"{weights} is missing: {path} is an incomplete export; export the model again")
    state = load_file(str(weights))
    packed = {}
    for name, spec in sorted(meta["layers"].items(), key=lambda kv: "tied_to" in kv[1]):
        if "tied_to" in spec:  # the head multiplies by the embedding's packed table: the same buffers
            table = {**meta["layers"][spec["tied_to"]], **spec}
            _set_module(model, name, PackedLinear(table, packed[spec["tied_to"]], state.pop(f"{name}.bias", None)))
            continue
        packed[name] = parts = {p: state.pop(f"{name}.{p}") for p in _PARTS if f"{name}.{p}" in state}
        if spec["kind"] == "embedding":
            _set_module(model, name, PackedEmbedding(spec, parts))
        else:
            _set_module(model, name, PackedLinear(spec, parts, state.pop(f"{name}.bias", None)))
    _load_plain(model, state, path)
    return model.eval()


def _load_plain(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    packed = {k for k, m in model.named_modules() if isinstance(m, _PackedWeight)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    own = model.state_dict()
    loaded = {own[k].data_ptr() for k in state}
    missing = [k for k in missing if k.rsplit(".", 1)[0] not in packed and own[k].data_ptr() not in loaded]
    if missing or unexpected:
        raise UserError(f"{path}: the weights do not match {type(model).__name__}: missing {missing[:5]}, unexpected {unexpected[:5]}; "
                        "the directory was changed after export: export the model again")


def requantize_(model: nn.Module) -> nn.Module:
    """Turn a ``load_packed`` model's packed layers back into ``QuantLinear`` / ``QuantEmbedding``, in place.

    Each gets its dequantized weight and a ``qat.quantizers.Frozen`` quantizer holding the packed
    codes (``Frozen(layer.codes())``), so ``export_`` can write the same codes in another format (hf, gguf, compressed-tensors).
    FP4 / FP8 layers are refused (``Frozen`` holds integer codes): export those from the trained checkpoint.

    Example:
        >>> export_(requantize_(load_packed("out/w4")), "out/w4-gguf", format="gguf")  # doctest: +SKIP
    """
    from qat.convert import _set_module
    from qat.quantizers.frozen import Frozen

    done = {}
    modules = sorted(((n, m) for n, m in model.named_modules() if isinstance(m, _PackedWeight)), key=lambda nm: "tied_to" in nm[1].spec)
    for name, m in modules:
        if "tied_to" in m.spec:  # a tied head: the embedding's weight and quantizer, as quantize_ built it
            emb = done[m.spec["tied_to"]]
            _set_module(model, name, QuantLinear(emb.weight, m.bias, emb.weight_quantizer))
            continue
        codes = m.codes()
        weight = nn.Parameter(m.dequantized_weight(), requires_grad=False)
        if isinstance(m, PackedEmbedding):
            table = nn.Embedding(m.num_embeddings, m.embedding_dim, m.padding_idx, _weight=weight)
            new = QuantEmbedding(table, Frozen(codes))
        else:
            new = QuantLinear(weight, m.bias, Frozen(codes))
        _set_module(model, name, new)
        done[name] = new
    return model


def read_quant_config(path: str | Path) -> dict:
    """The ``quant_config.json`` of an export directory.

    Raises:
        UserError: ``path`` is not an export directory.
    """
    file = Path(path) / QUANT_CONFIG
    if not file.is_file():
        raise UserError(f"{path} is not a qat export directory: it has no {QUANT_CONFIG}")
    return json.loads(file.read_text())


def size_report(path: str | Path) -> dict:
    """Sizes of a packed export against the theoretical size of its grids.

    ``theoretical = sum(grid_bits * n / 8) + 2 bytes per scale, zero point and offset + the extra
    bias (float32) + FP grids' scales as their format stores them (FP4 scale codes 1 byte, NVFP4's
    tensor scale and FP8's scales 4) + every unquantized tensor as stored``, with ``grid_bits`` the grid's information
    (log2(3) for ternary). ``bits_per_weight`` counts the codes, scales, zeros, offsets and extra bias
    of the quantized layers per quantized weight.

    Example:
        >>> size_report("out/w4")["bits_per_weight"]  # doctest: +SKIP
        4.5
    """
    from safetensors import safe_open

    path = Path(path)
    meta = read_quant_config(path)
    file = path / meta["weights"]
    sizes = {}
    with safe_open(str(file), "pt") as f:
        for key in f.keys():
            sl = f.get_slice(key)
            itemsize = torch.empty(0, dtype=_SAFETENSORS_DTYPES[sl.get_dtype()]).element_size()
            sizes[key] = (math.prod(sl.get_shape()), itemsize)
    n_weights = layer_bytes = ideal = 0
    for name, spec in meta["layers"].items():
        if "tied_to" in spec:
            continue  # the embedding's codes, counted once
        numel = math.prod(spec["shape"])
        n_weights += numel
        ideal += spec["grid_bits"] * numel / 8
        for part in _PARTS:
            if f"{name}.{part}" in sizes:
                n, itemsize = sizes.pop(f"{name}.{part}")
                layer_bytes += n * itemsize
                ideal += 0 if part == "qweight" else n * (2 if part in ("scales", "zeros", "offsets") and not spec.get("format") else itemsize)
    plain = sum(n * itemsize for n, itemsize in sizes.values())
    file_bytes = file.stat().st_size
    return {
        "file_bytes": file_bytes,
        "theoretical_bytes": round(ideal + plain),
        "ratio": file_bytes / (ideal + plain),
        "bits_per_weight": 8 * layer_bytes / max(n_weights, 1),
        "quantized_weights": n_weights,
        "unquantized_bytes": plain,
    }


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
