"""The Embedding as data: apply / restrict / steps / then, validation, gradient maps."""

from __future__ import annotations

import copy
import importlib
import zlib
from functools import reduce

import pytest
import torch
from cases import (
    Arch,
    build_mlp,
    composition,
    critical_matrix_general,
    general_matrix,
    general_vector,
    random_pad,
    symmetric_offsets,
)
from torch import nn

from torch_embed._sequential import read_sequential
from torch_embed.embedding import Embedding, EmbeddingKind, LayerMap
from torch_embed.schemes import General, Net2Net, Null, RandomPad, Split, plan
from torch_embed.widen import embed_, widen

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64
ARCH = Arch(3, (4, 5), 2, batchnorm=(True, False))
ARCH3 = Arch(2, (3, 4, 2), 1, batchnorm=(False, True, False), bias=(True, False, True, True))


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _plus(net: nn.Module, k: int) -> list[int]:
    return [m + k for m in read_sequential(net).hidden_widths]


# planners (net, generator) -> Embedding of splitting form (they decompose into steps)
SPLITTING = {
    "split_half": lambda n, g: plan(n, _plus(n, 3), Split(), generator=g),
    "split_signed": lambda n, g: plan(n, _plus(n, 5), Split(alpha=-0.6), generator=g),
    "split_kway_repeat": lambda n, g: plan(
        n, _plus(n, 6), Split(alpha=(0.2, 0.5, 0.3), select="random"), generator=g
    ),
    "split_zero_share": lambda n, g: plan(
        n, _plus(n, 2), Split(alpha=(0.5, 0.5, 0.0)), generator=g
    ),
    "null": lambda n, g: plan(n, _plus(n, 3), Null(bias=0.4), generator=g),
    "net2net": lambda n, g: plan(n, _plus(n, 7), Net2Net(), generator=g),
    "general_shuffled": lambda n, g: general_vector(n, _plus(n, 4), g, 0.3),
    "composition": lambda n, g: composition(n, _plus(n, 5), g),
}
# everything, including forms that do not decompose
ALL = {
    **SPLITTING,
    "net2net_noise": lambda n, g: plan(n, _plus(n, 4), Net2Net(noise=0.4), generator=g),
    "null_fan_in": lambda n, g: plan(n, _plus(n, 3), Null(fan_in_std=0.3), generator=g),
    "general_matrix": lambda n, g: general_matrix(n, _plus(n, 3), g),
    "general_matrix_critical": critical_matrix_general,
    "random_pad": lambda n, g: random_pad(n, _plus(n, 3), g),
}


def _states_close(a: dict, b: dict, atol: float = 1e-14) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape, k
        assert a[k].dtype == b[k].dtype, k
        if a[k].is_floating_point():
            err = float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0
            assert err <= atol, (k, err)
        else:
            assert torch.equal(a[k], b[k]), k


def _same_maps(a: Embedding, b: Embedding) -> None:
    assert a.narrow_widths == b.narrow_widths and a.wide_widths == b.wide_widths
    for la, lb in zip(a.layers, b.layers):
        assert torch.equal(la.source, lb.source)
        torch.testing.assert_close(la.coef, lb.coef, rtol=0, atol=1e-15)
        torch.testing.assert_close(la.null_bias, lb.null_bias, rtol=0, atol=0)
        torch.testing.assert_close(la.null_value, lb.null_value, rtol=0, atol=0)


# ----------------------------------------------------------------------------- apply
def test_apply_is_pure_and_keeps_dtype_and_extra_keys() -> None:
    net = build_mlp(ARCH, dtype=torch.float32)
    emb = plan(net, [7, 8], Split(alpha=0.3), generator=_g())
    state = net.state_dict()
    state["extra"] = torch.arange(3)
    frozen = {k: v.clone() for k, v in state.items()}
    wide = emb.apply(state)
    for k in frozen:
        assert torch.equal(state[k], frozen[k]), k  # input untouched
    assert wide["extra"] is state["extra"]
    assert wide["1.num_batches_tracked"] is state["1.num_batches_tracked"]
    assert wide["0.weight"].dtype == torch.float32 and wide["0.weight"].shape == (7, 3)
    assert wide["3.weight"].shape == (8, 7) and wide["5.weight"].shape == (2, 8)


