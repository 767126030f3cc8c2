"""``qat-export`` (qat/export/__main__.py): from a run directory, a checkpoint or an export; one-line errors.

The run directory here is what ``qat-train`` leaves (``config.yaml`` + ``checkpoints/last.ckpt``) for
a tiny Llama and a word-level tokenizer saved on disk, so each export takes a fraction of a second.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

import qat
from qat.config import build_model, load_run_config
from qat.export.__main__ import main

QUANT = {
    "weight": {"_target_": "qat.quantizers.LSQ", "_partial_": True, "bits": 4, "granularity": "group", "group_size": 32},
    "activation": None,
    "include": ["model.layers.*"],
    "exclude": None,
}
IDS = torch.tensor([[1, 5, 9, 33, 70, 2, 11, 4]])


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "</s>", *"the quick brown fox jumps over a lazy dog".split()])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")


def make_run(root, quant=QUANT):
    """A run directory as qat-train writes it, for a tiny Llama."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model_dir = root / "tiny"
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    run = root / "run"
    (run / "checkpoints").mkdir(parents=True)
    cfg = {"model": {"name": str(model_dir), "task": "causal-lm", "dtype": "float32"}, "quant": quant}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    model = qat.quantize_(LlamaForCausalLM.from_pretrained(model_dir), **{k: _factory(v) for k, v in quant.items() if k in ("weight", "activation") and v},
                          include=quant["include"])
    with torch.no_grad():  # "training" moved the weights and the step sizes
        for name, p in model.named_parameters():
            p.mul_(1.05 if "weight_quantizer" in name else 1.01)
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, run / "checkpoints" / "last.ckpt")
    return run


def _factory(node):
    from hydra.utils import instantiate

    return instantiate(node)


def run_main(*args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and err.startswith("qat-export: error: "), err
    return err


@pytest.fixture
def run_dir(tmp_path):
    return make_run(tmp_path)


def test_run_directory_to_packed_export(run_dir, capsys):
    main([str(run_dir), "--unquantized-dtype", "float32"])  # float32 plain tensors: the logits bitwise
    assert capsys.readouterr().out.strip() == str(run_dir / "export")
    model, _, _ = build_model(load_run_config(run_dir), run_dir / "checkpoints" / "last.ckpt")
    loaded = qat.load_packed(run_dir / "export")
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model.eval()(IDS).logits)
    assert (run_dir / "export" / "tokenizer.json").exists()


def test_checkpoint_to_hf_then_export_directory_to_hf(run_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    main([str(run_dir / "checkpoints" / "last.ckpt"), "--format", "hf", "--out", str(tmp_path / "hf")])
    direct = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    main([str(run_dir)])  # packed, then from the packed export to hf: the same codes, the same weights
    main([str(run_dir / "export"), "--format", "hf", "--out", str(tmp_path / "hf2")])
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "hf2")
    a, b = direct.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "hf2" / "quant_config.json").read_text())["format"] == "hf"


def test_bad_input_is_one_line_exit_2(run_dir, tmp_path, capsys):
    err = run_main(str(run_dir), "--format", "onnx", capsys=capsys)
    assert "unknown export format 'onnx'" in err and "packed, hf, gguf, compressed-tensors" in err
    (tmp_path / "taken").mkdir()
    err = run_main(str(run_dir), "--out", str(tmp_path / "taken"), capsys=capsys)
    assert "already exists" in err and "--overwrite" in err
    err = run_main(str(tmp_path / "nowhere"), capsys=capsys)
    assert "does not exist" in err
    err = run_main(str(tmp_path / "tiny"), capsys=capsys)  # a plain model directory, not a run
    assert "checkpoints/last.ckpt" in err
    main([str(run_dir)])
    capsys.readouterr()
    err = run_main(str(run_dir / "export"), "--format", "hf", capsys=capsys)
    assert "--out" in err


def test_a_run_without_quantized_weights_is_refused(tmp_path, capsys):
    act_only = dict(QUANT, weight=None, activation={"_target_": "qat.quantizers.PACT", "_partial_": True, "bits": 8, "signed": True, "alpha": 4.0})
    run = make_run(tmp_path, act_only)
    err = run_main(str(run), capsys=capsys)
    assert "no quantized weights" in err and "quantize_" in err
    assert not (run / "export").exists()


def test_module_entry_point(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-m", "qat.export", str(tmp_path / "missing")], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.startswith("qat-export: error:") and "does not exist" in out.stderr
