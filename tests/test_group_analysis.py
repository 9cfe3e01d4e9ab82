"""The landscape side of GroupEmbedding (torch_embed/graph/analysis.py) against brute force.

References are never the code's own output: the narrow state a model held before
widening (``restrict`` must give it back), applying two embeddings one after the other
(``then`` must equal it), dense float64 Hessians from ``torch.autograd.functional``
with ``eigvalsh`` (``before + inertia_change`` must equal the full recount), and the
dense maps ``A`` (apply of unit vectors) for the block structure ``AᵀH C = 0``.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable

import pytest
import torch
from cases import brute_gradient, brute_hessian, counts
from tol_reference import reference_rule
from torch import Tensor, nn
from torch.func import functional_call
from zoo import ZOO, ZooCase, by_name

import torch_embed
from torch_embed.critical import critical_point
from torch_embed.graph.analysis import (
    COUPLING_LIMIT,
    complement_basis,
    complement_block,
    inertia_change,
    restrict,
)
from torch_embed.graph.embedding import GroupEmbedding
from torch_embed.graph.groups import width_groups
from torch_embed.graph.plan import plan_groups
from torch_embed.schemes import DEFAULT_SCHEME, Scheme

pytestmark = pytest.mark.usefixtures("single_thread_module")

# null units under ReLU never learn: widen warns (test_widen_graph_schemes checks it);
# here they are landscape objects (their Hessian block is what is measured)
pytestmark = pytest.mark.filterwarnings(
    "ignore:width group .* null units with zero fan-in:UserWarning"
)

F64 = torch.float64
EPS = torch.finfo(F64).eps


# --------------------------------------------------------------------------- restrict
GENERAL: list[Scheme] = [
    torch_embed.Split(alpha="random"),
    torch_embed.Split(alpha=(0.2, -0.3, 1.1)),
    torch_embed.Split(alpha=1.7, select="cyclic"),
    torch_embed.Net2Net(),
    DEFAULT_SCHEME,  # Net2Net with symmetric noise: cancels in the sum of the copies
]
GROWABLE = [c for c in ZOO if any(e.growable for e in c.expected)]


def _plan(case: ZooCase, scheme: Scheme, factor: float, seed: int) -> GroupEmbedding | None:
    """Every growable group × factor; ``None`` where the rules refuse the scheme."""
    model = case.build()
    groups = width_groups(model, case.example_inputs())
    try:
        return plan_groups(groups, factor, scheme, generator=torch.Generator().manual_seed(seed))
    except ValueError as error:
        # Null under a norm: no width would do (a LayerNorm's null units are mean-filled,
        # refused where a per-channel scale breaks the mean)
        if "null units change" not in str(error) and "mean-fill" not in str(error):
            raise
        return None


@pytest.mark.parametrize("case", GROWABLE, ids=[c.name for c in GROWABLE])
def test_restrict_inverts_apply_on_every_zoo_model(case: ZooCase) -> None:
    state = {k: v.clone() for k, v in case.build().state_dict().items()}
    k = len(case.name)
    # shares that add up exactly: restrict(apply(s)) is s bit for bit
    for scheme in (torch_embed.Split(alpha=0.5), torch_embed.Null()):
        emb = _plan(case, scheme, 1.6, k)
        if emb is None:
            continue
        back = emb.restrict(emb.apply(state))
        assert back.keys() == state.keys()
        for name, value in state.items():
            assert torch.equal(back[name], value), (case.name, scheme, name)
    # other shares: readers are Σ_j fl(c_j·w), within 2k·eps·Σ|c_j|·|w| of w (k <= 4
    # copies, Σ|c_j| <= 2.4 here); copied axes stay exact
    scheme = GENERAL[k % len(GENERAL)]
    emb = _plan(case, scheme, 2.3, k)
    assert emb is not None
    wide = emb.apply(state)
    back = emb.restrict(wide)
    readers = {a.tensor for a in emb.axes if a.role == "split"}
    for name, value in state.items():
        assert back[name].shape == value.shape
        if name in readers:
            bound = 32 * EPS * value.abs() + 1e-300
            assert bool(((back[name] - value).abs() <= bound).all()), (case.name, scheme, name)
        else:
            assert torch.equal(back[name], value), (case.name, scheme, name)
    assert any(not torch.equal(wide[n], state[n]) for n in readers), "nothing was split"


def test_restrict_of_a_grouped_conv_sums_copies_inside_their_segment() -> None:
    """ResNeXt: the grouped conv's in-axis holds one group's share; a hand-computed
    reference sums the copies of each input channel inside its segment."""
    case = by_name("resnext_grouped_conv")
    model = case.build()
    x = case.example_inputs()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    emb = torch_embed.widen(
        model, 2.0, torch_embed.Split(alpha=0.3), example_inputs=x, generator=torch.Generator()
    )
    grouped = [a for a in emb.axes if a.groups > 1]
    assert grouped, "the zoo's ResNeXt has a grouped conv reading a grown group"
    a = grouped[0]
    w = dict(model.named_parameters())[a.tensor].detach()
    g, share_w = a.groups, w.shape[1]
    share_n = state[a.tensor].shape[1]
    expected = torch.zeros(w.shape[0], share_n, *w.shape[2:], dtype=F64)
    for q in range(g):
        rows = slice(q * w.shape[0] // g, (q + 1) * w.shape[0] // g)
        for j in range(share_w):
            src = int(a.source[q * share_w + j])
            if src >= 0:
                expected[rows, src - q * share_n] += w[rows, j]
    got = restrict(GroupEmbedding({}, {}, (a,)), {a.tensor: w})[a.tensor]
    assert torch.allclose(got, expected, rtol=0, atol=1e-15)
    back = emb.restrict(model.state_dict())
    assert torch.allclose(back[a.tensor], state[a.tensor], rtol=1e-14, atol=1e-15)


# --------------------------------------------------------------------------- then
THEN_CASES = [
    "mlp_residual",
    "conv_flatten_linear",
    "resnet_basic",
    "densenet_block",
    "resnext_grouped_conv",
    "convnext_block",
    "groupnorm",
]


def _close(a: Tensor, b: Tensor, ulps: float) -> bool:
    return bool(((a - b).abs() <= ulps * EPS * b.abs() + 1e-300).all())


@pytest.mark.parametrize("name", THEN_CASES)
def test_then_equals_applying_both(name: str) -> None:
    case = by_name(name)
    model = case.build().eval()
    x = case.example_inputs()
    gen = torch.Generator().manual_seed(len(name))
    s0 = {k: v.clone() for k, v in model.state_dict().items()}
    g0 = {n: torch.randn(p.shape, generator=gen, dtype=F64) for n, p in model.named_parameters()}
    first = torch_embed.widen(model, 1.5, torch_embed.Split(alpha="random"), example_inputs=x,
                              generator=gen)  # fmt: skip
    s1 = {k: v.clone() for k, v in model.state_dict().items()}
    grown = sorted(first.sizes)[len(name) % len(first.sizes)]
    scheme: Scheme = torch_embed.Net2Net(noise=0.0)
    second = torch_embed.widen(model, 2.0, scheme, example_inputs=x, generator=gen)
    s2 = model.state_dict()
    both = first.then(second)
    assert isinstance(both, GroupEmbedding)
    for group, (n0, n1) in first.sizes.items():
        assert both.sizes[group] == (n0, second.sizes.get(group, (n1, n1))[1])
    assert grown in both.sizes
    # apply: one gather, coefficients multiplied once (each side rounds at most twice)
    direct = both.apply(s0)
    for k, v in s2.items():
        assert direct[k].shape == v.shape, k
        assert _close(direct[k], v, 4), k
    # gradients: the same composition of the two maps
    chained = second.map_gradients(first.map_gradients(g0))
    mapped = both.map_gradients(g0)
    for k, v in chained.items():
        assert _close(mapped[k], v, 4), k
    # restrict: back to the narrow state; and to the mid state through ``second``
    back = both.restrict(s2)
    for k, v in s0.items():
        assert _close(back[k], v, 64), k
    mid = second.restrict(s2)
    for k, v in s1.items():
        assert _close(mid[k], v, 64), k
    # the composed maps per group: sources compose, coefficients multiply
    for group, lm in both.maps.items():
        if group in first.maps and group in second.maps:
            a, b = first.maps[group], second.maps[group]
            assert torch.equal(lm.source, a.source[b.source])
            assert torch.allclose(lm.coef, a.coef[b.source] * b.coef, rtol=0, atol=0)


def test_then_refusals() -> None:
    case = by_name("mlp_residual")
    model = case.build()
    x = case.example_inputs()
    noisy = torch_embed.widen(copy.deepcopy(model), 1.5, DEFAULT_SCHEME, example_inputs=x)
    plain = torch_embed.widen(copy.deepcopy(model), 1.5, "split", example_inputs=x)
    with pytest.raises(ValueError, match="Net2Net noise"):
        noisy.then(plain)
    with pytest.raises(ValueError, match="Net2Net noise"):
        plain.then(noisy)
    # the second planned on the narrow model, not on the one the first widened
    with pytest.raises(ValueError, match="cannot compose"):
        plain.then(plain)


# --------------------------------------------------------------------------- curvature
class SmallCNN(nn.Module):
    """Conv2d → (BatchNorm2d) → tanh → Conv2d → tanh → spatial mean → Linear."""

    def __init__(self, batchnorm: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 2, 2, bias=not batchnorm)
        self.bn1: nn.Module = nn.BatchNorm2d(2) if batchnorm else nn.Identity()
        self.conv2 = nn.Conv2d(2, 2, 2)
        self.head = nn.Linear(2, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.bn1(self.conv1(x)))
        h = torch.tanh(self.conv2(h))
        return self.head(h.mean((2, 3)))


# Critical points of the teacher-student problems of ``_cnn_problem``, reached by
# ``critical_point`` from the teacher's parameters (|∇R| 7.7e-15 and 1.4e-15), stored to
# full precision so that the tests need not repeat the descent (a few seconds, and a
# path that rounding could change on another CPU); re-polished and re-checked below.
CNN_POINTS: dict[bool, dict[str, list[float]]] = {
    False: {
        "conv1.weight": [-0.8117785107341814, -0.558216019786604, -1.0541045747617959,
                         1.0796097973978138, -0.09049593786757273, 2.188519972553466,
                         -1.530218442678353, -1.0986347994283323],
        "conv1.bias": [0.92380924881998, -1.017745282095983],
        "conv2.weight": [-0.019921607576019854, -0.8119114315720035, -0.9410446621588866,
                         -0.5728522255904888, 0.5323360526341909, -0.6080917669324682,
                         0.7006457656893617, 0.06950213141325645, -0.6961184761859268,
                         -0.09114982495739322, -0.9194412117568982, 0.297463541323678,
                         0.19929611925988494, 0.6756992270835183, -0.545595983625567,
                         0.8761464025851292],
        "conv2.bias": [0.3523733097302901, 0.5425336636138343],
        "head.weight": [-1.9292683128185926, -0.6638959286251891, 0.24058090149466899,
                        -2.314346533861335],
        "head.bias": [-0.10103568769976774, 1.1149569835510105],
    },
    True: {
        "conv1.weight": [4.239189069867424, 1.4976748986204536, -1.2004276310541426,
                         4.3911075885257995, -0.6939480664680862, -0.04074270756686367,
                         -1.945009625277788, 0.27698841587515455],
        "bn1.weight": [5.174846715537795, 0.7068935316827023],
        "bn1.bias": [-9.458289397806695, -0.2008107184641953],
        "conv2.weight": [7.516706554894806, 1.6269775051623925, 2.7043304350618973,
                         -0.5274981034491563, 0.6501107400694993, -1.9048135266540085,
                         0.48475231906432853, 11.637709474017205, -0.49710116456993,
                         -0.00902373024377842, -0.15304479596613188, -0.3675742306221524,
                         -0.959587263538576, 0.4856643478178443, 0.9052871681428009,
                         -0.10051380776615662],
        "conv2.bias": [0.47374930395562603, -0.9005945489967231],
        "head.weight": [-0.9046819522873095, 0.7220251338393431, 0.11179345046274151,
                        -2.4277595081145242],
        "head.bias": [0.7157734510744982, -0.25239039868001145],
    },
}  # fmt: skip


def _cnn_problem(batchnorm: bool) -> tuple[SmallCNN, Tensor, Tensor]:
    """A teacher with N(0, 1) weights (random BatchNorm statistics), 40 inputs 1×3×3,
    targets = teacher + 0.3·noise (seeds 5 and 1), in eval mode."""
    gen = torch.Generator().manual_seed(1 if batchnorm else 5)
    net = SmallCNN(batchnorm).double().eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 1, generator=gen)
        if isinstance(net.bn1, nn.BatchNorm2d):
            net.bn1.weight.uniform_(0.5, 1.5, generator=gen)
            net.bn1.running_mean.normal_(0, 0.2, generator=gen)
            net.bn1.running_var.uniform_(0.5, 1.5, generator=gen)
    x = torch.randn(40, 1, 3, 3, generator=gen, dtype=F64)
    with torch.no_grad():
        y = net(x) + 0.3 * torch.randn(40, 2, generator=gen, dtype=F64)
    return net, x, y


@pytest.fixture(scope="module", params=[False, True], ids=["no-bn", "bn-eval"])
def polished_cnn(request: pytest.FixtureRequest) -> tuple[SmallCNN, Tensor, Tensor]:
    net, x, y = _cnn_problem(request.param)
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_(torch.tensor(CNN_POINTS[request.param][name], dtype=F64).view(p.shape))
    result = critical_point(net, nn.MSELoss(), x, y)
    assert result.converged and result.grad_norm <= 1e-12, result.message
    return net, x, y


def brute(model: nn.Module, loss: Callable[..., Tensor], x: Tensor, y: Tensor):
    """(eigenvalues of the dense float64 Hessian, |∇R|), from tests/cases.py."""
    hess = brute_hessian(model, loss, x, y)
    return torch.linalg.eigvalsh(hess), float(brute_gradient(model, loss, x, y).norm())


def assert_clean(ev: Tensor, tol: float, what: str, above: float = 1e3) -> None:
    """No eigenvalue in (tol/5, above·tol): the count does not hang on rounding (nor, for
    ``above`` beyond the Ostrowski factor of T = [A C], on the congruence)."""
    near = ev.abs()[(ev.abs() > tol / 5) & (ev.abs() < tol * above)]
    assert near.numel() == 0, f"{what}: eigenvalues {near.tolist()} too close to tol={tol:.2g}"


CRITICAL: dict[str, Scheme] = {
    "split-0.3": torch_embed.Split(alpha=0.3),
    "split-signed": torch_embed.Split(alpha=1.7),
    "split-3way": torch_embed.Split(alpha=(0.2, -0.3, 1.1)),
    "net2net": torch_embed.Net2Net(noise=0.0),
    "null": torch_embed.Null(),
}


def _check_recount(
    narrow: nn.Module,
    wide: nn.Module,
    emb: GroupEmbedding,
    x: Tensor,
    y: Tensor,
    critical: bool = False,
) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """before + change == full dense recount, with the reference tolerance and with the
    change's default one (unambiguous at a critical point; elsewhere the default rule
    may flag the zero count, docs/guide/inertia.md). Returns (before, after)."""
    loss = nn.MSELoss()
    ev_n, _ = brute(narrow, loss, x, y)
    ev_w, g_w = brute(wide, loss, x, y)
    tol = reference_rule(ev_w, g_w)[0]
    assert_clean(ev_n, tol, "narrow")
    assert_clean(ev_w, tol, "wide")
    before, after = counts(ev_n, tol), counts(ev_w, tol)
    change = emb.inertia_change(wide, loss, x, y, tol=tol)
    assert change.tol == tol and change.method == "hvp"
    assert tuple(a + b for a, b in zip(before, change)) == after, (before, tuple(change), after)
    default = emb.inertia_change(wide, loss, x, y)
    assert_clean(ev_n, default.tol, "narrow")
    assert_clean(ev_w, default.tol, "wide")
    assert default.as_tuple() == change.as_tuple()
    assert not (critical and default.ambiguous)
    return before, after


@pytest.mark.parametrize("scheme", list(CRITICAL.values()), ids=list(CRITICAL))
def test_critical_schemes_at_a_polished_cnn(polished_cnn, scheme: Scheme) -> None:
    """Issue 12: every critical scheme keeps |∇R| at the polished level, and before +
    inertia_change equals a full float64 recount (both groups grown)."""
    net, x, y = polished_cnn
    loss = nn.MSELoss()
    g_narrow = float(brute_gradient(net, loss, x, y).norm())
    wide = copy.deepcopy(net)
    three = isinstance(scheme, torch_embed.Split) and isinstance(scheme.alpha, tuple)
    widths = {"conv1": 6 if three else 4, "conv2": 4}
    emb = torch_embed.widen(
        wide, widths, scheme, example_inputs=x, generator=torch.Generator().manual_seed(2)
    )
    assert emb.kind is torch_embed.EmbeddingKind.CRITICAL
    g_wide = float(brute_gradient(wide, loss, x, y).norm())
    assert g_wide <= 1e-12 and g_wide <= 10 * g_narrow + 1e-14, (g_narrow, g_wide)
    before, after = _check_recount(net, wide, emb, x, y, critical=True)
    assert after[0] >= before[0] and after[2] >= before[2]  # irreversibility
    assert after[0] > before[0]  # here every scheme creates descent directions
    if isinstance(scheme, torch_embed.Null):  # THEORY.md §6: (r, n - 2r, r)
        assert after[0] - before[0] == after[2] - before[2]


def _dense_maps(emb: GroupEmbedding, narrow: nn.Module) -> Tensor:
    """``A`` (P_wide × P_narrow) column by column: apply of each narrow unit vector."""
    names = [n for n, _ in narrow.named_parameters()]
    shapes = [p.shape for _, p in narrow.named_parameters()]
    p = sum(math.prod(s) for s in shapes)
    cols = []
    for j in range(p):
        e = torch.zeros(p, dtype=F64)
        e[j] = 1.0
        parts = dict(
            zip(
                names,
                (c.view(s) for c, s in zip(torch.split(e, [math.prod(s) for s in shapes]), shapes)),
            )
        )
        wide = emb.apply(parts)
        cols.append(torch.cat([wide[n].reshape(-1) for n in names]))
    return torch.stack(cols, 1)


@pytest.mark.parametrize(
    "scheme", [CRITICAL["split-signed"], CRITICAL["null"]], ids=["split", "null"]
)
def test_block_structure_against_dense_matrices(polished_cnn, scheme: Scheme) -> None:
    """The directions and the block, measured on the dense Hessian: C has orthonormal
    rows, CB = 0 (B from map_gradients), AᵀH C = 0 and D = C H Cᵀ."""
    net, x, y = polished_cnn
    wide = copy.deepcopy(net)
    emb = torch_embed.widen(wide, {"conv1": 4, "conv2": 3}, scheme, example_inputs=x)
    a = _dense_maps(emb, net)
    names = [n for n, _ in net.named_parameters()]
    b_cols = []
    for j in range(a.shape[1]):
        e = torch.zeros(a.shape[1], dtype=F64)
        e[j] = 1.0
        sizes = [p.numel() for p in net.parameters()]
        parts = {
            n: c.view(p.shape) for n, c, p in zip(names, torch.split(e, sizes), net.parameters())
        }
        mapped = emb.map_gradients(parts)
        b_cols.append(torch.cat([mapped[n].reshape(-1) for n in names]))
    b = torch.stack(b_cols, 1)
    c = complement_basis(emb, wide).to_dense()
    k = c.shape[0]
    assert k == a.shape[0] - a.shape[1]
    assert torch.allclose(c @ c.T, torch.eye(k, dtype=F64), atol=1e-14)
    assert float((c @ b).abs().max()) <= 1e-15
    assert torch.allclose(b.T @ a, torch.eye(a.shape[1], dtype=F64), atol=1e-15)
    h = brute_hessian(wide, nn.MSELoss(), x, y)
    scale = float(h.abs().max())
    assert float((a.T @ h @ c.T).abs().max()) <= 1e-12 * scale
    blk = complement_block(emb, wide, nn.MSELoss(), x, y)
    assert torch.allclose(blk.matrix, c @ h @ c.T, rtol=0, atol=1e-13 * scale)
    assert blk.coupling <= 1e-13 and blk.complement_grad <= 1e-13
    assert (blk.p_narrow, blk.p_wide) == (a.shape[1], a.shape[0])


# --------------------------------------------------------------------------- residual MLP
def test_residual_mlp_before_plus_change_equals_recount() -> None:
    """The zoo's residual MLP (a stream group through two residual adds, two hidden
    groups), at a random point: the structure holds at every embedded point."""
    case = by_name("mlp_residual")
    net = case.build().eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.5, generator=gen)
    x = torch.randn(30, 3, generator=gen, dtype=F64)
    y = torch.randn(30, 2, generator=gen, dtype=F64)
    for scheme in (torch_embed.Split(alpha=0.3), torch_embed.Null()):
        wide = copy.deepcopy(net)
        emb = torch_embed.widen(
            wide, {"fc_in": 7, "blocks.0.fc1": 8, "blocks.1.fc1": 5}, scheme, example_inputs=x,
            generator=torch.Generator().manual_seed(3),
        )  # fmt: skip
        assert set(emb.sizes) == {"fc_in", "blocks.0.fc1", "blocks.1.fc1"}
        _check_recount(net, wide, emb, x, y)


# --------------------------------------------------------------------------- measured premise
def _train_mode_brute(model: nn.Module, loss: Callable[..., Tensor], x: Tensor, y: Tensor):
    """Dense Hessian eigenvalues and |∇R| of the train-mode loss, on copies of the buffers
    (the model's own running statistics are never touched)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def f(t: Tensor) -> Tensor:
        parts = torch.split(t, [math.prod(s) for s in shapes])
        state = {n: c.view(s) for n, c, s in zip(names, parts, shapes)}
        fresh = {k: v.clone() for k, v in buffers.items()}
        return loss(functional_call(model, {**state, **fresh}, (x,)), y)

    hess = torch.autograd.functional.hessian(f, theta)
    grad = torch.autograd.functional.jacobian(f, theta)
    return torch.linalg.eigvalsh(hess), float(grad.norm())


@pytest.mark.parametrize("scheme", [CRITICAL["split-0.3"], CRITICAL["null"]], ids=["split", "null"])
def test_batchnorm_in_train_mode_keeps_the_structure(scheme: Scheme) -> None:
    """BatchNorm in train mode normalizes each channel over the batch on its own: equal
    copies get equal statistics, so gradients still map by B (measured: coupling at
    rounding level) and before + change equals the dense recount of the train-mode
    loss. Without allow_train_mode it is refused, as by every Hessian tool."""
    net, x, y = _cnn_problem(True)
    net.train()
    wide = copy.deepcopy(net)
    emb = torch_embed.widen(wide, {"conv1": 4, "conv2": 3}, scheme, example_inputs=x)
    running = {k: v.clone() for k, v in wide.named_buffers()}
    loss = nn.MSELoss()
    with pytest.raises(ValueError, match="train mode"):
        emb.inertia_change(wide, loss, x, y)
    blk = complement_block(emb, wide, loss, x, y, allow_train_mode=True)
    assert blk.coupling <= 1e-14
    ev_n, _ = _train_mode_brute(net, loss, x, y)
    ev_w, g_w = _train_mode_brute(wide, loss, x, y)
    tol = reference_rule(ev_w, g_w)[0]
    # not a critical point of the train-mode loss (|∇R| ~ 1): a clean factor of 10
    assert_clean(ev_n, tol, "narrow", 10)
    assert_clean(ev_w, tol, "wide", 10)
    change = emb.inertia_change(wide, loss, x, y, tol=tol, allow_train_mode=True)
    before, after = counts(ev_n, tol), counts(ev_w, tol)
    assert tuple(a + b for a, b in zip(before, change)) == after, (before, tuple(change), after)
    for k, v in wide.named_buffers():  # the running statistics were not updated
        assert torch.equal(v, running[k]), k


class _LayerNormMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 4)
        self.norm = nn.LayerNorm(4)
        self.fc2 = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.tanh(self.norm(self.fc1(x))))


