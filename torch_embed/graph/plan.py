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

The units of each group come from :func:`torch_embed.schemes.plan_units` given the
group's rules (:func:`group_rules`), in :func:`plan_maps`; :func:`plan_groups` adds the
per-axis maps. An ``nn.Sequential`` MLP is planned by :func:`plan_maps` too, on the
groups of its hidden layers (:func:`torch_embed.schemes.plan` builds its
:class:`~torch_embed.Embedding` from the maps). Every scheme plans where its rules allow:
:class:`~torch_embed.Split` and :class:`~torch_embed.Net2Net` (``select`` random,
cyclic, ``"norm"``: the largest fan-out norm over every consumer of the group, or
explicit indices: a list when one group grows, else ``{group name or alias:
indices}``), :class:`~torch_embed.Null` (a bias ``β`` needs one place to store it: a
BatchNorm's bias, else the producer's bias; a random fan-in goes into the producers'
weights), :class:`~torch_embed.General` (``sources`` and ``coefficients`` keyed by
group name or alias, per-unit coefficients, or a matrix for a group one Linear
reads: :func:`_matrices`) and :class:`~torch_embed.RandomPad`
(random producer weights, consumer columns, grouped convs' in-axis columns included, and
biases for the new units, drawn as on the MLP path: see :func:`random_pad_biases`).
A null channel's BatchNorm gets ``γ = 1`` and running variance 1, as on the MLP path.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from torch_embed.embedding import (
    LayerMap,
    check_matrix_shares,
    check_shares,
    check_sources,
    matrix_row_scales,
)
from torch_embed.graph.attention import temperature, zero_extended
from torch_embed.graph.embedding import AxisMap, GroupEmbedding, axis_map
from torch_embed.graph.fill import fill_kind, plan_fill
from torch_embed.graph.groups import WidthGroup, WidthGroups
from torch_embed.graph.layout import AxisLayout
from torch_embed.schemes import (
    DEFAULT_SCHEME,
    General,
    Net2Net,
    Null,
    RandomPad,
    Scheme,
    Split,
    UnitRules,
    _as_scheme,
    _copies_per_unit,
    _index_list,
    _is_int,
    _kway,
    _real,
    plan_units,
)

__all__ = ["group_rules", "plan_groups", "plan_maps", "resolve_group_widths"]

_UNIFORM = ("layer_norm", "rms_norm", "mean", "var", "norm", "group_norm")
_SEGMENTED = ("group_norm", "grouped_conv")
_REFUSED = ("softmax",)
_NORM_NAMES = {"layer_norm": "LayerNorm", "rms_norm": "RMSNorm", "group_norm": "GroupNorm"}
#: The Null scheme's fill that keeps each norm exact at any width (graph/fill.py)
_FILLS = {"layer_norm": "mean-fill", "rms_norm": "zero-fill"}


def group_rules(group: WidthGroup) -> UnitRules:
    """The rules ``group``'s constraints put on its units (GROWTH.md §2).

    Raises:
        ValueError: A constraint with no rule yet (a softmax, a contraction between two
            activations over the group), naming the op.
    """
    uniform, segments, why = False, 1, ""
    no_copies = no_null = fill = ""
    for c in group.constraints:
        if c.kind in _REFUSED:
            raise ValueError(
                f"width group {group.name!r}: {c.op} constrains it ({c.rule}); widening "
                f"through a {c.kind} is not supported yet"
            )
        if c.kind in _UNIFORM and not uniform:
            uniform = True
            why = f"{_NORM_NAMES.get(c.kind, c.kind)} at `{c.module}`"
            fill = _FILLS.get(c.kind, "")
        if c.kind in _SEGMENTED and c.groups > 1:
            segments = math.lcm(segments, c.groups)
            if not why:
                why = f"{c.kind.replace('_', ' ')} at `{c.module}` (groups={c.groups})"
        if c.kind == "sum" and not no_copies:
            no_copies = f"{c.op} over width group {group.name!r}: {c.rule}"
        if c.kind == "max" and not no_null:
            no_null = f"{c.op} over width group {group.name!r}: {c.rule}"
    return UnitRules(
        f"width group {group.name!r}",
        "unit",
        why if uniform else "",
        segments,
        why,
        no_copies,
        no_null,
        fill,
    )


def _fillable(group: WidthGroup) -> bool:
    try:
        return fill_kind(group) is not None
    except ValueError:
        return False


def _group_plan_rules(group: WidthGroup, cfg: Scheme) -> tuple[UnitRules, Scheme]:
    """The rules and the scheme ``plan_units`` plans ``group`` with.

    A head_dim contracted between two activations (attention's q·k) takes only null
    (zero-extended) units, whatever the scheme; under the ``Null`` scheme a group only
    LayerNorms or only RMSNorms read is mean- or zero-filled (:mod:`torch_embed.graph.fill`):
    null units at any width, so its uniform-copies rule is lifted.
    """
    rules = group_rules(group)
    if zero_extended(group):
        if rules.uniform:
            try:
                kind = fill_kind(group)
            except ValueError:
                kind = None
            fill = {"zero": " or zero-fill", "mean": " or mean-fill"}.get(kind or "", "")
            raise ValueError(
                f"{rules.uniform}: uniform copies{fill}; width group {group.name!r} is "
                f"also contracted between two activations (attention head_dim), which takes "
                f"only null (zero-extended) units: no rule keeps both"
            )
        return rules, Null()
    if rules.uniform and isinstance(cfg, Null) and fill_kind(group) is not None:
        return dataclasses.replace(rules, uniform=""), cfg
    return rules, cfg


