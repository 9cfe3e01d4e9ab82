"""Strict-saddle certificates, escape and the truly-bad condition.

Every prediction is checked against dense float64 Hessians from
``torch.autograd.functional.hessian`` of the widened network (never against the
library's own Hessian code).

How the three situations are constructed at exact critical points (THEORY §7):

* The base point is the paper's Fig. 3(a) setting: a width-2 tanh network, 1-D input,
  a smooth staircase target, polished with ``critical_point`` to ``|∇R| ~ 1e-16``. It
  is a local minimum (narrow Hessian positive definite) and its splits have ``S`` with
  one negative and one positive eigenvalue.
* The gradient is linear in the residual: ``∇R = (2/N) Jᵀ (f - y)``. Adding to the
  targets any ``ε`` orthogonal to the range of the output Jacobian ``J`` keeps the
  point exactly critical, and changes every neuron's splitting matrix by
  ``-(2/N) w_j Σ_i ε_i σ''(z_ji) h̃_i h̃_iᵀ``. With ``N = 20 > P = 7`` there is room to
  choose ``ε`` so that both neurons get ``S = -s·I`` ("negative_s", best α = ½) or
  ``S = +s·I`` ("signed": only positive eigenvalues, best α at the bound).
* "coupling" needs ``G ≠ 0`` at a critical point, impossible with one output
  (``G w = 0``). A second output with zero fan-out row and bias equal to the mean of
  its targets ``c + ε₂``, ``ε₂ ⟂ {1, σ(z_0), σ(z_1)}``, is exactly critical and gives
  ``G = [0, Σ σ'(z) h̃ δ₂ᵀ] ≠ 0``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

import torch_embed
from torch_embed.critical import critical_point
from torch_embed.landscape import saddles
from torch_embed.landscape.saddles import escape, saddle_certificates, truly_bad_condition

MSE = nn.MSELoss()
F64 = torch.float64
REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------- helpers
def _names(net):
    return [n for n, _ in net.named_parameters()]


def _flat_fn(net, x, y, loss=MSE):
    names = _names(net)
    shapes = [p.shape for p in net.parameters()]
    sizes = [p.numel() for p in net.parameters()]

    def f(theta):
        state = {n: c.view(s) for n, c, s in zip(names, torch.split(theta, sizes), shapes)}
        return loss(functional_call(net, state, (x,)), y)

    theta = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    return f, theta


def brute_hessian(net, x, y, loss=MSE):
    f, theta = _flat_fn(net, x, y, loss)
    return torch.autograd.functional.hessian(f, theta)


def brute_grad(net, x, y):
    f, theta = _flat_fn(net, x, y)
    return torch.autograd.functional.jacobian(f, theta)


def flat_direction(net, direction):
    return torch.cat([direction[n].reshape(-1) for n in _names(net)])


def widened(net, cert):
    wide = copy.deepcopy(net)
    torch_embed.embed_(wide, cert.embedding)
    return wide


def _loss(net, x, y):
    with torch.no_grad():
        return float(MSE(net(x), y))


def neg_count(h):
    ev = torch.linalg.eigvalsh(h)
    tol = 1e-9 * float(ev.abs().max())
    return int((ev < -tol).sum())


def check_certificate(net, x, y, cert, loss=MSE):
    """Rayleigh quotient of the brute-force wide Hessian along the certificate's direction."""
    wide = widened(net, cert)
    h = brute_hessian(wide, x, y, loss)
    d = flat_direction(wide, cert.direction)
    assert abs(float(d @ d) - 1.0) < 1e-12
    rq = float(d @ h @ d)
    assert cert.curvature < 0
    assert abs(rq - cert.curvature) <= 1e-8 * abs(cert.curvature), (rq, cert.curvature)
    return h


# ---------------------------------------------------------------------------- fixtures
# The Fig. 3(a) point that critical_point reaches from torch.manual_seed(0) (2000 L-BFGS
# iterations, ~2 s); stored to 16 digits and re-polished by Newton steps here.
FIG3A_STATE = {
    "0.weight": [[-1.828336974941215], [1.828336974941219]],
    "0.bias": [-1.6335547709693823, -1.6335547709693872],
    "2.weight": [[-1.3018037406867118, 1.3018037406867105]],
    "2.bias": [0.0],
}


