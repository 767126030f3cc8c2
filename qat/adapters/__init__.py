"""Adapters on quantized models: L4Q, plain LoRA beside a quantized base, scale-only tuning, LoftQ.

Each mode is a small object built from YAML (``configs/adapter/``) with ``apply_(model)`` (run
right after ``qat.quantize_``) and ``callbacks()`` (Lightning callbacks it needs). LoRA-style modes
are declared with ``peft.LoraConfig`` and saved in peft's adapter format; ``merge_adapters_``
turns any of them back into ordinary quantized layers for export.
"""

from qat.adapters.io import load_adapters, save_adapters
from qat.adapters.l4q import L4Q, L4QLinear, L4QWarmup, l4q_linear
from qat.adapters.loftq import loftq, loftq_init_
from qat.adapters.lora import LoRA
from qat.adapters.merge import merge_adapters_
from qat.adapters.scale_only import ScaleOnly, ScaleOnlyLinear

__all__ = [
    "L4Q", "L4QLinear", "L4QWarmup", "l4q_linear", "LoRA", "ScaleOnly", "ScaleOnlyLinear",
    "loftq", "loftq_init_", "merge_adapters_", "save_adapters", "load_adapters",
]
