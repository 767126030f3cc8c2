"""Shared by the adapter tests: a few AdamW steps on a regression target."""

import pytest
import torch


def _train_steps(model, in_features: int, out_features: int, steps: int = 4, lr: float = 1e-2) -> None:
    """``steps`` AdamW steps of MSE towards a fixed random target, on whatever requires a gradient."""
    torch.manual_seed(1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    x, target = torch.randn(16, in_features), torch.randn(16, out_features)
    for _ in range(steps):
        loss = (model(x) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.fixture(scope="session")
def train_steps():
    """``train_steps(model, in_features, out_features, steps=4, lr=1e-2)``."""
    return _train_steps
