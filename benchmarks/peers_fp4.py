"""FP4 weight-only QAT, ours against torchao's NVFP4 / MX QAT on SmolLM2-135M: same data, steps and batches, two texts.

Per format (``nvfp4``, ``mxfp4``), on the 210 decoder linear layers (``model.layers.*``; the
embeddings and the tied head stay float), one row per method, every row trained by
``benchmarks/peers_accuracy.py``'s machinery (``pa.compose``, ``pa.load_run``, ``pa.build_ours``,
``pa.fit``: ``qat-train``'s Lightning Trainer, module and data module of the format's recipe):

* ours: the recipe as ``qat-train`` builds it: ``smollm2_nvfp4`` (``qat.quantizers.FP4``, NVFP4:
  E2M1 in blocks of 16, E4M3 block scales under an FP32 power-of-two tensor scale, block scales
  learned by Dual-LSQ) and ``smollm2_mxfp4`` (MXFP4: blocks of 32, E8M0 scales, Dual-LSQ as well);
* torchao: its fake quantizer of the same format in the same recipe's model and module (same
  AdamW settings and schedule; torchao's FP4 fake quantizers hold no parameters: every weight is
  in the recipe's weight group): NVFP4 ``NVFP4FakeQuantizeConfig(use_per_tensor_scale=True)``
  (two-level scaling, the setting closest to ours: an FP32 tensor scale ``amax / (6 * 448)`` over
  E4M3 block scales; scales recomputed from the weights at every forward); MXFP4
  ``MXFakeQuantizeConfig(torch.float4_e2m1fn_x2, block_size=32)`` with ``FLOOR`` block scales
  (OCP's rule, the one ours starts from: bitwise our round-to-nearest) and with ``RCEIL``
  (torchao's default). torchao 0.18 refuses weight-only NVFP4 and MX QAT (``QATConfig`` builds
  ``NVFP4FakeQuantizedLinear`` / ``MXFakeQuantizedLinear``: "Weight only NVFP4 QAT not supported
  yet"; its NVFP4 one with activations needs a Blackwell GPU's FP4 matmul, ``torch._scaled_mm``
  fails on CPU), so each layer becomes torchao's generic ``FakeQuantizedLinear`` whose weight fake
  quantizer is torchao's NVFP4 / MX numerics (``NVFP4Tensor.to_nvfp4`` / ``MXTensor.to_mx`` with
  the config's settings, then ``dequantize``) with the gradient of their fake-quantized linears'
  backward: straight through to the latent weight (``torchao_fp4``).

Every row: the same batches in the same order, steps, tokens, seed, objective (labels) and gradient
clipping. Measured on two texts, each with the fake quantizers active (``qat.metrics.perplexity``):

* held out: the data module's held-out split (the FIRST blocks of the shipped corpus, never trained on);
* out of domain: what ``qat-train`` measures as ``eval.ood`` (Debian's common licences, ``licenses``),
  built as ``qat.train`` builds it (the recipe's data config with ``source=eval.ood``: same tokenizer
  and block length), capped to as many tokens as the held-out split (``--heldout-blocks`` blocks).

Per row and text: perplexity at step 0 (torchao: its own round-to-nearest; ours: its learned scales
at their min-max initialisation) and after QAT; once per format and text, FP and round-to-nearest
with the format's min-max scales (``qat.train.ptq_factory`` of our quantizer: the common RTN
reference); gap recovered ``(log RTN - log QAT) / (log RTN - log FP)`` against the common RTN and
against the row's own step 0. Target per format: ours' QAT perplexity below every torchao row's on
both texts (equivalently: more of the common RTN gap recovered on both).

    .venv/bin/python benchmarks/peers_fp4.py               # --quick: 15 steps x 2 x 128 tokens, 8 held-out blocks
    .venv/bin/python benchmarks/peers_fp4.py --full        # the recipes' steps (60), 4 x 256, 80 held-out blocks
    .venv/bin/python benchmarks/peers_fp4.py --only nvfp4 --methods ours,torchao --steps 2 --seq-len 64 --batch 1 --heldout-blocks 1

Writes ``benchmarks/results/peers_fp4.json`` (``--out``) and prints a markdown table (also the one
``benchmarks/report.py`` writes into docs/RESULTS.md).
"""

from __future__ import annotations

import argparse
import copy
import gc
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers_accuracy as pa  # noqa: E402