def test_coupling_is_measured_not_assumed() -> None:
    """A LayerNorm shares its statistics among a unit's copies: with unequal shares the
    gradients do not map by B. The planner says so (output-preserving); an embedding that
    claims to be critical anyway (its reasons removed by hand) is caught by the measured
    coupling, which the dense Hessian confirms (AᵀH C ≠ 0). Equal shares: it holds."""
    torch.manual_seed(0)
    net = _LayerNormMLP().double()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(20, 3, generator=gen, dtype=F64)
    y = torch.randn(20, 2, generator=gen, dtype=F64)
    loss = nn.MSELoss()
    wide = copy.deepcopy(net)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        emb = torch_embed.widen(wide, {"fc1": 8}, torch_embed.Split(alpha=0.3), example_inputs=x)
    assert emb.kind is torch_embed.EmbeddingKind.OUTPUT_PRESERVING
    with pytest.raises(ValueError, match=r"only defined for critical embeddings.*LayerNorm"):
        emb.inertia_change(wide, loss, x, y)
    claimed = GroupEmbedding(emb.maps, emb.sizes, emb.axes, emb.scheme)
    assert claimed.kind is torch_embed.EmbeddingKind.CRITICAL
    a = _dense_maps(claimed, net)
    c = complement_basis(claimed, wide).to_dense()
    h = brute_hessian(wide, loss, x, y)
    assert float((a.T @ h @ c.T).abs().max()) > 1e-3 * float(h.abs().max())
    blk = complement_block(claimed, wide, loss, x, y)
    assert blk.coupling > 1e3 * COUPLING_LIMIT
    with pytest.raises(ValueError, match="coupled to the embedded ones"):
        inertia_change(claimed, wide, loss, x, y)
    # equal shares keep the gradients, and the structure
    wide = copy.deepcopy(net)
    emb = torch_embed.widen(wide, {"fc1": 8}, torch_embed.Split(alpha=0.5), example_inputs=x)
    assert emb.kind is torch_embed.EmbeddingKind.CRITICAL
    assert complement_block(emb, wide, loss, x, y).coupling <= 1e-14
    _check_recount(net, wide, emb, x, y)


