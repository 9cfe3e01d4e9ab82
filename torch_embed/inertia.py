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
from collections.abc import Callable, Iterable, Iterator
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
#: ``c``: away from a critical point the default tolerance moves up from the rounding
#: level only into a clear gap whose lower side is at most ``c·|∇R|``.
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
            or below ``tol`` (``inf`` when nothing is at or below ``tol`` or the zeros
            are exact; ``1`` when every eigenvalue of a non-zero matrix is at or below
            it). With the default tolerance at a point that is not critical and without
            a clear gap, the clearest ratio of neighbouring ``|λ|`` between the rounding
            level and ``c·|∇R|``. With ``"ldl"`` it is an estimate (see :func:`inertia`).
        ambiguous: ``gap`` is below the threshold (``1e3`` by default): moving ``tol``
            within the gap could change the counts, or (default tolerance, not at a
            critical point) no clear gap tells smeared zeros from the rest.
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


def default_tolerance(eig_max_abs: float, n: int, dtype: torch.dtype) -> float:
    """The rounding level ``n·eps·max|λ|``: the default zero threshold at a critical point.

    The backward error of a symmetric eigen-solve (or an LDLᵀ factorization) of an
    ``n×n`` matrix whose entries are known to ``eps`` relative accuracy (``eps`` of
    ``dtype``, the dtype the matrix was computed in). Below it an eigenvalue cannot be
    told from zero. Away from a critical point the default threshold of :func:`inertia`
    can move up from here into a clear gap of the spectrum below ``c·|∇R|``
    (:data:`DEFAULT_GRAD_FACTOR`), never further: the rule of docs/guide/inertia.md,
    "Tolerance, gap ratio, ambiguity".

    Args:
        eig_max_abs: The spectral norm ``max|λ|`` (an estimate is fine).
        n: The matrix size.
        dtype: The dtype the matrix entries were computed in.

    Example:
        >>> default_tolerance(2.0, 100, torch.float64) == 100 * 2.0**-52 * 2.0
        True
    """
    eps = float(torch.finfo(dtype).eps)
    return n * eps * float(eig_max_abs)


def _gap(below: float | None, above: float | None) -> float:
    """``above / below`` with ``inf`` when a side is empty or ``below`` is zero."""
    if below is None or above is None or below == 0.0:
        return math.inf
    return above / below


def _gap_at(mags: Tensor, tol: float, rounding: float) -> float:
    """The gap ratio around ``tol`` of the ascending magnitudes ``mags``.

    ``inf`` when nothing is at or below ``tol`` or the zeros are exact; when nothing is
    above ``tol`` it is ``inf`` only for a numerically zero matrix (``max|λ| <=
    rounding``), else ``1``: every eigenvalue counted zero, nothing separates the zeros
    from the rest of the spectrum.
    """
    n = mags.numel()
    probe = torch.tensor([tol], dtype=mags.dtype, device=mags.device)
    k = int(torch.searchsorted(mags, probe, right=True))
    if k == n:
        return math.inf if n == 0 or float(mags[-1]) <= rounding else 1.0
    return _gap(float(mags[k - 1]) if k else None, float(mags[k]))


def _check_grad_norm(grad_norm: float | None) -> None:
    if grad_norm is not None and not (math.isfinite(grad_norm) and grad_norm >= 0):
        raise ValueError(f"grad_norm must be a finite number >= 0, got {grad_norm!r}")


def _ceiling(grad_norm: float | None) -> float:
    """``c·|∇R|``: how far smeared structural zeros may sit (0 without a gradient norm)."""
    return 0.0 if grad_norm is None else DEFAULT_GRAD_FACTOR * grad_norm


