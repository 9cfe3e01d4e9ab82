"""Closed-form complement blocks (torch_embed._blocks) against brute-force float64 Hessians.

Every check builds the wide network with the core planner, the dense Hessian with
``torch.autograd.functional.hessian`` and the complement directions ``C`` explicitly
(from ``split_direction`` / ``null_direction`` applied to the identity), then compares.
"""

from __future__ import annotations

import copy

import pytest
import torch
from cases import (
    F64,
    brute_gradient,
    brute_hessian,
    randn_data,
    randn_mlp,
)
from cases import SMOOTH_ACTIVATIONS as ACTS
from torch import nn

from torch_embed._blocks import (
    activation_derivatives,
    layer_signals,
    null_block,
    null_coupling,
    null_direction,
    own_parameter_count,
    split_block,
    split_coupling,
    split_direction,
    splitting_matrix,
)
from torch_embed._sequential import read_sequential
from torch_embed.schemes import Null, Split, plan
from torch_embed.widen import embed_

pytestmark = pytest.mark.usefixtures("single_thread_module")


def as_matrix(directions, model, k):
    """(P, k) matrix of k directions given as {name: (k, *shape)}."""
    cols = [
        directions[n].reshape(k, -1) if n in directions else torch.zeros(k, p.numel(), dtype=F64)
        for n, p in model.named_parameters()
    ]
    return torch.cat(cols, dim=1).T


def linear_part(embedding, narrow):
    """(P_wide, P_narrow) matrix of θ ↦ Aθ (the constant c removed)."""
    names = [n for n, _ in narrow.named_parameters()]
    zero = {n: torch.zeros_like(p, dtype=F64) for n, p in narrow.named_parameters()}
    base = embedding.apply(zero)
    cols = []
    for n in names:
        for j in range(zero[n].numel()):
            e = {k: v.clone() for k, v in zero.items()}
            e[n].view(-1)[j] = 1.0
            out = embedding.apply(e)
            cols.append(torch.cat([(out[k] - base[k]).reshape(-1) for k in names]))
    return torch.stack(cols, dim=1)


def split_wide(net, layer, neuron, alpha):
    wide = copy.deepcopy(net)
    widths = list(read_sequential(net).hidden_widths)
    widths[layer] += 1
    emb = plan(wide, widths, Split(alpha=alpha, select={layer: [neuron]}))
    embed_(wide, emb)
    return wide, emb


def null_wide(net, layer, beta):
    wide = copy.deepcopy(net)
    widths = list(read_sequential(net).hidden_widths)
    widths[layer] += 1
    emb = plan(wide, widths, Null(bias=beta))
    embed_(wide, emb)
    return wide, emb


def split_basis(wide, layer, neuron, alpha):
    lay = read_sequential(wide)
    n_v = own_parameter_count(lay, layer)
    k = n_v + lay.linears[layer + 1].out_features
    eye = torch.eye(k, dtype=F64)
    new = lay.hidden_widths[layer] - 1
    d = split_direction(lay, layer, neuron, new, alpha, eye[:, :n_v], eye[:, n_v:])
    return as_matrix(d, wide, k)


def null_basis(wide, layer, value):
    lay = read_sequential(wide)
    n_v = own_parameter_count(lay, layer)
    k = n_v + lay.linears[layer + 1].out_features
    eye = torch.eye(k, dtype=F64)
    new = lay.hidden_widths[layer] - 1
    d = null_direction(lay, layer, new, value, eye[:, :n_v], eye[:, n_v:])
    return as_matrix(d, wide, k)


