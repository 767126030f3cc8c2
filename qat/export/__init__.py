"""Export a quantized model: ``export_(model, out_dir, format=...)`` and ``load_packed(out_dir)``.

Every format writes what the quantizers' ``codes()`` return, the same rounding the training forward
used, so the exported model computes what was trained. The formats, one module each in this package,
each with ``save(model, tokenizer, tmp_dir) -> dict`` (metadata for ``quant_config.json``):

========================  ==========================  =============================================
format                    module                      what it writes
========================  ==========================  =============================================
``packed``                ``qat.export.packed``       bit-packed codes, float16 scales (FP grids: their
                                                      scale codes); ``load_packed``. Every grid.
``hf``                    ``qat.export.hf``           dense 16-bit ``save_pretrained`` directory
``gguf``                  ``qat.export.gguf``         a GGUF file for llama.cpp: symmetric int grids,
                                                      ternary, MXFP4 (not NVFP4, not FP8)
``compressed-tensors``    ``qat.export.compressed``   compressed-tensors (vLLM): "pack-quantized" int
                                                      grids, "nvfp4-" / "mxfp4-pack-quantized" (not FP8)
========================  ==========================  =============================================

A format refuses (``UserError``, naming the layer and what would fit) a grid it cannot hold exactly.

An export is atomic: it is written to a temporary sibling directory that is renamed to ``out_dir``
only once complete, so an interrupted export leaves nothing behind.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from torch import nn

from qat.errors import UserError
from qat.export.packed import QUANT_CONFIG, load_packed
from qat.export.precision import storage_dtype

# The file-format table: format name -> module of this package that writes it.
FORMATS = {"packed": "packed", "hf": "hf", "gguf": "gguf", "compressed-tensors": "compressed"}

__all__ = ["export_", "load_packed", "FORMATS"]


def export_(
    model: nn.Module,
    out_dir: str | os.PathLike,
    format: str = "packed",
    tokenizer=None,
    overwrite: bool = False,
    unquantized_dtype: str = "auto",
) -> Path:
    """Write ``model`` (quantized with ``qat.quantize_`` and trained) to ``out_dir`` in ``format``.

    Adapters, where ``qat.adapters`` exists, are merged into the model first (in place). The
    directory also receives ``quant_config.json``: the format and what its writer reports.

    Unquantized tensors (embeddings that are not quantized, norms, biases, a float head) are stored
    in the model's 16-bit dtype by default (``qat.export.precision``): its working dtype if that is
    float16/bfloat16, else float16; ``unquantized_dtype="float32"`` keeps float32. Quantized
    tensors are stored exactly whatever this says. ``load_packed`` gives the model back in the
    dtype it was exported from.

    Args:
        model: a model with initialised ``QuantLinear`` / ``QuantEmbedding`` layers.
        out_dir: the directory to create.
        format: one of ``FORMATS``.
        tokenizer: saved with the model when given.
        overwrite: replace an existing ``out_dir`` (only once the new export is complete).
        unquantized_dtype: ``"auto"`` (default), ``"float16"``, ``"bfloat16"`` or ``"float32"``.

    Returns:
        ``out_dir`` as a Path.

    Raises:
        UserError: an unknown format or ``unquantized_dtype``; a model without quantized weights or with uninitialised
            quantizers; a grid the format cannot represent (raised by the format's writer);
            ``out_dir`` exists and ``overwrite`` is False.

    Example:
        >>> qat.export_(model, "out/w4", format="packed", tokenizer=tok)  # doctest: +SKIP
        >>> qat.load_packed("out/w4")(ids).logits  # doctest: +SKIP
    """
    out_dir = Path(out_dir)
    writer = _check(model, out_dir, format, overwrite)
    storage_dtype(model, unquantized_dtype)  # a bad choice fails before anything is written
    _merge_adapters(model)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=".export-"))
    try:
        meta = writer.save(model, tokenizer, tmp, unquantized_dtype=unquantized_dtype) or {}
        (tmp / QUANT_CONFIG).write_text(json.dumps({"format": format, **meta}, indent=1, default=str))
        tmp.chmod(0o755)  # mkdtemp makes it 0700
        _publish(tmp, out_dir, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _check(model: nn.Module, out_dir: Path, format: str, overwrite: bool):
    """Validate everything before writing anything; returns the format's writer module."""
    from qat.convert import quantized_layers

    if format not in FORMATS:
        raise UserError(f"unknown export format {format!r}; formats: {', '.join(FORMATS)}")
    layers = [(n, m) for n, m in quantized_layers(model) if m.weight_quantizer is not None]
    if not layers:
        raise UserError(
            "the model has no quantized weights to export: quantize it with qat.quantize_(model, weight=...) "
            "and train it (or load a qat-train checkpoint) first"
        )
    cold = [n for n, m in layers if not m.weight_quantizer._ready]
    if cold:
        raise UserError(
            f"{len(cold)} weight quantizer(s) are not initialised (e.g. {cold[0]!r}): run a forward pass, "
            "call quantizer.init_(weight), or load the trained checkpoint's state dict before exporting"
        )
    if out_dir.exists() and not overwrite:
        raise UserError(f"export directory {out_dir} already exists: pick another one or pass overwrite=True")
    return importlib.import_module(f"qat.export.{FORMATS[format]}")


def _merge_adapters(model: nn.Module) -> None:
    if importlib.util.find_spec("qat.adapters") is not None:
        from qat.adapters import merge_adapters_

        merge_adapters_(model)


def _publish(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """Rename the finished ``tmp`` to ``out_dir``; an existing one (overwrite) is moved aside first."""
    if overwrite and out_dir.exists():
        old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=".export-old-"))
        os.replace(out_dir, old / "previous")
        try:
            os.replace(tmp, out_dir)
        except OSError:
            os.replace(old / "previous", out_dir)  # put the previous export back
            raise
        finally:
            shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)
