"""Plan a :class:`~torch_embed.graph.embedding.GroupEmbedding` for a traced model.

Per grown group: which narrow units get copies (or which new units are null), the
consumer coefficients, and the order of the wide units, under the group's constraints
(GROWTH.md §2):

* LayerNorm, RMSNorm, a mean, variance or norm over the group: every unit copied the
  same number of times (the new width a multiple of the old one); null units refused,
  except under the ``Null`` scheme over a group only LayerNorms or only RMSNorms read:
  mean-fill or zero-fill at any width (:mod:`torch_embed.graph.fill`).
* GroupNorm (``num_groups = g``): every channel copied the same number of times, each
  copy in its source's group; grouped convolution (``groups = g``): every group grows
  by the same amount, copies in their source's group. Wide units are ordered group by
  group: a group's own units, then its copies (or null units).
* A sum over the group: only null units; a max or min: only copies; a softmax over
  it: refused (no rule yet).
* Contracted between two activations (an attention's query/key head_dim): new units
  null on both sides whatever the scheme, and the softmax temperature kept by a gain
  on the group's entries (:mod:`torch_embed.graph.attention`). Attention heads are
  a batch-like axis: copies and null units as for channels.
* Depthwise convolutions are per-channel: copies need no rule (``groups`` follows).

Schemes: :class:`~torch_embed.Split` (any α, ``"random"`` α, k-way; ``select`` random
or cyclic), :class:`~torch_embed.Net2Net` (each copy ``1/count``; with ``noise > 0``, exact
symmetric noise on the copies' fan-out: the default scheme) and
:class:`~torch_embed.Null` with ``bias=0`` and ``fan_in_std=0``. Others are refused.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from torch_embed.embedding import LayerMap
from torch_embed.graph.attention import temperature, zero_extended
from torch_embed.graph.embedding import AxisMap, GroupEmbedding, axis_map
from torch_embed.graph.fill import fill_kind, plan_fill
from torch_embed.graph.groups import WidthGroup, WidthGroups
from torch_embed.graph.layout import AxisLayout
from torch_embed.schemes import (
    DEFAULT_SCHEME,
    Net2Net,
    Null,
    Scheme,
    Split,
    _as_scheme,
    _pick_units,
    _rand,
)

__all__ = ["plan_groups", "resolve_group_widths"]

_UNIFORM = ("layer_norm", "rms_norm", "mean", "var", "norm", "group_norm")
_SEGMENTED = ("group_norm", "grouped_conv")
_REFUSED = ("softmax",)
_NORM_NAMES = {"layer_norm": "LayerNorm", "rms_norm": "RMSNorm", "group_norm": "GroupNorm"}


def _copies_per_split(scheme: Scheme) -> int:
    alpha = scheme.alpha if isinstance(scheme, Split) else 0.5
    if isinstance(alpha, Sequence) and not isinstance(alpha, str):
        return len(alpha) - 1
    return 1


def _rules(group: WidthGroup) -> tuple[bool, int, str]:
    """(uniform copies required, segments, what requires it) for ``group``."""
    uniform, segments, why = False, 1, ""
    for c in group.constraints:
        if c.kind in _REFUSED:
            raise ValueError(
                f"width group {group.name!r}: {c.op} constrains it ({c.rule}); widening "
                f"through a {c.kind} is not supported yet"
            )
        if c.kind in _UNIFORM and not uniform:
            uniform = True
            why = f"{_NORM_NAMES.get(c.kind, c.kind)} at `{c.module}`"
        if c.kind in _SEGMENTED and c.groups > 1:
            segments = math.lcm(segments, c.groups)
            if not why:
                why = f"{c.kind.replace('_', ' ')} at `{c.module}` (groups={c.groups})"
    return uniform, segments, why


def _fillable(group: WidthGroup) -> bool:
    try:
        return fill_kind(group) is not None
    except ValueError:
        return False


def _allowed(size: int, width: int, group: WidthGroup, scheme: Scheme) -> int:
    """The smallest width >= ``width`` the group's rules and the scheme allow."""
    uniform, segments, _ = _rules(group)
    null = isinstance(scheme, Null) or zero_extended(group)
    step = (1 if null else _copies_per_split(scheme)) * segments
    if uniform and isinstance(scheme, Null) and fill_kind(group) is not None:
        return width  # zero-fill / mean-fill: any width
    if uniform:
        k = max(1, math.ceil(width / size))
        c = _copies_per_split(scheme)
        while (k - 1) % c:
            k += 1
        return k * size
    extra = width - size
    return size + math.ceil(extra / step) * step