def _fig3a():
    net = nn.Sequential(nn.Linear(1, 2), nn.Tanh(), nn.Linear(2, 1)).double()
    net.load_state_dict({k: torch.tensor(v, dtype=F64) for k, v in FIG3A_STATE.items()})
    x = torch.linspace(-2, 2, 20, dtype=F64)[:, None]
    y = torch.tanh(3 * (x - 1)) + torch.tanh(3 * (x + 1)) + 0.5 * torch.tanh(3 * x)
    res = critical_point(net, MSE, x, y)
    assert res.converged and res.grad_norm < 1e-13
    return net, x, y


@pytest.fixture(scope="module")
def fig3a():
    net, x, y = _fig3a()
    return net, x, y


def _jacobian(net, x):
    names = _names(net)
    shapes = [p.shape for p in net.parameters()]
    sizes = [p.numel() for p in net.parameters()]

    def out(theta):
        state = {n: c.view(s) for n, c, s in zip(names, torch.split(theta, sizes), shapes)}
        return functional_call(net, state, (x,)).reshape(-1)

    theta = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    return jacrev(out)(theta)


def _splitting_matrix(net, x, y, neuron):
    """Brute-force S = Σ (δ_i·w) σ''(z_i) h̃ h̃ᵀ for the tanh layer (δ = 2(f-y)/N)."""
    z = net[0](x).detach()
    t = torch.tanh(z[:, neuron])
    d2 = -2 * t * (1 - t**2)
    delta = 2 * (net(x).detach() - y) / y.numel()
    weight = (delta @ net[2].weight.detach()[:, neuron]) * d2
    h = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
    return h.T @ (weight[:, None] * h)


def _retarget(net, x, y, target_s):
    """Targets y + ε (ε ⟂ range J) that give both neurons the splitting matrix target_s."""
    jac = _jacobian(net, x)  # (N, P)
    u, sv, _ = torch.linalg.svd(jac, full_matrices=True)
    rank = int((sv > 1e-10 * sv[0]).sum())
    q = u[:, rank:]  # orthonormal basis of range(J)^⊥
    n = x.shape[0]
    h = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
    rows, rhs = [], []
    for j in range(2):
        t = torch.tanh(net[0](x).detach()[:, j])
        d2 = -2 * t * (1 - t**2)
        w = float(net[2].weight[0, j].detach())
        # ΔS_j(ε) = -(2/N) w Σ ε_i d2_i h̃ h̃ᵀ, linear in ε = q c
        basis = torch.stack(
            [(-(2 / n) * w * (q[:, k] * d2)[:, None] * h).T @ h for k in range(q.shape[1])]
        )  # (k, 2, 2)
        cur = _splitting_matrix(net, x, y, j)
        for a, b in ((0, 0), (0, 1), (1, 1)):
            rows.append(basis[:, a, b])
            rhs.append(target_s[a, b] - cur[a, b])
    c = torch.linalg.lstsq(torch.stack(rows), torch.stack(rhs)[:, None]).solution
    return y + (q @ c)


@pytest.fixture(scope="module")
def negative_s_point(fig3a):
    net, x, y = fig3a
    y2 = _retarget(net, x, y, -0.05 * torch.eye(2, dtype=F64))
    return net, x, y2


@pytest.fixture(scope="module")
def signed_point(fig3a):
    net, x, y = fig3a
    y2 = _retarget(net, x, y, 0.05 * torch.eye(2, dtype=F64))
    return net, x, y2


