"""SPSA with seed replay: the update by hand, the estimate against autograd, convergence, skipped steps."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from qat.errors import UserError
from qat.nn.linear import QuantLinear
from qat.quantizers import LSQ
from qat.zo import ZOSGD, Perturbation


def test_update_equals_the_formula_by_hand():
    torch.manual_seed(0)
    lin = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    pert = Perturbation(lin, mode="gaussian")
    opt = ZOSGD(lin.parameters(), lr=0.1, eps=1e-2, weight_decay=0.5, perturbation=pert)
    loss_fn = lambda: lin(x).pow(2).mean()  # noqa: E731
    seed = opt.seeds(0)[0]
    uw, ub = pert.direction(lin.weight, seed), pert.direction(lin.bias, seed)
    f = lambda w, b: (x @ w.t() + b).pow(2).mean().item()  # noqa: E731
    plus, minus = f(w0 + 1e-2 * uw, b0 + 1e-2 * ub), f(w0 - 1e-2 * uw, b0 - 1e-2 * ub)
    loss = opt.estimate(loss_fn)
    assert loss == pytest.approx((plus + minus) / 2, rel=1e-6)
    proj = (plus - minus) / (2 * 1e-2)
    opt.step()
    expected_w = w0 * (1 - 0.1 * 0.5) - 0.1 * proj * uw
    assert torch.allclose(lin.weight, expected_w, rtol=1e-5, atol=1e-7)
    assert torch.allclose(lin.bias, b0 * (1 - 0.1 * 0.5) - 0.1 * proj * ub, rtol=1e-5, atol=1e-7)


def _cosines(n: int, draws: int = 300) -> float:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 1))
    x, y = torch.randn(32, 6), torch.randn(32, 1)
    loss_fn = lambda: (model(x) - y).pow(2).mean()  # noqa: E731
    loss_fn().backward()
    true = torch.cat([p.grad.flatten() for p in model.parameters()])
    pert = Perturbation(model, mode="gaussian")
    opt = ZOSGD(model.parameters(), lr=0.0, eps=1e-3, n=n, perturbation=pert)
    cos = []
    for _ in range(draws):
        opt.estimate(loss_fn)
        est = sum(proj * torch.cat([pert.direction(p, s).flatten() for p in model.parameters()]) for s, proj in opt._pending) / n
        cos.append(torch.nn.functional.cosine_similarity(est, true, dim=0).item())
    return sum(cos) / len(cos)


def test_estimate_points_along_the_true_gradient_and_improves_with_n():
    c1, c4, c16 = _cosines(1), _cosines(4), _cosines(16)
    assert 0 < c1 < c4 < c16
    # E[cos] ~ sqrt(n / d) for Gaussian SPSA in d = 97 dimensions: 0.08, 0.16, 0.32
    assert c16 > 0.2


class _Quadratic(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.a, self.b = torch.randn(20, 10) / 10**0.5, torch.randn(20)
        self.theta = nn.Parameter(torch.zeros(10))

    def forward(self):
        return (self.a @ self.theta - self.b).pow(2).sum()


def test_quadratic_converges():
    f = _Quadratic()
    optimum = torch.linalg.lstsq(f.a, f.b).solution
    best = (f.a @ optimum - f.b).pow(2).sum().item()
    start = f().item()
    opt = ZOSGD(f.parameters(), lr=0.02, eps=1e-3, n=2, perturbation=Perturbation(f, mode="gaussian"))
    for _ in range(600):
        opt.estimate(f)
        opt.step()
    assert f().item() - best < 0.01 * (start - best)


def test_small_quantized_mlp_converges_on_grid_weights_and_scales():
    torch.manual_seed(3)
    teacher = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    x = torch.randn(256, 16)
    with torch.no_grad():
        y = teacher(x)
    torch.manual_seed(4)
    student = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    for i in (0, 2):
        student[i] = QuantLinear.from_float(student[i], LSQ(bits=4, granularity="group", group_size=16, init="minmax"))
    student.eval()
    loss_fn = lambda: (student(x) - y).pow(2).mean()  # noqa: E731
    pert = Perturbation(student)  # auto: latent weights move in grid steps, scales relatively
    weights = [p for n, p in student.named_parameters() if "_quantizer." not in n]
    scales = [p for n, p in student.named_parameters() if "_quantizer." in n]
    opt = ZOSGD([{"params": weights}, {"params": scales}], lr=2e-2, eps=0.5, n=2, perturbation=pert)
    with torch.inference_mode():
        start = loss_fn().item()
    for _ in range(150):
        with torch.inference_mode():
            opt.estimate(loss_fn)
        opt.step()
    with torch.inference_mode():
        end = loss_fn().item()
    assert end < 0.5 * start, (start, end)  # measured 0.211 -> 0.070


def test_non_finite_loss_skips_the_update_and_is_counted():
    lin = nn.Linear(3, 2)
    before = [p.detach().clone() for p in lin.parameters()]
    opt = ZOSGD(lin.parameters(), lr=1.0, eps=1e-2, perturbation=Perturbation(lin))
    calls = iter([1.0, float("nan")])
    assert math.isnan(opt.estimate(lambda: next(calls)))
    opt.step()
    assert opt.skipped == 1 and all(torch.equal(p, b) for p, b in zip(lin.parameters(), before))
    calls = iter([float("inf"), 1.0])
    opt.estimate(lambda: next(calls))
    opt.step()
    assert opt.skipped == 2 and all(torch.equal(p, b) for p, b in zip(lin.parameters(), before))


def test_state_dict_round_trip_resumes_the_seed_stream():
    lin = nn.Linear(3, 2)
    opt = ZOSGD(lin.parameters(), lr=0.1, seed=5, perturbation=Perturbation(lin))
    for _ in range(3):
        opt.estimate(lambda: lin.weight.sum())
        opt.step()
    other = ZOSGD(lin.parameters(), lr=0.1, perturbation=Perturbation(lin))
    other.load_state_dict(opt.state_dict())
    assert (other.steps, other.seed, other.seeds(other.steps)) == (3, 5, opt.seeds(3))


def test_bad_arguments_are_refused():
    lin = nn.Linear(3, 2)
    for kwargs, match in (({"eps": 0.0}, "eps"), ({"n": 0}, "n="), ({"lr": -1.0}, "lr")):
        with pytest.raises(UserError, match=match):
            ZOSGD(lin.parameters(), **kwargs)
    with pytest.raises(RuntimeError, match="Perturbation"):
        ZOSGD(lin.parameters()).estimate(lambda: 0.0)
    frozen = nn.Linear(2, 2).requires_grad_(False)
    model = nn.ModuleDict({"a": lin, "b": frozen})
    with pytest.raises(UserError, match="does not move"):
        ZOSGD(model.parameters()).attach(Perturbation(model))
