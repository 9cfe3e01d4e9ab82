"""Schemes: what each one plans, which kind it reports, and that the kind is true.

"Critical" is checked against autograd, not against the embedding's own formulas: at
random parameters the wide gradient must equal ``embedding.map_gradients`` of the
narrow gradient (to 1e-12), and at a critical point of a small narrow net (|∇R| about
1e-17: targets chosen so that the residuals are orthogonal to the Jacobian, then Newton
steps) every critical scheme must keep |∇R| <= 1e-10, while the output-preserving ones
leave the critical point.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import replace

import pytest
import torch
from cases import (
    SCHEME_NAMES,
    Arch,
    archs,
    build_mlp,
    critical_matrix_general,
    general_matrix,
    general_vector,
    random_inputs,
    random_pad,
    scheme_cases,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

from torch_embed.embedding import Embedding, EmbeddingKind
from torch_embed.schemes import General, Net2Net, Null, RandomPad, Split, plan
from torch_embed.widen import embed_, widen

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64
CRIT = EmbeddingKind.CRITICAL
OUT = EmbeddingKind.OUTPUT_PRESERVING


# ----------------------------------------------------------------------------- helpers
def _data(arch: Arch, n: int = 12, seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    x = random_inputs(arch, n, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    y = torch.randn(n, arch.out_features, generator=g, dtype=F64)
    return x, y


def _grads(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Autograd gradient of the mean squared error (the brute-force reference)."""
    params = dict(net.named_parameters())
    loss = torch.nn.functional.mse_loss(net(x), y)
    grads = torch.autograd.grad(loss, list(params.values()))
    return dict(zip(params, grads))


def _wide(net: nn.Module, emb: Embedding) -> nn.Module:
    wide = copy.deepcopy(net)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*never learn.*", category=UserWarning)
        embed_(wide, emb)
    return wide


def _map_error(net: nn.Module, emb: Embedding, x: torch.Tensor, y: torch.Tensor) -> float:
    """max |∇R_wide - B ∇R_narrow| over all wide parameters."""
    mapped = emb.map_gradients(_grads(net, x, y))
    wide_grads = _grads(_wide(net, emb), x, y)
    assert mapped.keys() == wide_grads.keys()
    for k in mapped:
        assert mapped[k].shape == wide_grads[k].shape, k
    return max(float((mapped[k] - wide_grads[k]).abs().max()) for k in mapped)


def _norm(grads: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(g.pow(2).sum()) for g in grads.values()))


# ----------------------------------------------------------------------------- kinds
NET2 = Arch(3, (4, 5), 2)  # two hidden layers, all biases
NET2_BN = Arch(3, (4, 5), 2, batchnorm=(True, True), dropout=(False, True))
NET2_NOBIAS = Arch(3, (4, 5), 2, bias=(False, False, False))
NET2_LAST_NOBIAS = Arch(3, (4, 5), 2, bias=(True, True, False))  # output Linear without bias


def _composition(net: nn.Module, g: torch.Generator) -> Embedding:
    first = plan(net, [6, 6], Split(alpha=-0.4), generator=g)
    mid = _wide(net, first)
    second = plan(mid, [7, 9], Null(bias=0.3), generator=g)
    return first.then(second)


# (id, arch, planner, expected kind): planners take (net, generator)
CRITICAL_CASES = [
    ("split_half", NET2, lambda n, g: plan(n, [7, 8], Split(), generator=g)),
    ("split_signed_neg", NET2, lambda n, g: plan(n, [7, 8], Split(alpha=-0.7), generator=g)),
    ("split_signed_big", NET2, lambda n, g: plan(n, [7, 8], Split(alpha=1.8), generator=g)),
    ("split_random_alpha", NET2, lambda n, g: plan(n, [9, 8], Split("random"), generator=g)),
    (
        "split_kway",
        NET2,
        lambda n, g: plan(n, [8, 9], Split(alpha=(0.2, -0.3, 1.1), select="cyclic"), generator=g),
    ),
    ("split_norm", NET2, lambda n, g: plan(n, [6, 11], Split(0.3, select="norm"), generator=g)),
    ("split_bn", NET2_BN, lambda n, g: plan(n, [7, 8], Split(alpha=0.3), generator=g)),
    ("split_nobias", NET2_NOBIAS, lambda n, g: plan(n, [7, 8], Split(alpha=0.3), generator=g)),
    ("null_next_bias", NET2, lambda n, g: plan(n, [7, 8], Null(bias=0.7), generator=g)),
    ("null_bn", NET2_BN, lambda n, g: plan(n, [7, 8], Null(bias=-0.4), generator=g)),
    ("null_nobias_tanh0", NET2_NOBIAS, lambda n, g: plan(n, [7, 8], Null(bias=0.0), generator=g)),
    ("net2net", NET2, lambda n, g: plan(n, [9, 12], Net2Net(), generator=g)),
    ("net2net_bn", NET2_BN, lambda n, g: plan(n, [9, 12], Net2Net(), generator=g)),
    ("general_vector", NET2, lambda n, g: general_vector(n, [8, 9], g, 0.3)),
    ("general_vector_bn", NET2_BN, lambda n, g: general_vector(n, [8, 9], g, 0.3)),
    ("general_matrix_critical", NET2, critical_matrix_general),
    ("general_matrix_critical_bn", NET2_BN, critical_matrix_general),
    ("composition", NET2, _composition),
    ("composition_bn", NET2_BN, _composition),
]