RESULTS = pa.RESULTS
FORMATS = {"nvfp4": "smollm2_nvfp4", "mxfp4": "smollm2_mxfp4"}  # format -> our recipe (its module, optimizer, data)
# torchao's rows per format: (key, label, options of its fake-quantize config)
TORCHAO = {
    "nvfp4": (("torchao", "torchao NVFP4 (per-tensor FP32 scale)", {"use_per_tensor_scale": True}),),
    "mxfp4": (("torchao", "torchao MXFP4 (FLOOR scales, as ours)", {"scaling_mode": "FLOOR"}),
              ("torchao_rceil", "torchao MXFP4 (RCEIL scales, its default)", {"scaling_mode": "RCEIL"})),
}
OURS_LABEL = {"nvfp4": "ours: NVFP4, Dual-LSQ block scales", "mxfp4": "ours: MXFP4, Dual-LSQ block scales"}
TEXTS = ("heldout", "ood")
PRESETS = pa.PRESETS
NOTES = [
    "Every row of a format trains in qat-train's loop (the format recipe's Lightning Trainer, QATModule and data module): the "
    "same batches in the same order, steps, tokens, seed, objective (labels) and gradient clipping; torchao's rows use the "
    "recipe's AdamW settings and schedule (its FP4 fake quantizers have no parameters: every weight is in the weight group, "
    "the recipe's lr).",
    "torchao NVFP4: NVFP4FakeQuantizeConfig(use_per_tensor_scale=True), its default and the setting closest to ours: an FP32 "
    "per-tensor scale amax / (6 * 448) over E4M3 block scales of 16 (ours rounds that tensor scale up to a power of two so that "
    "exports decompress exactly), recomputed from the weights at every forward.",
    "torchao MXFP4: MXFakeQuantizeConfig(torch.float4_e2m1fn_x2, block_size=32): the FLOOR row uses OCP's scale rule "
    "2^(floor(log2 amax) - 2), the one ours is initialised with (its step 0 is bitwise our RTN); RCEIL is torchao's default.",
    "torchao 0.18 has no weight-only NVFP4 or MX QAT: QATConfig(weight_config=NVFP4FakeQuantizeConfig() or MXFakeQuantizeConfig()) "
    "builds NVFP4FakeQuantizedLinear / MXFakeQuantizedLinear, which raise 'Weight only NVFP4 (MX) QAT not supported yet' "
    "(recorded per row as qatconfig_refusal), and its generic FakeQuantizedLinear has no fake quantizer for either config "
    "('Unknown config type'); its NVFP4 linear with activations runs a real FP4 matmul (Blackwell GPUs: torch._scaled_mm "
    "fails on CPU). Each torchao row is therefore torchao's FakeQuantizedLinear (no activation fake quantization) with a "
    "weight fake quantizer made of torchao's own numerics, NVFP4Tensor.to_nvfp4 (per_tensor_amax_to_scale of the weight's "
    "amax) or MXTensor.to_mx with the config's dtype, block size and scaling mode, then dequantize, and the gradient of "
    "their fake-quantized linears' backward: straight through to the latent weight.",
]


# ---------------------------------------------------------------- torchao's FP4 fake quantization


def decoder_linear(module, fqn: str) -> bool:
    """The layers both sides quantize: every ``nn.Linear`` of the decoder blocks (not the tied output head)."""
    from torch import nn

    return isinstance(module, nn.Linear) and fqn.startswith("model.layers.")


def torchao_config(fmt: str, options: dict):
    """torchao's weight fake-quantize config of ``fmt`` with ``options`` (``TORCHAO``)."""
    import torch

    if fmt == "nvfp4":
        from torchao.prototype.qat import NVFP4FakeQuantizeConfig

        return NVFP4FakeQuantizeConfig(**options)
    from torchao.prototype.mx_formats.config import ScaleCalculationMode
    from torchao.prototype.qat import MXFakeQuantizeConfig

    return MXFakeQuantizeConfig(dtype=torch.float4_e2m1fn_x2, block_size=32, scaling_mode=ScaleCalculationMode[options["scaling_mode"]])