# --------------------------------------------------------------------------- signals
def test_layer_signals_match_autograd():
    net = randn_mlp((3, 4, 3, 2), "softplus")
    x, y = randn_data((3, 4, 3, 2))
    loss = nn.MSELoss()
    captured = {}
    hook = net[2].register_forward_hook(lambda m, i, o: captured.setdefault("p", o))
    value = loss(net(x), y)
    hook.remove()
    (delta,) = torch.autograd.grad(value, captured["p"])
    sig = layer_signals(net, loss, x, y, 0)
    torch.testing.assert_close(sig.delta, delta, rtol=1e-12, atol=1e-15)
    z = x @ net[0].weight.detach().T + net[0].bias.detach()
    torch.testing.assert_close(sig.z, z)
    torch.testing.assert_close(sig.h, torch.cat([x, torch.ones(12, 1, dtype=F64)], 1))
    s = torch.sigmoid(z)  # softplus' = sigmoid, softplus'' = sigmoid (1 - sigmoid)
    torch.testing.assert_close(sig.d1, s)
    torch.testing.assert_close(sig.d2, s * (1 - s))
    assert sig.fan_out is not None and sig.fan_out.shape == (3, 4)


def test_split_coupling_times_fan_out_is_the_fan_in_gradient():
    net = randn_mlp((3, 4, 3, 2), "sigmoid")
    x, y = randn_data((3, 4, 3, 2))
    loss = nn.MSELoss()
    gw, gb = torch.autograd.grad(loss(net(x), y), [net[2].weight, net[2].bias])
    sig = layer_signals(net, loss, x, y, 1)
    for s in range(3):
        got = split_coupling(sig, s) @ sig.fan_out[:, s]
        torch.testing.assert_close(got, torch.cat([gw[s], gb[s : s + 1]]), rtol=1e-10, atol=1e-14)


def test_state_argument_evaluates_elsewhere():
    net = randn_mlp((2, 3, 1))
    other = randn_mlp((2, 3, 1), seed=5)
    x, y = randn_data((2, 3, 1))
    a = layer_signals(net, nn.MSELoss(), x, y, 0, state=other.state_dict())
    b = layer_signals(other, nn.MSELoss(), x, y, 0)
    torch.testing.assert_close(a.delta, b.delta)
    torch.testing.assert_close(a.d2, b.d2)


# --------------------------------------------------------------------------- closed forms
@pytest.mark.parametrize("alpha", [0.5, 0.3, 1.7, -0.4])
@pytest.mark.parametrize(
    ("widths", "layer", "act"),
    [((2, 3, 2), 0, "tanh"), ((3, 4, 3, 2), 0, "sigmoid"), ((3, 4, 3, 2), 1, "softplus")],
)
def test_split_block_equals_brute_force(act, alpha, widths, layer):
    net = randn_mlp(widths, act, seed=len(widths) + layer)
    x, y = randn_data(widths)
    loss = nn.MSELoss()
    neuron = 1
    D = split_block(layer_signals(net, loss, x, y, layer), neuron, alpha)
    wide, _ = split_wide(net, layer, neuron, alpha)
    C = split_basis(wide, layer, neuron, alpha)
    want = C.T @ brute_hessian(wide, loss, x, y) @ C
    torch.testing.assert_close(D, want, rtol=1e-9, atol=1e-12)
    # the block really is [[α(1-α)S, G], [Gᵀ, 0]]
    sig = layer_signals(net, loss, x, y, layer)
    nv = sig.h.shape[1]
    torch.testing.assert_close(D[:nv, :nv], alpha * (1 - alpha) * splitting_matrix(sig, neuron))
    assert bool((D[nv:, nv:] == 0).all())


@pytest.mark.parametrize("act", list(ACTS))
def test_split_block_without_biases(act):
    widths = (3, 4, 2)
    net = randn_mlp(widths, act, bias=False, seed=3)
    x, y = randn_data(widths)
    loss = nn.MSELoss()
    D = split_block(layer_signals(net, loss, x, y, 0), 2, 0.25)
    assert D.shape == (3 + 2, 3 + 2)  # no bias coordinate
    wide, _ = split_wide(net, 0, 2, 0.25)
    C = split_basis(wide, 0, 2, 0.25)
    torch.testing.assert_close(D, C.T @ brute_hessian(wide, loss, x, y) @ C, rtol=1e-9, atol=1e-12)