def _allowed(size: int, width: int, group: WidthGroup, scheme: Scheme) -> int:
    """The smallest width >= ``width`` the group's rules and the scheme allow."""
    rules = group_rules(group)
    null = isinstance(scheme, Null) or zero_extended(group)
    c = 1 if null else _copies_per_unit(scheme)
    if rules.uniform and isinstance(scheme, Null) and fill_kind(group) is not None:
        return width  # zero-fill / mean-fill: any width
    if rules.uniform:
        k = max(1, math.ceil(width / size))
        while (k - 1) % c:
            k += 1
        return k * size
    step = c * rules.segments
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
        g = _find(groups, key, "")
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


def _find(groups: WidthGroups, key: object, prefix: str) -> WidthGroup:
    """The group named ``key`` (a name or an alias); messages start with ``prefix``."""
    if not isinstance(key, str):
        raise ValueError(f"{prefix}width group names are str, got {key!r}; {_names(groups)}")
    try:
        return groups.find(key)
    except KeyError:
        raise ValueError(f"{prefix}no width group named {key!r}; {_names(groups)}") from None


def _by_group(value: object, groups: WidthGroups, what: str) -> dict[str, Any]:
    """``{group name: value}`` from a mapping keyed by group names or aliases."""
    if not isinstance(value, Mapping):
        raise ValueError(
            f"{what} for a traced model must be a mapping {{group name or alias: ...}}, got "
            f"{type(value).__name__} {value!r:.80}; {_names(groups)}"
        )
    out: dict[str, Any] = {}
    for key, v in value.items():
        g = _find(groups, key, f"{what}: ")
        if g.name in out:
            raise ValueError(f"{what}: width group {g.name!r} is given twice")
        out[g.name] = v
    return out


def _explicit(
    cfg: Scheme, groups: WidthGroups, widths: Mapping[str, int]
) -> dict[str, list[int]] | None:
    """Explicit ``select`` indices per grown group (``None``: select by name)."""
    select = getattr(cfg, "select", "random")
    if isinstance(select, str):
        return None
    if isinstance(select, Mapping):
        return {
            n: _index_list(v, f"[{n!r}]") for n, v in _by_group(select, groups, "select").items()
        }
    items: list[Any] = select.tolist() if hasattr(select, "tolist") else list(select)
    if items and all(_is_int(i) for i in items):
        if len(widths) != 1:
            raise ValueError(
                f"select is a flat list of indices but {len(widths)} width groups grow "
                f"({sorted(widths)}); give a {{group name or alias: indices}} mapping"
            )
        return {next(iter(widths)): [int(i) for i in items]}
    raise ValueError(
        f"select for a traced model must be 'random', 'cyclic', 'norm', a list of unit "
        f"indices (one group grows) or a {{group name or alias: indices}} mapping; got "
        f"{select!r:.80}"
    )


