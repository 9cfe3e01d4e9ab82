"""Generated property tests: output, gradient map and optimizer state against brute force.

Each example draws an architecture (1-3 hidden layers of width 1-6, any accepted
activation, with or without biases, optional eval-mode BatchNorm1d and Dropout, 1-3
outputs), a scheme config with its own options and new widths (:mod:`strategies`), a
seed for the weights and data, and where it applies a dtype, a loss and an optimizer.
The references are computed without the library's maps:

* output: ``|wide(x) - narrow(x)| <= forward_error_bound(narrow, x) +
  forward_error_bound(wide, x)`` elementwise, in the network's dtype. The bound is a
  rigorous running error bound (torch_embed/exactness.py), so the verdict does not depend
  on the order in which a CPU's kernels round.
* gradients (float64, a quarter of the cases float32): ``torch.autograd`` on the
  widened network at the embedded point equals ``embedding.map_gradients`` of the
  narrow autograd gradients, and the ``.grad`` that ``widen`` installs, for every
  embedding reported critical.
* optimizer state (same dtypes; THEORY §8): after ``k`` narrow steps and ``widen(...,
  optimizer=opt)``, ``opt``'s state equals that of a fresh wide optimizer fed, for the
  same ``k`` steps, the autograd gradients of the wide network at the embedded narrow
  iterates (for a critical embedding these are the mapped gradients ``B g_t``).

The kinds the library reports are checked against kinds predicted from the
architecture (:class:`strategies.Widening`). Example counts scale with the hypothesis
profile's ``max_examples`` (tests/conftest.py). Each test is parametrized by scheme
family (and dtype or optimizer row), so that every combination gets its share; at the
CI profile they total 1500 with the twelve optimizer rows supported today, 50 more per
supported row
(``pytest tests/test_properties.py --hypothesis-show-statistics`` lists them, with
events for the schemes, kinds, dtypes and losses drawn). Where a row's map is exact
only in a limit (Adamax and Adadelta as ``eps -> 0``, Rprop away from underflow of
``g_t·g_(t-1)``) the row is run in that limit and examples outside it are assumed
away, with the reason next to the check; ASGD's ``ax``, a function of the iterates,
is compared with ASGD's average of the embedded iterates.

Tolerances of the gradient and state comparisons: ``RTOL[dtype] · κ`` times the largest
entry of the same quantity over the whole network (one scale per quantity, so that an
entry that is small by cancellation is not held to its own size), where ``κ`` is the
embedding's amplification (:func:`amplification`: 1 for shares of one sign, up to ~10^3
for signed 3-layer splits). Both sides are computed in the same dtype and differ only by
rounding, which grows with ``κ``. ``RTOL`` is ``1e-10`` (~10^6 u) in float64 and ``1e-3``
(~10^4 u) in float32. The largest errors seen, in units of ``u · κ · scale``: at most
2^4 in CI (``--hypothesis-show-statistics`` prints them as events), and 165 in a
search steered towards large errors over 10x the examples (``pytest
tests/test_properties.py -k "gradients_map or optimizer_state"
--hypothesis-profile=torch_embed-explore --hypothesis-show-statistics``, one run; it
is randomized), so the margin is over 100x in float32 and 5000x in float64, while a
structural error (a wrong index, scale or sign) is of order 1. The output check needs
no tolerance of its own: it uses the rigorous bound (largest error seen: 0.22 of it,
in an exploring run of the output test).
"""

from __future__ import annotations

import copy
import itertools
import math
import warnings
from collections.abc import Callable

import pytest
import torch
from cases import (
    ACTIVATION_NAMES,
    CONTINUOUS_ACTIVATIONS,
    Arch,
    archs,
    build_mlp,
    random_inputs,
)
from hypothesis import assume, event, given, settings, target
from hypothesis import strategies as st
from strategies import (
    CRIT,
    DEAD_UNIT,
    FAMILIES,
    LOSSES,
    NONE,
    OPTIMIZERS,
    OptimizerRow,
    Widening,
    optimizer_kwargs,
    supported_rows,
    widenings,
)
from torch import Tensor, nn
from torch.func import functional_call

from torch_embed import (
    SUPPORTED_OPTIMIZERS,
    ApproximateStateWarning,
    Null,
    Split,
    forward_error_bound,
    unit_roundoff,
    widen,
)
from torch_embed.embedding import Embedding
from torch_embed.widen import embed_

