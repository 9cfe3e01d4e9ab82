"""torch_embed.inertia on matrices with known spectra (Q diag(λ) Qᵀ), and on Hessians."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from tol_reference import reference_rule
from torch import Tensor, nn

from torch_embed.inertia import (
    AUTO_LDL_MIN_SIZE,
    Inertia,
    _block_signs,
    default_tolerance,
    eigenvalues,
    hessian_inertia,
    inertia,
)

F64 = torch.float64


def _with_spectrum(lam: list[float] | Tensor, seed: int = 0) -> Tensor:
    lam_t = torch.as_tensor(lam, dtype=F64)
    n = lam_t.numel()
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=F64, generator=g))
    return (q * lam_t) @ q.T


def _counts(lam: Tensor, tol: float) -> tuple[int, int, int]:
    return int((lam < -tol).sum()), int((lam.abs() <= tol).sum()), int((lam > tol).sum())


SPECTRA = {
    "zeros-cluster": [-3.0, -0.5, 0.0, 0.0, 0.0, 0.0, 1e-3, 2.0, 7.0, 40.0],
    "no-zeros": [-2.0, -1.0, 0.3, 4.0, 5.0],
    "all-zero": [0.0] * 6,
    "definite": [1.0, 2.0, 3.0, 1e-2],
    "negative-and-zeros": [-1.0, -2.0, 0.0, 0.0, -5.0],
    "positive-and-zeros": [1e-3, 0.0, 4.0],
}


@pytest.mark.parametrize("method", ["eigh", "ldl"])
@pytest.mark.parametrize("name", list(SPECTRA))
def test_known_spectrum_default_tolerance(method: str, name: str) -> None:
    lam = torch.tensor(SPECTRA[name], dtype=F64)
    res = inertia(_with_spectrum(lam), method=method)
    assert res.as_tuple() == _counts(lam, 1e-9)  # the gaps make any tol in [1e-13, 1e-4] agree
    assert res.method == method
    assert not res.ambiguous
    assert res.tol <= 10 * lam.numel() * 2.0**-52 * float(lam.abs().max()) + 1e-300


@pytest.mark.parametrize("method", ["eigh", "ldl"])
def test_values_at_plus_minus_ten_tol_and_exact_zero_cluster(method: str) -> None:
    tol = 1e-6
    lam = torch.tensor(
        [-5.0, -10 * tol, -10 * tol, 0.0, 0.0, 0.0, 0.0, 0.0, 10 * tol, 10 * tol, 10 * tol, 3.0],
        dtype=F64,
    )
    res = inertia(_with_spectrum(lam, seed=1), tol=tol, method=method)
    assert res.as_tuple() == (3, 5, 4)
    assert res.tol == tol
    # values a factor 10 above tol: separated from the exact zeros (~1e-16 after QR)
    assert res.gap > 1e3 and not res.ambiguous


@pytest.mark.parametrize("method", ["eigh", "ldl"])
def test_values_near_tol_are_ambiguous(method: str) -> None:
    tol = 1e-6
    lam = [-4.0, -0.5 * tol, 0.3 * tol, 2.0 * tol, 1.0, 6.0]
    res = inertia(_with_spectrum(lam, seed=2), tol=tol, method=method)
    assert res.as_tuple() == (1, 2, 3)
    assert res.ambiguous
    assert res.gap < 10  # exact: (2 tol) / (0.5 tol) = 4
    if method == "eigh":
        assert res.gap == pytest.approx(4.0, rel=1e-6)


def test_gap_ratio_exact_for_eigh_and_close_for_ldl() -> None:
    tol = 1e-8
    lam = [-1.0, -3e-4, 2e-12, -5e-12, 1e-12, 7e-4, 2.0, 9.0]
    a = _with_spectrum(lam, seed=3)
    e = inertia(a, tol=tol, method="eigh")
    ldl = inertia(a, tol=tol, method="ldl")
    assert e.as_tuple() == ldl.as_tuple() == (2, 3, 3)
    assert e.gap == pytest.approx(3e-4 / 5e-12, rel=1e-3)
    # ldl resolves the zero cluster to ~eps·tol only: same order or larger, never ambiguous
    assert ldl.gap >= 0.5 * e.gap and not ldl.ambiguous


def test_larger_random_indefinite_both_methods_agree_with_counts_and_use_2x2_blocks() -> None:
    g = torch.Generator().manual_seed(7)
    n = 120
    lam = torch.randn(n, dtype=F64, generator=g) * 3
    lam[:20] = 0.0  # a cluster of exact zeros
    lam[20:25] = 1e-4 * torch.tensor([1.0, -1.0, 2.0, -3.0, 5.0], dtype=F64)
    a = _with_spectrum(lam, seed=8)
    expect = _counts(lam, 1e-8)
    by_eigh, by_ldl = inertia(a, method="eigh"), inertia(a, method="ldl")
    assert by_eigh.as_tuple() == by_ldl.as_tuple() == expect
    # ldl's tolerance uses a Lanczos estimate of max|λ|: a lower bound, close
    assert 0.9 * by_eigh.tol <= by_ldl.tol <= by_eigh.tol * (1 + 1e-12)
    ld, piv = torch.linalg.ldl_factor(a - 1e-8 * torch.eye(n, dtype=F64))
    assert bool((piv < 0).any())  # Bunch-Kaufman chose 2x2 blocks: that path is exercised
    neg, pos = _block_signs(ld, piv)
    assert pos == expect[2] and neg == n - expect[2]


def test_2x2_pivot_block_on_zero_diagonal() -> None:
    a = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=F64)  # eigenvalues ±1
    ld, piv = torch.linalg.ldl_factor(a)
    assert bool((piv < 0).all())
    assert _block_signs(ld, piv) == (1, 1)
    assert inertia(a, method="ldl").as_tuple() == (1, 0, 1)


def test_default_tolerance_is_the_rounding_level_and_moves_only_into_a_clear_gap() -> None:
    eps = 2.0**-52
    assert default_tolerance(3.0, 50, F64) == 50 * eps * 3.0
    assert default_tolerance(1.0, 10, torch.float32) == 10 * 2.0**-23
    lam = [-1.0, -1e-7, 1e-7, 5e-7, 2.0]
    a = _with_spectrum(lam, seed=4)
    for method in ("eigh", "ldl"):
        assert inertia(a, method=method).as_tuple() == (2, 0, 3)
        # |∇R| = 1e-7: |λ| <= 5e-7 may be smeared zeros; the gap 5e-7 -> 1 (2e6) is clear
        res = inertia(a, grad_norm=1e-7, method=method)
        assert res.as_tuple() == (1, 3, 1) and not res.ambiguous
        assert res.tol == pytest.approx(1e-6, rel=1e-12)  # the gap's middle capped at 10·|∇R|
        # |∇R| = 1: the old default tol = 10·|∇R| = 10 > max|λ| counted (0, 5, 0) with gap
        # inf, unambiguous; the threshold now stays in the gap, below every |λ| >= 1
        res = inertia(a, grad_norm=1.0, method=method)
        assert res.as_tuple() == (1, 3, 1) and not res.ambiguous
        assert res.tol == pytest.approx(math.sqrt(5e-7 * 1.0), rel=1e-9)
        assert res.method == "eigh"  # the spectrum in the window decides (see inertia())
    # critical (10·|∇R| below the rounding level): ldl factorizes at the rounding level
    res = inertia(a, grad_norm=1e-18, method="ldl")
    assert res.method == "ldl" and res.as_tuple() == (2, 0, 3)
    # float32 matrix: eps of float32 in the tolerance
    assert inertia(a.float()).tol == pytest.approx(5 * 2.0**-23 * 2.0, rel=1e-5)


@pytest.mark.parametrize("method", ["eigh", "ldl"])
def test_non_critical_without_a_clear_gap_is_ambiguous_and_counts_signs(method: str) -> None:
    """Neighbouring |λ| at ratios <= 30 from 1e-6 to 4: at |∇R| = 0.1 none of the small
    ones can be told from a smeared zero. The old default (tol = 10·|∇R| = 1) counted
    (0, 5, 2), unambiguous."""
    lam = [-4.0, -0.3, -0.01, -1e-4, 3e-6, -1e-6, 0.02, 2.5]
    a = _with_spectrum(lam, seed=5)
    res = inertia(a, grad_norm=0.1, method=method)
    assert res.as_tuple() == (5, 0, 3)
    assert res.ambiguous and res.gap < 1e3
    assert res.tol == pytest.approx(8 * 2.0**-52 * 4.0, rel=1e-9)  # the rounding level
    # explicit tol: counted there, gap around it; no gradient term
    assert inertia(a, tol=1e-5, grad_norm=0.1, method=method).as_tuple() == (4, 2, 2)


@pytest.mark.parametrize("method", ["eigh", "ldl"])
def test_all_zero_count_is_never_unambiguous_for_a_nonzero_matrix(method: str) -> None:
    """A tol above max|λ| counted (0, n, 0) with gap inf, 'not ambiguous'."""
    a = _with_spectrum([-1.0, 0.5, 2.0], seed=6)
    res = inertia(a, tol=3.0, method=method)
    assert res.as_tuple() == (0, 3, 0)
    assert res.gap == 1.0 and res.ambiguous
    zero = torch.zeros(3, 3, dtype=F64)
    res = inertia(zero, grad_norm=1.0, method=method)
    assert res.as_tuple() == (0, 3, 0) and res.gap == math.inf and not res.ambiguous


def test_auto_method_by_size() -> None:
    small = _with_spectrum([1.0, -1.0, 0.0])
    assert inertia(small).method == "eigh"
    n = AUTO_LDL_MIN_SIZE
    big = torch.diag(torch.linspace(-1, 1, n, dtype=F64) + 1e-3)
    res = inertia(big)
    assert res.method == "ldl"
    assert res.as_tuple() == _counts(torch.diagonal(big), res.tol)


def test_inertia_dataclass_behaviour() -> None:
    a = Inertia(2, 1, 6, tol=1.2e-10, gap=3.4e5, ambiguous=False, method="eigh")
    assert tuple(a) == (2, 1, 6) and a.as_tuple() == (2, 1, 6) and a.total == 9
    neg, zero, pos = a
    assert (neg, zero, pos) == (2, 1, 6)
    assert str(a) == "Inertia(-2, 0=1, +6; tol=1.2e-10, gap=3.4e+05)"
    b = Inertia(1, 1, 0, tol=1e-9, gap=50.0, ambiguous=True, method="closed-form")
    s = a + b
    assert s.as_tuple() == (3, 2, 6)
    assert s.tol == 1e-9 and s.gap == 50.0 and s.ambiguous
    assert s.method == "eigh+closed-form"
    assert "ambiguous" in str(s)
    with pytest.raises(AttributeError):
        a.negative = 3  # type: ignore[misc]
    assert (a + a).method == "eigh"


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="square"):
        inertia(torch.ones(2, 3))
    with pytest.raises(ValueError, match="method must be"):
        inertia(torch.eye(2), method="qr")
    with pytest.raises(ValueError, match="tol must be"):
        inertia(torch.eye(2), tol=-1.0)
    with pytest.raises(TypeError, match="floating"):
        inertia(torch.eye(2, dtype=torch.int64))


def test_eigenvalues_helper_sorted_float64() -> None:
    lam = [3.0, -1.0, 0.5]
    out = eigenvalues(_with_spectrum(lam).float())
    assert out.dtype == F64
    assert torch.allclose(out, torch.tensor(sorted(lam), dtype=F64), atol=1e-6)


def _brute(net: nn.Module, x: Tensor, y: Tensor, loss: Any = None) -> tuple[Tensor, float]:
    """Eigenvalues and gradient norm by torch.autograd.functional on the flat parameters."""
    loss = nn.functional.mse_loss if loss is None else loss
    params = dict(net.named_parameters())
    sizes = [p.numel() for p in params.values()]
    theta = torch.cat([p.detach().reshape(-1) for p in params.values()])

    def f(t: Tensor) -> Tensor:
        d = {n: c.view_as(p) for (n, p), c in zip(params.items(), torch.split(t, sizes))}
        out: Tensor = loss(torch.func.functional_call(net, d, (x,)), y)
        return out

    lam = torch.linalg.eigvalsh(torch.autograd.functional.hessian(f, theta))
    return lam, float(torch.autograd.functional.jacobian(f, theta).norm())


def test_hessian_inertia_matches_brute_force_counts() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(15, 2, dtype=F64, generator=g)
    y = torch.randn(15, 2, dtype=F64, generator=g)
    lam, gnorm = _brute(net, x, y)
    tol, expect, ambiguous = reference_rule(lam, gnorm)
    res = hessian_inertia(net, nn.MSELoss(), x, y)  # no warning: the flag says it
    assert res.as_tuple() == expect and res.ambiguous == ambiguous
    assert res.tol == pytest.approx(tol, rel=1e-9)
    assert res.tol < 1e-3 * gnorm  # not the old 10·|∇R|
    res = hessian_inertia(net, nn.MSELoss(), x, y, tol=1e-9)
    assert res.as_tuple() == _counts(lam, 1e-9) and res.negative > 0


def _issue_case(name: str) -> tuple[nn.Module, Any, Tensor, Tensor]:
    """The non-critical points of issue 11 §2, rebuilt: a random 4-16-16-1 tanh MLP
    (P = 369), the same after 300 Adam steps, a 6-24-24-3 cross-entropy MLP (P = 843)."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if name == "cross-entropy":
        net = nn.Sequential(
            nn.Linear(6, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, 3)
        ).double()
        x = torch.randn(64, 6, generator=g, dtype=F64)
        return net, nn.functional.cross_entropy, x, torch.randint(0, 3, (64,), generator=g)
    net = nn.Sequential(
        nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1)
    ).double()
    x = torch.randn(64, 4, generator=g, dtype=F64)
    y = torch.sin(x.sum(1, keepdim=True))
    if name == "adam-300":
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        for _ in range(300):
            opt.zero_grad()
            nn.functional.mse_loss(net(x), y).backward()
            opt.step()
    return net, nn.functional.mse_loss, x, y


