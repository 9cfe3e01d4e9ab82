"""Width groups: the sets of coupled feature axes of a model, found by tracing it.

A **width group** is a set of tensor axes that must grow together: every parameter or
buffer axis that writes its features (*producers*: a Linear's weight rows and bias, a
conv's output filters, BatchNorm's γ, β and running statistics), every axis that reads
them (*consumers*: the next layer's weight columns), joined through every op in between
(GROWTH.md §1). :func:`width_groups` traces one forward pass and returns them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from torch import nn

from torch_embed.graph.attention import rotary_reason
from torch_embed.graph.layout import AxisLayout
from torch_embed.graph.ops import Constraint, Interpretation, interpret
from torch_embed.graph.trace import Tracer, check_model, trace

__all__ = [
    "Attention",
    "AxisUse",
    "Constraint",
    "Norm",
    "WidthGroup",
    "WidthGroups",
    "traced_groups",
    "width_groups",
]


@dataclass(frozen=True)
class AxisUse:
    """One parameter or buffer axis that writes or reads a group's features.

    Unit ``i`` of the group sits at the indices ``offset + i * stride + Σ r_k * step_k``
    (``0 <= r_k < count_k`` for ``(count_k, step_k)`` in ``repeats``) along ``axis`` of
    ``tensor``: ``(0, 1, ())`` for a plain Linear; a Linear after ``flatten`` of
    ``(C, H, W)`` reads channel ``c`` at ``c·H·W + r``, ``0 <= r < H·W``, which is
    ``stride = H·W``, ``repeats = ((H·W, 1),)``; the second part of a ``cat`` has an
    ``offset``. The numbers come from the axis's
    :class:`~torch_embed.graph.layout.AxisLayout` (``WidthGroups.layouts``), which also
    gives them after widening. ``groups > 1``: the axis belongs to a grouped convolution
    with that many groups: a consumer's axis then holds one group's share (unit ``i`` is
    column ``i mod (size/groups)`` of the filters of group ``i div (size/groups)``).

    Attributes:
        tensor: The parameter or buffer FQN (``"layer1.0.conv1.weight"``).
        axis: The axis of that tensor.
        role: ``"producer"`` (writes the features: copied when a unit is copied),
            ``"per-channel"`` (scales or shifts them: BatchNorm/LayerNorm γ and β,
            running statistics, depthwise filters, layer scale; copied too),
            ``"consumer"`` (reads them: split between copies), or ``"unknown"`` (an op
            outside the vocabulary reads it; the group is then not growable).
        module: FQN of the module whose forward used the tensor.
        op: The aten op that used it.
    """

    tensor: str
    axis: int
    role: str
    module: str
    op: str
    offset: int = 0
    stride: int = 1
    repeats: tuple[tuple[int, int], ...] = ()
    groups: int = 1

    def __str__(self) -> str:
        where = f"{self.tensor}[{self.axis}]"
        extra = []
        if self.offset:
            extra.append(f"offset {self.offset}")
        if self.stride != 1 or self.repeats:
            extra.append(f"stride {self.stride}")
        if self.groups != 1:
            extra.append(f"groups {self.groups}")
        return where + (f" ({', '.join(extra)})" if extra else "")


@dataclass(frozen=True)
class WidthGroup:
    """A set of coupled feature axes that grow together.

    Attributes:
        name: The FQN of the module that first produces the group in forward order
            (``"layer1.0.conv1"``); a bare parameter of the root module (``x @ self.w``)
            gives its own FQN (``"w"``); a group no module produces is ``"<input x>"``
            (the model input) or ``"<fc.weight>"`` (only read, e.g. after an unknown op).
            A module that produces several groups (a Linear viewed as heads × head
            dims) names them ``"qkv[0]"``, ``"qkv[1]"``, ... in the order found. Names are
            unique within one :func:`width_groups` result.
        size: The number of units (neurons, channels).
        growable: Whether the group may grow at all; see ``reason`` if not.
        reason: Why it may not grow (the model input or output, or the op and module
            that pins it), ``None`` if growable.
        aliases: Every other module that writes or scales the group's whole axis (other
            producers, BatchNorms, depthwise convs, a layer scale's owner), in forward
            order; accepted wherever a name is. A norm over a concatenation of several
            groups is an alias of none of them.
        producers: The axes that write or scale the features (copied with a unit).
        consumers: The axes that read them (split between copies).
        constraints: Rules that limit how the group may grow (LayerNorm, GroupNorm,
            grouped conv, softmax, ...); growth is allowed within them.
        through: Parameter-free modules the group flows through (activations,
            dropout, pooling), in forward order.
        hidden: ``False`` when the group is a model input or output axis.
    """

    name: str
    size: int
    growable: bool
    reason: str | None
    aliases: tuple[str, ...]
    producers: tuple[AxisUse, ...]
    consumers: tuple[AxisUse, ...]
    constraints: tuple[Constraint, ...]
    through: tuple[str, ...]
    hidden: bool

    def __str__(self) -> str:
        state = "growable" if self.growable else f"rigid: {self.reason}"
        return f"WidthGroup({self.name}, size {self.size}, {state})"


@dataclass(frozen=True)
class Attention:
    """One attention found in the trace, by the groups its axes are made of.

    Attributes:
        module: FQN of the module that runs it (``scaled_dot_product_attention`` or the
            softmax of ``q @ k^T``).
        q_heads: The groups of the query head axis (with GQA: the kv heads and the
            query heads per kv head, outer first).
        kv_heads: The groups of the key/value head axis.
        head_dim: The groups of the query/key head_dim.
        packed: ``True`` for ``nn.MultiheadAttention``, whose ``embed_dim`` is both its
            input width and ``num_heads × head_dim``: a factor ``f`` grows its heads
            only (``widen(model, f)``), so the two stay equal.
        value_dim: The groups of the value head_dim (``()`` where the trace does not
            show the product with the values).
    """

    module: str
    q_heads: tuple[str, ...]
    kv_heads: tuple[str, ...]
    head_dim: tuple[str, ...]
    packed: bool = False
    value_dim: tuple[str, ...] = ()


@dataclass(frozen=True)
class Norm:
    """One LayerNorm or RMSNorm found in the trace.

    Attributes:
        module: FQN of the module that runs it.
        kind: ``"layer_norm"`` or ``"rms_norm"``.
        groups: The groups of its normalised axes (one, for a norm over the residual).
        weight: FQN of its γ (``None`` without one).
        eps: The eps the trace shows (``None``: the op's default).
        bias: FQN of its β (``None`` without one, or for an RMSNorm).
        head: FQN of the weight of the one ``linear`` that alone reads its output (an LM
            head after the final norm), else ``None``. Where that weight also embeds
            the tokens (a tied head), growing the stream by copies folds the head's
            split into this norm's γ and β (:mod:`torch_embed.graph.plan`).
    """

    module: str
    kind: str
    groups: tuple[str, ...]
    weight: str | None
    eps: float | None
    bias: str | None = None
    head: str | None = None


class WidthGroups(list[WidthGroup]):
    """The result of :func:`width_groups`: a list whose ``str`` is a table.

    ``groups.find(name)`` returns the group of that name or alias; ``groups.tracer`` says
    which tracer produced it (``"torch.export"`` or ``"torch.fx"``); ``groups.layouts``
    maps ``(tensor FQN, axis)`` to the :class:`~torch_embed.graph.layout.AxisLayout` of
    every tensor axis that carries features: the tree of groups it is made of, from
    which the indices after widening follow (``layout.resized({name: width})``). The
    in-axis of a grouped convolution's weight holds one group's share and has no entry
    (see :attr:`AxisUse.groups`). ``groups.attentions`` lists every
    :class:`Attention` with its head and head_dim groups, ``groups.norms`` every
    LayerNorm/RMSNorm (:class:`Norm`).
    """

    def __init__(
        self,
        groups: Iterable[WidthGroup] = (),
        *,
        tracer: str = "",
        layouts: dict[tuple[str, int], AxisLayout] | None = None,
        attentions: Iterable[Attention] = (),
        norms: Iterable[Norm] = (),
    ) -> None:
        super().__init__(groups)
        self.tracer = tracer
        self.layouts: dict[tuple[str, int], AxisLayout] = dict(layouts or {})
        self.attentions: tuple[Attention, ...] = tuple(attentions)
        self.norms: tuple[Norm, ...] = tuple(norms)

    def find(self, name: str) -> WidthGroup:
        """The group called ``name`` or with ``name`` among its aliases.

        Raises:
            KeyError: No group has that name or alias (the message lists the names).
        """
        for g in self:
            if g.name == name or name in g.aliases:
                return g
        raise KeyError(f"no width group named {name!r}; the groups are {[g.name for g in self]}")

    def __str__(self) -> str:
        return format_groups(self)


def format_groups(groups: Iterable[WidthGroup]) -> str:
    """A table of ``groups``: name, size, growable, producers, consumers, notes.

    Notes start with an attention role where the group has one (``heads of `attn```,
    ``kv heads``, ``query heads per kv head``, ``head_dim``, ``value head_dim``), then the
    constraint kinds (or the reason a group is rigid).
    """
    roles = _attention_roles(groups.attentions) if isinstance(groups, WidthGroups) else {}
    rows = [("group", "size", "growable", "producers", "consumers", "notes")]
    for g in groups:
        notes = g.reason if not g.growable else "; ".join(sorted({c.kind for c in g.constraints}))
        if g.name in roles and not (notes or "").startswith("head_dim:"):
            notes = f"{roles[g.name]}: {notes}" if notes else roles[g.name]
        rows.append(
            (
                g.name,
                str(g.size),
                "yes" if g.growable else "no",
                ", ".join(dict.fromkeys(_short(u) for u in g.producers if u.role == "producer"))
                or "-",
                ", ".join(dict.fromkeys(_short(u) for u in g.consumers)) or "-",
                notes or "",
            )
        )
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def _attention_roles(attentions: Iterable[Attention]) -> dict[str, str]:
    """``{group: "heads of `m`" | "kv heads of `m`" | ...}`` for the table's notes."""
    roles: dict[str, str] = {}
    for a in attentions:
        where = f"`{a.module}`" if a.module else "the model's own forward"
        for name in a.q_heads:
            if name in a.kv_heads:
                kind = "heads" if set(a.q_heads) == set(a.kv_heads) else "kv heads"
            else:
                kind = "query heads per kv head"
            roles.setdefault(name, f"{kind} of {where}")
        for name in a.head_dim:
            roles.setdefault(name, f"head_dim of {where}")
        for name in a.value_dim:
            roles.setdefault(name, f"value head_dim of {where}")
    return roles


def _short(u: AxisUse) -> str:
    return u.tensor.rsplit(".", 1)[0] if u.tensor.endswith((".weight", ".bias")) else u.tensor


def width_groups(model: nn.Module, example_inputs: Any, *, tracer: Tracer = "auto") -> WidthGroups:
    """Trace ``model(*example_inputs)`` and return its width groups, in forward order.

    Every parameter or buffer axis that carries features (not a kernel's spatial axes)
    is made of one or more groups (several after a ``flatten``, a ``cat`` or a view into
    heads: see ``WidthGroups.layouts``). The model is not changed: the trace runs under
    ``torch.no_grad`` on ``torch.export`` (non-strict; fallback
    ``torch.fx.symbolic_trace``), train/eval flags and buffers (BatchNorm running
    statistics) are left as they were.

    A trace specialises to the example input: Python branches on values and sizes
    written into ``forward`` are recorded as constants.

    Args:
        model: Any ``nn.Module`` (not a DDP/FSDP/``torch.compile`` wrapper).
        example_inputs: A tensor, or a tuple of the forward's positional arguments.
        tracer: ``"auto"`` (export, then fx), ``"export"`` or ``"fx"``.

    Returns:
        A :class:`WidthGroups` list (``print`` shows a table; ``.find(name)``).

    Raises:
        TypeError: A wrapper, an inference tensor, or ``example_inputs`` of the wrong type.
        ValueError: A parametrized or uninitialized lazy module, or a model neither
            tracer can trace (the message gives both errors).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import torch_embed
        >>> net = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
        >>> print(torch_embed.width_groups(net, torch.randn(4, 3)))
        group          size  growable  producers  consumers  notes
        <input input>  3     no        -          0          model input `input`
        0              5     yes       0          2
        2              2     no        2          -          model output
    """
    args = check_model(model, example_inputs, "width_groups")
    return traced_groups(model, args, tracer)


def traced_groups(model: nn.Module, args: tuple[Any, ...], tracer: Tracer = "auto") -> WidthGroups:
    """:func:`width_groups` without its input checks: the caller made them.

    :func:`torch_embed.read_sequential` checks an ``nn.Sequential`` module by module
    (with messages that name each layer) and then reads its groups here.
    """
    traced = trace(model, args, tracer)
    groups = _collect(interpret(traced), traced.inputs)
    groups.tracer = traced.tracer
    return groups


def _collect(it: Interpretation, inputs: tuple[tuple[str, Any], ...]) -> WidthGroups:
    atoms = it.atoms
    uses: dict[int, list[tuple[int, AxisUse, bool]]] = defaultdict(list)
    layouts: dict[tuple[str, int], AxisLayout] = {}
    for u in it.uses:
        if u.role == "kernel":
            continue
        layout = atoms.layout(u.atom)
        whole = layout.kind == "group"
        for slot in layout.placements():
            leaf = int(slot.group[1:])
            if atoms.size(leaf) == 1 and not whole:
                continue
            use = AxisUse(
                u.tensor, u.axis, u.role, u.module, u.op, slot.offset, slot.stride,
                slot.repeats, u.groups,
            )  # fmt: skip
            uses[leaf].append((u.node, use, whole))
        if not (u.role == "consumer" and u.groups > 1):  # a grouped conv's share: see groups
            layouts.setdefault((u.tensor, u.axis), layout)
    reasons: dict[int, list[tuple[str, str]]] = defaultdict(list)
    for atom, kind, reason in it.rigid:
        for leaf in atoms.leaves(atom):
            if (kind, reason) not in reasons[leaf]:
                reasons[leaf].append((kind, reason))
    constraints: dict[int, list[Constraint]] = defaultdict(list)
    for atom, c in it.constraints:
        for leaf in atoms.leaves(atom):
            if c not in constraints[leaf]:
                constraints[leaf].append(c)
    for atom, c in _tied(it):
        for leaf in atoms.leaves(atom):
            if c not in constraints[leaf]:
                constraints[leaf].append(c)
    through: dict[int, list[str]] = defaultdict(list)
    for atom, _node, module in it.through:
        for leaf in atoms.leaves(atom):
            if module not in through[leaf]:
                through[leaf].append(module)
    input_of: dict[int, str] = {}
    for name, _shape in inputs:
        for atom in it.values.get(name) or ():
            for leaf in atoms.leaves(atom):
                input_of.setdefault(leaf, name)

    found: list[tuple[tuple[int, int], int, WidthGroup]] = []
    for leaf, entries in uses.items():
        entries.sort(key=lambda e: e[0])
        writes = [(n, u) for n, u, _ in entries if u.role == "producer"]
        scales = [(n, u) for n, u, _ in entries if u.role == "per-channel"]
        if writes:
            name, order = _owner(writes[0][1]), writes[0][0]
        elif leaf in input_of:
            name, order = f"<input {input_of[leaf]}>", -1
        elif scales:
            name, order = _owner(scales[0][1]), scales[0][0]
        else:
            name, order = f"<{entries[0][1].tensor}>", entries[0][0]
        pins = reasons.get(leaf, [])
        if not writes and not scales and any(kind == "spatial" for kind, _ in pins):
            continue  # a spatial axis read through a flatten: the consumer's repeats cover it
        # modules whose whole output axis is this group (a norm over a concat is none's)
        aliases = tuple(
            dict.fromkeys(
                _owner(u)
                for _, u, whole in entries
                if whole and u.role in ("producer", "per-channel") and _owner(u) != name
            )
        )
        why = "; ".join(r for _, r in pins) or None
        group = WidthGroup(
            name=name,
            size=atoms.size(leaf),
            growable=not pins,
            reason=rotary_reason(why, constraints.get(leaf, ())),
            aliases=aliases,
            producers=tuple(u for _, u, _ in entries if u.role in ("producer", "per-channel")),
            consumers=tuple(u for _, u, _ in entries if u.role in ("consumer", "unknown")),
            constraints=tuple(constraints.get(leaf, ())),
            through=tuple(through.get(leaf, ())),
            hidden=not any(kind in ("input", "output") for kind, _ in pins),
        )
        found.append(((order, min(e[0] for e in entries)), leaf, group))
    found.sort(key=lambda e: e[0])
    named = _unique_names([g for _, _, g in found])
    names = {f"#{leaf}": g.name for (_, leaf, _), g in zip(found, named)}
    fixed = frozenset(n for lay in layouts.values() for n in lay.groups() if n not in names)

    repeated = {leaf for a in it.repeats for leaf in atoms.leaves(a)}

    def named_leaves(atom: int | None, drop: set[int] | None = None) -> tuple[str, ...]:
        if atom is None:
            return ()
        return tuple(
            dict.fromkeys(
                names[f"#{leaf}"]
                for leaf in atoms.leaves(atom)
                if f"#{leaf}" in names and leaf not in (drop or ())
            )
        )

    packed = {leaf for a in it.packed for leaf in atoms.leaves(a)}
    attentions = dict.fromkeys(
        Attention(
            module,
            named_leaves(qh),
            named_leaves(kh, repeated),
            named_leaves(dim),
            bool(set(atoms.leaves(dim)) & packed),
            named_leaves(vdim),
        )
        for module, qh, kh, dim, vdim in it.attentions
    )
    return WidthGroups(
        named,
        layouts={key: lay.rename(names, fixed) for key, lay in layouts.items()},
        attentions=attentions,
        norms=[
            Norm(
                module,
                kind,
                tuple(n for a in axes for n in named_leaves(a)),
                weight,
                eps,
                it.norm_nodes.get(k, ("", None))[1],
                it.norm_heads.get(k),
            )
            for k, (module, kind, axes, weight, eps) in enumerate(it.norms)
        ],
    )


def _tied(it: Interpretation) -> list[tuple[int, Constraint]]:
    """A ``"tied"`` constraint on every group a tensor used by several ops touches."""
    ops: dict[str, dict[int, str]] = defaultdict(dict)
    for u in it.uses:
        if u.role != "kernel":
            ops[u.tensor][u.node] = u.module
    out = []
    for u in it.uses:
        modules = ops[u.tensor]
        if len(modules) > 1 and u.role != "kernel":
            names = ", ".join(
                f"`{m}`" if m else "the model's own forward" for m in modules.values()
            )
            rule = (
                f"`{u.tensor}` is used by {len(modules)} ops ({names}): weight tying or a "
                f"module called twice; every use must see the same copies"
            )
            first = next(iter(modules.values()))
            out.append((u.atom, Constraint("tied", f"`{u.tensor}`", first, rule)))
    return out


def _owner(u: AxisUse) -> str:
    return u.module if u.module else u.tensor


def _unique_names(groups: list[WidthGroup]) -> list[WidthGroup]:
    """Suffix ``[k]`` to names several groups share (one module producing several)."""
    count: dict[str, int] = defaultdict(int)
    for g in groups:
        count[g.name] += 1
    seen: dict[str, int] = defaultdict(int)
    out = []
    for g in groups:
        if count[g.name] > 1:
            k = seen[g.name]
            seen[g.name] += 1
            g = WidthGroup(**{**g.__dict__, "name": f"{g.name}[{k}]"})
        out.append(g)
    return out
