"""``ZOSGD``: SPSA / n-SPSA with seed replay (MeZO, Malladi et al., NeurIPS 2023; ZeroQAT, 2025).

One step with ``n`` seeds ``k_1..k_n`` drawn from the optimizer's own counter::

    p_i = (L(theta + eps u_i) - L(theta - eps u_i)) / (2 eps)        u_i = u(k_i), never stored
    theta <- theta - lr * ( (1/n) sum_i p_i u_i + wd * theta )

Two forward passes per seed, no backward, nothing kept for one: the memory of inference plus
one layer's direction. ``u_i`` is regenerated from ``k_i`` for the update (seed replay; see
``qat.zo.perturb`` for the directions and why they are applied out of place). A non-finite loss in
either pass skips the whole update: it is counted in ``skipped`` and never applied.

The estimate is split from the update so that a Lightning module can run the forward passes in
its ``training_step`` and let Lightning's ``optimizer.step()`` apply the update (and count the
step): ``estimate(loss_fn)`` then ``step()``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from qat.errors import UserError
from qat.zo.perturb import Perturbation


class ZOSGD(torch.optim.Optimizer):
    """Zeroth-order SGD over the parameters of a :class:`~qat.zo.perturb.Perturbation`.

    Args:
        params: parameters or parameter groups (each group may set its own ``lr`` and
            ``weight_decay``); every one must be among the perturbation's moving parameters.
        lr: learning rate.
        eps: perturbation size (absolute for gaussian directions, relative for ``relative``,
            in steps for ``grid``).
        n: seeds per step (n-SPSA); the estimate averages ``n`` projected gradients.
        weight_decay: decoupled decay ``theta -= lr * wd * theta`` (MeZO: none on biases/norms;
            the caller's parameter groups decide).
        seed: base of the per-step seeds, so a run is reproducible and resumable.
        perturbation: the :class:`Perturbation` (or set later with :meth:`attach`).

    Raises:
        UserError: ``lr < 0``, ``eps <= 0`` or ``n < 1``.

    Example:
        >>> pert = Perturbation(model)  # doctest: +SKIP
        >>> opt = ZOSGD(model.parameters(), lr=1e-4, eps=1e-3, perturbation=pert)  # doctest: +SKIP
        >>> with torch.inference_mode():  # doctest: +SKIP
        ...     loss = opt.estimate(lambda: model(**batch).loss)
        >>> opt.step()  # doctest: +SKIP
    """

    forward_only = True  # backprop modules refuse it (QATModule.configure_optimizers)

    def __init__(self, params, lr: float = 1e-4, eps: float = 1e-3, n: int = 1, weight_decay: float = 0.0, seed: int = 0,
                 perturbation: Perturbation | None = None):
        if lr < 0:
            raise UserError(f"lr={lr} must be >= 0")
        if not eps > 0:
            raise UserError(f"eps={eps} must be > 0")
        if int(n) < 1:
            raise UserError(f"n={n} seeds per step must be >= 1")
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})
        self.eps, self.n, self.seed = float(eps), int(n), int(seed)
        self.perturbation = perturbation
        self.steps = 0  # estimates made (the seed counter)
        self.skipped = 0  # updates skipped for a non-finite loss
        self._pending: list[tuple[int, float]] = []

    def attach(self, perturbation: Perturbation) -> ZOSGD:
        moving = {id(m.param) for m in perturbation.moving}
        for group in self.param_groups:
            for p in group["params"]:
                if id(p) not in moving:
                    raise UserError("ZOSGD was given a parameter the perturbation does not move (requires_grad=False?): "
                                      "build the Perturbation over the parameters the optimizer trains")
        self.perturbation = perturbation
        return self

    def seeds(self, step: int) -> list[int]:
        """The seeds of estimate number ``step`` (a pure function of the base seed and the step)."""
        return [(self.seed * 1_000_003 + step) * 64 + i for i in range(self.n)]

    @torch.no_grad()
    def estimate(self, loss_fn: Callable[[], torch.Tensor | float]) -> float:
        """Run the ``2n`` forward passes and keep ``(seed, p_i)`` for :meth:`step`.

        Returns the mean of the perturbed losses (a training-loss estimate), or NaN when a loss
        was non-finite (the update is then skipped and counted).
        """
        if self.perturbation is None:
            raise RuntimeError("ZOSGD needs a Perturbation: pass perturbation= or call attach()")
        seeds = self.seeds(self.steps)
        self.steps += 1
        pending, losses = [], []
        for seed in seeds:
            with self.perturbation.active(seed, +self.eps):
                plus = float(loss_fn())
            with self.perturbation.active(seed, -self.eps):
                minus = float(loss_fn())
            losses += [plus, minus]
            pending.append((seed, (plus - minus) / (2 * self.eps)))
        if not all(math.isfinite(v) for v in losses):
            self.skipped += 1
            self._pending = []
            return float("nan")
        self._pending = pending
        return sum(losses) / len(losses)

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        """Apply the update of the last :meth:`estimate` (seed replay); nothing if it was skipped."""
        loss = closure() if closure is not None else None
        pending, self._pending = self._pending, []
        if not pending:
            return loss
        # grid directions read the layer's quantizer step: move those weights before the steps move
        order = [(g, p) for g in self.param_groups for p in g["params"]]
        order.sort(key=lambda gp: self.perturbation.entry(gp[1]).mode != "grid")
        for group, p in order:
            lr, wd = group["lr"], group["weight_decay"]
            delta = None
            for seed, proj in pending:
                u = self.perturbation.direction(p, seed)
                delta = u.mul_(proj / self.n) if delta is None else delta.add_(u, alpha=proj / self.n)
            if wd:
                p.mul_(1 - lr * wd)
            p.add_(delta, alpha=-lr)
        return loss

    def state_dict(self):
        state = super().state_dict()
        state["zo"] = {"steps": self.steps, "skipped": self.skipped, "seed": self.seed}
        return state

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        zo = state_dict.pop("zo", None)
        super().load_state_dict(state_dict)
        if zo is not None:
            self.steps, self.skipped, self.seed = zo["steps"], zo["skipped"], zo["seed"]