@pytest.mark.parametrize("name", ["random", "adam-300", "cross-entropy"])
def test_default_counts_at_non_critical_points_match_brute_force(name: str) -> None:
    """Issue 11 §2: with tol = max(P·eps·‖H‖, 10·|∇R|) these counted (0, 369, 0),
    (0, 843, 0) with gap inf and not ambiguous, and (0, 350, 19) after the Adam steps;
    the eigenvalues say (183, 0, 186), (408, 25, 410) (25 exact zeros: softmax is
    invariant under a shift of the last layer's 24 weight columns and bias, behind a gap
    of 6.7e4) and (148, 0, 221); the first and the last have no clear gap (ambiguous)."""
    net, loss, x, y = _issue_case(name)
    lam, gnorm = _brute(net, x, y, loss)
    n = lam.numel()
    rounding = n * 2.0**-52 * float(lam.abs().max())
    assert 10 * gnorm > 1e6 * rounding  # far from critical
    tol, expect, ambiguous = reference_rule(lam, gnorm)
    res = hessian_inertia(net, loss, x, y)
    assert res.as_tuple() == expect and res.ambiguous == ambiguous
    assert res.tol == pytest.approx(tol, rel=1e-6)
    assert res.zero < n
    if name == "cross-entropy":
        assert res.zero == 25 and not res.ambiguous and res.tol == pytest.approx(rounding)
    else:  # no structural zero: the signs of the eigenvalues
        assert res.as_tuple() == _counts(lam, rounding) and res.zero == 0
    assert res.ambiguous == (name != "cross-entropy")