def test_apply_against_the_definition() -> None:
    """W'[i, j] = W[I(i), I(j)] · c_j (copies), zero null rows, β in null biases."""
    net = build_mlp(Arch(2, (3, 2), 1))
    emb = plan(net, [5, 3], Split(alpha=0.25, select=[[2, 0], [1]]))
    w = emb.apply(net.state_dict())
    sd = net.state_dict()
    i0 = [0, 1, 2, 2, 0]
    c0 = torch.tensor([0.75, 1, 0.75, 0.25, 0.25], dtype=F64)
    i1 = [0, 1, 1]
    c1 = torch.tensor([1, 0.75, 0.25], dtype=F64)
    torch.testing.assert_close(w["0.weight"], sd["0.weight"][i0], rtol=0, atol=0)
    torch.testing.assert_close(w["0.bias"], sd["0.bias"][i0], rtol=0, atol=0)
    torch.testing.assert_close(w["2.weight"], sd["2.weight"][i1][:, i0] * c0, rtol=0, atol=1e-16)
    torch.testing.assert_close(w["4.weight"], sd["4.weight"][:, i1] * c1, rtol=0, atol=1e-16)
    assert torch.equal(w["4.bias"], sd["4.bias"])


@pytest.mark.parametrize("name", list(ALL))
@pytest.mark.parametrize("arch", [ARCH, ARCH3], ids=["bn", "deep"])
def test_restrict_inverts_apply(name, arch) -> None:
    net = build_mlp(arch, seed=1)
    emb = ALL[name](net, _g(1))
    narrow = net.state_dict()
    _states_close(emb.restrict(emb.apply(narrow)), narrow, atol=1e-14)


# ----------------------------------------------------------------------------- steps
@pytest.mark.parametrize("name", list(SPLITTING))
def test_steps_compose_back_to_the_embedding(name) -> None:
    net = build_mlp(ARCH, seed=2)
    emb = SPLITTING[name](net, _g(2))
    steps = emb.steps()
    added = emb.num_new_neurons
    one_neuron = [s for s in steps if s.num_new_neurons == 1]
    assert len(one_neuron) == added
    # every step adds exactly one neuron, except a final pure permutation
    for k, s in enumerate(steps):
        if s.num_new_neurons == 0:
            assert k == len(steps) - 1
            for lm in s.layers:
                assert sorted(lm.source.tolist()) == list(range(lm.wide))
                assert lm.coef.tolist() == [1.0] * lm.wide
        else:
            assert s.num_new_neurons == 1
            _assert_one_step(s)
        if k:
            assert s.narrow_widths == steps[k - 1].wide_widths
    composed = reduce(lambda a, b: a.then(b), steps)
    _same_maps(composed, emb)
    # and applying the steps one after the other gives the same parameters
    narrow = net.state_dict()
    stepwise = reduce(lambda st, s: s.apply(st), steps, narrow)
    _states_close(stepwise, emb.apply(narrow), atol=1e-14)
    assert all(s.kind is emb.kind for s in steps if s.num_new_neurons == 1)


def _assert_one_step(step: Embedding) -> None:
    """A one-step split T^α (copy appended, shares 1-α / α) or null neuron (appended)."""
    changed = [l for l, lm in enumerate(step.layers) if lm.wide != step.narrow_widths[l + 1]]
    assert len(changed) == 1
    lm = step.layers[changed[0]]
    m = lm.wide - 1
    assert lm.source[:m].tolist() == list(range(m))
    s = int(lm.source[m])
    if s < 0:
        assert float(lm.coef[m]) == 0.0 and lm.coef[:m].tolist() == [1.0] * m
    else:
        assert abs(float(lm.coef[s] + lm.coef[m]) - 1.0) <= 1e-15
        others = [j for j in range(m) if j != s]
        assert all(float(lm.coef[j]) == 1.0 for j in others)
    for l, other in enumerate(step.layers):
        if l != changed[0]:
            assert torch.equal(other.source, torch.arange(other.wide))


