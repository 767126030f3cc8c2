"""``qat-export``: write a trained run (or an export) as a packed, hf, gguf or compressed-tensors model.

    qat-export outputs/smollm2_w4_lsq/2026-11-30_07-00-00                 # -> <run>/export (packed)
    qat-export outputs/.../checkpoints/last.ckpt --format gguf --out w4.gguf.d
    qat-export outputs/.../export --format hf --out w4-hf                 # re-export a packed model

A run directory (or one of its checkpoints) is rebuilt as ``qat-eval`` rebuilds it: the saved
``config.yaml`` says which model and ``quantize_`` call, the checkpoint holds the trained weights and
quantizer state. A packed export directory is loaded with ``load_packed`` and its codes written
again unchanged. User errors end in one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from qat.errors import UserError, exit_on_user_error


def load_source(path: Path):
    """``(model, tokenizer, run_dir)`` from a run directory, a checkpoint or a packed export directory.

    Raises:
        UserError: ``path`` is none of these.
    """
    from qat.config import build_model, load_run_config, locate_run
    from qat.export.packed import QUANT_CONFIG, load_packed, requantize_

    if path.is_dir() and (path / QUANT_CONFIG).is_file():
        from transformers import AutoTokenizer

        model = requantize_(load_packed(path))
        tokenizer = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").is_file() else None
        return model, tokenizer, None
    if not path.exists():
        raise UserError(f"{path} does not exist: pass a qat-train run directory, a .ckpt file or a packed export directory")
    run_dir, ckpt = locate_run(path)
    model, tokenizer, _ = build_model(load_run_config(run_dir), ckpt)
    return model.eval(), tokenizer, run_dir


def export_path(path: str | Path, format: str = "packed", out: str | Path | None = None, overwrite: bool = False,
                unquantized_dtype: str = "auto") -> Path:
    """Export the model at ``path`` (see ``load_source``) to ``out``; returns the directory written.

    ``out`` defaults to ``<run_dir>/export`` for the packed format and ``<run_dir>/export-<format>``
    for the others; re-exporting an export directory needs an explicit ``out``.

    Raises:
        UserError: see ``load_source`` and ``qat.export_``.
    """
    from qat.export import FORMATS, export_

    if format not in FORMATS:  # before loading a model for nothing
        raise UserError(f"unknown export format {format!r}; formats: {', '.join(FORMATS)}")
    path = Path(path)
    if out is None and (path / "quant_config.json").is_file():
        raise UserError(f"{path} is an export directory: pass --out for the new export")
    if out is not None and Path(out).exists() and not overwrite:
        raise UserError(f"export directory {out} already exists: pick another --out or pass --overwrite")
    model, tokenizer, run_dir = load_source(path)
    if out is None:
        out = run_dir / ("export" if format == "packed" else f"export-{format}")
    return export_(model, out, format=format, tokenizer=tokenizer, overwrite=overwrite, unquantized_dtype=unquantized_dtype)


def main(argv: list[str] | None = None) -> None:
    from qat.export import FORMATS
    from qat.export.precision import CHOICES

    parser = argparse.ArgumentParser(prog="qat-export", description=__doc__.splitlines()[0])
    parser.add_argument("path", help="a qat-train run directory, one of its .ckpt files, or a packed export directory")
    parser.add_argument("--format", default="packed", help=f"one of: {', '.join(FORMATS)} (default: packed)")
    parser.add_argument("--out", help="directory to write (default: <run>/export, or <run>/export-<format>)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    parser.add_argument("--unquantized-dtype", default="auto", choices=CHOICES,
                        help="dtype of the tensors left unquantized (default auto: the model's 16-bit dtype, float16 for a float32 model)")
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # errors are one line; loading bars would surround them
    try:
        out = export_path(args.path, args.format, args.out, args.overwrite, args.unquantized_dtype)
    except UserError as e:  # a mistake in the input: one line; anything else is a bug and keeps its traceback
        exit_on_user_error("qat-export", e)
    print(out)


if __name__ == "__main__":
    main()
