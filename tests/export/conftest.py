"""Shared by the export format tests: a SmolLM2 with a different grid in each listed block."""

import pytest

from qat.convert import quantize_


def _quantize_blocks_(model, grids):
    """Give each listed decoder block's linear layers their own grid: one ``quantize_`` call with a rule per block."""
    rules = [(f"model.layers.{i}.*", {"weight": factory}) for i, factory in grids.items()]
    return quantize_(model, include=[pattern for pattern, _ in rules], rules=rules)


@pytest.fixture(scope="session")
def quantize_blocks():
    """``quantize_blocks(model, {block index: quantizer factory})`` -> the model, changed in place."""
    return _quantize_blocks_