def test_refusals() -> None:
    case = by_name("mlp_residual")
    net = case.build().eval()
    x = case.example_inputs()[0]
    y = torch.zeros(x.shape[0], 2, dtype=F64)
    loss = nn.MSELoss()
    noisy_model = copy.deepcopy(net)
    noisy = torch_embed.widen(noisy_model, 1.5, DEFAULT_SCHEME, example_inputs=x)
    with pytest.raises(ValueError, match=r"only defined for critical embeddings.*Net2Net noise"):
        noisy.inertia_change(noisy_model, loss, x, y)
    wide = copy.deepcopy(net)
    emb = torch_embed.widen(wide, 1.5, "split", example_inputs=x)
    with pytest.raises(ValueError, match="closed-form"):
        emb.inertia_change(wide, loss, x, y, method="closed-form")
    with pytest.raises(ValueError, match="method must be one of"):
        emb.inertia_change(wide, loss, x, y, method="dense")
    with pytest.raises(ValueError, match="the model the embedding widened"):
        emb.inertia_change(net, loss, x, y)  # the narrow model
    with pytest.raises(ValueError, match="tol must be"):
        emb.inertia_change(wide, loss, x, y, tol=-1.0)
    with pytest.raises(TypeError, match="GroupEmbedding"):
        mlp = torch_embed.plan(nn.Sequential(nn.Linear(1, 2), nn.Tanh(), nn.Linear(2, 1)), [3])
        inertia_change(mlp, wide, loss, x, y)  # type: ignore[arg-type]
    moved = copy.deepcopy(wide)
    with torch.no_grad():
        moved.fc_in.weight[-1] += 0.1  # a copy that left its source: off the embedded set
    with pytest.raises(ValueError, match=r"not at a point of this embedding.*fc_in.weight"):
        emb.inertia_change(moved, loss, x, y)
    frozen = copy.deepcopy(wide)
    frozen.fc_out.bias.requires_grad_(False)
    with pytest.raises(ValueError, match="frozen"):
        emb.inertia_change(frozen, loss, x, y)


