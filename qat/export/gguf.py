"""GGUF export: a llama-architecture model as one ``model.gguf`` file that llama.cpp runs.

Every quantized layer is written from its codes and scales (``Quantizer.codes``), never
re-quantized, into the ggml block type that holds that grid exactly (ggml-quants.c layouts):

=========  ========  ==========================================  ===================================
type       block     bytes per block                             value
=========  ========  ==========================================  ===================================
Q4_0       32        fp16 d, 16 bytes: element j in the low       d * (n - 8),  n in 0..15
                     nibble of byte j, element j + 16 in the high
Q8_0       32        fp16 d, 32 int8                              d * n,        n in -128..127
TQ2_0      256       64 bytes of 2-bit n + 1, fp16 d              d * n,        n in {-1, 0, 1}
TQ1_0      256       48 + 4 bytes of base-3 trits, fp16 d         d * n,        n in {-1, 0, 1}
MXFP4      32        1 byte E8M0 e, 16 bytes: element j in the     (2^(e-127) / 2) * (2 * E2M1[n]),
                     low nibble of byte j, j + 16 in the high      n in 0..15 (bit 3 the sign)
=========  ========  ==========================================  ===================================

Our symmetric codes ``q`` with a float16-exact scale ``s`` map as ``n = q + 8, d = s`` (Q4_0) or
``n = q, d = s`` (Q8_0, TQ*), so llama.cpp's ``d * (n - 8)`` (or ``d * n``) is the same float32
product as our ``q * s``: the dequantized file equals the fake-quant weights bitwise. A block
needs one scale, so the scale must be constant over each 32 (Q4_0/Q8_0) or 256 (TQ*) weights
along ``in``: group sizes that are multiples of 32 (for 256-blocks, per-channel or per-tensor
scales with ``in % 256 == 0``). The narrowest type that holds the codes is chosen: ternary codes
in TQ2_0 (2.06 bits per weight) or TQ1_0 (1.69) where 256-blocks fit, else Q4_0 (a ternary
group of 64 is two Q4_0 blocks sharing ``d``); 2- to 4-bit symmetric codes in Q4_0; 5- to 8-bit
in Q8_0. Grids no ggml type holds exactly are refused: zero points (asymmetric), LSQ+ offsets,
scales that change inside a block, scales that are not float16 values.

MXFP4 (``qat.quantizers.FP4("mxfp4")``) maps one to one: our block is ggml's block of 32, our E8M0
scale code (biased exponent ``e``) is its scale byte, our sign-magnitude E2M1 code its nibble.
ggml (``ggml_e8m0_to_fp32_half``, ``kvalues_mxfp4``; gguf-py's ``quants.MXFP4``) multiplies half
the scale by doubled E2M1 values: both factors are exact powers of two times small integers, so
the float32 product is ours, ``E2M1[n] * 2^(e-127)``, bitwise (also for ``e = 0``, where the half
scale 2^-128 is a float32 subnormal). The one difference is the sign of zero: code 8 (-0) reads
back as +0. Refused: NVFP4, whose FP32 tensor scale GGUF's NVFP4 type has no place for (gguf-py's
``quants.NVFP4`` decodes ``E4M3 * E2M1`` only), and FP8 (no ggml type).

Layout conventions (llama.cpp ``convert_hf_to_gguf.py``, ``LlamaModel``): tensor names come from
gguf-py's ``TensorNameMap``; the rows of ``q_proj`` and ``k_proj`` are permuted back to the GGUF
rotary layout, the inverse of transformers' ``LlamaTensorProcessor._reverse_permute_weights``
(rows are whole output channels and groups run along ``in``, so codes, scales and biases are
permuted together). Tequila's folded bias (plus any layer bias) is written as the optional
``blk.N.{attn_q,attn_k,attn_v,attn_output,ffn_gate,ffn_up,ffn_down}.bias`` tensors, which
llama.cpp's llama graph adds (``src/models/llama.cpp``, ``create_tensor_qkv``). Other matrices (an
unquantized embedding or head) are stored in the model's 16-bit dtype, F16 or BF16
(``qat.export.precision``), as ``convert_hf_to_gguf.py --outtype f16`` does; vectors (norms, biases)
stay F32, as llama.cpp wants them. With ``unquantized_dtype="float32"`` a matrix is F16 only where
that is exact, else F32. The tokenizer and hyperparameters are
copied from the GGUF file the model was loaded from (``qat.models`` records it), so llama.cpp
tokenizes exactly as the original file does.
"""

