"""How much each layer's quantization costs the model: the input of the bit allocation (``qat.allocation``).

For every layer ``l`` and candidate setting ``c`` (a quantizer factory), two estimates on the same
calibration batches ``x`` (token ids; the model is a causal LM):

* **KL, measured** (the "layer alone" measurement of SliM-LLM, HAWQ's and ModelOpt's
  ``auto_quantize`` ablations): the weight of layer ``l`` alone is replaced by its quantized value
  ``Q_c(W_l)`` (the quantizer initialised on the weight, eval forward: round-to-nearest on the
  quantizer's start), every other layer stays float, and ::

      s_KL[l][c] = mean over predicted tokens of KL(p_FP(. | x) || p_lc(. | x))

  One forward pass per (layer, candidate, batch); the FP logits are computed once. The pass starts
  at the layer's own decoder block: the outputs of the float blocks before it are recorded once in
  the FP pass and handed back (``_skip_blocks``), so a layer of block ``k`` of ``L`` costs the last
  ``L - k`` blocks and the head, about half a forward on average, and the same numbers.
* **Fisher, estimated** (HAWQ-V2 / OBS's second-order term with the empirical Fisher as the
  Hessian's diagonal): one backward pass per batch on the FP model's causal-LM loss gives
  ``F = sum over batches of g^2`` per weight, and ::

      s_F[l][c] = 1/2 * sum_i F_i * (Q_c(W_l)_i - W_l,i)^2

  No forward pass per candidate: a few backward passes for the whole table.

Both are additive estimates: the plan sums them over layers as if layers did not interact, the
assumption every one of these allocators makes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from qat.errors import UserError
from qat.quantizers.base import Quantizer

Factory = Callable[[], Quantizer]
log = logging.getLogger(__name__)


def quantized_weight(weight: torch.Tensor, factory: Factory) -> tuple[torch.Tensor, Quantizer]:
    """``Q(W)``: a fresh quantizer from ``factory`` initialised on ``weight``, its eval forward; and the quantizer.

    A transformers ``Conv1D`` weight is passed transposed by the caller (``(out, in)`` as nn.Linear).
    """
    q = factory()
    q.init_(weight)
    q.eval()
    with torch.no_grad():
        return q(weight).to(weight.dtype), q


def layers_of(model: nn.Module, names: Sequence[str]) -> dict[str, nn.Linear]:
    """The named ``nn.Linear`` layers of ``model``; a name that is not one is a user's mistake, named here."""
    modules = dict(model.named_modules())
    out = {}
    for name in names:
        m = modules.get(name)
        if not isinstance(m, nn.Linear):
            raise UserError(f"{name!r} is not an nn.Linear of the model (sensitivity is measured on linear layers)")
        out[name] = m
    return out


def _log_probs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(model(input_ids=ids, use_cache=False).logits[:, :-1].float(), dim=-1)


def block_index(model: nn.Module, names: Sequence[str]) -> tuple[nn.ModuleList | None, dict[str, int]]:
    """The stack of blocks (an ``nn.ModuleList`` such as ``model.layers``) that holds the layers ``names``, and
    each layer's block number; ``(None, {})`` when the layers sit in no such stack.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.ModuleList([nn.Sequential(nn.Linear(2, 2)) for _ in range(3)]))
        >>> block_index(net, ["0.2.0", "0.0.0"])[1]
        {'0.2.0': 2, '0.0.0': 0}
    """
    modules = dict(model.named_modules())
    for name in names:  # the stack: the longest prefix of the first name that is a ModuleList
        parts = name.split(".")
        stacks = [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)
                  if isinstance(modules.get(".".join(parts[:i])), nn.ModuleList) and parts[i].isdigit()]
        break
    else:
        return None, {}
    for prefix in stacks:
        index = {}
        for name in names:
            head, _, rest = name[len(prefix) + 1:].partition(".") if name.startswith(prefix + ".") else ("", "", "")
            if not head.isdigit() or not rest:
                break
            index[name] = int(head)
        else:
            return modules[prefix], index
    return None, {}


class _skip_blocks:
    """Within the context, blocks ``0 .. k-1`` of ``stack`` return what they returned in the FP pass for batch ``b``
    instead of computing it (their weights are float and unchanged, so the output is the same)."""

    def __init__(self, stack: nn.ModuleList, outputs: list[list], k: int, b: int):
        self.stack, self.outputs, self.k, self.b = stack, outputs, k, b

    def __enter__(self):
        for i in range(self.k):
            out = self.outputs[i][self.b]
            self.stack[i].forward = lambda *args, _out=out, **kwargs: _out

    def __exit__(self, *exc):
        for i in range(self.k):
            del self.stack[i].forward


