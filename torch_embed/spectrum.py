"""Spectral estimates of a symmetric linear operator known only by its products.

Three estimates, all in float64, all from products ``H v`` only (a
:class:`~torch_embed.hessian.HessianOperator`, or any callable ``v -> H v`` with an
explicit ``size``):

- :func:`extreme_eigenvalues`: the ``k`` algebraically largest and/or smallest
  eigenvalues, by Lanczos with full reorthogonalisation;
- :func:`hutchinson_trace`: the trace from Rademacher probes, with its standard error;
- :func:`spectral_density`: the eigenvalue density, by stochastic Lanczos quadrature
  broadened by a Gaussian.

One Lanczos iteration (:func:`_lanczos`) serves the first and the last. Its basis is
kept (``steps × n`` numbers: 300 steps of ``n = 10⁶`` take 2.4 GB), which is what makes
full reorthogonalisation possible and the Ritz values free of the spurious copies
of plain Lanczos. Probes and start vectors are drawn on the CPU from a
:class:`torch.Generator` (seeded ``0`` when none is given), so results do not depend
on the global random state.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from torch_embed.hessian import HessianOperator

__all__ = ["extreme_eigenvalues", "hutchinson_trace", "spectral_density"]

MatVec = Callable[[Tensor], Tensor]
Which = Literal["largest", "smallest", "both_ends"]
_WHICH = ("largest", "smallest", "both_ends")
#: Probes per batched call of :meth:`HessianOperator.matmat` in :func:`hutchinson_trace`.
PROBE_BATCH = 32


class _Operator:
    """A float64 symmetric operator: ``n``, ``device`` and products of rows."""

    def __init__(
        self, op: HessianOperator | MatVec, size: int | None, device: torch.device | str | None
    ) -> None:
        self.op = op
        if isinstance(op, HessianOperator):
            if size is not None and size != op.shape[0]:
                raise ValueError(
                    f"size={size} disagrees with the HessianOperator's shape {op.shape}; "
                    "omit size for a HessianOperator"
                )
            if device is not None:
                raise ValueError(
                    "device= is for a callable; a HessianOperator's products are on "
                    f"{op.device} (omit device)"
                )
            if op.dtype != torch.float64:
                raise ValueError(
                    f"spectral estimates need a float64 HessianOperator, got {op.dtype}; "
                    "build it with dtype=torch.float64 (the default)"
                )
            self.n = op.shape[0]
            self.device = op.device
        elif callable(op):
            if size is None or isinstance(size, bool) or not isinstance(size, int):
                raise TypeError(
                    f"a callable v -> H v needs size= (an int, the length of v), got {size!r}"
                )
            if size < 1:
                raise ValueError(f"size must be >= 1, got {size}")
            self.n = size
            self.device = torch.device("cpu" if device is None else device)
        else:
            raise TypeError(
                f"expected a HessianOperator or a callable v -> H v, got {type(op).__name__}"
            )

    def rows(self, vectors: Tensor) -> Tensor:
        """``H v`` for each row ``v`` of a float64 ``(m, n)`` tensor."""
        if isinstance(self.op, HessianOperator):
            return self.op.matmat(vectors)
        return torch.stack([self.vec(v) for v in vectors])

    def vec(self, v: Tensor) -> Tensor:
        """``H v`` for one float64 ``(n,)`` vector, checked."""
        if isinstance(self.op, HessianOperator):
            return self.op.matvec(v)
        out = self.op(v)
        if not isinstance(out, Tensor) or out.shape != v.shape or out.dtype != torch.float64:
            got = (
                f"{tuple(out.shape)} {out.dtype}" if isinstance(out, Tensor) else type(out).__name__
            )
            raise ValueError(
                f"the matvec must map a float64 ({self.n},) tensor to a float64 "
                f"({self.n},) tensor, got {got}"
            )
        return out


def _check_count(name: str, value: int, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bound}, got {value}")


def _generator(generator: torch.Generator | None) -> torch.Generator:
    if generator is None:
        return torch.Generator().manual_seed(0)
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {generator!r}")
    return generator


def _unit_random(
    n: int, generator: torch.Generator, device: torch.device, basis: Tensor | None = None
) -> Tensor:
    """A random unit vector, orthogonal to the rows of ``basis`` if given (else zeros)."""
    v = torch.randn(n, generator=generator, dtype=torch.float64).to(device)
    if basis is not None and basis.shape[0]:
        for _ in range(2):
            v -= basis.T @ (basis @ v)
    norm = torch.linalg.vector_norm(v)
    return v / norm if norm > 0 else v


class _Lanczos:
    """Lanczos with full reorthogonalisation (classical Gram-Schmidt, applied twice).

    After ``j`` steps ``Q[:j]`` is an orthonormal basis and ``T_j = Q H Qᵀ`` is
    tridiagonal with diagonal ``alpha[:j]`` and off-diagonal ``beta[:j-1]``;
    ``beta[j-1]`` is the norm of the residual that would make the next basis vector.
    On an invariant subspace (breakdown, ``beta = 0``) the next vector is drawn at
    random orthogonal to the basis and ``T`` stays block diagonal, so repeated
    eigenvalues are found too.
    """

    def __init__(
        self, op: _Operator, start: Tensor, capacity: int, generator: torch.Generator
    ) -> None:
        self.op = op
        self.generator = generator
        self.q = torch.empty(capacity, op.n, dtype=torch.float64, device=op.device)
        self.alpha: list[float] = []
        self.beta: list[float] = []
        self.next = start / torch.linalg.vector_norm(start)
        self.scale = 0.0

    @property
    def steps(self) -> int:
        return len(self.alpha)

    def step(self) -> None:
        j = self.steps
        self.q[j] = self.next
        w = self.op.vec(self.next)
        alpha = float(self.next @ w)
        basis = self.q[: j + 1]
        for _ in range(2):
            w -= basis.T @ (basis @ w)
        beta = float(torch.linalg.vector_norm(w))
        self.alpha.append(alpha)
        self.scale = max(self.scale, abs(alpha), beta)
        if j + 1 == self.op.n:
            self.beta.append(0.0)
            return
        if beta <= 1e-12 * self.scale:
            self.beta.append(0.0)
            self.next = _unit_random(self.op.n, self.generator, self.op.device, basis)
        else:
            self.beta.append(beta)
            self.next = w / beta

    def ritz(self) -> tuple[Tensor, Tensor]:
        """Ritz values (ascending) and eigenvectors ``S`` of ``T_j`` (columns)."""
        j = self.steps
        t = torch.diag(torch.tensor(self.alpha, dtype=torch.float64))
        if j > 1:
            off = torch.tensor(self.beta[: j - 1], dtype=torch.float64)
            t += torch.diag(off, 1) + torch.diag(off, -1)
        values, vectors = torch.linalg.eigh(t)
        return values, vectors


def _wanted(j: int, k: int, which: str) -> Tensor:
    """Indices, into ``j`` ascending Ritz values, of the ``k`` wanted ones."""
    if which == "largest":
        return torch.arange(j - 1, j - 1 - k, -1)
    if which == "smallest":
        return torch.arange(k)
    low = k // 2
    return torch.cat([torch.arange(low), torch.arange(j - (k - low), j)])


def extreme_eigenvalues(
    op: HessianOperator | MatVec,
    k: int,
    which: Which = "largest",
    *,
    size: int | None = None,
    device: torch.device | str | None = None,
    max_iter: int | None = None,
    tol: float = 1e-10,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The ``k`` algebraically largest and/or smallest eigenvalues of a symmetric operator.

    Lanczos with full reorthogonalisation in float64 from one random start vector,
    without restarts. After each step (every tenth past 50) the Ritz values of the
    tridiagonal ``T`` are computed; the iteration stops when each wanted Ritz value
    ``θ`` has residual ``‖H y - θ y‖ = β |s_last| <= tol · ‖T‖`` (``y`` its Ritz
    vector). For a symmetric operator an eigenvalue lies within the residual of ``θ``
    (and within ``residual² / gap`` when ``θ`` is separated by ``gap`` from the rest of
    the spectrum), so the returned values carry that error bound. After ``n`` steps the
    Ritz values are the eigenvalues (up to rounding).

    Limits: the basis costs ``max_iter × n`` float64 numbers; a clustered end of the
    spectrum may need many steps (raise ``max_iter``), and an eigenvalue repeated
    inside the wanted set is found as often as it occurs only after Lanczos has
    exhausted an invariant subspace (one start vector sees one copy of it).

    Args:
        op: A float64 :class:`~torch_embed.hessian.HessianOperator`, or a callable
            mapping a float64 ``(size,)`` tensor to ``H v`` (``H`` symmetric).
        k: How many eigenvalues, ``1 <= k <= n``.
        which: ``"largest"`` (descending), ``"smallest"`` (ascending) or
            ``"both_ends"`` (ascending: the ``k // 2`` smallest, then the
            ``k - k // 2`` largest), all algebraic (signed), not by magnitude.
        size: ``n`` for a callable (omit for a ``HessianOperator``).
        device: Where a callable's vectors live (default CPU).
        max_iter: Most Lanczos steps (default ``min(n, max(300, 4 k))``).
        tol: Relative residual at which a Ritz value counts as converged.
        generator: Draws the start vector (default: a new one seeded 0).

    Returns:
        A float64 ``(k,)`` tensor on the operator's device, ordered as ``which`` says.

    Raises:
        ValueError: ``k`` outside ``[1, n]``, ``which`` unknown, ``max_iter`` below
            ``k`` or above ``n``, ``tol`` not positive, a non-float64 operator, a
            matvec returning the wrong shape or dtype.
        TypeError: ``op`` neither an operator nor callable; ``size``/``k``/``max_iter``
            not an int.
        RuntimeError: Not converged within ``max_iter`` steps (the message gives the
            worst residual).

    Example:
        >>> h = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
        >>> extreme_eigenvalues(lambda v: h @ v, 3, size=100)
        tensor([100.,  99.,  98.], dtype=torch.float64)
        >>> extreme_eigenvalues(lambda v: h @ v, 4, "both_ends", size=100)
        tensor([  1.,   2.,  99., 100.], dtype=torch.float64)
    """
    operator = _Operator(op, size, device)
    n = operator.n
    _check_count("extreme_eigenvalues: k", k, 1, n)
    if which not in _WHICH:
        raise ValueError(f"extreme_eigenvalues: which must be one of {_WHICH}, got {which!r}")
    if max_iter is None:
        max_iter = min(n, max(300, 4 * k))
    _check_count("extreme_eigenvalues: max_iter", max_iter, k, n)
    if not tol > 0:
        raise ValueError(f"extreme_eigenvalues: tol must be > 0, got {tol}")
    gen = _generator(generator)
    start = _unit_random(n, gen, operator.device)
    lanczos = _Lanczos(operator, start, max_iter, gen)
    worst = math.inf
    while lanczos.steps < max_iter:
        lanczos.step()
        j = lanczos.steps
        if j < k or (j > 50 and j % 10 and j < max_iter):
            continue
        values, vectors = lanczos.ritz()
        idx = _wanted(j, k, which)
        residual = lanczos.beta[-1] * vectors[-1, idx].abs()
        worst = float(residual.max()) / max(lanczos.scale, 1e-300)
        if worst <= tol or j == n:
            return values[idx].to(operator.device)
    raise RuntimeError(
        f"extreme_eigenvalues: {k} {which} Ritz values not converged in {max_iter} Lanczos "
        f"steps (worst relative residual {worst:.2e} > tol={tol:.1e}); raise max_iter"
    )


