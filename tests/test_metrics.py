"""Held-out metrics: the share of the quantization gap recovered, by hand."""

import math

import pytest

from qat.metrics import gap_recovered


def test_perplexity_gap_is_measured_on_the_log_scale():
    # log 40 - log 20 = log 2; log 40 - log 10 = log 4: half of the gap in cross-entropy, not 20/30 of it
    assert gap_recovered(40.0, 20.0, 10.0) == pytest.approx(0.5)
    assert gap_recovered(40.0, 10.0, 10.0) == pytest.approx(1.0)
    assert gap_recovered(40.0, 40.0, 10.0) == 0.0
    assert gap_recovered(40.0, 5.0, 10.0) == pytest.approx(1.5)  # past the reference
    assert gap_recovered(40.0, 80.0, 10.0) == pytest.approx(-0.5)  # worse than round-to-nearest


def test_accuracy_gap_is_linear():
    assert gap_recovered(0.25, 0.40, 0.45, log=False) == pytest.approx(0.75)
    assert gap_recovered(0.25, 0.25, 0.45, log=False) == 0.0 and math.copysign(1, gap_recovered(0.25, 0.25, 0.45, log=False)) == 1


@pytest.mark.parametrize("args", [(10.0, 5.0, 10.0), (None, 5.0, 10.0), (math.inf, 5.0, 10.0), (0.0, 5.0, 10.0), (40.0, math.nan, 10.0)])
def test_undefined_gaps_are_none(args):
    assert gap_recovered(*args) is None
