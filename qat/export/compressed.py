"""compressed-tensors export: int4 / int8, NVFP4, MXFP4 and FP8 weight-only checkpoints that vLLM serves.

The format (neuralmagic/compressed-tensors, ``PackedQuantizationCompressor``) stores, for every
quantized ``Linear`` called ``<name>``, in ``model.safetensors``::

    <name>.weight_packed      int32, the signed codes q + 2^(b-1) packed densely, b bits each
    <name>.weight_scale       (out, in / G) for groups, (out, 1) per channel, (1,) per tensor
    <name>.weight_zero_point  asymmetric grids only: zero points, signed, packed like the codes
    <name>.weight_shape       (out, in)

and ``config.json`` gets ``quantization_config`` (``quant_method: compressed-tensors``,
``format: pack-quantized``, one config group per distinct grid: ``num_bits``, ``type: int``,
``symmetric``, ``strategy`` group / channel / tensor, ``group_size``; ``ignore`` lists the
``Linear`` layers left in float, ``lm_head`` among them). Decompression is

    W = (q - z) * s        (z = 0 when symmetric), in the scale's dtype

Our grids map onto it exactly: symmetric codes ``q`` in [-8, 7] (2- to 4-bit, ternary) are
int4, in [-128, 127] int8, ``z = 0``; asymmetric codes ``c`` in [0, 2^b - 1] with zero point
``z`` are stored as ``c - 2^(B-1)`` and ``z - 2^(B-1)`` for the stored width ``B``
(``(c - z)`` is unchanged). vLLM's kernels serve widths 4 and 8 only, so 2- and 3-bit grids and
ternary are stored in int4 (exact; the report gives the stored bits per weight). Scales are kept
in float32 (``scale_dtype``), so the decompressed weights equal the fake-quant weights bitwise.
The other tensors (embeddings, norms, the head) are stored in the model's 16-bit dtype
(``qat.export.precision``) unless ``unquantized_dtype="float32"``.
Refused: LSQ+ offsets and half-integer zero points (SEQ 2-bit), which ``(q - z) * s`` cannot
express; Tequila's folded bias (a Llama ``Linear`` has no bias slot here); quantized embeddings
and activation quantization (weight-only ``Linear`` format).

The packing is the package's own: each layer's state goes through
``PackedQuantizationCompressor.compress`` (which re-derives the codes as
``round(W_hat / s) + z``, exact for these integer grids, and checked here against ours).

**Floating-point grids** (``qat.quantizers.FP4`` / ``FP8``) go into the package's FP schemes, one
config group each, written from our codes (bytes, not re-rounded values) and then decompressed by
the package's own compressor to check them bitwise (an export that would not is refused):

==================  ========================  ===================================================
our grid            format / scheme           tensors per layer
==================  ========================  ===================================================
FP4 ``nvfp4``       ``nvfp4-pack-quantized``  ``weight_packed`` uint8 (out, in/2): element 2j in the
                    (NVFP4A16: float 4-bit,   low nibble, 2j+1 in the high, sign-magnitude E2M1;
                    tensor_group, group 16)   ``weight_scale`` float8_e4m3fn (out, in/16), our
                                              E4M3 bytes; ``weight_global_scale`` float32 (1,) =
                                              ``1 / s_tensor``
FP4 ``mxfp4``       ``mxfp4-pack-quantized``  ``weight_packed`` as above; ``weight_scale`` uint8
                    (MXFP4A16: group 32)      (out, in/32), our E8M0 biased exponents
FP8 ``e4m3``        ``float-quantized``       ``weight`` float8_e4m3fn (our bytes); ``weight_scale``
                    (float 8-bit, channel or  float32 (out, 1) or (1,)
                    tensor)
==================  ========================  ===================================================

Decompression (``NVFP4PackedCompressor.decompress``, ``forward_helpers._dequantize``) is
``W = E2M1 * (E4M3 / global_scale)``: unpacked into bfloat16, the division and the product in
float32, the result cast to bfloat16. Our forward multiplies ``E2M1 * (E4M3 * s_tensor)`` in
float32. They are the same number because ``s_tensor`` is a power of two (``qat.fp_formats``):
``1 / s_tensor`` and ``E4M3 / global_scale`` are exact, and ``E2M1 * E4M3 * 2^k`` has at most six
significant bits, which bfloat16 holds. MXFP4 decompresses ``E2M1 * 2^(e - 127)`` (bfloat16),
exact likewise; FP8 ``fp8 * scale`` in float32, our product. A tensor scale that is not a power
of two (an NVFP4 checkpoint trained before qat rounded it) is refused. Refused as well: FP8 E5M2
(compressed-tensors' 8-bit float is E4M3), and activation quantization (NVFP4's activation scheme
wants a calibrated static global scale; ours is dynamic): the export is weight-only.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from qat.convert import iter_codes
from qat.errors import UserError
from qat.export.precision import cast, storage_dtype
from qat.nn.embedding import QuantEmbedding
from qat.nn.linear import QuantLinear
from qat.quantizers.base import Codes

log = logging.getLogger(__name__)

FILENAME = "model.safetensors"
FITS = (
    "pack-quantized holds (q - z) * s with integer zero points: use quant.weight.symmetric=true or false "
    "without an LSQ+ offset (MinMax, LSQ, LWC), bits 4 or 8 (2, 3 and ternary are stored as 4)"
)
_STRATEGY = {"group": "group", "channel": "channel", "tensor": "tensor"}


_FP_ARGS = {  # Codes.format -> (compression format, QuantizationArgs fields) of compressed-tensors' presets
    "nvfp4": ("nvfp4-pack-quantized", {"num_bits": 4, "type": "float", "symmetric": True, "strategy": "tensor_group",
                                       "group_size": 16, "scale_dtype": torch.float8_e4m3fn, "zp_dtype": torch.float8_e4m3fn}),
    "mxfp4": ("mxfp4-pack-quantized", {"num_bits": 4, "type": "float", "symmetric": True, "strategy": "group",
                                       "group_size": 32, "scale_dtype": torch.uint8, "zp_dtype": torch.uint8}),
    "fp8_e4m3": ("float-quantized", {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None,
                                     "scale_dtype": torch.float32}),
}


def compression_format(codes: Codes) -> str:
    """The compressed-tensors format that stores ``codes``: ``pack-quantized`` for integer grids."""
    return _FP_ARGS[codes.format][0] if codes.format in _FP_ARGS else "pack-quantized"


def _fp_args(codes: Codes, name: str) -> dict:
    if codes.format not in _FP_ARGS:
        raise UserError(f"{name}: compressed-tensors has no scheme for {codes.format} codes (its 8-bit float is E4M3): "
                        "use quant.weight.format=e4m3, or export as format=packed or hf")
    fields = dict(_FP_ARGS[codes.format][1])
    if codes.format == "fp8_e4m3":
        if codes.granularity not in ("channel", "tensor"):
            raise UserError(f"{name}: FP8 granularity {codes.granularity!r} is not a weight granularity; use channel or tensor")
        fields["strategy"] = codes.granularity
    if codes.tensor_scale is not None:
        s_t = codes.tensor_scale.float().reshape(-1)
        if not torch.equal(torch.frexp(s_t)[0], torch.full_like(s_t, 0.5)):
            raise UserError(
                f"{name}: the NVFP4 tensor scale {s_t[0].item():.6g} is not a power of two, so compressed-tensors' "
                "E4M3 / global_scale (decompressed in bfloat16) cannot equal the trained weights; re-initialise the "
                "quantizer with this qat (FP4.init_ rounds it to a power of two) or export as format=packed or hf"
            )
    return fields


def weight_args(codes: Codes, name: str = "layer") -> dict:
    """The compressed-tensors ``QuantizationArgs`` fields that hold ``codes`` exactly.

    Args:
        codes: a layer's ``Quantizer.codes(weight)``.
        name: the layer name, for messages.

    Returns:
        ``{"num_bits", "type", "symmetric", "strategy", "group_size", "scale_dtype"}``.

    Raises:
        UserError: an offset, a non-integer zero point, a folded bias, or codes wider than 8 bits;
            an FP grid without a scheme (FP8 E5M2) or an NVFP4 tensor scale that is not a power of
            two; the message says which settings would fit.

    Example:
        >>> from qat.quantizers import MinMax
        >>> q = MinMax(bits=4, granularity="group", group_size=32, symmetric=False)
        >>> weight_args(q.init_(torch.randn(8, 64)).codes(torch.randn(8, 64)))["symmetric"]
        False
    """
    if codes.format is not None:
        return _fp_args(codes, name)
    if codes.offset is not None:
        raise UserError(f"{name}: an LSQ+ offset is not expressible as (q - z) * s; {FITS}")
    if codes.bias is not None:
        raise UserError(
            f"{name}: Tequila's folded dead-zone bias has no place in a pack-quantized Llama Linear; "
            "export it as GGUF or in qat's packed format"
        )
    if codes.zero is not None and not torch.equal(codes.zero, codes.zero.round()):
        raise UserError(f"{name}: half-integer zero points (SEQ 2-bit) are not integer zero points; {FITS}")
    symmetric = codes.zero is None
    if symmetric:
        bits = 4 if codes.lo >= -8 and codes.hi <= 7 else 8 if codes.lo >= -128 and codes.hi <= 127 else None
    else:
        bits = 4 if codes.lo >= 0 and codes.hi <= 15 else 8 if codes.lo >= 0 and codes.hi <= 255 else None
    if bits is None:
        raise UserError(f"{name}: codes in [{codes.lo}, {codes.hi}] need more than 8 bits; {FITS}")
    if codes.granularity not in _STRATEGY:
        raise UserError(f"{name}: granularity {codes.granularity!r} is not a weight granularity; {FITS}")
    return {
        "num_bits": bits,
        "type": "int",
        "symmetric": symmetric,
        "strategy": _STRATEGY[codes.granularity],
        "group_size": codes.group_size,
        "scale_dtype": torch.float32,
    }


def _layer_state(codes: Codes, shape: tuple[int, int], args: dict) -> dict[str, torch.Tensor]:
    """``weight``, ``weight_scale`` (and ``weight_zero_point``) in compressed-tensors' shapes and conventions."""
    out = shape[0]
    if codes.granularity == "tensor":
        scale = codes.scale.reshape(1)
    else:
        scale = codes.scale.reshape(out, -1)
    state = {"weight": codes.dequantize().reshape(shape), "weight_scale": scale.float().contiguous()}
    if codes.zero is not None:
        # compressed-tensors' int grids are signed: codes and zero points both shift by 2^(B-1).
        zero = codes.zero.reshape(scale.shape) - (1 << (args["num_bits"] - 1))
        state["weight_zero_point"] = zero.to(torch.int8).contiguous()
    return state