def _weight_fake_quantizer(config):
    """torchao 0.18's NVFP4 / MX weight fake quantization, weight-only: a ``FakeQuantizerBase`` of its own numerics.

    The forward is what ``NVFP4FakeQuantizedLinear`` / ``MXFakeQuantizedLinear`` do to the weight
    (``NVFP4Tensor.to_nvfp4`` with ``per_tensor_amax_to_scale(amax)`` when ``use_per_tensor_scale``,
    ``MXTensor.to_mx`` with the config's dtype, block size and scaling mode) followed by their
    backward's ``dequantize``; the gradient is theirs too: straight through to the latent weight
    (their backward computes ``grad_weight = grad_output^T @ input``, nothing through the rounding
    or the scales).
    """
    import torch
    from torchao.prototype.mx_formats.mx_tensor import MXTensor
    from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale
    from torchao.prototype.qat import NVFP4FakeQuantizeConfig
    from torchao.quantization.qat.fake_quantizer import FakeQuantizerBase

    def nvfp4(w):
        tensor_scale = per_tensor_amax_to_scale(torch.max(torch.abs(w))) if config.use_per_tensor_scale else None
        q = NVFP4Tensor.to_nvfp4(w, per_tensor_scale=tensor_scale, is_swizzled_scales=config.use_swizzled_scales, use_triton_kernel=False)
        return q.dequantize(w.dtype)

    def mx(w):
        q = MXTensor.to_mx(w, elem_dtype=config.dtype, block_size=config.block_size, scaling_mode=config.scaling_mode,
                           kernel_preference=config.kernel_preference)
        return q.dequantize(w.dtype)

    class StraightThrough(torch.autograd.Function):
        @staticmethod
        def forward(ctx, w):
            return (nvfp4 if isinstance(config, NVFP4FakeQuantizeConfig) else mx)(w.detach())

        @staticmethod
        def backward(ctx, grad):
            return grad

    class WeightFakeQuantizer(FakeQuantizerBase):
        def __init__(self):
            super().__init__()
            self.config = config

        def forward(self, w):
            return StraightThrough.apply(w)

    return WeightFakeQuantizer()


def torchao_fp4(model, fmt: str, options: dict) -> dict:
    """Put torchao's ``fmt`` weight fake quantization on the 210 decoder linears of ``model``, in place; returns what was done.

    torchao 0.18 has no weight-only NVFP4 or MX QAT: ``QATConfig(weight_config=NVFP4FakeQuantizeConfig())``
    (or ``MXFakeQuantizeConfig``) builds ``NVFP4FakeQuantizedLinear`` (``MXFakeQuantizedLinear``),
    which refuses a missing activation config ("Weight only NVFP4 QAT not supported yet"), and its
    generic ``FakeQuantizedLinear`` has no fake quantizer for either config ("Unknown config type").
    Each layer becomes torchao's ``FakeQuantizedLinear`` (sharing the weight, no activation fake
    quantization) with ``_weight_fake_quantizer(config)`` as its ``weight_fake_quantizer``: torchao's
    NVFP4 / MX weight numerics and gradient. The refusal is checked here, so a torchao that accepts
    weight-only FP4 QAT makes this row fail until it is switched to ``QATConfig``.
    """
    from torchao.quantization import quantize_ as ao_quantize_
    from torchao.quantization.qat import FakeQuantizedLinear, QATConfig

    config = torchao_config(fmt, options)
    probe = torch_linear()
    try:
        ao_quantize_(probe, QATConfig(weight_config=config, step="prepare"))
    except ValueError as e:
        refusal = str(e)
    else:
        raise RuntimeError(f"torchao accepts weight-only {type(config).__name__} QAT now: use QATConfig(weight_config=...) here")
    layers = [(fqn, m) for fqn, m in model.named_modules() if decoder_linear(m, fqn)]
    for fqn, m in layers:
        fq = FakeQuantizedLinear.from_linear(m)
        fq.weight_fake_quantizer = _weight_fake_quantizer(config)
        parent, _, child = fqn.rpartition(".")
        setattr(model.get_submodule(parent), child, fq)
    return {"weight_config": repr(config), "layers": len(layers), "module": "torchao.quantization.qat.FakeQuantizedLinear",
            "weight_fake_quantizer": f"{'NVFP4Tensor.to_nvfp4' if fmt == 'nvfp4' else 'MXTensor.to_mx'} + dequantize, straight-through",
            "qatconfig_refusal": refusal}


