"""Inertia (numbers of negative, zero and positive eigenvalues) of a symmetric matrix.

A "zero" eigenvalue is one with ``|λ| <= tol``. The default tolerance is the one of
docs/guide/inertia.md, "Tolerance, gap ratio, ambiguity" (see :func:`default_tolerance`);
every result carries the tolerance, the *gap ratio* around it and an ``ambiguous`` flag,
because a zero count is only as good as the separation between the near-zero cluster
and the rest of the spectrum.

Two methods:

- ``"eigh"``: all eigenvalues in float64 (:func:`torch.linalg.eigvalsh`), then count.
- ``"ldl"``: Sylvester's law of inertia. The Bunch-Kaufman factorization
  ``H - τI = L D Lᵀ`` (:func:`torch.linalg.ldl_factor`, LAPACK ``sytrf``) has a
  block-diagonal ``D`` (1×1 and 2×2 blocks) with the same inertia as ``H - τI``, so the
  positive eigenvalues of ``D`` count the eigenvalues of ``H`` above ``τ``; a second
  factorization of ``H + τI`` counts those below ``-τ``. The pivots are never
  thresholded (they are not eigenvalues); only the signs of ``D``'s blocks are used.

``"auto"`` (:func:`auto_method`) uses ``"eigh"`` on every non-CPU device, and on the
CPU below ``n = 500`` (:data:`AUTO_LDL_MIN_SIZE`), ``"ldl"`` from there on. On a GPU
the ranking flips: on an H200 at ``n = 8000`` eigh took 0.51 s and ldl 5.74 s (issue
11; ``python bench/inertia.py --part 2 --device cuda``). On the CPU, measured with
torch's MKL on a 2-core AMD EPYC (``python bench/inertia.py --part 2 --threads 1
--sizes 300 400 500 600 700 800 1000 1500 2000 4000``, ``bench/RESULTS.md``, "Part 2:
the CPU crossover"), the process CPU time of eigh over ldl was 0.81 at ``n = 300``,
1.09 at 400, 1.40 at 500, 1.58-2.16 from 600 to 1000 and 1.4-1.8 up to 4000; ldl was
faster at every ``n >= 500`` in each of the three usable runs (1.04x at 500 with two
threads), while at 400 they disagreed (a two-thread run under load average 10 gave
erratic ratios of 0.34-10.6 and was discarded). Two factorizations can win by at most
about 2x there, because one ``sytrf`` costs about a quarter of the tridiagonal reduction
``sytrd`` inside ``eigvalsh`` (``n³/3`` against ``4n³/3`` flops) and runs at a similar
speed; where a LAPACK's ``sytrf`` is faster relative to ``sytrd``, the ratio grows.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "AUTO_LDL_MIN_SIZE",
    "DEFAULT_GRAD_FACTOR",
    "DEFAULT_MIN_GAP",
    "Inertia",
    "auto_method",
    "default_tolerance",
    "eigenvalues",
    "hessian_inertia",
    "inertia",
]


#: Gap ratio below which a zero count is flagged as ambiguous.
DEFAULT_MIN_GAP = 1e3
#: ``c`` in ``tol = max(n·eps·max|λ|, c·|∇R|)``.
DEFAULT_GRAD_FACTOR = 10.0
#: ``method="auto"`` switches from eigh to ldl at this size, on the CPU only (the
#: measured crossover, see the module docstring).
AUTO_LDL_MIN_SIZE = 500
_LANCZOS_STEPS = 8


@dataclass(frozen=True)
class Inertia:
    """Numbers of negative, zero and positive eigenvalues, with how they were counted.

    Attributes:
        negative: Eigenvalues below ``-tol``.
        zero: Eigenvalues with ``|λ| <= tol``.
        positive: Eigenvalues above ``tol``.
        tol: The tolerance used.
        gap: Gap ratio: the smallest ``|λ|`` above ``tol`` over the largest ``|λ|`` at
            or below ``tol`` (``inf`` when one side is empty or the zeros are exact).
            With ``"ldl"`` it is an estimate (see :func:`inertia`).
        ambiguous: ``gap`` is below the threshold (``1e3`` by default): moving ``tol``
            within the gap could change the counts.
        method: How the counts were obtained, e.g. ``"eigh"``, ``"ldl"``,
            ``"eigh+closed-form"`` for a sum.

    Example:
        >>> a = Inertia(1, 0, 3, tol=1e-12, gap=math.inf, ambiguous=False, method="eigh")
        >>> neg, zero, pos = a
        >>> (a + Inertia(1, 1, 0, 1e-10, 5e4, False, "closed-form")).as_tuple()
        (2, 1, 3)
        >>> print(a)
        Inertia(-1, 0=0, +3; tol=1e-12, gap=inf)
    """

    negative: int
    zero: int
    positive: int
    tol: float = 0.0
    gap: float = math.inf
    ambiguous: bool = False
    method: str = ""

    def __iter__(self) -> Iterator[int]:
        """Unpack as ``negative, zero, positive``."""
        return iter((self.negative, self.zero, self.positive))

    def as_tuple(self) -> tuple[int, int, int]:
        """``(negative, zero, positive)``."""
        return (self.negative, self.zero, self.positive)

    @property
    def total(self) -> int:
        """The matrix size ``negative + zero + positive``."""
        return self.negative + self.zero + self.positive

    def __add__(self, other: object) -> Inertia:
        """Inertia of a direct sum (e.g. ``before + change``): counts add.

        The result keeps the larger tolerance, the smaller gap, is ambiguous when
        either part is, and joins distinct methods with ``+``.
        """
        if not isinstance(other, Inertia):
            return NotImplemented
        methods = [m for m in (self.method, other.method) if m]
        method = "+".join(dict.fromkeys(methods))
        return Inertia(
            self.negative + other.negative,
            self.zero + other.zero,
            self.positive + other.positive,
            tol=max(self.tol, other.tol),
            gap=min(self.gap, other.gap),
            ambiguous=self.ambiguous or other.ambiguous,
            method=method,
        )

    def __str__(self) -> str:
        """E.g. ``Inertia(-2, 0=1, +6; tol=1.2e-10, gap=3.4e+05, ambiguous)``."""
        flag = ", ambiguous" if self.ambiguous else ""
        return (
            f"Inertia(-{self.negative}, 0={self.zero}, +{self.positive}; "
            f"tol={self.tol:.2g}, gap={self.gap:.2g}{flag})"
        )


def default_tolerance(
    eig_max_abs: float,
    n: int,
    dtype: torch.dtype,
    grad_norm: float | None = None,
    c: float = DEFAULT_GRAD_FACTOR,
) -> float:
    """The zero threshold ``max(n·eps·max|λ|, c·|∇R|)``.

    The rule of docs/guide/inertia.md, "Tolerance, gap ratio, ambiguity". The first term
    is the backward error of a symmetric eigen-solve (or an LDLᵀ factorization) of an
    ``n×n`` matrix whose entries are known to ``eps`` relative accuracy (``eps`` of
    ``dtype``, the dtype the matrix was computed in); the second covers the residual
    gradient: away from an exact critical point a structural zero eigenvalue moves by
    ``O(|∇R|)``. ``c = 10`` by default.

    Args:
        eig_max_abs: The spectral norm ``max|λ|`` (an estimate is fine).
        n: The matrix size.
        dtype: The dtype the matrix entries were computed in.
        grad_norm: ``|∇R|`` (Euclidean) at the point, if known.
        c: The factor on the gradient norm.

    Example:
        >>> default_tolerance(2.0, 100, torch.float64) == 100 * 2.0**-52 * 2.0
        True
        >>> default_tolerance(2.0, 100, torch.float64, grad_norm=1e-9)
        1e-08
    """
    if grad_norm is not None and not (math.isfinite(grad_norm) and grad_norm >= 0):
        raise ValueError(f"grad_norm must be a finite number >= 0, got {grad_norm!r}")
    eps = float(torch.finfo(dtype).eps)
    tol = n * eps * float(eig_max_abs)
    if grad_norm is not None:
        tol = max(tol, c * float(grad_norm))
    return tol


def _gap(below: float | None, above: float | None) -> float:
    """``above / below`` with ``inf`` when a side is empty or ``below`` is zero."""
    if below is None or above is None or below == 0.0:
        return math.inf
    return above / below


def eigenvalues(matrix: Tensor) -> Tensor:
    """The ascending float64 spectrum of a symmetric matrix (symmetrized first).

    Example:
        >>> eigenvalues(torch.tensor([[2.0, 0.0], [0.0, -1.0]]))
        tensor([-1.,  2.], dtype=torch.float64)
    """
    mat = _as_square(matrix).to(torch.float64)
    _check_symmetric(mat, matrix.dtype)
    lam: Tensor = torch.linalg.eigvalsh((mat + mat.T) / 2)
    return lam


def _as_square(matrix: Tensor) -> Tensor:
    if not isinstance(matrix, Tensor) or matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        shape = tuple(matrix.shape) if isinstance(matrix, Tensor) else type(matrix).__name__
        raise ValueError(f"expected a square (n, n) tensor, got {shape}")
    if not matrix.is_floating_point():
        raise TypeError(f"expected a floating-point matrix, got {matrix.dtype}")
    return matrix


def _check_symmetric(mat: Tensor, src_dtype: torch.dtype, block: int = 256) -> None:
    """Refuse non-finite entries and a clearly non-symmetric matrix (float64 ``mat``).

    Symmetric means ``max|A - Aᵀ| <= sqrt(eps)·max|A|`` (``eps`` of ``src_dtype``): far
    above the rounding asymmetry of any Hessian routine, far below a real one. Checked
    block pair by block pair (``O(n²)``, small temporaries).
    """
    n = mat.shape[0]
    scale = max(abs(float(v)) for v in torch.aminmax(mat)) if n else 0.0  # no n×n temporary
    if not math.isfinite(scale):
        r, c = (int(k) for k in (~torch.isfinite(mat)).nonzero()[0])
        raise ValueError(
            f"the matrix has a non-finite entry ({float(mat[r, c])}) at ({r}, {c}); its "
            f"inertia is undefined (was the Hessian computed where the loss overflows?)"
        )
    limit = math.sqrt(float(torch.finfo(src_dtype).eps)) * scale
    for i in range(0, n, block):
        for j in range(i, n, block):
            diff = (mat[i : i + block, j : j + block] - mat[j : j + block, i : i + block].T).abs()
            if float(diff.amax()) > limit:
                k = int(diff.argmax())
                worst = float(diff.view(-1)[k])
                r, c = i + k // diff.shape[1], j + k % diff.shape[1]
                raise ValueError(
                    f"the matrix is not symmetric: |A[{r}, {c}] - A[{c}, {r}]| = {worst:.3g} "
                    f"> sqrt(eps)·max|A| = {limit:.3g}; inertia needs a symmetric matrix "
                    f"(pass (A + A.T) / 2 if the asymmetry is only rounding)"
                )


def _inertia_eigh(
    mat: Tensor, tol: float | None, grad_norm: float | None, src_dtype: torch.dtype, min_gap: float
) -> Inertia:
    lam = torch.linalg.eigvalsh(mat)
    n = lam.numel()
    lam_max = float(lam.abs().max()) if n else 0.0
    if tol is None:
        tol = default_tolerance(lam_max, n, src_dtype, grad_norm)
    mag = lam.abs()
    small = mag <= tol
    neg = int((lam < -tol).sum())
    pos = int((lam > tol).sum())
    below = float(mag[small].max()) if bool(small.any()) else None
    above = float(mag[~small].min()) if bool((~small).any()) else None
    gap = _gap(below, above)
    return Inertia(neg, n - neg - pos, pos, float(tol), gap, gap < min_gap, "eigh")


def _block_signs(ld: Tensor, pivots: Tensor) -> tuple[int, int]:
    """(negative, positive) eigenvalue counts of the block-diagonal D of ``ldl_factor``."""
    n = ld.shape[0]
    diag = ld.diagonal().cpu().tolist()
    sub = ld.diagonal(-1).cpu().tolist()
    piv = pivots.cpu().tolist()
    neg = pos = 0
    k = 0
    while k < n:
        if piv[k] > 0 or k == n - 1:
            d = diag[k]
            neg += d < 0
            pos += d > 0
            k += 1
            continue
        a, b, c = diag[k], sub[k], diag[k + 1]
        det = a * c - b * b
        if det < 0:
            neg, pos = neg + 1, pos + 1
        elif det > 0:
            neg, pos = (neg + 2, pos) if a + c < 0 else (neg, pos + 2)
        else:
            tr = a + c
            neg += tr < 0
            pos += tr > 0
        k += 2
    return neg, pos


def _spectral_norm_estimate(mat: Tensor, steps: int = 10) -> float:
    """A lower bound on ``max|λ|``: the largest ``|Ritz value|`` of ``steps`` Lanczos steps.

    Extreme Ritz values converge fast (typically to a few digits in 10 steps) and
    always lie inside the spectrum, so the estimate never exceeds ``max|λ|``.
    """
    if mat.shape[0] == 0:
        return 0.0
    lo, hi = _lanczos_extremes(lambda v: mat @ v, mat.shape[0], mat.dtype, mat.device, steps)
    return max(abs(lo), abs(hi))


def _lanczos_extremes(
    apply: Callable[[Tensor], Tensor],
    n: int,
    dtype: torch.dtype,
    device: torch.device,
    steps: int,
) -> tuple[float, float]:
    """Extreme Ritz values (min, max) of a symmetric operator: Lanczos, full reorthogonalization."""
    k = min(steps, n)
    gen = torch.Generator(device=device).manual_seed(1)
    q = torch.randn(n, 1, dtype=dtype, device=device, generator=gen)
    basis = [q / q.norm()]
    alphas: list[float] = []
    betas: list[float] = []
    for j in range(k):
        w = apply(basis[j])
        alphas.append(float((basis[j] * w).sum()))
        qmat = torch.cat(basis, dim=1)
        w = w - qmat @ (qmat.T @ w)
        w = w - qmat @ (qmat.T @ w)
        beta = float(w.norm())
        if j == k - 1 or beta <= 1e-14 * max(abs(a) for a in alphas):
            break
        betas.append(beta)
        basis.append(w / beta)
    m = len(alphas)
    tri = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if m > 1:
        off = torch.tensor(betas[: m - 1], dtype=torch.float64)
        tri += torch.diag(off, 1) + torch.diag(off, -1)
    theta = torch.linalg.eigvalsh(tri)
    return float(theta[0]), float(theta[-1])


def _inverse_extremes(ld: Tensor, pivots: Tensor) -> tuple[float, float]:
    """Extreme Ritz values of ``(LDLᵀ)⁻¹`` (solves with the factorization)."""
    return _lanczos_extremes(
        lambda v: torch.linalg.ldl_solve(ld, pivots, v),
        ld.shape[0],
        ld.dtype,
        ld.device,
        _LANCZOS_STEPS,
    )


def _inertia_ldl(
    mat: Tensor, tol: float | None, grad_norm: float | None, src_dtype: torch.dtype, min_gap: float
) -> Inertia:
    n = mat.shape[0]
    if tol is None:
        tol = default_tolerance(_spectral_norm_estimate(mat), n, src_dtype, grad_norm)
    # One working copy, shifted in place: sytrf reads the lower triangle of H - τI, then
    # of H + τI (an info > 0 from ldl_factor_ex is an exact zero pivot: counted as zero).
    work = mat.clone()
    diag = work.diagonal()
    diag -= tol
    ld_up, piv_up, _ = torch.linalg.ldl_factor_ex(work)
    _, pos = _block_signs(ld_up, piv_up)
    diag += 2 * tol
    ld_dn, piv_dn, _ = torch.linalg.ldl_factor_ex(work)
    del work, diag
    neg, _ = _block_signs(ld_dn, piv_dn)
    zero = n - neg - pos
    # Gap estimate: Lanczos on the shifted inverses finds the eigenvalues of H nearest
    # to +tol and -tol from either side (lambda = shift + 1/theta for a Ritz value theta).
    below: float | None = None
    above: float | None = None
    if tol > 0 and zero > 0 and zero < n:
        th_min, th_max = _inverse_extremes(ld_up, piv_up)
        cand_above = [tol + 1 / th_max] if pos > 0 and th_max > 0 else []
        cand_below = [abs(tol + 1 / th_min)] if th_min < 0 else []
        th_min, th_max = _inverse_extremes(ld_dn, piv_dn)
        if neg > 0 and th_min < 0:
            cand_above.append(abs(-tol + 1 / th_min))
        if th_max > 0:
            cand_below.append(abs(-tol + 1 / th_max))
        cand_below = [c for c in cand_below if c <= tol]
        below = max(cand_below) if cand_below else None
        above = min(c for c in cand_above if c > tol) if any(c > tol for c in cand_above) else None
    gap = _gap(below, above)
    return Inertia(neg, zero, pos, float(tol), gap, gap < min_gap, "ldl")


def auto_method(n: int, device: torch.device | str) -> str:
    """The method ``method="auto"`` uses for an ``n×n`` matrix on ``device``.

    ``"eigh"`` on every non-CPU device (CUDA's eigensolver is fast, its LDLᵀ slow: on an
    H200 at ``n = 8000``, eigh took 0.51 s and ldl 5.74 s) and on the CPU below
    :data:`AUTO_LDL_MIN_SIZE` (500); ``"ldl"`` on the CPU from there on, where it was
    1.4-2.2x faster in CPU time with one MKL thread (the module docstring has the
    measurement and its command).

    Args:
        n: The matrix size.
        device: The matrix's device (a :class:`torch.device` or its string).

    Returns:
        ``"eigh"`` or ``"ldl"``.

    Raises:
        ValueError: ``n`` is negative or ``device`` names no device type.
        TypeError: ``n`` is not an integer.

    Example:
        >>> auto_method(5000, "cpu"), auto_method(5000, "cuda:0"), auto_method(10, "cpu")
        ('ldl', 'eigh', 'eigh')
    """
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"auto_method: n must be an int (the matrix size), got {n!r}")
    if n < 0:
        raise ValueError(f"auto_method: n must be >= 0, got {n}")
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"auto_method: device must be a torch.device or a device string such as "
            f"'cpu' or 'cuda:0', got {device!r}"
        ) from err
    if kind != "cpu":
        return "eigh"
    return "ldl" if n >= AUTO_LDL_MIN_SIZE else "eigh"


def inertia(
    matrix: Tensor,
    *,
    tol: float | None = None,
    grad_norm: float | None = None,
    method: str = "auto",
    min_gap: float = DEFAULT_MIN_GAP,
) -> Inertia:
    """Count the negative, zero (``|λ| <= tol``) and positive eigenvalues of a symmetric matrix.

    The matrix is converted to float64 (the tolerance's ``eps`` is that of its own
    dtype). It must be symmetric: a matrix with ``max|A - Aᵀ| > sqrt(eps)·max|A|`` or a
    non-finite entry is refused; within that, both methods read only its lower triangle,
    as LAPACK does (:func:`torch_embed.hessian.hessian` returns exactly symmetric
    matrices).

    Args:
        matrix: A symmetric ``(n, n)`` floating tensor (e.g. a Hessian).
        tol: Zero threshold; default :func:`default_tolerance` with ``max|λ|`` exact
            (``"eigh"``) or estimated by 10 Lanczos steps (``"ldl"``: a lower bound,
            typically accurate to a few digits).
        grad_norm: ``|∇R|`` at the point, for the default tolerance.
        method: ``"eigh"``, ``"ldl"`` or ``"auto"`` (:func:`auto_method`: eigh off the
            CPU, and on the CPU below :data:`AUTO_LDL_MIN_SIZE`).
        min_gap: Gap ratio under which the result is flagged ``ambiguous``.

    Returns:
        An :class:`Inertia`. For ``"ldl"`` the gap is estimated by 8 Lanczos steps on
        each shifted inverse ``(H ∓ τI)⁻¹``, reusing the factorizations: its extreme
        Ritz values give the eigenvalues of ``H`` nearest to ``±τ`` on each side. Ritz
        values lie inside the spectrum, so in a clustered spectrum the estimate can be
        too large (optimistic); and zeros far below ``τ`` are only resolved to about
        ``eps·τ`` (the gap is then reported as very large or ``inf``). Use ``"eigh"``
        for an exact gap.

    Raises:
        ValueError: The matrix is not square, has a non-finite entry or is not symmetric;
            ``tol`` or ``grad_norm`` is negative or not finite; ``method`` is unknown.
        TypeError: The matrix is not a floating-point tensor.

    Example:
        >>> h = torch.diag(torch.tensor([-2.0, 0.0, 0.0, 1e-3, 5.0], dtype=torch.float64))
        >>> inertia(h).as_tuple()
        (1, 2, 2)
        >>> inertia(h, method="ldl").as_tuple()
        (1, 2, 2)
        >>> inertia(h, tol=1e-2).as_tuple()
        (1, 3, 1)
    """
    mat = _as_square(matrix)
    src_dtype = mat.dtype
    mat = mat.to(torch.float64)
    n = mat.shape[0]
    _check_symmetric(mat, src_dtype)
    if tol is not None and (not math.isfinite(tol) or tol < 0):
        raise ValueError(f"tol must be a finite number >= 0, got {tol}")
    if method == "auto":
        method = auto_method(n, mat.device)
    if method == "eigh" or n == 0:
        return _inertia_eigh(mat, tol, grad_norm, src_dtype, min_gap)
    if method == "ldl":
        return _inertia_ldl(mat, tol, grad_norm, src_dtype, min_gap)
    raise ValueError(f"method must be 'auto', 'eigh' or 'ldl', got {method!r}")


def hessian_inertia(
    model: nn.Module,
    loss_fn: Any,
    inputs: Tensor,
    targets: Any,
    *,
    tol: float | None = None,
    method: str = "auto",
    dtype: torch.dtype = torch.float64,
    min_gap: float = DEFAULT_MIN_GAP,
) -> Inertia:
    """Inertia of the loss Hessian at the model's current parameters.

    Builds the dense Hessian with :func:`torch_embed.hessian.hessian` and uses the
    gradient norm at the point in the default tolerance (:func:`default_tolerance`).
    Polish to a critical point first (:func:`torch_embed.critical.critical_point`) for a
    meaningful zero count. With the default tolerance at a point that is clearly not
    critical (``10·|∇R| > sqrt(eps)·‖H‖``, ``‖H‖`` estimated by Lanczos) the counts are
    redone with the rounding-level tolerance ``n·eps·‖H‖`` alone, and a ``UserWarning``
    says so if they differ: ``tol = 10·|∇R|`` then swallowed eigenvalues well above
    rounding, of either sign, not only the smeared structural zeros. Pass ``tol`` to
    count at a non-critical point on purpose (no check, no warning).

    Example:
        >>> from torch import nn
        >>> lin = nn.Linear(2, 1)  # least squares: Hessian 2·mean(h̃h̃ᵀ) is positive definite
        >>> x = torch.randn(10, 2, generator=torch.Generator().manual_seed(0))
        >>> y = lin(x).detach()  # a zero-residual fit: an exact minimum
        >>> hessian_inertia(lin, nn.MSELoss(), x, y).as_tuple()
        (0, 0, 3)
    """
    from torch_embed.hessian import gradient, hessian

    h = hessian(model, loss_fn, inputs, targets, dtype=dtype)
    gnorm = float(gradient(model, loss_fn, inputs, targets, dtype=dtype).norm())
    result = inertia(h, tol=tol, grad_norm=gnorm, method=method, min_gap=min_gap)
    if tol is None:
        _warn_if_not_critical(h, gnorm, dtype, result, method, min_gap)
    return result


def _warn_if_not_critical(
    h: Tensor, gnorm: float, dtype: torch.dtype, result: Inertia, method: str, min_gap: float
) -> None:
    """Warn when the gradient term of the default tolerance swallowed real eigenvalues.

    Only far from a critical point (``10·|∇R| > sqrt(eps)·‖H‖``) the counts are redone
    with the rounding-level tolerance ``n·eps·‖H‖`` alone; if they differ, eigenvalues
    well above rounding were counted as zero only because the gradient is large.
    """
    scale = _spectral_norm_estimate(h.to(torch.float64))
    if not DEFAULT_GRAD_FACTOR * gnorm > math.sqrt(float(torch.finfo(dtype).eps)) * scale:
        return
    rounding = default_tolerance(scale, h.shape[0], dtype)
    sharp = inertia(h, tol=rounding, method=method, min_gap=min_gap)
    if sharp.as_tuple() == result.as_tuple():
        return
    k = result.zero - sharp.zero
    warnings.warn(
        f"hessian_inertia: the model is not at a critical point (|∇R| = {gnorm:.3g}, "
        f"‖H‖ ≈ {scale:.3g}): the default tolerance {result.tol:.3g} "
        f"(= {DEFAULT_GRAD_FACTOR:g}·|∇R|) counts {k} eigenvalue(s) above rounding level as "
        f"zero (with the rounding-level tolerance {rounding:.3g} alone the counts would be "
        f"{sharp.as_tuple()} instead of {result.as_tuple()}). Polish first "
        f"(torch_embed.critical.critical_point) or pass tol= explicitly.",
        UserWarning,
        stacklevel=3,
    )