pytestmark = pytest.mark.usefixtures("single_thread_module")

F64 = torch.float64
F32 = torch.float32
RTOL = {F64: 1e-10, F32: 1e-3}  # of the largest entry of the same quantity; see the docstring
SCALAR_DTYPE = F64 if torch.get_default_dtype() == F64 else F32  # torch.optim's step, mu, ...
GRAD_DTYPES = st.sampled_from((F64, F64, F64, F32))  # gradient and state checks: 1/4 float32
# Every accepted activation but Tanhshrink, x - tanh(x): its derivative tanh(x)² is
# computed as 1 - (1 - tanh(x)²) with an absolute error of u, so near 0, where it and
# hence every gradient behind it is small, no gradient has relative accuracy (found by
# the exploring profile: 6e-9 of the scale). The output check keeps it (rigorous bound).
GRAD_ACTIVATIONS = tuple(a for a in ACTIVATION_NAMES if a != "Tanhshrink")


def examples(n: int) -> int:
    """``n`` examples at the profile's default of 100 ``max_examples``, scaled with it."""
    return max(1, n * settings.default.max_examples // 100)


def _widen(net: nn.Module, w: Widening, seed: int, **kwargs: object) -> Embedding:
    """``widen`` with the drawn scheme; the dead-unit warning must come exactly when due."""
    g = torch.Generator().manual_seed(seed)
    if w.dead_unit_warning:
        with pytest.warns(UserWarning, match=DEAD_UNIT):
            return widen(net, w.new_widths, w.scheme, generator=g, **kwargs)  # type: ignore[arg-type]
    return widen(net, w.new_widths, w.scheme, generator=g, **kwargs)  # type: ignore[arg-type]


def _data(net: nn.Module, arch, seed: int, n: int = 8) -> tuple[Tensor, Tensor]:
    dtype = next(net.parameters()).dtype
    x = random_inputs(arch, n, seed=seed + 1, dtype=dtype)
    y = torch.randn(n, arch.out_features, generator=torch.Generator().manual_seed(seed + 2))
    return x, y.to(dtype)


def _check_kind(emb: Embedding, w: Widening) -> None:
    event(f"family={w.family} kind={emb.kind.value}")
    if w.kind is not None:
        assert emb.kind is w.kind, (emb.kind, w.kind, emb.reasons)
    if emb.kind is not CRIT:
        assert emb.reasons, "a non-critical embedding must say why"


# ----------------------------------------------------------------------------- output
DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@settings(max_examples=examples(25))
@given(data=st.data())
def test_output_preserved_within_the_rounding_bound(dtype: torch.dtype, family: str, data) -> None:
    """Critical and output-preserving widenings keep every output within the bound."""
    arch = data.draw(archs(activations=CONTINUOUS_ACTIVATIONS), label="arch")
    w = data.draw(widenings(arch, families=[family]), label="widening")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    net = build_mlp(arch, seed=seed, dtype=dtype)
    x, _ = _data(net, arch, seed)
    wide = copy.deepcopy(net)
    emb = _widen(wide, w, seed)
    if dtype in (torch.float64, torch.float32):
        _check_kind(emb, w)
    else:  # σ(β) of a null neuron may round to 0 in a half type: then it is critical
        event(f"family={w.family} kind={emb.kind.value}")
        assert (emb.kind is NONE) == (w.kind is NONE), (emb.kind, w.kind, emb.reasons)
    assert wide[0].weight.dtype == dtype
    if emb.kind is NONE:
        return
    with torch.no_grad():
        diff = (wide(x).double() - net(x).double()).abs()
    bound = forward_error_bound(net, x) + forward_error_bound(wide, x)
    bad = diff > bound
    _report(float((diff / bound.clamp(min=1e-300)).max()), f"error / bound, {dtype}")
    assert not bool(bad.any()), (
        f"{int(bad.sum())} outputs off; worst {float((diff - bound).max()):.3e} over the bound"
    )


# ----------------------------------------------------------------------------- gradients
def _wide_autograd(
    module: nn.Module,
    state: dict[str, Tensor],
    loss: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    y: Tensor,
) -> dict[str, Tensor]:
    """Autograd gradient of ``loss(module(x), y)`` at the parameters in ``state``."""
    names = [n for n, _ in module.named_parameters()]
    params = {n: state[n].detach().clone().requires_grad_(True) for n in names}
    rest = {k: v for k, v in state.items() if k not in params}
    out = functional_call(module, {**params, **rest}, (x,))
    grads = torch.autograd.grad(loss(out, y), list(params.values()), allow_unused=True)
    return {n: g if g is not None else torch.zeros_like(params[n]) for n, g in zip(names, grads)}


def _scale(tensors: dict[str, Tensor]) -> float:
    return max((float(t.abs().max()) for t in tensors.values() if t.numel()), default=0.0)


def amplification(emb: Embedding) -> float:
    """``κ``: the product over hidden layers of the largest ``Σ |coefficient|`` of the
    copies of one neuron (per row of the next layer for matrix coefficients).

    A split with shares ``α, 1 - α`` sums terms of size ``|α| + |1 - α|`` that cancel to
    the narrow term, so rounding errors grow by that factor per layer (the |W|·|h| terms
    of forward_error_bound); ``κ = 1`` for shares of one sign.
    """
    kappa = 1.0
    for l, lm in enumerate(emb.layers):
        valid = lm.source >= 0
        m = emb.narrow_widths[l + 1]
        c = lm.coef.abs()
        if lm.is_vector:
            sums = torch.zeros(m, dtype=F64).index_add_(0, lm.source[valid], c[valid])
        else:
            sums = torch.zeros(c.shape[0], m, dtype=F64).index_add_(
                1, lm.source[valid], c[:, valid]
            )
        kappa *= max(1.0, float(sums.max())) if sums.numel() else 1.0
    return kappa


def _assert_close(
    mine: dict[str, Tensor], ref: dict[str, Tensor], what: str, kappa: float = 1.0
) -> float:
    """``|mine - ref| <= RTOL[dtype] * κ * max|ref|`` per tensor; return the worst error
    in units of ``u * κ * max|ref|``."""
    if not ref:
        return 0.0
    dtypes = {t.dtype for t in ref.values()}
    assert len(dtypes) == 1, dtypes
    dtype = dtypes.pop()
    scale = _scale(ref)
    worst = 0.0
    for name, r in ref.items():
        m = mine[name]
        assert m.shape == r.shape and m.dtype == r.dtype, (what, name, m.shape, r.shape)
        err = float((m - r).abs().max()) if r.numel() else 0.0
        tol = RTOL[dtype] * kappa * scale
        assert err <= tol, f"{what} {name}: off by {err:.3e} > {tol:.3e} (κ = {kappa:.3g})"
        worst = max(worst, err / scale if scale else 0.0)
    return worst / (unit_roundoff(dtype) * kappa)


def _report(value: float, label: str) -> None:
    """Record an error ratio: steer hypothesis towards large ones when exploring.

    ``target()`` makes the next examples depend on the scores, and so on the rounding
    of the CPU; the derandomized CI profile must run the same examples everywhere, so
    there the ratio is only recorded as a power-of-two bucket in the statistics.
    """
    if not settings.default.derandomize:
        target(value, label=label)
    elif value > 0:
        event(f"{label} <= 2^{math.ceil(math.log2(value))}")


PRESERVING = [f for f in FAMILIES if f != "random_pad"]


@pytest.mark.parametrize("family", PRESERVING)
@settings(max_examples=examples(60))
@given(data=st.data())
def test_gradients_map_to_the_wide_autograd_gradient(family: str, data) -> None:
    """For a critical embedding, ∇R_wide(Aθ + c) = B ∇R_narrow(θ), checked by autograd."""
    arch = data.draw(archs(activations=GRAD_ACTIVATIONS), label="arch")
    w = data.draw(widenings(arch, families=[family]), label="widening")
    loss_name = data.draw(st.sampled_from(sorted(LOSSES)), label="loss")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    dtype = data.draw(GRAD_DTYPES, label="dtype")
    event(f"dtype={dtype}")
    loss = LOSSES[loss_name]
    net = build_mlp(arch, seed=seed, dtype=dtype)
    x, y = _data(net, arch, seed)
    narrow = _wide_autograd(net, dict(net.state_dict()), loss, x, y)
    wide = copy.deepcopy(net)
    if w.kind is CRIT:  # widen maps .grad too: give it one to map
        for name, p in wide.named_parameters():
            p.grad = narrow[name].clone()
    emb = _widen(wide, w, seed)
    _check_kind(emb, w)
    if emb.kind is not CRIT:
        return
    event(f"loss={loss_name}")
    brute = _wide_autograd(wide, dict(wide.state_dict()), loss, x, y)
    mapped = emb.map_gradients(narrow)
    assert mapped.keys() == brute.keys()
    kappa = amplification(emb)
    worst = _assert_close(mapped, brute, "map_gradients", kappa)
    if w.kind is CRIT:
        installed = {n: p.grad for n, p in wide.named_parameters()}
        assert all(g is not None for g in installed.values())
        worst = max(worst, _assert_close(installed, brute, ".grad after widen", kappa))  # type: ignore[arg-type]
    _report(worst, f"error / (u * κ * scale), {dtype}")


# ----------------------------------------------------------------------------- optimizer state
def test_every_supported_optimizer_has_a_row() -> None:
    """Supporting an optimizer in the library needs its line in strategies.OPTIMIZERS."""
    covered = {row.cls for row in OPTIMIZERS}
    missing = [cls.__name__ for cls in SUPPORTED_OPTIMIZERS if cls not in covered]
    assert not missing, f"add a row to tests/strategies.py OPTIMIZERS for {missing}"
    assert {row.name for row in supported_rows()} >= {
        "sgd_momentum",
        "sgd_nesterov",
        "adam",
        "adamw",
        "rmsprop",
        "adagrad",
    }


@pytest.mark.parametrize(("default", "in_group"), [(0.0, 0.3), (0.3, 0.0)])
def test_adagrad_sum_with_a_group_initial_accumulator_value(
    default: float, in_group: float
) -> None:
    """Found by the property test below (a minimal reproducer of what it shrank to).

    torch.optim.Adagrad starts every group's ``sum`` at the constructor's
    ``initial_accumulator_value`` (``optimizer.defaults``), not at a param group's own
    entry. One step on a fresh optimizer fed ``B g`` gives ``v0 + (s g)²`` in a fan-in
    row with error scaling ``s`` (here ``1 - α`` and ``α``), ``v0`` the constructor's.
    """
    net = nn.Sequential(nn.Linear(1, 1), nn.Tanh(), nn.Linear(1, 1)).double()
    x = torch.randn(4, 1, generator=torch.Generator().manual_seed(0), dtype=F64)
    rest = [net[0].bias, net[2].weight, net[2].bias]
    opt = torch.optim.Adagrad(
        [{"params": [net[0].weight], "initial_accumulator_value": in_group}, {"params": rest}],
        lr=0.1,
        initial_accumulator_value=default,
    )
    assert float(opt.state[net[0].weight]["sum"].max()) == default  # torch's behaviour
    net(x).pow(2).sum().backward()
    opt.step()
    g2 = opt.state[net[0].weight]["sum"] - default  # the squared gradient, (1, 1)
    widen(net, [2], Split(alpha=0.25, select=[0]), optimizer=opt)
    expected = torch.cat([default + 0.75**2 * g2, default + 0.25**2 * g2])
    torch.testing.assert_close(opt.state[net[0].weight]["sum"], expected, rtol=1e-12, atol=0)


Groups = Callable[[list[tuple[str, nn.Parameter]]], torch.optim.Optimizer]


def _train(
    net: nn.Module,
    make: Groups,
    loss: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    steps: int,
) -> tuple[torch.optim.Optimizer, list[dict[str, Tensor]]]:
    """``steps`` optimizer steps on ``net``; return the optimizer and the iterates θ_t."""
    opt = make(list(net.named_parameters()))
    iterates = []
    for _ in range(steps):
        iterates.append({k: v.detach().clone() for k, v in net.state_dict().items()})
        opt.zero_grad()
        loss(net(x), y).backward()
        opt.step()
    return opt, iterates


def _replay(
    initial: nn.Module,
    emb: Embedding,
    make: Groups,
    iterates: list[dict[str, Tensor]],
    loss: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    seen: list[dict[str, Tensor]] | None = None,
) -> tuple[dict[str, dict[str, object]], dict[str, Tensor]]:
    """The reference state (THEORY §8), by name, and the last gradient fed (every
    gradient fed is appended to ``seen``, if given).

    A fresh optimizer on a wide network is stepped with the wide network's own autograd
    gradients at the embedded iterates ``A θ_t + c``: for a critical embedding these are
    the mapped gradients ``B g_t`` (checked by the gradient property above), and no map
    of the library's is used to compute them.
    """
    wide = copy.deepcopy(initial)
    with warnings.catch_warnings():  # the dead-unit warning, checked where widen ran
        warnings.filterwarnings("ignore", message=f".*{DEAD_UNIT}", category=UserWarning)
        embed_(wide, emb)
    named = list(wide.named_parameters())
    opt = make(named)
    grads: dict[str, Tensor] = {}
    for theta in iterates:
        grads = _wide_autograd(wide, emb.apply(theta), loss, x, y)
        if seen is not None:
            seen.append(grads)
        for name, p in named:
            p.grad = grads[name]
        opt.step()
    return {n: opt.state[p] for n, p in named if p in opt.state}, grads


def _assert_state_equal(
    opt: torch.optim.Optimizer,
    net: nn.Module,
    ref: dict[str, dict[str, object]],
    kappa: float = 1.0,
) -> float:
    """Compare the states by name (see :func:`_assert_close`); return the worst error."""
    worst = 0.0
    mine = {n: opt.state[p] for n, p in net.named_parameters() if p in opt.state}
    assert mine.keys() == ref.keys()
    for key in {k for state in ref.values() for k in state}:
        assert all(key in state for state in mine.values()), key
        ref_k = {n: s[key] for n, s in ref.items() if torch.is_tensor(s.get(key))}
        mine_k = {n: mine[n][key] for n in ref_k}
        if key == "step":  # a counter: kept, not mapped
            assert all(torch.equal(mine_k[n], ref_k[n]) for n in ref_k), key  # type: ignore[arg-type]
        else:
            worst = max(worst, _assert_close(mine_k, ref_k, f"state '{key}'", kappa))  # type: ignore[arg-type]
        for n, s in ref.items():
            if key in s and not torch.is_tensor(s[key]):
                assert mine[n][key] == s[key], (n, key)
    return worst


def _products_near_underflow(grads: list[dict[str, Tensor]], dtype: torch.dtype) -> bool:
    """Whether some product ``g_t·g_(t-1)`` of non-zero gradients is near ``dtype``'s underflow.

    Rprop's step size follows the sign of that product as computed in ``dtype``; the
    state map relies on ``sign(s² g_t g_(t-1)) = sign(g_t g_(t-1))``, true in real
    arithmetic, but a product that underflows to 0 has sign 0 (the step size then stays
    put instead of growing by ``etaplus``). Split shares as small as ``1e-38`` (drawn by
    hypothesis) make the wide product underflow where the narrow one does not (or, for
    ``|s| > 1``, the reverse: hence the margin of ``2^10`` over the smallest normal).
    """
    tiny = 2.0**10 * torch.finfo(dtype).tiny
    for prev, cur in itertools.pairwise(grads):
        for name, g in cur.items():
            a, b = g.to(F64), prev[name].to(F64)
            product = (a * b).abs()
            if bool(((product < tiny) & (a != 0) & (b != 0)).any()):
                return True
    return False


def _adadelta_eps_not_negligible(grads: list[dict[str, Tensor]], kwargs: dict) -> bool:
    """Whether Adadelta's ``eps`` may not be negligible next to some ``square_avg``.

    Copying ``acc_delta`` is exact only in the limit ``eps << s²·square_avg`` at every
    past step (optim_state.py); ``square_avg_t >= (1 - rho)·g_t²``, so every non-zero
    wide gradient with ``(1 - rho)·g_t² >= 1e12·eps`` makes the relative effect of
    ``eps`` at most 1e-12, far below ``RTOL``. Shares as small as ``1e-66`` (drawn by
    hypothesis) break it: outside the limit, test_optim_state.py checks the warning.
    """
    floor = 1e12 * float(kwargs["eps"]) / (1.0 - float(kwargs["rho"]))
    return any(
        bool(((g.to(F64) ** 2 < floor) & (g != 0)).any()) for step in grads for g in step.values()
    )


def _asgd_average_of_embedded_iterates(
    ref: dict[str, dict[str, object]],
    t0: dict[str, float],
    emb: Embedding,
    after_steps: list[dict[str, Tensor]],
) -> None:
    """Replace the replay's ``ax`` by ASGD's average of the embedded narrow iterates.

    ``ax`` is not a function of the gradients but of the iterates: ASGD averages the
    parameters after each step. The replay's own parameters are not the embedded
    iterates ``A θ_t + c`` (it steps by ``B g_t``, not ``A g_t``, and decays ``c`` by
    ``lambd``), while the widened network sits at ``A θ_k + c``; so the reference is
    ASGD's recursion (torch/optim/asgd.py: ``ax <- ax + μ (θ - ax)``, a copy while
    ``μ = 1``, then ``μ = 1 / max(1, t - t0)``) run on ``A θ_t + c``, the embedded
    parameters after each narrow step (``emb.apply``, checked by the output test).
    """
    if not after_steps:
        return
    wide = [emb.apply(theta) for theta in after_steps]
    for name, state in ref.items():
        ax = wide[0][name].clone()
        for t, theta in enumerate(wide[1:], start=1):
            # torch keeps mu in a tensor of the default scalar dtype (float32 unless the
            # default dtype is float64) and multiplies by that rounded value
            mu = float(torch.tensor(1.0 / max(1.0, t - t0[name]), dtype=SCALAR_DTYPE))
            ax = theta[name].clone() if mu == 1 else ax + mu * (theta[name] - ax)
        state["ax"] = ax


def _two_groups(cls: type[torch.optim.Optimizer], cut: int, first: dict, second: dict) -> Groups:
    """The parameters before ``cut`` with the constructor's arguments, the rest with overrides."""
    override = {k: v for k, v in second.items() if first.get(k) != v}

    def make(named: list[tuple[str, nn.Parameter]]) -> torch.optim.Optimizer:
        groups = [{"params": [p for _, p in named[:cut]]}]
        groups.append({"params": [p for _, p in named[cut:]], **override})
        return cls([g for g in groups if g["params"]], **first)

    return make


@pytest.mark.parametrize("family", PRESERVING)
@pytest.mark.parametrize("row", supported_rows(), ids=lambda r: r.name)
@settings(max_examples=examples(10))
@given(data=st.data())
def test_optimizer_state_equals_a_replay_with_wide_gradients(
    row: OptimizerRow, family: str, data
) -> None:
    """widen(..., optimizer=) leaves the state a wide optimizer fed B g_t would hold."""
    arch = data.draw(archs(activations=GRAD_ACTIVATIONS), label="arch")
    w = data.draw(widenings(arch, families=[family], critical_only=True), label="widening")
    assume(w.kind is CRIT)  # null neurons with σ(β) != 0 before a bias-free Linear
    first, second = data.draw(optimizer_kwargs(row), label="optimizer kwargs (two groups)")
    steps = data.draw(st.integers(0, 4), label="steps")  # 0: state made by the constructor
    loss_name = data.draw(st.sampled_from(sorted(LOSSES)), label="loss")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    dtype = data.draw(GRAD_DTYPES, label="dtype")
    event(f"dtype={dtype}")
    loss = LOSSES[loss_name]
    net = build_mlp(arch, seed=seed, dtype=dtype)
    x, y = _data(net, arch, seed)
    cut = data.draw(st.integers(0, len(list(net.parameters()))), label="group_cut")
    make = _two_groups(row.cls, cut, first, second)
    initial = copy.deepcopy(net)
    opt, iterates = _train(net, make, loss, x, y, steps)
    final = {k: v.detach().clone() for k, v in net.state_dict().items()}
    params = list(net.parameters())
    with warnings.catch_warnings(record=True) as caught:
        if row.approximate is not None:  # exact in the limit the row's arguments take
            warnings.filterwarnings(
                "always", message=f".*{row.approximate}", category=ApproximateStateWarning
            )
        emb = _widen(net, w, seed, optimizer=opt)
    assert all(
        issubclass(c.category, ApproximateStateWarning) and row.approximate in str(c.message)
        for c in caught
        if row.approximate is not None
    ), [str(c.message) for c in caught]
    _check_kind(emb, w)
    assert all(p is q for p, q in zip(net.parameters(), params)), "parameter identity"
    if w.family == "null" or w.family == "general":
        # a trained PReLU slope changes σ(β) along the iterates: B (with today's σ(β)) is
        # not the wide gradient map at past iterates, so no replay matches (a limitation)
        trained_activation = steps > 0 and any(isinstance(m, nn.PReLU) for m in net.modules())
        assume(not (trained_activation and any(bool(lm.null_mask.any()) for lm in emb.layers)))
    fed: list[dict[str, Tensor]] = []
    ref, last_grads = _replay(initial, emb, make, iterates, loss, x, y, fed)
    if row.cls is torch.optim.Rprop:
        assume(not _products_near_underflow(fed, dtype))
    if row.cls is torch.optim.Adadelta:
        assume(not _adadelta_eps_not_negligible(fed, first))
    if row.cls is torch.optim.ASGD:
        t0 = {
            n: float(g["t0"])
            for g in opt.param_groups
            for n, p in net.named_parameters()
            if any(p is q for q in g["params"])
        }
        after = [*iterates[1:], final] if steps else []
        _asgd_average_of_embedded_iterates(ref, t0, emb, after)
    kappa = amplification(emb)
    worst = _assert_state_equal(opt, net, ref, kappa)
    # the .grad widen mapped is the last narrow gradient, taken at the last iterate
    grads = {n: p.grad for n, p in net.named_parameters()}
    worst = max(worst, _assert_close(grads, last_grads, ".grad", kappa))  # type: ignore[arg-type]
    _report(worst, f"error / (u * κ * scale), {dtype}")


@pytest.mark.parametrize(
    ("make", "differs"),
    [
        (lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9), {"dampening": 0.5}),
        (lambda g: torch.optim.Adam(g, lr=0.01), {"betas": (0.5, 0.9)}),
        # Rprop's lr is its initial step_size: state (found as the rprop-null row)
        (lambda g: torch.optim.Rprop(g, lr=0.01), {"lr": 0.0}),
        (lambda g: torch.optim.Adamax(g, lr=0.01, eps=0.0), {"betas": (0.9, 0.9)}),
    ],
    ids=["sgd_dampening", "adam_betas", "rprop_lr", "adamax_betas"],
)
def test_null_fan_out_state_when_the_next_bias_has_other_hyperparameters(make, differs) -> None:
    """Found by the property test when groups could differ in any hyperparameter.

    A null neuron's fan-out column has the gradient ``σ(β)·∂R/∂b`` of the next layer's
    bias, so its state is derived from the bias's state. That is exact only when both
    evolve under the same state hyperparameters; with the bias in a param group with
    another momentum/dampening/betas it is not, and no map of the current states can be
    (the history is gone). widen must refuse or warn, not map silently: with neither,
    the state must equal the replay.
    """
    net = build_mlp(Arch(2, (2,), 1), seed=0)
    x, y = _data(net, Arch(2, (2,), 1), 0)

    def groups(named: list[tuple[str, nn.Parameter]]) -> torch.optim.Optimizer:
        bias = [p for n, p in named if n == "2.bias"]
        rest = [p for n, p in named if n != "2.bias"]
        return make([{"params": rest}, {"params": bias, **differs}])

    initial = copy.deepcopy(net)
    opt, iterates = _train(net, groups, LOSSES["mse"], x, y, 3)
    before_params = copy.deepcopy(net.state_dict())
    before_state = copy.deepcopy(opt.state_dict())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            emb = widen(net, [3], Null(bias=1.0), optimizer=opt)
        except (TypeError, ValueError) as err:
            # refused: name both parameters and the groups; nothing changed
            assert "group" in str(err) and "'2.weight'" in str(err), err
            assert "'2.bias'" in str(err), err
            after = net.state_dict()
            assert all(torch.equal(after[k], v) for k, v in before_params.items())
            state = opt.state_dict()["state"]
            for i, s in before_state["state"].items():
                assert all(
                    torch.equal(state[i][k], v) if torch.is_tensor(v) else state[i][k] == v
                    for k, v in s.items()
                )
            return
    if caught:  # warned: must say the state is approximate
        assert any("approximate" in str(w.message) for w in caught), [
            str(w.message) for w in caught
        ]
        return
    assert emb.kind is CRIT
    ref, _ = _replay(initial, emb, groups, iterates, LOSSES["mse"], x, y)
    _assert_state_equal(opt, net, ref)