def torch_linear():
    """A one-layer model to ask torchao's ``QATConfig`` whether it takes a weight-only config."""
    from torch import nn

    return nn.Sequential(nn.Linear(32, 32, bias=False))


# ---------------------------------------------------------------- rows


def scales_name(q) -> str:
    """A short name of one of our FP4 quantizers: ``nvfp4 dual_lsq (block 16)``."""
    return f"{q.format} {q.scale_mode} (block {q.block_size})"


def build_ours(cfg):
    """Our row: the recipe's model, quantizers, adapter and module as ``qat-train`` builds them (``pa.build_ours``)."""
    from omegaconf import OmegaConf

    module, adapter, factories, data = pa.build_ours(cfg)
    info = {"scales": scales_name(factories["weight"]()), "quant": OmegaConf.to_container(cfg.quant, resolve=True)}
    return module, data, adapter.callbacks() if adapter is not None else [], info


def build_torchao(cfg, fmt: str, options: dict):
    """A torchao row: the recipe's model with torchao's fake quantizers in place of ours, in the recipe's module."""
    from qat.config import make
    from qat.train import build_module

    model, data = pa.load_run(cfg)
    info = torchao_fp4(model, fmt, options)
    module = build_module(cfg, model, make(cfg.module.objective, "module.objective"))
    return module, data, [], info


def run_row(cfg, build, heldout, ood, eval_steps) -> dict:
    """Build a row (``build(cfg)``), train it with ``pa.fit`` and measure both texts at step 0, every eval step and the end."""
    module, data, callbacks, info = build(cfg)
    pa.check_heldout(data, heldout)
    ood_curve = pa.curve_callback(ood, eval_steps)  # after pa.fit's own curve: its step times exclude this evaluation
    out = pa.fit(cfg, module, data, heldout, eval_steps, callbacks=[*callbacks, ood_curve])
    steps = cfg.trainer.max_steps
    texts = {}
    for text, curve, final in (("heldout", out["curve"], out["qat_ppl"]), ("ood", ood_curve.curve, None)):
        if text == "ood" and out["qat_ppl"] is not None and curve and curve[-1][0] == steps:
            final = curve[-1][1]
        texts[text] = {"start": curve[0][1] if curve and curve[0][0] == 0 else None, "qat": final, "curve": curve}
    return {**info, "status": out["status"], "steps": out["steps"], "train_seconds": out["train_seconds"],
            "eval_seconds": out["eval_seconds"] + ood_curve.eval_s, "step_seconds": out["step_seconds"],
            "optim": pa.optim_summary(cfg), "trainable_params": pa.trainable(module), "texts": texts}


# ---------------------------------------------------------------- summary


def row_keys(fk: str) -> list[str]:
    """A format's rows, in table order: ours, then torchao's."""
    return ["ours"] + [key for key, _, _ in TORCHAO[fk]]


def merge_settings_differ(prior: dict, args, preset: str) -> str | None:
    """``--merge``: what differs between the results file's settings and this run's (checked before any training)."""
    s = prior.get("settings", {})
    ours = {"preset": preset, "batch": args.batch, "seq_len": args.seq_len, "seed": args.seed, "heldout_blocks": args.heldout_blocks}
    theirs = {**s, "preset": prior.get("preset")}
    diff = [f"{k} {theirs.get(k)} there, {v} here" for k, v in ours.items() if theirs.get(k) != v]
    return "; ".join(diff) or None


def merged_rows(prior: dict | None, fk: str, f: dict, fp: dict, args) -> dict:
    """``--merge``: the rows an earlier invocation measured for format ``fk``, when its steps, FP and RTN perplexities are
    this run's (the batches are deterministic, so they agree up to float noise); {} without ``--merge``."""
    if not prior or fk not in prior.get("formats", {}):
        return {}
    old = prior["formats"][fk]
    close = all(abs(old["rtn"][t] / f["rtn"][t] - 1) < 1e-4 and abs(prior["fp"][t] / fp[t] - 1) < 1e-4 for t in TEXTS)
    if old["steps"] != f["steps"] or not close:
        raise SystemExit(f"--merge: {args.out}'s {fk} rows were measured with {old['steps']} steps or another FP/RTN model "
                         f"(RTN {old['rtn']}, here {f['rtn']}); use another --out")
    return {k: {**r, "merged_from": prior.get("finished") or "an earlier invocation"} for k, r in old["rows"].items()}


