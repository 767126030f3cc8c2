"""Scale-only tuning: frozen integer codes, trainable step sizes (PEQA; EfficientQAT's E2E-QP).

PEQA (Kim et al., "Memory-Efficient Fine-Tuning of Compressed Large Language Models via sub-4-bit
Integer Quantization", arXiv 2305.14152) and the E2E-QP stage of EfficientQAT (Chen et al.,
arXiv 2407.11062; OpenGVLab/EfficientQAT ``quantize/int_linear_real.py``)::

    W_hat = s * (q - z) (+ beta)         q, z frozen integers; s trains (z or beta optionally)
    dL/ds_g    = sum_{i in g} G_i * (q_i - z_g)          exact: no rounding sits between s and W_hat
    dL/dz_g    = -s_g * sum_{i in g} G_i                 (only with train_zero; z becomes fractional)
    dL/dbeta_g = sum_{i in g} G_i                        (LSQ+ codes' offset, only with train_zero)

The codes are held by ``qat.quantizers.Frozen`` with ``train_scale=True`` (the one class that
holds fixed codes in qat); this module owns the layer and its fused backward. They come from any
quantizer's ``codes(W)``: round-to-nearest at ``quantize_`` time
(``LSQ(init="minmax")`` or ``MinMax``), or a finished QAT run's trained quantizers when a checkpoint
is given. Every ``Codes`` field is kept (zero point, LSQ+ offset), so the forward is
``Codes.dequantize()``, the export's expression, bitwise.

The step sizes (and offsets) are used at float16 precision, straight-through, as every quantizer
uses them (``qat.quantizers.fake_quant.to_export_precision``): the float32 masters train, the
forward and the export see the same float16 values.

Memory: ``ScaleOnlyLinear`` holds the codes as int8 and no float weight at all (a quarter of the
float32 base), and ``_ScaleOnlyLinear`` saves only ``x`` and the codes for the backward, where
``W_hat`` is recomputed; no ``dW`` survives a layer's backward. Fractional zero points (with
``train_zero``) need float storage at export, as QA-LoRA's do (ALGORITHMS.md section 5).
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from qat.convert import _set_module
from qat.errors import UserError
from qat.grid import group_view
from qat.nn.linear import QuantLinear
from qat.quantizers.fake_quant import reduce_to, to_export_precision
from qat.quantizers.frozen import Frozen


class _ScaleOnlyLinear(torch.autograd.Function):
    """``y = x @ W_hat^T + bias`` with ``W_hat = Codes.dequantize()``; the exact gradients of the module docstring."""

    @staticmethod
    def forward(ctx, x, quantizer, bias, scale, zero, offset):
        ctx.quantizer = quantizer
        ctx.save_for_backward(x, bias)
        return F.linear(x, quantizer.dequantize().to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_y):
        x, bias = ctx.saved_tensors
        fq: Frozen = ctx.quantizer
        w_hat = fq.dequantize()
        grad_x = grad_y @ w_hat.to(grad_y.dtype) if ctx.needs_input_grad[0] else None
        grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0).to(bias.dtype) if bias is not None and ctx.needs_input_grad[2] else None
        del w_hat
        g_s = g_z = g_beta = None
        if any(ctx.needs_input_grad[3:]):
            g = grad_y.reshape(-1, grad_y.shape[-1]).float().t() @ x.reshape(-1, x.shape[-1]).float()
            g = group_view(g, fq.granularity, fq.group_size)  # dL/dW_hat, grouped
            if ctx.needs_input_grad[3]:
                centred = group_view(fq.q, fq.granularity, fq.group_size).float()  # q - z
                if fq.zero is not None:
                    centred = centred - fq.zero
                g_s = reduce_to(centred.mul_(g), fq.scale.shape)
            if fq.zero is not None and ctx.needs_input_grad[4]:
                g_z = reduce_to(g, fq.zero.shape) * -to_export_precision(fq.scale.detach())
            if fq.offset is not None and ctx.needs_input_grad[5]:
                g_beta = reduce_to(g, fq.offset.shape)
        return grad_x, None, grad_bias, g_s, g_z, g_beta


class ScaleOnlyLinear(QuantLinear):
    """A linear layer stored as frozen integer codes and trainable scales; no float weight.

    Args:
        quantizer: a ``Frozen`` with trainable scales holding the ``(out, in)`` codes.
        bias: the bias Parameter or None.
        act_quantizer: an input quantizer or None.

    Example:
        >>> layer = ScaleOnlyLinear.from_quant_linear(quant_linear)  # doctest: +SKIP
    """

    def __init__(self, quantizer: Frozen, bias=None, act_quantizer=None):
        nn.Module.__init__(self)
        self.transposed = False
        self.out_features, self.in_features = quantizer.q.shape
        self.register_parameter("weight", None)
        self.bias = bias
        self.weight_quantizer = quantizer
        self.act_quantizer = act_quantizer

    @classmethod
    def from_quant_linear(cls, layer: QuantLinear, train_zero: bool = False) -> ScaleOnlyLinear:
        """Freeze ``layer``'s codes as its quantizer computes them now (``codes(W)``)."""
        if layer.transposed:
            raise UserError("scale-only tuning of transformers' Conv1D layers is not supported; quantize nn.Linear layers")
        src = layer.weight_quantizer
        fq = Frozen.like(src, train_scale=True, train_zero=train_zero).set_codes_(src.codes(layer.latent_weight().detach()))
        return cls(fq, layer.bias, layer.act_quantizer)

    def latent_weight(self) -> torch.Tensor:
        return self.weight_quantizer.dequantize().detach()

    def quantized_weight(self):
        return self.weight_quantizer.dequantize(), None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_quantizer is not None:
            x = self.act_quantizer(x)
        fq = self.weight_quantizer
        return _ScaleOnlyLinear.apply(x, fq, self.bias, fq.scale, fq.zero, fq.offset)

    def to_quant_linear(self) -> QuantLinear:
        """An ordinary ``QuantLinear`` with the dequantized weight as its (frozen) latent and these frozen codes."""
        w = nn.Parameter(self.latent_weight().clone(), requires_grad=False)
        return QuantLinear(w, self.bias, self.weight_quantizer, self.act_quantizer)

    def to_float(self) -> nn.Module:
        return self.to_quant_linear().to_float()


