"""The structured inertia change against brute force: full float64 eigen-solves of the
narrow and the wide Hessian (``torch.autograd.functional.hessian`` + ``eigvalsh``).

``after = before + inertia_change`` must hold EXACTLY in counts, for every critical
scheme, at random points and at polished critical points.
"""

from __future__ import annotations

import copy
import itertools
import math
import re

import pytest
import torch
from cases import (
    F64,
    brute_gradient,
    brute_hessian,
    counts,
    critical_matrix_general,
    randn_data,
    randn_mlp,
)
from tol_reference import reference_rule
from torch import nn
from torch.func import functional_call

from torch_embed.critical import critical_point
from torch_embed.inertia import default_tolerance, hessian_inertia
from torch_embed.inertia_change import complement_blocks, inertia_change, step_blocks
from torch_embed.schemes import General, Net2Net, Null, Split, plan
from torch_embed.widen import embed_, widen

pytestmark = pytest.mark.usefixtures("single_thread_module")


# --------------------------------------------------------------------------- brute force
def brute(model, loss_fn, x, y):
    """(eigenvalues of the dense Hessian, gradient norm)."""
    H = brute_hessian(model, loss_fn, x, y)
    g = brute_gradient(model, loss_fn, x, y)
    return torch.linalg.eigvalsh(H), float(g.norm())


def assert_clean(ev, tol, what):
    """No eigenvalue in (tol/5, 1e3·tol): the brute-force counts are unambiguous.

    Structural zeros sit at ~eps·max|λ| (n times below tol = n·eps·max|λ|) or, near a
    critical point, below the clear gap the default tolerance moves into.
    """
    near = ev.abs()[(ev.abs() > tol / 5) & (ev.abs() < tol * 1e3)]
    assert near.numel() == 0, f"{what}: eigenvalues {near.tolist()} too close to tol={tol:.2g}"


def check(narrow, wide, emb, loss_fn, x, y, *, method="auto", tol=None):
    """Assert after == before + change exactly; return (before, after) counts."""
    ev_n, _ = brute(narrow, loss_fn, x, y)
    ev_w, g_w = brute(wide, loss_fn, x, y)
    if tol is None:  # the default rule of the full wide count (docs/guide/inertia.md)
        tol = reference_rule(ev_w, g_w)[0]
    assert_clean(ev_n, tol, "narrow")
    assert_clean(ev_w, tol, "wide")
    before, after = counts(ev_n, tol), counts(ev_w, tol)
    change = inertia_change(emb, wide, loss_fn, x, y, tol=tol, method=method)
    assert tuple(a + b for a, b in zip(before, change)) == after, (before, tuple(change), after)
    assert change.tol == tol
    return before, after


def widened(net, widths, scheme, seed=3):
    wide = copy.deepcopy(net)
    emb = widen(wide, widths, scheme, generator=torch.Generator().manual_seed(seed))
    return wide, emb


SCHEMES = {
    "split-half": Split(alpha=0.5),
    "split-0.3": Split(alpha=0.3),
    "split-1.7": Split(alpha=1.7),
    "split-neg": Split(alpha=-0.4),
    "split-3way": Split(alpha=[0.2, 0.3, 0.5]),
    "split-signed-3way": Split(alpha=[1.5, -0.2, -0.3]),
    "null": Null(bias=0.3),
    "net2net": Net2Net(),
}


def general_vector(net):
    # layer 0: 4 -> 7 (neuron 1 three ways, neuron 3 twice, one null);
    # layer 1: 3 -> 4 (neuron 0 twice, signed)
    src0 = [0, 1, 2, 3, 1, 1, -1, 3]
    coef0 = [1.0, 0.5, 1.0, 2.0, 0.25, 0.25, 0.0, -1.0]
    src1 = [0, 1, 2, 0]
    coef1 = [1.5, 1.0, 1.0, -0.5]
    return General([src0, src1], [coef0, coef1], null_bias=0.2)


# --------------------------------------------------------------------------- random points
@pytest.mark.parametrize(
    ("scheme", "act"), [(s, ["tanh", "sigmoid", "softplus"][i % 3]) for i, s in enumerate(SCHEMES)]
)
def test_change_equals_brute_force_at_random_points(scheme, act):
    widths = (3, 4, 3, 2)
    net = randn_mlp(widths, act, seed=5)
    x, y = randn_data(widths)
    wide, emb = widened(net, [6, 5] if "3way" not in scheme else [6, 3], SCHEMES[scheme])
    assert emb.is_critical
    check(net, wide, emb, nn.MSELoss(), x, y)


