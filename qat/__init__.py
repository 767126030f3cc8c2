"""qat: quantization-aware training for pretrained models.

>>> import qat, functools
>>> from qat.quantizers import LSQ
>>> qat.quantize_(model, weight=functools.partial(LSQ, bits=4, granularity="group", group_size=32))  # doctest: +SKIP
"""

from qat.convert import calibrate_, dequantize_, iter_codes, quantize_, quantized_layers
from qat.nn import QuantEmbedding, QuantLinear

__all__ = ["quantize_", "dequantize_", "calibrate_", "quantized_layers", "iter_codes", "QuantLinear", "QuantEmbedding"]
__all__ += ["export_", "load_packed"]


def __getattr__(name):
    # Export pulls in safetensors and transformers: imported on first use, not with qat.
    if name in ("export_", "load_packed"):
        import qat.export

        return getattr(qat.export, name)
    raise AttributeError(f"module 'qat' has no attribute {name!r}")
__version__ = "0.1.0"