class ScaleOnly:
    """The scale-only mode (PEQA / E2E-QP): freeze every quantized layer's codes, train its scales.

    Args:
        train_zero: train zero points / offsets too.
        checkpoint: a Lightning checkpoint of a finished QAT run of the same model and quantization
            (``outputs/.../checkpoints/last.ckpt``) whose trained quantizers give the codes; None
            freezes the codes of the quantizers as ``quantize_`` initialised them (round-to-nearest
            with ``init: minmax``).

    Raises:
        UserError: no quantized layer; a checkpoint from another model (missing or mis-shaped keys);
            a checkpoint path that does not exist.

    Example:
        >>> qat.quantize_(model, weight=partial(LSQ, bits=4, granularity="group", group_size=32, init="minmax"))  # doctest: +SKIP
        >>> ScaleOnly().apply_(model)  # doctest: +SKIP
    """

    mode = "scale_only"

    def __init__(self, train_zero: bool = False, checkpoint: str | None = None):
        self.train_zero = bool(train_zero)
        self.checkpoint = checkpoint

    def apply_(self, model: nn.Module) -> nn.Module:
        if getattr(model, "_qat_adapter", None) is not None:
            raise UserError(f"the model already has {model._qat_adapter['mode']} adapters: merge_adapters_ it first")
        layers = {n: m for n, m in model.named_modules() if type(m) is QuantLinear and m.weight_quantizer is not None}
        if not layers:
            raise UserError("scale-only tuning needs quantized linear layers: run qat.quantize_ with a weight quantizer first")
        if self.checkpoint is not None:
            load_run_checkpoint_(model, self.checkpoint)
        from qat.adapters.lora import base_fingerprint

        fingerprint = base_fingerprint(model, list(layers))
        for name, layer in layers.items():
            _set_module(model, name, ScaleOnlyLinear.from_quant_linear(layer, self.train_zero))
        model.requires_grad_(False)
        for m in model.modules():
            if isinstance(m, ScaleOnlyLinear):
                for p in m.weight_quantizer.parameters():
                    p.requires_grad_(True)
        model._qat_adapter = {"mode": self.mode, "config": None, "targets": list(layers), "fingerprint": fingerprint,
                              "loftq": {},
                              "spec": {"_target_": "qat.adapters.scale_only.ScaleOnly", "train_zero": self.train_zero}}
        return model

    def callbacks(self) -> Sequence[L.Callback]:
        return []


def load_run_checkpoint_(model: nn.Module, path: str) -> None:
    """Load a ``qat-train`` checkpoint's model state (weights and quantizers) into ``model``.

    Raises:
        UserError: no such file, or the checkpoint belongs to another model or quantization (keys
            or shapes differ).
    """
    import os

    if not os.path.isfile(path):
        raise UserError(f"adapter.checkpoint={path!r} does not exist: pass a qat-train run's checkpoints/last.ckpt")
    state = torch.load(path, map_location="cpu", weights_only=False)
    state = state.get("state_dict", state)
    state = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in state if k in own and own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        example = (shapes or missing or unexpected)[0]
        raise UserError(
            f"checkpoint {path} is from another base model or quantization ({len(missing)} missing, {len(unexpected)} "
            f"unexpected, {len(shapes)} mis-shaped keys, e.g. {example!r}): pass a checkpoint of a run with the same "
            "model and quant settings"
        )
    model.load_state_dict(state)