@pytest.mark.parametrize("act", ["softplus"])
def test_general_vector_and_chained_at_random_points(act):
    widths = (2, 4, 3, 2)
    net = randn_mlp(widths, act, seed=8)
    x, y = randn_data(widths)
    loss = nn.MSELoss()
    wide = copy.deepcopy(net)
    emb = plan(wide, None, general_vector(net))
    embed_(wide, emb)
    assert emb.is_critical and emb.layers[0].null_mask.any()
    check(net, wide, emb, loss, x, y)
    # chain: widen the widened net again (splitting copies and nulls), compose
    wider = copy.deepcopy(wide)
    emb2 = widen(wider, [9, 6], Split(alpha=[0.7, 0.3], select="random"), generator=None)
    composed = emb.then(emb2)
    check(net, wider, composed, loss, x, y)
    check(wide, wider, emb2, loss, x, y)


# --------------------------------------------------------------------------- critical points
def critical_targets(net, x, residual, seed=0):
    """Targets that make the net's CURRENT parameters an exact critical point of the MSE.

    ∇R = (2/(N·out)) Jᵀ r with r = f(x) - y: choosing the residual r in ker Jᵀ (possible
    when N·out > P) makes ∇R = 0 up to rounding, with residuals of RMS ``residual`` (so
    the residual-weighted part of the Hessian, S, is not trivial).
    """
    params = {n: p.detach() for n, p in net.named_parameters()}
    jac = torch.func.jacrev(lambda ps: functional_call(net, ps, (x,)))(params)
    J = torch.cat([j.reshape(j.shape[0] * j.shape[1], -1) for j in jac.values()], 1)
    assert J.shape[0] > J.shape[1], "need more residuals than parameters"
    z = torch.randn(J.shape[0], generator=torch.Generator().manual_seed(seed), dtype=F64)
    q, _ = torch.linalg.qr(J)
    r = z - q @ (q.T @ z)
    r = r * residual * math.sqrt(r.numel()) / r.norm()
    with torch.no_grad():
        return net(x) - r.view(x.shape[0], -1)


def critical_problem(widths, act, residual, seed=3):
    net = randn_mlp(widths, act, seed=seed)
    x = torch.randn(40, widths[0], generator=torch.Generator().manual_seed(4), dtype=F64)
    y = critical_targets(net, x, residual)
    _, gnorm = brute(net, nn.MSELoss(), x, y)
    assert gnorm <= 1e-11
    return net, x, y


CRITICAL_SCHEMES = ["split-half", "split-1.7", "split-neg", "null", "net2net"]


@pytest.mark.parametrize(
    ("act", "widths", "residual"),
    [
        ("tanh", (2, 3, 3, 2), 0.5),
        ("sigmoid", (2, 3, 3, 2), 0.1),
        ("softplus", (2, 3, 2), 0.5),
    ],
)
def test_change_equals_brute_force_at_critical_points_and_never_decreases(act, widths, residual):
    net, x, y = critical_problem(widths, act, residual)
    new = [5, 4][: len(widths) - 2]
    for name in CRITICAL_SCHEMES:
        wide, emb = widened(net, new, SCHEMES[name])
        before, after = check(net, wide, emb, nn.MSELoss(), x, y)
        # irreversibility (JML Thm 6.2): no count decreases
        assert all(a >= b for a, b in zip(after, before)), (name, before, after)
    wide, emb = widened(net, [5, 5][: len(widths) - 2], Split(alpha=[0.2, 0.3, 0.5]))
    before, after = check(net, wide, emb, nn.MSELoss(), x, y)
    assert all(a >= b for a, b in zip(after, before))