def test_steps_of_a_split_of_a_copy() -> None:
    """Splitting a neuron that was itself a copy: α is relative to the current share."""
    net = build_mlp(Arch(2, (2,), 1))
    emb = plan(net, [2], Split(), generator=_g())  # identity
    assert emb.steps() == []
    emb = plan(net, [4], Split(alpha=0.25, select=[0, 0]))  # 0 -> 0.75, .25; 0.75 -> .5625, .1875
    steps = emb.steps()
    assert [float(s.layers[0].coef[-1]) for s in steps] == pytest.approx([0.25, 0.25])


@pytest.mark.parametrize("name", ["net2net_noise", "null_fan_in", "general_matrix"])
def test_steps_refused_for_non_splitting_forms(name) -> None:
    net = build_mlp(ARCH, seed=2)
    message = r"hidden layer \d: only splitting-form embeddings|Net2Net noise \(.*\) is not a chain"
    with pytest.raises(ValueError, match=message):
        ALL[name](net, _g(2)).steps()


# ----------------------------------------------------------------------------- then
FIRSTS = {
    "split_signed": Split(alpha=-0.3),
    "net2net_noise": Net2Net(noise=0.3),  # refused: noise is no gather
    # neuron 0 carries fan-out offsets: a null neuron of the second embedding must not
    # inherit its offset column (``then`` gathers columns with the null sources clamped
    # to 0)
    "offsets_cyclic": None,
    "null_fan_in": Null(bias=0.2, fan_in_std=0.4),
    # random fan-in rows AND random fan-out columns: the new neurons' fan-out offsets on
    # rows that are themselves new are overwritten by those rows' fan-in (regression:
    # ``then`` added them to the fan-in, off by ~0.18 from applying the two in turn)
    "random_pad": RandomPad(scale=0.5),
}


def _with_offsets(net: nn.Module, widths: list[int], g: torch.Generator) -> Embedding:
    """A cyclic equal split plus symmetric fan-out offsets ``±0.3·ε`` on its pairs."""
    return symmetric_offsets(plan(net, widths, Net2Net(select="cyclic"), generator=g), 0.3, g)


SECONDS = {
    "split_kway": Split(alpha=(0.2, 0.3, 0.5)),
    "null": Null(bias=0.2),
    "general": None,
    "net2net_noise": Net2Net(noise=0.3),
}


@pytest.mark.parametrize("second", list(SECONDS))
@pytest.mark.parametrize("first", list(FIRSTS))
def test_then_equals_two_widen_calls(first, second) -> None:
    net = build_mlp(ARCH, seed=3)
    twice = copy.deepcopy(net)
    if FIRSTS[first] is None:
        e1 = _with_offsets(twice, [6, 7], _g(3))
        embed_(twice, e1)
    else:
        e1 = widen(twice, [6, 7], FIRSTS[first], generator=_g(3))
    scheme = SECONDS[second]
    if scheme is None:
        e2 = general_vector(twice, [9, 10], _g(4), 0.1)
        embed_(twice, e2)
    else:
        e2 = widen(twice, [8, 9], scheme, generator=_g(4))
    once = copy.deepcopy(net)
    if e1.noise or e2.noise:  # Net2Net's noise scales the weights it is applied to
        with pytest.raises(ValueError, match=r"cannot compose an embedding with Net2Net noise"):
            e1.then(e2)
        return
    both = e1.then(e2)
    embed_(once, both)
    _states_close(once.state_dict(), twice.state_dict(), atol=1e-15)
    assert both.narrow_widths == e1.narrow_widths and both.wide_widths == e2.wide_widths
    critical = e1.kind is EmbeddingKind.CRITICAL and e2.kind is EmbeddingKind.CRITICAL
    assert both.is_critical == critical