@pytest.fixture(scope="module")
def coupling_point(fig3a):
    net1, x, y = fig3a
    net = nn.Sequential(nn.Linear(1, 2), nn.Tanh(), nn.Linear(2, 2)).double()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        net[0].load_state_dict(net1[0].state_dict())
        net[2].weight.zero_()
        net[2].weight[0] = net1[2].weight[0]
        net[2].bias[0] = net1[2].bias[0]
        feats = torch.cat([torch.ones_like(x), torch.tanh(net1[0](x))], dim=1)
        eps = torch.randn(x.shape[0], 1, generator=gen, dtype=F64)
        qf, _ = torch.linalg.qr(feats)
        eps = eps - qf @ (qf.T @ eps)
        net[2].bias[1] = 0.3
    return net, x, torch.cat([y, 0.3 + eps], dim=1)


# ---------------------------------------------------------------------------- certificates
def test_closed_form_matches_brute_force_at_a_non_critical_point():
    torch.manual_seed(3)
    net = nn.Sequential(
        nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2), nn.Sigmoid(), nn.Linear(2, 2)
    ).double()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(15, 2, generator=gen, dtype=F64)
    y = torch.randn(15, 2, generator=gen, dtype=F64)
    certs = saddle_certificates(net, MSE, x, y, null_biases=[-0.5, 0.0, 1.0])
    assert len(certs) == 3 + 2 + 2  # every neuron, one null per layer
    values = [c.curvature for c in certs]
    tol = math.sqrt(torch.finfo(F64).eps) * max(abs(v) for v in values)  # ties: _order.py
    assert all(a <= b + tol for a, b in itertools.combinations(values, 2))
    assert {c.situation for c in certs} <= {"coupling", "null"}  # G ≠ 0 away from criticality
    for cert in certs:
        check_certificate(net, x, y, cert)


def _complement_basis(wide, cert, m):
    """The complement directions of a split, built by hand (columns, flat)."""
    names = _names(wide)
    l, s, a = cert.layer, cert.neuron, cert.alpha
    w_in, b_in = f"{2 * l}.weight", f"{2 * l}.bias"
    w_out = f"{2 * l + 2}.weight"
    params = dict(wide.named_parameters())
    cols = []
    for k in range(params[w_in].shape[1] + 1):
        d = {n: torch.zeros_like(p, dtype=F64) for n, p in params.items()}
        key, idx = (w_in, (slice(None), k)) if k < params[w_in].shape[1] else (b_in, None)
        if idx is None:
            d[key][s] += a
            d[key][m] -= 1 - a
        else:
            d[key][s, k] += a
            d[key][m, k] -= 1 - a
        cols.append(torch.cat([d[n].reshape(-1) for n in names]))
    for r in range(params[w_out].shape[0]):
        d = {n: torch.zeros_like(p, dtype=F64) for n, p in params.items()}
        d[w_out][r, s] += 1
        d[w_out][r, m] -= 1
        cols.append(torch.cat([d[n].reshape(-1) for n in names]))
    return torch.stack(cols, dim=1)


def test_curvature_is_the_minimum_over_complement_directions_and_alpha():
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 2)).double()
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(12, 2, generator=gen, dtype=F64)
    y = torch.randn(12, 2, generator=gen, dtype=F64)
    cert = saddle_certificates(net, MSE, x, y, null_biases=None, alpha_bound=3.0)[0]
    wide = widened(net, cert)
    h = brute_hessian(wide, x, y)
    c = _complement_basis(wide, cert, m=2)
    # generalized eigenproblem CᵀHC x = κ CᵀC x, by Cholesky of the Gram matrix
    chol = torch.linalg.cholesky(c.T @ c)
    inv = torch.linalg.inv(chol)
    kappa = float(torch.linalg.eigvalsh(inv @ (c.T @ h @ c) @ inv.T)[0])
    assert abs(kappa - cert.curvature) <= 1e-8 * abs(cert.curvature)
    # no other α in the allowed range does better (brute force at a few α)
    for alpha in (-2.0, -0.5, 0.2, 0.5, 1.7, 3.0):
        emb = torch_embed.plan(net, [3], torch_embed.Split(alpha=alpha, select=[cert.neuron]))
        other = copy.deepcopy(net)
        torch_embed.embed_(other, emb)
        probe = type(cert)(**{**cert.__dict__, "alpha": alpha})
        cb = _complement_basis(other, probe, m=2)
        hb = brute_hessian(other, x, y)
        chol = torch.linalg.cholesky(cb.T @ cb)
        inv = torch.linalg.inv(chol)
        k_alpha = float(torch.linalg.eigvalsh(inv @ (cb.T @ hb @ cb) @ inv.T)[0])
        assert cert.curvature <= k_alpha + 1e-10 * abs(k_alpha)