def test_general_chained_and_matrix_at_a_critical_point():
    widths = (2, 4, 3, 2)
    net, x, y = critical_problem(widths, "tanh", 0.3, seed=6)
    loss = nn.MSELoss()
    wide = copy.deepcopy(net)
    emb = plan(wide, None, general_vector(net))
    embed_(wide, emb)
    before, after = check(net, wide, emb, loss, x, y)
    assert all(a >= b for a, b in zip(after, before))
    wider = copy.deepcopy(wide)
    emb2 = widen(wider, [9, 5], Split(alpha=1.5), generator=torch.Generator().manual_seed(0))
    b2, a2 = check(net, wider, emb.then(emb2), loss, x, y)
    assert b2 == before and all(a >= b for a, b in zip(a2, after))
    matrix = copy.deepcopy(net)
    emb3 = critical_matrix_general(net, torch.Generator().manual_seed(1))
    embed_(matrix, emb3)
    before, after = check(net, matrix, emb3, loss, x, y)
    assert all(a >= b for a, b in zip(after, before))


def test_default_tolerance_estimate_agrees_with_brute_force():
    net, x, y = critical_problem((2, 3, 3, 2), "tanh", 0.5)
    wide, emb = widened(net, [5, 4], Split(alpha=0.5))
    ev_n, _ = brute(net, nn.MSELoss(), x, y)
    ev_w, g_w = brute(wide, nn.MSELoss(), x, y)
    tol = reference_rule(ev_w, g_w)[0]
    change = inertia_change(emb, wide, nn.MSELoss(), x, y)  # tol estimated by HVPs
    assert change.tol == pytest.approx(tol, rel=0.5)
    assert tuple(a + b for a, b in zip(counts(ev_n, tol), change)) == counts(ev_w, tol)
    assert not change.ambiguous


def test_at_a_point_polished_by_critical_point():
    # teacher-student: a sigmoid teacher plus noise; critical_point polishes the teacher's
    # parameters to the nearby critical point of the noisy data
    widths = (2, 3, 2)
    net = randn_mlp(widths, "sigmoid", seed=0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20, 2, generator=g, dtype=F64)
    with torch.no_grad():
        y = net(x) + 0.3 * torch.randn(20, 2, generator=g, dtype=F64)
    result = critical_point(net, nn.MSELoss(), x, y)
    assert result.converged and result.grad_norm <= 1e-11
    for name in ["split-half", "split-neg", "null"]:
        wide, emb = widened(net, [5], SCHEMES[name])
        before, after = check(net, wide, emb, nn.MSELoss(), x, y)
        assert all(a >= b for a, b in zip(after, before))


# Fig. 3(a) of the NeurIPS 2021 paper: a width-2 tanh net with 1-D input at a critical
# point, split (equal split) to width 3 and then 4. Data: 50 points on [-15, 15], target
# a smooth three-step staircase. The parameters below are the local minimum reached from
# torch.manual_seed(0)'s default init of nn.Sequential(Linear(1, 2), Tanh, Linear(2, 1))
# by Adam (500 steps, lr 0.05), L-BFGS and Newton (all 8 seeds 0..7 tried reached this
# same minimum, loss 0.0035710); stored to full precision so that the test needs no
# training, and re-checked below (|∇R| and positive definiteness).
FIG3_PARAMS = {
    "0.weight": [[-1.3891994411276711], [0.21796318123881084]],
    "0.bias": [-7.0713022474371625, -0.42430498508944536],
    "2.weight": [[-0.24703078770217804, 0.7776137715824325]],
    "2.bias": [0.01646742760204125],
}


def test_fig3a_each_equal_split_adds_one_negative_and_one_zero():
    net = nn.Sequential(nn.Linear(1, 2), nn.Tanh(), nn.Linear(2, 1)).double()
    net.load_state_dict({k: torch.tensor(v, dtype=F64) for k, v in FIG3_PARAMS.items()})
    x = torch.linspace(-15, 15, 50, dtype=F64)[:, None]
    y = (torch.tanh(x + 5) + torch.tanh(x) + torch.tanh(x - 5)) / 3
    loss = nn.MSELoss()
    ev0, g0 = brute(net, loss, x, y)
    assert g0 <= 1e-13 and float(ev0.min()) > 1e-6  # a strict local minimum
    history = []
    current = net
    for width in (3, 4):
        wide = copy.deepcopy(current)
        emb = widen(wide, [width], Split(alpha=0.5, select=[0]))
        before, after = check(current, wide, emb, loss, x, y)
        history.append((before, after))
        current = wide
    (b1, a1), (b2, a2) = history
    assert b1 == (0, 0, 7)
    assert a1 == (1, 1, 8) and b2 == a1
    assert a2 == (2, 2, 9)  # negative 0 -> 1 -> 2, zero 0 -> 1 -> 2