def test_then_with_matrix_coefficients() -> None:
    net = build_mlp(ARCH, seed=3)
    twice = copy.deepcopy(net)
    e1 = critical_matrix_general(net, _g(5))
    embed_(twice, e1)
    e2 = widen(twice, [10, 9], Split(alpha=0.3), generator=_g(6))
    once = copy.deepcopy(net)
    embed_(once, e1.then(e2))
    _states_close(once.state_dict(), twice.state_dict(), atol=1e-15)
    assert e1.then(e2).kind is EmbeddingKind.CRITICAL


def test_then_offsets_followed_by_matrix_coefficients_with_null_neurons() -> None:
    """The first embedding's fan-out offsets are scaled by the second's matrix
    coefficients, like the weights (regression: ``then`` copied them unscaled to every
    copy, so the composition differed from applying the two in turn by ~3e-2)."""
    net = build_mlp(ARCH, seed=3)
    twice = copy.deepcopy(net)
    e1 = _with_offsets(twice, [6, 7], _g(3))
    embed_(twice, e1)
    c0 = torch.ones(10, 9, dtype=F64)
    c0[:, 0] = torch.linspace(0.2, 0.8, 10, dtype=F64)  # neuron 0: row-dependent split
    c0[:, 7] = 1 - c0[:, 0]
    c0[:, 3] = c0[:, 8] = 0.5
    c0[:, 6] = 0.0  # null
    c1 = torch.ones(2, 10, dtype=F64)
    c1[:, 2], c1[:, 9] = 0.3, 0.7
    c1[:, 7:9] = 0.0  # nulls
    sources = [[0, 1, 2, 3, 4, 5, -1, 0, 3], [0, 1, 2, 3, 4, 5, 6, -1, -1, 2]]
    e2 = plan(twice, [9, 10], General(sources, [c0, c1], null_bias=0.1))
    embed_(twice, e2)
    once = copy.deepcopy(net)
    embed_(once, e1.then(e2))
    _states_close(once.state_dict(), twice.state_dict(), atol=1e-15)


def test_then_refuses_mismatched_widths() -> None:
    net = build_mlp(ARCH)
    a = plan(net, [6, 6], "split", generator=_g())
    b = plan(net, [7, 7], "split", generator=_g())
    with pytest.raises(
        ValueError, match=r"cannot compose: the second embedding starts from widths"
    ):
        a.then(b)


# ----------------------------------------------------------------------------- gradient maps
@pytest.mark.parametrize(
    "name",
    # general_shuffled: a null neuron with σ(β) != 0 feeding split rows of the next layer
    # (its fan-out column's second moment needs the row scale squared)
    [
        "split_signed",
        "split_kway_repeat",
        "null",
        "composition",
        "general_matrix_critical",
        "general_shuffled",
    ],
)
def test_second_moments_map_like_squared_gradients(name) -> None:
    net = build_mlp(ARCH, seed=4)
    emb = ALL[name](net, _g(4))
    g = {k: torch.randn(v.shape, generator=_g(7), dtype=F64) for k, v in net.named_parameters()}
    sq = emb.map_second_moments({k: v**2 for k, v in g.items()})
    mapped = emb.map_gradients(g)
    for k in mapped:
        torch.testing.assert_close(sq[k], mapped[k] ** 2, rtol=1e-14, atol=0)


def test_gradient_map_refused_without_backward_condition() -> None:
    net = build_mlp(ARCH, seed=4)
    emb = general_matrix(net, [6, 7], _g())
    assert emb.kind is EmbeddingKind.OUTPUT_PRESERVING
    for method in (emb.map_gradients, emb.map_second_moments):
        with pytest.raises(ValueError, match="admit no linear gradient map"):
            method(dict(net.named_parameters()))