@pytest.mark.parametrize(
    ("name", "arch", "planner"), CRITICAL_CASES, ids=[c[0] for c in CRITICAL_CASES]
)
def test_critical_gradient_map_matches_autograd_at_any_point(name, arch, planner, gen) -> None:
    net = build_mlp(arch, seed=11)
    emb = planner(net, gen)
    assert emb.kind is CRIT, emb.reasons
    assert emb.reasons == ()
    x, y = _data(arch)
    assert _map_error(net, emb, x, y) <= 1e-12


NOT_CRITICAL_CASES = [
    # (id, arch, planner, kind, phrase in reasons)
    (
        "null_no_next_bias",
        NET2_LAST_NOBIAS,
        lambda n, g: plan(n, [4, 7], Null(bias=0.5), generator=g),
        OUT,
        "no bias",
    ),
    (
        "null_fan_in",
        NET2,
        lambda n, g: plan(n, [6, 7], Null(fan_in_std=0.5), generator=g),
        OUT,
        "fan-in",
    ),
    (
        "net2net_noise",
        NET2,
        lambda n, g: plan(n, [8, 10], Net2Net(noise=0.5), generator=g),
        OUT,
        "noise",
    ),
    ("general_matrix_random", NET2, lambda n, g: general_matrix(n, [6, 7], g), OUT, "backward"),
]


@pytest.mark.parametrize(
    ("name", "arch", "planner", "kind", "phrase"),
    NOT_CRITICAL_CASES,
    ids=[c[0] for c in NOT_CRITICAL_CASES],
)
def test_output_preserving_kinds_are_true(name, arch, planner, kind, phrase, gen) -> None:
    net = build_mlp(arch, seed=12)
    emb = planner(net, gen)
    assert emb.kind is kind
    assert any(phrase in r for r in emb.reasons), emb.reasons
    assert not emb.is_critical
    x, y = _data(arch)
    with torch.no_grad():
        torch.testing.assert_close(_wide(net, emb)(x), net(x), rtol=0, atol=1e-13)
    # and the claim "not critical" is true: autograd disagrees with the linear map B
    # (which, missing the next layer's bias gradient, says that its null columns are 0)
    expect = pytest.warns(UserWarning, match="bias is not among") if phrase == "no bias" else None
    try:
        if expect is None:
            err = _map_error(net, emb, x, y)
        else:
            with expect:
                err = _map_error(net, emb, x, y)
    except ValueError as e:  # matrix coefficients without a backward condition: no map
        assert "admit no linear gradient map" in str(e)
    else:
        assert err > 1e-6


def test_null_without_next_bias_names_the_layer(gen) -> None:
    net = build_mlp(NET2_LAST_NOBIAS, seed=0)
    emb = plan(net, [4, 7], Null(bias=0.5), generator=gen)
    assert any("hidden layer 1" in r and "layer 4" in r for r in emb.reasons), emb.reasons
    # widening only the first hidden layer (whose next Linear has a bias) is critical
    assert plan(net, [6, 5], Null(bias=0.5), generator=gen).kind is CRIT


def test_null_critical_only_when_sigma_beta_is_zero_without_bias(gen) -> None:
    net = build_mlp(NET2_NOBIAS, seed=0)
    assert plan(net, [6, 5], Null(bias=0.0), generator=gen).kind is CRIT  # tanh(0) = 0
    sig = build_mlp(Arch(3, (4, 5), 2, bias=(False,) * 3, activation=("Sigmoid",) * 2))
    emb = plan(sig, [6, 5], Null(bias=0.0), generator=gen)  # sigmoid(0) = 1/2
    assert emb.kind is OUT
    assert float(emb.layers[0].null_value[-1]) == 0.5


