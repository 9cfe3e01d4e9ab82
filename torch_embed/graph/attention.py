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

The value head_dim is a group of its own (copies or null units), unless one module
attribute sizes both: Hugging Face's LLaMA, GPT-2 and BERT view q, k **and** v with
``.view(*shape, -1, self.head_dim)``. Patching the attribute for one group breaks the
other's view, so :func:`check_shared_head_dim` refuses growing one of them alone (or
the two to different widths) before anything is changed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from torch import nn

from torch_embed.graph.ops import Constraint

if TYPE_CHECKING:
    from torch_embed.graph.groups import WidthGroup, WidthGroups

__all__ = [
    "HEAD_DIM_ATTRIBUTES",
    "VALUE_HEAD_DIM_ATTRIBUTES",
    "check_shared_head_dim",
    "rotary_reason",
    "temperature",
    "zero_extended",
]

HEAD_DIM_ATTRIBUTES = ("head_dim", "head_size", "d_head", "d_k")
VALUE_HEAD_DIM_ATTRIBUTES = ("v_head_dim", "value_head_dim", "head_dim_v", "d_v")

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


def check_shared_head_dim(
    model: nn.Module, groups: WidthGroups, widths: Mapping[str, tuple[int, int]]
) -> None:
    """Refuse growing the query/key and the value head_dim apart when one attribute sizes both.

    For each attention (not ``nn.MultiheadAttention``, whose handler patches it) whose
    query/key head_dim and value head_dim are distinct groups, both written as a size
    in a ``view``/``reshape`` (a ``"reshape"`` constraint: ``-1`` there computes it
    from the tensor instead), and whose module holds an int attribute named as in
    ``HEAD_DIM_ATTRIBUTES`` equal to both sizes, and no attribute of the value head_dim
    of its own (``v_head_dim``, ``value_head_dim``, ``head_dim_v``, ``d_v``): the two
    must reach the same width. A
    rigid query/key head_dim (rotary embeddings) keeps the value head_dim as it is.

    Args:
        model: The model being widened (its attributes are read, not changed).
        groups: Its width groups.
        widths: ``{group: (old, new)}`` of the groups being grown.

    Raises:
        ValueError: One of the two grows alone, or both to different widths; the message
            names the attribute and the two groups.
    """
    for att in groups.attentions:
        qk, v = att.head_dim, att.value_dim
        if att.packed or not qk or not v or set(qk) & set(v):
            continue
        q_groups = [groups.find(n) for n in qk]
        v_groups = [groups.find(n) for n in v]
        if not all(
            any(c.kind == "reshape" for g in gs for c in g.constraints)
            for gs in (q_groups, v_groups)
        ):
            continue
        old_q = math.prod(g.size for g in q_groups)
        old_v = math.prod(g.size for g in v_groups)
        new_q = math.prod(widths.get(g.name, (g.size, g.size))[1] for g in q_groups)
        new_v = math.prod(widths.get(g.name, (g.size, g.size))[1] for g in v_groups)
        rigid = [g for g in q_groups if not g.growable]
        if rigid:  # under RoPE the halves are separate groups: the value side decides
            old_q = new_q = old_v
        if old_q != old_v or new_q == new_v:
            continue
        try:
            module = model.get_submodule(att.module)
        except AttributeError:
            continue
        if any(hasattr(module, a) for a in VALUE_HEAD_DIM_ATTRIBUTES):
            continue  # a value head_dim of its own (MLA's v_head_dim): the re-check decides
        for attr in HEAD_DIM_ATTRIBUTES:
            value = getattr(module, attr, None)
            if isinstance(value, int) and not isinstance(value, bool) and value == old_q:
                why = (
                    f" (the query/key head_dim cannot grow: {rigid[0].reason}; so neither "
                    f"can the value head_dim)"
                    if rigid
                    else ""
                )
                raise ValueError(
                    f"`{att.module}.{attr}` ({type(module).__name__}) sizes both the "
                    f"query/key head_dim group {' × '.join(map(repr, qk))} and the value "
                    f"head_dim group {' × '.join(map(repr, v))} (its forward views q, k and "
                    f"v with it): grow both to the same width in one call; asked "
                    f"{old_q} -> {new_q} and {old_v} -> {new_v}{why}"
                )