def test_hessian_inertia_of_split_critical_point_fig3a() -> None:
    """Paper Fig. 3(a): width-2 tanh at a critical point, split -> one more negative, zero."""
    import torch_embed
    from torch_embed.critical import critical_point

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 2), nn.Tanh(), nn.Linear(2, 1)).double()
    x = torch.linspace(-2, 2, 20, dtype=F64).unsqueeze(1)
    y = torch.tanh(3 * (x - 1)) + torch.tanh(3 * (x + 1)) + 0.5 * torch.tanh(3 * x)
    assert critical_point(net, nn.MSELoss(), x, y).converged
    counts = []
    for width in (2, 3, 4):
        if width > 2:
            torch_embed.widen(net, [width], "split", generator=torch.Generator().manual_seed(width))
        lam, gnorm = _brute(net, x, y)
        tol, expect, ambiguous = reference_rule(lam, gnorm)
        res = hessian_inertia(net, nn.MSELoss(), x, y)
        assert res.as_tuple() == expect == _counts(lam, tol)
        assert not ambiguous and not res.ambiguous and res.gap > 1e6
        counts.append(res.as_tuple())
    assert [c[0] for c in counts] == [0, 1, 2]
    assert [c[1] for c in counts] == [0, 1, 2]


def test_non_symmetric_matrix_refused_not_counted_from_one_triangle() -> None:
    """Counting the lower triangle of a non-symmetric matrix silently disagreed with
    eigenvalues() (which symmetrizes): [[1, 5], [0, 1]] counted (0, 0, 2), its
    symmetric part has eigenvalues -1.5 and 3.5."""
    b = torch.tensor([[1.0, 5.0], [0.0, 1.0]], dtype=F64)
    for call in (lambda: inertia(b), lambda: inertia(b, method="ldl"), lambda: eigenvalues(b)):
        with pytest.raises(ValueError, match=r"not symmetric: \|A\[0, 1\] - A\[1, 0\]\| = 5"):
            call()
    lam = [-2.0, -1e-3, 0.0, 0.0, 0.5, 3.0]
    a = _with_spectrum(lam, seed=11)
    a[4, 1] += 1e-3  # a real asymmetry far from the diagonal, in a larger matrix
    with pytest.raises(ValueError, match=r"A\[1, 4\] - A\[4, 1\]"):
        inertia(a, tol=1e-9)
    # rounding-level asymmetry (e.g. from torch.autograd.functional.hessian) is accepted
    a = _with_spectrum(lam, seed=11)
    a[4, 1] *= 1 + 1e-13
    for method in ("eigh", "ldl"):
        assert inertia(a, tol=1e-9, method=method).as_tuple() == (2, 2, 2)
    assert inertia(a.float(), tol=1e-5).as_tuple() == (2, 2, 2)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("method", ["eigh", "ldl"])
