"""Mixed precision in one step: measure each layer's sensitivity, allocate the bits, write the rules.

    qat-plan recipe=smollm2_w2_lsq quant.plan.bits=2.5 quant.plan.out=my_configs/quant/mix25.yaml
    qat-train --config-dir my_configs recipe=smollm2_w2_lsq quant=mix25      # train the plan
    qat-train recipe=smollm2_w2_lsq quant.plan.bits=2.5                      # or both in one run

For every linear layer that ``quant.include`` / ``quant.exclude`` select and every candidate of
``quant.plan.candidates`` (ternary, 2, 3, 4, 8 bits by default): the layer's storage bits under that
candidate (``qat.allocation.storage_bits``: codes, scales, zero points, offsets) and its sensitivity
on the first ``calibration_blocks`` blocks of the training split (``qat.sensitivity``: KL to the FP
model with the layer alone quantized, or the empirical-Fisher estimate). The exact knapsack
(``qat.allocation.allocate``) picks one candidate per layer with the least summed sensitivity whose
average bits per weight stay within ``quant.plan.bits``. The choice becomes ``quant.rules`` (one
rule per layer, its exact name) in a quant YAML that ``qat-train quant=NAME`` reads; the table
(layer, setting, sensitivity, bits) is printed and drawn (``plan.png``: sensitivity per layer of
each candidate, and the chosen width). Sensitivity does not depend on the budget: ``plan.json``
keeps it, and ``quant.plan.sensitivity=PATH/plan.json`` allocates another budget without measuring.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from qat.allocation import allocate, storage_bits
from qat.errors import UserError

log = logging.getLogger("qat.plan")


@dataclass
class Plan:
    """One candidate per layer and what it costs.

    Attributes:
        layers: layer names, in model order.
        candidates: candidate names, in the order given.
        bits: ``bits[l][c]`` storage bits of layer ``l`` under candidate ``c``.
        sens: ``sens[l][c]`` its sensitivity.
        weights: weights per layer.
        choice: the chosen candidate index per layer.
        budget: the average bits per weight asked for; method: ``kl`` or ``fisher``.
    """

    layers: list[str]
    candidates: list[str]
    bits: list[list[int]]
    sens: list[list[float]]
    weights: list[int]
    choice: list[int]
    budget: float
    method: str
    nodes: dict = field(default_factory=dict)  # candidate name -> its quantizer node (for the rules)

    @property
    def average_bits(self) -> float:
        """Average storage bits per weight of the chosen plan."""
        return sum(b[c] for b, c in zip(self.bits, self.choice)) / sum(self.weights)

    def chosen(self) -> list[tuple[str, str, float, float]]:
        """``(layer, candidate, sensitivity, bits per weight)`` per layer."""
        return [(name, self.candidates[c], self.sens[i][c], self.bits[i][c] / self.weights[i])
                for i, (name, c) in enumerate(zip(self.layers, self.choice))]

    def rules(self) -> list[dict]:
        """``quant.rules``: one rule per layer, its exact name and its candidate's quantizer node."""
        return [{"pattern": name, "weight": self.nodes[cand]} for name, cand, _, _ in self.chosen()]

    def table(self) -> str:
        """The plan as a text table, with the totals."""
        rows = [f"{'layer':<44} {'setting':>8} {f'sensitivity ({self.method})':>20} {'bits':>6}"]
        rows += [f"{name:<44} {cand:>8} {s:>20.4g} {b:>6.3f}" for name, cand, s, b in self.chosen()]
        counts = {c: sum(1 for x in self.choice if self.candidates[x] == c) for c in self.candidates}
        total = sum(s[c] for s, c in zip(self.sens, self.choice))
        rows.append(f"{len(self.layers)} layers: {', '.join(f'{c} {n}' for c, n in counts.items() if n)}; "
                    f"average {self.average_bits:.3f} bits per weight (budget {self.budget}); summed sensitivity {total:.4g}")
        return "\n".join(rows)

    def summary(self) -> dict:
        """What metrics.json records: budget, average, method, counts and the choice per layer."""
        return {"bits": self.budget, "average_bits": self.average_bits, "method": self.method,
                "candidates": self.nodes, "layers": {name: cand for name, cand, _, _ in self.chosen()},
                "sensitivity": {name: dict(zip(self.candidates, s)) for name, s in zip(self.layers, self.sens)}}

    def plot(self, path: Path) -> Path | None:
        """``plan.png``: each candidate's sensitivity per layer (log scale) and the chosen bits; None without matplotlib."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            log.warning("plan plot skipped: matplotlib is not installed (pip install 'qat[plot]')")
            return None
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(8, len(self.layers) / 12), 7), sharex=True)
        x = range(len(self.layers))
        for c, cand in enumerate(self.candidates):
            top.plot(x, [max(s[c], 1e-12) for s in self.sens], ".-", lw=0.8, ms=3, label=cand)
        top.set_yscale("log")
        top.set_ylabel(f"sensitivity ({self.method})")
        top.legend(ncol=len(self.candidates), fontsize=8)
        bottom.bar(x, [b for _, _, _, b in self.chosen()], width=1.0)
        bottom.axhline(self.average_bits, color="k", lw=0.8, ls="--", label=f"average {self.average_bits:.3f}")
        bottom.set_ylabel("bits per weight")
        bottom.set_xlabel("layer (model order)")
        bottom.legend(fontsize=8)
        fig.suptitle(f"mixed precision at {self.budget} bits per weight")
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def candidate_nodes(plan_cfg, weight_node) -> dict:
    """``quant.plan.candidates`` as plain nodes, each merged onto ``quant.weight`` unless it names its own ``_target_``."""
    from omegaconf import OmegaConf

    out = {}
    for name, node in plan_cfg.candidates.items():
        if "_target_" not in node:
            if weight_node is None:
                raise UserError(f"quant.plan.candidates.{name}: quant.weight is null, so the candidate must name its own _target_")
            node = OmegaConf.merge(weight_node, node)
        out[name] = OmegaConf.to_container(node, resolve=True)
    if not out:
        raise UserError("quant.plan.candidates is empty: give at least one quantizer setting per layer to choose from")
    return out


def make_plan(model: nn.Module, names: Sequence[str], nodes: Mapping[str, dict], batches: Sequence[torch.Tensor],
              bits: float, method: str = "kl", measured: Mapping | None = None) -> Plan:
    """Measure, allocate and return the :class:`Plan` for ``model``'s layers ``names``.

    Args:
        model: the float causal LM (left unchanged).
        names: linear layer names to plan.
        nodes: candidate name -> quantizer node (Hydra, ``_partial_: true``).
        batches: calibration token ids.
        bits: the budget, average storage bits per weight.
        method: ``kl`` (measured) or ``fisher`` (estimated).
        measured: an earlier plan's ``plan.json`` (``Plan.summary``) whose sensitivities are reused instead of
            measured (``reused_sensitivity``): the same layers, candidates and method, any budget.

    Raises:
        UserError: an unknown method, a budget below the cheapest plan, or a ``measured`` plan of other
            layers, candidates or method.
    """
    from hydra.utils import instantiate

    from qat.sensitivity import fisher_sensitivity, kl_sensitivity, layers_of, quantized_weight

    measure = {"kl": kl_sensitivity, "fisher": fisher_sensitivity}.get(method)
    if measure is None:
        raise UserError(f"quant.plan.method={method!r}: use kl (measured) or fisher (estimated)")
    factories = {name: instantiate(node) for name, node in nodes.items()}
    layers = layers_of(model, names)
    table = []
    for name, layer in layers.items():
        row = []
        for cand, factory in factories.items():
            try:
                q = quantized_weight(layer.weight.detach(), factory)[1]
            except UserError as e:
                raise UserError(f"quant.plan.candidates.{cand} on {name}: {e}") from None
            row.append(storage_bits(q.codes(layer.weight.detach())))
        table.append(row)
    weights = [layer.weight.numel() for layer in layers.values()]
    budget = int(bits * sum(weights))
    cheapest = sum(min(r) for r in table) / sum(weights)
    if budget < sum(min(r) for r in table):
        raise UserError(f"quant.plan.bits={bits}: the cheapest plan of these candidates takes {cheapest:.3f} bits per weight; "
                        "raise the budget or add a narrower candidate")
    sens_by_layer = (reused_sensitivity(measured, list(layers), dict(nodes), method) if measured is not None
                     else measure(model, list(layers), factories, batches))
    sens = [[sens_by_layer[name][cand] for cand in factories] for name in layers]
    choice = allocate(table, sens, budget)
    return Plan(list(layers), list(factories), table, sens, weights, choice, bits, method, dict(nodes))


def reused_sensitivity(summary: Mapping, layers: Sequence[str], nodes: Mapping[str, dict], method: str) -> dict:
    """The sensitivities of an earlier plan (``plan.json``) for ``layers`` x ``nodes``, checked to be the same measurement.

    Sensitivity does not depend on the budget, so one measurement serves every budget: ``qat-train
    quant.plan.bits=3 quant.plan.sensitivity=RUN/plan.json`` allocates at once. The file must hold the
    same method, every layer and every candidate under the same quantizer settings.

    Raises:
        UserError: naming what differs and the fix (measure again: ``quant.plan.sensitivity=null``).
    """
    fix = "; measure again with quant.plan.sensitivity=null"
    if summary.get("method") != method:
        raise UserError(f"quant.plan.sensitivity holds {summary.get('method')!r} sensitivities, the plan asks for {method!r}{fix}")
    if summary.get("candidates") != dict(nodes):
        differ = sorted(set(nodes) ^ set(summary.get("candidates") or {})) or [
            c for c in nodes if (summary.get("candidates") or {}).get(c) != nodes[c]]
        raise UserError(f"quant.plan.sensitivity was measured for other candidate settings (differ: {differ}){fix}")
    sens = summary.get("sensitivity") or {}
    missing = [name for name in layers if name not in sens]
    if missing:
        raise UserError(f"quant.plan.sensitivity holds no sensitivity for {len(missing)} of the {len(layers)} layers "
                        f"(first: {missing[0]}){fix}")
    return {name: {c: float(sens[name][c]) for c in nodes} for name in layers}


def plan_layers(model: nn.Module, include, exclude) -> list[str]:
    """The linear layers ``quantize_`` would select with ``include`` / ``exclude`` (the output head left out by default)."""
    import fnmatch

    from qat.convert import _output_head_names

    include = [include] if isinstance(include, str) else list(include)
    exclude = [] if exclude is None else ([exclude] if isinstance(exclude, str) else list(exclude))
    skip = _output_head_names(model) if not exclude else set()
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in skip
             and any(fnmatch.fnmatchcase(n, p) for p in include) and not any(fnmatch.fnmatchcase(n, p) for p in exclude)]
    if not names:
        raise UserError(f"quant.include={include} and quant.exclude={exclude} select no linear layer to plan")
    return names


def plan_run(cfg, model: nn.Module, datamodule) -> Plan:
    """The plan of a ``qat-train`` / ``qat-plan`` config: calibration blocks from the training split, every selected layer."""
    pc = cfg.quant.plan
    blocks = datamodule.train_blocks()[: int(pc.calibration_blocks)]
    if len(blocks) == 0:
        raise UserError("quant.plan.calibration_blocks must be at least 1 (blocks of the training split)")
    batches = list(blocks.split(int(pc.batch_size)))
    nodes = candidate_nodes(pc, cfg.quant.get("weight"))
    names = plan_layers(model, cfg.quant.include, cfg.quant.exclude)
    log.info("planning %d layers x %d candidates at %s bits per weight (%s, %d calibration blocks)",
             len(names), len(nodes), pc.bits, pc.method, len(blocks))
    measured = None
    if pc.get("sensitivity"):
        import json

        path = Path(pc.sensitivity)
        if not path.is_file():
            raise UserError(f"quant.plan.sensitivity={path}: no such file; give a plan.json written by qat-plan or by a "
                            "qat-train quant.plan.bits=B run (its run directory), or null to measure")
        measured = json.loads(path.read_text())
        log.info("reusing the %s sensitivities of %s", pc.method, path)
    return make_plan(model, names, nodes, batches, float(pc.bits), pc.method, measured)


def quant_yaml(cfg, plan: Plan) -> str:
    """A quant config file holding ``cfg.quant`` with the plan's rules (``qat-train quant=NAME`` reads it)."""
    from omegaconf import OmegaConf

    node = OmegaConf.to_container(cfg.quant, resolve=True)
    node.pop("plan", None)
    node["rules"] = plan.rules()
    head = (f"# Mixed precision planned by qat-plan: {plan.average_bits:.3f} bits per weight (budget {plan.budget}), "
            f"sensitivity {plan.method}; one rule per layer, first match wins (qat.config.quantizer_factories).\n")
    return head + OmegaConf.to_yaml(OmegaConf.create(node))