@pytest.mark.parametrize(
    ("point", "situation", "alpha"),
    [("negative_s_point", "negative_s", 0.5), ("signed_point", "signed", 2.0)],
)
def test_splitting_matrix_situations_at_a_critical_point(point, situation, alpha, request):
    net, x, y = request.getfixturevalue(point)
    assert float(brute_grad(net, x, y).norm()) < 1e-13  # still exactly critical
    sign = -1 if situation == "negative_s" else 1
    for j in range(2):  # the construction worked: S = ∓0.05·I for both neurons
        s = _splitting_matrix(net, x, y, j)
        torch.testing.assert_close(s, sign * 0.05 * torch.eye(2, dtype=F64), atol=1e-10, rtol=0)
    certs = saddle_certificates(net, MSE, x, y, null_biases=None, alpha_bound=2.0)
    for cert in certs:
        assert cert.situation == situation
        assert cert.alpha == alpha
        h_wide = check_certificate(net, x, y, cert)
        # Sylvester: D = diag(α(1-α)S, 0) adds exactly two negative eigenvalues
        assert neg_count(h_wide) == neg_count(brute_hessian(net, x, y)) + 2
    # prediction of the closed form κ = t(α)·(∓0.05)
    t = alpha * (1 - alpha) / (alpha**2 + (1 - alpha) ** 2)
    assert certs[0].curvature == pytest.approx(t * sign * 0.05, rel=1e-8)
    before = _loss(net, x, y)
    wide = copy.deepcopy(net)
    result = escape(wide, MSE, x, y, null_biases=None)
    assert result.escaped and result.steps[0].certificate.situation == situation
    assert result.alphas == (alpha,)
    assert result.loss_before == pytest.approx(before, rel=1e-14)
    assert _loss(wide, x, y) < before
    assert wide[0].out_features == 3


def test_coupling_situation_at_a_critical_point(coupling_point):
    net, x, y = coupling_point
    assert float(brute_grad(net, x, y).norm()) < 1e-13
    certs = saddle_certificates(net, MSE, x, y, null_biases=None)
    assert {c.situation for c in certs} == {"coupling"}
    for cert in certs:
        assert cert.coupling_norm > 1e-3
        h_wide = check_certificate(net, x, y, cert)
        assert neg_count(h_wide) >= neg_count(brute_hessian(net, x, y)) + 1
    wide = copy.deepcopy(net)
    result = escape(wide, MSE, x, y, null_biases=None)
    assert result.escaped and result.loss_after < result.loss_before
    assert _loss(wide, x, y) == pytest.approx(result.loss_after, rel=1e-12)


def test_null_certificate_at_a_critical_point(fig3a):
    net, x, y = fig3a
    certs = saddle_certificates(net, MSE, x, y, kinds=("null",), null_biases=[-1.0, 0.0, 0.5])
    (cert,) = certs
    assert cert.situation == "null" and cert.null_bias == 0.0  # σ'(β)/√(1+σ²) is largest at 0
    h_wide = check_certificate(net, x, y, cert)
    # closed form: κ = -σ'(0)·σ_max(Σ h̃ δᵀ) for tanh (σ(0) = 0)
    delta = 2 * (net(x).detach() - y) / y.numel()
    h = torch.cat([x, torch.ones_like(x)], dim=1)
    assert cert.curvature == pytest.approx(-float(torch.linalg.norm(h.T @ delta, 2)), rel=1e-10)
    assert neg_count(h_wide) == 1  # the narrow point is a local minimum
    wide = copy.deepcopy(net)
    result = escape(wide, MSE, x, y, kinds=("null",))
    assert result.escaped and isinstance(result.schemes[0], torch_embed.Null)
    assert result.loss_after < result.loss_before