from __future__ import annotations

import functools
import json
import logging
from collections import Counter
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from torch import nn

from qat.convert import iter_codes, quantized_layers
from qat.errors import UserError
from qat.export.precision import cast, storage_dtype
from qat.nn.embedding import QuantEmbedding
from qat.quantizers.base import Codes

log = logging.getLogger(__name__)

FILENAME = "model.gguf"
TERNARY_TYPES = ("TQ2_0", "TQ1_0")
FITS = (
    "GGUF holds symmetric grids with float16 scales shared by blocks of 32 weights: use "
    "quant.weight.symmetric=true (no LSQ+ offset), granularity=group with group_size 32 or a "
    "multiple of it (or channel/tensor), bits 4 or 8 (2 and 3 are stored as 4), or ternary"
)
_FILE_TYPE = {
    T.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
    T.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
    T.TQ1_0: gguf.LlamaFileType.MOSTLY_TQ1_0,
    T.TQ2_0: gguf.LlamaFileType.MOSTLY_TQ2_0,
    T.MXFP4: gguf.LlamaFileType.MOSTLY_MXFP4_MOE,  # llama.cpp's only MXFP4 file type (a label; every tensor keeps its own type)
}
_BLOCK = {qt: gguf.GGML_QUANT_SIZES[qt][0] for qt in _FILE_TYPE}


def ggml_type(codes: Codes, in_features: int, ternary: str = "TQ2_0", name: str = "layer") -> T:
    """The ggml block type that holds ``codes`` exactly.

    Args:
        codes: the layer's ``Quantizer.codes(weight)``.
        in_features: the weight's row length.
        ternary: ``"TQ2_0"`` or ``"TQ1_0"``, the type for ternary rows that split into 256-blocks.
        name: the layer name, for messages.

    Raises:
        UserError: no ggml type holds the grid; the message says which settings would fit.

    Example:
        >>> from qat.quantizers import LSQ
        >>> q = LSQ(bits=4, granularity="group", group_size=32).init_(torch.randn(8, 64))
        >>> ggml_type(q.codes(torch.randn(8, 64)), 64).name
        'Q4_0'
    """
    if ternary not in TERNARY_TYPES:
        raise UserError(f"ternary={ternary!r} is not one of {TERNARY_TYPES}")
    if codes.format is not None:
        return _fp_type(codes, in_features, name)
    if codes.zero is not None:
        raise UserError(f"{name}: an asymmetric grid (zero point) has no exact GGUF type; {FITS}")
    if codes.offset is not None:
        raise UserError(f"{name}: an LSQ+ offset has no exact GGUF type; {FITS}")
    scale = codes.scale
    if not torch.equal(scale.half().float(), scale):
        raise UserError(
            f"{name}: scales are not float16 values, and GGUF blocks store float16 scales; train "
            "with float16-rounded scales (qat's quantizers do) or re-initialise the quantizer"
        )
    candidates = []
    if codes.lo >= -1 and codes.hi <= 1:
        candidates.append(T[ternary])
    if codes.lo >= -8 and codes.hi <= 7:
        candidates.append(T.Q4_0)
    if codes.lo >= -128 and codes.hi <= 127:
        candidates.append(T.Q8_0)
    for qt in candidates:
        if _constant_per_block(codes, in_features, _BLOCK[qt]):
            return qt
    if in_features % _BLOCK[T.Q4_0]:
        raise UserError(f"{name}: in_features={in_features} does not split into 32-weight ggml blocks; {FITS}")
    raise UserError(
        f"{name}: the scale changes inside a 32-weight ggml block "
        f"(granularity={codes.granularity!r}, group_size={codes.group_size}); {FITS}"
    )


