"""critical_dimension (the paper's estimate) and empirical_nullity (a measurement)."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from cases import brute_hessian, counts, randn_data, randn_mlp
from torch import nn

import torch_embed
from torch_embed.critical import critical_point
from torch_embed.landscape.dimension import critical_dimension, empirical_nullity

MSE = nn.MSELoss()


@pytest.mark.parametrize(
    ("narrow", "wide", "expected"),
    [
        ((1, 2, 1), (1, 2, 1), 0),
        ((1, 2, 1), (1, 5, 1), 3),
        ((3, 2, 2, 1), (3, 4, 3, 1), 2 + 1 + 2 * 1),
        ((3, 2, 2, 2, 1), (3, 3, 2, 4, 1), 1 + 0 + 2 + (0 * 1 + 2 * 0)),
        ((2, 1, 1, 1, 2), (2, 3, 4, 2, 2), (2 + 3 + 1) + (3 * 2 + 1 * 3)),
    ],
)
def test_critical_dimension_formula(narrow, wide, expected):
    assert critical_dimension(narrow, wide) == expected
    # brute force: K + Σ over adjacent hidden pairs
    k = [b - a for a, b in zip(narrow, wide)][1:-1]
    assert expected == sum(k) + sum(a * b for a, b in itertools.pairwise(k))


def test_critical_dimension_refuses_bad_widths():
    with pytest.raises(ValueError, match="different depths"):
        critical_dimension((1, 2, 1), (1, 2, 2, 1))
    with pytest.raises(ValueError, match="input and output"):
        critical_dimension((1, 2, 1), (2, 3, 1))
    with pytest.raises(ValueError, match="narrower"):
        critical_dimension((1, 3, 1), (1, 2, 1))
    with pytest.raises(ValueError, match="at least one hidden"):
        critical_dimension((1, 1), (1, 1))
    with pytest.raises(ValueError, match="positive int"):
        critical_dimension((1, 2.5, 1), (1, 3, 1))
    with pytest.raises(TypeError, match="sequence"):
        critical_dimension(3, (1, 3, 1))


def _critical_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 2), nn.Tanh(), nn.Linear(2, 1)).double()
    x = torch.linspace(-2, 2, 20, dtype=torch.float64)[:, None]
    y = torch.tanh(3 * (x - 1)) + torch.tanh(3 * (x + 1)) + 0.5 * torch.tanh(3 * x)
    net.load_state_dict(
        {
            "0.weight": torch.tensor([[-1.828336974941215], [1.828336974941219]]),
            "0.bias": torch.tensor([-1.6335547709693823, -1.6335547709693872]),
            "2.weight": torch.tensor([[-1.3018037406867118, 1.3018037406867105]]),
            "2.bias": torch.tensor([0.0]),
        }
    )
    assert critical_point(net, MSE, x, y).grad_norm < 1e-13
    return net, x, y


def _brute_zero_count(net, x, y):
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for p in net.parameters()]
    sizes = [p.numel() for p in net.parameters()]

    def f(theta):
        state = {n: c.view(s) for n, c, s in zip(names, torch.split(theta, sizes), shapes)}
        return MSE(torch.func.functional_call(net, state, (x,)), y)

    theta = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    ev = torch.linalg.eigvalsh(torch.autograd.functional.hessian(f, theta))
    return int((ev.abs() <= 1e-9 * ev.abs().max()).sum())


@pytest.mark.parametrize(
    ("widths", "scheme"),
    [
        ([3], torch_embed.Split(alpha=0.5, select=[0])),
        ([4], torch_embed.Split(alpha=0.3, select=[0, 1])),
        ([4], torch_embed.Split(alpha=(0.2, 0.5, 0.3), select=[1])),
        ([3], torch_embed.Null(bias=0.0)),
        ([4], torch_embed.Null(bias=0.7)),
    ],
    ids=["split", "split2", "kway", "null", "null2"],
)
def test_nullity_increase_matches_estimate_for_one_hidden_layer(widths, scheme):
    net, x, y = _critical_net()
    n0 = empirical_nullity(net, MSE, x, y)
    assert n0 == _brute_zero_count(net, x, y) == 0  # a strict local minimum
    wide = copy.deepcopy(net)
    emb = torch_embed.widen(wide, widths, scheme)
    n1 = empirical_nullity(wide, MSE, x, y)
    assert n1 == _brute_zero_count(wide, x, y)
    assert n1 - n0 == critical_dimension(emb.narrow_widths, emb.wide_widths)


def test_empirical_nullity_uses_the_given_tolerance():
    """With tol= the zero count is |λ| <= tol of the dense autograd Hessian, whatever the
    default tolerance would say (a random point: no eigenvalue is a rounding zero)."""
    widths = (2, 3, 2)
    net = randn_mlp(widths, "tanh", seed=2)
    x, y = randn_data(widths)
    ev = torch.linalg.eigvalsh(brute_hessian(net, nn.MSELoss(), x, y))
    mags = ev.abs().sort().values
    k = max(range(1, len(mags) - 1), key=lambda i: float(mags[i] / mags[i - 1]))
    assert float(mags[k]) > 1.5 * float(mags[k - 1])
    tol = float((mags[k - 1] * mags[k]).sqrt())  # a clean gap: exactly k "zeros"
    assert counts(ev, tol)[1] == k
    default = empirical_nullity(net, nn.MSELoss(), x, y)  # the default: the signs here
    assert default == counts(ev, 2 * len(ev) * 2.0**-52 * float(mags[-1]))[1] != k
    assert empirical_nullity(net, nn.MSELoss(), x, y, tol=tol) == k