def test_fig3a_local_minimum_is_a_saddle_after_embedding_and_training_goes_lower(fig3a):
    net, x, y = fig3a
    h = brute_hessian(net, x, y)
    assert float(torch.linalg.eigvalsh(h)[0]) > 0  # a strict local minimum of width 2
    split = [
        c
        for c in saddle_certificates(net, MSE, x, y, kinds=("split",), alpha_bound=1.0)
        if c.situation == "negative_s"
    ]
    assert split and split[0].alpha == 0.5 and split[0].s_eigenvalues[0] < 0
    check_certificate(net, x, y, split[0])
    narrow_min = _loss(net, x, y)
    wide = copy.deepcopy(net)
    opt = torch.optim.Adam(wide.parameters(), lr=3e-3)
    result = escape(wide, MSE, x, y, optimizer=opt)
    assert result.escaped and result.loss_after < narrow_min
    for _ in range(300):
        opt.zero_grad()
        loss = MSE(wide(x), y)
        loss.backward()
        opt.step()
    final = _loss(wide, x, y)
    assert final < 0.9 * narrow_min, (final, narrow_min)


# ---------------------------------------------------------------------------- escape
def test_escape_does_nothing_without_negative_curvature():
    torch.manual_seed(5)
    net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)).double()
    x = torch.randn(10, 2, generator=torch.Generator().manual_seed(5), dtype=F64)
    y = net(x).detach()  # zero residuals: every block D is zero
    state = copy.deepcopy(net.state_dict())
    result = escape(net, MSE, x, y)
    assert not result.escaped and result.steps == ()
    assert result.loss_after == result.loss_before
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())


def test_escape_several_neurons_with_optimizer_and_float32():
    torch.manual_seed(6)
    net = nn.Sequential(nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 1))
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(30, 2, generator=gen)
    y = torch.sin(3 * x[:, :1]) * x[:, 1:]
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(5):
        opt.zero_grad()
        MSE(net(x), y).backward()
        opt.step()
    result = escape(net, MSE, x, y, optimizer=opt, max_new=3)
    assert len(result.steps) == 3
    losses = [result.loss_before] + [s.loss_after for s in result.steps]
    assert all(b < a for a, b in itertools.pairwise(losses))
    assert net[0].out_features + net[2].out_features == 4 + 3
    assert net[0].weight.dtype == torch.float32
    for p in net.parameters():  # the optimizer state was mapped to the new shapes
        assert opt.state[p]["exp_avg"].shape == p.shape
    opt.zero_grad()
    MSE(net(x), y).backward()
    opt.step()


def test_errors():
    net = nn.Sequential(nn.Linear(1, 2), nn.Tanh(), nn.Linear(2, 1)).double()
    x, y = torch.zeros(3, 1, dtype=F64), torch.zeros(3, 1, dtype=F64)
    with pytest.raises(ValueError, match="alpha_bound"):
        saddle_certificates(net, MSE, x, y, alpha_bound=0.2)
    with pytest.raises(ValueError, match="hidden-layer index"):
        saddle_certificates(net, MSE, x, y, layers=[1])
    with pytest.raises(ValueError, match="kinds"):
        saddle_certificates(net, MSE, x, y, kinds=("grow",))
    with pytest.raises(ValueError, match="max_new"):
        escape(net, MSE, x, y, max_new=-1)
    with pytest.raises(ValueError, match="step"):
        escape(net, MSE, x, y, step=0.0)
    bn = nn.Sequential(nn.Linear(1, 2), nn.BatchNorm1d(2), nn.Tanh(), nn.Linear(2, 1)).eval()
    with pytest.raises(ValueError, match="BatchNorm1d"):
        saddle_certificates(bn, MSE, torch.zeros(3, 1), torch.zeros(3, 1))