def test_non_finite_entry_refused_with_its_index(bad: float, method: str) -> None:
    """Before: NaN on the diagonal raised LAPACK's 'ill-conditioned' error; NaN in the
    upper triangle was silently ignored, counted as (0, 0, 3)."""
    for index in ((1, 1), (0, 2), (2, 0)):
        a = torch.eye(3, dtype=F64)
        a[index] = bad
        with pytest.raises(ValueError, match=rf"non-finite entry .* at \({index[0]}, {index[1]}\)"):
            inertia(a, method=method)
        with pytest.raises(ValueError, match="non-finite"):
            inertia(a, method=method, tol=1e-9)
    with pytest.raises(ValueError, match="grad_norm must be"):
        inertia(torch.eye(2, dtype=F64), grad_norm=bad)


def test_float32_matrix_with_float32_rounding_asymmetry_is_accepted() -> None:
    """The symmetry check scales with the eps of the matrix's own dtype: a float32 Hessian
    (e.g. from torch.autograd.functional.hessian, never symmetrized) is asymmetric at
    float32 rounding, ~1e-7·max|A|, far above float64's sqrt(eps)."""
    lam = [-2.0, -1.0, 0.5, 1.0, 3.0, 4.0]
    a = _with_spectrum(lam, seed=3).float()
    a[4, 1] += 1e-5 * float(a.abs().max())  # < sqrt(eps32)·max|A| ≈ 3.5e-4·max|A|
    assert not torch.equal(a, a.T)
    for method in ("eigh", "ldl"):
        assert inertia(a, method=method).as_tuple() == (2, 0, 4)
    torch.testing.assert_close(eigenvalues(a), torch.tensor(lam, dtype=F64), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="not symmetric"):  # the same asymmetry in float64
        inertia(a.double())