# ----------------------------------------------------------------------------- properties
def test_properties_and_repr() -> None:
    net = build_mlp(ARCH)
    emb = plan(net, {1: 8}, Null(bias=0.1))
    assert emb.narrow_widths == (3, 4, 5, 2) and emb.wide_widths == (3, 4, 8, 2)
    assert emb.num_new_neurons == 3
    assert emb.wide_layout.widths == (3, 4, 8, 2)
    assert [lin.name for lin in emb.wide_layout.linears] == ["0", "3", "5"]
    assert emb.is_critical and emb.reasons == ()
    assert repr(emb) == "Embedding(hidden widths 4→5→8, kind=critical)"
    assert EmbeddingKind("critical") is EmbeddingKind.CRITICAL  # str enum
    ident = LayerMap.identity(3)
    assert ident.source.tolist() == [0, 1, 2] and ident.is_vector and ident.wide == 3
    assert not bool(ident.null_mask.any())


# ----------------------------------------------------------------------------- validation
LAYOUT = read_sequential(build_mlp(Arch(2, (3,), 1)))


def _lm(source, coef=None, **kw) -> LayerMap:
    source = torch.tensor(source, dtype=torch.int64)
    wide = source.numel()
    coef = torch.ones(wide, dtype=F64) if coef is None else torch.as_tensor(coef, dtype=F64)
    args = {
        "null_bias": torch.zeros(wide, dtype=F64),
        "null_value": torch.zeros(wide, dtype=F64),
        **kw,
    }
    return LayerMap(source, coef, **args)


@pytest.mark.parametrize(
    ("layers", "match"),
    [
        ((), r"one LayerMap per hidden layer: the network has 1 hidden layers, got 0"),
        ((_lm([0, 1, 2]), _lm([0, 1, 2])), r"the network has 1 hidden layers, got 2"),
        (
            (
                LayerMap(
                    torch.tensor([0.0, 1, 2]),
                    torch.ones(3, dtype=F64),
                    torch.zeros(3, dtype=F64),
                    torch.zeros(3, dtype=F64),
                ),
            ),
            r"source must be a 1-D int64 tensor",
        ),
        ((_lm([0, 1]),), r"the wide layer has 2 neurons, fewer than the narrow layer's 3"),
        ((_lm([0, 1, 3, 2]),), r"wide neuron 2 has source 3, but sources must lie in \[0, 3\)"),
        ((_lm([0, 1, 2, -3]),), r"wide neuron 3 has source -3"),
        ((_lm([0, 1, 1, -1], [1, 0.5, 0.5, 0]),), r"narrow neurons \[2\] have no copy"),
        ((_lm([0, 1, 2, 2], [1, 1, 0.5, 0.6]),), r"copies of narrow neuron 2 sum to 1.1"),
        ((_lm([0, 1, 2, -1], [1, 1, 1, 0.1]),), r"null neurons must have coefficient 0"),
        ((_lm([0, 1, 2], [1, 1]),), r"coef must have shape \(3,\)"),
        (
            (_lm([0, 1, 2], null_bias=torch.zeros(2, dtype=F64)),),
            r"null_bias must have shape \(3,\)",
        ),
        (
            (_lm([0, 1, 2], null_value=torch.zeros(4, dtype=F64)),),
            r"null_value must have shape \(3,\)",
        ),
        (
            (_lm([0, 1, 2], torch.ones(2, 3)),),
            r"a matrix of coefficients must have shape \(wide_next, wide\) = \(1, 3\)",
        ),
        (
            (_lm([0, 1, 2, 2], [[1, 1, 0.5, 0.4]]),),
            r"in row 0 of the next layer, the coefficients of the copies of narrow neuron 2 "
            r"sum to 0.9",
        ),
        ((_lm([0, 1, 2, -1], [[1, 1, 1, 0.5]]),), r"null neurons must have coefficient 0"),
        (
            (_lm([0, 1, 2, -1], [1, 1, 1, 0], null_fan_in=torch.zeros(4, 3, dtype=F64)),),
            r"null_fan_in must have shape \(4, 2\)",
        ),
        (
            (_lm([0, 1, 2, -1], [1, 1, 1, 0], null_fan_in=torch.ones(4, 2, dtype=F64)),),
            r"null_fan_in must be zero on rows of copied neurons",
        ),
        (
            (_lm([0, 1, 2], fan_out_offset=torch.zeros(2, 3, dtype=F64)),),
            r"fan_out_offset must have shape \(1, 3\)",
        ),
    ],
    ids=[
        "no_layers",
        "too_many_layers",
        "source_dtype",
        "narrower",
        "source_too_big",
        "source_below_null",
        "totality",
        "coef_sum",
        "null_coef",
        "coef_shape",
        "null_bias_shape",
        "null_value_shape",
        "matrix_shape",
        "matrix_sum",
        "matrix_null_coef",
        "null_fan_in_shape",
        "null_fan_in_on_copies",
        "offset_shape",
    ],
)
def test_validation_errors(layers, match) -> None:
    with pytest.raises(ValueError, match=match):
        Embedding(LAYOUT, tuple(layers))