def plan_into_run(cfg, model: nn.Module, datamodule, run_dir: Path) -> Plan:
    """``qat-train quant.plan.bits=B``: plan, put the rules into ``cfg.quant.rules`` (and the run's ``config.yaml``, from
    which ``qat-eval`` / ``qat-export`` rebuild the model), write ``plan.yaml``, ``plan.json`` and ``plan.png``."""
    import json

    from omegaconf import OmegaConf, open_dict

    plan = plan_run(cfg, model, datamodule)
    with open_dict(cfg):
        cfg.quant.rules = plan.rules()
    log.info("plan:\n%s", plan.table())
    run_dir = Path(run_dir)
    write_plan(run_dir / "plan.yaml", quant_yaml(cfg, plan))
    write_plan(run_dir / "plan.json", json.dumps(plan.summary(), indent=1))
    write_plan(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    plan.plot(run_dir / "plan.png")
    return plan


def write_plan(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (a temporary file renamed over it)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def run(cfg) -> Path:
    """``qat-plan``: load the model and data of the config, plan, print the table, write the quant YAML, plan.json and the plot."""
    import json

    from qat.config import load, make

    if cfg.quant.plan.bits is None:
        raise UserError("qat-plan needs quant.plan.bits=B (average storage bits per weight, scales counted)")
    model, tokenizer = load(cfg)
    datamodule = make(cfg.data, "data", tokenizer=tokenizer)
    datamodule.setup("fit")
    plan = plan_run(cfg, model, datamodule)
    out = Path(cfg.quant.plan.out) if cfg.quant.plan.get("out") else Path(cfg.paths.output_dir) / "plan.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_plan(out, quant_yaml(cfg, plan))
    write_plan(out.with_suffix(".json"), json.dumps(plan.summary(), indent=1))  # reusable: quant.plan.sensitivity=...
    print(plan.table())
    png = plan.plot(out.with_suffix(".png"))
    print(f"\nwrote {out}" + (f" and {png}" if png else "") + f"; train it with: qat-train --config-dir {out.parent.parent} "
          f"quant={out.stem} (the file must sit in a folder named quant/)")
    return out


def cli() -> None:
    """Console entry point (``qat-plan``): a Hydra app over the same configs as ``qat-train``."""
    import hydra

    from qat.config import config_dir, register_recipes
    from qat.errors import exit_on_user_error

    @hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
    def main(cfg) -> None:
        try:
            run(cfg)
        except UserError as e:
            exit_on_user_error("qat-plan", e)

    register_recipes()
    sys.argv[0] = "qat-plan"
    main()


if __name__ == "__main__":
    cli()
