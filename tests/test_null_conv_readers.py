"""Null units with a nonzero value σ(β) read by a convolution (issue 12, traced path).

A null channel with zero fan-in feeds its reader the constant ``σ(β)`` at every
position. For an unpadded conv reader (any stride, dilation, groups) every tap reads
that constant at every output position, so ``∂R/∂w[o, c, tap] = σ(β)·∂R/∂b_o``
exactly: widen maps those columns from the bias gradient, checked here against
autograd on the wide model. A padded reader's border taps read the padding instead:
no bias gradient gives them, and widen says so, naming the conv and its padding.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import torch_embed
from torch_embed.embedding import EmbeddingKind
from torch_embed.graph.embedding import GroupEmbedding
from torch_embed.widen import widen

F64 = torch.float64
CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


class _CNN(nn.Module):
    """conv → σ-shifted activation → reader conv (padding, stride, dilation, groups) → head."""

    def __init__(self, dim: int, act: str, padding: int = 0, groups: int = 1) -> None:
        super().__init__()
        conv = CONVS[dim]
        self.act = act
        self.conv = conv(2, 4, 3, padding=1)
        self.reader = conv(4, 6, 2, stride=2, dilation=2, padding=padding, groups=groups)
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv(x)
        h = torch.sigmoid(h) if self.act == "sigmoid" else torch.tanh(h) + 0.75
        h = torch.tanh(self.reader(h))
        return self.head(h.flatten(2).mean(-1))


def _loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return nn.functional.mse_loss(model(x), y)


def _setup(
    dim: int, act: str, padding: int = 0, groups: int = 1
) -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(dim)
    model = _CNN(dim, act, padding, groups).double()
    x = torch.randn(3, 2, *[7] * dim, dtype=F64)
    y = torch.randn(3, 3, dtype=F64)
    return model, x, y


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("act", ["sigmoid", "tanh+0.75"])
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_unpadded_conv_reader_maps_the_null_columns(dim: int, act: str, groups: int) -> None:
    model, x, y = _setup(dim, act, groups=groups)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    _loss(model, x, y).backward()
    opt.step()  # Adam state to map
    opt.zero_grad()
    _loss(model, x, y).backward()  # the gradient at the point that is widened
    with torch.no_grad():
        before = model(x)
    emb = widen(model, {"conv": 8}, torch_embed.Null(bias=0.5), example_inputs=x, optimizer=opt)
    assert isinstance(emb, GroupEmbedding)
    assert emb.kind is EmbeddingKind.CRITICAL, emb.reasons
    assert set(emb.null_values) == {"reader.weight"}
    with torch.no_grad():
        assert float((model(x) - before).abs().max()) <= 1e-12 * float(before.abs().max())
    mapped = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    _loss(model, x, y).backward()  # the wide network's own gradient
    for n, p in model.named_parameters():
        assert p.grad is not None
        err = float((p.grad - mapped[n]).abs().max())
        assert err <= 1e-12 * max(float(p.grad.abs().max()), 1e-300), (n, err)
    # the null columns' Adam state: σ(β) (σ(β)² for the squares) times the bias's state
    value = torch.sigmoid(torch.tensor(0.5, dtype=F64))
    if act != "sigmoid":
        value = torch.tanh(torch.tensor(0.5, dtype=F64)) + 0.75
    nulls = emb.null_values["reader.weight"].nonzero().flatten().tolist()
    assert len(nulls) == 4  # the 4 new channels (in each group's segment when grouped)
    assert torch.allclose(emb.null_values["reader.weight"][nulls], value, rtol=1e-15, atol=0)
    w, b = opt.state[model.reader.weight], opt.state[model.reader.bias]
    share = 8 // groups  # the wide in-axis: 8 channels in `groups` segments
    for k in ("exp_avg", "exp_avg_sq"):
        factor = value**2 if k == "exp_avg_sq" else value
        for j in nulls:
            q, c = divmod(j, share)
            rows = slice(q * 6 // groups, (q + 1) * 6 // groups)
            expected = factor * b[k][rows].view(-1, *[1] * dim)
            got = w[k][rows, c]
            assert float((got - expected).abs().max()) <= 1e-15 * float(b[k].abs().max()), k


def test_padded_conv_reader_keeps_the_caveat() -> None:
    """Padding 1: the border taps read zeros, not σ(β); the map's columns are not the
    wide gradient, and the embedding says which conv and which padding."""
    model, x, y = _setup(2, "sigmoid", padding=1)
    _loss(model, x, y).backward()
    with pytest.warns(torch_embed.ApproximateStateWarning, match=r"padding \(1, 1\)"):
        emb = widen(model, {"conv": 8}, torch_embed.Null(bias=0.5), example_inputs=x)
    assert emb.kind is EmbeddingKind.OUTPUT_PRESERVING
    assert not emb.null_values
    assert "`reader` has padding (1, 1)" in emb.reasons[0], emb.reasons
