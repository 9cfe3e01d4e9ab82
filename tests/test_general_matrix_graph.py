"""General with matrix coefficients (one per connection) on the traced path (issue 12).

A custom-forward MLP 3-5-4-2 and the same weights as an ``nn.Sequential``: the traced
``widen`` with a matrix ``General`` gives the Sequential path's tensors bit for bit; the
output is kept; when the matrix satisfies the backward condition the mapped gradient
is the wide model's autograd gradient and the kind is critical, else the kind is
output-preserving with the reason and gradients are not mapped. Refused: a group read by
two tensors (a residual add, a second Linear) or by a conv.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

import torch_embed
from torch_embed import EmbeddingKind, General, widen

F64 = torch.float64


class MLP(nn.Module):
    """3-5-4-2 with its own forward (not a Sequential)."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(3, 5), nn.Linear(5, 4), nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.l3(torch.tanh(self.l2(torch.tanh(self.l1(x)))))


def _models(seed: int) -> tuple[MLP, nn.Sequential, Tensor]:
    torch.manual_seed(seed)
    custom = MLP().double()
    seq = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2))
    seq = seq.double()
    with torch.no_grad():
        for a, b in ((custom.l1, seq[0]), (custom.l2, seq[2]), (custom.l3, seq[4])):
            b.weight.copy_(a.weight)
            b.bias.copy_(a.bias)
    gen = torch.Generator().manual_seed(seed + 100)
    return custom, seq, torch.randn(7, 3, generator=gen, dtype=F64)


SRC1 = [0, 1, 2, 3, 4, 0, 1]  # hidden layer 1: 5 -> 7
SRC2 = [0, 1, 2, 3, 0, 2]  # hidden layer 2: 4 -> 6


def _shares(src: list[int], gen: torch.Generator) -> Tensor:
    """Random per-unit shares summing to 1 over each unit's copies."""
    s = torch.tensor(src)
    raw = torch.rand(len(src), generator=gen, dtype=F64) + 0.2
    sums = torch.zeros(int(s.max()) + 1, dtype=F64).index_add_(0, s, raw)
    return raw / sums[s]


def _null_sum(src: list[int], gen: torch.Generator) -> Tensor:
    """A random vector summing to 0 over each unit's copies (0 on units with one copy)."""
    s = torch.tensor(src)
    v = torch.randn(len(src), generator=gen, dtype=F64)
    counts = torch.bincount(s)
    sums = torch.zeros(counts.numel(), dtype=F64).index_add_(0, s, v)
    return torch.where(counts[s] > 1, v - sums[s] / counts[s], 0.0)


def _matrix(
    beta: Tensor, src: list[int], rows_src: list[int] | None, rows_beta: Tensor | None, ok: bool
) -> Tensor:
    """``1 ⊗ β + u ⊗ v``: shares of ``src`` in every row (``v`` sums to 0 over copies).

    ``ok``: ``u`` sums to 0 against the next layer's error scalings over each of its
    units' copies (``Σ_{i ∈ copies(h)} u_i β'_i = 0``): the backward condition holds with
    error scalings ``β``. Else ``u`` is random: no error scalings exist.
    """
    gen = torch.Generator().manual_seed(len(src) * 10 + len(rows_src or []) + ok)
    rows = len(rows_src) if rows_src is not None else 2
    v = _null_sum(src, gen)
    if ok:
        assert rows_src is not None and rows_beta is not None
        u = torch.zeros(rows, dtype=F64)
        rs = torch.tensor(rows_src)
        for h in range(int(rs.max()) + 1):
            copies = (rs == h).nonzero().flatten().tolist()
            if len(copies) == 2:
                i1, i2 = copies
                u[i1], u[i2] = rows_beta[i2], -rows_beta[i1]
    else:
        u = torch.randn(rows, generator=gen, dtype=F64)
    return torch.ones(rows, 1, dtype=F64) * beta + u[:, None] * v


def _grads(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    model.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-300))


_SEQ = {"l1": "0", "l2": "2", "l3": "4"}


def _same_bits(custom: nn.Module, seq: nn.Module) -> None:
    for name, p in custom.state_dict().items():
        layer, _, what = name.partition(".")
        q = seq.state_dict()[f"{_SEQ[layer]}.{what}"]
        assert p.shape == q.shape and torch.equal(p, q), name


def test_one_group_matrix_matches_the_sequential_path_bit_for_bit() -> None:
    """Layer 1 grown with a (4, 7) matrix; layer 2 not grown. No error scalings exist
    (rows differ, each row a different narrow unit): output-preserving, with the reason."""
    custom, seq, x = _models(0)
    beta = _shares(SRC1, torch.Generator().manual_seed(1))
    C = _matrix(beta, SRC1, [0, 1, 2, 3], None, ok=False)
    before = custom(x).detach()
    emb = widen(custom, None, General({"l1": SRC1}, {"l1": C}), example_inputs=x)
    mlp = widen(seq, None, General([SRC1, None], [C, None]))
    _same_bits(custom, seq)
    assert _rel(custom(x).detach(), before) <= 1e-12
    assert emb.kind is EmbeddingKind.OUTPUT_PRESERVING and mlp.kind is emb.kind
    assert any("backward condition" in r and "'l1'" in r for r in emb.reasons)
    with pytest.raises(ValueError, match=r"admit no linear gradient map"):
        emb.map_gradients({"l1.weight": torch.ones(5, 3, dtype=F64)})
    assert torch.equal(emb.maps["l1"].coef, C)


