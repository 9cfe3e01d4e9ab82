"""A plain-Python reference of the default tolerance rule of docs/guide/inertia.md.

Written from the documentation, independently of ``torch_embed.inertia`` (no shared
code): from a brute-force spectrum (dense float64 autograd Hessian + ``eigvalsh``) and
the gradient norm, the zero threshold, the gap ratio and the counts the default rule
must give.

* ``rounding = n·eps·max|λ|``; ``ceiling = 10·|∇R|``.
* ``ceiling <= rounding`` (critical) or no ``|λ|`` in ``(rounding, ceiling]``: ``tol =
  rounding``; the gap ratio is the smallest ``|λ|`` above it over the largest at or below
  it.
* Otherwise the highest split ``k`` (zeros = the ``k`` smallest ``|λ|``, ``1 <= k < n``)
  with ``|λ|_k <= ceiling``, ``|λ|_{k+1} > rounding`` and ``|λ|_{k+1} / |λ|_k >= 1e3``;
  ``tol = rounding`` if ``|λ|_k <= rounding``, else ``min(sqrt(|λ|_k |λ|_{k+1}),
  ceiling)``. None: ``tol = rounding``, ambiguous.
"""

from __future__ import annotations

import math

import torch

MIN_GAP = 1e3


def reference_rule(
    lam: torch.Tensor, grad_norm: float, eps: float = 2.0**-52
) -> tuple[float, tuple[int, int, int], bool]:
    """``(tol, (negative, zero, positive), ambiguous)`` of the default rule."""
    values = [float(v) for v in lam]
    mags = sorted(abs(v) for v in values)
    n = len(mags)
    rounding = n * eps * mags[-1]
    ceiling = 10 * grad_norm
    tol, ambiguous = rounding, None
    in_window = [m for m in mags if rounding < m <= ceiling]
    if ceiling > rounding and in_window:
        ambiguous = True
        for k in range(n - 1, 0, -1):  # zeros mags[:k]
            below, above = mags[k - 1], mags[k]
            if below > ceiling or above <= rounding:
                continue
            if below == 0.0 or above / below >= MIN_GAP:
                tol = rounding if below <= rounding else min(math.sqrt(below * above), ceiling)
                ambiguous = False
                break
    if ambiguous is None:  # nothing to decide: the gap around the rounding level
        zeros = [m for m in mags if m <= tol]
        rest = [m for m in mags if m > tol]
        ambiguous = bool(zeros and rest and zeros[-1] > 0 and rest[0] / zeros[-1] < MIN_GAP)
    neg = sum(v < -tol for v in values)
    pos = sum(v > tol for v in values)
    return tol, (neg, n - neg - pos, pos), ambiguous
