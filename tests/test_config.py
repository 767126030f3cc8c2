"""qat.config: per-layer rules from YAML to quantize_'s factories, and a run with them end to end."""

import json

import pytest
from omegaconf import open_dict

from qat import train
from qat.config import compose, map_factories, quantizer_factories
from qat.errors import UserError
from qat.quantizers import Ternary

RULES = ('quant.rules=[{pattern: "model.layers.0.*", weight: {bits: 8}},'
         '{pattern: "*.mlp.*", weight: {_target_: qat.quantizers.Ternary, _partial_: true, method: absmean}},'
         '{pattern: "*.k_proj", weight: null}]')


def test_rules_merge_onto_the_default_replace_with_a_target_and_null_leaves_float():
    factories = quantizer_factories(compose(["recipe=smollm2_w4_lsq", RULES]))
    (p0, r0), (p1, r1), (p2, r2) = factories["rules"]
    assert (p0, p1, p2) == ("model.layers.0.*", "*.mlp.*", "*.k_proj")
    q = r0["weight"]()  # {bits: 8} merged onto quant.weight: LSQ, groups of 32 kept
    assert type(q).__name__ == "LSQ" and q.grid.bits == 8 and q.group_size == 32
    assert isinstance(r1["weight"](), Ternary) and r1["weight"]().granularity == "channel"  # its own target, its own defaults
    assert r2 == {"weight": None}
    rtn = map_factories(factories, lambda f: "rtn")
    assert rtn["weight"] == "rtn" and rtn["rules"][2] == ("*.k_proj", {"weight": None}) and rtn["rules"][0][1] == {"weight": "rtn"}


def test_bad_rules_are_named():
    with pytest.raises(UserError, match=r"quant.rules\[0\]: a rule is"):
        quantizer_factories(compose(["recipe=smollm2_w4_lsq", 'quant.rules=[{pattern: "*", bitz: 2}]']))
    with pytest.raises(UserError, match=r"quant.rules\[0\].activation: quant.activation is null"):
        quantizer_factories(compose(["recipe=smollm2_w4_lsq", 'quant.rules=[{pattern: "*", activation: {bits: 8}}]']))


def test_a_run_with_rules_quantizes_each_layer_as_its_rule_says(tmp_path):
    rules = ('quant.rules=[{pattern: "model.layers.0.*", weight: {bits: 8}},'
             '{pattern: "*.mlp.*", weight: {_target_: qat.quantizers.MinMax, _partial_: true, bits: 2, granularity: group, '
             'group_size: 64, symmetric: false}}]')
    cfg = compose(["recipe=smollm2_w4_lsq", rules, "debug=fast", "logger=csv", "~callbacks.checkpoint", "data.seq_len=32",
                   "data.batch_size=2", "data.eval_batch_size=2", "data.heldout_tokens=64", "eval.ood=null", "export.enabled=false"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    train.run(cfg)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [r["pattern"] for r in metrics["quant"]["rules"]] == ["model.layers.0.*", "*.mlp.*"]
    assert metrics["ppl_ptq"] > metrics["ppl_fp"]  # the PTQ reference took the rules too (2-bit MLPs)
