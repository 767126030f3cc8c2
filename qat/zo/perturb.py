"""Seeded, out-of-place perturbations for forward-only (zeroth-order) training.

MeZO (Malladi et al., NeurIPS 2023) perturbs the parameters in place, theta += eps z, and
regenerates z from a seed instead of storing it. In place, the restore theta + eps z - 2 eps z +
eps z is not bitwise (about half of float32 entries end one ulp off, and the drift accumulates;
ALGORITHMS.md section 6). Here nothing is written: while a perturbation is active, the modules
that own a moving parameter hold ``theta + c * u`` in its place (a separate tensor), and get the
untouched Parameter back afterwards, so the parameters come back bitwise by construction. The
cost is one copy of the moving parameters: small for step sizes or adapters, one model's
weights when every latent weight moves.

The direction ``u`` of parameter ``i`` under seed ``k`` is drawn from a generator seeded with
``hash(k, i)`` and is a function of the parameter's current value only, so the update replays it
exactly. Three kinds, chosen per parameter (``mode="auto"`` picks by role):

* ``gaussian``: ``u = z``, ``z ~ N(0, I)`` (MeZO; LoRA factors and other smooth parameters).
* ``relative``: ``u = |theta| * z``: each entry moves by a fraction of itself. Step sizes of
  different layers span two orders of magnitude; an absolute eps would be noise for the large
  ones and a sign flip for the small ones.
* ``grid``: for the latent weight of a quantized layer, ``u = s * SR(z)``: whole steps ``s`` of the
  layer's quantizer, ``z`` stochastically rounded to integers (ZeroQAT's grid-aligned
  perturbation). A perturbation much smaller than ``s`` is swallowed by rounding (L+ = L-, no
  signal); a whole step always moves the code it touches. ``eps`` is then in units of steps.

``share`` draws one ``z`` per tensor (``"tensor"``) or per row (``"row"``) instead of per entry
(``"none"``), for every moving parameter or per role (``{"quant": "tensor", "adapter": "none"}``,
roles as in the optimizer's parameter groups): the directions then span a subspace of dimension (number of tensors) or (rows).
SPSA's variance grows with the dimension it searches (the cosine to the true gradient is about
``sqrt(n / d)``), so a few hundred forward passes can move a few hundred shared directions (one
relative rescaling of each layer's step sizes, say) but not millions of independent entries;
SubZero (arXiv 2410.08989) and LOZO (arXiv 2410.07698) restrict ZO to low-dimensional
perturbations for the same reason.

``scale`` multiplies one role's directions by a constant (``{"adapter": 0.05}``): one ``eps`` then
perturbs roles of different sensitivity in proportion. The loss difference is shared by every
role, so a role whose perturbation moves the loss much more than another's (LoRA factors inside a
3-bit quantizer flip codes everywhere at ``eps = 1e-2``) drowns the other's signal in noise; a
smaller direction for it keeps both measurable. The update uses the same scaled ``u`` (a fixed
diagonal preconditioner), so the estimate stays unbiased for it.

The projected gradient ``p = (L(theta + eps u) - L(theta - eps u)) / (2 eps)`` estimates
``u^T grad L``; the update ``theta -= lr * p * u`` descends in expectation (preconditioned by
``E[u u^T]``, which is ``diag(|theta|^2)`` or ``diag(s^2)`` for the scaled kinds).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from qat.errors import UserError
from qat.roles import ROLES, parameter_roles

MODES = ("auto", "gaussian", "relative", "grid")
SHARES = ("none", "row", "tensor")
_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, index) pairs over 63-bit seeds


def derive_seed(seed: int, index: int) -> int:
    """A 63-bit generator seed for parameter ``index`` under step seed ``seed`` (deterministic)."""
    x = (int(seed) * _MIX + int(index) * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & ((1 << 64) - 1)
    x ^= x >> 31
    return x & ((1 << 63) - 1)


@dataclass
class Moving:
    """One moving parameter: its index (the seed stream), its owners and its perturbation kind."""

    index: int
    name: str
    param: nn.Parameter
    owners: list[tuple[nn.Module, str]]
    mode: str
    layer: nn.Module | None = None  # the QuantLinear whose latent weight this is (grid mode)
    share: str = "none"  # one z per entry, row or tensor
    scale: float = 1.0  # the role's direction multiplier


def check_options(mode: str = "auto", share: str | Mapping[str, str] = "none", scale: Mapping[str, float] | None = None) -> tuple[dict, dict]:
    """Validate ``Perturbation``'s options without a model; returns the per-role share and scale.

    Called by ``qat-train`` before the model loads (``module=zo``) and by ``Perturbation`` itself.
    """
    if mode not in MODES:
        raise UserError(f"perturbation mode {mode!r} is not one of {MODES}")
    shares = dict(share) if isinstance(share, Mapping) else {role: share for role in ROLES}
    bad = {role: s for role, s in shares.items() if role not in ROLES or s not in SHARES}
    if bad:
        raise UserError(f"perturbation share {share!r}: give one of {SHARES}, or a mapping from a role in {ROLES} to one of them")
    scales = dict(scale or {})
    try:
        bad_scale = {role: v for role, v in scales.items() if role not in ROLES or not float(v) > 0}
    except (TypeError, ValueError):
        bad_scale = scales
    if bad_scale:
        raise UserError(f"perturbation scale {scales!r}: give a mapping from a role in {ROLES} to a positive multiplier")
    return shares, scales


class Perturbation:
    """Seeded directions for the parameters of ``model`` that require gradients, applied out of place.

    Args:
        model: the model; every parameter with ``requires_grad=True`` moves.
        mode: ``"auto"`` (grid for latent weights of quantized layers, relative for quantizer
            parameters, gaussian otherwise), or one kind for all.
        share: ``"none"`` (one ``z`` per entry), ``"row"`` or ``"tensor"`` (one per row / tensor),
            or a mapping from role (``weights``, ``quant``, ``adapter``) to one of those; a role the
            mapping leaves out draws per entry.
        scale: a mapping from role to a positive multiplier of its directions (1 for a role left out).

    Raises:
        UserError: unknown mode or share; ``grid`` asked for a parameter that is not a quantized weight;
            no parameter requires a gradient.

    Example:
        >>> pert = Perturbation(model)  # doctest: +SKIP
        >>> with pert.active(seed=7, scale=1e-3):  # doctest: +SKIP
        ...     loss_plus = model(**batch).loss
    """

    def __init__(self, model: nn.Module, mode: str = "auto", share: str | Mapping[str, str] = "none", scale: Mapping[str, float] | None = None):
        shares, scales = check_options(mode, share, scale)
        owners: dict[int, list[tuple[nn.Module, str]]] = {}
        for module in model.modules():
            for pname, p in module._parameters.items():
                if p is not None and p.requires_grad:
                    owners.setdefault(id(p), []).append((module, pname))
        quant_weights = _quantized_weights(model)
        roles = parameter_roles(model)
        self.moving: list[Moving] = []
        for index, (name, p) in enumerate((n, p) for n, p in model.named_parameters() if p.requires_grad):
            layer = quant_weights.get(id(p))
            kind = mode
            if mode == "auto":
                kind = "grid" if layer is not None else "relative" if roles[name] == "quant" else "gaussian"
            if kind == "grid" and layer is None:
                raise UserError(f"perturbation mode 'grid' needs a quantized layer's weight; {name} is not one (use mode='auto')")
            role = roles[name]
            self.moving.append(Moving(index, name, p, owners[id(p)], kind, layer, shares.get(role, "none"), float(scales.get(role, 1.0))))
        if not self.moving:
            raise UserError("no parameter requires a gradient: nothing for zeroth-order training to move; "
                            "leave some parameters trainable (module.train, module.freeze)")
        self._by_param = {id(m.param): m for m in self.moving}
        self._active = False

    def __len__(self) -> int:
        return len(self.moving)

    def entry(self, param: nn.Parameter) -> Moving:
        return self._by_param[id(param)]

    @torch.no_grad()
    def direction(self, param: nn.Parameter, seed: int) -> torch.Tensor:
        """The direction ``u`` of ``param`` under ``seed``: same seed and value, same tensor."""
        m = self.entry(param)
        gen = torch.Generator(device=param.device).manual_seed(derive_seed(seed, m.index))
        shape = param.shape
        if m.share == "tensor" or (m.share == "row" and param.ndim > 0):
            shape = (1,) * param.ndim if m.share == "tensor" else (param.shape[0],) + (1,) * (param.ndim - 1)
        z = torch.randn(shape, generator=gen, device=param.device, dtype=torch.float32).expand(param.shape).contiguous()
        if m.mode == "relative":
            z = z * param.detach().float().abs()
        elif m.mode == "grid":
            noise = torch.rand(param.shape, generator=gen, device=param.device, dtype=torch.float32)
            z = torch.floor(z + noise)  # stochastic rounding: E[SR(z)] = z
            z = z * _step_of(m.layer, param)
        if m.scale != 1.0:
            z = z * m.scale
        return z.to(param.dtype)

    @contextlib.contextmanager
    def active(self, seed: int, scale: float):
        """Inside the block, the model computes with ``theta + scale * u(seed)``; the parameters are untouched.

        The perturbed values stand in for the parameters in their owners' ``_parameters`` for the
        duration of the block (whatever reads them: a module's forward, or a function that reads
        ``layer.weight`` directly, as L4Q's fused layer does), then the Parameters are put back.
        Small parameters (step sizes, adapters) are swapped for the whole block. The latent
        weight of a quantized layer, read only by that layer's own forward, is swapped just in
        time: a forward pre-hook forms ``theta + scale * u`` and the forward hook drops it, so at
        most one layer's perturbed weight exists at a time and a step over every latent weight
        costs about one layer of memory over inference, not one model.
        """
        if self._active:
            raise RuntimeError("a perturbation is already active")
        lazy = [m for m in self.moving if self._lazy(m)]
        eager = [m for m in self.moving if not self._lazy(m)]
        values = [m.param.detach() + scale * self.direction(m.param, seed) for m in eager]  # all from theta
        hooks = []
        self._active = True
        try:
            for m, value in zip(eager, values):
                for owner, pname in m.owners:
                    owner._parameters[pname] = value  # type: ignore[assignment]  # not a Parameter: bypass setattr
            del values
            for m in lazy:
                owner, pname = m.owners[0]
                hooks.append(owner.register_forward_pre_hook(functools.partial(_swap_in, m, pname, seed, scale, self)))
                hooks.append(owner.register_forward_hook(functools.partial(_swap_out, m, pname)))
            yield self
        finally:
            for h in hooks:
                h.remove()
            for m in self.moving:
                for owner, pname in m.owners:
                    owner._parameters[pname] = m.param
            self._active = False

    def _lazy(self, m: Moving) -> bool:
        """A quantized layer's own latent weight, whose quantizer does not move (its step is theta's)."""
        if m.layer is None or len(m.owners) != 1 or m.owners[0][0] is not m.layer:
            return False
        return not any(id(p) in self._by_param for p in m.layer.weight_quantizer.parameters())


def _swap_in(m: Moving, pname: str, seed: int, scale: float, pert: Perturbation, module: nn.Module, args) -> None:
    module._parameters[pname] = m.param.detach() + scale * pert.direction(m.param, seed)  # type: ignore[assignment]


def _swap_out(m: Moving, pname: str, module: nn.Module, args, output) -> None:
    module._parameters[pname] = m.param


def _quantized_weights(model: nn.Module) -> dict[int, nn.Module]:
    from qat.nn.linear import QuantLinear

    return {id(layer.weight): layer for layer in model.modules() if isinstance(layer, QuantLinear) and layer.weight_quantizer is not None}


def _step_of(layer: nn.Module, param: torch.Tensor) -> torch.Tensor:
    """The quantizer's step size broadcast to the stored weight's shape."""
    w = layer.latent_weight().detach()
    codes = layer.weight_quantizer.codes(w)
    rows, n_groups, _ = codes.scale.shape
    step = codes.scale.expand(rows, n_groups, w.numel() // (rows * n_groups)).reshape(w.shape)
    return step.t() if layer.transposed else step
