"""The landscape side of a :class:`~torch_embed.graph.embedding.GroupEmbedding`.

A traced model's embedding ``θ ↦ Aθ`` maps every tensor entry by a gather and a scale
(:class:`~torch_embed.graph.embedding.AxisMap`): wide entry ``J`` reads narrow entry
``e(J)`` (or nothing: a null unit) times ``a(J)``, and gradients map by the same gather
with the factors ``b(J)`` (``∇R_wide = B ∇R_narrow``). Per narrow entry ``e``, its
*fiber* ``F_e = {J : e(J) = e}`` holds its copies; the coefficients of the copies of
each unit sum to 1, so ``Σ_{J ∈ F_e} a(J)·b(J) = 1`` and ``BᵀA = I``. From that:

* :func:`restrict` is a left inverse of ``apply``: it reads writers and per-channel
  tensors from the first copy and sums readers over the copies (rounding of the summed
  shares aside, ``restrict(apply(s)) == s``).
* :func:`then` composes two embeddings (gathers compose into a gather, factors
  multiply).
* :func:`inertia_change` is the exact change of Hessian inertia (docs/theory.md, "The
  exact inertia change of an embedding"), computed along *complement directions*
  ``C``: an orthonormal basis of ``ker Bᵀ``, one block of directions per fiber
  (orthogonal to ``b`` on the fiber) and one unit vector per null entry. For a critical
  embedding ``Cᵀ∇R_wide(Aθ) = CᵀB∇R_narrow(θ) = 0`` for every ``θ``, hence
  ``AᵀH_wide C = 0`` at every embedded point, and with ``T = [A C]`` (invertible since
  ``BᵀA = I``) Sylvester's law of inertia gives::

      inertia(H_wide) = inertia(H_narrow) + inertia(D),   D = Cᵀ H_wide C.

  ``D`` takes ``dim C = P_wide - P_narrow`` Hessian-vector products; the wide Hessian
  is never built. The premise (gradients map by ``B``) is the papers' statement applied
  to channels: it is **measured**, not assumed. The same products give
  ``AᵀH_wide C``; if it is not at rounding level (:data:`COUPLING_LIMIT`, relative to
  ``|A|·‖H_wide‖``) the inertia change is refused with the number, and a full recount
  (:func:`~torch_embed.inertia.hessian_inertia` of both models) is the way to go.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from torch_embed.embedding import LayerMap
from torch_embed.graph.apply import check_tensors_held
from torch_embed.graph.embedding import AxisMap, GroupEmbedding
from torch_embed.graph.groups import WidthGroups
from torch_embed.hessian import HessianOperator
from torch_embed.inertia import (
    DEFAULT_MIN_GAP,
    Inertia,
    _tolerance_and_gap,
    default_tolerance,
    eigenvalues,
)

__all__ = [
    "COUPLING_LIMIT",
    "GroupComplement",
    "complement_basis",
    "complement_block",
    "inertia_change",
    "restrict",
    "steps",
    "then",
]

LossFn = Callable[[Any, Any], Tensor]

#: Largest :attr:`GroupComplement.coupling` (``|AᵀH_wide C|`` relative to
#: ``|A|·‖H_wide‖``) accepted as "zero" (the block structure holds). In
#: tests/test_group_analysis.py it measured at most 2e-16 where the structure holds and
#: 4e-2 where it does not (a LayerNorm shared by copies with unequal shares).
COUPLING_LIMIT = 1e-8
_METHODS = ("auto", "hvp", "closed-form")


# --------------------------------------------------------------------------- restrict
def _gathers_only(embedding: GroupEmbedding, what: str) -> None:
    """Refuse axes that are no gather with coefficients (``restrict``, ``then``, ...).

    Matrix coefficients (one per connection) are not one coefficient per unit; a
    head_dim's temperature gain rescales copies and readers, and a LayerNorm's
    mean-fill writes the mean of the narrow entries into the new ones: neither is a
    copy or a null unit, which is what these functions invert, compose and count.
    """
    matrices = sorted(n for n, lm in embedding.maps.items() if not lm.is_vector)
    if matrices:
        raise ValueError(
            f"{what}: width groups {matrices} have matrix coefficients (General with one "
            f"coefficient per connection); {what} is defined for embeddings with one "
            f"coefficient per wide unit only"
        )
    for a in embedding.axes:
        why = "a mean-fill" if a.mean else "a temperature gain" if a.gain is not None else ""
        if why:
            raise ValueError(
                f"{what}: `{a.tensor}` axis {a.axis} is grown by {why} (GROWTH.md §2), not "
                f"by copies and null units; {what} is defined for embeddings made of copies "
                f"and null units only"
            )


def restrict(embedding: GroupEmbedding, wide_state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Pull a wide ``{FQN: tensor}`` state back to the narrow one it embeds.

    Writers and per-channel tensors (weight rows, biases, BatchNorm γ, β and running
    statistics, depthwise filters) are read from the first copy of each narrow unit;
    readers (weight columns) are summed over the copies; null units are dropped. Keys
    the embedding does not touch pass through. ``restrict(apply(s))`` is ``s``: exactly
    on copied axes and when the shares add up exactly (``α = 1/2``, null units), else
    up to the rounding of the summed shares (a few ulps); Net2Net's symmetric noise
    cancels in the sum to the same rounding.

    Args:
        embedding: The embedding.
        wide_state: Wide tensors by FQN (parameters, buffers, gradients...).

    Returns:
        The narrow tensors (readers summed in float64, then cast back).

    Raises:
        ValueError: A tensor whose size along a mapped axis is not the wide one.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import torch_embed
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)).double()
        >>> x = torch.randn(4, 2, dtype=torch.float64)
        >>> narrow = {k: v.clone() for k, v in net.state_dict().items()}
        >>> emb = torch_embed.widen(net, {"0": 5}, torch_embed.Split(alpha=0.5),
        ...                         example_inputs=x)
        >>> back = emb.restrict(net.state_dict())
        >>> all(torch.equal(back[k], v) for k, v in narrow.items())
        True
    """
    _gathers_only(embedding, "restrict")
    out = dict(wide_state)
    for name, axes in _axes_by_tensor(embedding).items():
        if name not in wide_state:
            continue
        t = wide_state[name]
        # apply maps plain axes first, then a grouped conv's in-axis: undo in reverse
        for a in reversed(sorted(axes, key=lambda a: a.groups > 1)):
            t = _restrict_axis(t, a)
        out[name] = t
    return out