@pytest.mark.parametrize("n", [2, 7, 8, 10])
def test_small_matrices_ldl_tolerance_and_gap_equal_eigh(n: int) -> None:
    """Lanczos is exact once its steps reach n (10 for max|λ|, 8 on each shifted inverse
    for the gap): on small matrices ldl's default tolerance and its gap estimate must equal
    the exact eigh values (one Lanczos step short gives a tolerance or a gap that is off;
    n = 10 > 8 checks the tolerance only)."""
    lam = torch.tensor([-2.0, -0.3, -4e-7, 1e-7, 3e-7, 0.7, 5.0, 1.5, -9.0, 2.5][:n], dtype=F64)
    if n == 2:
        lam = torch.tensor([-0.3, 5.0], dtype=F64)
    a = _with_spectrum(lam, seed=n)
    e, ldl = inertia(a, method="eigh"), inertia(a, method="ldl")
    assert e.as_tuple() == ldl.as_tuple()
    assert ldl.tol == pytest.approx(e.tol, rel=1e-9, abs=0)
    tol = 1e-6  # zeros at 1e-7..4e-7: resolved well by the shifted factorizations
    e, ldl = inertia(a, tol=tol, method="eigh"), inertia(a, tol=tol, method="ldl")
    assert e.as_tuple() == ldl.as_tuple() == _counts(lam, tol)
    if n > 2:
        assert e.gap == pytest.approx(0.3 / 4e-7, rel=1e-6)
    if n <= 8:
        assert ldl.gap == pytest.approx(e.gap, rel=1e-6)