def test_net2net_noise_on_a_single_new_copy(gen) -> None:
    # a neuron with one new copy has two copies, so one ±N pair: output-preserving
    net = build_mlp(NET2, seed=0)
    emb = plan(net, [5, 5], Net2Net(noise=0.5, select=[[2], []]), generator=gen)
    assert emb.kind is OUT
    off = _noise_offset(net, emb, 0)
    torch.testing.assert_close(off[:, 2], -off[:, 4], rtol=0, atol=1e-15)
    assert float(off[:, 2].abs().max()) > 0
    assert float(off[:, [0, 1, 3]].abs().max()) == 0  # single copies: no noise


def _noise_offset(net: nn.Module, emb: Embedding, layer: int) -> torch.Tensor:
    """What Net2Net's noise adds to the weight after hidden layer ``layer`` (float64)."""
    name = f"{emb.layout.linears[layer + 1].name}.weight"
    state = net.state_dict()
    noisy = emb.apply(state)[name].double()
    return noisy - replace(emb, noise=0.0).apply(state)[name].double()


def test_random_pad_kind_none_and_output_changes(gen) -> None:
    net = build_mlp(NET2, seed=0)
    emb = random_pad(net, [6, 7], gen)
    assert emb.kind is EmbeddingKind.NONE
    assert emb.reasons
    x, _ = _data(NET2)
    with torch.no_grad():
        assert float((_wide(net, emb)(x) - net(x)).abs().max()) > 1e-3


@pytest.mark.parametrize("scheme", SCHEME_NAMES)
@settings(max_examples=8)
@given(data=st.data(), arch=archs(max_width=5))
def test_reported_critical_means_gradients_map(scheme: str, data, arch: Arch) -> None:
    """Over generated nets and schemes: whenever the kind says critical, autograd agrees."""
    case, _ = data.draw(scheme_cases(arch, names=[scheme]), label="scheme")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    net = build_mlp(arch, seed=seed)
    emb = case.plan(net, torch.Generator().manual_seed(seed))
    if case.kind is not None:
        assert emb.kind is case.kind, emb.reasons
    if emb.kind is CRIT:
        x, y = _data(arch, seed=seed)
        assert _map_error(net, emb, x, y) <= 1e-11


# ----------------------------------------------------------------------------- critical point
def _flat(net: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()])


def _unflatten(net: nn.Module, theta: torch.Tensor) -> dict[str, torch.Tensor]:
    out, i = {}, 0
    for name, p in net.named_parameters():
        out[name] = theta[i : i + p.numel()].view_as(p)
        i += p.numel()
    return out


def critical_targets(net: nn.Module, x: torch.Tensor, *, seed: int = 0) -> torch.Tensor:
    """Targets ``y`` for which the net's current parameters are a critical point of the MSE.

    ``∇R = (2/N) Jᵀ r`` with ``r = f(x) - y`` and ``J`` the Jacobian of the outputs in
    the parameters; any residual ``r`` orthogonal to the range of ``J`` (possible when
    ``N·out > P``) makes it vanish. ``r`` is a random vector projected onto that
    complement, so the point is a generic critical point with non-zero residuals (not
    a global minimum, not a degenerate all-zero construction).
    """
    theta = _flat(net)

    def f(t: torch.Tensor) -> torch.Tensor:
        return functional_call(net, _unflatten(net, t), (x,)).reshape(-1)

    jac = torch.func.jacrev(f)(theta)  # (N·out, P)
    assert jac.shape[0] > jac.shape[1], "need more outputs than parameters"
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(jac.shape[0], generator=g, dtype=F64)
    for _ in range(2):  # project twice: the second pass removes the first's rounding
        r = r - jac @ torch.linalg.lstsq(jac, r[:, None], driver="gelsd").solution[:, 0]
    r = 0.3 * r / r.abs().max()
    with torch.no_grad():
        return (f(theta) - r).reshape(x.shape[0], -1)