def test_split_block_cross_entropy():
    widths = (3, 4, 3)
    net = randn_mlp(widths, "tanh", seed=7)
    x, _ = randn_data(widths)
    y = torch.tensor([0, 1, 2, 1, 0, 2, 2, 1, 0, 0, 1, 2])
    loss = nn.CrossEntropyLoss()
    D = split_block(layer_signals(net, loss, x, y, 0), 0, 0.6)
    wide, _ = split_wide(net, 0, 0, 0.6)
    C = split_basis(wide, 0, 0, 0.6)
    torch.testing.assert_close(D, C.T @ brute_hessian(wide, loss, x, y) @ C, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("beta", [0.0, 0.7])
@pytest.mark.parametrize(("widths", "layer"), [((2, 3, 2), 0), ((3, 4, 3, 2), 1)])
def test_null_block_equals_brute_force(act, beta, widths, layer):
    net = randn_mlp(widths, act, seed=11 + layer)
    x, y = randn_data(widths)
    loss = nn.MSELoss()
    z = torch.tensor([beta], dtype=F64)
    slope, _ = activation_derivatives(net, layer, z)
    value = float(ACTS[act]()(z))
    D = null_block(layer_signals(net, loss, x, y, layer), float(slope))
    wide, emb = null_wide(net, layer, beta)
    assert emb.layers[layer].null_value[-1].item() == pytest.approx(value)
    C = null_basis(wide, layer, value)
    torch.testing.assert_close(D, C.T @ brute_hessian(wide, loss, x, y) @ C, rtol=1e-9, atol=1e-12)


def test_null_without_next_bias_needs_sigma_zero():
    # tanh(0) = 0: the null neuron's fan-out needs no compensation, even without a bias
    net = randn_mlp((2, 3, 2), "tanh", bias=[True, False], seed=2)
    x, y = randn_data((2, 3, 2))
    loss = nn.MSELoss()
    wide, emb = null_wide(net, 0, 0.0)
    assert emb.is_critical
    D = null_block(layer_signals(net, loss, x, y, 0), 1.0)
    C = null_basis(wide, 0, 0.0)
    torch.testing.assert_close(D, C.T @ brute_hessian(wide, loss, x, y) @ C, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="no bias to compensate"):
        null_basis(wide, 0, 0.5)


def test_null_block_inertia_is_rank_of_coupling():
    net = randn_mlp((3, 4, 3), "tanh", seed=4)
    x, y = randn_data((3, 4, 3))
    sig = layer_signals(net, nn.MSELoss(), x, y, 0)
    G = null_coupling(sig, 0.8)
    r = int(torch.linalg.matrix_rank(G))
    ev = torch.linalg.eigvalsh(null_block(sig, 0.8))
    tol = 1e-12 * float(ev.abs().max())
    n = ev.numel()
    assert (int((ev < -tol).sum()), int((ev.abs() <= tol).sum()), int((ev > tol).sum())) == (
        r,
        n - 2 * r,
        r,
    )
    assert r == 3  # 4 own coordinates, 3 outputs: full rank at a random point


# --------------------------------------------------------------------------- orthogonality
@pytest.mark.parametrize("kind", ["split-inside", "split-outside", "null"])
def test_embedding_and_complement_are_H_orthogonal(kind):
    widths = (2, 3, 3, 2)
    net = randn_mlp(widths, "sigmoid", seed=21)
    x, y = randn_data(widths)
    loss = nn.MSELoss()
    if kind == "null":
        wide, emb = null_wide(net, 1, 0.4)
        C = null_basis(wide, 1, float(torch.sigmoid(torch.tensor(0.4, dtype=F64))))
    else:
        alpha = 0.35 if kind == "split-inside" else 2.5
        wide, emb = split_wide(net, 1, 2, alpha)
        C = split_basis(wide, 1, 2, alpha)
    A = linear_part(emb, net)
    H = brute_hessian(wide, loss, x, y)
    scale = float(H.abs().max())
    assert float((A.T @ H @ C).abs().max()) <= 1e-12 * scale  # AᵀHC = 0 (not critical!)
    assert float((C.T @ brute_gradient(wide, loss, x, y)).abs().max()) <= 1e-14
    torch.testing.assert_close(A.T @ H @ A, brute_hessian(net, loss, x, y), rtol=1e-10, atol=1e-13)
    # [A C] is a basis: inertia(H_wide) = inertia(H_narrow) + inertia(CᵀHC)
    assert int(torch.linalg.matrix_rank(torch.cat([A, C], 1))) == A.shape[0]


# --------------------------------------------------------------------------- directions
def test_split_direction_with_batchnorm_coordinates():
    wide = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.Tanh(), nn.Linear(3, 2))
    lay = read_sequential(wide)
    assert own_parameter_count(lay, 0) == 2 + 1 + 2
    assert own_parameter_count(lay, 0, bn_affine=False) == 3
    v = torch.arange(1.0, 6.0)
    d = split_direction(lay, 0, 0, 2, 0.25, v, torch.tensor([1.0, -1.0]))
    assert d["0.weight"][0].tolist() == [0.25, 0.5] and d["0.weight"][2].tolist() == [-0.75, -1.5]
    assert d["1.weight"].tolist() == [1.0, 0.0, -3.0]
    assert d["1.bias"].tolist() == [1.25, 0.0, -3.75]
    assert d["3.weight"].tolist() == [[1.0, 0.0, -1.0], [-1.0, 0.0, 1.0]]
    assert "3.bias" in d and bool((d["3.bias"] == 0).all())