@torch.no_grad()
def kl_sensitivity(model: nn.Module, names: Sequence[str], candidates: Mapping[str, Factory],
                   batches: Iterable[torch.Tensor]) -> dict[str, dict[str, float]]:
    """``s_KL[layer][candidate]``: mean token KL from the FP model when that layer alone is quantized.

    Args:
        model: a float causal LM (``model(input_ids=...).logits``), left unchanged.
        names: the linear layers to measure.
        candidates: candidate name -> quantizer factory.
        batches: calibration token ids, each ``(batch, seq)``.

    Returns:
        ``{layer: {candidate: KL}}`` (nats per predicted token, averaged over the batches).

    Example:
        >>> # kl_sensitivity(model, ["model.layers.0.mlp.down_proj"], {"w2": partial(MinMax, bits=2)}, [ids])
    """
    layers = layers_of(model, names)
    batches = list(batches)
    if not batches:
        raise UserError("kl_sensitivity needs at least one calibration batch")
    was_training = model.training
    model.eval()
    stack, index = block_index(model, list(layers))
    outputs = [[] for _ in stack] if stack is not None else []
    hooks = [block.register_forward_hook(lambda m, a, out, i=i: outputs[i].append(out)) for i, block in enumerate(stack or [])]
    try:
        reference = [_log_probs(model, ids) for ids in batches]
    finally:
        for h in hooks:
            h.remove()
    out: dict[str, dict[str, float]] = {}
    start, every = time.perf_counter(), max(1, len(layers) // 10)
    try:
        for done, (name, layer) in enumerate(layers.items()):
            if done and done % every == 0:  # a measurement of minutes: say how far it is
                elapsed = time.perf_counter() - start
                log.info("KL sensitivity: %d of %d layers in %.0f s (about %.0f s left)", done, len(layers), elapsed,
                         elapsed / done * (len(layers) - done))
            original = layer.weight.data
            out[name] = {}
            for cand, factory in candidates.items():
                layer.weight.data = quantized_weight(original, factory)[0]
                kl = []
                try:
                    for b, (ids, ref) in enumerate(zip(batches, reference)):
                        with _skip_blocks(stack, outputs, index[name], b) if stack is not None else nullcontext():
                            logp = _log_probs(model, ids)
                        kl.append(F.kl_div(logp, ref, log_target=True, reduction="sum").item() / ref[..., 0].numel())
                finally:
                    layer.weight.data = original
                out[name][cand] = sum(kl) / len(kl)
    finally:
        model.train(was_training)
    return out


def fisher_sensitivity(model: nn.Module, names: Sequence[str], candidates: Mapping[str, Factory],
                       batches: Iterable[torch.Tensor]) -> dict[str, dict[str, float]]:
    """``s_F[layer][candidate] = 1/2 sum F (Q(W) - W)^2``, ``F`` the empirical Fisher diagonal of the causal-LM loss.

    One forward and backward pass per batch on the FP model (its gradients are left as they were);
    then one quantization per (layer, candidate).

    Returns:
        ``{layer: {candidate: estimate}}`` (nats, the second-order term of the loss increase).
    """
    layers = layers_of(model, names)
    batches = list(batches)
    if not batches:
        raise UserError("fisher_sensitivity needs at least one calibration batch")
    fisher = {name: torch.zeros_like(layer.weight, dtype=torch.float32) for name, layer in layers.items()}
    params = [p for p in model.parameters()]
    saved = [(p.requires_grad, p.grad) for p in params]
    was_training = model.training
    model.eval()
    try:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        for layer in layers.values():
            layer.weight.requires_grad_(True)
        for ids in batches:
            loss = model(input_ids=ids, labels=ids).loss
            grads = torch.autograd.grad(loss, [layer.weight for layer in layers.values()])
            for name, g in zip(layers, grads):
                fisher[name] += g.float().square()
    finally:
        for p, (req, grad) in zip(params, saved):
            p.requires_grad_(req)
            p.grad = grad
        model.train(was_training)
    out: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        for name, layer in layers.items():
            w = layer.weight.float()
            out[name] = {cand: 0.5 * float((fisher[name] * (quantized_weight(layer.weight, f)[0].float() - w).square()).sum())
                         for cand, f in candidates.items()}
    return out