def _rademacher(m: int, n: int, generator: torch.Generator, device: torch.device) -> Tensor:
    signs = torch.randint(0, 2, (m, n), generator=generator, dtype=torch.int8)
    return (2.0 * signs.to(torch.float64) - 1.0).to(device)


def hutchinson_trace(
    op: HessianOperator | MatVec,
    num_probes: int,
    *,
    size: int | None = None,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> tuple[float, float]:
    """Hutchinson's estimate of ``tr H`` from Rademacher probes, and its standard error.

    Each probe ``z`` (independent ±1 entries) gives ``zᵀ H z``, whose mean is ``tr H``
    and variance ``2 Σ_{i≠j} H_ij²``. The estimate is the mean of ``num_probes`` such
    samples; the standard error is their sample standard deviation over
    ``sqrt(num_probes)``, so ``estimate ± 2·standard_error`` covers the trace about 95%
    of the time for enough probes (30 or more; the samples are not Gaussian). A
    diagonal ``H`` gives the exact trace with error 0.

    Args:
        op: A float64 :class:`~torch_embed.hessian.HessianOperator`, or a callable
            ``v -> H v`` with ``size``.
        num_probes: Number of probes, at least 2 (for a standard error).
        size: ``n`` for a callable.
        device: Where a callable's vectors live (default CPU).
        generator: Draws the probes (default: a new one seeded 0).

    Returns:
        ``(estimate, standard_error)`` as floats.

    Raises:
        ValueError: ``num_probes < 2``, or as :func:`extreme_eigenvalues` for ``op``.
        TypeError: As :func:`extreme_eigenvalues` for ``op``; ``num_probes`` not an int.

    Example:
        >>> a = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> estimate, error = hutchinson_trace(lambda v: a @ v, 400, size=2)
        >>> abs(estimate - 5.0) <= 4 * error, round(error, 1)
        (True, 0.1)
    """
    operator = _Operator(op, size, device)
    _check_count("hutchinson_trace: num_probes", num_probes, 2)
    gen = _generator(generator)
    samples = []
    for start in range(0, num_probes, PROBE_BATCH):
        z = _rademacher(min(PROBE_BATCH, num_probes - start), operator.n, gen, operator.device)
        samples.append((z * operator.rows(z)).sum(dim=1))
    values = torch.cat(samples)
    return float(values.mean()), float(values.std() / math.sqrt(num_probes))


def spectral_density(
    op: HessianOperator | MatVec,
    *,
    num_probes: int = 10,
    lanczos_steps: int = 80,
    grid: int | Tensor = 1000,
    sigma: float | None = None,
    size: int | None = None,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """The eigenvalue density of ``H``, by stochastic Lanczos quadrature (SLQ).

    For each Rademacher probe ``z`` (scaled to unit norm), ``lanczos_steps`` Lanczos
    steps from ``z`` give the Gauss quadrature rule (nodes ``θ_i``, weights ``τ_i``,
    the squared first components of ``T``'s eigenvectors, summing to 1) of the
    measure ``Σ_λ (zᵀu_λ)² δ_λ``, whose expectation is ``(1/n) Σ_λ δ_λ``. The density
    is their average, each node broadened by a Gaussian of standard deviation
    ``sigma``::

        φ(t) = (1/num_probes) Σ_probes Σ_i τ_i · exp(-(t-θ_i)²/(2σ²)) / (σ √(2π))

    so it integrates to 1 over the real line (the grid should extend a few ``sigma``
    past the extreme eigenvalues, as the default grid does). The dense counterpart is
    ``(1/n) Σ_λ`` of the same Gaussians; with ``lanczos_steps = n`` each probe's rule is
    exact.

    Args:
        op: A float64 :class:`~torch_embed.hessian.HessianOperator`, or a callable
            ``v -> H v`` with ``size``.
        num_probes: Number of probes (at least 1).
        lanczos_steps: Lanczos steps per probe, in ``[1, n]`` (capped at ``n``).
        grid: Points at which to evaluate the density: a 1-D tensor, or a number of
            points spread evenly from the smallest Ritz value ``- 5 sigma`` to the
            largest ``+ 5 sigma``.
        sigma: Gaussian width (default: 1% of the spread of the Ritz values, or 1 if
            they all coincide).
        size: ``n`` for a callable.
        device: Where a callable's vectors live (default CPU).
        generator: Draws the probes (default: a new one seeded 0).

    Returns:
        ``(grid, density)``, two float64 1-D tensors on the CPU.

    Raises:
        ValueError: ``num_probes < 1``, ``lanczos_steps < 1``, ``sigma <= 0``, a grid
            that is not a 1-D tensor of at least 2 points, or as
            :func:`extreme_eigenvalues` for ``op``.
        TypeError: As :func:`extreme_eigenvalues` for ``op``; counts not ints.

    Example:
        >>> h = torch.diag(torch.tensor([-1.0, -1.0, 2.0, 2.0], dtype=torch.float64))
        >>> t, phi = spectral_density(lambda v: h @ v, size=4, grid=2001, sigma=0.1)
        >>> round(float(torch.trapezoid(phi, t)), 6)
        1.0
        >>> round(float(phi[(t - 2.0).abs().argmin()] * 0.1 * (2 * math.pi) ** 0.5), 2)
        0.5
    """
    operator = _Operator(op, size, device)
    n = operator.n
    _check_count("spectral_density: num_probes", num_probes, 1)
    _check_count("spectral_density: lanczos_steps", lanczos_steps, 1)
    if sigma is not None and not sigma > 0:
        raise ValueError(f"spectral_density: sigma must be > 0, got {sigma}")
    if isinstance(grid, Tensor):
        if grid.ndim != 1 or grid.numel() < 2:
            raise ValueError(
                f"spectral_density: grid must be a 1-D tensor of >= 2 points, "
                f"got shape {tuple(grid.shape)}"
            )
    else:
        _check_count("spectral_density: grid", grid, 2)
    steps = min(lanczos_steps, n)
    gen = _generator(generator)
    nodes, weights = [], []
    for _ in range(num_probes):
        z = _rademacher(1, n, gen, operator.device)[0]
        lanczos = _Lanczos(operator, z, steps, gen)
        while lanczos.steps < steps:
            lanczos.step()
        values, vectors = lanczos.ritz()
        nodes.append(values)
        weights.append(vectors[0] ** 2)
    theta = torch.cat(nodes)
    tau = torch.cat(weights) / num_probes
    spread = float(theta.max() - theta.min())
    width = float(sigma) if sigma is not None else (0.01 * spread if spread > 0 else 1.0)
    if isinstance(grid, Tensor):
        t = grid.detach().to(device="cpu", dtype=torch.float64)
    else:
        t = torch.linspace(
            float(theta.min()) - 5 * width,
            float(theta.max()) + 5 * width,
            grid,
            dtype=torch.float64,
        )
    z = (t[:, None] - theta[None, :]) / width
    density = (torch.exp(-0.5 * z**2) @ tau) / (width * math.sqrt(2 * math.pi))
    return t, density
