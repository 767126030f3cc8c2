"""Shared by the export format tests: a SmolLM2 with a different grid in each listed block."""

import pytest
from torch import nn

from qat.nn.linear import QuantLinear


def _quantize_blocks_(model, grids):
    """Give each listed decoder block's Linear layers their own grid (``quantize_`` refuses a model
    that is already partly quantized, so the layers are swapped here directly)."""
    for i, factory in grids.items():
        block = model.model.layers[i]
        for name, m in list(block.named_modules()):
            if type(m) is nn.Linear:
                parent, _, child = name.rpartition(".")
                setattr(block.get_submodule(parent), child, QuantLinear.from_float(m, factory()))
    return model


@pytest.fixture(scope="session")
def quantize_blocks():
    """``quantize_blocks(model, {block index: quantizer factory})`` -> the model, changed in place."""
    return _quantize_blocks_