def newton_polish(net: nn.Module, x: torch.Tensor, y: torch.Tensor, *, steps: int = 3) -> float:
    """A few Newton steps on ∇R = 0 with a least-squares (pseudo-inverse) Hessian solve.

    Applied to a point that is already critical up to rounding, it must not move it
    away; returns the final |∇R|.
    """

    def loss_of(theta: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.mse_loss(functional_call(net, _unflatten(net, theta), (x,)), y)

    theta = _flat(net)
    g = torch.func.grad(loss_of)(theta)
    for _ in range(steps):
        hess = torch.autograd.functional.hessian(loss_of, theta)
        step = torch.linalg.lstsq(hess, g[:, None], rcond=1e-12, driver="gelsd").solution[:, 0]
        cand = theta - step
        g_cand = torch.func.grad(loss_of)(cand)
        if float(g_cand.norm()) >= float(g.norm()):
            break
        theta, g = cand, g_cand
    with torch.no_grad():
        for name, value in _unflatten(net, theta).items():
            net.get_parameter(name).copy_(value)
    return float(g.norm())


CRIT_ARCH = Arch(2, (3, 3), 2, batchnorm=(True, False), bias=(True, True, False))


@pytest.fixture(scope="module")
def critical_net() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # module scope: set up before the single_thread fixture
    try:
        net = build_mlp(CRIT_ARCH, seed=1)
        x = random_inputs(CRIT_ARCH, 60, seed=4)
        y = critical_targets(net, x, seed=5)
        gnorm = newton_polish(net, x, y)
    finally:
        torch.set_num_threads(before)
    assert gnorm <= 1e-13, gnorm
    with torch.no_grad():
        assert float(torch.nn.functional.mse_loss(net(x), y)) > 1e-3  # residuals are not 0
    return net, x, y


CRITICAL_POINT_SCHEMES = [
    ("split_half", lambda n, g: plan(n, [5, 6], Split(), generator=g)),
    ("split_signed", lambda n, g: plan(n, [5, 6], Split(alpha=-1.5), generator=g)),
    ("split_kway", lambda n, g: plan(n, [7, 5], Split(alpha=(0.6, 0.7, -0.3)), generator=g)),
    (
        "split_random_norm",
        lambda n, g: plan(n, [6, 6], Split("random", select="norm"), generator=g),
    ),
    ("null_first_layer", lambda n, g: plan(n, [6, 3], Null(bias=0.8), generator=g)),
    ("null_zero_bias", lambda n, g: plan(n, [5, 6], Null(bias=0.0), generator=g)),
    ("net2net", lambda n, g: plan(n, [8, 7], Net2Net(), generator=g)),
    ("general_vector", lambda n, g: general_vector(n, [6, 7], g, 0.0)),
    ("general_matrix", critical_matrix_general),
    ("composition", lambda n, g: _composition_small(n, g)),
]


def _composition_small(net: nn.Module, g: torch.Generator) -> Embedding:
    first = plan(net, [4, 5], Split(alpha=0.8), generator=g)
    second = plan(_wide(net, first), [6, 6], Net2Net(), generator=g)
    return first.then(second)


@pytest.mark.parametrize(
    ("name", "planner"), CRITICAL_POINT_SCHEMES, ids=[c[0] for c in CRITICAL_POINT_SCHEMES]
)
def test_critical_point_stays_critical(name, planner, critical_net, gen) -> None:
    net, x, y = critical_net
    emb = planner(net, gen)
    assert emb.kind is CRIT
    wide = _wide(net, emb)
    assert _norm(_grads(wide, x, y)) <= 1e-10
    # and the loss is the same
    with torch.no_grad():
        lw = torch.nn.functional.mse_loss(wide(x), y)
        ln = torch.nn.functional.mse_loss(net(x), y)
    assert abs(float(lw - ln)) <= 1e-14


@pytest.mark.parametrize(
    ("name", "planner"),
    [
        ("net2net_noise", lambda n, g: plan(n, [7, 7], Net2Net(noise=0.5), generator=g)),
        ("null_fan_in", lambda n, g: plan(n, [5, 3], Null(fan_in_std=0.5), generator=g)),
        ("null_no_next_bias", lambda n, g: plan(n, [3, 5], Null(bias=0.5), generator=g)),
    ],
    ids=["net2net_noise", "null_fan_in", "null_no_next_bias"],
)
def test_output_preserving_schemes_leave_the_critical_point(
    name, planner, critical_net, gen
) -> None:
    net, x, y = critical_net
    emb = planner(net, gen)
    assert emb.kind is OUT
    # 1e5 times the critical level (~1e-13 and below): the point is no longer critical
    assert _norm(_grads(_wide(net, emb), x, y)) > 1e-8


# ----------------------------------------------------------------------------- what is planned
def test_split_alpha_coefficients_and_repeated_splits() -> None:
    net = build_mlp(Arch(2, (3,), 1))
    emb = plan(net, [5], Split(alpha=0.25, select=[1, 1]))
    # the second split of neuron 1 splits its current share 0.75
    assert emb.layers[0].source.tolist() == [0, 1, 2, 1, 1]
    torch.testing.assert_close(
        emb.layers[0].coef, torch.tensor([1, 0.75 * 0.75, 1, 0.25, 0.25 * 0.75], dtype=F64)
    )


def test_kway_coefficients() -> None:
    net = build_mlp(Arch(2, (3,), 1))
    emb = plan(net, [5], Split(alpha=(0.5, 0.2, 0.3), select=[2]))
    assert emb.layers[0].source.tolist() == [0, 1, 2, 2, 2]
    torch.testing.assert_close(emb.layers[0].coef, torch.tensor([1, 1, 0.5, 0.2, 0.3], dtype=F64))


@pytest.mark.parametrize("select", ["random", "cyclic", [0, 0, 1, 0]])
def test_kway_split_of_a_neuron_chosen_twice_sums_to_one(select) -> None:
    """Regression: a k-way split picked the same neuron twice and gave its copies absolute
    coefficients, so they summed to more than 1 (ValueError, or a wrong function)."""
    net = build_mlp(Arch(2, (2,), 1))
    x = random_inputs(2, 8)
    emb = plan(
        net,
        [10],
        Split(alpha=(0.5, 0.3, 0.2), select=select),
        generator=torch.Generator().manual_seed(0),
    )
    lm = emb.layers[0]
    sums = torch.zeros(2, dtype=F64).index_add_(0, lm.source, lm.coef)
    torch.testing.assert_close(sums, torch.ones(2, dtype=F64), rtol=0, atol=1e-15)
    with torch.no_grad():
        torch.testing.assert_close(_wide(net, emb)(x), net(x), rtol=0, atol=1e-14)


def test_select_cyclic_norm_and_explicit() -> None:
    net = build_mlp(Arch(2, (4, 3), 1), seed=0)
    cyc = plan(net, [9, 3], Split(select="cyclic"))
    assert cyc.layers[0].source.tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 0]
    norms = net[2].weight.detach().norm(dim=0)
    order = torch.argsort(norms, descending=True).tolist()
    by_norm = plan(net, [6, 3], Split(select="norm"))
    assert by_norm.layers[0].source.tolist()[4:] == order[:2]
    explicit = plan(net, [6, 4], Split(select=[[3, 3], [1]]))
    assert explicit.layers[0].source.tolist()[4:] == [3, 3]
    assert explicit.layers[1].source.tolist()[3:] == [1]
    mapping = plan(net, [4, 5], Split(select={1: [2, 0]}))
    assert mapping.layers[1].source.tolist()[3:] == [2, 0]
    flat = plan(net, [4, 5], Split(select=[2, 0]))  # one widened layer: a flat list is fine
    assert flat.layers[1].source.tolist()[3:] == [2, 0]