def test_argument_errors_name_what_is_accepted():
    """These gave "'int' object is not iterable", LAPACK's eigh failure (alpha_bound=inf),
    a NaN certificate (null bias nan) or a silent no-op (max_halvings=-1)."""
    net = nn.Sequential(nn.Linear(1, 2), nn.Tanh(), nn.Linear(2, 1)).double()
    x = torch.linspace(-2, 2, 10, dtype=F64)[:, None]
    y = torch.sin(3 * x)
    with pytest.raises(TypeError, match=r"layers must be a sequence of hidden-layer indices.*int"):
        saddle_certificates(net, MSE, x, y, layers=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"alpha_bound must be a finite number >= 0\.5.*inf"):
        saddle_certificates(net, MSE, x, y, alpha_bound=math.inf)
    with pytest.raises(ValueError, match=r"null_biases must be finite numbers, got \[nan\]"):
        saddle_certificates(net, MSE, x, y, null_biases=[0.0, math.nan])
    with pytest.raises(TypeError, match=r"null_biases must be a sequence of floats.*float"):
        saddle_certificates(net, MSE, x, y, null_biases=0.5)  # type: ignore[arg-type]
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="max_halvings must be a non-negative int"):
            escape(net, MSE, x, y, max_halvings=bad)  # type: ignore[arg-type]
    # a tensor of candidate biases is accepted (it raised "ambiguous truth value")
    from_tensor = saddle_certificates(
        net, MSE, x, y, null_biases=torch.linspace(-1, 1, 3), kinds=["null"]
    )
    from_list = saddle_certificates(net, MSE, x, y, null_biases=[-1.0, 0.0, 1.0], kinds=["null"])
    assert [(c.null_bias, c.curvature) for c in from_tensor] == [
        (c.null_bias, c.curvature) for c in from_list
    ]


# ---------------------------------------------------------------------------- truly bad
def _brute_h2(net, x, y):
    """Σ_i Σ_k ∂ℓ/∂f_ik ∇²_θ f_ik, one output entry at a time."""
    names = _names(net)
    shapes = [p.shape for p in net.parameters()]
    sizes = [p.numel() for p in net.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    resid = 2 * (net(x).detach() - y) / y.numel()
    total = torch.zeros(theta.numel(), theta.numel(), dtype=F64)
    for i in range(x.shape[0]):
        for k in range(y.shape[1]):

            def f(th, i=i, k=k):
                state = {n: c.view(s) for n, c, s in zip(names, torch.split(th, sizes), shapes)}
                return functional_call(net, state, (x[i : i + 1],))[0, k]

            total += resid[i, k] * torch.autograd.functional.hessian(f, theta)
    return total


def test_truly_bad_condition_matches_brute_force(fig3a, coupling_point):
    for net, x, y in (fig3a, coupling_point):
        res = truly_bad_condition(net, MSE, x, y)
        h2 = _brute_h2(net, x, y)
        assert res.norm == pytest.approx(float(torch.linalg.matrix_norm(h2)), rel=1e-9)
        h = brute_hessian(net, x, y)
        assert res.hessian_norm == pytest.approx(float(torch.linalg.matrix_norm(h)), rel=1e-12)
        assert not res.holds and res.relative > 1e-3  # splits make these strict saddles
    net, x, _ = fig3a
    exact = truly_bad_condition(net, MSE, x, net(x).detach())
    assert exact.holds and exact.relative < 1e-12
    with pytest.raises(ValueError, match="rtol"):
        truly_bad_condition(net, MSE, x, net(x).detach(), rtol=-1.0)


def test_null_certificate_where_the_activation_slope_is_negative():
    """SiLU has σ'(-2) < 0: the null direction's fan-out sign must follow the slope's
    sign, otherwise dᵀHd = +|κ| instead of the reported κ < 0 (tanh/sigmoid above only
    have positive slopes)."""
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(2, 3), nn.SiLU(), nn.Linear(3, 2)).double()
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(15, 2, generator=gen, dtype=F64)
    y = torch.randn(15, 2, generator=gen, dtype=F64)
    beta = torch.tensor(-2.0, dtype=F64, requires_grad=True)
    (slope,) = torch.autograd.grad(nn.functional.silu(beta), beta)
    assert float(slope) < 0
    (cert,) = [
        c for c in saddle_certificates(net, MSE, x, y, null_biases=[-2.0]) if c.kind == "null"
    ]
    assert cert.null_bias == -2.0 and cert.curvature < 0 and cert.situation == "null"
    check_certificate(net, x, y, cert)


