"""Example: testing your own widening code with torch_embed.testing and its pytest fixtures.

Copy this file into your project's tests. With torch_embed installed, the fixtures
(``mlp_factory``, ``regression_data``, ``torch_embed_generator``, ``float64``) come from
its pytest plugin automatically; run ``pytest --torch-embed-seed=3`` to try another seed
(the seed is printed in pytest's header).

``net2wider`` below stands for the code under test: a hand-written Net2Net widening of
one hidden layer, as many projects have. The tests check, against torch_embed's
reference implementation and the theory, that it preserves the function, maps gradients
like a critical embedding, keeps a critical point critical and never lowers the Hessian
inertia — and show that the same checks catch a classic bug.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import torch_embed
from torch_embed.testing import (
    assert_critical,
    assert_embedding_nondecreasing,
    assert_function_preserved,
    assert_gradients_mapped,
)


# ---------------------------------------------------------------------------- your code
def net2wider(
    fan_in: nn.Linear,
    fan_out: nn.Linear,
    new_width: int,
    generator: torch.Generator,
    *,
    divide_fan_out: bool = True,
) -> list[int]:
    """Widen the hidden layer between two Linears by replicating random units (Net2Net).

    Returns the index map: for each new unit, the old unit it copies.
    """
    old = fan_in.out_features
    picks = torch.randint(old, (new_width - old,), generator=generator)
    mapping = list(range(old)) + picks.tolist()
    counts = torch.bincount(torch.tensor(mapping), minlength=old).to(fan_out.weight.dtype)
    with torch.no_grad():
        w_in = fan_in.weight[mapping]
        b_in = fan_in.bias[mapping] if fan_in.bias is not None else None
        w_out = fan_out.weight[:, mapping]
        if divide_fan_out:  # the step the classic bug forgets
            w_out = w_out / counts[mapping]
        fan_in.weight = nn.Parameter(w_in)
        if b_in is not None:
            fan_in.bias = nn.Parameter(b_in)
        fan_out.weight = nn.Parameter(w_out)
    fan_in.out_features = fan_out.in_features = new_width
    return mapping


def as_embedding(narrow: nn.Sequential, mapping: list[int]) -> torch_embed.Embedding:
    """Describe the index map as torch_embed's general embedding (equal fan-out split)."""
    return torch_embed.plan(narrow, None, torch_embed.General(sources=[mapping]))


# ---------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("activation", ["tanh", "relu", "softplus"])
def test_net2wider_preserves_the_function(
    mlp_factory, regression_data, torch_embed_generator, activation
):
    net = mlp_factory([3, 5, 2], activation, dtype=torch.float32)
    x, _ = regression_data(n=50, in_features=3, out_features=2, dtype=torch.float32)
    narrow = copy.deepcopy(net)
    net2wider(net[0], net[2], 12, torch_embed_generator)
    # default tolerance: the rigorous float32 rounding-error bound of both networks
    assert_function_preserved(narrow, net, x)


def test_net2wider_is_a_critical_embedding(mlp_factory, regression_data, torch_embed_generator):
    net = mlp_factory([3, 5, 2])
    x, y = regression_data(n=40, in_features=3, out_features=2)
    narrow = copy.deepcopy(net)
    mapping = net2wider(net[0], net[2], 9, torch_embed_generator)
    embedding = as_embedding(narrow, mapping)
    assert embedding.kind is torch_embed.EmbeddingKind.CRITICAL
    # your widening gives exactly the parameters of torch_embed's reference map ...
    reference = embedding.apply(narrow.state_dict())
    for name, value in net.state_dict().items():
        torch.testing.assert_close(value, reference[name], rtol=0, atol=1e-15)
    # ... and its gradients are the mapped narrow gradients at this (non-critical) point
    assert_gradients_mapped(narrow, net, embedding, nn.MSELoss(), x, y)


def test_net2wider_keeps_a_critical_point_critical_and_inertia_grows(
    float64, torch_embed_generator
):
    # a closed-form critical point (zero fan-in and fan-out, output bias = mean target),
    # built in the float64 default dtype the fixture sets
    x = torch.linspace(-2, 2, 10)[:, None]
    y = torch.sin(3 * x)
    net = nn.Sequential(nn.Linear(1, 3), nn.Tanh(), nn.Linear(3, 1))
    with torch.no_grad():
        net[0].weight.zero_()
        net[0].bias.copy_(torch.tensor([0.5, -1.0, 1.5]))
        net[2].weight.zero_()
        net[2].bias.fill_(float(y.mean()))
    assert_critical(net, nn.MSELoss(), x, y, gtol=1e-14)
    narrow = copy.deepcopy(net)
    net2wider(net[0], net[2], 5, torch_embed_generator)
    assert_critical(net, nn.MSELoss(), x, y, gtol=1e-14)
    before, after = assert_embedding_nondecreasing(narrow, net, nn.MSELoss(), x, y)
    assert after.negative > before.negative  # widening this saddle adds escape directions


def test_the_checks_catch_the_forgotten_fan_out_division(
    mlp_factory, regression_data, torch_embed_generator
):
    net = mlp_factory([3, 5, 2])
    x, _ = regression_data(n=20, in_features=3, out_features=2)
    narrow = copy.deepcopy(net)
    net2wider(net[0], net[2], 9, torch_embed_generator, divide_fan_out=False)
    with pytest.raises(AssertionError, match="widened output differs from the reference output"):
        assert_function_preserved(narrow, net, x)
