"""Quantizers: one family per file. See ``base.py`` for the contract they share."""

from qat.quantizers.base import Codes, Quantizer
from qat.quantizers.fp4 import FP4
from qat.quantizers.fp8 import FP8
from qat.quantizers.frozen import Frozen
from qat.quantizers.lsq import LSQ
from qat.quantizers.lwc import LWC
from qat.quantizers.minmax import MinMax
from qat.quantizers.pact import PACT
from qat.quantizers.ternary import Ternary

__all__ = ["Codes", "Quantizer", "MinMax", "LSQ", "PACT", "LWC", "Ternary", "Frozen", "FP4", "FP8"]
