"""torch_embed.critical: polishing to |∇R| <= 1e-12, checked with plain autograd."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

import torch_embed
from torch_embed.critical import critical_point

F64 = torch.float64


def _data() -> tuple[Tensor, Tensor]:
    x = torch.linspace(-2, 2, 20, dtype=F64).unsqueeze(1)
    y = torch.tanh(3 * (x - 1)) + torch.tanh(3 * (x + 1)) + 0.5 * torch.tanh(3 * x)
    return x, y


def _autograd_grad_norm(net: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    net.zero_grad()
    loss = nn.functional.mse_loss(net(x), y)
    loss.backward()
    norm = torch.cat([p.grad.reshape(-1) for p in net.parameters()]).norm()
    net.zero_grad()
    return float(norm), float(loss.detach())


def _tanh_net(width: int = 2, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1, width), nn.Tanh(), nn.Linear(width, 1)).double()


@pytest.mark.parametrize("seed", [0, 1])
def test_reaches_1e12_in_place(seed: int) -> None:
    net = _tanh_net(seed=seed)
    x, y = _data()
    start = copy.deepcopy(net.state_dict())
    norm0, loss0 = _autograd_grad_norm(net, x, y)
    res = critical_point(net, nn.MSELoss(), x, y, gtol=1e-12)
    norm, loss = _autograd_grad_norm(net, x, y)
    assert res.converged and res.message == "converged"
    assert norm <= 1e-12  # independent check of the in-place result
    assert res.grad_norm == pytest.approx(norm, rel=1e-6, abs=1e-15)
    assert res.loss == pytest.approx(loss, rel=1e-12) and loss < loss0
    assert res.initial_grad_norm == pytest.approx(norm0, rel=1e-12)
    assert not torch.equal(net[0].weight, start["0.weight"])
    assert res.iterations == res.lbfgs_iterations + res.newton_iterations


def test_impossible_gtol_reports_not_converged() -> None:
    net = _tanh_net()
    x, y = _data()
    res = critical_point(net, nn.MSELoss(), x, y, gtol=1e-300, max_iter=5, max_newton_iter=2)
    assert not res.converged
    assert res.grad_norm > 1e-300
    assert res.lbfgs_iterations <= 5 and res.newton_iterations <= 2
    norm, _ = _autograd_grad_norm(net, x, y)
    assert res.grad_norm == pytest.approx(norm, rel=1e-6, abs=1e-15)
    assert res.message != "converged"


def test_nearly_critical_saddle_is_polished_not_escaped() -> None:
    """An embedded critical point is a saddle: Newton keeps it (L-BFGS would leave it)."""
    net = _tanh_net()
    x, y = _data()
    assert critical_point(net, nn.MSELoss(), x, y).converged
    _, narrow_loss = _autograd_grad_norm(net, x, y)
    torch_embed.widen(net, [3], "split", generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        g = torch.Generator().manual_seed(9)
        for p in net.parameters():
            p.add_(1e-8 * torch.randn(p.shape, dtype=F64, generator=g))
    res = critical_point(net, nn.MSELoss(), x, y)
    assert res.converged and res.lbfgs_iterations == 0 and res.method == "newton"
    norm, loss = _autograd_grad_norm(net, x, y)
    assert norm <= 1e-12
    assert loss == pytest.approx(narrow_loss, rel=1e-9)  # still on the embedded saddle


def test_refuses_float32_and_train_mode() -> None:
    x, y = _data()
    net32 = nn.Sequential(nn.Linear(1, 2), nn.Tanh(), nn.Linear(2, 1))
    with pytest.raises(ValueError, match=r"model\.double\(\)"):
        critical_point(net32, nn.MSELoss(), x, y)
    drop = nn.Sequential(nn.Linear(1, 2), nn.Tanh(), nn.Dropout(), nn.Linear(2, 1)).double()
    with pytest.raises(ValueError, match="train mode"):
        critical_point(drop, nn.MSELoss(), x, y)
    with pytest.raises(ValueError, match="gtol"):
        critical_point(_tanh_net(), nn.MSELoss(), x, y, gtol=0.0)
