"""Spectral estimates (torch_embed.spectrum) against dense float64 eigenvalues.

References are ``torch.linalg.eigvalsh`` of the dense float64 Hessian from
``torch_embed.hessian.hessian`` of small tanh MLPs at random (non-critical) points.
"""

import itertools
import math

import pytest
import torch
from torch import Tensor, nn

from torch_embed.hessian import HessianOperator, hessian
from torch_embed.spectrum import extreme_eigenvalues, hutchinson_trace, spectral_density


def _problem(widths: list[int], seed: int) -> tuple[nn.Module, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for fan_in, fan_out in itertools.pairwise(widths):
        lin = nn.Linear(fan_in, fan_out).double()
        with torch.no_grad():
            lin.weight.copy_(torch.randn(fan_out, fan_in, generator=gen) / math.sqrt(fan_in))
            lin.bias.copy_(0.1 * torch.randn(fan_out, generator=gen))
        layers += [lin, nn.Tanh()]
    net = nn.Sequential(*layers[:-1])
    x = torch.randn(64, widths[0], generator=gen, dtype=torch.float64)
    y = torch.randn(64, widths[-1], generator=gen, dtype=torch.float64)
    return net, x, y


@pytest.fixture(scope="module")
def large() -> tuple[HessianOperator, Tensor]:
    """P = 2851 (4-50-50-1): the operator and the dense eigenvalues, ascending."""
    net, x, y = _problem([4, 50, 50, 1], seed=0)
    dense = torch.linalg.eigvalsh(hessian(net, nn.MSELoss(), x, y))
    return HessianOperator(net, nn.MSELoss(), x, y), dense


@pytest.fixture(scope="module")
def small() -> tuple[HessianOperator, Tensor]:
    """P = 369 (4-16-16-1): the operator and the dense Hessian."""
    net, x, y = _problem([4, 16, 16, 1], seed=1)
    return HessianOperator(net, nn.MSELoss(), x, y), hessian(net, nn.MSELoss(), x, y)


def test_top5_and_bottom5_match_dense_eigh(large: tuple[HessianOperator, Tensor]) -> None:
    op, dense = large
    assert op.shape == (2851, 2851)
    gen = torch.Generator().manual_seed(3)
    top = extreme_eigenvalues(op, 5, "largest", generator=gen)
    bottom = extreme_eigenvalues(op, 5, "smallest", generator=gen)
    both = extreme_eigenvalues(op, 6, "both_ends", generator=gen)
    assert top.dtype == torch.float64
    torch.testing.assert_close(top, dense.flip(0)[:5], rtol=0, atol=1e-10)
    torch.testing.assert_close(bottom, dense[:5], rtol=0, atol=1e-10)
    torch.testing.assert_close(both, torch.cat([dense[:3], dense[-3:]]), rtol=0, atol=1e-10)
    # The method on the operator is the same computation.
    torch.testing.assert_close(op.top_eigenvalues(5), dense.flip(0)[:5], rtol=0, atol=1e-10)


def test_callable_and_operator_agree_and_repeated_eigenvalues_are_found() -> None:
    # Eigenvalue 9 three times at the top: one start vector sees one copy, the
    # invariant subspace is exhausted (breakdown) and the restart finds the others.
    values = torch.cat([torch.full((3,), 9.0), torch.linspace(-1.0, 1.0, 27)]).double()
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(30, 30, generator=gen, dtype=torch.float64))
    h = (q * values) @ q.T
    h = (h + h.T) / 2
    got = extreme_eigenvalues(lambda v: h @ v, 4, size=30)
    torch.testing.assert_close(got, torch.tensor([9.0, 9.0, 9.0, 1.0]).double(), atol=1e-10, rtol=0)