def test_cross_entropy_multi_output():
    widths = (3, 4, 3)
    net = randn_mlp(widths, "softplus", seed=2)
    x, _ = randn_data(widths)
    y = torch.tensor([0, 1, 2, 1, 0, 2, 2, 1, 0, 0, 1, 2])
    wide, emb = widened(net, [7], Split(alpha=1.5))
    check(net, wide, emb, nn.CrossEntropyLoss(), x, y)


# --------------------------------------------------------------------------- HVP path
@pytest.mark.parametrize("scheme", ["split-0.3", "split-1.7", "null", "split-3way"])
def test_hvp_path_equals_closed_form(scheme):
    widths = (3, 4, 3, 2)
    net = randn_mlp(widths, "softplus", seed=12)
    x, y = randn_data(widths)
    wide, emb = widened(net, [6, 5] if scheme != "split-3way" else [6, 3], SCHEMES[scheme])
    closed = step_blocks(emb, wide, nn.MSELoss(), x, y, method="closed-form")
    hvp = step_blocks(emb, wide, nn.MSELoss(), x, y, method="hvp")
    assert [b.method for b in closed] == ["closed-form"] * len(closed)
    assert [b.method for b in hvp] == ["hvp"] * len(hvp)
    assert len(closed) == emb.num_new_neurons
    for a, b in zip(closed, hvp):
        assert (a.kind, a.layer, a.neuron) == (b.kind, b.layer, b.neuron)
        torch.testing.assert_close(a.matrix, b.matrix, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(a.norms, b.norms)
        assert torch.equal(b.matrix, b.matrix.T)  # exactly symmetric, as documented
    plain = complement_blocks(emb, wide, nn.MSELoss(), x, y)
    assert all(torch.equal(p, b.matrix) for p, b in zip(plain, closed))
    check(net, wide, emb, nn.MSELoss(), x, y, method="hvp")


def bn_net(seed=0):
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(
        nn.Linear(3, 4),
        nn.BatchNorm1d(4),
        nn.Tanh(),
        nn.Linear(4, 3),
        nn.Sigmoid(),
        nn.Linear(3, 2),
    ).double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=F64))
        net[1].running_mean.copy_(torch.randn(4, generator=g, dtype=F64))
        net[1].running_var.copy_(torch.rand(4, generator=g, dtype=F64) + 0.5)
    return net.eval()


@pytest.mark.parametrize("scheme", ["split-0.3", "split-1.7", "null"])
def test_batchnorm_hidden_layer_uses_hvp_and_matches_brute_force(scheme):
    net = bn_net()
    x, y = randn_data((3, 4, 3, 2))
    wide, emb = widened(net, [6, 4], SCHEMES[scheme])
    blocks = step_blocks(emb, wide, nn.MSELoss(), x, y)
    assert {(b.layer, b.method) for b in blocks} == {(0, "hvp"), (1, "closed-form")}
    assert all(b.matrix.shape[0] == 4 + 2 + 3 for b in blocks if b.layer == 0)  # row, b, γ, β
    check(net, wide, emb, nn.MSELoss(), x, y)
    with pytest.raises(ValueError, match="BatchNorm1d"):
        inertia_change(emb, wide, nn.MSELoss(), x, y, method="closed-form")


def test_matrix_coefficient_embedding_uses_ker_B_transpose():
    widths = (2, 3, 3, 2)
    net = randn_mlp(widths, "tanh", seed=14)
    x, y = randn_data(widths)
    wide = copy.deepcopy(net)
    emb = critical_matrix_general(net, torch.Generator().manual_seed(0))
    embed_(wide, emb)
    assert emb.is_critical and not emb.layers[0].is_vector
    (block,) = step_blocks(emb, wide, nn.MSELoss(), x, y)
    assert block.kind == "general"
    assert block.matrix.shape[0] == sum(p.numel() for p in wide.parameters()) - sum(
        p.numel() for p in net.parameters()
    )
    check(net, wide, emb, nn.MSELoss(), x, y)
    with pytest.raises(ValueError, match="closed form does not apply"):
        inertia_change(emb, wide, nn.MSELoss(), x, y, method="closed-form")


