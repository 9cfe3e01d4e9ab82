"""Residual width at any size: zero-fill under RMSNorm, mean-fill under LayerNorm.

A norm over a width group (the residual stream of a transformer) keeps its output under
uniform copies only (every unit copied ``k`` times: the planner's copies). For any other
width ``D → D'`` the new units are *filled* (GROWTH.md §2), with ``Null`` as the scheme:

* **RMSNorm: zero-fill.** New units are null everywhere (zero rows of every writer,
  zero columns of every reader). The stream's new entries are 0, so the mean square
  over ``D'`` is ``D/D'`` times the old one: with ``eps × D/D'`` the RMS is
  ``√(D/D')`` times the old RMS exactly, and ``γ_old × √(D/D')`` gives back every old
  output; ``γ_new = 0`` keeps the new outputs 0. The new units get zero gradient and
  the old ones the narrow gradient mapped (``γ`` by ``1/√(D/D')``): a critical
  embedding, at any width, pre- or post-norm.
* **LayerNorm: mean-fill.** Every writer's new rows (Linear rows and biases, embedding
  columns, an added position embedding) are the mean of its old ones, so every new
  entry of the stream is the mean of the old entries: the mean is unchanged, the
  variance is ``D/D'`` times the old one; ``γ_old × √(D/D')``, ``γ_new = β_new = 0`` and
  ``eps × D/D'`` keep the output. Readers' new columns are 0. Exact when every
  LayerNorm reads the stream itself (pre-norm); a post-norm block writes the norm's
  output (new entries ``β_new = 0``, not the mean) back into the stream, and the
  re-check after widening refuses it. The new units' gradients come from the norm's
  statistics, not from a map of the narrow gradient: the embedding keeps the output
  only (not critical), and a mapped ``.grad``/optimizer state is approximate.

The eps is a module attribute (``eps``, ``variance_epsilon``, ``epsilon``) the apply
step rescales; a norm whose eps is written into ``forward`` is refused there. An
RMSNorm written out (``w * x * rsqrt(mean(x²) + eps)``, Hugging Face's) counts as one:
its scale is the parameter its module multiplies the stream by. A norm whose module
scales by ``1 + weight`` (Gemma's RMSNorms, ``offsets``) stores ``w = γ − 1``: its
``γ × √(D/D')`` is ``w' = √(D/D')·(1 + w) − 1`` and ``γ_new = 0`` is ``w_new = −1``
(:attr:`~torch_embed.graph.gather.AxisMap.shift`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from torch_embed.graph.groups import WidthGroup, WidthGroups

__all__ = ["Fill", "plan_fill"]

EPS_ATTRIBUTES = ("eps", "variance_epsilon", "epsilon")
_NAMES = {"layer_norm": "LayerNorm", "rms_norm": "RMSNorm"}


@dataclass
class Fill:
    """What filling some groups adds to their plan.

    Attributes:
        gains: ``{(tensor, axis): g}``: a norm's ``γ`` axis, old entries × ``g``.
        mean: ``{(tensor, axis)}``: writer axes whose new entries are the old mean.
        eps: ``(module, old eps or None, D/D')`` per norm whose eps is rescaled.
        reasons: Why the embedding is not critical (mean-fill).
        shifts: ``{(tensor, axis): c}``: a ``γ`` axis of ``gains`` whose tensor stores
            ``γ − c`` (:attr:`~torch_embed.graph.gather.AxisMap.shift`).
    """

    gains: dict[tuple[str, int], float] = field(default_factory=dict)
    shifts: dict[tuple[str, int], float] = field(default_factory=dict)
    mean: set[tuple[str, int]] = field(default_factory=set)
    eps: list[tuple[str, float | None, float]] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)


def fill_kind(group: WidthGroup) -> str | None:
    """``"zero"`` (RMSNorm only), ``"mean"`` (LayerNorm only) or ``None`` (no norm).

    Raises:
        ValueError: Both kinds of norm read the group, or another statistic does.
    """
    kinds = {c.kind for c in group.constraints}
    norms = kinds & set(_NAMES)
    if not norms:
        return None
    others = kinds & {"mean", "var", "norm", "group_norm"}
    if len(norms) > 1 or others:
        raise ValueError(
            f"width group {group.name!r} is read by {sorted(norms | others)}: zero-fill "
            f"(RMSNorm) and mean-fill (LayerNorm) need one kind of norm; grow it by "
            f"uniform copies (a multiple of {group.size}) with Split"
        )
    return "zero" if norms == {"rms_norm"} else "mean"


def plan_fill(
    groups: WidthGroups, widths: dict[str, int], offsets: Mapping[str, float] | None = None
) -> Fill:
    """The fill of every group in ``widths`` that a norm reads (see the module docstring).

    ``offsets``: ``{norm module FQN: c}`` for norms that scale by ``c + weight``
    (:func:`torch_embed.graph.hf.scales_by_one_plus_weight`: ``c = 1``); their rescaled
    ``γ`` axes get the shift ``c``.

    Raises:
        ValueError: A norm over several groups, a mean-fill writer that is not a plain
            axis of the group, or a tensor that scales the stream (mean-fill).
    """
    out = Fill()
    for g in groups:
        if g.name not in widths:
            continue
        kind = fill_kind(g)
        if kind is None:
            continue
        d, wide = g.size, widths[g.name]
        for norm in groups.norms:
            if g.name not in norm.groups:
                continue
            if norm.groups != (g.name,):
                raise ValueError(
                    f"{_NAMES[norm.kind]} at `{norm.module}` normalises {list(norm.groups)}: "
                    f"filling {g.name!r} needs a norm over that group alone"
                )
            scaled = [(norm.weight, 0)] if norm.weight is not None else []
            if norm.weight is None:  # written out (x * rsqrt(mean(x²) + eps) * w): its scale
                scaled = [
                    (u.tensor, u.axis)
                    for u in g.producers
                    if u.module == norm.module and u.op == "mul" and u.role == "per-channel"
                ]
            for key in scaled:
                out.gains[key] = math.sqrt(d / wide)
                if (offsets or {}).get(norm.module):
                    out.shifts[key] = float((offsets or {})[norm.module])
            out.eps.append((norm.module, norm.eps, d / wide))
        if kind == "mean":
            first = next(n.module for n in groups.norms if g.name in n.groups)
            _mean_fill(g, groups, out, f"LayerNorm at `{first}`")
            out.reasons.append(
                f"mean-fill of {g.name!r} under LayerNorm: the new units' gradients come "
                f"from the norm's mean and variance, not from the narrow gradient"
            )
    return out


def _mean_fill(group: WidthGroup, groups: WidthGroups, out: Fill, where: str) -> None:
    norm_tensors = {n.weight for n in groups.norms} | {
        u.tensor for u in group.producers if "layer_norm" in u.op
    }
    for u in group.producers:
        if u.tensor in norm_tensors:
            continue  # γ and β: old γ × √(D/D'), new entries 0
        additive = u.role == "producer" or u.op in ("add", "sub")
        if not additive:
            raise ValueError(
                f"{where}: uniform copies or mean-fill; the null units of {group.name!r} "
                f"would be mean-filled, but `{u.tensor}` ({u.op} in `{u.module}`) scales "
                f"the features one by one, which breaks the mean; grow it by uniform "
                f"copies (a multiple of {group.size}) with Split"
            )
        layout = groups.layouts.get((u.tensor, u.axis))
        if layout is None or layout.kind != "group":
            raise ValueError(
                f"{where}: uniform copies or mean-fill; the null units of {group.name!r} "
                f"would be mean-filled, but `{u.tensor}` axis {u.axis} holds more than "
                f"that group ({layout}): not supported"
            )
        out.mean.add((u.tensor, u.axis))