def test_numpy_and_tensor_numbers_are_accepted_like_python_ones() -> None:
    # widths computed with numpy (np.int64), alphas in float32, indices from argsort:
    # they used to be refused ("must be an int, got int64") or to crash in iteration
    np = pytest.importorskip("numpy")
    net = build_mlp(Arch(2, (4, 3), 1), seed=0)
    ref = plan(net, [6, 3], Split(alpha=0.25, select=[3, 1]))
    same = [
        plan(net, [np.int64(6), np.int32(3)], Split(alpha=0.25, select=[3, 1])),
        plan(net, {np.int64(0): np.int64(6)}, Split(alpha=0.25, select=[3, 1])),
        plan(net, [6, 3], Split(alpha=0.25, select=np.array([3, 1]))),
        plan(net, [6, 3], Split(alpha=0.25, select=torch.tensor([3, 1]))),
        plan(net, [6, 3], Split(alpha=0.25, select=[np.int64(3), np.int64(1)])),
        plan(net, [6, 3], Split(alpha=0.25, select={np.int64(0): np.array([3, 1])})),
        plan(net, [6, 3], Split(alpha=np.float32(0.25), select=[3, 1])),  # 0.25 is exact
        plan(net, None, General([np.array([0, 1, 2, 3, 3, 1]), None], [ref.layers[0].coef, None])),
    ]
    for emb in same:
        assert emb.wide_widths == (2, 6, 3, 1)
        assert emb.layers[0].source.tolist() == [0, 1, 2, 3, 3, 1]
        assert torch.equal(emb.layers[0].coef, ref.layers[0].coef)
    widened = plan(net, [np.int64(6), 3], Split(select="cyclic"))
    assert all(type(w) is int for w in widened.wide_widths)