def resolve_group_widths(groups: WidthGroups, new_widths: object, scheme: Scheme) -> dict[str, int]:
    """``{group name: new width}`` from a mapping of names/aliases or a factor ``f > 1``.

    Raises:
        ValueError: An unknown name (the message lists the names), a rigid or non-hidden
            group (with its reason), a width that is not an int or shrinks, a factor
            ``<= 1``.
        TypeError: ``new_widths`` is neither a mapping nor a real number.
    """
    if isinstance(new_widths, numbers.Real) and not isinstance(new_widths, bool):
        f = float(new_widths)
        if not math.isfinite(f) or f <= 1:
            raise ValueError(f"a widening factor must be a finite number > 1, got {new_widths!r}")
        out = {}
        packed = {n for a in groups.attentions if a.packed for n in a.head_dim}
        for g in groups:
            if g.name in packed:
                continue  # nn.MultiheadAttention: its heads grow with its input width
            if g.growable and g.hidden and any(u.role == "producer" for u in g.producers):
                target = math.ceil(g.size * f - 1e-9)
                out[g.name] = _allowed(g.size, max(target, g.size + 1), g, scheme)
        if not out:
            raise ValueError(f"the model has no growable hidden width group; {_names(groups)}")
        return out
    if not isinstance(new_widths, Mapping):
        raise TypeError(
            f"new_widths must be a mapping {{group name or alias: width}} or a factor > 1 for "
            f"a traced model, got {type(new_widths).__name__} (a list of hidden widths is "
            f"for plain nn.Sequential MLPs); {_names(groups)}"
        )
    out = {}
    for key, width in new_widths.items():
        if not isinstance(key, str):
            raise ValueError(f"width group names are str, got {key!r}; {_names(groups)}")
        try:
            g = groups.find(key)
        except KeyError:
            raise ValueError(f"no width group named {key!r}; {_names(groups)}") from None
        if not g.growable:
            raise ValueError(f"width group {g.name!r} cannot grow: {g.reason}")
        if not g.hidden:
            raise ValueError(f"width group {g.name!r} is a model input or output axis")
        if not isinstance(width, numbers.Integral) or isinstance(width, bool):
            raise ValueError(f"width of group {g.name!r} must be an int, got {width!r}")
        if int(width) < g.size:
            raise ValueError(
                f"width group {g.name!r} has {g.size} units; it cannot shrink to {width}"
            )
        if g.name in out and out[g.name] != int(width):
            raise ValueError(f"width group {g.name!r} is given two widths ({out[g.name]}, {width})")
        out[g.name] = int(width)
    return {n: w for n, w in out.items() if w > groups.find(n).size}


def _names(groups: WidthGroups) -> str:
    growable = [g.name for g in groups if g.growable and g.hidden]
    return f"the growable groups are {growable} (every producing module's FQN is an alias)"


def _choose(
    units: list[int], count: int, select: Any, generator: torch.Generator | None
) -> list[int]:
    if select not in ("cyclic", "random"):
        raise ValueError(
            f"select={select!r} is not supported for traced models yet; use 'random' or 'cyclic'"
        )
    return [units[i] for i in _pick_units(len(units), count, select, generator)]