def _fp_type(codes: Codes, in_features: int, name: str) -> T:
    if codes.format == "mxfp4" and codes.group_size == _BLOCK[T.MXFP4] and in_features % _BLOCK[T.MXFP4] == 0:
        return T.MXFP4
    if codes.format == "nvfp4":
        raise UserError(
            f"{name}: NVFP4 has an FP32 tensor scale that GGUF's NVFP4 type does not store (its blocks decode to "
            "E4M3 * E2M1 alone); export NVFP4 as format=compressed-tensors (vLLM) or packed, or train with "
            "quant.weight.format=mxfp4 for llama.cpp"
        )
    raise UserError(f"{name}: GGUF (ggml) has no type for {codes.format} codes: export them as format=packed or hf")


def pack_mxfp4(q: np.ndarray, e: np.ndarray) -> np.ndarray:
    """MXFP4 blocks from E2M1 codes ``q`` in 0..15 ``(out, in)`` and E8M0 scale bytes ``e`` ``(out, in // 32)``."""
    out, in_features = q.shape
    n = q.astype(np.uint8).reshape(out, in_features // 32, 2, 16)
    qs = n[:, :, 0, :] | (n[:, :, 1, :] << np.uint8(4))
    return np.concatenate([e.astype(np.uint8).reshape(out, -1, 1), qs], axis=-1).reshape(out, -1)


def _constant_per_block(codes: Codes, in_features: int, block: int) -> bool:
    if in_features % block:
        return False
    if codes.granularity == "group":
        return codes.group_size % block == 0
    return codes.granularity in ("channel", "tensor")


def block_scales(codes: Codes, shape: tuple[int, int], block: int) -> np.ndarray:
    """The float16 scale of every ``block`` weights along ``in``, shape ``(out, in // block)``."""
    out, in_features = shape
    s = codes.scale.cpu().reshape(codes.scale.shape[0], -1)  # (rows, n_groups)
    per_row = s.expand(out, s.shape[1]) if s.shape[0] == 1 else s
    per_block = per_row.repeat_interleave(in_features // block // per_row.shape[1], dim=1)
    return per_block.numpy().astype(np.float16)


def pack_q4_0(q: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Q4_0 blocks from codes ``q`` in [-8, 7] ``(out, in)`` and scales ``d`` ``(out, in // 32)`` float16."""
    out, in_features = q.shape
    n = (q.astype(np.int16) + 8).astype(np.uint8).reshape(out, in_features // 32, 2, 16)
    qs = n[:, :, 0, :] | (n[:, :, 1, :] << np.uint8(4))
    return np.concatenate([d.reshape(out, -1, 1).view(np.uint8), qs], axis=-1).reshape(out, -1)


def pack_q8_0(q: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Q8_0 blocks from codes ``q`` in [-128, 127] ``(out, in)`` and scales ``d`` ``(out, in // 32)`` float16."""
    out, in_features = q.shape
    qs = q.astype(np.int8).view(np.uint8).reshape(out, in_features // 32, 32)
    return np.concatenate([d.reshape(out, -1, 1).view(np.uint8), qs], axis=-1).reshape(out, -1)


def pack_ternary(q: np.ndarray, d: np.ndarray, qtype: T) -> np.ndarray:
    """TQ2_0 / TQ1_0 blocks from codes ``q`` in {-1, 0, 1} ``(out, in)`` and scales ``d`` ``(out, in // 256)``.

    gguf-py's quantizer packs the trits (its base-3 layout is llama.cpp's, bit for bit): given
    the codes themselves it finds ``d = max|q| = 1`` and ``round(q / d) = q``; the block's last
    two bytes, ``d``, are then set to our scale.
    """
    out = q.shape[0]
    blocks = gguf.quants.quantize(q.astype(np.float32), qtype).reshape(out, d.shape[1], -1).copy()
    blocks[..., -2:] = d.reshape(out, -1, 1).view(np.uint8)
    return blocks.reshape(out, -1)


_PACK = {T.Q4_0: pack_q4_0, T.Q8_0: pack_q8_0}


def encode(codes: Codes, shape: tuple[int, int], qtype: T, permute_heads: int | None = None) -> np.ndarray:
    """The ggml bytes ``(out, row_bytes)`` of a weight of ``shape`` quantized as ``codes``.

    Args:
        codes: integer codes and scales, e.g. from ``ggml_type``'s check.
        shape: the weight's ``(out, in)``.
        qtype: the ggml type (``ggml_type(codes, ...)``).
        permute_heads: for ``q_proj``/``k_proj``, the number of heads whose rows are reordered
            into the GGUF rotary layout.
    """
    block = _BLOCK[qtype]
    q = codes.codes.reshape(shape).cpu().numpy()
    if qtype == T.MXFP4:  # the stored scale codes, not float16 scales
        d = codes.scale_codes.reshape(shape[0], -1).cpu().numpy()
        return pack_mxfp4(*((hf_to_gguf_rows(q, permute_heads), hf_to_gguf_rows(d, permute_heads)) if permute_heads else (q, d)))
    d = block_scales(codes, shape, block)
    if permute_heads:
        q, d = hf_to_gguf_rows(q, permute_heads), hf_to_gguf_rows(d, permute_heads)
    if qtype in (T.TQ1_0, T.TQ2_0):
        return pack_ternary(q, d, qtype)
    return _PACK[qtype](q, d)


def hf_to_gguf_rows(x: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute``: per head, rows ``(2, dim)`` become ``(dim, 2)``.

    Inverse of transformers' ``_reverse_permute_weights`` (``modeling_gguf_pytorch_utils.py``).
    """
    return x.reshape(n_head, 2, x.shape[0] // n_head // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def source_gguf(model: nn.Module) -> Path | None:
    """The GGUF file ``model`` was loaded from by ``qat.models.load_model``, or None.

    ``load_model`` dequantizes a GGUF file into a cache directory (the model's ``name_or_path``)
    and records the source file there.
    """
    from qat.models import _STAMP_FILE

    root = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", "")
    try:
        path = Path(json.loads((Path(root) / _STAMP_FILE).read_text())["source"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return path if path.is_file() else None


def _float_array(t: torch.Tensor, dtype: torch.dtype = torch.float16) -> tuple[np.ndarray, T | None]:
    """``(array, raw type)`` of an unquantized tensor: a matrix in ``dtype`` (F16 / BF16; float32:
    F16 where every value is a float16 value, else F32), a vector in F32. The raw type is BF16 for
    BF16 bytes, else None (the writer reads F16 / F32 from the numpy dtype)."""
    t = t.detach().float().cpu()
    if t.ndim < 2:
        return t.numpy(), None
    if dtype == torch.bfloat16:
        return t.bfloat16().view(torch.int16).numpy().view(np.uint8), T.BF16
    if dtype == torch.float16 or torch.equal(t.half().float(), t):
        half = cast(t, torch.float16, "tensor")
        return half.numpy(), None
    return t.numpy(), None


@functools.lru_cache(maxsize=2)
def _source_fields(path: str, mtime_ns: int) -> tuple[tuple[str, object, gguf.GGUFValueType, gguf.GGUFValueType | None], ...]:
    """The key-value pairs of a GGUF file as ``(name, value, type, array item type)`` (parsing
    its 49k-token vocabulary takes seconds, so repeated exports of one source reuse it)."""
    fields = []
    for field in gguf.GGUFReader(path).fields.values():
        if field.name.startswith("GGUF."):  # the reader's view of the header, not stored pairs
            continue
        vtype = field.types[0]
        fields.append((field.name, field.contents(), vtype, field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None))
    return tuple(fields)


def _copy_metadata(writer: gguf.GGUFWriter, source: Path, config) -> None:
    """Copy the source file's key-value pairs (tokenizer, hyperparameters), checking they match ``config``."""
    expect = {
        "llama.block_count": config.num_hidden_layers,
        "llama.embedding_length": config.hidden_size,
        "llama.feed_forward_length": config.intermediate_size,
        "llama.attention.head_count": config.num_attention_heads,
        "llama.attention.head_count_kv": config.num_key_value_heads,
    }
    skip = {gguf.Keys.General.ARCHITECTURE, gguf.Keys.General.FILE_TYPE, gguf.Keys.General.QUANTIZATION_VERSION}
    n_tokens = None
    for name, value, vtype, sub in _source_fields(str(source.resolve()), source.stat().st_mtime_ns):
        if name in expect and value != expect[name]:
            raise UserError(f"the source GGUF file {source} has {name}={value}, the model {expect[name]}: not its source")
        if name == gguf.Keys.Tokenizer.LIST:
            n_tokens = len(value)
        if name not in skip:
            writer.add_key_value(name, value, vtype, sub_type=sub)
    if n_tokens != config.vocab_size:
        raise UserError(f"the source GGUF file's tokenizer has {n_tokens} tokens, the model {config.vocab_size}: "
                        "pass the GGUF file the model was loaded from as source=")


def _tensors(model: nn.Module, ternary: str, dtype: torch.dtype = torch.float16) -> list[tuple[str, np.ndarray, T | None]]:
    """``(hf_name, array, qtype)`` for every tensor llama.cpp needs; qtype None for F16/F32 arrays,
    BF16 for bfloat16 bytes; unquantized matrices in ``dtype`` (see ``_float_array``)."""
    cfg = model.config
    heads = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}
    quantized = {n for n, m in quantized_layers(model) if m.weight_quantizer is not None}
    codes_in_order = iter_codes(model)  # the same module walk as below: one layer's codes made at a time
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is not None and head.weight is embed.weight and (
        getattr(head, "weight_quantizer", None) is getattr(embed, "weight_quantizer", None)  # both float, or one quantized table
    )
    inside = tuple(n + "." for n in quantized)  # their quantizers' parameters are not tensors of the model
    out = []
    for name, module in model.named_modules():
        if module is head and tied:
            if name in quantized:
                next(codes_in_order)  # the embedding's codes again: the walks stay in step
            continue  # a tied head: llama.cpp reuses token_embd when output.weight is absent
        if inside and name.startswith(inside):
            continue
        n_head = heads.get(name.rsplit(".", 1)[-1])
        if getattr(module, "act_quantizer", None) is not None:
            raise UserError(
                f"{name} quantizes its input activations; GGUF is weight-only and llama.cpp quantizes "
                "activations its own way: export with activation quantization switched off"
            )
        if name in quantized:
            walked, _, codes = next(codes_in_order)
            assert walked == name, (walked, name)  # iter_codes walks named_modules in the same order
            shape = tuple(codes.codes.shape)
            qtype = ggml_type(codes, shape[1], ternary, name)
            out.append((name + ".weight", encode(codes, shape, qtype, n_head), qtype))
            bias = None if isinstance(module, QuantEmbedding) or module.bias is None else module.bias.detach().float().cpu()
            if codes.bias is not None:
                bias = codes.bias.float().cpu() if bias is None else bias + codes.bias.float().cpu()
            if bias is not None:
                b = bias.numpy()
                out.append((name + ".bias", hf_to_gguf_rows(b, n_head) if n_head else b, None))
            continue
        for pname, p in module.named_parameters(recurse=False):
            a, raw = _float_array(p, dtype)
            if n_head and pname in ("weight", "bias"):
                a = hf_to_gguf_rows(a, n_head)
            out.append((f"{name}.{pname}", a, raw))
    return out


@torch.no_grad()
def save(model: nn.Module, tokenizer, tmp_dir: Path, *, ternary: str = "TQ2_0", source: str | Path | None = None,
         unquantized_dtype: str | torch.dtype = "auto") -> dict:
    """Write ``model.gguf`` into ``tmp_dir``.

    Args:
        model: a transformers Llama causal LM, its layers quantized by ``qat.quantize_`` (adapters
            merged). Not modified.
        tokenizer: unused (the GGUF tokenizer is copied from the source file, which is what
            llama.cpp needs); accepted for the common ``save`` signature.
        tmp_dir: an existing directory to write into.
        ternary: ``"TQ2_0"`` (2.06 bits per weight, faster) or ``"TQ1_0"`` (1.69) for ternary rows.
        source: the GGUF file the model came from; by default the one ``qat.models.load_model``
            recorded.
        unquantized_dtype: the dtype of unquantized matrices (``qat.export.precision``; see above).

    Returns:
        ``{"format": "gguf", "file": "model.gguf", "bytes", "tensor_types": {type: count},
        "quantized_bits_per_weight"}``.

    Raises:
        UserError: not a Llama model, no source GGUF file, a grid no GGUF type holds exactly (the
            message says which settings would), activation quantization, a mismatched source.

    Example:
        >>> model, tok = load_model("smollm2-135m")  # doctest: +SKIP
        >>> quantize_(model, weight=partial(LSQ, bits=4, granularity="group", group_size=32))  # doctest: +SKIP
        >>> save(model, tok, Path("out"))["tensor_types"]  # doctest: +SKIP
        {'F32': 62, 'Q4_0': 210}
    """
    cfg = model.config
    if getattr(cfg, "model_type", None) != "llama":
        raise UserError(f"GGUF export supports llama-architecture models; this one is {getattr(cfg, 'model_type', type(model).__name__)!r}")
    source = Path(source) if source is not None else source_gguf(model)
    if source is None or not source.is_file():
        raise UserError(
            "GGUF export copies the tokenizer and hyperparameters from the GGUF file the model was loaded "
            "from; load the model with qat.models.load_model('<name or file>.gguf') or pass source=<file.gguf>"
        )
    tensors = _tensors(model, ternary, storage_dtype(model, unquantized_dtype))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    path = Path(tmp_dir) / FILENAME
    writer = gguf.GGUFWriter(path, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    _copy_metadata(writer, source, cfg)
    types, quant_bits, quant_weights = Counter(), 0, Counter()
    for hf_name, array, qtype in tensors:
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise UserError(f"{hf_name} has no GGUF tensor name in the llama architecture: merge adapters "
                            "(qat.adapters.merge_adapters_) and export a plain Llama model")
        if qtype is None:
            writer.add_tensor(gguf_name, array)
            types["F16" if array.dtype == np.float16 else "F32"] += 1
        elif qtype == T.BF16:
            writer.add_tensor(gguf_name, array, raw_dtype=qtype)
            types["BF16"] += 1
        else:
            writer.add_tensor(gguf_name, array, raw_dtype=qtype)
            types[qtype.name] += 1
            n = array.shape[0] * array.shape[1] // gguf.GGML_QUANT_SIZES[qtype][1] * _BLOCK[qtype]
            quant_weights[qtype] += n
            quant_bits += array.nbytes * 8
    if quant_weights:
        writer.add_file_type(_FILE_TYPE[quant_weights.most_common(1)[0][0]])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    n_quant = sum(quant_weights.values())
    log.info("wrote %s: %s", path, dict(types))
    return {
        "format": "gguf",
        "file": FILENAME,
        "bytes": path.stat().st_size,
        "tensor_types": dict(types),
        "quantized_bits_per_weight": quant_bits / n_quant if n_quant else None,
    }
