"""qat: quantization-aware training for pretrained models.

>>> import qat, functools
>>> from qat.quantizers import LSQ
>>> qat.quantize_(model, weight=functools.partial(LSQ, bits=4, granularity="group", group_size=32))  # doctest: +SKIP
"""

from qat.convert import calibrate_, dequantize_, quantize_, quantized_layers
from qat.nn import QuantEmbedding, QuantLinear

__all__ = ["quantize_", "dequantize_", "calibrate_", "quantized_layers", "QuantLinear", "QuantEmbedding"]
__version__ = "0.1.0"
