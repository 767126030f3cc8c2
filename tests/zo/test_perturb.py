"""Seeded out-of-place perturbations: reproducible directions, bitwise-intact parameters, the grid trap."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qat.errors import UserError
from qat.nn.linear import QuantLinear
from qat.quantizers import LSQ
from qat.zo.perturb import Perturbation, derive_seed


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def quant_mlp(seed=0):
    model = mlp(seed)
    for i in (0, 2):
        model[i] = QuantLinear.from_float(model[i], LSQ(bits=4, granularity="group", group_size=8, init="minmax"))
    return model


def test_same_seed_same_direction_other_seed_other_direction():
    model = mlp()
    pert = Perturbation(model)
    w = model[0].weight
    assert torch.equal(pert.direction(w, 11), pert.direction(w, 11))
    assert not torch.equal(pert.direction(w, 11), pert.direction(w, 12))
    # parameters get independent streams under one seed
    assert not torch.equal(pert.direction(model[0].bias, 11)[:4], pert.direction(model[2].bias, 11))
    assert derive_seed(3, 4) == derive_seed(3, 4) != derive_seed(4, 3)


def test_active_perturbation_is_out_of_place_and_exact():
    model = mlp()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    pert = Perturbation(model, mode="gaussian")
    x = torch.randn(5, 8)
    eps = 1e-3
    with torch.inference_mode(), pert.active(seed=7, scale=eps):
        y = model(x)
    u = {n: pert.direction(p, 7) for n, p in model.named_parameters()}
    h = F.relu(F.linear(x, before["0.weight"] + eps * u["0.weight"], before["0.bias"] + eps * u["0.bias"]))
    expected = F.linear(h, before["2.weight"] + eps * u["2.weight"], before["2.bias"] + eps * u["2.bias"])
    assert torch.equal(y, expected)
    for n, p in model.named_parameters():  # +eps then -eps: parameters bitwise as before
        with torch.inference_mode(), pert.active(seed=7, scale=-eps):
            model(x)
        assert torch.equal(p, before[n]) and isinstance(p, nn.Parameter)
    assert torch.equal(model(x), F.linear(F.relu(F.linear(x, before["0.weight"], before["0.bias"])), before["2.weight"], before["2.bias"]))


def test_an_exception_inside_the_block_restores_the_parameters():
    model = mlp()
    pert = Perturbation(model)
    w = model[0].weight
    with pytest.raises(RuntimeError, match="boom"):
        with pert.active(seed=1, scale=1.0):
            model[0](torch.randn(2, 8))
            raise RuntimeError("boom")
    assert model[0]._parameters["weight"] is w and not pert._active


def test_tied_parameter_is_perturbed_identically_in_every_owner():
    emb = nn.Embedding(10, 6)
    head = nn.Linear(6, 10, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head})
    pert = Perturbation(model, mode="gaussian")
    assert len(pert) == 1 and len(pert.moving[0].owners) == 2
    ids = torch.tensor([1, 2, 3])
    with torch.no_grad(), pert.active(seed=3, scale=0.5):
        seen_emb = model["emb"](ids)
        seen_head = model["head"](torch.eye(6))
    perturbed = emb.weight.detach() + 0.5 * pert.direction(emb.weight, 3)
    assert torch.equal(seen_emb, perturbed[ids]) and torch.equal(seen_head, perturbed.t())


def test_relative_direction_scales_gaussian_by_magnitude():
    model = quant_mlp()
    pert = Perturbation(model)  # auto: scales relative, latent weights on the grid
    scale = model[0].weight_quantizer.scale
    entry = pert.entry(scale)
    assert entry.mode == "relative"
    gen = torch.Generator().manual_seed(derive_seed(5, entry.index))
    z = torch.randn(scale.shape, generator=gen)
    assert torch.equal(pert.direction(scale, 5), z * scale.detach().abs())


def test_grid_direction_moves_whole_steps_and_is_not_swallowed_by_rounding():
    model = quant_mlp()
    pert = Perturbation(model)
    layer = model[0]
    assert pert.entry(layer.weight).mode == "grid"
    u = pert.direction(layer.weight, 9)
    step = layer.weight_quantizer.codes(layer.weight).scale.expand(16, 1, 8).reshape(16, 8)  # the step forward uses
    units = u / step
    assert torch.equal(units, units.round()) and (units != 0).float().mean() > 0.5
    w = layer.weight.detach()
    with torch.no_grad():
        q0 = layer.weight_quantizer.codes(w).codes
        q_grid = layer.weight_quantizer.codes(w + u).codes  # eps = 1 step
        q_tiny = layer.weight_quantizer.codes(w + 1e-4 * torch.randn_like(w)).codes  # MeZO-sized eps
    assert (q_grid != q0).float().mean() > 0.4  # a grid step moves the codes it touches
    assert (q_tiny != q0).float().mean() < 0.02  # the trap: a tiny perturbation is mostly rounded away


def test_grid_mode_on_a_plain_parameter_is_refused():
    with pytest.raises(UserError, match="quantized layer"):
        Perturbation(mlp(), mode="grid")
    with pytest.raises(UserError, match="one of"):
        Perturbation(mlp(), mode="uniform")
    with pytest.raises(UserError, match="nothing"):
        Perturbation(mlp().requires_grad_(False))


@pytest.mark.parametrize("share", ["tensor", "row"])
def test_shared_directions_draw_one_coordinate_per_tensor_or_row(share):
    model = quant_mlp()
    pert = Perturbation(model, share=share)
    scale = model[0].weight_quantizer.scale  # (16, 1, 1)
    z = pert.direction(scale, 3) / scale.detach().abs()
    w = pert.direction(model[0].weight, 3)  # grid: whole steps, one z per row or tensor before rounding
    if share == "tensor":
        assert torch.allclose(z, z.flatten()[0].expand_as(z))
    else:
        assert torch.allclose(z, z[:, :1, :1].expand_as(z)) and len(set(z.flatten().tolist())) > 1
    assert w.shape == model[0].weight.shape
    with pytest.raises(UserError, match="share"):
        Perturbation(model, share="column")


def test_share_per_role_draws_shared_directions_for_one_role_only():
    model = quant_mlp()
    pert = Perturbation(model, share={"quant": "tensor"})  # weights left out: per entry
    scale = model[0].weight_quantizer.scale
    z = pert.direction(scale, 5) / scale.detach().abs()
    assert torch.allclose(z, z.flatten()[0].expand_as(z))
    assert len(set(pert.direction(model[0].bias, 5).tolist())) == model[0].bias.numel()
    with pytest.raises(UserError, match="role"):
        Perturbation(model, share={"scales": "tensor"})


def test_parameters_read_without_calling_their_module_are_perturbed_too():
    """L4Q's fused layer reads ``lora_A[name].weight`` directly, never calling that nn.Linear."""

    class Direct(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(4, 2)

        def forward(self, x):
            return F.linear(x, self.inner.weight, self.inner.bias)

    model = Direct()
    pert = Perturbation(model, mode="gaussian")
    x = torch.randn(3, 4)
    with torch.no_grad(), pert.active(seed=2, scale=0.1):
        y = model(x)
    w = model.inner.weight.detach() + 0.1 * pert.direction(model.inner.weight, 2)
    b = model.inner.bias.detach() + 0.1 * pert.direction(model.inner.bias, 2)
    assert torch.equal(y, F.linear(x, w, b))


def test_latent_weights_are_swapped_in_just_in_time_and_equal_the_eager_perturbation():
    model = quant_mlp()
    for layer in (model[0], model[2]):
        layer.weight_quantizer.requires_grad_(False)  # only latent weights move: the lazy path
        layer.bias.requires_grad_(False)
    pert = Perturbation(model)
    x = torch.randn(5, 8)
    model(x)  # initialise the quantizers on theta
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for i in (0, 2):
            reference[i].weight.add_(1e-2 * pert.direction(model[i].weight, 9))
    seen = []
    probe = model[2].register_forward_pre_hook(lambda mod, args: seen.append(isinstance(model[0]._parameters["weight"], nn.Parameter)))
    with pert.active(seed=9, scale=1e-2):
        assert isinstance(model[0]._parameters["weight"], nn.Parameter)  # nothing formed before the layer runs
        out = model(x)
    probe.remove()
    assert seen == [True]  # layer 0's perturbed weight was dropped before layer 2 ran
    torch.testing.assert_close(out, reference(x), rtol=0, atol=0)
    assert all(isinstance(m._parameters["weight"], nn.Parameter) for m in (model[0], model[2]))
    assert not model[0]._forward_pre_hooks and not model[0]._forward_hooks


def test_scale_per_role_multiplies_that_roles_directions_only():
    model = quant_mlp()
    plain, scaled = Perturbation(model), Perturbation(model, scale={"quant": 0.25})
    q = model[0].weight_quantizer.scale
    torch.testing.assert_close(scaled.direction(q, 4), 0.25 * plain.direction(q, 4), rtol=0, atol=0)
    assert torch.equal(scaled.direction(model[0].bias, 4), plain.direction(model[0].bias, 4))
    for bad in ({"quant": 0.0}, {"scales": 1.0}):
        with pytest.raises(UserError, match="positive multiplier"):
            Perturbation(model, scale=bad)