def _fan_out_norms(
    group: WidthGroup, tensors: Mapping[str, Tensor] | None
) -> tuple[Tensor, torch.dtype]:
    """The norm of every unit's fan-out, over every consumer entry that reads it."""
    if tensors is None or not group.consumers:
        raise ValueError(
            f"select='norm' reads the consumers of width group {group.name!r}, which the "
            f"planner was not given; use select='random', 'cyclic' or explicit indices"
        )
    sq = torch.zeros(group.size, dtype=torch.float64)
    dtype = torch.float64
    for u in group.consumers:
        t = tensors[u.tensor].detach()
        if t.is_meta:
            raise ValueError(
                f"select='norm' reads the values of `{u.tensor}`, but it is on the 'meta' "
                f"device and has none; use select='random', 'cyclic' or explicit indices, "
                f"or materialize the module first"
            )
        dtype = t.dtype
        if (
            u.groups > 1
        ):  # a grouped conv's in-axis: unit i is column i mod share of group i div share
            share = group.size // u.groups
            w = t.to(torch.float64).reshape(u.groups, t.shape[0] // u.groups, share, -1)
            sq += w.square().sum(dim=(1, 3)).reshape(-1).cpu()
            continue
        per_entry = t.to(torch.float64).movedim(u.axis, 0).reshape(t.shape[u.axis], -1)
        per_entry = per_entry.square().sum(dim=1).cpu()
        idx = u.offset + torch.arange(group.size) * u.stride
        for count, step in u.repeats:
            idx = (idx[:, None] + torch.arange(count) * step).reshape(group.size, -1)
        sq += per_entry[idx.reshape(group.size, -1)].sum(dim=1)
    return sq.sqrt(), dtype


def _general(cfg: General, groups: WidthGroups) -> dict[str, tuple[Tensor, Tensor | None, float]]:
    """``{group: (sources, coefficients or None, null bias)}`` from a General scheme."""
    sources = _by_group(cfg.sources, groups, "General.sources")
    coefs = (
        _by_group(cfg.coefficients, groups, "General.coefficients")
        if cfg.coefficients is not None
        else {}
    )
    nb_in = cfg.null_bias
    biases = (
        _by_group(nb_in, groups, "General.null_bias")
        if isinstance(nb_in, Mapping)
        else {n: nb_in for n in sources}
    )
    out = {}
    for name, src in sources.items():
        values = src.tolist() if hasattr(src, "tolist") else src
        if (
            isinstance(values, (str, bytes))
            or not isinstance(values, Sequence)
            or not all(_is_int(i) for i in values)
        ):
            raise ValueError(
                f"General.sources[{name!r}] must be a list of ints (for each wide unit, the "
                f"narrow unit it copies or -1 for a null unit), got {src!r:.80}"
            )
        c = coefs.get(name)
        coef = None
        if c is not None:
            coef = torch.as_tensor(c, dtype=torch.float64).detach().clone().cpu()
            if coef.dim() not in (1, 2):
                raise ValueError(
                    f"General.coefficients[{name!r}] must hold one coefficient per wide unit, "
                    f"or a (wide rows of its reader, wide) matrix (one per connection) for a "
                    f"group one Linear reads; got shape {tuple(coef.shape)}"
                )
        bias = _real(biases.get(name, 0.0), f"General.null_bias[{name!r}]")
        out[name] = (torch.tensor(values, dtype=torch.int64), coef, bias)
    for c_name in coefs:
        if c_name not in out:
            raise ValueError(
                f"General.coefficients names width group {c_name!r}, which has no sources"
            )
    return out


def _check_scheme(cfg: Scheme) -> None:
    """Refuse scheme arguments that are not finite numbers (as the MLP planner does)."""
    if isinstance(cfg, Split):
        _kway(cfg.alpha)
    elif isinstance(cfg, Net2Net):
        _real(cfg.noise, "Net2Net.noise", nonnegative=True)
    elif isinstance(cfg, Null):
        _real(cfg.fan_in_std, "Null.fan_in_std", nonnegative=True)
        _real(cfg.bias, "Null.bias")
    elif isinstance(cfg, RandomPad):
        _real(cfg.scale, "RandomPad.scale")


def _bias_homes(group: WidthGroup) -> list[str]:
    """The tensors that could store a new unit's bias: BatchNorm biases, else biases.

    Behind a BatchNorm only its own bias can: it re-centres whatever comes before it
    (its running mean, or the batch mean in train mode), so a BatchNorm without affine
    bias leaves none.
    """
    biases = [
        u
        for u in group.producers
        if u.role in ("producer", "per-channel") and u.tensor.rpartition(".")[2] == "bias"
    ]
    if any("batch_norm" in u.op for u in group.producers):
        return [u.tensor for u in biases if "batch_norm" in u.op]
    return [u.tensor for u in biases]


def _bias_home(group: WidthGroup, rules: UnitRules) -> str:
    """The tensor that stores null units' bias ``β``.

    A BatchNorm's bias, else the producer's bias (:func:`_bias_homes`); a group with
    several (a residual stream) or none is refused, naming ``rules.where``.
    """
    homes = _bias_homes(group)
    if len(homes) == 1:
        return homes[0]
    found = f"found {homes}"
    norms = sorted({u.module for u in group.producers if "batch_norm" in u.op})
    if not homes and norms:
        found = (
            f"found none: the BatchNorm {', '.join(f'`{n}`' for n in norms)} has no affine "
            f"bias and re-centres the producing layer's bias"
        )
    elif not homes:
        producers = {u.module: u.op for u in group.producers if u.role == "producer"}
        named = ", ".join(f"`{n}` ({op})" for n, op in producers.items())
        found = (
            f"found none: its producing layer {named} has no bias and no affine BatchNorm "
            f"follows it, so β cannot be stored (the {rules.unit} would output σ(0))"
        )
    raise ValueError(
        f"{rules.where}: null {rules.unit}s with a bias β != 0 need one place for β (a "
        f"BatchNorm's bias, else the producing layer's bias), {found}; use a null bias of 0.0"
    )


def random_pad_biases(
    groups: WidthGroups,
    maps: Mapping[str, LayerMap],
    scale: float,
    tensors: Mapping[str, Tensor],
) -> dict[str, float]:
    """RandomPad's new biases: ``{bias FQN: b}``, the new units' biases ``~ U(-b, b)``.

    As on the MLP path (:class:`~torch_embed.RandomPad`, ``nn.Linear``'s and ``nn.Conv``'s
    default initialisation): ``b = scale/sqrt(fan_in)``, ``fan_in`` the wide entries per
    output unit of the one layer producing the group (``in/groups × kernel``), stored
    where ``Null(bias=β)`` stores ``β`` (a BatchNorm's bias, else the layer's). A group
    with several producing layers (a residual stream) or no bias keeps 0 for its new
    units' biases, as a bias-free MLP layer does.
    """
    out: dict[str, float] = {}
    for g in groups:
        lm = maps.get(g.name)
        if lm is None or not bool(lm.null_mask.any()):
            continue
        homes = _bias_homes(g)
        weights = [
            u.tensor
            for u in g.producers
            if u.role == "producer" and u.axis == 0 and _dim(tensors, u.tensor) >= 2
        ]
        if len(homes) == 1 and len(weights) == 1:
            out[homes[0]] = scale / math.sqrt(_wide_fan_in(weights[0], groups, maps, tensors))
    return out


def _dim(tensors: Mapping[str, Tensor], name: str) -> int:
    """The number of axes of a tensor; 2 for one not among ``tensors`` (refused later)."""
    t = tensors.get(name)
    return 2 if t is None else t.dim()


def _wide_fan_in(
    weight: str, groups: WidthGroups, maps: Mapping[str, LayerMap], tensors: Mapping[str, Tensor]
) -> int:
    """The entries per output unit of ``weight`` (``(out, in/groups, *kernel)``) once wide."""
    shape = tensors[weight].shape
    share = shape[1]
    layout = groups.layouts.get((weight, 1))
    if layout is not None and set(layout.groups()) & set(maps):
        share = axis_map(layout, maps)[0].numel()
    for g in groups:  # a grouped conv's in-axis: one group's share of the wide channels
        for u in g.consumers:
            if u.tensor == weight and u.axis == 1 and u.groups > 1 and g.name in maps:
                share = maps[g.name].source.numel() // u.groups
    return math.prod(shape[2:]) * share


def plan_maps(
    groups: WidthGroups,
    widths: Mapping[str, int],
    cfg: Scheme,
    *,
    explicit: Mapping[str, Sequence[int]] | None = None,
    general: Mapping[str, tuple[Tensor, Tensor | None, float]] | None = None,
    generator: torch.Generator | None = None,
    tensors: Mapping[str, Tensor] | None = None,
    labels: Mapping[str, str] | None = None,
) -> tuple[dict[str, LayerMap], dict[str, float]]:
    """The :class:`~torch_embed.embedding.LayerMap` of every group in ``widths``.

    The part of :func:`plan_groups` that decides the units: for each group in forward
    order, its rules (:func:`group_rules`), the units :func:`~torch_embed.schemes.plan_units`
    gives them, the shares checked, the null units' bias and where it is stored. Every
    group named in ``widths`` is planned, also at its current width (an identity map;
    a random selection still draws from ``generator``, as the MLP path always has).
    The MLP path (:func:`torch_embed.schemes.plan`) calls it on a Sequential's hidden
    groups and builds its :class:`~torch_embed.Embedding` from the maps;
    :func:`plan_groups` builds the per-axis maps of a traced model from them.

    Args:
        groups: The model's width groups.
        widths: ``{group name: new width}``, checked by the caller.
        cfg: The scheme (checked by the caller).
        explicit: Explicit ``select`` indices per group (``None``: by ``cfg.select``).
        general: :class:`~torch_embed.General`: ``{group: (sources, coefficients or
            None, null bias)}``, parsed by the caller. Coefficients are one per wide
            unit, or a ``(wide_next, wide)`` matrix for a group that one Linear reads
            (its shares are checked by the :class:`~torch_embed.Embedding` on the MLP
            path, by :func:`plan_groups` on the traced path, once the reader's wide
            rows are known).
        generator: For the random choices.
        tensors: The model's parameters and buffers by FQN (``select="norm"``).
        labels: How messages name each group (the MLP path: ``"hidden layer 0"``,
            whose units are neurons); default: ``"width group 'name'"`` and units.

    Returns:
        ``(maps, fills)``: the maps by group name, and ``{tensor: β}`` for every
        tensor that stores a null bias ``β != 0``.

    Raises:
        ValueError: Widths, selections or coefficients the groups' rules forbid; null
            units with a bias ``β != 0`` and no one place to store it.
    """
    maps: dict[str, LayerMap] = {}
    fills: dict[str, float] = {}
    for g in groups:
        if g.name not in widths:
            continue
        rules, unit_cfg = _group_plan_rules(g, cfg)
        if labels is not None:
            rules = dataclasses.replace(rules, where=labels[g.name], unit="neuron")
        src_in, coef_in, bias = general[g.name] if general is not None else (None, None, 0.0)
        if src_in is not None:
            check_sources(src_in, g.size, rules.where)
        try:
            source, coef = plan_units(
                unit_cfg,
                g.size,
                widths[g.name],
                rules,
                select=explicit.get(g.name, []) if explicit is not None else None,
                norms=functools.partial(_fan_out_norms, g, tensors),
                sources=src_in,
                coefficients=coef_in,
                generator=generator,
            )
        except ValueError as error:
            if rules.uniform and _fillable(g) and "not a multiple" in str(error):
                raise ValueError(
                    f"{error}; for any width use the Null scheme (zero-fill under RMSNorm, "
                    f"mean-fill under LayerNorm)"
                ) from None
            raise
        if coef.dim() == 2:
            _check_one_reader(groups, g, rules)
        else:
            check_shares(source, coef, g.size, rules.where)
        if isinstance(unit_cfg, Null):
            bias = float(unit_cfg.bias)
        null = source < 0
        # not torch.where(null, bias, 0.0): two Python floats make a float32 tensor
        null_bias = torch.zeros(source.numel(), dtype=torch.float64).masked_fill(null, bias)
        if bias != 0 and bool(null.any()):
            home = _bias_home(g, rules)
            if fills.setdefault(home, bias) != bias:
                raise ValueError(
                    f"`{home}` holds the null units' bias of several width groups, which "
                    f"are given different biases ({fills[home]}, {bias})"
                )
        maps[g.name] = LayerMap(source, coef, null_bias, torch.zeros_like(null_bias))
    return maps, fills


def _check_one_reader(groups: WidthGroups, group: WidthGroup, rules: UnitRules) -> str:
    """The one Linear weight that reads ``group`` directly, for a matrix of coefficients.

    A matrix (one coefficient per connection, ``(wide rows, wide)``) scales the columns of
    one 2-D weight entry by entry: the group's only reader must be a linear on axis 1,
    reading the group itself (no concatenation, flatten or other group on that axis), with
    no rule over the group (a norm, a sum, ...) and no other use of that weight (a tied
    head).

    Returns:
        The reader weight's FQN.

    Raises:
        ValueError: Naming the readers (module, op, tensor) and the rule.
    """
    rule = (
        f"{rules.where}: a matrix of coefficients (one per connection) needs exactly one "
        f"Linear reading the group, with a 2-D weight whose axis 1 is the group alone "
        f"(no concatenation, flatten, residual add or second reader)"
    )
    readers = [u for u in group.consumers if u.role == "consumer"]
    named = ", ".join(
        f"`{u.module}` (aten.{u.op}, `{u.tensor}` axis {u.axis})" for u in group.consumers
    )
    if len(group.consumers) != 1 or len(readers) != 1:
        raise ValueError(
            f"{rule}; it is read by {len(group.consumers)}: {named}; give one coefficient "
            f"per wide {rules.unit}"
        )
    u = readers[0]
    layout = groups.layouts.get((u.tensor, u.axis))
    plain = (u.axis, u.offset, u.stride, u.repeats, u.groups) == (1, 0, 1, (), 1)
    whole = layout is not None and layout.kind == "group" and layout.group == group.name
    if u.op != "linear" or not plain or not whole:
        raise ValueError(
            f"{rule}; its reader is {named}"
            + ("" if u.op == "linear" else f", a {u.op}, not a linear")
            + ("" if plain and whole else ", which reads more than the group on that axis")
            + f"; give one coefficient per wide {rules.unit}"
        )
    if group.constraints:
        raise ValueError(
            f"{rule}, and no rule over the group; {group.constraints[0]}; give one "
            f"coefficient per wide {rules.unit}"
        )
    tied = [v.module for g in groups for v in g.producers if v.tensor == u.tensor and v.axis == 1]
    if tied:
        raise ValueError(
            f"{rule}; `{u.tensor}` also writes features at `{tied[0]}` (a tied weight); give "
            f"one coefficient per wide {rules.unit}"
        )
    return u.tensor


def plan_groups(
    groups: WidthGroups,
    new_widths: object,
    scheme: Scheme | str = DEFAULT_SCHEME,
    *,
    generator: torch.Generator | None = None,
    tensors: Mapping[str, Tensor] | None = None,
    norm_offsets: Mapping[str, float] | None = None,
) -> GroupEmbedding:
    """Plan the embedding of a traced model's groups to ``new_widths``.

    Args:
        groups: The model's :func:`~torch_embed.graph.groups.width_groups`.
        new_widths: ``{group name or alias: width}``, or a factor ``f > 1`` (every
            growable hidden group × f, rounded up to a width its rules allow); ``None``
            with a :class:`~torch_embed.General` scheme (widths from its sources).
        scheme: See the module docstring.
        generator: For the random choices.
        tensors: The model's parameters and buffers by FQN; read by ``select="norm"``
            and by :class:`~torch_embed.RandomPad` (the shapes: which tensors are
            biases, and the fan-in that bounds them).
        norm_offsets: ``{norm module FQN: c}`` for norms that scale by ``c + weight``
            (Gemma's ``1 + w``): a zero-fill rescales their stored weight affinely
            (:func:`torch_embed.graph.fill.plan_fill`).

    Raises:
        ValueError: Unknown or rigid groups, widths the group's rules forbid (the
            message names the norm or conv and the rule), schemes or selections the
            rules forbid.
    """
    cfg = _as_scheme(scheme)
    _check_scheme(cfg)
    general = _general(cfg, groups) if isinstance(cfg, General) else None
    if general is not None:
        given = {} if new_widths is None else resolve_group_widths(groups, new_widths, cfg)
        widths = {}
        for name, (src, _, _) in general.items():
            g = groups.find(name)
            if given.get(name, src.numel()) != src.numel():
                raise ValueError(
                    f"width group {name!r}: new_widths says {given[name]} but General.sources "
                    f"gives {src.numel()} units"
                )
            if src.numel() > g.size or not torch.equal(src, torch.arange(g.size)):
                resolve_group_widths(groups, {name: max(src.numel(), g.size)}, cfg)  # growable?
                widths[name] = src.numel()
        extra = sorted(set(given) - set(general))
        if extra:
            raise ValueError(f"new_widths names {extra}, which General.sources does not map")
    else:
        widths = resolve_group_widths(groups, new_widths, cfg)
    explicit = _explicit(cfg, groups, widths)
    maps, fills = plan_maps(
        groups,
        widths,
        cfg,
        explicit=explicit,
        general=general,
        generator=generator,
        tensors=tensors,
    )
    readers, betas, unmapped = _matrices(groups, maps, tensors)
    sizes: dict[str, tuple[int, int]] = {}
    reasons: list[str] = [unmapped] if unmapped else []
    gains: dict[str, float] = {}
    scales: list[tuple[str, float, float]] = []
    for g in groups:
        if g.name not in maps:
            continue
        sizes[g.name] = (g.size, widths[g.name])
        reasons.extend(_gradient_caveats(g, maps[g.name]))
        gain, patch = temperature(g, widths[g.name])
        if gain != 1.0:
            gains[g.name] = gain
        scales.extend(patch)
    fill = plan_fill(groups, widths, norm_offsets) if isinstance(cfg, Null) else None
    noise, seed = 0.0, 0
    init, scale = "", 0.0
    if isinstance(cfg, Net2Net) and cfg.noise > 0:
        noise = float(cfg.noise)
        reasons.append(
            f"Net2Net noise {noise:g} on the copies' fan-out: the function is kept, the "
            f"copies' symmetry is broken (output-preserving, not critical)"
        )
    if isinstance(cfg, Null) and cfg.fan_in_std > 0:
        init, scale = "normal", float(cfg.fan_in_std)
        reasons.append(
            f"Null fan-in std {scale:g}: null units with a random fan-in are not constant, "
            f"so their fan-out gradient is not mapped (output-preserving, not critical)"
        )
    if isinstance(cfg, RandomPad):
        init, scale = "uniform", float(cfg.scale)
        reasons.append(
            "RandomPad: the new units get random fan-in and fan-out, so the function changes"
        )
    biases: dict[str, float] = {}
    if isinstance(cfg, RandomPad):
        if tensors is None:
            raise ValueError(
                "RandomPad on a traced model needs the model's tensors (tensors=): their "
                "shapes say which are biases and bound the new units' random values"
            )
        biases = random_pad_biases(groups, maps, scale, tensors)
    if noise or init:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    axes = _axes(
        groups, maps, gains, fills, init, scale, consumers=isinstance(cfg, RandomPad),
        biases=biases, tensors=tensors, readers=readers, betas=betas,
    )  # fmt: skip
    if fill is not None:
        axes = tuple(
            dataclasses.replace(
                a,
                gain=torch.full_like(a.coef, fill.gains[(a.tensor, a.axis)])
                if (a.tensor, a.axis) in fill.gains
                else a.gain,
                mean=(a.tensor, a.axis) in fill.mean,
                shift=fill.shifts.get((a.tensor, a.axis), a.shift),
            )
            for a in axes
        )
        reasons.extend(fill.reasons)
    return GroupEmbedding(
        maps,
        sizes,
        axes,
        type(cfg).__name__,
        tuple(reasons),
        noise,
        seed,
        scales=tuple(dict.fromkeys(scales)),
        eps=tuple(fill.eps) if fill is not None else (),
        preserves_output=not isinstance(cfg, RandomPad),
        unmapped_gradients=unmapped,
    )


def _per_unit(maps: Mapping[str, LayerMap]) -> dict[str, LayerMap]:
    """``maps`` with one coefficient per unit, for every axis but a matrix's reader.

    A matrix group's copied axes get 1 on copies and 0 on null units, as for MLPs; its
    matrix goes to its one reader's axis 1 alone (:func:`_axes`).
    """
    return {
        n: lm if lm.is_vector else dataclasses.replace(lm, coef=(~lm.null_mask).to(torch.float64))
        for n, lm in maps.items()
    }


def _matrices(
    groups: WidthGroups, maps: Mapping[str, LayerMap], tensors: Mapping[str, Tensor] | None
) -> tuple[dict[str, str], dict[str, Tensor], str]:
    """The reader, shares and error scalings ``β`` of every group with matrix coefficients.

    A ``(wide rows, wide)`` matrix ``C`` (:class:`~torch_embed.General`, one coefficient
    per connection) scales the columns of the group's one Linear reader ``R``
    (:func:`_check_one_reader`); its rows are ``R``'s wide output rows, in their wide
    order when ``R``'s output group grows too. As for MLPs
    (:meth:`torch_embed.Embedding._row_scales`): the error of wide unit ``j`` is
    ``β_j`` times its source's when ``Σ_{i: src(i) = h} C[i, j] β'_i`` is the same
    ``β_j`` for every narrow output unit ``h`` of ``R`` (``β'``: the error scalings of
    ``R``'s output units; 1 on an output that does not grow, the coefficient of a
    copy, or ``β`` of a matrix group).

    Returns:
        ``(readers, betas, reason)``: ``{group: reader weight FQN}``, ``{group: β}`` for
        the groups whose ``β`` exists, and why gradients do not map (``""``: they do).

    Raises:
        ValueError: A matrix of the wrong shape, or whose shares do not sum to 1 over a
            unit's copies in some row (as :func:`~torch_embed.embedding.check_matrix_shares`).
    """
    readers: dict[str, str] = {}
    for g in groups:
        lm = maps.get(g.name)
        if lm is None or lm.is_vector:
            continue
        reader = readers[g.name] = _check_one_reader(groups, g, group_rules(g))
        out = groups.layouts.get((reader, 0))
        if out is not None:
            rows = axis_map(out, _per_unit(maps))[0].numel()
        elif tensors is not None and reader in tensors:
            rows = tensors[reader].shape[0]
        else:
            raise ValueError(f"`{reader}`: its output rows are not known to the planner")
        check_matrix_shares(lm.source, lm.coef, g.size, rows, f"width group {g.name!r}")
    betas: dict[str, Tensor] = {}
    missing: list[str] = []

    def beta(name: str) -> Tensor | None:
        lm = maps[name]
        if lm.is_vector:
            return lm.coef
        if name in betas or name in missing:
            return betas.get(name)
        out = groups.layouts.get((readers[name], 0))
        rows = lm.coef.shape[0]
        src_next, b_next, m_next = torch.arange(rows), torch.ones(rows, dtype=torch.float64), rows
        if out is not None and set(out.groups()) & set(maps):
            scalings = {}
            for n in set(out.groups()) & set(maps):
                b = beta(n)
                if b is None:
                    missing.append(name)
                    return None
                scalings[n] = dataclasses.replace(maps[n], coef=b)
            src_next, b_next = axis_map(out, scalings)
            m_next = out.size
        first = matrix_row_scales(lm.coef, src_next, b_next, m_next)
        if first is None:
            missing.append(name)
            return None
        betas[name] = first
        return first

    for name in readers:
        beta(name)
    reason = ""
    if missing:
        reason = (
            f"width groups {sorted(set(missing))}: the matrix coefficients violate the "
            f"backward condition (no error scalings β make gradients map)"
        )
    return readers, betas, reason


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
    groups: WidthGroups,
    maps: Mapping[str, LayerMap],
    gains: Mapping[str, float],
    fills: Mapping[str, float],
    init: str,
    scale: float,
    *,
    consumers: bool,
    biases: Mapping[str, float] | None = None,
    tensors: Mapping[str, Tensor] | None = None,
    readers: Mapping[str, str] | None = None,
    betas: Mapping[str, Tensor] | None = None,
) -> tuple[AxisMap, ...]:
    """One :class:`AxisMap` per tensor axis that carries a grown group.

    ``gains``: a temperature gain per group (attention head_dim, see :class:`AxisMap`);
    ``fills``: the null entries' values of some tensors (the null bias ``β``);
    ``init``/``scale``: random null entries of producer weights (and of consumer
    weights, grouped in-axes included, when ``consumers``), see :class:`AxisMap`;
    ``biases``: the 1-d tensors that get uniform random null entries, with their bound
    (:func:`random_pad_biases`; no other 1-d tensor does); ``readers``: the one Linear
    weight reading each group with matrix coefficients (its axis 1 gets the matrix, every
    other axis of the group copies), ``betas``: their error scalings, set on the copied
    axes (:func:`_matrices`).
    """
    biases = biases or {}
    readers = readers or {}
    betas = betas or {}
    vec = _per_unit(maps)
    scalings = {n: dataclasses.replace(lm, coef=betas[n]) for n, lm in vec.items() if n in betas}
    roles: dict[tuple[str, int], str] = {}
    producers: set[tuple[str, int]] = set()
    fills = dict(fills)
    for g in groups:  # a null channel's BatchNorm: γ = 1, running variance 1, as for MLPs
        lm = maps.get(g.name)
        for u in g.producers if lm is not None and bool(lm.null_mask.any()) else ():
            local = u.tensor.rpartition(".")[2]
            if "batch_norm" in u.op and local in ("weight", "running_var"):
                fills[u.tensor] = 1.0
    grouped: list[tuple[str, int, str, int]] = []
    tied: list[tuple[tuple[str, int], str]] = []
    for g in groups:
        for u in (*g.producers, *g.consumers):
            key = (u.tensor, u.axis)
            role = "copy" if u.role in ("producer", "per-channel") else "split"
            if u.role == "producer":
                producers.add(key)
            if roles.setdefault(key, role) != role and g.name in maps:
                tied.append((key, g.name))
            if u.role == "consumer" and u.groups > 1 and g.name in maps:
                if u.offset or u.stride != 1 or u.repeats:
                    raise ValueError(
                        f"`{u.tensor}`: a grouped convolution reading a concatenation or "
                        f"flatten of width group {g.name!r} is not supported yet"
                    )
                grouped.append((u.tensor, u.axis, g.name, u.groups))
    for key, name in tied:
        roles.update(fold_tied_head(groups, key, name, maps[name]))
    out: list[AxisMap] = []
    for (tensor, axis), layout in groups.layouts.items():
        if not set(layout.groups()) & set(maps):
            continue
        src, coef = axis_map(layout, vec)
        role = roles.get((tensor, axis), "copy")
        beta = None
        if layout.kind == "group" and readers.get(layout.group) == tensor and axis == 1:
            coef = maps[layout.group].coef.clone()
        elif role == "copy" and set(layout.groups()) & set(scalings):
            beta = axis_map(layout, {**vec, **scalings})[1]
        value = fills.get(tensor) if axis == 0 else None
        fill = None if value is None else torch.full((src.numel(),), value, dtype=torch.float64)
        random = init if ((tensor, axis) in producers or (consumers and role == "split")) else ""
        bound = biases.get(tensor, scale)
        if tensor in biases:
            random = "uniform"
        elif random and tensors is not None and _dim(tensors, tensor) < 2:
            random = ""  # a bias or per-channel vector: only those of ``biases``
        gain = _gain(layout, vec, gains)
        out.append(
            AxisMap(
                tensor,
                axis,
                role,
                src,
                coef,
                gain=gain,
                null_fill=fill,
                null_init=random,
                init_scale=bound,
                beta=beta,
            )
        )
    for tensor, axis, name, n_groups in grouped:
        lm = maps[name]
        random = init if consumers else ""
        out.append(
            AxisMap(
                tensor,
                axis,
                "split",
                lm.source.clone(),
                lm.coef.clone(),
                n_groups,
                null_init=random,
                init_scale=scale,
            )
        )
    return tuple(out)