@pytest.mark.parametrize("second", ["vector", "matrix"])
def test_two_groups_matrix_is_critical_and_maps_gradients(second: str) -> None:
    """Both layers grown: layer 1 by a matrix that satisfies the backward condition
    against layer 2's error scalings (its split shares, or those of its own matrix):
    same tensors as the Sequential path, output kept, kind critical, and the narrow
    gradient mapped equals the wide model's autograd gradient."""
    custom, seq, x = _models(1)
    gen = torch.Generator().manual_seed(2)
    beta2 = _shares(SRC2, gen)
    beta1 = _shares(SRC1, gen)
    C2: Tensor = beta2 if second == "vector" else torch.ones(2, 1, dtype=F64) * beta2
    C1 = _matrix(beta1, SRC1, SRC2, beta2, ok=True)
    assert not torch.allclose(C1, C1[0].expand_as(C1))  # a real matrix
    y = torch.randn(7, 2, generator=gen, dtype=F64)
    narrow = _grads(custom, x, y)
    before = custom(x).detach()
    g = General({"l1": SRC1, "l2": SRC2}, {"l1": C1, "l2": C2})
    emb = widen(custom, None, g, example_inputs=x)
    mlp = widen(seq, None, General([SRC1, SRC2], [C1, C2]))
    _same_bits(custom, seq)
    assert _rel(custom(x).detach(), before) <= 1e-12
    assert emb.kind is EmbeddingKind.CRITICAL and mlp.kind is EmbeddingKind.CRITICAL
    assert emb.reasons == ()
    mapped = emb.map_gradients(narrow)
    wide = _grads(custom, x, y)
    for name, gw in wide.items():
        assert _rel(mapped[name], gw) <= 1e-12, name
    # the same map as the Sequential path's, up to rounding of the error scalings
    mlp_mapped = mlp.map_gradients({f"{_SEQ[n[:2]]}{n[2:]}": t for n, t in narrow.items()})
    for name, t in mapped.items():
        assert _rel(t, mlp_mapped[f"{_SEQ[name[:2]]}{name[2:]}"]) <= 1e-14, name


def test_two_groups_matrix_without_error_scalings_is_output_preserving() -> None:
    """A matrix whose rows do not satisfy the backward condition against layer 2's
    copies: output kept, kind output-preserving with the reason, gradients refused (as
    for the Sequential MLP); with a .grad present widen refuses and leaves the model."""
    custom, seq, x = _models(2)
    gen = torch.Generator().manual_seed(3)
    beta2, beta1 = _shares(SRC2, gen), _shares(SRC1, gen)
    C1 = _matrix(beta1, SRC1, SRC2, beta2, ok=False)
    g = General({"l1": SRC1, "l2": SRC2}, {"l1": C1, "l2": beta2})
    y = torch.randn(7, 2, generator=gen, dtype=F64)
    nn.functional.mse_loss(custom(x), y).backward()
    state = copy.deepcopy(custom.state_dict())
    with pytest.raises(ValueError, match=r"admit no linear gradient map"):
        widen(custom, None, g, example_inputs=x)
    for k, v in custom.state_dict().items():
        assert torch.equal(v, state[k]), k
    custom.zero_grad(set_to_none=True)
    before = custom(x).detach()
    emb = widen(custom, None, g, example_inputs=x)
    mlp = widen(seq, None, General([SRC1, SRC2], [C1, beta2]))
    _same_bits(custom, seq)
    assert _rel(custom(x).detach(), before) <= 1e-12
    assert emb.kind is EmbeddingKind.OUTPUT_PRESERVING and mlp.kind is emb.kind
    assert any("violate the backward condition" in r for r in emb.reasons)


def test_matrix_shares_are_checked() -> None:
    """Rows must hold shares summing to 1 over each unit's copies, and the matrix one
    row per wide output row of the reader."""
    custom, _, x = _models(3)
    C = torch.full((4, 7), 0.5, dtype=F64)
    with pytest.raises(ValueError, match=r"width group 'l1': in row 0 .* narrow neuron 2"):
        widen(custom, None, General({"l1": SRC1}, {"l1": C}), example_inputs=x)
    beta = _shares(SRC1, torch.Generator().manual_seed(4))
    wrong = torch.ones(6, 1, dtype=F64) * beta  # layer 2 does not grow: 4 rows
    with pytest.raises(ValueError, match=r"must have shape \(wide_next, wide\) = \(4, 7\)"):
        widen(custom, None, General({"l1": SRC1}, {"l1": wrong}), example_inputs=x)