def test_gap_counts_an_eigenvalue_exactly_at_tol_as_zero() -> None:
    """Zero means |λ| <= tol, so an eigenvalue exactly at tol is the largest "zero" of the
    gap ratio: diag(-1, 0.5, tol, 2) has gap 0.5/tol = 512, ambiguous; counting it as
    "above" gave gap inf."""
    tol = 2.0**-10
    h = torch.diag(torch.tensor([-1.0, 0.5, tol, 2.0], dtype=F64))
    assert float(torch.linalg.eigvalsh(h)[1]) == tol  # exact in float64
    res = inertia(h, tol=tol, method="eigh")
    assert res.as_tuple() == (1, 1, 2)
    assert res.gap == 0.5 / tol and res.ambiguous


def test_auto_method_by_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 11 §5: off the CPU eigh always (an H200: eigh 0.51 s, ldl 5.74 s at n = 8000)."""
    import sys

    from torch_embed.inertia import auto_method

    n = AUTO_LDL_MIN_SIZE
    for device in ("cuda", "cuda:1", torch.device("cuda", 0), "meta", "mps", "xpu"):
        assert auto_method(n, device) == "eigh"
        assert auto_method(100 * n, device) == "eigh"
    for device in ("cpu", torch.device("cpu")):
        assert auto_method(n - 1, device) == "eigh"
        assert auto_method(n, device) == "ldl"
    with pytest.raises(ValueError, match=r"device must be a torch\.device"):
        auto_method(n, "gpu0")
    with pytest.raises(ValueError, match="n must be >= 0"):
        auto_method(-1, "cpu")
    with pytest.raises(TypeError, match="n must be an int"):
        auto_method(10.0, "cpu")  # type: ignore[arg-type]
    # inertia(method="auto") asks with the matrix's own device
    mod = sys.modules["torch_embed.inertia"]
    asked: list[tuple[int, torch.device]] = []

    def spy(size: int, device: torch.device | str) -> str:
        asked.append((size, torch.device(device)))
        return "eigh"  # as it would off the CPU

    monkeypatch.setattr(mod, "auto_method", spy)
    big = torch.diag(torch.linspace(-1, 1, n, dtype=F64) + 1e-3)
    assert inertia(big).method == "eigh"
    assert asked == [(n, torch.device("cpu"))]
