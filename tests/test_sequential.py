"""Reading an nn.Sequential into a Layout, and the element-wise registry."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from cases import ACTIVATIONS, Arch, build_mlp, random_inputs
from torch import nn

from torch_embed._sequential import (
    _REGISTRY,
    HiddenLayer,
    LinearLayer,
    elementwise_info,
    read_sequential,
    register_elementwise,
)
from torch_embed.exactness import forward_error_bound
from torch_embed.schemes import Split
from torch_embed.widen import widen

pytestmark = pytest.mark.usefixtures("single_thread")


def test_layout_of_a_full_mlp() -> None:
    net = nn.Sequential(
        nn.Linear(3, 4),
        nn.BatchNorm1d(4),
        nn.Tanh(),
        nn.Dropout(0.1),
        nn.Linear(4, 5, bias=False),
        nn.GELU(),
        nn.Identity(),
        nn.Linear(5, 2),
    )
    layout = read_sequential(net)
    assert layout.linears == (
        LinearLayer("0", 3, 4, True),
        LinearLayer("4", 4, 5, False),
        LinearLayer("7", 5, 2, True),
    )
    assert layout.hidden == (
        HiddenLayer("0", "1", ("2", "3")),
        HiddenLayer("4", None, ("5", "6")),
    )
    assert layout.widths == (3, 4, 5, 2)
    assert layout.hidden_widths == (4, 5)


def test_named_children_and_linear_without_activation() -> None:
    net = nn.Sequential()
    net.add_module("inp", nn.Linear(2, 3))
    net.add_module("mid", nn.Linear(3, 3))  # a hidden layer with no activation (linear)
    net.add_module("act", nn.ReLU())
    net.add_module("out", nn.Linear(3, 1))
    layout = read_sequential(net)
    assert [h.linear for h in layout.hidden] == ["inp", "mid"]
    assert layout.hidden[0].activations == ()
    assert layout.hidden[1].activations == ("act",)


def test_modules_around_the_linears_are_accepted_and_untouched(gen) -> None:
    """Input normalisation before the first Linear and an output activation after the last."""
    net = nn.Sequential(
        nn.BatchNorm1d(3), nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2), nn.Sigmoid()
    ).double()
    net.eval()
    layout = read_sequential(net)
    assert layout.widths == (3, 4, 2)
    x = random_inputs(3, 6)
    with torch.no_grad():
        before = net(x)
    widen(net, [7], generator=gen)
    assert net[0].num_features == 3 and net[1].out_features == 7
    with torch.no_grad():
        torch.testing.assert_close(net(x), before, rtol=0, atol=1e-15)


def test_every_registered_activation_has_a_case() -> None:
    """The case table covers the registry, so 'every accepted activation' is tested."""
    types = {type(a.make()) for a in ACTIVATIONS.values()}
    missing = {t.__name__ for t in _REGISTRY if t not in types and t is not nn.Dropout}
    assert not missing


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_every_activation_is_accepted_and_widened(name, gen) -> None:
    arch = Arch(2, (3,), 1, activation=(name,))
    net = build_mlp(arch)
    assert elementwise_info(net[1]) is not None
    x = random_inputs(arch, 8)
    with torch.no_grad():
        before = net(x)
    widen(net, [6], Split(alpha=0.3), generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(net(x), before, rtol=0, atol=1e-14)


def test_registry_metadata() -> None:
    assert elementwise_info(nn.PReLU()) is not None
    assert elementwise_info(nn.PReLU(num_parameters=3)) is None
    assert elementwise_info(nn.LayerNorm(3)) is None
    assert elementwise_info(nn.ReLU()).positively_homogeneous  # type: ignore[union-attr]
    assert not elementwise_info(nn.Tanh()).positively_homogeneous  # type: ignore[union-attr]
    assert not elementwise_info(nn.Hardsigmoid()).twice_differentiable  # type: ignore[union-attr]
    assert elementwise_info(nn.LeakyReLU(3.0)).lipschitz(nn.LeakyReLU(3.0)) == 3.0  # type: ignore[union-attr]
    assert elementwise_info(nn.ELU(alpha=2.0)).lipschitz(nn.ELU(alpha=2.0)) == 2.0  # type: ignore[union-attr]
    assert math.isinf(elementwise_info(nn.Hardshrink()).lipschitz(nn.Hardshrink()))  # type: ignore[union-attr]


@pytest.mark.parametrize("name", [n for n, a in ACTIVATIONS.items() if a.continuous])
def test_lipschitz_constants_bound_the_slope(name) -> None:
    """|σ(a) - σ(b)| <= L |a - b| on a fine grid (finite differences, float64)."""
    act = ACTIVATIONS[name].make().double()
    info = elementwise_info(act)
    assert info is not None
    z = torch.linspace(-8, 8, 200001, dtype=torch.float64)
    with torch.no_grad():
        y = act(z)
    slope = float(((y[1:] - y[:-1]) / (z[1:] - z[:-1])).abs().max())
    assert slope <= info.lipschitz(act) * (1 + 1e-6), (slope, info.lipschitz(act))


class Cube(nn.Module):
    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z**3


class Scaled(nn.Module):
    def __init__(self, c: float) -> None:
        super().__init__()
        self.c = c

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.c * z)


def test_register_elementwise_custom_module(clean_registry, gen) -> None:
    net = nn.Sequential(nn.Linear(2, 3), Cube(), nn.Linear(3, 1)).double()
    with pytest.raises(TypeError, match=r"layer 1 \(Cube\) cannot be widened"):
        widen(net, [5])
    register_elementwise(Cube, positively_homogeneous=False)
    x = random_inputs(2, 6)
    with torch.no_grad():
        before = net(x)
    widen(net, [5], Split(alpha=0.25), generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(net(x), before, rtol=0, atol=1e-14)
    # without a Lipschitz constant, the error bound refuses rather than guesses
    with pytest.raises(ValueError, match=r"layer 1 \(Cube\) has no Lipschitz constant"):
        forward_error_bound(net, x)


def test_register_elementwise_lipschitz_number_and_callable(clean_registry) -> None:
    register_elementwise(Scaled, lipschitz=lambda m: abs(m.c))
    net = nn.Sequential(nn.Linear(2, 3), Scaled(2.0), nn.Linear(3, 1))
    assert elementwise_info(net[1]).lipschitz(net[1]) == 2.0  # type: ignore[union-attr]
    x = random_inputs(2, 6, dtype=torch.float32)
    ref = copy.deepcopy(net).double()
    with torch.no_grad():
        err = (net(x).double() - ref(x.double())).abs()
    assert bool((err <= forward_error_bound(net, x)).all())
    register_elementwise(Scaled, lipschitz=5)  # registering again replaces the entry
    assert elementwise_info(net[1]).lipschitz(net[1]) == 5.0  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "bad",
    [Cube(), 3, "Tanh", lambda z: z, int, torch.Tensor],
    ids=["instance", "int", "str", "function", "int_type", "tensor_type"],
)
def test_register_elementwise_rejects_non_modules(clean_registry, bad) -> None:
    before = dict(_REGISTRY)
    with pytest.raises(TypeError, match=r"register_elementwise expects an nn.Module subclass, got"):
        register_elementwise(bad)
    assert dict(_REGISTRY) == before


def test_registry_is_by_exact_type(clean_registry) -> None:
    class MyTanh(nn.Tanh):
        pass

    net = nn.Sequential(nn.Linear(2, 3), MyTanh(), nn.Linear(3, 1))
    with pytest.raises(TypeError, match=r"layer 1 \(MyTanh\) cannot be widened"):
        read_sequential(net)
    register_elementwise(MyTanh, lipschitz=1.0)
    assert read_sequential(net).hidden[0].activations == ("1",)