def test_select_random_is_reproducible_and_without_replacement() -> None:
    net = build_mlp(Arch(2, (8,), 1))

    def picks(seed: int) -> list[int]:
        emb = plan(net, [13], Split(), generator=torch.Generator().manual_seed(seed))
        return emb.layers[0].source.tolist()[8:]

    assert picks(1) == picks(1)
    assert len(set(picks(1))) == 5  # 5 new neurons from 8: all different
    assert any(picks(s) != picks(1) for s in range(2, 6))
    twice = plan(net, [24], Split(), generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(twice.layers[0].source, minlength=8)
    assert counts.tolist() == [3] * 8  # 16 new from 8: each neuron exactly twice more


def test_random_alpha_comes_from_the_generator() -> None:
    net = build_mlp(Arch(2, (4,), 1))
    a = plan(net, [8], Split("random", select="cyclic"), generator=torch.Generator().manual_seed(0))
    b = plan(net, [8], Split("random", select="cyclic"), generator=torch.Generator().manual_seed(0))
    c = plan(net, [8], Split("random", select="cyclic"), generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.layers[0].coef, b.layers[0].coef)
    assert not torch.equal(a.layers[0].coef, c.layers[0].coef)
    new = a.layers[0].coef[4:]
    assert bool(((new > 0) & (new < 1)).all())


def test_null_neurons_layout_and_value() -> None:
    arch = Arch(
        2, (3, 2), 1, batchnorm=(True, False), activation=("Sigmoid", "Tanh"), dropout=(True, False)
    )
    net = build_mlp(arch)
    emb = plan(net, [5, 2], Null(bias=0.7))
    lm = emb.layers[0]
    assert lm.source.tolist() == [0, 1, 2, -1, -1]
    assert lm.coef.tolist() == [1, 1, 1, 0, 0]
    torch.testing.assert_close(
        lm.null_value[3:], torch.sigmoid(torch.tensor([0.7, 0.7], dtype=F64))
    )
    wide = _wide(net, emb)
    sd = wide.state_dict()
    assert float(sd["0.weight"][3:].abs().max()) == 0 and float(sd["0.bias"][3:].abs().max()) == 0
    # BatchNorm holds β: BN(0) = (0 - 0) / sqrt(1 + eps) * 1 + β = β
    assert sd["1.bias"][3:].tolist() == [0.7, 0.7]
    assert sd["1.weight"][3:].tolist() == [1.0, 1.0]
    assert sd["1.running_mean"][3:].tolist() == [0.0, 0.0]
    assert sd["1.running_var"][3:].tolist() == [1.0, 1.0]
    assert float(sd["4.weight"][:, 3:].abs().max()) == 0
    with torch.no_grad():
        h = wide[2](wide[1](wide[0](random_inputs(2, 4))))
    torch.testing.assert_close(h[:, 3:], torch.sigmoid(torch.full((4, 2), 0.7, dtype=F64)))


def test_null_bias_without_a_place_to_store_it_is_refused() -> None:
    """Regression: on a bias-free Linear without BatchNorm, Null(bias=β) silently dropped
    β (the unit output σ(0)) while the embedding recorded σ(β) (wrong kind, wrong
    gradient map)."""
    net = build_mlp(Arch(2, (3, 2), 1, bias=(False, True, True)))
    with pytest.raises(ValueError, match=r"hidden layer 0: .*layer `0` \(linear\) has no bias"):
        plan(net, [5, 2], Null(bias=0.3))
    with pytest.raises(ValueError, match=r"hidden layer 0"):
        plan(net, None, General([[0, 1, 2, -1], None], null_bias=0.3))
    # β = 0 is fine, and so is β on the layer that has a bias
    assert plan(net, [5, 2], Null(bias=0.0)).kind is CRIT
    assert plan(net, [3, 4], Null(bias=0.3)).layers[1].null_bias[2:].tolist() == [0.3, 0.3]
    # RandomPad draws no bias there (its new units would not get one anyway)
    pad = plan(net, [5, 4], RandomPad(), generator=torch.Generator().manual_seed(0))
    assert pad.layers[0].null_bias.abs().max() == 0
    assert pad.layers[1].null_bias[2:].abs().min() > 0


def test_net2net_equal_shares_and_cancelling_noise() -> None:
    net = build_mlp(Arch(2, (3, 3), 2))
    emb = plan(
        net,
        [8, 3],
        Net2Net(noise=0.3, select=[[0, 0, 0, 1, 2], []]),
        generator=torch.Generator().manual_seed(0),
    )
    lm = emb.layers[0]
    assert lm.source.tolist() == [0, 1, 2, 0, 0, 0, 1, 2]
    torch.testing.assert_close(
        lm.coef, torch.tensor([1 / 4, 1 / 2, 1 / 2, 1 / 4, 1 / 4, 1 / 4, 1 / 2, 1 / 2], dtype=F64)
    )
    off = _noise_offset(net, emb, 0)
    sums = torch.zeros(3, 3, dtype=F64).index_add_(1, lm.source, off)
    assert float(sums.abs().max()) <= 1e-15
    # every copy is perturbed (an even number of copies each)
    assert bool((off.abs().sum(0) > 0).all())


def test_net2net_odd_copies_keep_one_copy_noise_free() -> None:
    net = build_mlp(Arch(2, (3,), 2))
    emb = plan(
        net, [5], Net2Net(noise=0.3, select=[0, 0]), generator=torch.Generator().manual_seed(0)
    )
    off = _noise_offset(net, emb, 0)
    zero_cols = [j for j in (0, 3, 4) if float(off[:, j].abs().max()) == 0]
    assert len(zero_cols) == 1


def test_general_defaults_and_widths_from_sources() -> None:
    net = build_mlp(Arch(2, (3, 2), 1))
    emb = plan(net, None, General([[2, 0, 1, 2, -1, 2], None], null_bias=[0.4, 0.0]))
    assert emb.wide_widths == (2, 6, 2, 1)
    torch.testing.assert_close(
        emb.layers[0].coef, torch.tensor([1 / 3, 1, 1, 1 / 3, 0, 1 / 3], dtype=F64)
    )
    assert emb.layers[0].null_bias.tolist() == [0, 0, 0, 0, 0.4, 0]
    assert emb.layers[1].source.tolist() == [0, 1]
    assert emb.kind is CRIT


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("split", Split),
        ("null", Null),
        ("net2net", Net2Net),
        ("random_pad", RandomPad),
        ("Random-Pad", RandomPad),
    ],
)
def test_scheme_names(name, expected) -> None:
    net = build_mlp(Arch(2, (3,), 1))
    emb = plan(net, [4], name, generator=torch.Generator().manual_seed(0))
    assert emb.wide_widths == (2, 4, 1)
    default = plan(net, [4], expected(), generator=torch.Generator().manual_seed(0))
    assert torch.equal(emb.layers[0].source, default.layers[0].source)


