"""L4Q: a LoRA adapter inside the weight quantizer, so that it merges into one low-bit matrix.

L4Q (Jeon et al., "L4Q: Parameter Efficient Quantization-Aware Fine-Tuning on Large Language
Models", arXiv 2402.04902)::

    W     = W0 + c * B @ A                 W0 frozen, c = lora_alpha / r, B = 0 at the start
    W_hat = s * clamp(round((W - beta) / s), lo, hi) + beta       LSQ+ (group-wise s, beta)
    y     = x @ W_hat^T (+ bias)

Backward (ALGORITHMS.md section 5), with G_W the quantizer's input gradient (the output gradient
``G^T x`` masked to the in-range entries by the clipped STE)::

    G_A = c * B^T @ G_W        G_B = c * G_W @ A^T
    G_s, G_beta                LSQ+'s rules (round(u) - u inside, the clip value outside; the sum
                               of G over clipped entries), both scaled by 1 / sqrt(N * hi)

Decisions (no official code is public; the paper and hustzxd/EfficientPaper's note are the refs):

* Memory. ``_L4QLinear`` saves only ``x`` (which the surrounding layers keep anyway), ``A``,
  ``B`` and the quantizer's parameters; ``W`` and ``W_hat`` are recomputed in the backward and
  die there, and ``W0`` never gets a gradient, so a step holds no dense ``dW`` and no saved
  ``W_hat`` per layer: the memory of plain LoRA plus a few layer-sized temporaries.
* No copied math. The backward re-runs the layer's own quantizer on the recomputed ``W`` under
  autograd and asks it for ``(G_W, G_s, G_beta)``: the fused kernel of
  ``qat.quantizers.fake_quant`` (or whatever estimator the quantizer was built with) computes them,
  so L4Q follows every quantizer and estimator option, and the forward rounding is the export's.
* Any ``qat.quantizers`` quantizer works; LSQ with ``offset=True`` (LSQ+) is the paper's, and the
  recipes' (``quant/w4_lsqplus.yaml``, ``w3_lsqplus.yaml``, ``w2_lsq.yaml``). Quantizers that add
  a bias term (Tequila) are refused.
* Warm-up (the paper's first stage): for ``warmup_steps`` optimizer steps the adapter runs beside
  the quantized base, ``y = x Q(W0)^T + c x A^T B^T``; then inside it. ``L4QWarmup`` switches
  the stage from the trainer's step, so resuming a run lands in the right stage.
* Merge: ``W0 += c * B @ A`` (peft's ``get_delta_weight``, the forward's very expression), leaving
  a ``QuantLinear`` whose quantizer is the trained one: its output equals the trained L4Q layer's
  bitwise, and export sees an ordinary quantized layer.
* The quantizer is the base layer's ``weight_quantizer``, also registered on the adapter layer as
  ``lora_quantizer`` so that peft saves and loads the trained step sizes with the adapter.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch
import torch.nn.functional as F
from peft import LoraConfig
from peft.tuners.lora import Linear as LoraLinear
from torch import nn

from qat.errors import UserError
from qat.nn.linear import QuantLinear
from qat.quantizers.base import Quantizer


def _delta(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``c * B @ A`` in the order peft's ``get_delta_weight`` computes it (merge is then bitwise)."""
    return (b @ a) * scaling


class _L4QLinear(torch.autograd.Function):
    """``y = x @ Q(W0 + c B A)^T + bias`` (``A = B = None``: ``x @ Q(W0)^T + bias``), see the module docstring."""

    @staticmethod
    def forward(ctx, x, w0, a, b, bias, scaling, quantizer, *qparams):
        w = w0 if a is None else w0 + _delta(a, b, scaling)
        w_hat = quantizer(w)
        ctx.scaling, ctx.quantizer = scaling, quantizer
        ctx.save_for_backward(x, w0, a, b, bias, *qparams)
        return F.linear(x, w_hat.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_y):
        x, w0, a, b, bias, *qparams = ctx.saved_tensors
        c, quantizer = ctx.scaling, ctx.quantizer
        want_w = a is not None and (ctx.needs_input_grad[2] or ctx.needs_input_grad[3])
        want_q = [p.requires_grad for p in qparams]
        with torch.enable_grad():
            w = (w0 if a is None else w0 + _delta(a, b, c)).detach().requires_grad_(want_w)
            w_hat = quantizer(w)
        grad_x = grad_y @ w_hat.detach().to(grad_y.dtype) if ctx.needs_input_grad[0] else None
        grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0).to(bias.dtype) if bias is not None and ctx.needs_input_grad[4] else None
        grad_a = grad_b = None
        grads_q = [None] * len(qparams)
        inputs = ([w] if want_w else []) + [p for p, want in zip(qparams, want_q) if want]
        if inputs and w_hat.requires_grad:
            g_out = grad_y.reshape(-1, grad_y.shape[-1]).to(w.dtype)
            g_what = g_out.t() @ x.reshape(-1, x.shape[-1]).to(w.dtype)  # dL/dW_hat, transient
            grads = list(torch.autograd.grad(w_hat, inputs, g_what, allow_unused=True))
            if want_w:
                g_w = grads.pop(0) * c  # the same order as autograd through _delta
                grad_a = b.t() @ g_w if ctx.needs_input_grad[2] else None
                grad_b = g_w @ a.t() if ctx.needs_input_grad[3] else None
            it = iter(grads)
            grads_q = [next(it) if want else None for want in want_q]
        return (grad_x, None, grad_a, grad_b, grad_bias, None, None, *grads_q)