def test_valid_hand_built_embedding() -> None:
    emb = Embedding(LAYOUT, (_lm([2, 0, 1, 2, -1], [0.5, 1, 1, 0.5, 0]),))
    net = build_mlp(Arch(2, (3,), 1))
    x = torch.randn(4, 2, generator=_g(), dtype=F64)
    wide = copy.deepcopy(net)
    embed_(wide, emb)
    with torch.no_grad():
        torch.testing.assert_close(wide(x), net(x), rtol=0, atol=1e-15)


def test_coefficient_tolerance_is_relative() -> None:
    # big signed shares that sum to 1 up to rounding are accepted
    Embedding(LAYOUT, (_lm([0, 1, 2, 0], [1e6 + 1, 1, 1, -1e6]),))
    with pytest.raises(ValueError, match="sum to"):
        Embedding(LAYOUT, (_lm([0, 1, 2, 0], [1.001, 1, 1, 0.0]),))


def test_embedding_is_immutable() -> None:
    emb = Embedding(LAYOUT, (_lm([0, 1, 2]),))
    with pytest.raises(AttributeError):
        emb.layers = ()  # type: ignore[misc]
    assert isinstance(emb.layers, tuple)


# ----------------------------------------------------------------------------- blocked apply
gather_module = importlib.import_module("torch_embed.graph.gather")

BLOCK_CASES = {
    "split_third": lambda n, g: plan(n, [20, 17], Split(alpha=1 / 3), generator=g),
    "split_kway": lambda n, g: plan(n, [19, 15], Split(alpha=(0.1, 0.2, 0.7)), generator=g),
    "general_shuffled": lambda n, g: general_vector(n, [20, 17], g, 0.3),
    "null": lambda n, g: plan(n, [20, 17], Null(bias=0.3, fan_in_std=0.5), generator=g),
    "net2net_noise": lambda n, g: plan(n, [20, 17], Net2Net(noise=0.5), generator=g),
    "general_matrix": lambda n, g: general_matrix(n, [16, 14], g),
    "critical_matrix": critical_matrix_general,
}


def _noise_pairs(t: torch.Tensor, source: torch.Tensor, noise: float, seed: int) -> None:
    """Net2Net's noise on the columns of ``t`` (in place), pair by pair as documented:
    the copies of each narrow unit in index order paired (j, k), ε drawn per pair;
    column j gets +round(noise·w_j·ε), column k the same subtracted."""
    gen = torch.Generator().manual_seed(seed)
    for unit in range(int(source.max()) + 1):
        copies = (source == unit).nonzero().flatten().tolist()
        for j, k in zip(copies[0::2], copies[1::2]):
            eps = torch.randn(t.shape[0], generator=gen, dtype=F64)
            offset = (noise * t[:, j].double() * eps).to(t.dtype)
            t[:, j] += offset
            t[:, k] -= offset


