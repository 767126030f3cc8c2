"""qat-plan: the plan on the embedded SmolLM2 (a few layers, Fisher or KL), its YAML round trip, the CLI, and
``qat-train quant.plan.bits=B`` planning then training in one run."""

import json
import subprocess
import sys

import pytest
from omegaconf import OmegaConf, open_dict

from qat import plan as qplan
from qat import train
from qat.config import compose, quantizer_factories
from qat.errors import UserError
from qat.lit.data import TextDataModule
from qat.nn import QuantLinear

SMALL = ["data.seq_len=32", "data.batch_size=2", "data.eval_batch_size=2", "data.heldout_tokens=64"]
BLOCK0 = ["quant.include=[model.layers.0.*]", "quant.plan.calibration_blocks=2"]


def _cfg(extra, tmp_path):
    cfg = compose(["recipe=smollm2_w4_lsq", *SMALL, *BLOCK0, *extra])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    return cfg


@pytest.fixture(scope="module")
def data(smollm2):
    _, tok = smollm2
    dm = TextDataModule(tok, seq_len=32, batch_size=2, heldout_tokens=64)
    dm.setup("fit")
    return dm


@pytest.mark.parametrize("method", ["fisher", "kl"])
def test_plan_meets_the_budget_and_round_trips_through_yaml(smollm2, data, tmp_path, method):
    import copy

    model, _ = smollm2
    cfg = _cfg(["quant.plan.bits=3.0", f"quant.plan.method={method}"], tmp_path)
    plan = qplan.plan_run(cfg, model, data)
    assert plan.layers == [f"model.layers.0.{p}" for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                          "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    assert plan.average_bits <= 3.0 and len(set(plan.choice)) > 1  # a mix, within the budget
    # uniform w2 (2.5 bits per weight) also fits the budget: the exact plan is at least as good in summed sensitivity
    w2 = plan.candidates.index("w2")
    assert sum(s[c] for s, c in zip(plan.sens, plan.choice)) <= sum(s[w2] for s in plan.sens)
    text = qplan.quant_yaml(cfg, plan)
    node = OmegaConf.create(text)
    assert [r["pattern"] for r in node.rules] == plan.layers
    with open_dict(cfg):
        cfg.quant = node
    m = copy.deepcopy(model)
    import qat

    factories = quantizer_factories(cfg)
    qat.quantize_(m, **factories, include=list(cfg.quant.include), exclude=cfg.quant.exclude)
    for name, cand, _, _ in plan.chosen():
        q = m.get_submodule(name).weight_quantizer
        expected = plan.nodes[cand]
        assert type(q).__name__ == expected["_target_"].rsplit(".", 1)[1]
        assert getattr(q, "method", None) == expected.get("method", getattr(q, "method", None))
        if "bits" in expected:
            assert q.grid.bits == expected["bits"]
    assert not isinstance(m.get_submodule("model.layers.1.mlp.down_proj"), QuantLinear)


def test_budget_below_the_cheapest_plan_and_bad_method_are_named(smollm2, data, tmp_path):
    model, _ = smollm2
    with pytest.raises(UserError, match="the cheapest plan of these candidates takes"):
        qplan.plan_run(_cfg(["quant.plan.bits=1.0"], tmp_path), model, data)
    with pytest.raises(UserError, match="use kl"):
        qplan.plan_run(_cfg(["quant.plan.bits=3", "quant.plan.method=hessian"], tmp_path), model, data)


def test_a_measured_plan_is_reused_at_another_budget_and_refused_when_it_differs(smollm2, data, tmp_path):
    """``quant.plan.sensitivity=plan.json``: the same sensitivities at any budget, without measuring (Fisher: fast)."""
    model, _ = smollm2
    plan = qplan.plan_run(_cfg(["quant.plan.bits=3.0", "quant.plan.method=fisher"], tmp_path), model, data)
    saved = tmp_path / "plan.json"
    saved.write_text(json.dumps(plan.summary()))
    again = qplan.plan_run(_cfg(["quant.plan.bits=3.0", "quant.plan.method=fisher", f"quant.plan.sensitivity={saved}"], tmp_path),
                           model, data)
    assert again.sens == plan.sens and again.choice == plan.choice
    wider = qplan.plan_run(_cfg(["quant.plan.bits=4.0", "quant.plan.method=fisher", f"quant.plan.sensitivity={saved}"], tmp_path),
                           model, data)
    assert wider.sens == plan.sens and 3.0 < wider.average_bits <= 4.0
    with pytest.raises(UserError, match="holds 'fisher' sensitivities, the plan asks for 'kl'"):
        qplan.plan_run(_cfg(["quant.plan.bits=3.0", f"quant.plan.sensitivity={saved}"], tmp_path), model, data)
    with pytest.raises(UserError, match=r"other candidate settings \(differ: \['w4'\]\)"):
        qplan.plan_run(_cfg(["quant.plan.bits=3.0", "quant.plan.method=fisher", "quant.plan.candidates.w4.group_size=64",
                             f"quant.plan.sensitivity={saved}"], tmp_path), model, data)
    with pytest.raises(UserError, match="no sensitivity for 7 of the 14 layers"):
        qplan.plan_run(_cfg(["quant.plan.bits=3.0", "quant.plan.method=fisher", "quant.include=[model.layers.0.*,model.layers.1.*]",
                             f"quant.plan.sensitivity={saved}"], tmp_path), model, data)
    with pytest.raises(UserError, match="no such file"):
        qplan.plan_run(_cfg(["quant.plan.bits=3.0", f"quant.plan.sensitivity={tmp_path / 'none.json'}"], tmp_path), model, data)


def test_qat_plan_cli_writes_a_quant_yaml_that_qat_train_reads(tmp_path):
    out = tmp_path / "conf" / "quant" / "mix.yaml"
    r = subprocess.run([sys.executable, "-m", "qat.plan", "recipe=smollm2_w4_lsq", *SMALL, *BLOCK0, "quant.plan.bits=3.0",
                        "quant.plan.method=fisher", f"quant.plan.out={out}", f"hydra.run.dir={tmp_path / 'run'}"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "average" in r.stdout and "model.layers.0.mlp.down_proj" in r.stdout
    cfg = compose(["recipe=smollm2_w4_lsq", "quant=mix", f"hydra.searchpath=[file://{tmp_path / 'conf'}]"])
    assert len(cfg.quant.rules) == 7 and cfg.quant.include == ["model.layers.0.*"]
    assert set(json.loads(out.with_suffix(".json").read_text())["sensitivity"]) == {r.pattern for r in cfg.quant.rules}


def test_qat_train_plans_then_trains(tmp_path):
    cfg = _cfg(["quant.plan.bits=3.0", "quant.plan.method=fisher", "debug=fast", "logger=default", "~callbacks.checkpoint",
                "eval.ood=null", "export.enabled=false"], tmp_path)
    train.run(cfg)
    png = (tmp_path / "plan.png").read_bytes()  # the plot: in the run directory, and as an image of the (offline) wandb run
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert sorted((tmp_path / "wandb").glob("offline-run-*/files/media/images/plan_*.png"))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["plan"]["average_bits"] <= 3.0 and metrics["plan"]["method"] == "fisher"
    saved = OmegaConf.load(tmp_path / "config.yaml")  # what qat-eval rebuilds the model from: the rules, not a new plan
    assert len(saved.quant.rules) == 7
    assert (tmp_path / "plan.yaml").exists() and (tmp_path / "plan.json").exists()