def test_not_converged_raises_with_the_residual() -> None:
    h = torch.diag(torch.linspace(0.0, 1.0, 400, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"not converged in 20 Lanczos steps.*residual"):
        extreme_eigenvalues(lambda v: h @ v, 5, size=400, max_iter=20)


def test_hutchinson_covers_the_trace_on_95_percent_of_seeds(
    small: tuple[HessianOperator, Tensor],
) -> None:
    op, h = small
    trace = float(h.trace())
    hits = 0
    for seed in range(40):
        estimate, error = hutchinson_trace(op, 100, generator=torch.Generator().manual_seed(seed))
        assert error > 0
        hits += abs(estimate - trace) <= 2 * error
    # With 100 probes the 2-sigma interval covers ~95%: misses ~ Binomial(40, 0.05),
    # P(more than 4 misses) ≈ 0.05. The seeds are fixed, so this is deterministic.
    assert hits >= 36, hits


def test_hutchinson_standard_error_matches_its_formula(
    small: tuple[HessianOperator, Tensor],
) -> None:
    # Var(zᵀHz) = 2 Σ_{i≠j} H_ij² for Rademacher z; the reported error estimates its sqrt/√m.
    op, h = small
    off = h - torch.diag(torch.diagonal(h))
    expected = math.sqrt(2 * float((off**2).sum()) / 400)
    _, error = hutchinson_trace(op, 400, generator=torch.Generator().manual_seed(0))
    assert 0.8 * expected < error < 1.2 * expected


def _dense_density(eigenvalues: Tensor, grid: Tensor, sigma: float) -> Tensor:
    z = (grid[:, None] - eigenvalues[None, :]) / sigma
    return torch.exp(-0.5 * z**2).mean(dim=1) / (sigma * math.sqrt(2 * math.pi))


def test_slq_density_integrates_to_one_and_matches_dense(
    small: tuple[HessianOperator, Tensor],
) -> None:
    op, h = small
    dense = torch.linalg.eigvalsh(h)
    sigma = 0.02 * float(dense[-1] - dense[0])
    grid, phi = spectral_density(
        op,
        num_probes=20,
        lanczos_steps=60,
        grid=2000,
        sigma=sigma,
        generator=torch.Generator().manual_seed(0),
    )
    assert float(torch.trapezoid(phi, grid)) == pytest.approx(1.0, abs=1e-3)
    l1 = float(torch.trapezoid((phi - _dense_density(dense, grid, sigma)).abs(), grid))
    # Measured 0.013-0.020 for generator seeds 0-4 (one probe: 0.05-0.08); the bound
    # is 2.5x the worst of those, and a density without the quadrature weights or
    # the probe average would exceed it.
    assert l1 < 0.05, l1


def test_slq_with_n_steps_is_exact_per_probe(small: tuple[HessianOperator, Tensor]) -> None:
    # With lanczos_steps = n one probe's quadrature is exact: Σ_λ (zᵀu_λ)² δ_λ.
    op, h = small
    dense, vectors = torch.linalg.eigh(h)
    gen = torch.Generator().manual_seed(5)
    grid = torch.linspace(float(dense[0]) - 1, float(dense[-1]) + 1, 500, dtype=torch.float64)
    _, phi = spectral_density(
        op, num_probes=1, lanczos_steps=369, grid=grid, sigma=0.3, generator=gen
    )
    z = (
        2.0
        * torch.randint(
            0, 2, (1, 369), generator=torch.Generator().manual_seed(5), dtype=torch.int8
        ).double()
        - 1.0
    )[0]
    weights = (vectors.T @ z) ** 2 / 369
    kernel = torch.exp(-0.5 * ((grid[:, None] - dense[None, :]) / 0.3) ** 2)
    expected = kernel @ weights / (0.3 * math.sqrt(2 * math.pi))
    torch.testing.assert_close(phi, expected, atol=1e-8, rtol=0)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda f: extreme_eigenvalues(f, 0, size=4), ValueError, r"k must be in \[1, 4\]"),
        (lambda f: extreme_eigenvalues(f, 5, size=4), ValueError, r"k must be in \[1, 4\]"),
        (lambda f: extreme_eigenvalues(f, 1.0, size=4), TypeError, "k must be an int"),
        (lambda f: extreme_eigenvalues(f, 1, "magnitude", size=4), ValueError, "which"),
        (lambda f: extreme_eigenvalues(f, 2, size=4, max_iter=1), ValueError, "max_iter"),
        (lambda f: extreme_eigenvalues(f, 1, size=4, tol=0.0), ValueError, "tol"),
        (lambda f: extreme_eigenvalues(f, 1), TypeError, "needs size="),
        (lambda f: extreme_eigenvalues(torch.eye(4), 1), TypeError, "HessianOperator or"),
        (lambda f: hutchinson_trace(f, 1, size=4), ValueError, "num_probes must be >= 2"),
        (lambda f: spectral_density(f, size=4, sigma=-1.0), ValueError, "sigma"),
        (lambda f: spectral_density(f, size=4, grid=torch.zeros(2, 2)), ValueError, "grid"),
        (lambda f: extreme_eigenvalues(lambda v: v.float(), 1, size=4), ValueError, "float64"),
    ],
)
def test_bad_arguments_are_refused(call: object, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        call(lambda v: 2 * v)  # type: ignore[operator]


def test_float32_operator_is_refused() -> None:
    net, x, y = _problem([2, 3, 1], seed=0)
    op = HessianOperator(net.float(), nn.MSELoss(), x.float(), y.float(), dtype=torch.float32)
    with pytest.raises(ValueError, match="float64 HessianOperator"):
        extreme_eigenvalues(op, 1)
    with pytest.raises(ValueError, match="disagrees"):
        hutchinson_trace(HessianOperator(net, nn.MSELoss(), x, y), 4, size=3)
    with pytest.raises(ValueError, match="device= is for a callable"):
        spectral_density(HessianOperator(net, nn.MSELoss(), x, y), device="cpu")


def test_exact_breakdown_restarts_instead_of_dividing_by_zero() -> None:
    # H = 0: the first residual is exactly zero; the basis must continue with a fresh
    # random vector (not w / 0), and every Ritz value is 0.
    got = extreme_eigenvalues(torch.zeros_like, 3, "both_ends", size=10)
    torch.testing.assert_close(got, torch.zeros(3, dtype=torch.float64), rtol=0, atol=0)
