"""qat-train end to end: every recipe runs a few steps, the config tree instantiates, resume is exact,
wandb holds what was logged, and bad input ends in one clear line through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from qat import train
from qat.config import compose, config_dir, recipe_names, recipes_dir
from qat.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
RECIPES = recipe_names()
# small data so that a step takes a fraction of a second on the real models
LM_SMALL = ["data.seq_len=32", "data.batch_size=2", "data.eval_batch_size=2", "data.heldout_tokens=64"]
SENT_SMALL = ["data.max_length=32", "data.batch_size=4", "data.heldout_sentences=8"]


def cfg_for(overrides: list[str], run_dir: Path):
    cfg = compose(overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
    return cfg


def small(recipe: str) -> list[str]:
    return SENT_SMALL if recipe.startswith("minilm") else LM_SMALL


# W4A4 NVFP4 is the recipes' slowest step on CPU (activations fake-quantized per token too): its own run is slow-marked
@pytest.mark.parametrize("recipe", [pytest.param(r, marks=pytest.mark.slow) if r == "smollm2_nvfp4_w4a4" else r for r in RECIPES])
def test_every_recipe_runs_a_few_steps(recipe, tmp_path):
    cfg = cfg_for([f"recipe={recipe}", "debug=fast", "logger=csv", "~callbacks.checkpoint", *small(recipe)], tmp_path)
    value = train.run(cfg)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    metric = "cos" if recipe.startswith("minilm") else "ppl"
    for key in (f"{metric}_fp", f"{metric}_ptq", f"{metric}_qat", "steps", "tokens", "seconds", "peak_rss_mb", "quant"):
        assert key in metrics, key
    assert metrics["steps"] == 2 and metrics["tokens"] > 0
    assert value == metrics[f"{metric}_qat"] and value == value  # finite, not NaN
    assert metrics["recipe"] == recipe
    assert (tmp_path / "quant_stats.jsonl").exists() or (tmp_path / "csv" / "quant_stats.jsonl").exists()
    assert not list(tmp_path.rglob("*.ckpt"))  # ~callbacks.checkpoint: no checkpoint at all (not Lightning's default)


def test_recipes_open_with_their_command_and_one_line_of_result():
    for recipe in RECIPES:
        text = (recipes_dir() / "experiment" / f"{recipe}.yaml").read_text()
        head = text.split("defaults:")[0]
        assert "qat-train" in head or "make train" in head, recipe
        assert sum(line.startswith("# Result") for line in head.splitlines()) == 1, recipe


def _group_options():
    # trainer options are tested in tests/test_distributed.py (the GPU ones are refused on a CPU-only machine)
    for group in sorted(p for p in config_dir().iterdir() if p.is_dir() and p.name not in ("hydra", "trainer")):
        for option in sorted(group.glob("*.yaml")):
            yield group.name, option.stem


@pytest.mark.parametrize("group,option", list(_group_options()))
def test_every_config_option_composes_and_instantiates(group, option, tmp_path):
    overrides = [f"plan@quant.plan={option}" if group == "plan" else f"{group}={option}"]  # plan is mounted at quant.plan
    if group == "data" and option == "sentences":
        overrides.append("model=minilm")
    if group == "module" and option == "zo":  # forward-only: its optimizer, and the toy model's weights move
        overrides += ["optim=zo_sgd", "module.train=[weights]"]
    if group == "module" and option == "embedding_kd":  # the default recipe distills a causal LM (objective.kd_weight)
        overrides.append("recipe=minilm_w4_kd")
    cfg = cfg_for(overrides, tmp_path)
    node = {"debug": cfg.trainer, "plan": cfg.quant.plan}.get(group) or cfg[group]
    container = OmegaConf.to_container(node, resolve=True)
    if group == "module":
        module = instantiate(node, model=torch.nn.Linear(4, 4), teacher=torch.nn.Linear(4, 4))
        assert module.configure_optimizers()
    elif group == "data":
        from qat.models import load_model

        _, tok = load_model(cfg.model.name)
        assert instantiate(node, tokenizer=tok) is not None
    elif group == "quant":
        for key in ("weight", "activation"):
            if node.get(key) is not None:
                assert instantiate(node[key])() is not None
    elif group == "plan":
        for candidate in node.candidates.values():
            assert instantiate(candidate)() is not None
    elif group == "adapter":
        adapter = instantiate(node)
        assert callable(adapter.apply_) and isinstance(adapter.callbacks(), list)
    elif group in ("optim",):
        opt = instantiate(node.optimizer)([torch.nn.Parameter(torch.zeros(2))])
        assert instantiate(node.scheduler)(opt, total_steps=10) is not None
    elif group in ("logger", "callbacks"):
        os.environ.setdefault("WANDB_MODE", "offline")
        for sub in node.values():
            assert instantiate(sub) is not None
    elif group == "trainer" or group == "debug":
        assert instantiate(node, logger=False, enable_checkpointing=False) is not None
    else:
        assert container


def _csv_losses(run_dir: Path) -> dict[int, float]:
    import csv

    rows = list(csv.DictReader(open(next(run_dir.rglob("metrics.csv")))))
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


@pytest.mark.slow  # three SmolLM2 runs (~45 s); LastCheckpoint alone is tests/lit/test_checkpoint.py
def test_resume_matches_an_uninterrupted_run(tmp_path):
    common = ["recipe=smollm2_w4_lsq", "debug=fast", "logger=csv", "eval.before=false", *LM_SMALL, "trainer.deterministic=true",
              "callbacks.checkpoint.every_n_train_steps=3"]
    # checkpoints every 3 steps: the final step is saved all the same (last.ckpt is the trained model)
    full = tmp_path / "full"
    train.run(cfg_for([*common, "trainer.max_steps=4"], full))
    assert torch.load(full / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 4
    first = tmp_path / "first"  # stopped after 2 steps (saved as the final step), same 4-step schedule
    train.run(cfg_for([*common, "trainer.max_steps=2", "module.total_steps=4"], first))
    ckpt = first / "checkpoints" / "last.ckpt"
    assert ckpt.exists()
    resumed = tmp_path / "resumed"
    train.run(cfg_for([*common, "trainer.max_steps=4", f"ckpt_path={ckpt}"], resumed))
    a, b = _csv_losses(full), _csv_losses(resumed)
    assert 3 in a and 3 in b
    assert a[3] == b[3]  # the loss of the 4th step, bitwise, quantizer state included
    m_full = json.loads((full / "metrics.json").read_text())
    m_res = json.loads((resumed / "metrics.json").read_text())
    assert m_full["ppl_qat"] == m_res["ppl_qat"]
    # qat-eval rebuilds the trained model from the run directory alone
    from qat.evaluate import evaluate

    assert evaluate(full)["ppl"] == pytest.approx(m_full["ppl_qat"], rel=1e-6)
    with pytest.raises(UserError, match="last.ckpt"):
        evaluate(tmp_path)


def test_wandb_offline_run_holds_metrics_and_histograms(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    cfg = cfg_for(["debug=fast", "~callbacks.checkpoint", *LM_SMALL], tmp_path)
    train.run(cfg)
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("wandb_reader", ROOT / "tests" / "lit" / "wandb_reader.py")
    reader = module_from_spec(spec)
    sys.modules[spec.name] = reader  # its dataclasses look their module up
    spec.loader.exec_module(reader)
    run = reader.read_run(tmp_path)
    keys = run.keys()
    assert "train/loss" in keys and "val/ppl" in keys and "ppl_qat" in keys
    assert any(k.startswith("quant_hist/") for k in keys)
    assert "smollm2_ternary_seq" in json.dumps(run.config, default=str)  # the resolved config was logged
    assert any(k.startswith("quant/model.layers.0.") for k in keys)  # per-layer scalars


def test_a_finished_run_directory_is_never_overwritten(tmp_path):
    cfg = cfg_for(["recipe=smollm2_w4_lsq", "debug=fast", "logger=csv", "~callbacks.checkpoint", "eval.before=false", *LM_SMALL], tmp_path)
    train.run(cfg)
    before = (tmp_path / "metrics.json").read_text()
    with pytest.raises(UserError, match="already holds a finished run"):
        train.run(cfg)
    assert (tmp_path / "metrics.json").read_text() == before


def cli(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline")
    env.pop("QAT_TRACEBACK", None)
    cmd = [sys.executable, "-m", "qat.train", f"hydra.run.dir={tmp_path / 'run'}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)


# Mistakes Hydra sees before our code runs: through the real command line, in a process of its own.
@pytest.mark.parametrize(
    "args, words",
    [
        (["recipe=no_such_recipe"], ["no_such_recipe", "recipe"]),
        (["quant.weight.bitz=3"], ["bitz"]),
        (["hydra.run.dir=/proc/qat-run"], ["/proc/qat-run"]),
    ],
    ids=["unknown-recipe", "mistyped-key", "unwritable-dir"],
)
def test_cli_bad_input_is_one_clear_message(args, words, tmp_path):
    out = cli(*args, tmp_path=tmp_path)
    assert out.returncode != 0
    err = out.stderr
    assert "Traceback" not in err, err[-3000:]
    for w in words:
        assert w in err, (w, err[-3000:])


# Mistakes our code finds: each one a UserError naming the problem, from qat-train's task function (what the
# command line calls once Hydra has composed the config), in this process, so that each case costs its checks
# and not a fresh interpreter. That a UserError becomes one line with status 2 is the test below.
@pytest.mark.parametrize(
    "args, words",
    [
        (["recipe=smollm2_w4_lsq", "quant.weight.bits=0"], ["quant.weight", "bits=0", "2 to 8"]),
        (["recipe=smollm2_w4_lsq", "data.source=/nonexistent/corpus.txt"], ["/nonexistent/corpus.txt"]),
        (["recipe=smollm2_w4_lsq", "quant.weight.group_size=100", *LM_SMALL], ["group_size=100", "in_features=576", "valid group sizes"]),
        (["recipe=smollm2_w4_lsq", "eval.ood=/nonexistent/other.txt"], ["eval.ood", "/nonexistent/other.txt"]),
        (["recipe=smollm2_w4_lsq", "eval.tasks=[hellaswagg]"], ["eval.tasks", "hellaswagg", "hellaswag"]),
        (["recipe=smollm2_w4_zo_scales", "eval.fp_finetune=true"], ["eval.fp_finetune", "module=zo"]),
        (["recipe=smollm2_w4_lsq", "+quant.weight.bitz=3"], ["quant.weight", "bitz", "qat.quantizers.lsq.LSQ"]),
        (["module=embedding_kd"], ["module.objective", "EmbeddingDistill", "smollm2-135m is a causal-lm model", "recipe=minilm_w4_kd"]),
        (["recipe=smollm2_w4_lsq", "+module.objective.kd_wieght=1"], ["module.objective", "kd_wieght", "qat.lit.objectives.CausalLM"]),
        (["recipe=smollm2_w4_lsq", "module.objective.kd_weight=2"], ["module.objective", "kd_weight=2", "[0, 1]"]),
    ],
    ids=["bits-0", "missing-data", "group-size", "missing-ood", "unknown-task", "fp-finetune-forward-only",
         "unexpected-quantizer-setting", "objective-for-another-model", "unexpected-objective-setting", "kd-weight-2"],
)
def test_each_mistake_in_a_run_is_a_user_error_that_names_it(args, words, tmp_path, monkeypatch):
    monkeypatch.setenv("QAT_TRACEBACK", "1")  # main re-raises the UserError instead of printing it and exiting
    monkeypatch.setenv("WANDB_MODE", "offline")
    with pytest.raises(UserError) as error:
        train.main(cfg_for(args, tmp_path / "run"))
    for w in words:
        assert w in str(error.value), (w, str(error.value))


def test_main_turns_a_user_error_into_one_line_and_lets_any_other_error_through(tmp_path, capsys, monkeypatch):
    """Only ``qat.errors.UserError`` becomes ``qat-train: error: ...`` with status 2; an error that is not the
    user's (here a TypeError from inside the run: the output directory is an int, which the config
    system would never hand over) propagates with its traceback."""
    monkeypatch.delenv("QAT_TRACEBACK", raising=False)
    cfg = cfg_for(["recipe=smollm2_w4_lsq", "quant.weight.bits=0"], tmp_path / "user")
    with pytest.raises(SystemExit) as exit_info:
        train.main(cfg)  # Hydra's decorator passes a given config straight to the task function
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("qat-train: error: quant.weight:") and err.count("\n") == 1, err
    cfg = cfg_for(["recipe=smollm2_w4_lsq"], tmp_path / "bug")
    with open_dict(cfg):
        cfg.paths.output_dir = 0
    with pytest.raises(TypeError):
        train.main(cfg)


def test_a_run_exports_a_packed_model_that_reproduces_it(tmp_path):
    # float32 plain tensors (the default stores them in float16): the logits bitwise
    cfg = cfg_for(["recipe=smollm2_w4_lsq", "debug=fast", "logger=csv", "eval.before=false", "export.enabled=true",
                   "export.unquantized_dtype=float32", *LM_SMALL], tmp_path)
    train.run(cfg)
    assert json.loads((tmp_path / "metrics.json").read_text())["export"] == str(tmp_path / "export")
    assert json.loads((tmp_path / "export" / "quant_config.json").read_text())["unquantized_dtype"] == "float32"
    import qat
    from qat.config import build_model, load_run_config

    trained, tok, _ = build_model(load_run_config(tmp_path), tmp_path / "checkpoints" / "last.ckpt")
    loaded = qat.load_packed(tmp_path / "export")
    ids = tok("Packed weights, exactly as trained.", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, trained.eval()(ids).logits)


@pytest.mark.slow
def test_export_can_be_switched_off(tmp_path):
    cfg = cfg_for(["recipe=smollm2_w4_lsq", "debug=fast", "logger=csv", "~callbacks.checkpoint", "eval.before=false", "export.enabled=false",
                   *LM_SMALL], tmp_path)
    train.run(cfg)
    assert not (tmp_path / "export").exists() and "export" not in json.loads((tmp_path / "metrics.json").read_text())


@pytest.mark.slow  # two SmolLM2 runs (~18 s); the chunked loss alone against the full one: tests/lit/test_chunked_loss.py
def test_memory_switches_train_to_the_same_loss(tmp_path):
    """Chunked loss and gradient checkpointing change memory, not the trajectory (same held-out result).

    Plain SGD: Adam's first step is about lr * sign(g), which turns float summation-order noise in
    near-zero gradient entries into whole steps; SGD keeps the two runs within float noise.
    """
    base = ["recipe=smollm2_w4_l4q", "debug=fast", "logger=csv", "~callbacks.checkpoint", "eval.before=false", "export.enabled=false",
            "trainer.max_steps=2", "optim.scheduler.warmup_steps=0", "trainer.deterministic=true", "optim.optimizer._target_=torch.optim.SGD",
            "~optim.optimizer.betas", "~optim.optimizer.eps", "optim.optimizer.lr=0.05", *LM_SMALL]
    values = []
    for i, extra in enumerate([["eval.before=true"], ["model.gradient_checkpointing=true", "module.objective.chunk_tokens=16"]]):
        values.append(train.run(cfg_for(base + extra, tmp_path / str(i))))
    start = json.loads((tmp_path / "0" / "metrics.json").read_text())["ppl_ptq"]
    assert abs(values[0] - start) > 1e-3 * start  # the two steps moved the model
    assert values[0] == pytest.approx(values[1], rel=1e-5)


def test_a_run_reports_both_texts_the_fp_fine_tune_and_tasks_and_qat_eval_repeats_them(tmp_path, local_task, monkeypatch):
    """eval.ood, eval.fp_finetune and eval.tasks in one run: every model on every text and task, the gaps by
    their formula, the FP fine-tune read back from the cache by an identical run, qat-eval on the run and its export."""
    from qat.evaluate import evaluate
    from qat.metrics import gap_recovered
    from tests.test_tasks import hand_accuracy

    monkeypatch.setenv("QAT_CACHE", str(tmp_path / "cache"))
    folder, task = local_task
    args = ["recipe=smollm2_w4_lsq", "debug=fast", "logger=csv", "export.enabled=true", *LM_SMALL,
            "eval.fp_finetune=true", f"eval.tasks=[{task}]", f"eval.tasks_include={folder}"]
    train.run(cfg_for(args, tmp_path / "a"))
    m = json.loads((tmp_path / "a" / "metrics.json").read_text())
    for name in ("fp", "ptq", "fp_ft", "qat"):
        assert m[f"ppl_{name}"] > 1 and m[f"ppl_{name}_ood"] > 1, name
        assert m["tasks"][task][name] in (0.0, 1 / 3, 2 / 3, 1.0), name
    assert m["ppl_fp_ft"] < m["ppl_fp"]  # two steps on the training corpus move the FP model towards it
    assert m["gap_recovered_ood"] == pytest.approx(gap_recovered(m["ppl_ptq_ood"], m["ppl_qat_ood"], m["ppl_fp_ood"]))
    assert m["gap_recovered_fp_ft"] == pytest.approx(gap_recovered(m["ppl_ptq"], m["ppl_qat"], m["ppl_fp_ft"]))
    from qat.models import load_model

    fp, tok = load_model("smollm2-135m")
    assert m["tasks"][task]["fp"] == pytest.approx(hand_accuracy(fp, tok))

    train.run(cfg_for(args + ["export.enabled=false"], tmp_path / "b"))  # same FP fine-tune settings: from the cache
    b = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert (b["ppl_fp_ft"], b["ppl_fp_ft_ood"], b["tasks"][task]["fp_ft"]) == (m["ppl_fp_ft"], m["ppl_fp_ft_ood"], m["tasks"][task]["fp_ft"])
    assert b["ppl_qat"] == m["ppl_qat"]  # the references before it leave the QAT run as it was

    options = {"include_path": folder}
    run = evaluate(tmp_path / "a", tasks=[task], **options)
    assert run["ppl"] == pytest.approx(m["ppl_qat"], rel=1e-6)
    assert run["tasks"][task]["value"] == m["tasks"][task]["qat"]
    exported = evaluate(tmp_path / "a" / "export", tasks=[task], **options)
    assert exported["tasks"][task]["value"] == m["tasks"][task]["qat"]
    with pytest.raises(UserError, match="--tasks"):
        evaluate(tmp_path / "a" / "export")


def test_the_fp_fine_tune_is_keyed_by_what_it_trains_on_and_with():
    """Recipes that differ only in the objective or in quantizer and adapter learning rates share one FP
    fine-tune; the weight learning rate, the steps and the data each give another."""
    key = {name: train.fp_finetune_settings(compose([f"recipe={name}"])) for name in
           ("smollm2_w4_l4q", "smollm2_w4_peqa", "smollm2_w4_lsq", "smollm2_w3_l4q", "smollm2_w3_qlora")}
    assert key["smollm2_w4_l4q"] == key["smollm2_w4_peqa"]  # quant_lr 1e-4 for both, adapter_lr 3e-4 against none
    assert key["smollm2_w3_l4q"] == key["smollm2_w3_qlora"]  # quant_lr 2e-4 against none
    assert key["smollm2_w4_l4q"] != key["smollm2_w4_lsq"]  # weight lr 1e-4 against 2e-5
    assert key["smollm2_w4_l4q"] != key["smollm2_w3_l4q"]  # 60 steps against 100
    kd = train.fp_finetune_settings(compose(["recipe=smollm2_w4_lsq", "module.objective.kd_weight=1"]))
    assert kd == key["smollm2_w4_lsq"]
    other_data = train.fp_finetune_settings(compose(["recipe=smollm2_w4_lsq", "data.seq_len=128"]))
    assert other_data != key["smollm2_w4_lsq"]


def test_a_run_shorter_than_its_warmup_warms_up_over_all_its_steps(tmp_path, caplog):
    cfg = cfg_for(["recipe=smollm2_w4_lsq", "trainer.max_steps=2"], tmp_path)
    assert cfg.optim.scheduler.warmup_steps == 5
    train.fit_warmup(cfg)
    assert cfg.optim.scheduler.warmup_steps == 2 and "warming up over all 2 steps" in caplog.text
    cfg = cfg_for(["recipe=smollm2_w4_lsq"], tmp_path)
    train.fit_warmup(cfg)
    assert cfg.optim.scheduler.warmup_steps == 5  # a run longer than its warm-up keeps it