def test_matrix_embeddings_refuse_restrict_then_steps_and_inertia_change() -> None:
    custom, _, x = _models(4)
    gen = torch.Generator().manual_seed(5)
    beta2, beta1 = _shares(SRC2, gen), _shares(SRC1, gen)
    C1 = _matrix(beta1, SRC1, SRC2, beta2, ok=True)
    groups = torch_embed.width_groups(custom, x)
    g = General({"l1": SRC1, "l2": SRC2}, {"l1": C1, "l2": beta2})
    emb = widen(custom, None, g, example_inputs=x)
    match = r"matrix coefficients .* one coefficient per wide unit only"
    with pytest.raises(ValueError, match="restrict: .*" + match):
        emb.restrict(custom.state_dict())
    with pytest.raises(ValueError, match="then: .*" + match):
        emb.then(emb)
    with pytest.raises(ValueError, match="steps: .*" + match):
        emb.steps(groups)
    with pytest.raises(ValueError, match="inertia_change: .*" + match):
        emb.inertia_change(custom, nn.MSELoss(), x, torch.zeros(7, 2, dtype=F64))


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.a(x)
        return self.c(h + torch.tanh(self.b(h)))


class _TwoReaders(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.c, self.d = nn.Linear(3, 4), nn.Linear(4, 2), nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.a(x))
        return self.c(h) + self.d(h)


class _Cat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, 4), nn.Linear(3, 3), nn.Linear(7, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.c(torch.cat([torch.tanh(self.a(x)), torch.tanh(self.b(x))], -1))


class _Conv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 2, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize(
    ("model", "shape", "match"),
    [
        (_Residual, (5, 3), r"read by 2: `b` \(aten.linear, `b.weight` axis 1\), `c`"),
        (_TwoReaders, (5, 3), r"read by 2: `c` \(aten.linear, `c.weight` axis 1\), `d`"),
        (_Conv, (2, 3, 7, 7), r"its reader is `b` \(aten.conv2d, `b.weight` axis 1\), a conv2d"),
        (_Cat, (5, 3), r"its reader is `c` \(aten.linear, `c.weight` axis 1\), which reads more"),
    ],
)
def test_matrix_refused_unless_one_linear_reads_the_group(
    model: type[nn.Module], shape: tuple[int, ...], match: str
) -> None:
    torch.manual_seed(6)
    net = model().double()
    x = torch.randn(*shape, dtype=F64)
    src = [0, 1, 2, 3, 0]
    C = torch.ones(2, 5, dtype=F64)
    C[:, 0], C[:, 4] = 0.25, 0.75
    state = copy.deepcopy(net.state_dict())
    with pytest.raises(ValueError, match=r"width group 'a': a matrix of coefficients") as info:
        widen(net, None, General({"a": src}, {"a": C}), example_inputs=x)
    assert info.match(match)
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_matrix_refused_under_a_rule_over_the_group() -> None:
    """A LayerNorm over the group (uniform copies) is a rule a matrix does not keep."""

    class Norm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.n, self.c = nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.c(self.n(self.a(x)))

    torch.manual_seed(7)
    net, x = Norm().double(), torch.randn(5, 3, dtype=F64)
    C = torch.full((2, 8), 0.5, dtype=F64)
    with pytest.raises(ValueError, match=r"no rule over the group; aten.layer_norm in `n` \("):
        widen(net, None, General({"a": [0, 1, 2, 3] * 2}, {"a": C}), example_inputs=x)


def test_adam_state_is_the_replay_of_the_wide_gradients() -> None:
    """Adam after one narrow step, widened with a critical matrix General: its moments
    are those of the wide gradient at the embedded point (autograd on a copy)."""
    custom, _, x = _models(8)
    gen = torch.Generator().manual_seed(9)
    beta2, beta1 = _shares(SRC2, gen), _shares(SRC1, gen)
    C1 = _matrix(beta1, SRC1, SRC2, beta2, ok=True)
    g = General({"l1": SRC1, "l2": SRC2}, {"l1": C1, "l2": beta2})
    y = torch.randn(7, 2, generator=gen, dtype=F64)
    reference = copy.deepcopy(custom)
    widen(reference, None, g, example_inputs=x)
    wide = _grads(reference, x, y)  # the wide gradient at the embedded point
    opt = torch.optim.Adam(custom.parameters(), lr=1e-3, betas=(0.8, 0.9))
    nn.functional.mse_loss(custom(x), y).backward()
    opt.step()
    custom.zero_grad(set_to_none=True)
    widen(custom, None, g, example_inputs=x, optimizer=opt)
    for name, p in custom.named_parameters():
        st = opt.state[p]
        assert _rel(st["exp_avg"], 0.2 * wide[name]) <= 1e-12, name
        assert _rel(st["exp_avg_sq"], 0.1 * wide[name] ** 2) <= 1e-12, name