def l4q_linear(
    x: torch.Tensor,
    w0: torch.Tensor,
    quantizer: Quantizer,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    scaling: float = 1.0,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ Q(W0 + scaling * B @ A)^T + bias`` with L4Q's memory-lean backward.

    Args:
        x: input ``(..., in)``.
        w0: the frozen base weight ``(out, in)``.
        quantizer: an initialised weight quantizer; its parameters get gradients.
        a, b: the LoRA factors ``(r, in)`` and ``(out, r)``, or both None (quantized base only).
        scaling: ``lora_alpha / r``.
        bias: optional ``(out,)`` bias.

    Returns:
        ``(..., out)``.

    Example:
        >>> from qat.quantizers import LSQ
        >>> w0 = torch.randn(8, 32); q = LSQ(bits=4, granularity="group", group_size=32, offset=True).init_(w0)
        >>> a, b = torch.randn(2, 32, requires_grad=True), torch.zeros(8, 2, requires_grad=True)
        >>> torch.equal(l4q_linear(torch.ones(1, 32), w0, q, a, b, 0.5), torch.ones(1, 32) @ q(w0).t())
        True
    """
    if (a is None) != (b is None):
        raise UserError("pass both LoRA factors a and b, or neither")
    params = tuple(quantizer.parameters())
    return _L4QLinear.apply(x, w0, a, b, bias, float(scaling), quantizer, *params)


def _check_base(base: nn.Module) -> QuantLinear:
    if not isinstance(base, QuantLinear) or base.weight_quantizer is None:
        raise UserError(
            f"L4Q adapts quantized linear layers; got {type(base).__name__}: run qat.quantize_ with a weight "
            "quantizer on the target modules first (and keep adapter target_modules inside quant.include)"
        )
    if base.transposed:
        raise UserError("L4Q does not adapt transformers' Conv1D layers (weights stored (in, out)); target nn.Linear layers")
    if type(base.weight_quantizer).bias is not Quantizer.bias:
        raise UserError(
            f"{type(base.weight_quantizer).__name__} adds a bias term to the layer, which L4Q's merged weight cannot "
            "carry; use a uniform quantizer (LSQ with offset=True is L4Q's)"
        )
    return base


class L4QLinear(LoraLinear):
    """peft LoRA layer whose adapter lives inside the base layer's weight quantizer (L4Q).

    Registered with ``LoraConfig._register_custom_module({QuantLinear: L4QLinear})``; peft builds
    the factors (``lora_A``, ``lora_B``), its scaling, merging and state-dict handling as for any
    LoRA layer; only ``forward`` differs (see the module docstring).

    Args:
        base_layer: a ``QuantLinear`` with an initialised weight quantizer.
        adapter_name, config, r, lora_alpha, kwargs: as peft passes them to custom LoRA layers.

    Raises:
        UserError: the base is not a weight-quantized ``QuantLinear``, ``lora_dropout > 0`` (the
            adapter is part of the weight, there is no separate path to drop), DoRA or a LoRA bias.

    Example:
        >>> cfg = LoraConfig(r=4, target_modules=["proj"]); cfg._register_custom_module({QuantLinear: L4QLinear})  # doctest: +SKIP
        >>> peft.inject_adapter_in_model(cfg, quantized_model)  # doctest: +SKIP
    """

    def __init__(self, base_layer, adapter_name: str, config: LoraConfig, r: int = 0, lora_alpha: int = 1, **kwargs):
        base = _check_base(base_layer.get_base_layer() if hasattr(base_layer, "get_base_layer") else base_layer)
        if config.lora_dropout:
            raise UserError(
                f"L4Q merges the adapter into the weight before quantizing it, so lora_dropout={config.lora_dropout} "
                "has no separate path to act on: set lora_dropout to 0"
            )
        if config.use_dora or config.lora_bias:
            raise UserError("L4Q supports plain LoRA factors only: set use_dora=False and lora_bias=False")
        super().__init__(base_layer, adapter_name, config, r=r, lora_alpha=lora_alpha, **kwargs)
        self.lora_quantizer = nn.ModuleDict({adapter_name: base.weight_quantizer})
        self.joint = True  # False: the warm-up stage, adapter beside the quantized base

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        active = [n for n in self.active_adapters if n in self.lora_A]
        if self.disable_adapters or self.merged or not active:
            return self.base_layer(x, *args, **kwargs)
        if len(active) > 1:
            raise UserError(f"L4Q quantizes one adapter into the weight; {len(active)} are active ({active}): "
                            "activate one with set_adapter(name)")
        name = active[0]
        base: QuantLinear = self.base_layer
        if base.act_quantizer is not None:
            x = base.act_quantizer(x)
        a, b, c = self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name]
        q = base.weight_quantizer
        if self.joint:
            return l4q_linear(x, base.latent_weight(), q, a, b, c, base.bias)
        y = l4q_linear(x, base.latent_weight(), q, bias=base.bias)
        return y + F.linear(F.linear(x.to(a.dtype), a), b).to(y.dtype) * c


def l4q_layers(model: nn.Module) -> list[L4QLinear]:
    """Every ``L4QLinear`` in ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, L4QLinear)]


