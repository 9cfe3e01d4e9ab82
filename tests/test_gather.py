"""The gather engine's MLP features against brute force (torch_embed.graph.gather).

An MLP's :class:`~torch_embed.Embedding` is applied by the engine of traced models;
these are the features only MLP embeddings used before: matrix coefficients with their
error scalings ``β`` (not the coefficients), fan-out offsets (``landscape.condense``),
explicit null fan-in rows, ``σ(β)``-scaled bias gradients of null columns, and the
field checks of :class:`~torch_embed.graph.gather.AxisMap`.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from cases import Arch, build_mlp, random_coefficients, random_inputs, symmetric_offsets
from torch import nn

from torch_embed.embedding import Embedding, EmbeddingKind
from torch_embed.graph.gather import AxisMap, map_tensors
from torch_embed.schemes import General, Null, Split, plan
from torch_embed.widen import embed_

F64 = torch.float64
ARCH3 = Arch(3, (4, 5, 3), 2)  # three hidden layers, tanh, all biases


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _matrix_general(net: nn.Module) -> Embedding:
    """A critical General embedding with a ``(wide_1, wide_0)`` coefficient matrix on
    hidden layer 0 (``C = v 1ᵀ + u wᵀ``: rows sum to 1 over the copies, the backward
    condition holds with error scalings ``β = v``, not ``C``), a null neuron with
    ``β = 0.3`` (``σ(β) = tanh(0.3) != 0``, absorbed by the next bias), a three-way split
    of layer 1 and an identity layer 2."""
    g = _g(5)
    m0, m1 = 4, 5
    src0 = [*range(m0), 0, 0, m0 - 1, -1]
    v = torch.tensor(random_coefficients(src0, g), dtype=F64)
    w = torch.zeros(len(src0), dtype=F64)
    w[[0, m0, m0 + 1]] = torch.tensor([0.4, -0.1, -0.3], dtype=F64)
    src1 = [*range(m1), 0, 0]
    c1 = torch.ones(len(src1), dtype=F64)
    c1[[0, m1, m1 + 1]] = torch.tensor([0.5, 0.2, 0.3], dtype=F64)
    u = torch.zeros(len(src1), dtype=F64)
    u[[0, m1, m1 + 1]] = torch.tensor([0.6, -0.5, -1.0 / 0.3 * (0.5 * 0.6 - 0.2 * 0.5)], dtype=F64)
    matrix = v[None, :] + u[:, None] * w[None, :]
    scheme = General([src0, src1, None], [matrix, c1.tolist(), None], null_bias=[0.3, 0.0, 0.0])
    return plan(net, None, scheme)


def _grads(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    net.zero_grad()
    nn.functional.mse_loss(net(x), y).backward()
    return {n: p.grad.detach().clone() for n, p in net.named_parameters()}


def test_matrix_general_keeps_the_output_and_maps_gradients_like_autograd() -> None:
    net = build_mlp(ARCH3, seed=1)
    emb = _matrix_general(net)
    assert emb.kind is EmbeddingKind.CRITICAL and not emb.layers[0].is_vector
    betas = emb._row_scales()
    assert betas is not None and not torch.equal(betas[0], torch.ones_like(betas[0]))
    wide = copy.deepcopy(net)
    embed_(wide, emb)
    x = random_inputs(ARCH3, 16)
    y = torch.randn(16, 2, generator=_g(2), dtype=F64)
    with torch.no_grad():
        ref, out = net(x), wide(x)
    assert float((out - ref).abs().max()) <= 1e-12 * float(ref.abs().max())
    narrow_g, wide_g = _grads(net, x, y), _grads(wide, x, y)
    mapped = emb.map_gradients(narrow_g)
    squares = emb.map_second_moments({k: v * v for k, v in narrow_g.items()})
    scale = max(float(v.abs().max()) for v in wide_g.values())
    for k, want in wide_g.items():
        assert mapped[k].shape == want.shape, k
        assert float((mapped[k] - want).abs().max()) <= 1e-12 * scale, k
        # second moments map by the squared factors: (B g)² entry by entry
        torch.testing.assert_close(squares[k], want * want, rtol=1e-10, atol=1e-14 * scale**2)
    # the null column of Linear 1 carries σ(β)·∂R/∂b1 (not 0): the bias term is there
    null = int((emb.layers[0].source < 0).nonzero()[0])
    assert float(mapped["2.weight"][:, null].abs().max()) > 1e-6


def _dense_apply(emb: Embedding, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every wide weight from the definition, in float64: rows copied (null rows: their
    fan-in), columns times their coefficient, plus the offset."""
    out = {}
    L = len(emb.layout.linears)
    for k, lin in enumerate(emb.layout.linears):
        w = state[f"{lin.name}.weight"]
        rows = emb.layers[k] if k < L - 1 else None
        cols = emb.layers[k - 1] if k > 0 else None
        r = rows.source.clamp(min=0) if rows is not None else torch.arange(w.shape[0])
        c = cols.source.clamp(min=0) if cols is not None else torch.arange(w.shape[1])
        dense = w[r][:, c]
        if cols is not None:
            dense = dense * cols.coef
            if cols.fan_out_offset is not None:
                dense = dense + cols.fan_out_offset
        if rows is not None:
            fan_in = rows.null_fan_in
            dense[rows.null_mask] = 0.0 if fan_in is None else fan_in[rows.null_mask]
        out[f"{lin.name}.weight"] = dense
    return out


