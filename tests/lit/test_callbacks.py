"""QuantStats / layer_stats / PerplexityPlot: hand-computed layer statistics, then a real Trainer run
with CSV and offline W&B loggers whose files are read back."""

import csv
import functools
import importlib.util
import json
import math
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from torch import nn

import qat
from qat.errors import UserError
from qat.lit.callbacks import PerplexityPlot, QuantStats, layer_stats
from qat.nn import QuantLinear
from qat.quantizers import LSQ, MinMax, Ternary


def load_reader():
    """``tests/lit/wandb_reader.py`` as a module (tests are not a package: load it by path)."""
    if "wandb_reader" not in sys.modules:
        spec = importlib.util.spec_from_file_location("wandb_reader", Path(__file__).with_name("wandb_reader.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules["wandb_reader"] = module  # before running it: dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules["wandb_reader"]


read_run = load_reader().read_run


def make_layer(weight, quantizer):
    layer = QuantLinear.from_float(nn.Linear(weight.shape[1], weight.shape[0], bias=False), quantizer)
    layer.weight.data.copy_(weight)
    return layer


# -- layer_stats, by hand ---------------------------------------------------------------------------


def test_ternary_dead_zone_clip_and_flips():
    # Row 0: gamma = mean|w| = 0.2875; w / gamma = 1.39, -0.17, 0.35, -2.09 -> codes 1, 0, 0, -1;
    # -0.6 lands on -0.2875 (error 0.3125 > gamma / 2): clipped. Row 1: gamma = 1, all exact.
    # The step the forward uses is gamma rounded to float16 (what the export stores): 0.28759765625.
    w = torch.tensor([[0.4, -0.05, 0.1, -0.6], [1.0, 1.0, -1.0, 1.0]])
    layer = make_layer(w, Ternary("absmean", granularity="channel", deadzone="tequila"))
    stats, codes = layer_stats(layer)
    assert codes.dtype == torch.int8 and codes.device.type == "cpu"
    assert codes.tolist() == [[1, 0, 0, -1], [1, 1, -1, 1]]
    assert stats["step"] == pytest.approx((0.28759765625 + 1.0) / 2)
    assert stats["zero_frac"] == 2 / 8
    assert stats["clip_frac"] == 1 / 8
    assert stats["flip_frac"] == 0.0

    # 0.1 -> 0.3: gamma = 0.3375, 0.3 / gamma = 0.89 -> code 1 (one flip); the others keep theirs.
    layer.weight.data[0, 2] = 0.3
    stats, codes2 = layer_stats(layer, codes)
    assert codes2.tolist() == [[1, 0, 1, -1], [1, 1, -1, 1]]
    assert stats["flip_frac"] == 1 / 8
    assert stats["zero_frac"] == 1 / 8
    # Unchanged weights: no flip.
    assert layer_stats(layer, codes2)[0]["flip_frac"] == 0.0


def test_lsq_clipped_at_both_ends():
    # 2-bit signed grid [-2, 1], s = 0.5: w / s = -2.6, -0.4, 0.6, 1.8 -> codes -2, 0, 1, 1;
    # -1.3 -> -1.0 (error 0.3) and 0.9 -> 0.5 (error 0.4) exceed s / 2 = 0.25: clipped.
    layer = make_layer(torch.tensor([[-1.3, -0.2, 0.3, 0.9]]), LSQ(bits=2, granularity="tensor"))
    layer.weight_quantizer.scale.data.fill_(0.5)
    stats, codes = layer_stats(layer)
    assert codes.tolist() == [[-2, 0, 1, 1]]
    assert stats == {"step": 0.5, "zero_frac": 0.25, "flip_frac": 0.0, "clip_frac": 0.5}

    layer.weight.data[0, 1] = -0.4  # -0.8 -> -1: one flip, and no zero left
    stats, _ = layer_stats(layer, codes)
    assert stats["flip_frac"] == 0.25 and stats["zero_frac"] == 0.0


def test_clip_uses_each_groups_own_step():
    # Two groups of 8 with steps 0.1 and 1.0; w = 1 everywhere: group 0 clips at 7 * 0.1 = 0.7,
    # group 1 represents 1.0 exactly. A scale broadcast along the wrong axis would get this wrong.
    layer = make_layer(torch.ones(1, 16), LSQ(bits=4, granularity="group", group_size=8))
    layer.weight_quantizer.scale.data.copy_(torch.tensor([0.1, 1.0]).reshape(1, 2, 1))
    stats, _ = layer_stats(layer)
    assert stats["clip_frac"] == 0.5
    assert stats["step"] == pytest.approx((0.0999755859375 + 1.0) / 2)  # 0.1 as the float16 step the forward uses


def test_zero_frac_follows_the_zero_point_not_code_zero():
    # Unsigned 4-bit grid with a zero point: the value 0 is code `zero`, not code 0.
    w = torch.tensor([[-1.0, 0.0, 0.0, 0.5, 2.0, 0.0, 1.0, -0.5]])
    layer = make_layer(w, MinMax(bits=4, granularity="channel", symmetric=False))
    stats, codes = layer_stats(layer)
    assert (codes == 0).sum() == 1  # only the minimum sits on code 0
    assert stats["zero_frac"] == 3 / 8


def test_layer_stats_errors():
    layer = QuantLinear.from_float(nn.Linear(4, 2), None, MinMax(bits=8, granularity="token"))
    with pytest.raises(UserError, match="no weight quantizer"):
        layer_stats(layer)
    layer = make_layer(torch.randn(2, 4), Ternary())
    with pytest.raises(ValueError, match="shape"):
        layer_stats(layer, torch.zeros(4, 2, dtype=torch.int8))
    with pytest.raises(UserError, match="every_n_steps"):
        QuantStats(every_n_steps=0)


def test_perplexity_plot_state_survives_a_resume():
    plot = PerplexityPlot()
    plot.points = [(2, 40.0), (4, 30.5)]
    other = PerplexityPlot()
    other.load_state_dict(plot.state_dict())
    assert other.points == plot.points


# -- a real Trainer, CSV and offline W&B -------------------------------------------------------------


class TinyLM(L.LightningModule):
    """Causal-LM loss on token batches; ``val/ppl`` logged at the end of validation, as QATModule does."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.reference_ppl = {"fp": 250.0, "ptq": 3e7, "broken": math.inf}
        self._val = []

    def training_step(self, batch, batch_idx):
        loss = self.model(input_ids=batch, labels=batch).loss
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self._val.append(self.model(input_ids=batch, labels=batch).loss)

    def on_validation_epoch_end(self):
        self.log("val/ppl", torch.stack(self._val).mean().exp())
        self._val = []

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


@pytest.fixture
def offline_wandb(monkeypatch, tmp_path):
    for var, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true"}.items():
        monkeypatch.setenv(var, value)
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home" / var.lower()))
    yield
    import wandb

    wandb.finish()


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=256
    )
    model = LlamaForCausalLM(config)
    return qat.quantize_(model, weight=functools.partial(Ternary, deadzone="tequila"), include="model.layers.*")


def test_trainer_logs_to_csv_wandb_and_files(tmp_path, offline_wandb):
    import wandb

    model = tiny_llama()
    names = [n for n, _ in qat.quantized_layers(model)]
    assert len(names) == 14  # 2 x (q, k, v, o, gate, up, down)
    g = torch.Generator().manual_seed(0)
    train = torch.utils.data.DataLoader(torch.randint(0, 256, (16, 32), generator=g), batch_size=2)
    val = torch.utils.data.DataLoader(torch.randint(0, 256, (4, 32), generator=g), batch_size=2)
    csv_logger = CSVLogger(tmp_path, name="csv")
    wandb_logger = WandbLogger(project="qat-test", save_dir=str(tmp_path), offline=True)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=4,
        val_check_interval=2,
        limit_val_batches=2,
        num_sanity_val_steps=1,
        log_every_n_steps=1,
        logger=[csv_logger, wandb_logger],
        callbacks=[QuantStats(every_n_steps=2), PerplexityPlot()],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(TinyLM(model), train, val)
    wandb.finish()
    log_dir = Path(csv_logger.log_dir)  # trainer.log_dir: the first logger's

    # quant_stats.jsonl: the initial state, then every 2 steps, every layer.
    lines = [json.loads(line) for line in (log_dir / "quant_stats.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [0, 2, 4]
    assert all(sorted(line["layers"]) == sorted(names) for line in lines)
    assert lines[0]["aggregate"]["flip_frac"] == 0.0
    assert lines[-1]["aggregate"]["flip_frac"] > 0  # lr 1e-2 moves ternary codes within two steps
    assert 0.1 < lines[0]["aggregate"]["zero_frac"] < 0.6

    # CSV: the aggregated scalars, at the steps they describe.
    with open(log_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    for key in ("quant/step_mean", "quant/zero_frac", "quant/zero_frac_mean", "quant/flip_frac", "quant/clip_frac"):
        assert key in rows[0]
    assert sorted(int(r["step"]) for r in rows if r["quant/zero_frac"]) == [0, 2, 4]

    # ppl_curve.json: two validations (the sanity check is not one of them), the finite references.
    curve = json.loads((log_dir / "ppl_curve.json").read_text())
    assert curve["steps"] == [2, 4] and len(curve["qat"]) == 2 and all(v > 1 for v in curve["qat"])
    assert curve["reference"] == {"fp": 250.0, "ptq": 3e7, "broken": None}

    # W&B, read back from the offline run's transaction log.
    run = read_run(tmp_path)
    keys = run.keys()
    layer = names[0]
    for m in ("step", "zero_frac", "flip_frac", "clip_frac"):
        assert f"quant/{layer}/{m}" in keys
        hists = [v for _, v in run.column(f"quant_hist/{m}")]
        assert len(hists) == 3 and all(h["_type"] == "histogram" for h in hists)
    assert [s for s, _ in run.column("quant/zero_frac")] == [0, 2, 4]
    assert run.column(f"quant/{layer}/zero_frac")[0][1] == pytest.approx(lines[0]["layers"][layer]["zero_frac"])
    weight_hists = sorted(k for k in keys if k.startswith("quant_weights/"))
    assert weight_hists == sorted(f"quant_weights/{n}" for n in (names[0], names[7], names[-1]))
    assert sum(run.column(weight_hists[0])[0][1]["values"]) == 4096
    assert "val/ppl" in keys and "train/loss" in keys

    chart = run.config["_wandb"]["visualize"]["ppl_curve"]
    assert chart["panel_config"]["panelDefId"] == "wandb/lineseries/v0"
    table = run.table("ppl_curve_table")
    series = {}
    for row in table["data"]:
        record = dict(zip(table["columns"], row))
        series.setdefault(record["lineKey"], []).append((record["step"], record["lineVal"]))
    assert sorted(series) == ["FP", "PTQ", "QAT"]
    assert series["FP"] == [(2, 250.0), (4, 250.0)]
    assert [v for _, v in series["QAT"]] == pytest.approx(curve["qat"])


def test_no_quantized_layer_warns_and_logs_nothing(tmp_path):
    class Plain(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = nn.Linear(4, 4)

        def training_step(self, batch, batch_idx):
            return self.model(batch).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        log_every_n_steps=1,
        logger=CSVLogger(tmp_path),
        callbacks=[QuantStats(every_n_steps=1)],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.warns(UserWarning, match="no quantized layer"):
        trainer.fit(Plain(), torch.utils.data.DataLoader(torch.randn(4, 4), batch_size=2))
    assert not (Path(trainer.log_dir) / "quant_stats.jsonl").exists()