# --------------------------------------------------------------------------- refusals
def test_refusals():
    widths = (2, 3, 2)
    net = randn_mlp(widths, seed=1)
    x, y = randn_data(widths)
    loss = nn.MSELoss()
    wide, emb = widened(net, [5], Net2Net(noise=0.5))
    with pytest.raises(ValueError, match=r"only defined for critical embeddings.*output-pres"):
        inertia_change(emb, wide, loss, x, y)
    wide, emb = widened(net, [5], Split(alpha=0.5))
    with pytest.raises(ValueError, match="pass the widened model"):
        inertia_change(emb, net, loss, x, y)
    with pytest.raises(ValueError, match="method must be one of"):
        inertia_change(emb, wide, loss, x, y, method="eigh")  # type: ignore[arg-type]
    with torch.no_grad():
        wide[0].weight[3, 0] += 0.1  # moved off the embedded set
    with pytest.raises(ValueError, match=r"not at a point of this embedding: parameter '0\.w"):
        inertia_change(emb, wide, loss, x, y)


def test_identity_embedding_changes_nothing():
    widths = (2, 3, 2)
    net = randn_mlp(widths, seed=1)
    x, y = randn_data(widths)
    emb = plan(net, [3], Split())
    change = inertia_change(emb, net, nn.MSELoss(), x, y, tol=1e-9)
    assert change.as_tuple() == (0, 0, 0) and change.tol == 1e-9


def test_embedding_method_delegates():
    widths = (2, 3, 2)
    net = randn_mlp(widths, seed=1)
    x, y = randn_data(widths)
    wide, emb = widened(net, [5], Null(bias=-0.5))
    a = emb.inertia_change(wide, nn.MSELoss(), x, y, tol=1e-10)
    b = inertia_change(emb, wide, nn.MSELoss(), x, y, tol=1e-10)
    assert a == b and a.total == 2 * (2 + 1 + 2)


@pytest.mark.parametrize("train_module", ["batchnorm", "dropout"])
def test_train_mode_refused_on_every_path(train_module):
    """A hidden layer with BatchNorm goes to the hvp path, which did not check the mode:
    a train-mode Dropout there redraws its mask for each block, and BatchNorm gives the
    Hessian of the batch-statistics loss, which hessian() refuses without opt-in."""
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(
        nn.Linear(2, 3), nn.BatchNorm1d(3), nn.Tanh(), nn.Dropout(0.5), nn.Linear(3, 2)
    ).double()
    x, y = torch.randn(12, 2, generator=g, dtype=F64), torch.randn(12, 2, generator=g, dtype=F64)
    net.eval()
    wide = copy.deepcopy(net)
    emb = widen(wide, [5], Split(alpha=0.5), generator=g)
    # per new neuron: 2 fan-in weights, bias, BatchNorm weight and bias, 2 fan-out weights
    assert sum(inertia_change(emb, wide, nn.MSELoss(), x, y, tol=1e-9)) == 2 * 7
    module = wide[1] if train_module == "batchnorm" else wide[3]
    module.train()
    name = "1' (BatchNorm1d)" if train_module == "batchnorm" else "3' (Dropout)"
    for method in ("auto", "hvp"):
        with pytest.raises(ValueError, match=rf"module '{re.escape(name)} is in train mode"):
            inertia_change(emb, wide, nn.MSELoss(), x, y, tol=1e-9, method=method)


# --------------------------------------------------------------------------- tolerance, norms
def test_default_tolerance_where_the_rounding_term_dominates():
    """At a zero-residual fit (|∇R| ~ 1e-16) the default tol is P·eps·‖H_wide‖, not the
    gradient term: the estimate must carry the factor P and a converged ‖H‖ (power
    iteration); the other default-tol test sits where 10·|∇R| dominates and sees neither."""
    widths = (3, 4, 3, 2)
    net = randn_mlp(widths, "tanh", seed=5)
    x, _ = randn_data(widths)
    with torch.no_grad():
        y = net(x)  # zero residual: an exact global minimum
    wide, emb = widened(net, [6, 5], Split(alpha=0.3))
    ev_n, _ = brute(net, nn.MSELoss(), x, y)
    ev_w, g_w = brute(wide, nn.MSELoss(), x, y)
    tol = default_tolerance(float(ev_w.abs().max()), ev_w.numel(), F64)
    assert tol > 10 * (10 * g_w)  # critical: the rounding level, no gap to look for
    change = inertia_change(emb, wide, nn.MSELoss(), x, y)
    assert change.tol == pytest.approx(tol, rel=0.1, abs=0)  # approx: abs=1e-12 by default
    assert_clean(ev_w, tol, "wide")
    assert tuple(a + b for a, b in zip(counts(ev_n, tol), change)) == counts(ev_w, tol)