def summarise(fmt: dict, fp: dict) -> None:
    """Ratios and gaps of every row of one format, in place."""
    for r in fmt["rows"].values():
        for text, t in r.get("texts", {}).items():
            q = t["qat"]
            t["ratio_to_fp"] = q / fp[text] if q else None
            t["gap_recovered"] = pa.gap(fmt["rtn"][text], q, fp[text])
            t["gap_recovered_own_start"] = pa.gap(t["start"], q, fp[text])


def target(fmt: dict) -> dict:
    """Ours' QAT perplexity below every torchao row's on both texts (= more of the common RTN gap recovered on both)."""
    statement = "ours' QAT perplexity below torchao's on both texts (more of the RTN gap recovered)"
    rows = fmt["rows"]
    ours = rows.get("ours")
    ao = {k: r for k, r in rows.items() if k.startswith("torchao") and r["status"] == "ok"}
    if ours is None or ours["status"] != "ok" or not ao:
        return {"statement": statement, "met": None, "why": "ours or every torchao row is missing from this run"}
    per_text = {}
    for text in TEXTS:
        finished = {k: r["texts"][text]["qat"] for k, r in ao.items() if r["texts"][text]["qat"] is not None}
        best = min(finished, key=finished.get) if finished else None
        q = ours["texts"][text]["qat"]
        per_text[text] = {"ours": q, "torchao_best": best, "torchao": finished.get(best),
                          "gap_ours": ours["texts"][text].get("gap_recovered"),
                          "gap_torchao": ao[best]["texts"][text].get("gap_recovered") if best else None,
                          "met": q is not None and (best is None or q < finished[best])}  # every torchao row diverged: met
    return {"statement": statement, "met": all(v["met"] for v in per_text.values()), "texts": per_text}


def fmt_num(v, spec=".4g") -> str:
    return pa.fmt(v, spec)


