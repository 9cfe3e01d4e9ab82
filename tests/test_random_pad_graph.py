"""RandomPad on the traced path: the new units' biases and a grouped conv's in-axis.

The MLP path's RandomPad (torch_embed/schemes.py) draws a new neuron's fan-in and bias
from ``U(-b, b)``, ``b = scale/sqrt(fan_in)`` (``nn.Linear``'s default, the wide
fan-in), stores the bias in the BatchNorm's bias when there is one, and its fan-out
from ``U(-scale/sqrt(w), ...)``. On a traced model the same holds per channel, with
``fan_in = in/groups × kernel`` (``nn.Conv``'s default), and a grouped conv reading a
grown group gets random columns for the new channels in the rows of their group.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

import torch_embed
from torch_embed.graph.embedding import GroupEmbedding
from torch_embed.widen import widen

F64 = torch.float64


class _Net(nn.Module):
    """conv → grouped conv (2 groups) → BatchNorm → conv → head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.bn = nn.BatchNorm2d(4)
        self.conv3 = nn.Conv2d(4, 3, 1)
        self.head = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.conv1(x))
        h = torch.relu(self.bn(self.conv2(h)))
        return self.head(torch.relu(self.conv3(h)).mean((2, 3)))


def _widened(seed: int, scale: float = 1.0) -> tuple[nn.Module, dict[str, Tensor], GroupEmbedding]:
    torch.manual_seed(0)
    model = _Net().double().eval()
    with torch.no_grad():  # nonzero BatchNorm state, so that kept entries are telling
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
        model.bn.bias.uniform_(-1, 1)
    narrow = {n: t.detach().clone() for n, t in model.state_dict().items()}
    x = torch.randn(2, 2, 5, 5, dtype=F64)
    emb = widen(
        model,
        {"conv1": 40, "conv2": 40},
        torch_embed.RandomPad(scale),
        example_inputs=x,
        generator=torch.Generator().manual_seed(seed),
    )
    assert isinstance(emb, GroupEmbedding)
    return model, narrow, emb


def _uniform(values: Tensor, bound: float) -> None:
    """Drawn from U(-bound, bound): inside, and spread like it (mean |v| = bound/2)."""
    assert values.numel() >= 30
    assert float(values.abs().max()) < bound
    assert bool((values != 0).all())
    assert 0.35 * bound < float(values.abs().mean()) < 0.65 * bound


def test_new_biases_and_grouped_columns_are_drawn_old_entries_kept() -> None:
    model, narrow, emb = _widened(seed=0, scale=2.0)
    state = model.state_dict()
    src1, src2 = emb.maps["conv1"].source, emb.maps["conv2"].source
    new1, old1 = (src1 < 0).nonzero().flatten(), (src1 >= 0).nonzero().flatten()
    new2, old2 = (src2 < 0).nonzero().flatten(), (src2 >= 0).nonzero().flatten()
    assert new1.numel() == 36 and new2.numel() == 36
    # conv1: the bias of its new channels ~ U(-b, b), b = 2/sqrt(2·3·3) (fan-in unchanged)
    b1 = 2.0 / math.sqrt(2 * 9)
    _uniform(state["conv1.bias"][new1], b1)
    _uniform(state["conv1.weight"][new1], b1)
    assert torch.equal(state["conv1.bias"][old1], narrow["conv1.bias"][src1[old1]])
    assert torch.equal(state["conv1.weight"][old1], narrow["conv1.weight"][src1[old1]])
    # conv2 (2 groups) reads conv1's group: wide channel j is column j % 20 of the rows
    # of group j // 20; fan-in 20·3·3 once wide
    b2 = 2.0 / math.sqrt(20 * 9)
    w2 = state["conv2.weight"].view(2, 20, 20, 3, 3)  # (group, out rows, in share, kernel)
    narrow2 = narrow["conv2.weight"].view(2, 2, 2, 3, 3)
    rows = old2.view(2, -1) % 20  # the kept output rows of each group
    cols = new1.view(2, -1) % 20  # the new in-channels of each group
    for q in range(2):
        _uniform(w2[q][rows[q]][:, cols[q]], b2)
        kept = old1.view(2, -1)[q] % 20
        got = w2[q][rows[q]][:, kept]
        assert torch.equal(got, narrow2[q][:, src1[old1].view(2, -1)[q] % 2])
    # conv2's group: its new biases live in the BatchNorm's bias (as on the MLP path),
    # bound by conv2's wide fan-in; conv2's own bias stays 0 there; BN γ = 1, var 1
    _uniform(state["bn.bias"][new2], b2)
    assert bool((state["conv2.bias"][new2] == 0).all())
    assert bool((state["bn.weight"][new2] == 1).all())
    assert bool((state["bn.running_var"][new2] == 1).all())
    for name in ("bn.bias", "bn.weight", "bn.running_mean", "bn.running_var", "conv2.bias"):
        assert torch.equal(state[name][old2], narrow[name][src2[old2]]), name
    # conv3 reads conv2's group: the new columns ~ U(-2/sqrt(40), ...)
    _uniform(state["conv3.weight"][:, new2], 2.0 / math.sqrt(40))


def test_draws_repeat_for_the_same_generator() -> None:
    a, _, _ = _widened(seed=3)
    b, _, _ = _widened(seed=3)
    c, _, _ = _widened(seed=4)
    for name, t in a.state_dict().items():
        assert torch.equal(t, b.state_dict()[name]), name
    for name in ("conv1.bias", "bn.bias", "conv2.weight"):
        assert not torch.equal(a.state_dict()[name], c.state_dict()[name]), name


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.tanh(self.a(x)))


def test_custom_mlp_biases_follow_the_mlp_path_bound() -> None:
    """A traced MLP's new biases: ``U(-scale/sqrt(in), ...)`` as schemes.py draws them."""
    torch.manual_seed(0)
    model = _MLP().double()
    x = torch.randn(5, 3, dtype=F64)
    old = model.a.bias.detach().clone()
    widen(
        model,
        {"a": 44},
        torch_embed.RandomPad(0.5),
        example_inputs=x,
        generator=torch.Generator().manual_seed(0),
    )
    assert torch.equal(model.a.bias[:4].detach(), old)
    _uniform(model.a.bias[4:].detach(), 0.5 / math.sqrt(3))