def test_block_norms_and_normalized_block_against_explicit_directions():
    """``norms`` are the column norms of the complement directions C and ``normalized``
    is QᵀH_wide Q for Q = C/norms (orthonormal columns), up to the sign of each column;
    C is written out by hand in the final wide coordinates from the fan-out coefficients
    γ of the split pair (own parameters: γ_b·v on neuron a, -γ_a·v on neuron b, so the
    first-order output change Σγ·Δz vanishes; fan-out: +c on a, -c on b), H_wide is the
    dense autograd Hessian. The counts of inertia_change are those of QᵀH_wide Q at
    every tolerance (a large signed α makes the unnormalised block's spectrum several
    times larger)."""
    widths = (3, 4, 2)
    net = randn_mlp(widths, "tanh", seed=7)
    x, y = randn_data(widths)
    wide, emb = widened(net, [5], Split(alpha=2.5, select=[1]))
    (block,) = step_blocks(emb, wide, nn.MSELoss(), x, y)
    assert block.kind == "split" and emb.layers[0].source.tolist() == [0, 1, 2, 3, 1]
    a, b = 1, 4  # the two copies of neuron 1 in the wide layer
    ga, gb = (float(emb.layers[0].coef[i]) for i in (a, b))
    assert {ga, gb} == {2.5, -1.5}
    # flat order: 0.weight (5, 3), 0.bias (5,), 2.weight (2, 5), 2.bias (2,)
    d_in, m, out = 3, 5, 2
    p = m * d_in + m + out * m + out
    cols = []
    for k in range(d_in + 1):  # own-parameter coordinates: fan-in weights, then bias
        col = torch.zeros(p, dtype=F64)
        idx = (lambda j, k=k: j * d_in + k) if k < d_in else (lambda j: m * d_in + j)
        col[idx(a)], col[idx(b)] = gb, -ga
        cols.append(col)
    for o in range(out):  # fan-out coordinates
        col = torch.zeros(p, dtype=F64)
        base = m * d_in + m + o * m
        col[base + a], col[base + b] = 1.0, -1.0
        cols.append(col)
    C = torch.stack(cols, dim=1)
    assert torch.equal(wide[0].weight[a], wide[0].weight[b]) and wide[0].bias[a] == wide[0].bias[b]
    norms = C.norm(dim=0)
    torch.testing.assert_close(block.norms, norms, rtol=1e-15, atol=0)
    Q = C / norms
    torch.testing.assert_close(Q.T @ Q, torch.eye(len(cols), dtype=F64), rtol=0, atol=1e-15)
    H = brute_hessian(wide, nn.MSELoss(), x, y)
    ref = Q.T @ H @ Q
    torch.testing.assert_close(block.normalized.abs(), ref.abs(), rtol=1e-9, atol=1e-12)
    ev = torch.linalg.eigvalsh(ref)
    torch.testing.assert_close(torch.linalg.eigvalsh(block.normalized), ev, rtol=1e-9, atol=1e-12)
    mags = ev.abs().sort().values
    for lo, hi in zip(mags[:-1].tolist(), mags[1:].tolist()):
        if hi > 2 * lo > 0:
            t = math.sqrt(lo * hi)
            got = inertia_change(emb, wide, nn.MSELoss(), x, y, tol=t).as_tuple()
            assert got == counts(ev, t), t
    t = 1.5 * float(mags[-1])  # above every eigenvalue of the normalised block
    assert inertia_change(emb, wide, nn.MSELoss(), x, y, tol=t).as_tuple() == (0, len(cols), 0)


# --------------------------------------------------------------------------- trained points
TRAINED_SPLITS = {
    "half": Split(alpha=0.5),
    "0.3": Split(alpha=0.3),
    "signed-1.7": Split(alpha=1.7),
    "signed-neg": Split(alpha=-0.4),
    "3way": Split(alpha=[0.2, 0.3, 0.5]),
    "signed-3way": Split(alpha=[1.5, -0.2, -0.3]),
}