def table(result: dict) -> str:
    """The markdown table (also docs/RESULTS.md's, through benchmarks/report.py)."""
    lines = ["| format | method | held out: step 0 | QAT | x FP | gap recovered (RTN / own start) | out of domain: step 0 | QAT | x FP | "
             "gap recovered (RTN / own start) | train s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    fp = result["fp"]
    lines.append(f"| - | FP (float32) | - | {fp['heldout']:.4g} | 1 | - | - | {fp['ood']:.4g} | 1 | - | - |")
    for fk, f in result["formats"].items():
        rtn = f["rtn"]
        lines.append(f"| {fk} | RTN, min-max scales ({f['rtn_scales']}) | - | {rtn['heldout']:.4g} | {rtn['heldout'] / fp['heldout']:.3g} | 0 | "
                     f"- | {rtn['ood']:.4g} | {rtn['ood'] / fp['ood']:.3g} | 0 | - |")
        for r in f["rows"].values():
            cells = []
            for text in TEXTS:
                t = r.get("texts", {}).get(text)
                if not t:
                    cells += ["-", r["status"], "-", "-"]
                    continue
                qat = f"**{fmt_num(t['qat'])}**" if r["status"] == "ok" else r["status"]
                cells += [fmt_num(t["start"]), qat, fmt_num(t.get("ratio_to_fp"), ".3g"),
                          f"{fmt_num(t.get('gap_recovered'), '.3f')} / {fmt_num(t.get('gap_recovered_own_start'), '.3f')}"]
            lines.append(f"| {fk} | {r['label']} | {' | '.join(cells)} | {fmt_num(r.get('train_seconds'), '.0f')} |")
    s = result["settings"]
    lines.append(f"\nHeld out: {s['heldout_tokens']} tokens of the shipped text; out of domain: {s['ood_tokens']} tokens of "
                 f"{s['ood_source']} (qat-train's eval.ood), never trained on. Every row: {s['batch']} x {s['seq_len']} tokens a "
                 f"step, steps {', '.join(f'{k} {v}' for k, v in s['steps'].items())}, seed {s['seed']}, {result['device']}, "
                 f"{s['threads']} threads; torch {result['torch']}, torchao {result['torchao']}. Gap recovered: "
                 "`(log RTN - log QAT) / (log RTN - log FP)` against the format's min-max RTN / against the row's own step 0.")
    for fk, t in result["targets"].items():
        verdict = "not measured" if t["met"] is None else ("**met**" if t["met"] else "**not met**")
        if "texts" in t:
            detail = "; ".join(f"{text}: ours {fmt_num(v['ours'])} vs {v['torchao_best'] or '-'} {fmt_num(v['torchao'])}, gap "
                               f"{fmt_num(v['gap_ours'], '.3f')} vs {fmt_num(v['gap_torchao'], '.3f')}" for text, v in t["texts"].items())
        else:
            detail = t.get("why", "")
        lines.append(f"Target {fk}: {t['statement']}: {verdict} ({detail}).")
    return "\n".join(lines)


# ---------------------------------------------------------------- main


def ood_blocks(cfg, tokenizer):
    """The out-of-domain text as ``qat.train`` builds it: the run's data config with ``source=eval.ood``, its held-out split."""
    from qat.config import make

    other = make(cfg.data, "eval.ood", tokenizer=tokenizer, source=cfg.eval.ood)
    other.setup("validate")
    return other.heldout_blocks()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    preset = parser.add_mutually_exclusive_group()
    preset.add_argument("--quick", action="store_true", help="the default: " + str(PRESETS["quick"]))
    preset.add_argument("--full", action="store_true", help="the recipes' steps, 4 x 256 tokens, 80 held-out blocks")
    parser.add_argument("--steps", type=int, help="optimizer steps of every row (default: the preset's)")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--heldout-blocks", type=int, help="held-out blocks; the out-of-domain text is capped to as many")
    parser.add_argument("--eval-every", type=int, help="perplexity every N steps (also at 0 and at the end)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--only", help="comma-separated formats among " + ",".join(FORMATS))
    keys = sorted({"ours"} | {k for rows in TORCHAO.values() for k, _, _ in rows})
    parser.add_argument("--methods", help="comma-separated row keys among " + ",".join(keys))
    parser.add_argument("--out", type=Path, default=RESULTS / "peers_fp4.json")
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows of --out that this run does not measure (same preset, settings, FP and RTN perplexities)")
    args = parser.parse_args()
    name = "full" if args.full else "quick"
    for k, v in PRESETS[name].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    formats = args.only.split(",") if args.only else list(FORMATS)
    if set(formats) - set(FORMATS):
        parser.error(f"--only: unknown formats {sorted(set(formats) - set(FORMATS))}; choose among {list(FORMATS)}")
    methods = set(args.methods.split(",")) if args.methods else None
    if methods and methods - set(keys):
        parser.error(f"--methods: unknown rows {sorted(methods - set(keys))}; choose among {keys}")

    import torch
    from hydra.utils import instantiate

    import qat
    from qat.metrics import perplexity
    from qat.train import ptq_factory

    ao_version, ao_missing = pa.prepare(args, parser)
    if ao_missing and (methods is None or any(k.startswith("torchao") for k in methods)):  # before the 15-25 min a row costs
        parser.error(f"{ao_missing}, or measure our rows alone with --methods ours (a later --merge adds torchao's)")

    prior = None
    if args.merge and args.out.exists():
        import json

        prior = json.loads(args.out.read_text())
        differ = merge_settings_differ(prior, args, name)
        if differ:
            parser.error(f"--merge: {args.out} was measured with other settings ({differ}); use another --out")

    t_start = time.perf_counter()
    args.run_root = tempfile.mkdtemp(prefix="peers_fp4-")  # the trainers' default_root_dir (they write nothing)
    first = pa.compose([f"recipe={FORMATS[formats[0]]}"], args.steps or 1, args)
    fp_model, data = pa.load_run(first)
    heldout = data.heldout_blocks()
    ood = ood_blocks(first, data.tokenizer)
    n_train = len(data.train_blocks())
    del data
    fp_model.to(args.device)
    texts = {"heldout": heldout, "ood": ood}
    fp = {t: perplexity(fp_model, b) for t, b in texts.items()}
    print(f"FP: held out {fp['heldout']:.4g} ({heldout.numel()} tokens), out of domain {fp['ood']:.4g} ({ood.numel()} tokens)", flush=True)

    result = {
        "what": "FP4 weight-only QAT, ours vs torchao's NVFP4 / MX fake quantization, same recipe, data, steps, batch and seed "
                "per format; 210 decoder linears; perplexity held out and out of domain",
        "model": args.model, "device": args.device, "preset": name, "partial": bool(args.only or args.methods),
        "torch": torch.__version__, "torchao": ao_version, "fp": fp, "formats": {}, "targets": {}, "notes": NOTES,
    }
    steps_used, failed = {}, []
    for fk in formats:
        recipe = FORMATS[fk]
        steps = args.steps or pa.recipe_steps([f"recipe={recipe}"])
        steps_used[fk] = steps
        eval_every = args.eval_every or max(1, steps // 4)
        eval_steps = set(range(0, steps + 1, eval_every)) | {0, steps}
        cfg = pa.compose([f"recipe={recipe}"], steps, args)
        factory = instantiate(cfg.quant.weight)
        rtn_model = copy.deepcopy(fp_model)
        qat.quantize_(rtn_model, weight=ptq_factory(factory), include="model.layers.*")
        rtn = {t: perplexity(rtn_model, b) for t, b in texts.items()}
        del rtn_model
        print(f"{fk} RTN: held out {rtn['heldout']:.4g}, out of domain {rtn['ood']:.4g}", flush=True)
        f = {"recipe": recipe, "rtn_scales": scales_name(factory().rtn()).split(" (")[0], "rtn": rtn, "steps": steps,
             "tokens": steps * args.batch * args.seq_len, "rows": {}}
        result["formats"][fk] = f
        earlier = merged_rows(prior, fk, f, fp, args)
        rows = [("ours", OURS_LABEL[fk], build_ours)]
        rows += [(key, label, (lambda c, o=options, x=fk: build_torchao(c, x, o))) for key, label, options in TORCHAO[fk]]
        for key, label, build in rows:
            if methods and key not in methods:
                continue
            t0 = time.perf_counter()
            if key.startswith("torchao") and ao_missing:
                row = {"status": "skipped: " + ao_missing}
            else:
                try:
                    row = run_row(pa.compose([f"recipe={recipe}"], steps, args), build, heldout, ood, eval_steps)
                except Exception as e:  # one broken row must not cost the others: recorded, and the exit status says so
                    import traceback

                    traceback.print_exc()
                    row = {"status": f"error: {type(e).__name__}: {e}"}
                    failed.append(f"{fk}/{key}")
            gc.collect()
            f["rows"][key] = {"label": label, **row, "seconds": time.perf_counter() - t0}
            earlier.pop(key, None)
            qat_ppl = {t: row.get("texts", {}).get(t, {}).get("qat") for t in TEXTS}
            print(f"{fk} {label}: held out {fmt_num(qat_ppl['heldout'])}, out of domain {fmt_num(qat_ppl['ood'])} "
                  f"({row['status']}, {time.perf_counter() - t0:.0f} s)", flush=True)
        for key, row in earlier.items():  # --merge: what an earlier invocation measured and this one did not
            f["rows"][key] = row
        f["rows"] = {k: f["rows"][k] for k in row_keys(fk) if k in f["rows"]}
        summarise(f, fp)
        result["targets"][fk] = target(f)
    for fk, f in (prior or {}).get("formats", {}).items():  # --merge: formats this run did not measure
        if fk not in result["formats"]:
            result["formats"][fk], result["targets"][fk] = f, prior["targets"][fk]
            steps_used[fk] = f["steps"]
    result["formats"] = {fk: result["formats"][fk] for fk in FORMATS if fk in result["formats"]}
    result["targets"] = {fk: result["targets"][fk] for fk in FORMATS if fk in result["targets"]}
    steps_used = {fk: steps_used[fk] for fk in FORMATS if fk in steps_used}
    result["partial"] = any(k not in result["formats"].get(fk, {}).get("rows", {}) for fk in FORMATS for k in row_keys(fk))

    result["settings"] = {"steps": steps_used, "batch": args.batch, "seq_len": args.seq_len, "heldout_blocks": args.heldout_blocks,
                          "heldout_tokens": int(heldout.numel()), "ood_tokens": int(ood.numel()), "ood_source": first.eval.ood,
                          "train_blocks": n_train, "eval_every": args.eval_every, "seed": args.seed, "threads": args.threads,
                          "grad_clip": first.trainer.get("gradient_clip_val")}
    result["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    pa.save(result, args, t_start)
    print("\n" + table(result))
    print(f"\n{result['seconds']:.0f} s -> {args.out}")
    if failed:
        print(f"rows that failed: {', '.join(failed)} (see their status in the JSON)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