def _axes_by_tensor(embedding: GroupEmbedding) -> dict[str, list[AxisMap]]:
    by_tensor: dict[str, list[AxisMap]] = {}
    for a in embedding.axes:
        by_tensor.setdefault(a.tensor, []).append(a)
    return by_tensor


def _narrow_count(a: AxisMap) -> int:
    """The narrow length of a map's axis (every narrow entry has a copy)."""
    kept = a.source[a.source >= 0]
    return int(kept.max()) + 1 if kept.numel() else 0


def _first_copies(source: Tensor, n: int) -> Tensor:
    """For each narrow entry ``e < n``, the first wide index ``j`` with ``source[j] == e``."""
    idx = torch.arange(source.numel())
    keep = source >= 0
    first = torch.full((n,), source.numel(), dtype=torch.int64)
    first.scatter_reduce_(0, source[keep], idx[keep], reduce="amin")
    return first


def _restrict_axis(t: Tensor, a: AxisMap) -> Tensor:
    src = a.source.to(t.device)
    n = _narrow_count(a)
    wide = src.numel() // a.groups
    if t.dim() <= a.axis or t.shape[a.axis] != wide:
        raise ValueError(
            f"`{a.tensor}` has shape {tuple(t.shape)}, but the embedding's wide side has "
            f"{wide} entries along axis {a.axis}; pass the wide tensors (the model the "
            f"embedding widened)"
        )
    if a.groups == 1:
        if a.role != "split":
            return t.index_select(a.axis, _first_copies(a.source, n).to(t.device))
        keep = (src >= 0).nonzero().flatten()
        shape = list(t.shape)
        shape[a.axis] = n
        acc = torch.zeros(shape, dtype=torch.float64, device=t.device)
        acc.index_add_(a.axis, src[keep], t.index_select(a.axis, keep).to(torch.float64))
        return acc.to(t.dtype)
    # the in-axis of a grouped conv weight (out, in/g, *kernel): segment q of the rows
    # reads segment q of the channels; sum the copies inside each segment
    g = a.groups
    rows, wide_share = t.shape[0], t.shape[1]
    share = n // g
    w = t.reshape(g, rows // g, wide_share, *t.shape[2:]).to(torch.float64)
    acc = torch.zeros(g, rows // g, share, *t.shape[2:], dtype=torch.float64, device=t.device)
    local = src.view(g, wide_share) - torch.arange(g, device=t.device).view(g, 1) * share
    for q in range(g):
        keep = (src.view(g, wide_share)[q] >= 0).nonzero().flatten()
        acc[q].index_add_(1, local[q][keep], w[q].index_select(1, keep))
    return acc.reshape(rows, share, *t.shape[2:]).to(t.dtype)


# --------------------------------------------------------------------------- then
def then(first: GroupEmbedding, second: GroupEmbedding) -> GroupEmbedding:
    """Compose: first ``first`` (narrow → mid), then ``second`` (mid → wide).

    ``second`` must have been planned on the model ``first`` widened (group names are
    the producers' FQNs, so they stay the same). Each axis's gathers compose into one
    gather and the factors multiply, so ``then(a, b).apply(s)`` equals
    ``b.apply(a.apply(s))`` up to the rounding of the products of coefficients; the same
    holds for ``map_gradients`` and ``restrict``.

    Raises:
        ValueError: ``second`` does not start where ``first`` ends (a group or a tensor
            axis of another size, an axis that writes in one and reads in the other),
            or either carries Net2Net's noise (a random perturbation of the readers
            that is no gather: plan with ``Net2Net(noise=0.0)`` to compose).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import torch_embed
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)).double()
        >>> x = torch.randn(4, 2, dtype=torch.float64)
        >>> half = torch_embed.Split(alpha=0.5, select="cyclic")  # copies unit 0
        >>> a = torch_embed.widen(net, {"0": 4}, half, example_inputs=x)
        >>> b = torch_embed.widen(net, {"0": 6}, torch_embed.Null(), example_inputs=x)
        >>> ab = a.then(b)
        >>> ab.sizes, ab.maps["0"].source.tolist()
        ({'0': (3, 6)}, [0, 1, 2, 0, -1, -1])
    """
    for emb in (first, second):
        _gathers_only(emb, "then")
        if any(a.null_init for a in emb.axes):
            raise ValueError(
                f"cannot compose an embedding whose null units get random values (scheme "
                f"{emb.scheme!r}: a random fan-in or RandomPad): they are no gather"
            )
        if emb.null_values:
            raise ValueError(
                f"cannot compose an embedding whose null units feed their readers a nonzero "
                f"value σ(β) (scheme {emb.scheme!r}, readers {sorted(emb.null_values)}); "
                f"compose with Null(bias=0.0)"
            )
        if emb.noise:
            raise ValueError(
                f"cannot compose an embedding with Net2Net noise ({emb.noise:g}, scheme "
                f"{emb.scheme!r}): the noise is a random perturbation of the readers, not "
                f"a gather; plan with Net2Net(noise=0.0) to compose"
            )
    sizes: dict[str, tuple[int, int]] = dict(first.sizes)
    for name, (n_mid, n_wide) in second.sizes.items():
        if name in first.sizes:
            if first.sizes[name][1] != n_mid:
                raise ValueError(
                    f"cannot compose: width group {name!r} ends at {first.sizes[name][1]} "
                    f"units in the first embedding but starts at {n_mid} in the second"
                )
            sizes[name] = (first.sizes[name][0], n_wide)
        else:
            sizes[name] = (n_mid, n_wide)
    maps: dict[str, LayerMap] = dict(first.maps)
    for name, lm in second.maps.items():
        maps[name] = _compose_layer(first.maps[name], lm) if name in first.maps else lm
    axes: list[AxisMap] = []
    later = {(b.tensor, b.axis, b.groups): b for b in second.axes}
    for a in first.axes:
        b = later.pop((a.tensor, a.axis, a.groups), None)
        axes.append(a if b is None else _compose_axis(a, b))
    axes.extend(later.values())
    return GroupEmbedding(
        maps,
        sizes,
        tuple(axes),
        f"{first.scheme} then {second.scheme}",
        tuple(dict.fromkeys(first.reasons_ + second.reasons_)),
        preserves_output=first.preserves_output and second.preserves_output,
    )


def _compose_layer(a: LayerMap, b: LayerMap) -> LayerMap:
    sb = b.source.clamp(min=0)
    null = (b.source < 0) | (a.source[sb] < 0)
    source = torch.where(null, -1, a.source[sb])
    coef = torch.where(null, 0.0, a.coef[sb] * b.coef)
    nb = torch.where(b.source < 0, b.null_bias, a.null_bias[sb])
    nv = torch.where(b.source < 0, b.null_value, a.null_value[sb])
    return LayerMap(source, coef, torch.where(null, nb, 0.0), torch.where(null, nv, 0.0))


def _compose_axis(a: AxisMap, b: AxisMap) -> AxisMap:
    where = f"`{a.tensor}` axis {a.axis}"
    if a.role != b.role:
        raise ValueError(
            f"cannot compose: {where} is a {a.role} axis in the first embedding and a "
            f"{b.role} axis in the second"
        )
    if _narrow_count(b) != a.source.numel():
        raise ValueError(
            f"cannot compose: {where} has {a.source.numel()} entries after the first "
            f"embedding, but the second starts from {_narrow_count(b)}; plan the second "
            f"on the model the first one widened"
        )
    sb = b.source.clamp(min=0)
    null = (b.source < 0) | (a.source[sb] < 0)
    source = torch.where(null, -1, a.source[sb])
    coef = torch.where(null, 0.0, a.coef[sb] * b.coef)
    fill = None
    if a.null_fill is not None or b.null_fill is not None:  # what each null entry holds
        zeros = torch.zeros(b.source.numel(), dtype=torch.float64)
        fb = zeros if b.null_fill is None else b.null_fill
        fa = zeros if a.null_fill is None else a.null_fill[sb]
        fill = torch.where(b.source < 0, fb, torch.where(null, fa, 0.0))
    return dataclasses.replace(a, source=source, coef=coef, null_fill=fill)


# --------------------------------------------------------------------------- steps
# constraints under which one unit at a time keeps the output (a sum over the group
# takes null units, a max copies; a depthwise conv follows its channels)
_STEPWISE = ("sum", "max", "min", "depthwise_conv", "tied")


def steps(embedding: GroupEmbedding, groups: WidthGroups) -> list[GroupEmbedding]:
    """Decompose into one-step splits and null units, then one permutation.

    Each returned embedding adds exactly one unit to one group (or, the last, only
    reorders units), and ``then``-composing them gives ``embedding`` (up to the rounding
    of the coefficients): as :meth:`torch_embed.Embedding.steps`, group by group in the
    order of ``embedding.sizes``. The tensor axes of each step come from the groups'
    axis layouts at that step's widths, so ``groups`` must be the width groups of the
    model (traced before or after widening: only the layouts' shapes matter).

    Args:
        embedding: The embedding to decompose.
        groups: :func:`~torch_embed.width_groups` of the narrow or the widened model.

    Raises:
        ValueError: Net2Net noise (not a chain of gathers); a grown group under a rule
            that one unit at a time would break (LayerNorm, GroupNorm, a grouped conv, a
            mean, an equal-size chunk: every unit copied alike or every segment grown
            alike), named with the rule; ``groups`` of another model.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import torch_embed
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)).double()
        >>> x = torch.randn(4, 2, dtype=torch.float64)
        >>> split = torch_embed.Split(alpha=0.25, select="cyclic")  # units 0, then 1
        >>> emb = torch_embed.widen(net, {"0": 5}, split, example_inputs=x)
        >>> pieces = steps(emb, torch_embed.width_groups(net, x))
        >>> [(p.sizes, p.maps["0"].source.tolist()) for p in pieces]
        [({'0': (3, 4)}, [0, 1, 2, 0]), ({'0': (4, 5)}, [0, 1, 2, 3, 1])]
    """
    from torch_embed.embedding import _split_order
    from torch_embed.graph.plan import _axes

    _gathers_only(embedding, "steps")
    if embedding.noise:
        raise ValueError(
            f"Net2Net noise ({embedding.noise:g}) is not a chain of one-step embeddings; "
            f"plan with Net2Net(noise=0.0) to decompose"
        )
    widths: dict[str, int] = {}
    for name, (narrow, wide) in embedding.sizes.items():
        try:
            group = groups.find(name)
        except KeyError:
            raise ValueError(f"width group {name!r} is not among the given groups") from None
        if group.size not in (narrow, wide):
            raise ValueError(
                f"width group {name!r} has {group.size} units in the given groups, but the "
                f"embedding takes it from {narrow} to {wide}: pass the model's own groups"
            )
        for c in group.constraints:
            if c.kind not in _STEPWISE and not (c.kind == "grouped_conv" and c.groups == 1):
                raise ValueError(
                    f"width group {name!r}: {c.op} constrains it ({c.rule}); one unit at a "
                    f"time would break that rule, so the embedding has no one-step pieces"
                )
        widths[name] = narrow

    def piece(maps: dict[str, LayerMap]) -> GroupEmbedding:
        current = WidthGroups(
            list(groups),
            tracer=groups.tracer,
            layouts={k: v.resized(widths) for k, v in groups.layouts.items()},
        )
        sizes = {n: (widths[n], lm.wide) for n, lm in maps.items()}
        return GroupEmbedding(
            maps, sizes, _axes(current, maps, {}, {}, "", 0.0, consumers=False), "one step"
        )

    out: list[GroupEmbedding] = []
    final: dict[str, list[int]] = {}
    for name, lm in embedding.maps.items():
        if not lm.is_vector:
            raise ValueError(f"width group {name!r}: matrix coefficients have no one-step pieces")
        narrow = embedding.sizes[name][0]
        src, coef = lm.source.tolist(), lm.coef.tolist()
        copies: dict[int, list[int]] = {}
        for j, s_j in enumerate(src):
            copies.setdefault(s_j, []).append(j)
        at_index, appended = [-1] * narrow, []
        for s in range(narrow):
            primary, rest = _split_order([coef[j] for j in copies[s]])
            at_index[s] = copies[s][primary]
            share = 1.0
            for idx in rest:
                alpha = coef[copies[s][idx]] / share
                m = widths[name]
                step_coef = torch.ones(m + 1, dtype=torch.float64)
                step_coef[s], step_coef[m] = 1.0 - alpha, alpha
                source = torch.cat([torch.arange(m), torch.tensor([s])])
                zeros = torch.zeros(m + 1, dtype=torch.float64)
                out.append(piece({name: LayerMap(source, step_coef, zeros, zeros.clone())}))
                widths[name] = m + 1
                share -= coef[copies[s][idx]]
                appended.append(copies[s][idx])
        for j in copies.get(-1, []):
            m = widths[name]
            step_coef = torch.ones(m + 1, dtype=torch.float64)
            step_coef[m] = 0.0
            source = torch.cat([torch.arange(m), torch.tensor([-1])])
            zeros = torch.zeros(m + 1, dtype=torch.float64)
            out.append(piece({name: LayerMap(source, step_coef, zeros, zeros.clone())}))
            widths[name] = m + 1
            appended.append(j)
        final[name] = at_index + appended
    perm: dict[str, LayerMap] = {}
    for name, order in final.items():
        wide = len(order)
        pos = torch.empty(wide, dtype=torch.int64)
        pos[torch.tensor(order)] = torch.arange(wide)
        if not torch.equal(pos, torch.arange(wide)):
            perm[name] = LayerMap.identity(wide)
            perm[name] = LayerMap(pos, perm[name].coef, perm[name].null_bias, perm[name].null_value)
    if perm:
        out.append(piece(perm))
    return out


# --------------------------------------------------------------------------- fibers
@dataclass(frozen=True)
class _Fibers:
    """Per wide entry of one tensor (flat): narrow entry read, and the factors of A, B."""

    source: Tensor  # int64, -1 for a null entry
    apply: Tensor  # float64 a(J)
    grad: Tensor  # float64 b(J)


def _fibers(embedding: GroupEmbedding, name: str, narrow_shape: torch.Size) -> _Fibers:
    """The entry-wise gather of ``name``, read off the embedding's own maps.

    The narrow tensor ``1, 2, 3, ...`` mapped with every coefficient set to 1 gives the
    (1-based) narrow entry each wide entry reads, 0 on null units; the narrow tensor of
    ones mapped by ``apply`` and ``map_gradients`` gives the factors.
    """
    n = math.prod(narrow_shape)
    plain = dataclasses.replace(
        embedding,
        axes=tuple(dataclasses.replace(a, coef=torch.ones_like(a.coef)) for a in embedding.axes),
        noise=0.0,
    )
    index = torch.arange(1, n + 1, dtype=torch.float64).view(narrow_shape)
    ones = torch.ones(narrow_shape, dtype=torch.float64)
    src = plain.map_gradients({name: index})[name].reshape(-1).round().to(torch.int64) - 1
    a = dataclasses.replace(embedding, noise=0.0).apply({name: ones})[name].reshape(-1)
    b = embedding.map_gradients({name: ones})[name].reshape(-1)
    return _Fibers(src, a, b)


def _kernel_entries(fib: _Fibers) -> tuple[Tensor, Tensor, Tensor, int]:
    """An orthonormal basis of ``ker Bᵀ`` on one tensor, as sparse entries.

    Returns ``(row, col, value, count)``: direction ``row`` has ``value`` at flat wide
    entry ``col``; ``count`` directions. Per fiber ``F`` with factors ``b_F``: the
    columns 2..k of the Householder reflection that maps ``e_1`` to ``±b_F/|b_F|``
    (orthonormal, orthogonal to ``b_F``); per null entry: its unit vector.
    """
    src, b = fib.source, fib.grad
    null = (src < 0).nonzero().flatten()
    rows, cols, vals = [torch.arange(null.numel())], [null], [torch.ones(null.numel())]
    count = null.numel()
    kept = (src >= 0).nonzero().flatten()
    order = torch.argsort(src[kept], stable=True)
    entries = kept[order]
    _, sizes = torch.unique_consecutive(src[entries], return_counts=True)
    starts = torch.cumsum(sizes, 0) - sizes
    for k in torch.unique(sizes).tolist():
        if k < 2:
            continue
        first = starts[sizes == k]
        idx = entries[first[:, None] + torch.arange(k)]  # (fibers, k)
        s = b[idx].to(torch.float64)
        norm = s.norm(dim=1, keepdim=True)
        if bool((norm == 0).any()):
            raise ValueError("a fiber whose gradient factors are all zero: not an embedding")
        u = s / norm
        v = u.clone()
        v[:, 0] += torch.where(u[:, 0] >= 0, 1.0, -1.0)
        house = (
            torch.eye(k, dtype=torch.float64)
            - 2 * v[:, :, None] * v[:, None, :] / (v * v).sum(1)[:, None, None]
        )
        dirs = house[:, :, 1:]  # (fibers, k, k-1): direction (f, m) on the entries idx[f]
        f = idx.shape[0]
        row = count + torch.arange(f * (k - 1)).view(f, k - 1)
        rows.append(row[:, None, :].expand(f, k, k - 1).reshape(-1))
        cols.append(idx[:, :, None].expand(f, k, k - 1).reshape(-1))
        vals.append(dirs.reshape(-1))
        count += f * (k - 1)
    return (
        torch.cat(rows).to(torch.int64),
        torch.cat(cols).to(torch.int64),
        torch.cat(vals).to(torch.float64),
        count,
    )


@dataclass(frozen=True)
class _Basis:
    """``C`` (sparse ``(K, P_wide)``) and ``Aᵀ``'s gather (wide → narrow flat entries)."""

    rows: Tensor
    cols: Tensor
    vals: Tensor
    count: int
    p_wide: int
    p_narrow: int
    narrow_of: Tensor  # int64 (P_wide,): the narrow flat entry each wide entry reads
    apply: Tensor  # float64 (P_wide,): a(J)


def _basis(embedding: GroupEmbedding, names: tuple[str, ...], wide: Mapping[str, Tensor]) -> _Basis:
    narrow = restrict(embedding, {n: wide[n] for n in names})
    by_tensor = _axes_by_tensor(embedding)
    rows, cols, vals = [], [], []
    narrow_of, apply = [], []
    count = off_w = off_n = 0
    for n in names:
        pw, pn = wide[n].numel(), narrow[n].numel()
        if n in by_tensor:
            fib = _fibers(embedding, n, narrow[n].shape)
            r, c, v, k = _kernel_entries(fib)
            rows.append(r + count)
            cols.append(c + off_w)
            vals.append(v)
            count += k
            narrow_of.append(torch.where(fib.source >= 0, fib.source + off_n, -1))
            apply.append(fib.apply)
        else:
            narrow_of.append(torch.arange(pn) + off_n)
            apply.append(torch.ones(pn, dtype=torch.float64))
        off_w += pw
        off_n += pn
    if count != off_w - off_n:
        raise RuntimeError(
            f"internal error: {count} complement directions for {off_w - off_n} new parameters"
        )
    empty = torch.zeros(0, dtype=torch.int64)
    return _Basis(
        torch.cat(rows) if rows else empty,
        torch.cat(cols) if cols else empty,
        torch.cat(vals) if vals else torch.zeros(0, dtype=torch.float64),
        count,
        off_w,
        off_n,
        torch.cat(narrow_of),
        torch.cat(apply),
    )


def complement_basis(embedding: GroupEmbedding, model: nn.Module) -> Tensor:
    """The complement directions ``C`` of ``embedding`` at the widened ``model``.

    Rows are orthonormal, span ``ker Bᵀ`` (``dim = P_wide - P_narrow``) and are in the
    flat order of the model's trainable parameters (``named_parameters()``), as in
    :func:`~torch_embed.hessian.hvp`. Per narrow entry with copies of gradient factors
    ``b_1..b_k``: ``k - 1`` directions on those copies orthogonal to ``b`` (for a split
    of a weight row, ``(α, -(1-α))/norm`` on the two rows; for a reader column,
    ``(1, -1)/√2``); per null entry its unit vector.

    Returns:
        A sparse COO ``float64`` tensor of shape ``(P_wide - P_narrow, P_wide)``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import torch_embed
        >>> net = nn.Sequential(nn.Linear(1, 2), nn.Tanh(), nn.Linear(2, 1)).double()
        >>> x = torch.randn(4, 1, dtype=torch.float64)
        >>> emb = torch_embed.widen(net, {"0": 3}, torch_embed.Split(alpha=0.5, select="cyclic"),
        ...                         example_inputs=x)
        >>> c = complement_basis(emb, net).to_dense()
        >>> c.shape, bool(torch.allclose(c @ c.T, torch.eye(3, dtype=torch.float64)))
        (torch.Size([3, 10]), True)
    """
    params = _named(model, embedding)[0]
    names = tuple(n for n, p in params.items() if p.requires_grad)
    basis = _basis(embedding, names, {n: p.detach() for n, p in params.items()})
    return torch.sparse_coo_tensor(
        torch.stack([basis.rows, basis.cols]),
        basis.vals,
        (basis.count, basis.p_wide),
        check_invariants=True,
    ).coalesce()


# --------------------------------------------------------------------------- the block
@dataclass(frozen=True, eq=False)
class GroupComplement:
    """The complement block of a traced model's embedding, with what was measured.

    Attributes:
        matrix: ``D = Cᵀ H_wide C`` for the orthonormal directions of
            :func:`complement_basis` (``float64``, symmetrized).
        coupling: ``max_ij |(AᵀH_wide C)_ij| / (|A e_i|·‖H_wide‖)`` (at most 1 by
            Cauchy-Schwarz; ``‖H_wide‖`` estimated by power iteration): 0 up to
            rounding when gradients map by ``B`` (the premise of the block structure),
            measured from the same products as ``D``.
        h_norm: The power-iteration estimate of ``‖H_wide‖₂`` (a lower bound).
        grad_norm: ``|∇R_wide|`` at the point.
        complement_grad: ``|Cᵀ∇R_wide|``: 0 up to rounding when ``∇R_wide`` lies in the
            range of ``B`` (at any embedded point, critical or not).
        p_narrow: Trainable parameters of the narrow model.
        p_wide: Trainable parameters of the wide model.
    """

    matrix: Tensor
    coupling: float
    h_norm: float
    grad_norm: float
    complement_grad: float
    p_narrow: int
    p_wide: int


def _check_point(
    embedding: GroupEmbedding, model: nn.Module, method: str
) -> tuple[dict[str, Tensor], tuple[str, ...]]:
    if not isinstance(embedding, GroupEmbedding):
        raise TypeError(
            f"expected a GroupEmbedding (returned by torch_embed.widen for a traced model), "
            f"got {type(embedding).__name__}"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module (the WIDENED model), got {type(model)}")
    _gathers_only(embedding, "inertia_change")
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if method == "closed-form":
        raise ValueError(
            "method='closed-form' covers Sequential MLPs only; a traced model's inertia "
            "change is computed from Hessian-vector products (method='auto' or 'hvp')"
        )
    if embedding.reasons:
        raise ValueError(
            f"the inertia change is only defined for critical embeddings (the Hessian "
            f"congruence needs ∇R_wide = B ∇R_narrow at every embedded point); this "
            f"embedding is {embedding.kind.value}: {'; '.join(embedding.reasons)}"
        )
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    if frozen:
        raise ValueError(
            f"parameters {frozen} of the {type(model).__name__} are frozen "
            f"(requires_grad=False); the inertia change is defined for the Hessian over "
            f"all parameters"
        )
    params, buffers = _named(model, embedding)
    state = {**params, **buffers}
    check_tensors_held(
        embedding, state, model, "inertia_change: the embedding maps", "; pass the model it widened"
    )
    wide = {t: state[t].detach() for t in embedding.tensors}
    again = dataclasses.replace(embedding, noise=0.0).apply(restrict(embedding, wide))
    for t, target in wide.items():
        got = again[t]
        if got.shape != target.shape:
            raise ValueError(
                f"`{t}` has shape {tuple(target.shape)}, but the embedding widens it to "
                f"{tuple(got.shape)}; pass the model it widened"
            )
        if not target.is_floating_point() or not target.numel():
            continue
        eps = torch.finfo(target.dtype).eps
        scale = float(target.abs().max())
        err = float((got.to(torch.float64) - target.to(torch.float64)).abs().max())
        if err > math.sqrt(eps) * max(scale, 1.0):
            raise ValueError(
                f"the {type(model).__name__} is not at a point of this embedding: `{t}` "
                f"differs from its embedded value by {err:.3g} (was it trained or modified "
                f"after widening?). The inertia change holds on the embedded set only"
            )
    return {n: p.detach() for n, p in params.items()}, tuple(params)


def _named(
    model: nn.Module, embedding: GroupEmbedding
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Parameters and buffers in ``named_parameters()`` order, under the embedding's names.

    A tied tensor has several FQNs; ``widen`` maps it under one of them.
    """
    named = [
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    ]
    used = set(embedding.tensors)
    alias: dict[int, str] = {}
    for n, t in named:
        if id(t) not in alias or (n in used and alias[id(t)] not in used):
            alias[id(t)] = n
    params: dict[str, Tensor] = {alias[id(p)]: p for _, p in model.named_parameters()}
    buffers = {alias[id(b)]: b for _, b in model.named_buffers()}
    return params, buffers


@dataclass(frozen=True)
class _Source:
    """Where the loss's data comes from: one batch, batches, and a process group."""

    inputs: Any
    targets: Any
    data: Iterable[Any] | None
    reduction: str | None
    process_group: Any


def complement_block(
    embedding: GroupEmbedding,
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Any = None,
    targets: Any = None,
    *,
    data: Iterable[Any] | None = None,
    reduction: str | None = None,
    process_group: Any = None,
    allow_train_mode: bool = False,
    chunk_size: int | None = None,
) -> GroupComplement:
    """``D = Cᵀ H_wide C`` from ``dim C`` Hessian-vector products, and the coupling.

    Args:
        embedding: A critical :class:`~torch_embed.graph.embedding.GroupEmbedding`.
        model: The WIDENED model, at the embedded point.
        loss_fn: ``loss_fn(model(inputs), targets) -> scalar``.
        inputs: The batch of inputs (omit with ``data``).
        targets: The batch of targets (omit with ``data``).
        data: An iterable of ``(inputs, targets)`` batches (e.g. a ``DataLoader``)
            instead of ``inputs, targets``, as in
            :class:`~torch_embed.hessian.HessianOperator`.
        reduction: How ``loss_fn`` reduces over a batch; needed with ``data`` or
            ``process_group`` for a plain function.
        process_group: A :mod:`torch.distributed` process group: each rank passes its
            shard of the data; products and gradients are summed over the group.
        allow_train_mode: As in :class:`~torch_embed.hessian.HessianOperator`: accept
            BatchNorm in train mode (the loss with batch statistics).
        chunk_size: Products per batched pass (default: sized from the free memory).

    Returns:
        A :class:`GroupComplement`.

    Raises:
        ValueError: A non-critical embedding, frozen parameters, a model that is not
            the image of the embedding, a module in train mode (see
            ``allow_train_mode``).
        TypeError: Not a ``GroupEmbedding`` or not a module.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import torch_embed
        >>> net = nn.Sequential(nn.Linear(1, 2), nn.Tanh(), nn.Linear(2, 1)).double()
        >>> x = torch.linspace(-1, 1, 8, dtype=torch.float64)[:, None]
        >>> emb = torch_embed.widen(net, {"0": 3}, torch_embed.Null(), example_inputs=x)
        >>> blk = complement_block(emb, net, nn.MSELoss(), x, x**2)
        >>> blk.matrix.shape, blk.coupling < 1e-12
        (torch.Size([3, 3]), True)
    """
    source = _Source(inputs, targets, data, reduction, process_group)
    return _complement(embedding, model, loss_fn, source, allow_train_mode, chunk_size, "hvp")


def _complement(
    embedding: GroupEmbedding,
    model: nn.Module,
    loss_fn: LossFn,
    source: _Source,
    allow_train_mode: bool,
    chunk_size: int | None,
    method: str,
) -> GroupComplement:
    params, names = _check_point(embedding, model, method)
    op = HessianOperator(
        model,
        loss_fn,
        source.inputs,
        source.targets,
        data=source.data,
        reduction=source.reduction,
        process_group=source.process_group,
        allow_train_mode=allow_train_mode,
        chunk_size=chunk_size,
    )
    basis = _basis(embedding, names, params)
    dev = op.device
    k, p = basis.count, basis.p_wide
    rows, cols, vals = basis.rows.to(dev), basis.cols.to(dev), basis.vals.to(dev)
    narrow_of = basis.narrow_of.to(dev)
    kept = (narrow_of >= 0).nonzero().flatten()
    a_kept = basis.apply.to(dev)[kept]
    # |A e_i|: the coupling of narrow direction i is measured relative to it
    a_norm = torch.zeros(basis.p_narrow, dtype=torch.float64, device=dev)
    a_norm = a_norm.index_add_(0, narrow_of[kept], a_kept * a_kept).sqrt()
    d = torch.zeros(k, k, dtype=torch.float64, device=dev)
    coupled = 0.0
    step = chunk_size or 128
    for r0 in range(0, k, step):
        r1 = min(r0 + step, k)
        sel = (rows >= r0) & (rows < r1)
        dense = torch.zeros(r1 - r0, p, dtype=torch.float64, device=dev)
        dense[rows[sel] - r0, cols[sel]] = vals[sel]
        hc = op.matmat(dense)  # rows: (H C_chunk)ᵀ
        d[:, r0:r1].index_add_(0, rows, vals[:, None] * hc[:, cols].T)  # C (H C_chunk)
        at = torch.zeros(r1 - r0, basis.p_narrow, dtype=torch.float64, device=dev)
        at.index_add_(1, narrow_of[kept], hc[:, kept] * a_kept)  # rows: (Aᵀ H C_chunk)ᵀ
        if at.numel():
            coupled = max(coupled, float((at / a_norm.clamp(min=1e-300)).abs().max()))
    h_norm = _power_norm(op)
    g = op.flat.value_and_grad()[1].detach()  # every batch, every process
    cg = torch.zeros(k, dtype=torch.float64, device=dev).index_add_(0, rows, vals * g[cols])
    blk = GroupComplement(
        matrix=(d + d.T) / 2,
        coupling=coupled / h_norm if h_norm > 0 else 0.0,
        h_norm=h_norm,
        grad_norm=float(g.norm()),
        complement_grad=float(cg.norm()),
        p_narrow=basis.p_narrow,
        p_wide=p,
    )
    return blk


def _power_norm(op: HessianOperator, iterations: int = 20) -> float:
    """An estimate of ``‖H‖₂`` by power iteration (a lower bound)."""
    gen = torch.Generator(device=op.device).manual_seed(0)
    v = torch.randn(op.shape[0], generator=gen, dtype=op.dtype, device=op.device)
    v = v / v.norm()
    est = 0.0
    for _ in range(iterations):
        hv = op.matvec(v)
        new = float(hv.norm())
        if new == 0.0:
            break
        v = hv / new
        if abs(new - est) <= 1e-2 * new:
            return new
        est = new
    return est


def inertia_change(
    embedding: GroupEmbedding,
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Any = None,
    targets: Any = None,
    *,
    data: Iterable[Any] | None = None,
    reduction: str | None = None,
    process_group: Any = None,
    tol: float | None = None,
    method: str = "auto",
    min_gap: float = DEFAULT_MIN_GAP,
    allow_train_mode: bool = False,
    chunk_size: int | None = None,
) -> Inertia:
    """The exact change of Hessian inertia, ``inertia(H_wide) - inertia(H_narrow)``.

    The inertia of ``D = Cᵀ H_wide C`` (module docstring), from ``P_wide - P_narrow``
    Hessian-vector products at the widened model; ``after = before + change`` without
    forming ``H_wide``. Before counting, the premise is measured: the coupling
    :attr:`GroupComplement.coupling` must be at most :data:`COUPLING_LIMIT`.

    Args:
        embedding: A critical :class:`~torch_embed.graph.embedding.GroupEmbedding`.
        model: The WIDENED model, at the embedded point.
        loss_fn: ``loss_fn(model(inputs), targets) -> scalar``.
        inputs: The batch of inputs (omit with ``data``).
        targets: The batch of targets (omit with ``data``).
        data: Batches instead of ``inputs, targets`` (see :func:`complement_block`).
        reduction: The loss's reduction (see :func:`complement_block`).
        process_group: A :mod:`torch.distributed` process group (see
            :func:`complement_block`).
        tol: Eigenvalue threshold for the zero count. Pass the ``tol`` of the "before"
            :class:`~torch_embed.inertia.Inertia` to count consistently with it; then
            ``before + change`` equals the full wide count at that ``tol`` (up to the
            Ostrowski factor of :mod:`torch_embed.inertia_change`). Default: the rule of
            :func:`~torch_embed.inertia.inertia` on the eigenvalues of ``D``, with the
            rounding level ``P_wide·eps·‖H_wide‖`` (``‖H_wide‖`` by power iteration) and
            ``|∇R_wide|``.
        method: ``"auto"`` or ``"hvp"`` (the same: there is no closed form for traced
            models; ``"closed-form"`` is refused).
        min_gap: Gap ratio under which the result is ``ambiguous``.
        allow_train_mode: Accept BatchNorm in train mode (the Hessian of the loss with
            batch statistics); the coupling is measured there as everywhere.
        chunk_size: Hessian-vector products per batched pass.

    Returns:
        An :class:`~torch_embed.inertia.Inertia` of the added eigenvalues, method
        ``"hvp"``.

    Raises:
        ValueError: As :func:`complement_block`; a coupling above
            :data:`COUPLING_LIMIT` (the gradients do not map by ``B`` here: recount
            with :func:`~torch_embed.inertia.hessian_inertia`); a bad ``tol``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import torch_embed
        >>> net = nn.Sequential(nn.Linear(1, 2), nn.Tanh(), nn.Linear(2, 1)).double()
        >>> x = torch.linspace(-1, 1, 8, dtype=torch.float64)[:, None]
        >>> emb = torch_embed.widen(net, {"0": 3}, torch_embed.Null(), example_inputs=x)
        >>> emb.inertia_change(net, nn.MSELoss(), x, x**2).total
        3
    """
    if tol is not None and (not math.isfinite(tol) or tol < 0):
        raise ValueError(f"tol must be a finite number >= 0, got {tol}")
    source = _Source(inputs, targets, data, reduction, process_group)
    blk = _complement(embedding, model, loss_fn, source, allow_train_mode, chunk_size, method)
    if blk.coupling > COUPLING_LIMIT:
        raise ValueError(
            f"the complement directions are coupled to the embedded ones: "
            f"max|AᵀH C| relative to |A|·‖H‖ = {blk.coupling:.3g} > {COUPLING_LIMIT:g}, so the "
            f"gradients of this model do not map by the embedding's B and the inertia "
            f"does not split; count the wide Hessian in full "
            f"(torch_embed.hessian_inertia) instead"
        )
    lam = eigenvalues(blk.matrix).cpu()
    mags = lam.abs().sort().values
    scale = float(mags[-1]) if mags.numel() else 0.0
    gnorm: float | None = None
    if tol is None:
        scale = max(scale, blk.h_norm)
        gnorm = blk.grad_norm
    rounding = default_tolerance(scale, blk.p_wide, torch.float64)
    tol, gap = _tolerance_and_gap(mags, rounding, tol, gnorm, min_gap)
    neg, pos = int((lam < -tol).sum()), int((lam > tol).sum())
    return Inertia(neg, lam.numel() - neg - pos, pos, float(tol), gap, gap < min_gap, "hvp")
