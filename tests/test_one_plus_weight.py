"""Zero-fill under an RMSNorm that scales by ``1 + weight`` (Gemma's): ``AxisMap.shift``.

The norm stores ``w = γ − 1``; the zero-fill's ``γ × √(D/D')`` is
``w' = √(D/D')·(1 + w) − 1`` and ``γ_new = 0`` is ``w_new = −1``. References are brute
force, in float64 on a hand-written pre-norm LM: the narrow model's logits, that formula
computed here from the narrow weights, autograd on the wide model against the mapped
narrow gradient, and Adam replayed on the mapped narrow gradients.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from cases import adam_replay
from torch import Tensor, nn

import torch_embed
from torch_embed.embedding import EmbeddingKind
from torch_embed.graph.embedding import GroupEmbedding
from torch_embed.graph.gather import AxisMap, map_tensors
from torch_embed.graph.hf import scales_by_one_plus_weight

D, VOCAB = 8, 11


class OnePlusRMSNorm(nn.Module):
    """Gemma's RMSNorm written out: ``x · rsqrt(mean(x²) + eps) · (1 + w)``."""

    def __init__(self, d: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(0.3 * torch.randn(d))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return y * (1 + self.weight)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = OnePlusRMSNorm(D)
        self.up = nn.Linear(D, 12)
        self.down = nn.Linear(12, D)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.down(F.gelu(self.up(self.norm(x))))


class LM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.blocks = nn.Sequential(Block(), Block())
        self.norm = OnePlusRMSNorm(D)
        self.head = nn.Linear(D, VOCAB, bias=False)

    def forward(self, idx: Tensor) -> Tensor:
        return self.head(self.norm(self.blocks(self.embed(idx))))  # type: ignore[no-any-return]


NORMS = ("blocks.0.norm", "blocks.1.norm", "norm")


def _model() -> LM:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return LM().double()


def _idx() -> Tensor:
    return torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))


def _loss(model: nn.Module, idx: Tensor) -> Tensor:
    out = model(idx)
    r = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)
    return (out * r).sum() + 0.5 * (out**2).sum()


def test_the_norm_is_recognised() -> None:
    assert scales_by_one_plus_weight(OnePlusRMSNorm)


@pytest.mark.parametrize("width", [13, 16])
def test_zero_fill_keeps_the_logits_and_maps_w_affinely(width: int) -> None:
    model, idx = _model(), _idx()
    narrow = {n: model.get_submodule(n).weight.detach().clone() for n in NORMS}
    with torch.no_grad():
        before = model(idx)
    emb = torch_embed.widen(model, {"embed": width}, torch_embed.Null(), example_inputs=(idx,))
    assert emb.kind is EmbeddingKind.CRITICAL
    with torch.no_grad():
        after = model(idx)
    assert float((after - before).abs().max() / before.abs().max()) <= 1e-12
    c = math.sqrt(D / width)
    for n in NORMS:
        norm = model.get_submodule(n)
        w = norm.weight.detach()
        assert w.shape == (width,)
        assert torch.allclose(w[:D], c * (1 + narrow[n]) - 1, rtol=0, atol=1e-15)
        assert torch.equal(w[D:], torch.full((width - D,), -1.0, dtype=torch.float64))
        assert norm.eps == pytest.approx(1e-6 * D / width, rel=1e-12)


def test_gradients_map() -> None:
    """The wide model's autograd gradient equals the narrow gradient mapped (.grad too)."""
    model, idx = _model(), _idx()
    _loss(model, idx).backward()
    narrow = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    torch_embed.widen(model, {"embed": 13}, torch_embed.Null(), example_inputs=(idx,))
    mapped = {n: p.grad for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    _loss(model, idx).backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and mapped[n] is not None
        scale = max(float(narrow[n].abs().max()), 1e-3)
        assert float((p.grad - mapped[n]).abs().max()) <= 1e-11 * scale, n


def test_adam_state_equals_replay() -> None:
    """Adam's moments after widening equal Adam replayed on the mapped narrow gradients.

    (Adam's steps do not commute with the gain √(D/D') on γ, shifted or not: only the
    moments are compared, as in tests/test_widen_transformer.py.)
    """
    model, idx = _model(), _idx()
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    grads = []
    for _ in range(3):
        optimizer.zero_grad()
        _loss(model, idx).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})  # type: ignore[union-attr]
        optimizer.step()
    emb = torch_embed.widen(
        model, {"embed": 13}, torch_embed.Null(), example_inputs=(idx,), optimizer=optimizer
    )
    assert isinstance(emb, GroupEmbedding)
    replay, replay_opt = adam_replay(emb, init, grads, lr=0.01)
    for n, p in model.named_parameters():
        got, want = optimizer.state[p], replay_opt.state[replay[n]]
        for key in ("exp_avg", "exp_avg_sq"):
            err = float((got[key] - want[key]).abs().max())
            assert err <= 1e-12 * max(float(want[key].abs().max()), 1e-12), (n, key, err)


def _axis(shift: float = 1.0, **kw: object) -> AxisMap:
    src = torch.tensor([0, 1, 2, -1, -1])
    gain = torch.full((5,), 0.5, dtype=torch.float64)
    return AxisMap("w", 0, "copy", src, torch.ones(5, dtype=torch.float64), gain=gain,
                   shift=shift, **kw)  # type: ignore[arg-type]  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shift_maps_the_stored_tensor_affinely_rounded_once(dtype: torch.dtype) -> None:
    w = torch.tensor([0.1, -0.7, 3.0], dtype=dtype)
    out = map_tensors((_axis(),), {"w": w}, "apply")["w"]
    want = torch.cat([0.5 * (1 + w.double()) - 1, torch.tensor([-1.0, -1.0], dtype=torch.float64)])
    assert out.dtype == dtype and torch.equal(out, want.to(dtype))
    grad = map_tensors((_axis(),), {"w": w}, "grad")["w"]  # ∂L/∂w = ∂L/∂γ: no shift
    assert torch.equal(grad, torch.cat([w / 0.5, torch.zeros(2, dtype=dtype)]))


def test_shift_is_checked() -> None:
    with pytest.raises(ValueError, match=r"'w' axis 0: shift must be finite"):
        _axis(float("nan"))
    with pytest.raises(TypeError, match=r"'w' axis 0: shift must be a float, got str"):
        _axis("1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"copied per-channel scale only, not with mean"):
        _axis(mean=True)
    with pytest.raises(ValueError, match=r"not with role 'split'"):
        AxisMap("w", 0, "split", torch.tensor([0]), torch.ones(1, dtype=torch.float64), shift=1.0)
    ones = torch.ones(1, dtype=torch.float64)
    mixed = (_axis(), AxisMap("w", 1, "copy", torch.tensor([0]), ones))
    with pytest.raises(ValueError, match=r"AxisMaps of 'w' give different shifts \[0\.0, 1\.0\]"):
        map_tensors(mixed, {"w": torch.zeros(3, 1)}, "apply")