def _compress(name: str, codes: Codes, shape: tuple[int, int], scheme) -> dict[str, torch.Tensor]:
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    args = scheme.weights
    state = _layer_state(codes, shape, args.model_dump())
    packed = PackedQuantizationCompressor.compress(state, scheme)
    offset = 0 if codes.zero is None else (1 << (args.num_bits - 1))
    stored = unpack_from_int32(packed["weight_packed"], args.num_bits, torch.Size(shape)).to(torch.int16) + offset
    if not torch.equal(stored, codes.codes.reshape(shape).to(torch.int16)):  # a guard on the library's rounding
        raise RuntimeError(f"{name}: compressed-tensors packed codes that differ from the quantizer's")
    return packed


def _fp_state(codes: Codes, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
    """The tensors compressed-tensors' FP scheme stores for ``codes`` (module docstring), from our bytes."""
    out = shape[0]
    c = codes.codes.reshape(shape).to(torch.uint8)
    if codes.format == "fp8_e4m3":
        scale = codes.scale.float().reshape(1) if codes.granularity == "tensor" else codes.scale.float().reshape(out, 1)
        return {"weight": c.view(torch.float8_e4m3fn).contiguous(), "weight_scale": scale.contiguous()}
    state = {"weight_packed": (c[:, 0::2] | (c[:, 1::2] << 4)).contiguous()}
    scale_codes = codes.scale_codes.reshape(out, -1).to(torch.uint8).contiguous()
    if codes.format == "nvfp4":
        state["weight_scale"] = scale_codes.view(torch.float8_e4m3fn)
        state["weight_global_scale"] = (1.0 / codes.tensor_scale.float()).reshape(1).contiguous()  # exact: a power of two
    else:
        state["weight_scale"] = scale_codes
    return state


def decompressor(fmt: str):
    """compressed-tensors' compressor class registered for format ``fmt`` (its ``decompress`` reads our tensors)."""
    from compressed_tensors.compressors.base import BaseCompressor

    return BaseCompressor.get_value_from_registry(fmt)


def _compress_fp(name: str, codes: Codes, shape: tuple[int, int], scheme) -> dict[str, torch.Tensor]:
    state = _fp_state(codes, shape)
    w = decompressor(compression_format(codes)).decompress(dict(state), scheme)["weight"]
    if not torch.equal(w.float(), codes.dequantize().reshape(shape)):  # the package's own reading, checked
        raise UserError(
            f"{name}: compressed-tensors decompresses these {codes.format} codes to other values than the trained "
            f"weights (its {w.dtype} cannot hold them, e.g. scales below 2^-100); export as format=packed or hf"
        )
    return state


def _groups(layers: dict[str, tuple[Codes, tuple[int, int]]]) -> dict[tuple, list[str]]:
    """Layer names by stored grid and trained width (a 3-bit grid stored as int4 gets its own group)."""
    by_args = defaultdict(list)
    for name, (codes, _) in layers.items():
        args = weight_args(codes, name)
        by_args[(math.ceil(codes.bits), compression_format(codes), *sorted((k, str(v)) for k, v in args.items()))].append(name)
    return by_args


@torch.no_grad()
def save(model: nn.Module, tokenizer, tmp_dir: Path, unquantized_dtype: str | torch.dtype = "auto") -> dict:
    """Write ``config.json`` (with ``quantization_config``), ``model.safetensors`` and the tokenizer.

    Args:
        model: a transformers causal LM whose ``Linear`` layers ``qat.quantize_`` quantized (adapters
            merged). Not modified.
        tokenizer: saved alongside when not None.
        tmp_dir: an existing directory to write into.
        unquantized_dtype: the dtype of the tensors outside quantized layers (``qat.export.precision``).

    Returns:
        ``{"format": "compressed-tensors", "file": "model.safetensors", "bytes",
        "config_groups": {group: {"num_bits", "type", "symmetric", "strategy", "group_size", "format",
        "trained_bits", "layers"}}}``: ``num_bits`` is the stored width, ``trained_bits`` the grid's;
        ``format`` the group's compressed-tensors format (the file's is ``mixed-precision`` when
        they differ).

    Raises:
        UserError: no quantized layer, a grid the format cannot hold exactly (see ``weight_args``),
            a quantized embedding or activation quantizer.
        ImportError: compressed-tensors is not installed (``pip install 'qat[export]'``).

    Example:
        >>> save(model, tokenizer, Path("out"))["config_groups"]["group_0"]["num_bits"]  # doctest: +SKIP
        4
    """
    try:
        from compressed_tensors import __version__ as ct_version
        from compressed_tensors.compressors import ModelCompressor
        from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
    except ImportError as e:
        raise ImportError("the compressed-tensors export needs the compressed-tensors package: pip install 'qat[export]'") from e
    from safetensors.torch import save_file

    for name, m in model.named_modules():
        if isinstance(m, QuantEmbedding):
            raise UserError(f"{name}: pack-quantized quantizes Linear layers; keep the embeddings in float (exclude them)")
        if getattr(m, "act_quantizer", None) is not None:
            raise UserError(f"{name} quantizes its input activations; the pack-quantized export is weight-only: "
                            "export with activation quantization switched off")
    layers = {name: (codes, tuple(codes.codes.shape)) for name, _, codes in iter_codes(model)}
    if not layers:
        raise UserError("the model holds no quantized Linear layer: nothing to export as pack-quantized")

    grouped = list(_groups(layers).values())
    formats = {compression_format(layers[names[0]][0]) for names in grouped}
    mixed = len(formats) > 1
    groups, state, summary = {}, {}, {}
    for i, names in enumerate(grouped):
        first = layers[names[0]][0]
        fields = weight_args(first, names[0])
        # One grid for every quantized Linear: target the class; several: name each group's layers.
        targets = ["Linear"] if len(grouped) == 1 else names
        fmt = compression_format(first)
        scheme = QuantizationScheme(targets=targets, weights=QuantizationArgs(**fields), format=fmt if mixed else None)
        for name in names:
            codes, shape = layers[name]
            packed = _compress(name, codes, shape, scheme) if codes.format is None else _compress_fp(name, codes, shape, scheme)
            for k, v in packed.items():
                state[f"{name}.{k}"] = v.contiguous()
        trained = max(math.ceil(layers[n][0].bits) for n in names)
        if trained < fields["num_bits"]:
            log.warning("%d layers of %d-bit codes are stored as int%d (vLLM serves 4 and 8 bits)", len(names), trained, fields["num_bits"])
        groups[f"group_{i}"] = scheme
        summary[f"group_{i}"] = {k: fields[k] for k in ("num_bits", "type", "symmetric", "strategy", "group_size")} | {"format": fmt}
        summary[f"group_{i}"] |= {"trained_bits": trained, "layers": len(names)}

    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is not None and embed is not None and head.weight is embed.weight and not isinstance(head, QuantLinear)
    skip = {f"{n}.weight" for n, m in model.named_modules() if tied and m is head}  # save_pretrained drops tied heads
    for n in layers:
        skip |= {k for k in model.get_submodule(n).state_dict(prefix=n + ".") if k != f"{n}.bias"}
    dtype = storage_dtype(model, unquantized_dtype)
    for key, t in model.state_dict().items():
        if key not in skip:
            state[key] = cast(t.detach(), dtype, key).contiguous().clone()

    ignore = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in layers)
    qconfig = QuantizationConfig(
        config_groups=groups, format="mixed-precision" if mixed else formats.pop(), quantization_status="compressed", ignore=ignore
    )
    tmp_dir = Path(tmp_dir)
    save_file(state, tmp_dir / FILENAME, metadata={"format": "pt"})
    model.config.save_pretrained(tmp_dir)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(tmp_dir)
    ModelCompressor(quantization_config=qconfig).update_config(str(tmp_dir))
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp_dir)
    return {
        "format": "compressed-tensors",
        "compressed_tensors_version": ct_version,
        "file": FILENAME,
        "bytes": (tmp_dir / FILENAME).stat().st_size,
        "config_groups": summary,
    }