@pytest.fixture(scope="module")
def trained_point():
    """A 3-6-5-2 tanh MLP after 300 Adam steps: a trained point, far from critical."""
    widths = (3, 6, 5, 2)
    net = randn_mlp(widths, "tanh", seed=4)
    x, y = randn_data(widths, n=24)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()
        opt.step()
    return net, x, y


def assert_separated(ev, tol, factor, what):
    """No |λ| within ``factor`` of ``tol``: a congruence (Ostrowski factor < ``factor``)
    cannot move an eigenvalue across it, and no count depends on rounding."""
    near = ev.abs()[(ev.abs() > tol / factor) & (ev.abs() < tol * factor)]
    assert near.numel() == 0, f"{what}: eigenvalues {near.tolist()} within {factor}x of {tol:.2g}"


@pytest.mark.parametrize("name", list(TRAINED_SPLITS))
def test_before_plus_change_equals_a_full_recount_at_a_trained_point(trained_point, name):
    """Issue 11 §2: at trained points the old default tol max(P·eps·‖H‖, 10·|∇R|) changed
    with the split (|∇R_wide| ≠ |∇R_narrow|): here before (0, 55, 16) + change (0, 40, 0)
    disagreed with the full default recount in 5 of these 6 cases, e.g. (0, 96, 15). With
    one tolerance, the "before" count's, passed to the change and to a dense float64
    recount of the wide Hessian, the counts add up; and the three defaults (before,
    change, after) agree as well."""
    net, x, y = trained_point
    loss = nn.MSELoss()
    wide, emb = widened(net, [8, 7], TRAINED_SPLITS[name])
    ev_n, g_n = brute(net, loss, x, y)
    ev_w, g_w = brute(wide, loss, x, y)
    assert g_n > 1e-3 and abs(g_w - g_n) > 1e-6 * g_n  # not critical; the split moves |∇R|
    before = hessian_inertia(net, loss, x, y)
    tol, expect, ambiguous = reference_rule(ev_n, g_n)
    assert before.as_tuple() == expect and before.ambiguous == ambiguous
    assert before.tol == pytest.approx(tol, rel=1e-9)
    assert_separated(ev_n, before.tol, 30, "narrow")
    assert_separated(ev_w, before.tol, 30, "wide")
    change = inertia_change(emb, wide, loss, x, y, tol=before.tol)
    assert change.tol == before.tol
    full = counts(ev_w, before.tol)  # brute force: autograd Hessian, eigvalsh
    assert (before + change).as_tuple() == full
    assert hessian_inertia(wide, loss, x, y, tol=before.tol).as_tuple() == full
    # the defaults, each on its own
    after = hessian_inertia(wide, loss, x, y)
    assert after.as_tuple() == reference_rule(ev_w, g_w)[1] == full
    default_change = inertia_change(emb, wide, loss, x, y)
    assert default_change.zero < default_change.total
    assert (before + default_change).as_tuple() == full


def test_change_gap_is_over_the_eigenvalues_of_all_blocks_together():
    """The gap around tol is that of the union of the blocks' spectra: the old result
    took the smallest of the per-block gaps, which misses a "zero" of one block and a
    non-zero of another sitting side by side (each block alone looked well separated)."""
    widths = (3, 4, 3, 2)
    net = randn_mlp(widths, "tanh", seed=7)
    x, y = randn_data(widths)
    wide, emb = widened(net, [5, 4], Split(alpha=0.3))
    blocks = step_blocks(emb, wide, nn.MSELoss(), x, y)
    assert len(blocks) == 2
    tagged = sorted(
        (float(v), i)
        for i, b in enumerate(blocks)
        for v in torch.linalg.eigvalsh(b.normalized).abs()
    )
    pairs = [
        (lo, hi) for (lo, i), (hi, j) in itertools.pairwise(tagged) if i != j and hi > 4 * lo > 0
    ]
    assert any(hi / lo < 1e3 for lo, hi in pairs)  # e.g. 9e-9 (block 0), 1.2e-7 (block 1)
    for lo, hi in pairs:
        change = inertia_change(emb, wide, nn.MSELoss(), x, y, tol=math.sqrt(lo * hi))
        assert change.gap == pytest.approx(hi / lo, rel=1e-9)
        assert change.ambiguous == (hi / lo < 1e3)