def test_null_units_under_relu_add_only_zeros() -> None:
    """THEORY.md §6: a null unit's block is [[0, G'], [G'ᵀ, 0]] with G' ∝ σ'(β); under
    ReLU σ'(0) = 0 (PyTorch's choice at the kink), so null units add only zero
    eigenvalues, here through a strided reader (conv → flatten → Linear) and a
    Linear → ReLU group. The dense recount agrees."""
    case = by_name("conv_flatten_linear")
    net = case.build().eval()
    x = case.example_inputs()[0]
    gen = torch.Generator().manual_seed(5)
    y = torch.randn(x.shape[0], 2, generator=gen, dtype=F64)
    wide = copy.deepcopy(net)
    emb = torch_embed.widen(wide, 1.5, torch_embed.Null(), example_inputs=x)
    added = sum(p.numel() for p in wide.parameters()) - sum(p.numel() for p in net.parameters())
    assert emb.inertia_change(wide, nn.MSELoss(), x, y).as_tuple() == (0, added, 0)
    _check_recount(net, wide, emb, x, y)


def test_public_inertia_change_takes_a_group_embedding() -> None:
    """torch_embed.inertia_change(emb, ...) with a traced model's embedding takes the
    graph path (the MLP path has no GroupEmbedding layout), with the same result."""
    net, x, y = _cnn_problem(False)
    wide = copy.deepcopy(net)
    emb = torch_embed.widen(wide, {"conv2": 3}, torch_embed.Split(alpha=0.3), example_inputs=x)
    got = torch_embed.inertia_change(emb, wide, nn.MSELoss(), x, y, tol=1e-9)
    assert got == emb.inertia_change(wide, nn.MSELoss(), x, y, tol=1e-9)
    assert got.total == 2 * 4 + 1 + 2  # one conv2 filter, its bias, one head column