def _plan_one(
    group: WidthGroup, width: int, scheme: Scheme, generator: torch.Generator | None
) -> LayerMap:
    n = group.size
    uniform, segments, why = _rules(group)
    extra = width - n
    null = isinstance(scheme, Null) or zero_extended(group)
    copies = 1 if null else _copies_per_split(scheme)
    kinds = {c.kind: c for c in group.constraints}
    if "sum" in kinds and not null:
        c = kinds["sum"]
        raise ValueError(f"{c.op} over width group {group.name!r}: {c.rule}; use Null")
    if "max" in kinds and null:
        c = kinds["max"]
        raise ValueError(f"{c.op} over width group {group.name!r}: {c.rule}; use Split")
    if null and uniform and zero_extended(group):
        raise ValueError(
            f"{why}: uniform copies or mean-fill; width group {group.name!r} is also "
            f"contracted between two activations (attention head_dim), which takes only "
            f"null (zero-extended) units: no rule keeps both"
        )
    filled = null and uniform and isinstance(scheme, Null) and fill_kind(group) is not None
    if filled:
        uniform = False  # zero-fill / mean-fill (graph/fill.py): null units at any width
    if null and uniform:
        raise ValueError(
            f"{why}: uniform copies or mean-fill (every unit copied the same number of times); "
            f"null units change its statistics (group {group.name!r})"
        )
    if uniform and width % n:
        raise ValueError(
            f"{why}: uniform copies or mean-fill (every unit copied the same number of "
            f"times): width group {group.name!r} of {n} units cannot become {width}, which "
            f"is not a multiple of {n}"
            + (
                "; for any width use the Null scheme (zero-fill under RMSNorm, mean-fill "
                "under LayerNorm)"
                if _fillable(group)
                else ""
            )
        )
    if segments > 1 and (n % segments or extra % segments):
        raise ValueError(
            f"{why}: every group must grow by the same amount, copies staying in their "
            f"source's group: width group {group.name!r} of {n} units in {segments} groups "
            f"cannot gain {extra} (use a multiple of {segments})"
        )
    if extra % copies:
        raise ValueError(
            f"width group {group.name!r} gains {extra} units, not a multiple of {copies} "
            f"(a {copies + 1}-way split adds {copies} copies per unit)"
        )
    seg = n // segments
    chosen_by_seg: list[list[int]] = []
    for q in range(segments):
        units = list(range(q * seg, (q + 1) * seg))
        count = extra // segments // copies
        if null:
            chosen_by_seg.append([-1] * count)
        elif uniform:
            k = width // n
            if (k - 1) % copies:
                raise ValueError(
                    f"{why}: uniform copies: a {copies + 1}-way split cannot copy every unit "
                    f"of group {group.name!r} {k} times"
                )
            chosen_by_seg.append([u for _ in range((k - 1) // copies) for u in units])
        else:
            select = getattr(scheme, "select", "random")
            chosen_by_seg.append(_choose(units, count, select, generator))
    coef = [1.0] * n
    source: list[int] = []
    new_coef: list[float] = []
    appended: list[tuple[int, int]] = []  # (segment, source) per appended unit
    for q, chosen in enumerate(chosen_by_seg):
        for s in chosen:
            appended.extend([(q, s)] * copies)
    # coefficients, split by split (a unit chosen again splits its current share)
    extra_coef = [0.0] * len(appended)
    if null:  # null units (also a zero-extended head_dim under any scheme): no split
        pass
    elif isinstance(scheme, Split):
        alphas = _alphas(scheme, len(appended) // copies, generator)
        for t in range(0, len(appended), copies):
            s = appended[t][1]
            share = coef[s]
            a = alphas[t // copies]
            if isinstance(a, list):
                coef[s] = share * a[0]
                for r in range(copies):
                    extra_coef[t + r] = share * a[r + 1]
            else:
                coef[s] = (1 - a) * share
                extra_coef[t] = a * share
    elif isinstance(scheme, Net2Net):
        counts = [1] * n
        for _, s in appended:
            counts[s] += 1
        coef = [1.0 / c for c in counts]
        extra_coef = [1.0 / counts[s] for _, s in appended]
    # order: segment by segment, the segment's own units, then its appended units
    for q in range(segments):
        for u in range(q * seg, (q + 1) * seg):
            source.append(u)
            new_coef.append(coef[u])
        for t, (qq, s) in enumerate(appended):
            if qq == q:
                source.append(s)
                new_coef.append(extra_coef[t] if s >= 0 else 0.0)
    src = torch.tensor(source, dtype=torch.int64)
    zeros = torch.zeros(width, dtype=torch.float64)
    return LayerMap(src, torch.tensor(new_coef, dtype=torch.float64), zeros, zeros.clone())


def _alphas(scheme: Split, count: int, generator: torch.Generator | None) -> list[Any]:
    alpha = scheme.alpha
    if isinstance(alpha, str):
        if alpha != "random":
            raise ValueError(f"alpha={alpha!r}: use a number, a sequence or 'random'")
        return [float(a) for a in _rand(count, generator).tolist()]
    if isinstance(alpha, numbers.Real) and not isinstance(alpha, bool):
        if not math.isfinite(float(alpha)):
            raise ValueError(f"alpha must be finite, got {alpha!r}")
        return [float(alpha)] * count
    kway = [float(a) for a in alpha]  # type: ignore[union-attr]
    if len(kway) < 2 or not all(math.isfinite(a) for a in kway) or abs(sum(kway) - 1) > 1e-12:
        raise ValueError(
            f"a k-way alpha needs at least 2 finite coefficients summing to 1, got {kway}"
        )
    return [kway] * count


def _check_scheme(scheme: Scheme) -> None:
    if isinstance(scheme, Split):
        return
    if isinstance(scheme, Net2Net) and math.isfinite(scheme.noise) and scheme.noise >= 0:
        return
    if isinstance(scheme, Null) and scheme.bias == 0 and scheme.fan_in_std == 0:
        return
    raise ValueError(
        f"{scheme!r} is not supported for traced models yet; use Split (any alpha, k-way), "
        f"Net2Net (noise >= 0) or Null(bias=0.0, fan_in_std=0.0)"
    )


def plan_groups(
    groups: WidthGroups,
    new_widths: object,
    scheme: Scheme | str = DEFAULT_SCHEME,
    *,
    generator: torch.Generator | None = None,
) -> GroupEmbedding:
    """Plan the embedding of a traced model's groups to ``new_widths``.

    Args:
        groups: The model's :func:`~torch_embed.graph.groups.width_groups`.
        new_widths: ``{group name or alias: width}``, or a factor ``f > 1`` (every
            growable hidden group × f, rounded up to a width its rules allow).
        scheme: See the module docstring.
        generator: For the random choices.

    Raises:
        ValueError: Unknown or rigid groups, widths the group's rules forbid (the
            message names the norm or conv and the rule), unsupported schemes.
    """
    cfg = _as_scheme(scheme)
    _check_scheme(cfg)
    widths = resolve_group_widths(groups, new_widths, cfg)
    maps: dict[str, LayerMap] = {}
    sizes: dict[str, tuple[int, int]] = {}
    reasons: list[str] = []
    gains: dict[str, float] = {}
    scales: list[tuple[str, float, float]] = []
    for g in groups:
        if g.name in widths:
            maps[g.name] = _plan_one(g, widths[g.name], cfg, generator)
            sizes[g.name] = (g.size, widths[g.name])
            reasons.extend(_gradient_caveats(g, maps[g.name]))
            gain, patch = temperature(g, widths[g.name])
            if gain != 1.0:
                gains[g.name] = gain
            scales.extend(patch)
    fill = plan_fill(groups, widths) if isinstance(cfg, Null) else None
    axes = _axes(groups, maps, gains)
    if fill is not None:
        axes = tuple(
            dataclasses.replace(
                a,
                gain=torch.full_like(a.coef, fill.gains[(a.tensor, a.axis)])
                if (a.tensor, a.axis) in fill.gains
                else a.gain,
                mean=(a.tensor, a.axis) in fill.mean,
            )
            for a in axes
        )
        reasons.extend(fill.reasons)
    noise, seed = 0.0, 0
    if isinstance(cfg, Net2Net) and cfg.noise > 0:
        noise = float(cfg.noise)
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        reasons.append(
            f"Net2Net noise {noise:g} on the copies' fan-out: the function is kept, the "
            f"copies' symmetry is broken (output-preserving, not critical)"
        )
    return GroupEmbedding(
        maps,
        sizes,
        axes,
        type(cfg).__name__,
        tuple(reasons),
        noise,
        seed,
        tuple(dict.fromkeys(scales)),
        tuple(fill.eps) if fill is not None else (),
    )


def _gradient_caveats(group: WidthGroup, lm: LayerMap) -> list[str]:
    """Why gradients of ``group`` do not map linearly, though its output is kept.

    A statistic over the group (LayerNorm, GroupNorm, a mean or variance) is shared by
    the copies: the gradient of a copy with coefficient ``α_j`` is ``α_j`` times the
    direct term plus ``1/k`` times the statistic's terms, a multiple of the narrow
    gradient only when every copy has ``α_j = 1/k`` (Net2Net, ``Split(alpha=0.5)`` for
    k = 2). A max over the group splits its gradient evenly among equal copies.
    """
    src = lm.source
    kinds = {c.kind: c for c in group.constraints}
    out = []
    stat = next((c for k, c in kinds.items() if k in _UNIFORM), None)
    if stat is not None and bool((src >= 0).any()):
        counts = torch.bincount(src[src >= 0], minlength=group.size).to(torch.float64)
        kept = src >= 0  # null units (a zero- or mean-fill) share no statistic
        equal = (lm.coef[kept] - 1.0 / counts[src[kept]]).abs().max() <= 1e-12
        if not bool(equal):
            name = _NORM_NAMES.get(stat.kind, stat.kind)
            out.append(
                f"{name} at `{stat.module}` over group {group.name!r}: copies with unequal "
                f"coefficients keep the output, but not the gradients (the norm's mean and "
                f"variance are shared by the copies; equal shares 1/k keep both)"
            )
    if "max" in kinds and bool((src >= 0).any()) and src.numel() > group.size:
        out.append(
            f"{kinds['max'].op} over group {group.name!r}: the gradient of a max is split "
            f"evenly among equal copies (or sent to one), not in proportion to their "
            f"coefficients"
        )
    return out


def _gain(layout: AxisLayout, maps: Mapping[str, LayerMap], gains: Mapping[str, float]) -> Any:
    """The product of the gains of the groups each wide entry of ``layout`` belongs to."""
    if not set(layout.groups()) & set(gains):
        return None
    as_coef = {
        name: dataclasses.replace(lm, coef=torch.full_like(lm.coef, gains.get(name, 1.0)))
        for name, lm in maps.items()
    }
    return axis_map(layout, as_coef)[1]


def _axes(
    groups: WidthGroups, maps: Mapping[str, LayerMap], gains: Mapping[str, float]
) -> tuple[AxisMap, ...]:
    roles: dict[tuple[str, int], str] = {}
    grouped: list[tuple[str, int, str, int]] = []
    for g in groups:
        for u in (*g.producers, *g.consumers):
            key = (u.tensor, u.axis)
            role = "copy" if u.role in ("producer", "per-channel") else "split"
            if roles.setdefault(key, role) != role and g.name in maps:
                raise ValueError(
                    f"`{u.tensor}` axis {u.axis} both writes and reads the features of width "
                    f"group {g.name!r} (a tied embedding / LM head: the same matrix embeds "
                    f"the tokens and reads the last hidden state): growing the group would "
                    f"need the tied matrix copied in one use and split in the other; untie "
                    f"it (give the head its own Parameter) or leave {g.name!r} as it is"
                )
            if u.role == "consumer" and u.groups > 1 and g.name in maps:
                if u.offset or u.stride != 1 or u.repeats:
                    raise ValueError(
                        f"`{u.tensor}`: a grouped convolution reading a concatenation or "
                        f"flatten of width group {g.name!r} is not supported yet"
                    )
                grouped.append((u.tensor, u.axis, g.name, u.groups))
    out: list[AxisMap] = []
    for (tensor, axis), layout in groups.layouts.items():
        if not set(layout.groups()) & set(maps):
            continue
        src, coef = axis_map(layout, maps)
        role = roles.get((tensor, axis), "copy")
        out.append(AxisMap(tensor, axis, role, src, coef, gain=_gain(layout, maps, gains)))
    for tensor, axis, name, n_groups in grouped:
        lm = maps[name]
        out.append(AxisMap(tensor, axis, "split", lm.source.clone(), lm.coef.clone(), n_groups))
    return tuple(out)