@pytest.mark.parametrize("kind", ["offsets", "null_fan_in", "offsets_and_null_fan_in"])
def test_offsets_and_null_fan_in_rows_are_the_definition(kind: str) -> None:
    net = build_mlp(ARCH3, seed=3)
    if kind == "offsets":
        emb = symmetric_offsets(plan(net, [7, 8, 5], Split(alpha=0.5), generator=_g(3)), 0.2, _g(4))
    elif kind == "null_fan_in":
        emb = plan(net, [7, 8, 5], Null(bias=0.2, fan_in_std=0.7), generator=_g(3))
    else:  # offsets on copies, then null neurons with a fan-in beside them
        split = symmetric_offsets(plan(net, [6, 7, 4], Split(), generator=_g(5)), 0.2, _g(4))
        mid = copy.deepcopy(net)
        embed_(mid, split)
        emb = split.then(plan(mid, [8, 9, 6], Null(bias=0.2, fan_in_std=0.7), generator=_g(6)))
    assert any(lm.null_fan_in is not None or lm.fan_out_offset is not None for lm in emb.layers)
    state = {k: v.detach() for k, v in net.state_dict().items()}
    got = emb.apply(state)
    for k, want in _dense_apply(emb, state).items():
        torch.testing.assert_close(got[k], want, rtol=0, atol=1e-15)
    wide = copy.deepcopy(net)
    embed_(wide, emb)
    x = random_inputs(ARCH3, 16)
    with torch.no_grad():
        ref, out = net(x), wide(x)
    assert float((out - ref).abs().max()) <= 1e-12 * float(ref.abs().max())


# ----------------------------------------------------------------------------- AxisMap
def test_axis_map_matrix_coefficients_offset_and_null_rows() -> None:
    """One 2-D weight through the engine: rows copied (a null row gets its fan-in),
    columns scaled entry by entry and offset, against the dense definition; gradients
    scale rows by ``β`` (not the coefficients) and keep columns."""
    w = torch.randn(3, 2, generator=_g(1), dtype=F64)
    rows = torch.tensor([0, 1, 2, 1, -1])
    cols = torch.tensor([0, 1, 0])
    coef = torch.tensor([[0.3, 1.0, 0.7]] * 5, dtype=F64)
    coef[1, 0], coef[1, 2] = 0.9, 0.1
    offset = torch.zeros(5, 3, dtype=F64)
    offset[:, 0], offset[:, 2] = 0.25, -0.25
    fan_in = torch.zeros(5, 3, dtype=F64)
    fan_in[4] = torch.tensor([1.0, 2.0, 3.0], dtype=F64)
    beta = torch.tensor([1.0, 0.5, 1.0, 0.5, 0.0], dtype=F64)
    ones = torch.ones(5, dtype=F64)
    axes = (
        AxisMap("w", 0, "copy", rows, ones, beta=beta, null_rows=fan_in),
        AxisMap("w", 1, "split", cols, coef, offset=offset),
    )
    want = w[rows.clamp(min=0)][:, cols] * coef + offset
    want[4] = fan_in[4]
    torch.testing.assert_close(map_tensors(axes, {"w": w}, "apply")["w"], want, rtol=0, atol=0)
    grad = (w[rows.clamp(min=0)] * beta[:, None])[:, cols]
    torch.testing.assert_close(map_tensors(axes, {"w": w}, "grad")["w"], grad, rtol=0, atol=0)
    second = (w[rows.clamp(min=0)] * (beta * beta)[:, None])[:, cols]
    got = map_tensors(axes, {"w": w}, "second")["w"]
    torch.testing.assert_close(got, second, rtol=0, atol=0)