# --------------------------------------------------------------------------- steps
STEP_CASES = [
    ("mlp_residual", torch_embed.Split(alpha=(0.2, -0.3, 1.1))),
    ("conv_flatten_linear", torch_embed.Split(alpha="random")),
    ("resnet_basic", torch_embed.Net2Net(noise=0.0)),
    ("densenet_block", torch_embed.Null()),
    ("mobilenetv2_inverted_residual", torch_embed.Split(alpha=1.7)),
    ("squeeze_excitation", torch_embed.Split(alpha=0.3)),
]


@pytest.mark.parametrize(("name", "scheme"), STEP_CASES, ids=[n for n, _ in STEP_CASES])
def test_steps_add_one_unit_each_and_compose_to_the_embedding(name: str, scheme: Scheme) -> None:
    case = by_name(name)
    model = case.build().eval()
    x = case.example_inputs()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(len(name))
    emb = torch_embed.widen(model, 1.7, scheme, example_inputs=x, generator=gen)
    pieces = emb.steps(width_groups(model, x))  # groups of the widened model
    added = sum(w - n for n, w in emb.sizes.values())
    ones = [p for p in pieces if sum(w - n for n, w in p.sizes.values()) == 1]
    assert len(ones) == added and len(pieces) in (added, added + 1)
    for p in ones:
        assert len(p.sizes) == 1 and p.kind is torch_embed.EmbeddingKind.CRITICAL
    if len(pieces) > added:  # the last piece only reorders units
        assert all(n == w for n, w in pieces[-1].sizes.values())
    chained = dict(state)
    for p in pieces:
        chained = p.apply(chained)
    composed = pieces[0]
    for p in pieces[1:]:
        composed = composed.then(p)
    direct = emb.apply(state)
    for k, v in model.state_dict().items():
        scale = float(v.abs().max()) if v.numel() else 0.0
        assert float((chained[k] - v).abs().max()) <= 1e-13 * max(scale, 1.0), k
        assert float((composed.apply(state)[k] - direct[k]).abs().max()) <= 1e-13 * max(scale, 1.0)
    for g, lm in composed.maps.items():
        assert torch.equal(lm.source, emb.maps[g].source), g