def _tolerance_and_gap(
    mags: Tensor,
    rounding: float,
    tol: float | None,
    grad_norm: float | None,
    min_gap: float,
) -> tuple[float, float]:
    """``(tol, gap ratio)`` by the rule of docs/guide/inertia.md for ascending ``mags``.

    A given ``tol`` is kept. By default ``tol`` is the rounding level; at a point that is
    not critical (``ceiling = c·|∇R|`` above the rounding level) the eigenvalues with
    ``rounding < |λ| <= ceiling`` may be smeared structural zeros, so the threshold moves
    up to the
    highest clear gap (``|λ_{k+1}| / |λ_k| >= min_gap``, ``|λ_k| <= ceiling``, at least
    one ``|λ|`` at or below it and one above it), to the geometric middle of that gap
    capped at ``ceiling``. Without one it stays at the rounding level and the gap ratio
    returned is the clearest ratio of neighbouring ``|λ|`` in the window (below
    ``min_gap``: ambiguous). No eigenvalue in the window: nothing to decide.
    """
    if tol is not None:
        return tol, _gap_at(mags, tol, rounding)
    n, ceiling = mags.numel(), _ceiling(grad_norm)
    if ceiling <= rounding or n == 0:
        return rounding, _gap_at(mags, rounding, rounding)
    bounds = torch.tensor([rounding, ceiling], dtype=mags.dtype, device=mags.device)
    k0, k_top = (int(k) for k in torch.searchsorted(mags, bounds, right=True))
    if k_top == k0:  # no eigenvalue between the rounding level and c·|∇R|
        return rounding, _gap_at(mags, rounding, rounding)
    lo, hi = max(k0, 1), min(k_top, n - 1)  # zeros mags[:k], non-zeros mags[k:]
    if lo > hi:  # n == 1 and its eigenvalue in the window
        return rounding, 1.0
    below, above = mags[lo - 1 : hi], mags[lo : hi + 1]
    ratios = above / below  # inf over exact zeros (above > rounding >= 0)
    clear = (ratios >= min_gap).nonzero()
    if clear.numel() == 0:
        return rounding, float(ratios.max())
    j = int(clear[-1])
    k, gap = lo + j, float(ratios[j])
    if k == k0:  # the gap is just above the rounding-level zeros
        return rounding, gap
    b, a = float(below[j]), float(above[j])
    return min(math.sqrt(b) * math.sqrt(a), ceiling), gap


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
    mags = lam.abs().sort().values.cpu()  # n numbers; the rule runs on the host
    rounding = default_tolerance(float(mags[-1]) if lam.numel() else 0.0, lam.numel(), src_dtype)
    tol, gap = _tolerance_and_gap(mags, rounding, tol, grad_norm, min_gap)
    neg = int((lam < -tol).sum())
    pos = int((lam > tol).sum())
    return Inertia(neg, lam.numel() - neg - pos, pos, float(tol), gap, gap < min_gap, "eigh")


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
    lo, hi = _lanczos_extremes(lambda v: mat @ v, mat.shape[0], mat.device, steps)
    return max(abs(lo), abs(hi))


def _lanczos_extremes(
    apply: Callable[[Tensor], Tensor], n: int, device: torch.device, steps: int
) -> tuple[float, float]:
    """Extreme Ritz values (min, max) of ``steps`` Lanczos steps on a float64 operator.

    The Lanczos iteration of :mod:`torch_embed.spectrum` (full reorthogonalisation; a
    fresh random direction after an invariant subspace), from a start vector seeded 1.
    """
    # Imported here: torch_embed.spectrum imports torch_embed.hessian.
    from torch_embed.spectrum import _Lanczos, _Operator, _unit_random

    op = _Operator(apply, n, device)
    k = min(steps, n)
    gen = torch.Generator().manual_seed(1)
    lanczos = _Lanczos(op, _unit_random(n, gen, op.device), k, gen)
    for _ in range(k):
        lanczos.step()
    theta = lanczos.ritz()[0]
    return float(theta[0]), float(theta[-1])


def _inverse_extremes(ld: Tensor, pivots: Tensor) -> tuple[float, float]:
    """Extreme Ritz values of ``(LDLᵀ)⁻¹`` (solves with the factorization)."""
    return _lanczos_extremes(
        lambda v: torch.linalg.ldl_solve(ld, pivots, v[:, None])[:, 0],
        ld.shape[0],
        ld.device,
        _LANCZOS_STEPS,
    )