# ---------------------------------------------------------------------------- ties
# The Fig. 3(a) point's two neurons are mirror images: their certificates agree up to
# rounding, and the CPU's kernels decided which came first (issue 11 §1: the docs'
# ``result.neurons == ((0, 0),)`` gave ``((0, 1),)`` on an Intel Xeon).
@pytest.mark.parametrize("nudge", [-1e-14, 1e-14])
def test_mirror_image_neurons_rank_by_index_whatever_their_last_bits(fig3a, monkeypatch, nudge):
    net, x, y = fig3a
    exact = {c.neuron: c.curvature for c in saddle_certificates(net, MSE, x, y, kinds=["split"])}
    assert exact[0] == pytest.approx(exact[1], rel=1e-12)  # the mirror image holds
    original = saddles._split_certificate

    def nudged(*args, **kwargs):
        cert = original(*args, **kwargs)
        if cert.neuron == 1:  # neuron 1 a few dozen ulps above or below neuron 0
            curvature = exact[0] * (1 + nudge)
            cert = dataclasses.replace(cert, curvature=curvature)
        else:
            cert = dataclasses.replace(cert, curvature=exact[0])
        return cert

    monkeypatch.setattr(saddles, "_split_certificate", nudged)
    certs = saddle_certificates(net, MSE, x, y)
    smallest = min(certs[:2], key=lambda c: c.curvature)  # the bits differ, both ways
    assert smallest.neuron == (1 if nudge > 0 else 0)
    assert [(c.layer, c.neuron) for c in certs] == [(0, 0), (0, 1), (0, None)]
    result = escape(copy.deepcopy(net), MSE, x, y)
    assert result.neurons == ((0, 0),)


def test_a_real_difference_still_wins(fig3a, monkeypatch):
    """Ties are rounding-sized: neuron 1 more negative by 1e-6 relative comes first."""
    net, x, y = fig3a
    original = saddles._split_certificate

    def nudged(*args, **kwargs):
        cert = original(*args, **kwargs)
        factor = 1 + 1e-6 if cert.neuron == 1 else 1.0
        return dataclasses.replace(cert, curvature=cert.curvature * factor)

    monkeypatch.setattr(saddles, "_split_certificate", nudged)
    certs = saddle_certificates(net, MSE, x, y)
    assert [(c.layer, c.neuron) for c in certs] == [(0, 1), (0, 0), (0, None)]


def test_equally_good_null_biases_go_to_the_first_candidate(fig3a, monkeypatch):
    """tanh ties β and -β; a last-bit difference in σ'(β) used to pick the winner."""
    net, x, y = fig3a
    original = saddles._activation_value_slope
    for bump in (1 + 4e-16, 1 - 4e-16):

        def bumped(*args, bump=bump):
            value, slope = original(*args)
            return value, slope * torch.tensor([1.0, bump], dtype=slope.dtype)

        monkeypatch.setattr(saddles, "_activation_value_slope", bumped)
        (cert,) = saddle_certificates(net, MSE, x, y, kinds=["null"], null_biases=[-1.0, 1.0])
        assert cert.null_bias == -1.0