def test_steps_refusals() -> None:
    case = by_name("convnext_block")
    model = case.build().eval()
    x = case.example_inputs()
    emb = torch_embed.widen(copy.deepcopy(model), 2.0, "split", example_inputs=x)
    with pytest.raises(ValueError, match=r"LayerNorm.*one unit at a time"):
        emb.steps(width_groups(model, x))
    other = by_name("mlp_residual")
    m2 = other.build()
    noisy = torch_embed.widen(m2, 1.5, DEFAULT_SCHEME, example_inputs=other.example_inputs())
    with pytest.raises(ValueError, match="Net2Net noise"):
        noisy.steps(width_groups(m2, other.example_inputs()))
    plain = torch_embed.widen(other.build(), 1.5, "split", example_inputs=other.example_inputs())
    with pytest.raises(ValueError, match="not among the given groups"):
        plain.steps(width_groups(model, x))


def test_steps_inertia_changes_add_up_to_the_whole(polished_cnn) -> None:
    """Each one-step piece is a critical embedding of the model between the steps: the
    inertia changes of the pieces, each at its own intermediate model (the narrow one's
    Parameters given the chained state), add up to the change of the whole embedding."""
    net, x, y = polished_cnn
    loss = nn.MSELoss()
    wide = copy.deepcopy(net)
    scheme = torch_embed.Split(alpha=(0.2, -0.3, 1.1))
    emb = torch_embed.widen(wide, {"conv1": 4, "conv2": 4}, scheme, example_inputs=x)
    pieces = emb.steps(width_groups(wide, x))
    # the spectra of the blocks are clear of it (|∇R| <= 1e-12), checked below: nothing
    # in (tol/5, 100·tol). (A block eigenvalue sits at ~1e-6 = 1000·tol, on either side of
    # it depending on where the polish stops: a 1000x margin made the check flaky.)
    tol = 1e-9
    total = emb.inertia_change(wide, loss, x, y, tol=tol)
    lam = torch.linalg.eigvalsh(complement_block(emb, wide, loss, x, y).matrix)
    assert ((lam.abs() <= tol / 5) | (lam.abs() >= tol * 1e2)).all()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    summed = (0, 0, 0)
    for piece in pieces:
        state = piece.apply(state)
        between = copy.deepcopy(net)
        for name, t in [*between.named_parameters(), *between.named_buffers()]:
            t.data = state[name].clone()
        if any(n != w for n, w in piece.sizes.values()):
            lam = torch.linalg.eigvalsh(complement_block(piece, between, loss, x, y).matrix)
            assert ((lam.abs() <= tol / 5) | (lam.abs() >= tol * 1e2)).all()
            change = piece.inertia_change(between, loss, x, y, tol=tol)
            summed = tuple(a + b for a, b in zip(summed, change))
    assert summed == total.as_tuple()
    for name, t in wide.state_dict().items():
        assert torch.allclose(state[name], t, rtol=1e-13, atol=1e-13), name


