"""The eigenvalue counts of the figures, with a zero tolerance fixed here.

The library's default zero tolerance (:func:`torch_embed.inertia.default_tolerance`)
may be retuned; the reproductions' numbers must not move with it. Every figure counts
with :func:`count`: the tolerance ``max(P·eps·max|λ|, 10·|∇R|)`` (``eps`` of float64,
``P`` the matrix size) and the ambiguity threshold ``gap < 1e3``, both written out here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from torch_embed.inertia import Inertia, default_tolerance, eigenvalues, inertia

__all__ = ["GRAD_FACTOR", "MIN_GAP", "count", "count_tolerance"]

GRAD_FACTOR = 10.0
"""Factor on ``|∇R|`` in the zero tolerance (a zero eigenvalue moves by ``O(|∇R|)``)."""

MIN_GAP = 1e3
"""Gap ratio below which a count is flagged ambiguous."""


def count_tolerance(matrix: Tensor, grad_norm: float) -> float:
    """The zero tolerance ``max(P·eps·max|λ|, GRAD_FACTOR·|∇R|)`` of a float64 Hessian.

    Example:
        >>> h = torch.diag(torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64))
        >>> count_tolerance(h, 1e-9) == 1e-8
        True
        >>> count_tolerance(h, 0.0) == 3 * 2.0**-52 * 2.0
        True
    """
    lam = eigenvalues(matrix.to(torch.float64))
    rounding = default_tolerance(float(lam.abs().max()), matrix.shape[0], torch.float64)
    return max(rounding, GRAD_FACTOR * float(grad_norm))


def count(matrix: Tensor, grad_norm: float, *, floor: float = 0.0) -> Inertia:
    """Negative / zero / positive counts with :func:`count_tolerance` and :data:`MIN_GAP`.

    Args:
        matrix: A symmetric float64 Hessian.
        grad_norm: ``|∇R|`` where it was computed.
        floor: A smallest zero tolerance (a figure that treats ``|λ| <= floor`` as flat
            says so next to its counts).

    Example:
        >>> h = torch.diag(torch.tensor([-1.0, 1e-12, 3.0], dtype=torch.float64))
        >>> count(h, 1e-12).as_tuple()
        (1, 1, 1)
    """
    tol = max(count_tolerance(matrix, grad_norm), floor)
    return inertia(matrix, tol=tol, method="eigh", min_gap=MIN_GAP)