def test_direction_sign_does_not_follow_the_eigensolver(fig3a, monkeypatch):
    """LAPACK may return ``-v`` for ``v``; the certificate's direction is the same."""
    net, x, y = fig3a
    biases = [0.0]
    plain = saddle_certificates(net, MSE, x, y, null_biases=biases)
    min_eig, svd = saddles._min_eig, torch.linalg.svd

    def flipped_eig(mat):
        value, vec = min_eig(mat)
        return value, -vec

    def flipped_svd(mat, *args, **kwargs):
        u, sv, vh = svd(mat, *args, **kwargs)
        return -u, sv, -vh

    monkeypatch.setattr(saddles, "_min_eig", flipped_eig)
    monkeypatch.setattr(torch.linalg, "svd", flipped_svd)
    flipped = saddle_certificates(net, MSE, x, y, null_biases=biases)
    assert [(c.layer, c.neuron) for c in flipped] == [(c.layer, c.neuron) for c in plain]
    for a, b in zip(plain, flipped):
        for name, t in a.direction.items():
            torch.testing.assert_close(b.direction[name], t, rtol=0, atol=0)
        flat = flat_direction(widened(net, a), a.direction)
        first = flat[flat.abs() > 1e-6 * flat.abs().max()][0]  # the first non-negligible
        assert float(first) > 0


@pytest.mark.parametrize("asymmetry", [-1e-13, 1e-13])
def test_line_search_prefers_plus_t_when_both_signs_tie(monkeypatch, asymmetry):
    """An equal split's escape direction is symmetric (swapping the copies maps d to
    -d): the losses at ±t agree up to rounding, and rounding chose the sign."""

    def fake_loss(model, loss_fn, source, state):
        w = float(state["w"][0])
        return 1.0 - 0.5 * w * w + asymmetry * w

    monkeypatch.setattr(saddles, "_evaluate", fake_loss)
    wide = {"w": torch.zeros(2, dtype=F64)}
    direction = {"w": torch.tensor([1.0, 0.0], dtype=F64)}
    found = saddles._line_search(None, None, None, wide, direction, -1.0, 1.0, 0.5, 10)
    assert found is not None and found[0] > 0
    # a real asymmetry still decides
    monkeypatch.setattr(saddles, "_evaluate", lambda *a: fake_loss(*a) + 0.1 * float(a[3]["w"][0]))
    found = saddles._line_search(None, None, None, wide, direction, -1.0, 1.0, 0.5, 10)
    assert found is not None and found[0] < 0


DOCS_EXAMPLE = """
import json, torch
from torch import nn
from torch_embed.critical import critical_point
from torch_embed.landscape import escape, saddle_certificates
torch.manual_seed(0)
net = nn.Sequential(nn.Linear(1, 2), nn.Tanh(), nn.Linear(2, 1)).double()
x = torch.linspace(-2, 2, 20, dtype=torch.float64)[:, None]
y = torch.tanh(3 * (x - 1)) + torch.tanh(3 * (x + 1)) + 0.5 * torch.tanh(3 * x)
loss = nn.MSELoss()
critical_point(net, loss, x, y)
certs = saddle_certificates(net, loss, x, y)
signs = [[int(v) for v in torch.sign(torch.cat([t.reshape(-1) for t in c.direction.values()])
          * (torch.cat([t.reshape(-1) for t in c.direction.values()]).abs() > 1e-6))]
         for c in certs]
result = escape(net, loss, x, y)
print(json.dumps({
    "order": [[c.layer, c.neuron] for c in certs],
    "alpha": [c.alpha for c in certs], "bias": [c.null_bias for c in certs], "signs": signs,
    "neurons": [list(n) for n in result.neurons], "step_sign": [s.step > 0 for s in result.steps],
}))
"""


@pytest.mark.slow
def test_docs_example_gives_the_same_choices_under_scalar_and_vector_kernels():
    """The landscape guide's example under ``ATEN_CPU_CAPABILITY=default`` (scalar
    kernels, a subprocess) and this process's kernels (AVX2/AVX-512 on x86 unless the
    variable is set): the same order, α, bias, direction signs and escape step. Before
    the tie rule the two orders differed."""
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    proc = subprocess.run(
        [sys.executable, "-c", DOCS_EXAMPLE],
        cwd=REPO,
        env={**env, "ATEN_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    scalar = json.loads(proc.stdout)
    here = io.StringIO()
    with torch.random.fork_rng(), contextlib.redirect_stdout(here):
        exec(DOCS_EXAMPLE, {})
    assert json.loads(here.getvalue()) == scalar
    assert scalar["order"][:2] == [[0, 0], [0, 1]] and scalar["neurons"] == [[0, 0]]