def _inertia_ldl(
    mat: Tensor, tol: float | None, grad_norm: float | None, src_dtype: torch.dtype, min_gap: float
) -> Inertia:
    n = mat.shape[0]
    scale = _spectral_norm_estimate(mat)
    rounding = default_tolerance(scale, n, src_dtype)
    if tol is None:
        if _ceiling(grad_norm) > rounding:
            # Not critical: placing the threshold needs the spectrum between the rounding
            # level and c·|∇R|. Counting there with factorizations takes two per probed
            # shift, at least four in all (as much as eigvalsh's reduction): use eigh.
            return _inertia_eigh(mat, None, grad_norm, src_dtype, min_gap)
        tol = rounding
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
    if zero == n and n > 0 and scale > rounding:
        gap = 1.0  # every eigenvalue counted zero in a non-zero matrix (see _gap_at)
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

    The default tolerance (docs/guide/inertia.md, "Tolerance, gap ratio, ambiguity") is
    the rounding level ``n·eps·max|λ|`` (:func:`default_tolerance`). With ``grad_norm``
    at a point that is not critical (``c·|∇R|`` above the rounding level, ``c =``
    :data:`DEFAULT_GRAD_FACTOR`) it moves up into the highest clear gap (ratio of
    neighbouring ``|λ|`` at least ``min_gap``) whose lower side is at most ``c·|∇R|``,
    where smeared structural zeros sit; without such a gap it stays at the rounding level
    and the result is ``ambiguous``.

    Args:
        matrix: A symmetric ``(n, n)`` floating tensor (e.g. a Hessian).
        tol: Zero threshold; default as above, with ``max|λ|`` exact (``"eigh"``) or
            estimated by 10 Lanczos steps (``"ldl"``: a lower bound, typically accurate
            to a few digits).
        grad_norm: ``|∇R|`` at the point, for the default tolerance.
        method: ``"eigh"``, ``"ldl"`` or ``"auto"`` (:func:`auto_method`: eigh off the
            CPU, and on the CPU below :data:`AUTO_LDL_MIN_SIZE`). With the default
            tolerance at a point that is not critical, ``"ldl"`` computes the
            eigenvalues instead (the result says ``method="eigh"``): placing the
            threshold needs the spectrum between the rounding level and ``c·|∇R|``,
            and counting there by factorizations would take at least two more of them,
            about the cost of ``eigvalsh``.
        min_gap: Gap ratio under which the result is flagged ``ambiguous``, and the
            smallest gap the default tolerance moves into.

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

        Away from a critical point (``|∇R| = 1e-3``) the eigenvalue ``1e-3`` may be a
        smeared structural zero; a clear gap (2000) separates it from ``2``, so the
        threshold moves there. In a spectrum without a clear gap below ``10·|∇R|`` the
        threshold stays at the rounding level and the zero count is flagged:

        >>> inertia(h, grad_norm=1e-3).as_tuple()
        (1, 3, 1)
        >>> spread = torch.diag(torch.tensor([-2.0, 0.01, 0.3, 5.0], dtype=torch.float64))
        >>> r = inertia(spread, grad_norm=1.0)
        >>> r.as_tuple(), r.ambiguous, r.gap < 100
        ((1, 0, 3), True, True)
    """
    mat = _as_square(matrix)
    src_dtype = mat.dtype
    mat = mat.to(torch.float64)
    n = mat.shape[0]
    _check_symmetric(mat, src_dtype)
    if tol is not None and (not math.isfinite(tol) or tol < 0):
        raise ValueError(f"tol must be a finite number >= 0, got {tol}")
    _check_grad_norm(grad_norm)
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
    inputs: Tensor | None = None,
    targets: Any = None,
    *,
    data: Iterable[Any] | None = None,
    reduction: str | None = None,
    process_group: Any = None,
    tol: float | None = None,
    method: str = "auto",
    dtype: torch.dtype = torch.float64,
    min_gap: float = DEFAULT_MIN_GAP,
) -> Inertia:
    """Inertia of the loss Hessian at the model's current parameters.

    Builds the dense Hessian with :func:`torch_embed.hessian.hessian` and passes the
    gradient norm at the point to :func:`inertia`, whose default tolerance is the
    rounding level, moved up into a clear gap below ``10·|∇R|`` at a point that is not
    critical. There, without such a gap, the zero count is not determined: the result is
    flagged ``ambiguous`` (its negative and positive counts are the signs of the
    eigenvalues above rounding level). Polish to a critical point first
    (:func:`torch_embed.critical.critical_point`) for a meaningful zero count, or pass
    ``tol`` to count at a threshold of your own.

    ``data`` (an iterable of ``(inputs, targets)`` batches, instead of ``inputs,
    targets``), ``reduction`` and ``process_group`` are as in
    :func:`torch_embed.hessian.hessian`: the inertia of the whole data set's Hessian,
    the same on every rank of the group (the Hessian and the gradient are all-reduced).

    Example:
        >>> from torch import nn
        >>> lin = nn.Linear(2, 1)  # least squares: Hessian 2·mean(h̃h̃ᵀ) is positive definite
        >>> x = torch.randn(10, 2, generator=torch.Generator().manual_seed(0))
        >>> y = lin(x).detach()  # a zero-residual fit: an exact minimum
        >>> hessian_inertia(lin, nn.MSELoss(), x, y).as_tuple()
        (0, 0, 3)
    """
    from torch_embed._data import batch_source
    from torch_embed.hessian import _flat_loss, check_model, dense_hessian

    check_model(model)
    source = batch_source(
        "hessian_inertia",
        loss_fn,
        inputs,
        targets,
        data,
        reduction=reduction,
        process_group=process_group,
    )
    fl = _flat_loss(model, loss_fn, source, dtype=dtype)
    h = dense_hessian(fl)
    gnorm = float(fl.value_and_grad()[1].norm())
    return inertia(h, tol=tol, grad_norm=gnorm, method=method, min_gap=min_gap)