def test_the_name_split_is_the_symmetric_critical_split() -> None:
    # the default scheme changed (issue 11 §3); the name "split" did not
    net = build_mlp(Arch(2, (3,), 1))
    emb = widen(net, [5], "split", generator=torch.Generator().manual_seed(0))
    assert sorted(emb.layers[0].coef.tolist()) == [0.5, 0.5, 0.5, 0.5, 1.0]
    assert emb.kind is CRIT and emb.layers[0].fan_out_offset is None


def test_net2net_noise_without_a_pair_of_copies_adds_no_offsets() -> None:
    # a layer that gains no neuron has no pair of copies to perturb, so no offsets: with
    # nothing added the embedding is the identity, critical, and decomposes into no steps
    net = build_mlp(Arch(2, (3, 3), 2))
    emb = plan(net, [3, 3], Net2Net(noise=4.0), generator=torch.Generator().manual_seed(0))
    assert emb.kind is CRIT and emb.steps() == []
    assert emb.noise == 0.0
    emb = plan(net, [5, 3], Net2Net(noise=4.0), generator=torch.Generator().manual_seed(0))
    assert emb.noise == 4.0 and emb.kind is OUT
    assert float(_noise_offset(net, emb, 0).abs().max()) > 0
    assert float(_noise_offset(net, emb, 1).abs().max()) == 0


def test_schemes_are_frozen_configs() -> None:
    s = Split(alpha=0.3, select="norm")
    assert s == Split(alpha=0.3, select="norm") and repr(s) == "Split(alpha=0.3, select='norm')"
    with pytest.raises(AttributeError):
        s.alpha = 0.5  # type: ignore[misc]


@pytest.mark.parametrize(
    "scheme",
    [Split(alpha=-0.3), Split(alpha=(0.2, 0.3, 0.5)), Null(bias=0.4), Net2Net()],
    ids=["split_signed", "split_kway", "null", "net2net"],
)
def test_batchnorm_in_train_mode(scheme, gen) -> None:
    """Batch statistics are per feature: copies share them, a null neuron's are (0, 0),
    so the function, the gradient map and the running statistics all carry over."""
    arch = Arch(3, (4, 5), 2, batchnorm=(True, True))
    net = build_mlp(arch, seed=1).train()
    emb = plan(net, [8, 9], scheme, generator=gen)
    x, y = _data(arch)
    wide = _wide(net, emb)
    assert _map_error(copy.deepcopy(net), emb, x, y) <= 1e-12
    with torch.no_grad():
        yn, yw = net(x), wide(x)  # one train-mode step of the running statistics
    torch.testing.assert_close(yw, yn, rtol=0, atol=1e-13)
    src = emb.layers[0].source
    copies = src >= 0
    stats = wide[1].running_mean[copies], net[1].running_mean[src[copies]]
    torch.testing.assert_close(*stats, rtol=0, atol=1e-15)