def set_l4q_stage_(model: nn.Module, joint: bool) -> None:
    """Put every L4Q layer in the joint stage (adapter inside the quantizer) or the warm-up stage."""
    for layer in l4q_layers(model):
        layer.joint = bool(joint)


class L4QWarmup(L.Callback):
    """L4Q's two stages: the adapter beside the quantized base for ``steps`` optimizer steps, then inside it.

    Args:
        steps: optimizer steps of the warm-up stage (0: joint from the first step).

    Raises:
        UserError: ``steps < 0``.

    Example:
        >>> trainer = lightning.Trainer(callbacks=[L4QWarmup(10)])  # doctest: +SKIP
    """

    def __init__(self, steps: int):
        if steps < 0:
            raise UserError(f"L4Q warm-up steps={steps} must be >= 0")
        self.steps = int(steps)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        set_l4q_stage_(pl_module, trainer.global_step >= self.steps)

    def on_train_end(self, trainer, pl_module) -> None:
        set_l4q_stage_(pl_module, True)  # evaluation and export see the merged (joint) model


class L4Q:
    """The L4Q adapter mode: peft LoRA factors inside each quantized layer's weight quantizer.

    ``apply_(model)`` injects ``L4QLinear`` layers (peft's custom-module route), optionally
    initialises the factors with LoftQ using the layer's own quantizer, and leaves only the
    factors and the quantizer parameters trainable.

    Args:
        config: a ``peft.LoraConfig`` (``target_modules``, ``r``, ``lora_alpha``; ``lora_dropout``
            must be 0). ``init_lora_weights="loftq"`` with a ``loftq_config`` (``loftq_bits`` equal
            to the quantizer's bits, ``loftq_iter`` iterations) runs ``qat.adapters.loftq``.
        warmup_steps: optimizer steps of the warm-up stage (adapter beside the quantized base).

    Raises:
        UserError: see ``qat.adapters.lora.inject_``.

    Example:
        >>> qat.quantize_(model, weight=partial(LSQ, bits=4, granularity="group", group_size=32, offset=True))  # doctest: +SKIP
        >>> L4Q(LoraConfig(r=16, lora_alpha=16, target_modules=["q_proj", "v_proj"])).apply_(model)  # doctest: +SKIP
    """

    mode = "l4q"

    def __init__(self, config: LoraConfig, warmup_steps: int = 0):
        if warmup_steps < 0:
            raise UserError(f"adapter.warmup_steps={warmup_steps} must be >= 0")
        self.config = config
        self.warmup_steps = int(warmup_steps)

    def apply_(self, model: nn.Module, loftq: bool = True) -> nn.Module:
        from qat.adapters.lora import inject_

        inject_(model, self.config, self.mode, L4QLinear, loftq=loftq, spec={"_target_": "qat.adapters.l4q.L4Q"})
        for layer in l4q_layers(model):
            layer.lora_quantizer.requires_grad_(True)  # LSQ+ step and offset train with the factors
        set_l4q_stage_(model, self.warmup_steps == 0)
        return model

    def callbacks(self) -> Sequence[L.Callback]:
        return [L4QWarmup(self.warmup_steps)] if self.warmup_steps else []
