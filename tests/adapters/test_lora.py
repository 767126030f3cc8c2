"""Plain LoRA beside a round-to-nearest base, peft's adapter format (save / load), and the errors users see."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig
from peft.tuners.lora import Linear as PeftLoraLinear
from safetensors.torch import load_file
from torch import nn

import qat
from qat.adapters import L4Q, LoRA, load_adapters, merge_adapters_, save_adapters
from qat.errors import UserError
from qat.quantizers import LSQ, MinMax

ROOT = Path(__file__).resolve().parents[2]
W3 = functools.partial(LSQ, bits=3, granularity="group", group_size=16, init="minmax")
W4_PLUS = functools.partial(LSQ, bits=4, granularity="group", group_size=16, offset=True, symmetric=False)


class Tiny(nn.Module):
    def __init__(self, hidden: int = 48):
        super().__init__()
        self.up = nn.Linear(32, hidden, bias=False)
        self.down = nn.Linear(hidden, 32, bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def quantized_tiny(factory=W3, seed: int = 0, hidden: int = 48) -> Tiny:
    torch.manual_seed(seed)
    m = Tiny(hidden)
    qat.quantize_(m, weight=factory)
    return m


def config(**kw) -> LoraConfig:
    return LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["up", "down"], **kw})



def test_lora_sits_beside_a_frozen_round_to_nearest_base(train_steps):
    m = quantized_tiny()
    x = torch.randn(5, 32)
    rtn = quantized_tiny(functools.partial(MinMax, bits=3, granularity="group", group_size=16))
    LoRA(config()).apply_(m)
    assert isinstance(m.up, PeftLoraLinear) and isinstance(m.up.base_layer.weight_quantizer, MinMax)
    assert torch.equal(m(x), rtn(x))  # B = 0: exactly the round-to-nearest model
    assert {n for n, p in m.named_parameters() if p.requires_grad} == {
        f"{layer}.lora_{f}.default.weight" for layer in ("up", "down") for f in "AB"
    }
    train_steps(m, 32, 32)
    layer = m.up
    a, b, c = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    w0 = layer.base_layer.weight.detach().clone()
    merge_adapters_(m)
    assert type(m.up) is qat.QuantLinear
    # merging re-quantizes W0 + c B A with the base quantizer (QLoRA's gap, which L4Q closes)
    torch.testing.assert_close(m.up(x), F.linear(x, m.up.weight_quantizer(w0 + (b @ a) * c)), rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["lora", "l4q"])
def test_peft_format_save_and_load_round_trip(mode, tmp_path, train_steps):
    factory, build = (W3, LoRA) if mode == "lora" else (W4_PLUS, L4Q)
    m = quantized_tiny(factory)
    build(config()).apply_(m)
    train_steps(m, 32, 32)
    m.eval()
    path = save_adapters(m, tmp_path / "adapter")
    saved = json.loads((path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["r"] == 4 and saved["lora_alpha"] == 8
    tensors = load_file(path / "adapter_model.safetensors")
    assert "base_model.model.up.lora_A.weight" in tensors and "base_model.model.down.lora_B.weight" in tensors
    if mode == "l4q":  # the trained LSQ+ step and offset travel in the adapter file
        assert "base_model.model.up.lora_quantizer.scale" in tensors
    assert LoraConfig.from_pretrained(str(path)).target_modules == {"up", "down"}

    fresh = quantized_tiny(factory).eval()
    load_adapters(fresh, path)
    x = torch.randn(6, 32)
    assert torch.equal(fresh(x), m(x))
    assert [n for n, p in fresh.named_parameters() if p.requires_grad] == [n for n, p in m.named_parameters() if p.requires_grad]


def test_loading_adapters_from_another_base_model_is_a_clear_error(tmp_path):
    m = quantized_tiny()
    LoRA(config()).apply_(m)
    save_adapters(m, tmp_path / "a")
    with pytest.raises(UserError, match="another base model.*load them into the base model"):
        load_adapters(quantized_tiny(seed=1), tmp_path / "a")  # same shapes, other weights
    with pytest.raises(UserError, match="another base model"):
        load_adapters(quantized_tiny(hidden=64), tmp_path / "a")  # other shapes
    with pytest.raises(UserError, match="not an adapter directory"):
        load_adapters(quantized_tiny(), tmp_path)
    with pytest.raises(UserError, match="no adapters to save"):
        save_adapters(quantized_tiny(), tmp_path / "b")


def test_bad_config_is_a_clear_error():
    with pytest.raises(UserError, match=r"r=64 is larger than min\(in_features, out_features\)=32"):
        LoRA(config(r=64)).apply_(quantized_tiny())
    with pytest.raises(UserError, match=r"target_modules=\['q_proj'\] match no layer.*\.\.\.down, \.\.\.up"):
        LoRA(config(target_modules=["q_proj"])).apply_(quantized_tiny())
    with pytest.raises(UserError, match="LoraConfig"):
        LoRA({"r": 4}).apply_(quantized_tiny())


def cli(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline")
    env.pop("QAT_TRACEBACK", None)
    small = ["data.seq_len=32", "data.batch_size=2", "data.eval_batch_size=2", "data.heldout_tokens=64", "eval.before=false"]
    cmd = [sys.executable, "-m", "qat.train", f"hydra.run.dir={tmp_path / 'run'}", *small, *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)


@pytest.mark.parametrize(
    "args, words",
    [
        (["recipe=smollm2_w4_l4q", "adapter.config.r=1000"], ["r=1000", "min(in_features, out_features)=576", "adapter.config.r"]),
        (["recipe=smollm2_w3_qlora", "adapter.config.target_modules=[qkv]"], ["['qkv']", "match no layer", "q_proj"]),
        (["recipe=smollm2_w4_peqa", "adapter.checkpoint=/nonexistent/last.ckpt"], ["/nonexistent/last.ckpt"]),
    ],
    ids=["rank-too-large", "targets-match-nothing", "missing-checkpoint"],
)
def test_cli_bad_adapter_input_is_one_clear_message(args, words, tmp_path):
    out = cli(*args, tmp_path=tmp_path)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    for w in words:
        assert w in out.stderr, (w, out.stderr[-3000:])


def test_cli_scale_only_codes_from_another_models_checkpoint(tmp_path):
    ckpt = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"model.encoder.layer.0.weight": torch.zeros(2, 2)}}, ckpt)
    out = cli("recipe=smollm2_w4_peqa", f"adapter.checkpoint={ckpt}", tmp_path=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    for w in (str(ckpt), "another base model", "same model and quant settings"):
        assert w in out.stderr, (w, out.stderr[-3000:])