def test_axis_map_buffers_map_like_apply_in_every_mode() -> None:
    v = torch.tensor([2.0, 3.0], dtype=F64)
    fill = torch.ones(3, dtype=F64)
    a = AxisMap("bn.running_var", 0, "copy", torch.tensor([0, 1, -1]), fill, null_fill=fill)
    stat = replace(a, buffer=True)
    for what in ("apply", "grad", "second"):
        got = map_tensors((stat,), {"bn.running_var": v}, what)["bn.running_var"]
        assert got.tolist() == [2.0, 3.0, 1.0], what
    assert map_tensors((a,), {"bn.running_var": v}, "grad")["bn.running_var"].tolist() == [
        2.0,
        3.0,
        0.0,
    ]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"role": "copy", "coef": torch.ones(2, 3, dtype=F64)}, r"coef \(a matrix\) is for axis 1"),
        ({"coef": torch.ones(2, 4, dtype=F64)}, r"coef must be a float64 tensor of shape \(wide"),
        ({"coef": torch.ones(3)}, r"coef must be a float64 tensor of shape \(3,\)"),
        ({"source": torch.tensor([0.0, 1.0, 0.0])}, r"source must be a 1-D int64 tensor"),
        ({"role": "mix"}, r"role must be one of"),
        ({"beta": torch.ones(3, dtype=F64)}, r"beta scales copied axes"),
        ({"offset": torch.ones(2, 2, dtype=F64)}, r"offset must be a float64 tensor"),
        ({"null_rows": torch.ones(3, 2, dtype=F64)}, r"null_rows \(a matrix\) is for axis 0"),
        ({"groups": 2}, r"groups must be a positive divisor of the wide size 3"),
        ({"null_init": "zeros"}, r"null_init must be one of"),
    ],
)
def test_axis_map_refuses_malformed_fields(kwargs: dict, match: str) -> None:
    fields = {
        "tensor": "fc.weight",
        "axis": 1,
        "role": "split",
        "source": torch.tensor([0, 1, 0]),
        "coef": torch.tensor([0.5, 1.0, 0.5], dtype=F64),
    }
    fields.update(kwargs)
    with pytest.raises(ValueError, match=r"AxisMap of 'fc.weight' axis 1: " + match):
        AxisMap(**fields)


def test_net2net_noise_is_repeatable_and_follows_the_generator() -> None:
    """``apply`` of one embedding gives the same noise every time (the optimizer's
    ``ax`` and the parameters get the same values); the generator decides the draws."""
    from torch_embed.schemes import Net2Net

    net = build_mlp(ARCH3, seed=4)
    state = {k: v.detach() for k, v in net.state_dict().items()}
    a = plan(net, [7, 8, 5], Net2Net(noise=1.0, select="cyclic"), generator=_g(1))
    b = plan(net, [7, 8, 5], Net2Net(noise=1.0, select="cyclic"), generator=_g(1))
    c = plan(net, [7, 8, 5], Net2Net(noise=1.0, select="cyclic"), generator=_g(2))
    first, again = a.apply(state), a.apply(state)
    plain = replace(a, noise=0.0).apply(state)
    for k in state:
        assert torch.equal(first[k], again[k]) and torch.equal(first[k], b.apply(state)[k]), k
    assert not torch.equal(first["2.weight"], plain["2.weight"])
    assert not torch.equal(first["2.weight"], c.apply(state)["2.weight"])
