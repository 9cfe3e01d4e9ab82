"""The dimension of embedded critical submanifolds: the paper's estimate and a measurement.

JML 2022 §5: a critical point ``θ`` of a network of widths ``(m_0, m_1, ..., m_L)``
embeds into a network of widths ``(m_0, m'_1, ..., m'_{L-1}, m_L)`` not as one point
but as a whole family: the free parameters of a general compatible embedding (which
copy gets which share, the null neurons' biases, the weights between new neurons of
adjacent layers) move the embedded point along a submanifold of critical points. The
paper's gross estimate of its dimension is

    K + Σ_{l=2}^{L-1} K_l·K_{l-1},   K_l = m'_l - m_l (hidden layers l = 1..L-1),
    K = Σ_{l=1}^{L-1} K_l,

one free parameter per new neuron plus one per connection between new neurons of
adjacent hidden layers (the input and output widths do not change, ``K_0 = K_L = 0``,
so the sum runs over adjacent pairs of hidden layers only). It is a count of
parameters, not a proven dimension: for deep networks the family is curved and the
parameters need not be independent.

The tangent space of a critical submanifold lies in the kernel of the Hessian, so the
zero count (nullity) of the Hessian at the embedded point, measured by
:func:`~torch_embed.landscape.empirical_nullity`, is the number to compare with. What it
measures is the whole degeneracy, so compare the *increase*
``empirical_nullity(wide) - empirical_nullity(narrow)`` with
:func:`~torch_embed.landscape.critical_dimension`. For splits of one hidden layer with
one output at a critical point where each splitting matrix is non-singular the two agree
exactly (each split adds one zero, see ``D_split`` in docs/theory.md, "The exact inertia
change of an embedding"); with several outputs the coupling blocks can add more zeros.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from torch_embed.inertia import hessian_inertia

__all__ = ["critical_dimension", "empirical_nullity"]

LossFn = Callable[[Any, Any], Tensor]


def _widths(name: str, widths: Sequence[int]) -> tuple[int, ...]:
    if isinstance(widths, (str, bytes)) or not isinstance(widths, Sequence):
        raise TypeError(f"{name} must be a sequence of ints, got {type(widths).__name__}")
    out = []
    for k, w in enumerate(widths):
        if isinstance(w, bool) or not isinstance(w, int) or w < 1:
            raise ValueError(f"{name}[{k}] must be a positive int, got {w!r}")
        out.append(w)
    if len(out) < 3:
        raise ValueError(
            f"{name} must list all widths (m_0, m_1, ..., m_L) including input and output "
            f"(at least one hidden layer), got {tuple(out)}"
        )
    return tuple(out)


def critical_dimension(narrow_widths: Sequence[int], wide_widths: Sequence[int]) -> int:
    """The paper's gross estimate ``K + Σ_l K_l·K_{l-1}`` of the embedded dimension.

    Args:
        narrow_widths: ``(m_0, m_1, ..., m_L)``, input and output included (e.g.
            ``embedding.narrow_widths``).
        wide_widths: ``(m_0, m'_1, ..., m'_{L-1}, m_L)`` (e.g. ``embedding.wide_widths``).

    Returns:
        ``K + Σ_{l=2}^{L-1} K_l K_{l-1}`` with ``K_l = m'_l - m_l`` and ``K = Σ K_l``.

    Raises:
        TypeError: A width list is not a sequence.
        ValueError: Lengths differ, input or output widths differ, a width is not a
            positive int, or a wide hidden layer is narrower.

    Example:
        >>> critical_dimension((1, 2, 1), (1, 4, 1))  # one hidden layer: K = 2
        2
        >>> critical_dimension((3, 2, 2, 1), (3, 4, 3, 1))  # K = 3, K_2·K_1 = 2
        5
    """
    narrow = _widths("narrow_widths", narrow_widths)
    wide = _widths("wide_widths", wide_widths)
    if len(narrow) != len(wide):
        raise ValueError(
            f"narrow_widths {narrow} and wide_widths {wide} have different depths; an "
            f"embedding keeps the depth"
        )
    if narrow[0] != wide[0] or narrow[-1] != wide[-1]:
        raise ValueError(
            f"input and output widths must agree (an embedding widens hidden layers only): "
            f"narrow {narrow}, wide {wide}"
        )
    k = [b - a for a, b in zip(narrow, wide)]
    for l in range(1, len(k) - 1):
        if k[l] < 0:
            raise ValueError(
                f"hidden layer {l - 1} is narrower in wide_widths ({wide[l]}) than in "
                f"narrow_widths ({narrow[l]})"
            )
    total = sum(k[1:-1])
    pairs = sum(k[l] * k[l - 1] for l in range(2, len(k) - 1))
    return total + pairs


def empirical_nullity(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Any,
    *,
    tol: float | None = None,
    dtype: torch.dtype = torch.float64,
) -> int:
    """The zero count of the loss Hessian at the model's parameters (dense, float64).

    Meaningful near an exact critical point only (polish first with
    :func:`torch_embed.critical.critical_point`); the tolerance is
    :func:`torch_embed.inertia.hessian_inertia`'s default (the rounding level, moved up
    into a clear gap below ``10·|∇R|`` away from a critical point) unless ``tol`` is
    given. Use ``hessian_inertia`` itself to see the gap ratio and the ``ambiguous``
    flag that say how trustworthy the count is.

    Example:
        Splitting a neuron of a one-output network at a critical point adds exactly
        one zero eigenvalue (:func:`critical_dimension` says 1):

        >>> import copy
        >>> import torch
        >>> from torch import nn
        >>> import torch_embed
        >>> from torch_embed.critical import critical_point
        >>> from torch_embed.landscape.dimension import critical_dimension, empirical_nullity
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(1, 2), nn.Tanh(), nn.Linear(2, 1)).double()
        >>> x = torch.linspace(-2, 2, 20, dtype=torch.float64)[:, None]
        >>> y = torch.tanh(3 * (x - 1)) + torch.tanh(3 * (x + 1)) + 0.5 * torch.tanh(3 * x)
        >>> critical_point(net, nn.MSELoss(), x, y).converged
        True
        >>> wide = copy.deepcopy(net)
        >>> emb = torch_embed.widen(wide, [3], torch_embed.Split(alpha=0.5, select=[0]))
        >>> (empirical_nullity(wide, nn.MSELoss(), x, y)
        ...  - empirical_nullity(net, nn.MSELoss(), x, y))
        1
        >>> critical_dimension(emb.narrow_widths, emb.wide_widths)
        1
    """
    return hessian_inertia(model, loss_fn, inputs, targets, tol=tol, dtype=dtype).zero
