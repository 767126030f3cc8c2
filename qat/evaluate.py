"""``qat-eval``: the held-out metric of a trained run, from its directory or checkpoint alone.

    qat-eval outputs/smollm2_w4_lsq/2026-11-30_07-00-00            # the run's own held-out split
    qat-eval outputs/.../checkpoints/last.ckpt --source notes.txt  # any data the DataModule reads

The run directory's ``config.yaml`` (the resolved config ``qat-train`` writes) says how to rebuild the
model: the same model, the same ``quantize_`` call; the checkpoint's weights and quantizer state
are then loaded into it. Prints one JSON line (``{"ppl": ...}`` or ``{"cos": ...}``) and, with
``--out``, writes it to a file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _locate(path: Path) -> tuple[Path, Path]:
    """(run directory, checkpoint) from either of them."""
    if path.is_file():
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        return run_dir, path
    ckpt = path / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        raise FileNotFoundError(f"{path} has no checkpoints/last.ckpt: pass a run directory of qat-train or a .ckpt file")
    return path, ckpt


def evaluate(path: str | Path, source: str | None = None, seq_len: int | None = None, heldout_tokens: int | None = None) -> dict:
    """Rebuild the run's model from its config, load the checkpoint, return ``{metric: value}``.

    Raises:
        FileNotFoundError: no checkpoint or no ``config.yaml`` in its run directory.
    """
    import torch
    from hydra.utils import instantiate
    from omegaconf import OmegaConf, open_dict

    import qat
    from qat.models import load_model

    run_dir, ckpt = _locate(Path(path))
    cfg_file = run_dir / "config.yaml"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} is missing: qat-eval rebuilds the model from the config qat-train saved there")
    cfg = OmegaConf.load(cfg_file)
    with open_dict(cfg):
        for key, value in (("source", source), ("seq_len", seq_len), ("heldout_tokens", heldout_tokens)):
            if value is not None:
                cfg.data[key] = value
    model, tokenizer = load_model(cfg.model.name, task=cfg.model.task, dtype=cfg.model.dtype)
    objective = instantiate(cfg.module.objective)
    fp = model
    if objective.needs_teacher:
        import copy

        fp = copy.deepcopy(model).eval()
    factories = {k: instantiate(cfg.quant[k]) for k in ("weight", "activation", "embedding") if cfg.quant.get(k) is not None}
    qat.quantize_(model, include=list(cfg.quant.include), exclude=cfg.quant.exclude, **factories)
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
    datamodule = instantiate(cfg.data, tokenizer=tokenizer)
    datamodule.setup("validate")
    value = objective.evaluate(model, list(datamodule.val_dataloader()), fp)
    return {objective.metric: value, "checkpoint": str(ckpt), "data": str(cfg.data.source)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="qat-eval", description=__doc__.splitlines()[0])
    parser.add_argument("path", help="a qat-train run directory or one of its .ckpt files")
    parser.add_argument("--source", help="data to evaluate on (default: the run's own held-out split)")
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--heldout-tokens", type=int)
    parser.add_argument("--out", help="also write the JSON result to this file")
    args = parser.parse_args(argv)
    try:
        result = evaluate(args.path, args.source, args.seq_len, args.heldout_tokens)
    except (FileNotFoundError, ValueError, TypeError) as e:
        print(f"qat-eval: error: {e}", file=sys.stderr)
        sys.exit(2)
    line = json.dumps(result)
    print(line)
    if args.out:
        Path(args.out).write_text(line + "\n")


if __name__ == "__main__":
    main()
