"""Tie-aware ordering of computed floats: rounding never picks a winner.

Two numbers that are equal in exact arithmetic (the certificates of two mirror-image
neurons, the fan-out norms of two copies, the loss at ``±t·d`` along a symmetric
direction) come out of a computation unequal in their last bits, and *which* one is
smaller depends on the CPU's kernels (MKL, ATen's scalar, AVX2 or AVX-512 paths, picked
at run time or by ``ATEN_CPU_CAPABILITY``). Sorting them by value lets those bits choose
the neuron, the α or the sign a user sees, so the same script gives different answers
on an AMD EPYC and an Intel Xeon. Every place of the library that turns floats into a
user-visible order or choice goes through :func:`ranked`.

**The rule.** With ``scale = max |v|`` over the finite values and
``tol = sqrt(eps)·scale`` (:func:`tie_tolerance`, ``eps`` of the dtype the values'
inputs were computed in), values are grouped in ascending order: a group starts at the
smallest value not yet placed and takes every value ``v`` with ``v - start <= tol``.
Groups come in ascending order, the members of a group in ascending *key* order (layer,
neuron, candidate index: whatever is the caller's natural order). Hence

- a value more than ``tol`` below another (``b - a > tol`` as computed) always comes
  first (a real difference wins);
- values in one group come in key order, whatever their last bits (a tie goes to the
  lower key); values equal up to rounding share a group unless a group boundary falls
  between them, which needs another value almost exactly ``tol`` below them;
- NaN comes last.

``sqrt(eps)`` (1.5e-8 relative in float64) is the project's usual line between rounding
and a real difference (``inertia``'s symmetry check, ``report``'s equality checks): far
above what kernels change (the certificates of docs/guide/landscape.md's mirror-image
neurons differ in the 14th digit, and which one is smaller changes between
``ATEN_CPU_CAPABILITY=default`` and ``avx2``), far below any difference worth choosing
by. A value ``tol`` worse than the best costs at most ``sqrt(eps)`` of the scale.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

__all__ = ["ranked", "tie_tolerance"]


def tie_tolerance(values: Iterable[float], dtype: torch.dtype = torch.float64) -> float:
    """``sqrt(eps(dtype))·max|v|`` over the finite ``values`` (0 when there are none).

    Args:
        values: The numbers to be ranked.
        dtype: The floating dtype their inputs were computed in (a float32 model's
            mirror-image neurons differ by float32 ulps even if the values are float64).

    Example:
        >>> tie_tolerance([-2.0, 1.0, float("inf")]) == 2 * 2**-26
        True
    """
    finite = [abs(float(v)) for v in values if math.isfinite(float(v))]
    scale = max(finite, default=0.0)
    return math.sqrt(torch.finfo(dtype).eps) * scale


def ranked(
    values: Sequence[float],
    key: Callable[[int], Any] | None = None,
    *,
    tol: float,
    descending: bool = False,
) -> list[int]:
    """Indices of ``values`` ascending (or descending), ties within ``tol`` by ``key``.

    See the module docstring for the rule.

    Args:
        values: The numbers to order.
        key: Maps an index to its tie-break key (default: the index itself); smaller
            keys come first within a tie, in both directions.
        tol: Values at most ``tol`` apart (from the first of their group) are a tie;
            usually :func:`tie_tolerance` of ``values``.
        descending: Largest first (ties still go to the smaller key).

    Returns:
        A permutation of ``range(len(values))``.

    Example:
        Two values 1e-15 apart tie and keep their keys' order, whichever bits rounding
        left in them; a real difference still wins:

        >>> ranked([-1.0 + 1e-15, -1.0, -3.0], tol=tie_tolerance([-1.0, -3.0]))
        [2, 0, 1]
        >>> ranked([-1.0, -1.0 + 1e-15, -3.0], tol=tie_tolerance([-1.0, -3.0]))
        [2, 0, 1]
        >>> ranked([0.5, 2.0, 2.0 - 1e-14], descending=True, tol=1e-9)
        [1, 2, 0]
    """
    if not (tol >= 0 and math.isfinite(tol)):
        raise ValueError(f"tol must be a finite non-negative number, got {tol!r}")
    tie_key: Callable[[int], Any] = (lambda i: i) if key is None else key
    sign = -1.0 if descending else 1.0
    signed = [sign * float(v) for v in values]
    nan = [i for i, v in enumerate(signed) if math.isnan(v)]
    rest = sorted((i for i, v in enumerate(signed) if not math.isnan(v)), key=signed.__getitem__)
    out: list[int] = []
    start = 0
    while start < len(rest):
        anchor = signed[rest[start]]
        stop = start + 1
        while stop < len(rest) and signed[rest[stop]] - anchor <= tol:
            stop += 1
        out.extend(sorted(rest[start:stop], key=tie_key))
        start = stop
    return out + sorted(nan, key=tie_key)
