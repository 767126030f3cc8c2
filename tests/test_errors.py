"""UserError: the one error type for a user's mistake, how the command-line tools report it, and
real library calls in each area that raise it with a message naming the problem and the fix."""

from __future__ import annotations

import functools
import re

import pytest
import torch
from torch import nn

import qat
from qat.errors import UserError, exit_on_user_error


def raises_exactly(message: str):
    """``pytest.raises(UserError)`` whose message is exactly ``message``."""
    return pytest.raises(UserError, match=f"^{re.escape(message)}$")


# -- the error type and the command-line report ---------------------------------------------------


def test_user_error_is_a_value_error():
    assert issubclass(UserError, ValueError)
    with pytest.raises(ValueError, match="bits=1"):
        raise UserError("bits=1: a grid needs 2 to 8 bits")


def test_exit_on_user_error_prints_one_line_and_exits_2(capsys, monkeypatch):
    monkeypatch.delenv("QAT_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as info:
        exit_on_user_error("qat-train", UserError("bits=1 is not supported: use an integer from 2 to 8"))
    assert info.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "qat-train: error: bits=1 is not supported: use an integer from 2 to 8\n"


def test_qat_traceback_reraises(capsys, monkeypatch):
    monkeypatch.setenv("QAT_TRACEBACK", "1")
    error = UserError("the fix is in the message")
    with pytest.raises(UserError) as info:
        exit_on_user_error("qat-export", error)
    assert info.value is error
    assert capsys.readouterr().err == ""


# -- one real call per area -----------------------------------------------------------------------


def test_grid_unsupported_bits():
    from qat.grid import Grid

    with raises_exactly("bits=1 is not supported: use an integer from 2 to 8 (or a Ternary quantizer for 1.58-bit weights)"):
        Grid(1)


def test_quantizer_settings_and_input():
    from qat.quantizers import LSQ, MinMax

    with raises_exactly("LSQ learns one step per tensor, channel or group; per-token scales are dynamic (use MinMax)"):
        LSQ(granularity="token")
    with raises_exactly("cannot quantize a torch.int32 tensor: quantizers take floating-point tensors"):
        MinMax().init_(torch.ones(2, 4, dtype=torch.int32))


def test_estimator_setting():
    from qat.estimators import DSQ

    with raises_exactly("DSQ alpha must lie in (0, 1), got 1.5"):
        DSQ(alpha=1.5)


def test_quantize_pattern_that_matches_no_layer():
    from qat.quantizers import MinMax

    model = nn.Sequential(nn.Linear(4, 4))
    with raises_exactly("include pattern 'decoder.*' matches no layer; layer names look like: 0, ..."):
        qat.quantize_(model, weight=functools.partial(MinMax, bits=4), include="decoder.*")
    assert type(model[0]) is nn.Linear  # refused before the model changed


def test_data_source_missing_file_and_unknown_extension(tmp_path):
    from qat.lit.data import resolve_source

    missing = tmp_path / "corpus.txt"
    with raises_exactly(f"source '{missing}': no such file or folder"):
        resolve_source(missing)
    table = tmp_path / "corpus.csv"
    table.write_text("text\nhello\n")
    with raises_exactly(f"source '{table}': unknown extension '.csv'; supported: .txt, .md, .json, .jsonl, .parquet"):
        resolve_source(table)


def test_model_file_missing(tmp_path):
    from qat.models import load_model

    gguf = tmp_path / "model.gguf"
    with raises_exactly(f"GGUF file '{gguf}' does not exist"):
        load_model(str(gguf))
    with raises_exactly("dtype must be one of float32, bfloat16, float16 (or the torch dtype); got 'int8'"):
        load_model(str(gguf), dtype="int8")


def test_out_of_domain_text_missing(tmp_path):
    from qat.corpus import licenses_text

    with raises_exactly(
        "the out-of-domain text 'licenses' reads GPL-3, Apache-2.0, MPL-2.0, GFDL-1.3, LGPL-2.1, CC0-1.0, Artistic, BSD "
        f"from {tmp_path} (Debian's package base-files), absent on this system: pass a local .txt file as the source "
        "instead (qat-train eval.ood=PATH)"
    ):
        licenses_text(tmp_path)


def test_export_format_and_directory(tmp_path):
    from qat.export import export_, load_packed
    from qat.export.pack import pack

    with raises_exactly("unknown export format 'onnx'; formats: packed, hf, gguf, compressed-tensors"):
        export_(nn.Linear(2, 2), tmp_path / "out", format="onnx")
    assert not (tmp_path / "out").exists()
    with raises_exactly(f"{tmp_path} is not a qat export directory: it has no quant_config.json"):
        load_packed(tmp_path)
    with raises_exactly("bits=9: packed fields are 1 to 8 bits wide"):
        pack(torch.tensor([0]), 9, 0)


def test_adapter_directory_missing(tmp_path):
    from qat.adapters import load_adapters

    with raises_exactly(f"{tmp_path} is not an adapter directory (qat_adapter.json missing): pass the directory save_adapters wrote"):
        load_adapters(nn.Linear(2, 2), tmp_path)


def test_training_settings():
    from qat.lit.objectives import CausalLM
    from qat.lit.schedules import cosine

    with raises_exactly("kd_weight=2 must lie in [0, 1]"):
        CausalLM(kd_weight=2)
    optimizer = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with raises_exactly("a schedule needs total_steps >= 1, got 0 (set trainer.max_steps)"):
        cosine(optimizer, total_steps=0)


def test_zeroth_order_settings():
    from qat.zo import ZOSGD

    with raises_exactly("eps=0.0 must be > 0"):
        ZOSGD(nn.Linear(2, 2).parameters(), eps=0.0)


def test_sweep_and_task_settings(tmp_path):
    from qat.sweep import summarize
    from qat.tasks import check_tasks

    with raises_exactly("direction='lowest' is not 'minimize' or 'maximize'"):
        summarize(tmp_path, "ppl_qat", "lowest")
    with raises_exactly("no task given: name lm-eval tasks, e.g. hellaswag,arc_easy,piqa,winogrande"):
        check_tasks([" ", ""])