def fold_tied_head(
    groups: WidthGroups, key: tuple[str, int], name: str, lm: LayerMap
) -> dict[tuple[str, int], str]:
    """The roles that grow a tied embedding / LM head exactly: the split folded into a norm.

    The tied matrix ``E`` (``key``) embeds the tokens (a producer: copies) and reads the
    last hidden state (a consumer: split). When one ``linear`` with ``E`` alone reads a
    LayerNorm/RMSNorm over ``name`` (the final norm), ``E`` is copied and the norm's
    ``γ`` and ``β`` take the head's split instead: copy ``j`` of unit ``i`` reads
    ``α_j (γ_i n_i + β_i)``, so ``Σ_j E[:, i] α_j (γ_i n_i + β_i)`` is the narrow logit
    (the norm's statistics are unchanged under uniform copies). Null units need no fold:
    zero-filled ones are 0 in both uses; mean-filled ones are read through the norm,
    whose ``γ_new = β_new = 0``.

    Returns:
        ``{(tensor, axis): role}`` to set.

    Raises:
        ValueError: No norm over the group alone is read by that linear alone, or (with
            copies) the norm has no ``γ`` to take the split; the message says why and
            to untie the head.
    """
    tensor, axis = key
    untie = (
        f"untie it (give the head its own Parameter: `lm_head.weight = "
        f"nn.Parameter(lm_head.weight.clone())`) or leave {name!r} as it is"
    )
    known = lm.source >= 0
    copies = bool(known.any()) and bool((lm.coef[known] != 1).any())
    if not copies and fill_kind(groups.find(name)) != "mean":
        return {key: "copy"}  # old units kept, new ones null (zero) in both uses
    norm = next((n for n in groups.norms if n.head == tensor and n.groups == (name,)), None)
    if norm is None:
        written = [n.module for n in groups.norms if n.groups == (name,) and n.weight is None]
        why = "which the trace does not show here"
        if written:  # x * rsqrt(mean(x²) + eps) * w in a forward: no norm op to follow
            why = (
                f"and the norms over it are written out in their forward (`{written[-1]}`, "
                f"... as Hugging Face's RMSNorms), whose output the trace does not follow to "
                f"a head yet; under RMSNorm alone, Null() (zero-fill) needs no fold"
            )
        raise ValueError(
            f"`{tensor}` axis {axis} both writes and reads the features of width group "
            f"{name!r} (a tied embedding / LM head: the same matrix embeds the tokens and "
            f"reads the last hidden state): copies need it copied in one use and split in "
            f"the other, which one tensor cannot be; the split can be folded into a "
            f"LayerNorm/RMSNorm's γ and β only when one linear with `{tensor}` alone reads "
            f"that norm's output, {why}; {untie}"
        )
    if not copies:  # mean-fill: E's new columns are means, the norm's γ_new = β_new = 0
        return {key: "copy"}
    if norm.weight is None:
        raise ValueError(
            f"`{tensor}` is a tied embedding / LM head reading `{norm.module}`, which has no "
            f"affine γ to fold the head's split into (copies of width group {name!r} need "
            f"the tied matrix split as a head); use a norm with elementwise_affine, grow "
            f"{name!r} with Null (zero-/mean-fill), or {untie}"
        )
    out = {key: "copy", (norm.weight, 0): "split"}
    if norm.bias is not None:
        out[(norm.bias, 0)] = "split"
    return out
