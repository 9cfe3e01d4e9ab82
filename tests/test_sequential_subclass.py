"""A subclass of nn.Sequential that overrides forward is refused by widen (issue 12).

Before, widen read its layers in order and widened it as a plain MLP: with a skip
connection in the forward, the output changed by ~4e-2 without a warning.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from zoo import by_name

import torch_embed


def test_widen_refuses_a_sequential_subclass_with_its_own_forward() -> None:
    case = by_name("sequential_subclass_residual")
    model = case.build().eval()
    (x,) = case.example_inputs()
    before = {k: t.clone() for k, t in model.state_dict().items()}
    with torch.no_grad():
        out = model(x)
    with pytest.raises(TypeError, match=r"overrides forward.*width_groups"):
        torch_embed.widen(model, [7])
    for k, t in model.state_dict().items():
        assert torch.equal(t, before[k]), k
    with torch.no_grad():
        assert torch.equal(model(x), out)


class Renamed(nn.Sequential):
    """A subclass that keeps Sequential's forward is still an MLP widen can read."""

    def describe(self) -> str:
        return "mlp"


def test_a_subclass_keeping_sequential_forward_is_still_widened() -> None:
    net = Renamed(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x: Tensor = torch.randn(5, 3, dtype=torch.float64)
    with torch.no_grad():
        before = net(x)
    torch_embed.widen(net, [6])
    with torch.no_grad():
        assert (net(x) - before).abs().max() < 1e-12
