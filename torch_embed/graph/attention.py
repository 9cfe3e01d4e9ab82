"""Attention's head_dim: zero-extension and the softmax temperature (GROWTH.md §2).

A head_dim contracted between queries and keys (``q @ k^T``, or inside
``scaled_dot_product_attention``) cannot take copies: a copied dimension adds its
product to every score. New dimensions are **null** on both sides instead (new query
and key rows zero), which keeps ``q·k``. The scores are then multiplied by the scale;
when it is ``1/√d`` (the op's default, or an explicit scale equal to ``d^-1/2``: a
forward that computes it from the size, or a module attribute the apply step patches),
it becomes ``1/√d'`` after widening, so the planner multiplies every query *and* key
entry of the group by ``g = (d'/d)^(1/4)`` (``g² = √(d'/d)`` restores the score). Any
other explicit constant is taken to stay as it is (``g = 1``); the re-check after
widening confirms either. A head_dim that also carries values (``nn.MultiheadAttention``
packs q, k and v with one head_dim) has ``o_proj`` columns as consumers: they get
``1/g``.

Under rotary position embeddings the head_dim is rigid: the rotation's frequencies
depend on ``d`` and its halves are sliced (:func:`rotary_reason` names the module in
the group's reason).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

from torch_embed.graph.ops import Constraint

if TYPE_CHECKING:
    from torch_embed.graph.groups import WidthGroup

__all__ = ["rotary_reason", "temperature", "zero_extended"]

_ZERO_EXTENDED = ("attention", "contraction")
_ATTRIBUTES = ("scale", "scaling", "softmax_scale")


def zero_extended(group: WidthGroup) -> bool:
    """Whether ``group`` is contracted between two activations (new units must be null)."""
    return any(c.kind in _ZERO_EXTENDED for c in group.constraints)


Patch = tuple[str, float, float]


def temperature(group: WidthGroup, width: int) -> tuple[float, tuple[Patch, ...]]:
    """``(g, scales)``: the gain on the group's entries and the explicit scales to patch.

    Raises:
        ValueError: Two attentions over the group need different gains.
    """
    d = group.size
    gains: set[float] = set()
    scales: list[Patch] = []
    for c in group.constraints:
        if c.kind != "attention":
            continue
        follows = c.scale is None or math.isclose(c.scale, d**-0.5, rel_tol=1e-12)
        gains.add((width / d) ** 0.25 if follows else 1.0)
        if c.scale is not None and follows:
            scales.append((c.module, c.scale, c.scale * math.sqrt(d / width)))
    if len(gains) > 1:
        raise ValueError(
            f"width group {group.name!r} (head_dim) is scaled by 1/√head_dim in one attention "
            f"and by a constant in another; growing it needs one temperature rule"
        )
    return (gains.pop() if gains else 1.0), tuple(dict.fromkeys(scales))


def rotary_reason(reason: str | None, constraints: Iterable[Constraint]) -> str | None:
    """``reason``, led by ``"head_dim: rotary embedding at `<module>`"`` under RoPE.

    A head_dim inside an attention (an ``"attention"`` constraint) that is rigid because
    an op slices it (``rotate_half``) or a rotary module touches it is named as such.
    """
    if reason is None or not any(c.kind == "attention" for c in constraints):
        return reason
    for part in reason.split("; "):
        low = part.lower()
        if "rotary" in low or "rope" in low or part.startswith("aten.slice"):
            module = part.split("`")[1] if "`" in part else "the model's own forward"
            return f"head_dim: rotary embedding at `{module}` (never grown: {reason})"
    return reason
