"""One check, in widen and in inertia_change: the embedding's tensors must be the model's."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import torch_embed
from torch_embed.graph.apply import check_tensors_held
from torch_embed.graph.embedding import GroupEmbedding


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.tanh(self.a(x)))


class _Other(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x)


def _embedding() -> tuple[GroupEmbedding, Tensor]:
    torch.manual_seed(0)
    model = _MLP().double()
    x = torch.randn(5, 3, dtype=torch.float64)
    emb = torch_embed.widen(model, {"a": 6}, "split", example_inputs=x)
    assert isinstance(emb, GroupEmbedding)
    return emb, x


def test_the_check_names_the_caller_the_tensors_and_the_model() -> None:
    emb, _ = _embedding()
    held = {n: p for n, p in _MLP().named_parameters() if n != "b.weight"}
    with pytest.raises(
        ValueError,
        match=r"^widen: the width groups reach \['b.weight'\], which are not parameters or "
        r"buffers of the _MLP \(a tensor",
    ):
        check_tensors_held(
            emb,
            held,
            _MLP(),
            "widen: the width groups reach",
            " (a tensor attribute or a constant); make them parameters or buffers",
        )
    check_tensors_held(emb, dict(_MLP().named_parameters()), _MLP(), "unused", "; unused")


def test_inertia_change_refuses_another_model_through_the_same_check() -> None:
    emb, x = _embedding()
    other = _Other().double()
    with pytest.raises(
        ValueError,
        match=r"^inertia_change: the embedding maps \['a.weight', .*\], which are not "
        r"parameters or buffers of the _Other; pass the model it widened",
    ):
        emb.inertia_change(other, nn.MSELoss(), x, torch.zeros(5, 2, dtype=torch.float64))