def _reference_apply(emb: Embedding, state: dict, dtype: torch.dtype) -> dict:
    """W'[i, j] = round(round(W[I(i), I(j)] · c) + offset), straight from the definition
    (with Net2Net's noise on the rounded columns of the narrow rows, which are then
    copied: a copy of a next-layer neuron keeps its original's fan-in)."""
    out = dict(state)
    L = len(emb.layout.linears)
    for k, lin in enumerate(emb.layout.linears):
        rows = emb.layers[k] if k < L - 1 else None
        cols = emb.layers[k - 1] if k > 0 else None
        w = state[f"{lin.name}.weight"].double()
        r = rows.source.clamp(min=0) if rows is not None else torch.arange(w.shape[0])
        c = cols.source.clamp(min=0) if cols is not None else torch.arange(w.shape[1])
        g = w[r][:, c]
        if cols is not None:
            g = (g * cols.coef).to(dtype).double()
            if emb.noise:
                h = (w[:, c] * cols.coef).to(dtype)
                key = (emb.seed ^ zlib.crc32(f"{lin.name}.weight:1".encode())) % 2**63
                _noise_pairs(h, cols.source, emb.noise, key)
                g = h.double()[r]
            if cols.fan_out_offset is not None:
                g = (g + cols.fan_out_offset).to(dtype).double()
        if rows is not None:
            null = rows.null_mask
            fan_in = rows.null_fan_in if rows.null_fan_in is not None else torch.zeros_like(g)
            g[null] = fan_in.to(dtype).double()[null]
            b = state[f"{lin.name}.bias"].double()[r]
            b[null] = rows.null_bias.to(dtype).double()[null]
            out[f"{lin.name}.bias"] = b.to(dtype)
        out[f"{lin.name}.weight"] = g.to(dtype)
    return out


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("chunk", [13, 1 << 18])
@pytest.mark.parametrize("block", [7, 64, 1 << 20])
@pytest.mark.parametrize("name", list(BLOCK_CASES))
def test_blocked_apply_matches_the_definition(monkeypatch, name, block, chunk, dtype) -> None:
    """Row blocks, sliced prefixes, float64 factors and the chunked float64 scratch give
    exactly the defined weights, each rounded once to the dtype (even for 1/3)."""
    monkeypatch.setattr(gather_module, "_TEMP", block)
    monkeypatch.setattr(gather_module, "_CHUNK_MIXED", chunk)
    net = build_mlp(Arch(5, (13, 11), 3), seed=6, dtype=dtype)
    emb = BLOCK_CASES[name](net, _g(6))
    state = net.state_dict()
    got = emb.apply(state)
    ref = _reference_apply(emb, state, dtype)
    for k in ref:
        assert got[k].dtype == dtype and got[k].is_contiguous(), k
        assert torch.equal(got[k], ref[k]), (
            k,
            float((got[k].double() - ref[k].double()).abs().max()),
        )


@pytest.mark.parametrize("name", ["split_third", "general_shuffled", "null", "critical_matrix"])
def test_blocked_gradient_maps_agree(monkeypatch, name) -> None:
    net = build_mlp(Arch(5, (13, 11), 3), seed=6)
    emb = BLOCK_CASES[name](net, _g(6))
    g = {k: torch.randn(v.shape, generator=_g(8), dtype=F64) for k, v in net.named_parameters()}
    whole = emb.map_gradients(g), emb.map_second_moments(g)
    monkeypatch.setattr(gather_module, "_TEMP", 5)
    blocked = emb.map_gradients(g), emb.map_second_moments(g)
    for a, b in zip(whole, blocked):
        for k in a:
            assert torch.equal(a[k], b[k]), k