# ----------------------------------------------------------------------------- random draws
# (each of these was a surviving mutant: the draws' scale or their independence were
# never compared with what the docstrings promise)
def test_select_random_never_repeats_a_neuron_while_it_can() -> None:
    """5 new neurons from 8: distinct for every seed (a draw with replacement repeats
    one with probability 0.8 per seed)."""
    net = build_mlp(Arch(2, (8,), 1))
    for seed in range(20):
        emb = plan(net, [13], Split(), generator=torch.Generator().manual_seed(seed))
        assert len(set(emb.layers[0].source.tolist()[8:])) == 5, seed


def test_net2net_noise_scale_is_noise_times_share() -> None:
    """``N = noise · w/c · ε``, ε ~ N(0, 1): over 4000 rows of the next layer, N divided
    by ``noise · w/c`` has mean ~0 and standard deviation ~1 (for c = 2 and c = 3)."""
    net = build_mlp(Arch(2, (3,), 4000), seed=0)
    w = net[2].weight.detach()
    for select, c in (([0], 2), ([0, 0], 3)):
        emb = plan(
            net,
            [3 + len(select)],
            Net2Net(noise=0.5, select=select),
            generator=torch.Generator().manual_seed(0),
        )
        off = _noise_offset(net, emb, 0)
        eps = off[:, 0] / (0.5 * w[:, 0] / c)
        assert abs(float(eps.mean())) < 0.1
        assert abs(float(eps.std()) - 1) < 0.05, (c, float(eps.std()))


def test_random_pad_draws_like_nn_linear_default() -> None:
    """New fan-in rows and biases uniform in ``±scale/sqrt(fan_in)``, new fan-out
    columns in ``±scale/sqrt(wide width)`` (the next Linear's fan-in)."""
    net = build_mlp(Arch(4, (3,), 300), seed=0)
    scale = 0.7
    emb = plan(net, [403], RandomPad(scale=scale), generator=torch.Generator().manual_seed(0))
    lm = emb.layers[0]
    assert lm.null_fan_in is not None and lm.fan_out_offset is not None
    for values, bound in (
        (lm.null_fan_in[3:], scale / math.sqrt(4)),  # 1600 draws
        (lm.null_bias[3:], scale / math.sqrt(4)),  # 400 draws
        (lm.fan_out_offset[:, 3:], scale / math.sqrt(403)),  # 120000 draws
    ):
        top = float(values.abs().max())
        assert 0.97 * bound < top <= bound, (top, bound)


def test_null_fan_in_std_is_the_draws_standard_deviation() -> None:
    net = build_mlp(Arch(50, (3,), 1), seed=0)
    for std in (0.05, 2.0):
        emb = plan(net, [43], Null(fan_in_std=std), generator=torch.Generator().manual_seed(0))
        fan_in = emb.layers[0].null_fan_in
        assert fan_in is not None
        assert float(fan_in[:3].abs().max()) == 0  # copied rows keep no fan-in
        assert abs(float(fan_in[3:].std()) / std - 1) < 0.05  # 2000 draws


def test_null_value_ignores_dropout_in_train_mode() -> None:
    """σ(β) of a null neuron is the activation chain without Dropout's random mask,
    also when the module is in train mode."""
    arch = Arch(2, (3,), 1, dropout=(True,))
    net = build_mlp(arch).train()
    assert any(isinstance(m, nn.Dropout) and m.p > 0 for m in net)
    for seed in range(5):
        torch.manual_seed(seed)
        emb = plan(net, [5], Null(bias=0.7))
        torch.testing.assert_close(
            emb.layers[0].null_value[3:], torch.tanh(torch.tensor([0.7, 0.7], dtype=F64))
        )


def test_null_bias_is_refused_before_a_non_affine_batchnorm() -> None:
    """A BatchNorm1d(affine=False) after the Linear re-centres its bias, so β has no
    place; β = 0 is still fine."""
    net = nn.Sequential(
        nn.Linear(2, 3), nn.BatchNorm1d(3, affine=False), nn.Tanh(), nn.Linear(3, 1)
    ).double()
    with pytest.raises(ValueError, match=r"hidden layer 0: .*BatchNorm `1` has no affine bias"):
        plan(net, [5], Null(bias=0.3))
    assert plan(net, [5], Null(bias=0.0)).kind is CRIT