def test_direction_shape_errors():
    lay = read_sequential(nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2)))
    with pytest.raises(ValueError, match="3 own-parameter coordinates"):
        split_direction(lay, 0, 0, 2, 0.5, torch.zeros(2), torch.zeros(2))
    with pytest.raises(ValueError, match="out of range"):
        null_direction(lay, 1, 2, 0.0, torch.zeros(3), torch.zeros(2))


# --------------------------------------------------------------------------- refusals
def test_batchnorm_layer_is_refused_with_the_hvp_hint():
    net = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.Tanh(), nn.Linear(3, 1)).double()
    net.eval()
    x, y = randn_data((2, 3, 1))
    with pytest.raises(ValueError, match=r"hidden layer 0 has a BatchNorm1d \(module '1'\).*hvp"):
        layer_signals(net, nn.MSELoss(), x, y, 0)


def test_activation_without_double_backward_is_refused():
    net = nn.Sequential(nn.Linear(2, 3), nn.Hardsigmoid(), nn.Linear(3, 1)).double()
    x, y = randn_data((2, 3, 1))
    with pytest.raises(ValueError, match=r"module '1' \(Hardsigmoid\) has no second derivative"):
        layer_signals(net, nn.MSELoss(), x, y, 0)


def test_relu_has_zero_second_derivative():
    net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)).double()
    x, y = randn_data((2, 3, 1))
    sig = layer_signals(net, nn.MSELoss(), x, y, 0)
    assert bool((sig.d2 == 0).all())
    assert bool(((sig.d1 == 0) | (sig.d1 == 1)).all())
    assert bool((splitting_matrix(sig, 0) == 0).all())


def test_train_mode_dropout_and_bad_layer_are_refused():
    net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Dropout(0.2), nn.Linear(3, 1)).double()
    x, y = randn_data((2, 3, 1))
    with pytest.raises(ValueError, match=r"'2' \(Dropout\) is in train mode"):
        layer_signals(net, nn.MSELoss(), x, y, 0)
    net.eval()
    assert layer_signals(net, nn.MSELoss(), x, y, 0).width == 3
    with pytest.raises(ValueError, match="hidden layer index 1 is out of range"):
        layer_signals(net, nn.MSELoss(), x, y, 1)
    with pytest.raises(ValueError, match="neuron 3 is out of range"):
        split_block(layer_signals(net, nn.MSELoss(), x, y, 0), 3, 0.5)
