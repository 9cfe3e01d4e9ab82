"""Per-group embeddings: how every tensor axis of a traced model maps when groups grow.

A :class:`GroupEmbedding` holds, per grown width group, a
:class:`~torch_embed.embedding.LayerMap` (the narrow unit each wide unit copies, or
``-1`` for a null unit, and the consumer coefficient of each wide unit). From the
groups' axis layouts (:attr:`WidthGroups.layouts`) it builds, for every parameter or
buffer axis that carries a grown group, one gather index and one coefficient per wide
entry, so a ``cat`` or a ``flatten`` of several groups maps in one gather:

* producers and per-channel tensors (weight rows, biases, BatchNorm γ, β and running
  statistics, depthwise filters, layer scales) are **copied** from their source;
* consumers (weight columns) are copied and **multiplied by the coefficient**;
* null units are zero everywhere.

Gradients map the other way round (GROWTH.md §4): a producer row copied with consumer
coefficient ``α_j`` has gradient ``α_j·g``, a consumer column reading a copy has the
original column's gradient; second moments take ``α_j²`` on producer rows.

The in-axis of a grouped convolution (``groups = g > 1``) holds one group's share; its
unit ``i'`` of output group ``q`` reads wide channel ``q·C'/g + i'``. The planner keeps
every copy in its source's segment, so that channel's source is in segment ``q`` too.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from torch_embed.embedding import EmbeddingKind, LayerMap, _identity_prefix
from torch_embed.graph.layout import AxisLayout

if TYPE_CHECKING:
    from torch_embed.inertia import Inertia

__all__ = ["AxisMap", "GroupEmbedding", "axis_map"]

_COPY_ROLES = ("producer", "per-channel")


@dataclass(frozen=True, eq=False)
class AxisMap:
    """How one tensor axis maps: wide entry ``j`` reads narrow entry ``source[j]``.

    Attributes:
        tensor: The parameter or buffer FQN.
        axis: The axis of that tensor.
        role: ``"copy"`` (producers and per-channel tensors) or ``"split"`` (consumers).
        source: ``int64`` ``(wide,)``: the narrow entry, ``-1`` for a null unit.
        coef: ``float64`` ``(wide,)``: the consumer coefficient of each wide entry (1 on
            entries of groups that do not grow or not split, 0 on null units).
        groups: ``> 1`` for the in-axis of a grouped convolution (one group's share).
        gain: ``float64`` ``(wide,)`` or ``None`` (all 1): a reparametrisation factor
            ``g`` per wide entry: copies are multiplied by ``g``, consumers by ``1/g``
            (an attention head_dim's temperature fix, GROWTH.md §2); gradients map
            by the inverse factors, second moments by their squares.
        mean: ``apply`` sets the null entries to the mean of the narrow entries along
            the axis (a LayerNorm's mean-fill, :mod:`torch_embed.graph.fill`).
    """

    tensor: str
    axis: int
    role: str
    source: Tensor
    coef: Tensor
    groups: int = 1
    gain: Tensor | None = None
    mean: bool = False

    def scale(self, what: str) -> Tensor:
        """The factor of each wide entry for ``what`` in apply/grad/second."""
        null = self.source < 0
        if what == "apply":
            s = self.coef if self.role == "split" else torch.ones_like(self.coef)
        elif what == "grad":
            s = self.coef if self.role == "copy" else torch.ones_like(self.coef)
        else:
            s = self.coef * self.coef if self.role == "copy" else torch.ones_like(self.coef)
        if self.gain is not None:
            power = {"apply": 1, "grad": -1}.get(what, -2)
            s = s * self.gain.pow(power if self.role == "copy" else -power)
        return torch.where(null, 0.0, s)


def axis_map(layout: AxisLayout, maps: Mapping[str, LayerMap]) -> tuple[Tensor, Tensor]:
    """The gather index and coefficients of an axis laid out as ``layout``.

    Args:
        layout: The axis's tree of groups (before widening).
        maps: The map of every grown group by name; other groups keep their units.

    Returns:
        ``(source, coef)``: ``int64`` and ``float64`` tensors of the wide axis's size;
        ``source[j]`` is the narrow index wide entry ``j`` copies (``-1``: null).

    Example:
        >>> lay = AxisLayout("sum", 5, parts=(AxisLayout("group", 2, "a"),
        ...                                   AxisLayout("group", 3, "b")))
        >>> f64 = torch.float64
        >>> m = LayerMap(torch.tensor([0, 1, 0]), torch.tensor([0.5, 1.0, 0.5], dtype=f64),
        ...              torch.zeros(3, dtype=f64), torch.zeros(3, dtype=f64))
        >>> src, coef = axis_map(lay, {"a": m})
        >>> src.tolist(), coef.tolist()
        ([0, 1, 0, 2, 3, 4], [0.5, 1.0, 0.5, 1.0, 1.0, 1.0])
    """
    if layout.kind == "group" and layout.group in maps:
        lm = maps[layout.group]
        return lm.source.clone(), lm.coef.clone()
    if layout.kind in ("group", "fixed"):
        return torch.arange(layout.size), torch.ones(layout.size, dtype=torch.float64)
    parts = [axis_map(p, maps) for p in layout.parts]
    if layout.kind == "sum":
        srcs, coefs, start = [], [], 0
        for part, (s, c) in zip(layout.parts, parts):
            srcs.append(torch.where(s >= 0, s + start, -1))
            coefs.append(c)
            start += part.size
        return torch.cat(srcs), torch.cat(coefs)
    # a row-major product: narrow index Σ_k src_k · inner_k over the grid of wide indices
    sizes = [p.size for p in layout.parts]
    inner = [math.prod(sizes[k + 1 :]) for k in range(len(sizes))]
    grid_shape = [s.numel() for s, _ in parts]
    src = torch.zeros(grid_shape, dtype=torch.int64)
    coef = torch.ones(grid_shape, dtype=torch.float64)
    null = torch.zeros(grid_shape, dtype=torch.bool)
    for k, (s, c) in enumerate(parts):
        shape = [1] * len(parts)
        shape[k] = -1
        src = src + s.clamp(min=0).view(shape) * inner[k]
        coef = coef * c.view(shape)
        null = null | (s < 0).view(shape)
    return torch.where(null, -1, src).reshape(-1), coef.reshape(-1)


@dataclass(frozen=True, eq=False)
class GroupEmbedding:
    """An embedding of a traced model, per width group (see the module docstring).

    Attributes:
        maps: ``{group name: LayerMap}`` for every grown group.
        sizes: ``{group name: (narrow size, wide size)}`` for every grown group.
        axes: Every tensor axis that changes, with its :class:`AxisMap`.
        scheme: A short description of the scheme that planned it.
        reasons_: Why the embedding is not critical (empty: it is).
        noise: Net2Net's symmetric noise on the fan-out of copies (``apply`` only): the
            copies of one narrow unit are paired, and in each consumer the pair's columns
            get ``+N`` and ``-N``, ``N = noise · (w/c) · ε`` with ``ε ~ N(0, 1)`` per entry
            (drawn from ``seed`` and the tensor's name, so ``apply`` is repeatable); an
            odd copy stays noise-free. The copies carry equal values, so the output is
            kept; gradients map as without noise (the critical part's map).
        seed: The seed of that noise.
        scales: ``(module FQN, old, new)`` per attention whose explicit softmax scale
            follows head_dim (``1/√d``): the apply step sets an attribute ``scale``,
            ``scaling`` or ``softmax_scale`` of that module holding ``old`` to ``new``.
        eps: ``(module FQN, traced eps or None, factor)`` per LayerNorm/RMSNorm over a
            filled group: the apply step multiplies its eps attribute by ``factor``.
    """

    maps: Mapping[str, LayerMap]
    sizes: Mapping[str, tuple[int, int]]
    axes: tuple[AxisMap, ...]
    scheme: str = ""
    reasons_: tuple[str, ...] = field(default=())
    noise: float = 0.0
    seed: int = 0
    scales: tuple[tuple[str, float, float], ...] = ()
    eps: tuple[tuple[str, float | None, float], ...] = ()

    @property
    def kind(self) -> EmbeddingKind:
        """Critical when gradients map linearly (every scheme the graph path plans)."""
        return EmbeddingKind.OUTPUT_PRESERVING if self.reasons_ else EmbeddingKind.CRITICAL

    @property
    def reasons(self) -> tuple[str, ...]:
        """Why the embedding is not critical (empty when it is)."""
        return self.reasons_

    @property
    def tensors(self) -> tuple[str, ...]:
        """The FQNs of the tensors the embedding reshapes, in first-use order."""
        return tuple(dict.fromkeys(a.tensor for a in self.axes))

    def _map(self, tensors: Mapping[str, Tensor], what: str) -> dict[str, Tensor]:
        out = dict(tensors)
        by_tensor: dict[str, list[AxisMap]] = {}
        for a in self.axes:
            by_tensor.setdefault(a.tensor, []).append(a)
        for name, axes in by_tensor.items():
            if name not in tensors:
                continue
            t = tensors[name]
            # plain axes first: a grouped in-axis reads the (new) output segments
            for a in sorted(axes, key=lambda a: a.groups > 1):
                narrow = t
                t = _gather(t, a, a.scale(what))
                if what == "apply" and a.mean:
                    null = (a.source < 0).nonzero().flatten().to(t.device)
                    fill = narrow.mean(a.axis, keepdim=True).expand_as(t.index_select(a.axis, null))
                    t = t.index_copy(a.axis, null, fill.contiguous())
                if what == "apply" and self.noise and a.role == "split":
                    t = _add_noise(t, a, self.noise, self.seed)
            out[name] = t
        return out

    def apply(self, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The wide tensors of a narrow ``{FQN: tensor}`` state (others passed through)."""
        return self._map(state, "apply")

    def map_gradients(self, grads: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Narrow gradients (or momenta) mapped to the wide ones at the embedded point."""
        return self._map(grads, "grad")

    def map_second_moments(self, moments: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Narrow second moments (``exp_avg_sq``) mapped: producer rows ``× α_j²``."""
        return self._map(moments, "second")

    # the landscape side lives in torch_embed.graph.analysis; these delegate to it
    def restrict(self, wide_state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The narrow state a wide one embeds; see :func:`torch_embed.graph.analysis.restrict`."""
        from torch_embed.graph.analysis import restrict

        return restrict(self, wide_state)

    def then(self, other: GroupEmbedding) -> GroupEmbedding:
        """``self``, then ``other``; see :func:`torch_embed.graph.analysis.then`."""
        from torch_embed.graph.analysis import then

        return then(self, other)

    def steps(self, groups: Any) -> list[GroupEmbedding]:
        """One-step pieces; see :func:`torch_embed.graph.analysis.steps`."""
        from torch_embed.graph.analysis import steps

        return steps(self, groups)

    def inertia_change(
        self,
        model: Any,
        loss_fn: Any,
        inputs: Any = None,
        targets: Any = None,
        *,
        data: Any = None,
        reduction: str | None = None,
        process_group: Any = None,
        tol: float | None = None,
        method: str = "auto",
        min_gap: float | None = None,
        allow_train_mode: bool = False,
        chunk_size: int | None = None,
    ) -> Inertia:
        """The exact inertia change at the WIDENED ``model``.

        See :func:`torch_embed.graph.analysis.inertia_change` (same arguments).
        """
        from torch_embed.graph.analysis import inertia_change
        from torch_embed.inertia import DEFAULT_MIN_GAP

        return inertia_change(
            self,
            model,
            loss_fn,
            inputs,
            targets,
            data=data,
            reduction=reduction,
            process_group=process_group,
            tol=tol,
            method=method,
            min_gap=DEFAULT_MIN_GAP if min_gap is None else min_gap,
            allow_train_mode=allow_train_mode,
            chunk_size=chunk_size,
        )


def _add_noise(t: Tensor, a: AxisMap, noise: float, seed: int) -> Tensor:
    """Add ``±noise · column · ε`` to pairs of consumer columns that read copies."""
    order = torch.argsort(a.source, stable=True)
    src = a.source[order]
    firsts, counts = torch.unique_consecutive(src, return_counts=True)
    gen = torch.Generator().manual_seed(
        (seed ^ zlib.crc32(f"{a.tensor}:{a.axis}".encode())) % 2**63
    )
    start = 0
    pairs: list[tuple[int, int]] = []
    for e, c in zip(firsts.tolist(), counts.tolist()):
        if e >= 0:
            idx = order[start : start + c].tolist()
            pairs.extend((idx[k], idx[k + 1]) for k in range(0, c - 1, 2))
        start += c
    if not pairs:
        return t
    if a.groups == 1:
        view = t.movedim(a.axis, 0)
        for j, k in pairs:
            eps = torch.randn(view[j].shape, generator=gen, dtype=torch.float64)
            offset = (noise * view[j].to(torch.float64) * eps).to(t.dtype)
            view[j] += offset
            view[k] -= offset
        return t
    g = a.groups  # a grouped conv's in-axis: column j sits in segment j // share
    share = a.source.numel() // g
    w = t.view(g, t.shape[0] // g, share, *t.shape[2:])
    for j, k in pairs:
        col_j, col_k = w[j // share, :, j % share], w[k // share, :, k % share]
        eps = torch.randn(col_j.shape, generator=gen, dtype=torch.float64)
        offset = (noise * col_j.to(torch.float64) * eps).to(t.dtype)
        col_j += offset
        col_k -= offset
    return t


def _gather(t: Tensor, a: AxisMap, scale: Tensor) -> Tensor:
    src = a.source.to(t.device)
    scale = scale.to(device=t.device, dtype=t.dtype if t.is_floating_point() else torch.float64)
    if a.groups == 1:
        keep = _identity_prefix(src)  # narrow units that stay in place: a plain copy
        tail = t.index_select(a.axis, src[keep:].clamp(min=0))
        out = torch.cat([t.narrow(a.axis, 0, keep), tail], a.axis) if keep else tail
        if out.is_floating_point() and not bool((scale == 1).all()):
            shape = [1] * t.dim()
            shape[a.axis] = -1
            out.mul_(scale.view(shape).to(out.dtype))  # ``out`` is fresh: scale in place
        return out
    # the in-axis of a grouped conv weight (out, in/g, *kernel): rows in g segments
    g = a.groups
    rows, share = t.shape[0], t.shape[1]
    wide_share = src.numel() // g
    local = src.view(g, wide_share) - torch.arange(g, device=t.device).view(g, 1) * share
    local = torch.where(src.view(g, wide_share) < 0, 0, local)
    w = t.reshape(g, rows // g, share, *t.shape[2:])
    idx = local.view(g, 1, wide_share, *([1] * (t.dim() - 2)))
    idx = idx.expand(g, rows // g, wide_share, *t.shape[2:])
    out = torch.gather(w, 2, idx).mul_(scale.view(g, 1, wide_share, *([1] * (t.dim() - 2))))
    return out.reshape(rows, wide_share, *t.shape[2:])
