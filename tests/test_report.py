"""check_embedding: the before/after report, against brute-force eigen-solves."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from cases import F64, brute_gradient, brute_hessian, counts
from tol_reference import reference_rule
from torch import nn
from torch.func import functional_call

import torch_embed.report as report_module
from torch_embed.report import EmbeddingReport, check_embedding
from torch_embed.schemes import Net2Net, Null, Split
from torch_embed.widen import widen

pytestmark = pytest.mark.usefixtures("single_thread_module")


def brute_eigenvalues(model, loss_fn, x, y):
    return torch.linalg.eigvalsh(brute_hessian(model, loss_fn, x, y))


@pytest.fixture(scope="module")
def critical_net():
    """A tanh net whose parameters are an exact critical point of the MSE on (x, y).

    The residual r = f(x) - y is chosen in ker Jᵀ (J = ∂f/∂θ), so ∇R = (2/N) Jᵀ r = 0.
    """
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=F64))
    x = torch.randn(30, 2, generator=g, dtype=F64)
    params = {n: p.detach() for n, p in net.named_parameters()}
    jac = torch.autograd.functional.jacobian(
        lambda *ps: functional_call(net, dict(zip(params, ps)), (x,)), tuple(params.values())
    )
    J = torch.cat([j.reshape(60, -1) for j in jac], 1)
    q, _ = torch.linalg.qr(J)
    z = torch.randn(60, generator=g, dtype=F64)
    r = z - q @ (q.T @ z)
    with torch.no_grad():
        y = net(x) - 0.4 * r.view(30, 2) * math.sqrt(60) / r.norm()
    return net, x, y


@pytest.mark.parametrize("scheme", [Split(alpha=0.5), Split(alpha=1.8), Null(bias=0.5)])
def test_report_matches_brute_force(critical_net, scheme):
    net, x, y = critical_net
    wide = copy.deepcopy(net)
    emb = widen(wide, [5], scheme, generator=torch.Generator().manual_seed(0))
    rep = check_embedding(net, wide, emb, nn.MSELoss(), x, y)
    assert isinstance(rep, EmbeddingReport)
    assert rep.output_max_abs_diff <= 1e-13
    assert rep.grad_norm_before <= 1e-12 and rep.grad_norm_after <= 1e-12
    ev_n = brute_eigenvalues(net, nn.MSELoss(), x, y)
    ev_w = brute_eigenvalues(wide, nn.MSELoss(), x, y)
    assert rep.before.as_tuple() == counts(ev_n, rep.before.tol)
    assert rep.after is not None and rep.after.as_tuple() == counts(ev_w, rep.after.tol)
    assert rep.change.tol == rep.after.tol
    assert rep.predicted.as_tuple() == rep.after.as_tuple() and rep.matches is True
    assert rep.nondecreasing == (True, True, True)
    assert rep.after.zero > rep.before.zero  # at a critical point each new neuron adds zeros
    assert rep.time_after is not None and rep.speedup is not None and rep.speedup > 0
    text = str(rep)
    for piece in ("before (full)", "after (full)", "before + change", "prediction matches: yes"):
        assert piece in text
    assert f"{rep.after.negative:>9}{rep.after.zero:>6}{rep.after.positive:>10}" in text


def test_report_without_full_recount(critical_net):
    net, x, y = critical_net
    wide = copy.deepcopy(net)
    emb = widen(wide, [4], Split(alpha=0.5, select=[1]))
    rep = check_embedding(net, wide, emb, nn.MSELoss(), x, y, full=False)
    assert rep.after is None and rep.time_after is None and rep.matches is None
    assert rep.speedup is None
    ev_w = brute_eigenvalues(wide, nn.MSELoss(), x, y)
    assert rep.predicted.as_tuple() == counts(ev_w, rep.change.tol)
    assert "prediction matches: —" in str(rep)
    fixed = check_embedding(net, wide, emb, nn.MSELoss(), x, y, tol=1e-9)
    assert fixed.before.tol == fixed.after.tol == fixed.change.tol == 1e-9


def test_report_refuses_a_non_critical_embedding(critical_net):
    net, x, y = critical_net
    wide = copy.deepcopy(net)
    emb = widen(wide, [5], Net2Net(noise=0.3), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="only defined for critical embeddings"):
        check_embedding(net, wide, emb, nn.MSELoss(), x, y)


def test_report_refuses_a_pair_that_is_not_narrow_and_its_image(critical_net):
    """These used to give a silent report with 'prediction matches: NO' (or a wrong
    'yes'): the widened model passed twice (no deepcopy kept), a different narrow copy."""
    net, x, y = critical_net
    wide = copy.deepcopy(net)
    emb = widen(wide, [5], Split(alpha=0.5), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"narrow_model has widths \(2, 5, 2\) .*deepcopy"):
        check_embedding(wide, wide, emb, nn.MSELoss(), x, y, tol=1e-9)
    other = copy.deepcopy(net)
    with torch.no_grad():
        other[2].weight[1, 2] += 1e-3
    with pytest.raises(ValueError, match=r"not this embedding's image.* '2\.weight'"):
        check_embedding(other, wide, emb, nn.MSELoss(), x, y, tol=1e-9)
    moved = copy.deepcopy(wide)
    with torch.no_grad():
        moved[0].weight[4, 0] += 1e-3  # the wide model trained after widening
    with pytest.raises(ValueError, match=r"not at a point of this embedding: parameter '0\.w"):
        check_embedding(net, moved, emb, nn.MSELoss(), x, y, tol=1e-9)
    assert check_embedding(net, wide, emb, nn.MSELoss(), x, y, tol=1e-9).matches is True


def test_report_uses_one_default_tolerance_and_counts_signs_at_a_non_critical_point():
    """At |∇R| ~ 1 the old default tol 10·|∇R| made every count zero, 'not ambiguous',
    and the narrow and wide counts each used their own 10·|∇R| (the split changes it).
    Now before, after and change share the "before" count's tolerance (the rounding
    level here), the counts are the eigenvalue signs of the brute-force Hessians, and the
    missing gap is flagged instead of warned about."""
    g = torch.Generator().manual_seed(3)
    net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=F64))
    x, y = torch.randn(10, 2, generator=g, dtype=F64), torch.randn(10, 2, generator=g, dtype=F64)
    wide = copy.deepcopy(net)
    emb = widen(wide, [5], Split(alpha=0.5), generator=g)
    rep = check_embedding(net, wide, emb, nn.MSELoss(), x, y)  # no warning (an error here)
    ev_n = brute_eigenvalues(net, nn.MSELoss(), x, y)
    ev_w = brute_eigenvalues(wide, nn.MSELoss(), x, y)
    g_n = float(brute_gradient(net, nn.MSELoss(), x, y).norm())
    tol, before, ambiguous = reference_rule(ev_n, g_n)
    assert rep.before.tol == rep.after.tol == rep.change.tol == pytest.approx(tol, rel=1e-9)
    assert rep.before.as_tuple() == before == counts(ev_n, 1e-9)  # the signs: no zeros
    assert rep.after.as_tuple() == counts(ev_w, tol) == counts(ev_w, 1e-9)
    assert rep.matches is True and rep.before.ambiguous == ambiguous
    rep = check_embedding(net, wide, emb, nn.MSELoss(), x, y, tol=1e-9)
    assert rep.before.tol == rep.after.tol == rep.change.tol == 1e-9
    assert rep.matches is True


def _random_problem(seed=3):
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=F64))
    x, y = torch.randn(10, 2, generator=g, dtype=F64), torch.randn(10, 2, generator=g, dtype=F64)
    return net, x, y


def test_report_fields_against_brute_force_at_a_non_critical_point():
    """Every number of the report against an independent computation, at a point where
    the narrow and the wide gradient norms differ (∇R_wide = B ∇R_narrow, B not an
    isometry) and a count stays equal (so '>=' matters in nondecreasing)."""
    net, x, y = _random_problem()
    wide = copy.deepcopy(net)
    emb = widen(wide, [5], Split(alpha=0.3), generator=torch.Generator().manual_seed(0))
    rep = check_embedding(net, wide, emb, nn.MSELoss(), x, y, tol=1e-9)
    with torch.no_grad():
        assert rep.output_max_abs_diff == float((wide(x) - net(x)).abs().max())
    g_n = float(brute_gradient(net, nn.MSELoss(), x, y).norm())
    g_w = float(brute_gradient(wide, nn.MSELoss(), x, y).norm())
    assert abs(g_n - g_w) > 1e-3 * g_n
    assert rep.grad_norm_before == pytest.approx(g_n, rel=1e-12, abs=0)
    assert rep.grad_norm_after == pytest.approx(g_w, rel=1e-12, abs=0)
    before = counts(brute_eigenvalues(net, nn.MSELoss(), x, y), 1e-9)
    after = counts(brute_eigenvalues(wide, nn.MSELoss(), x, y), 1e-9)
    assert rep.before.as_tuple() == before and rep.after.as_tuple() == after
    assert any(a == b for a, b in zip(after, before))
    assert rep.nondecreasing == tuple(a >= b for a, b in zip(after, before))
    assert rep.speedup == rep.time_after / rep.time_change
    same = copy.deepcopy(net)
    ident = widen(same, [3])  # no new neuron: every count stays equal, each is "non-decreasing"
    rep = check_embedding(net, same, ident, nn.MSELoss(), x, y, tol=1e-9)
    assert rep.after.as_tuple() == rep.before.as_tuple() == before
    assert rep.nondecreasing == (True, True, True) and rep.matches is True


def test_report_on_a_wrong_prediction_judges_by_the_full_recount(critical_net, monkeypatch):
    """If before + change disagreed with the full recount, the report must say so and
    take nondecreasing from the recount, not from the (wrong) prediction."""
    net, x, y = critical_net
    wide = copy.deepcopy(net)
    emb = widen(wide, [5], Split(alpha=0.5), generator=torch.Generator().manual_seed(0))
    real = report_module.inertia_change

    def wrong(*args, **kwargs):
        good = real(*args, **kwargs)  # e.g. (2, 2, 6) for two split neurons
        return dataclasses.replace(good, negative=0, zero=0, positive=-3)

    monkeypatch.setattr(report_module, "inertia_change", wrong)
    rep = check_embedding(net, wide, emb, nn.MSELoss(), x, y, tol=1e-9)
    after = counts(brute_eigenvalues(wide, nn.MSELoss(), x, y), 1e-9)
    before = counts(brute_eigenvalues(net, nn.MSELoss(), x, y), 1e-9)
    assert rep.after.as_tuple() == after and rep.predicted.positive == before[2] - 3
    assert rep.matches is False and "prediction matches: NO" in str(rep)
    assert rep.nondecreasing == tuple(a >= b for a, b in zip(after, before)) == (True,) * 3