class _Tied(nn.Module):
    """Two Linear layers sharing one weight (two FQNs, one Parameter)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 5)
        self.m1 = nn.Linear(5, 5)
        self.m2 = nn.Linear(5, 5)
        self.m2.weight = self.m1.weight
        self.out = nn.Linear(5, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.m1(torch.tanh(self.a(x))))
        return self.out(torch.tanh(self.m2(h)))


def test_tied_weight_is_one_parameter_of_the_hessian() -> None:
    """A weight under two FQNs is one block of the Hessian, whichever name widen used."""
    torch.manual_seed(0)
    net = _Tied().double()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(20, 3, generator=gen, dtype=F64)
    y = torch.randn(20, 2, generator=gen, dtype=F64)
    wide = copy.deepcopy(net)
    emb = torch_embed.widen(wide, {"m1": 7}, torch_embed.Split(alpha=0.3), example_inputs=x)
    assert complement_basis(emb, wide).shape[0] == sum(p.numel() for p in wide.parameters()) - sum(
        p.numel() for p in net.parameters()
    )
    _check_recount(net, wide, emb, x, y)


def test_inertia_change_over_batches_equals_one_batch() -> None:
    """``data=`` (3 uneven batches, mean reduction) gives the one-batch change: the
    complement block is the same matrix, summed batch by batch with weights n_b/N."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)).double()
    x = torch.randn(11, 2, dtype=torch.float64)
    y = torch.randn(11, 1, dtype=torch.float64)
    emb = torch_embed.widen(net, {"0": 5}, torch_embed.Split(alpha=0.3), example_inputs=x)
    one = complement_block(emb, net, nn.MSELoss(), x, y)
    batches = [(x[:2], y[:2]), (x[2:9], y[2:9]), (x[9:], y[9:])]
    many = complement_block(emb, net, nn.MSELoss(), data=batches)
    assert torch.allclose(many.matrix, one.matrix, rtol=1e-12, atol=1e-14)
    assert abs(many.grad_norm - one.grad_norm) <= 1e-12 * max(one.grad_norm, 1.0)
    full = emb.inertia_change(net, nn.MSELoss(), x, y)
    assert emb.inertia_change(net, nn.MSELoss(), data=batches, tol=full.tol).as_tuple() == (
        full.as_tuple()
    )


def test_mean_fill_and_temperature_gains_are_refused_by_restrict_then_steps() -> None:
    """A LayerNorm's mean-fill is no gather: restrict/then/steps/inertia_change say so
    instead of inverting it as if the new entries were null units."""
    torch.manual_seed(5)
    net = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    groups = width_groups(net, x)
    emb = torch_embed.widen(net, {"0": 6}, torch_embed.Null(), example_inputs=x)
    assert any(a.mean for a in emb.axes)
    with pytest.raises(ValueError, match=r"restrict: `0\.weight` axis 0 is grown by a mean-fill"):
        emb.restrict(net.state_dict())
    with pytest.raises(ValueError, match=r"then: .* mean-fill"):
        emb.then(emb)
    with pytest.raises(ValueError, match=r"steps: .* mean-fill"):
        emb.steps(groups)
    with pytest.raises(ValueError, match=r"inertia_change: .* mean-fill"):
        emb.inertia_change(net, nn.MSELoss(), x, torch.zeros(6, 2, dtype=torch.float64))
