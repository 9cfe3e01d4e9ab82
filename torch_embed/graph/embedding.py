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

from torch_embed.embedding import (
    _CPU,
    EmbeddingKind,
    LayerMap,
    _identity_prefix,
    _in_dtype,
    _Moved,
    _put,
)
from torch_embed.graph.layout import AxisLayout

if TYPE_CHECKING:
    from torch_embed.inertia import Inertia

__all__ = ["AxisMap", "GroupEmbedding", "axis_map"]

_COPY_ROLES = ("producer", "per-channel")
# elements of a gather's temporary block (256 KiB of float32): small enough to be reused
# from the allocator's cache instead of paged in afresh, large enough that the number
# of ops stays low. On bench/widen_graph.py's ResNet-50-shaped model, a first apply
# touched the fewest fresh pages with 1 << 16 among 1 << 16, 18, 20, 22 and 26 (about
# 55k page faults against 58k to 64k; the apply's CPU time within noise of each other)
_TEMP = 1 << 16


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
        null_fill: ``float64`` ``(wide,)`` or ``None``: what :meth:`GroupEmbedding.apply`
            writes at null entries (``None``: 0), e.g. the null units' bias ``β``.
        null_init: ``""`` (none), ``"normal"`` (``init_scale·N(0, 1)``) or
            ``"uniform"`` (``U(-b, b)``, ``b = init_scale/sqrt(fan_in)``, ``fan_in`` the
            wide tensor's entries per index of axis 0, as ``nn.Linear`` and ``nn.Conv``
            initialise; ``U(-init_scale, init_scale)`` for a 1-d tensor, RandomPad's
            biases): random values :meth:`GroupEmbedding.apply` writes at the null
            entries of a weight (a tensor of 2 or more axes, whole axis only; a grouped
            in-axis: the rows of each null channel's group) or, uniform only, a bias.
        init_scale: The scale of ``null_init``.
    """

    tensor: str
    axis: int
    role: str
    source: Tensor
    coef: Tensor
    groups: int = 1
    gain: Tensor | None = None
    mean: bool = False
    null_fill: Tensor | None = None
    null_init: str = ""
    init_scale: float = 0.0
    _cache: dict[Any, Any] = field(default_factory=dict, init=False, repr=False)

    def _index(self) -> tuple[int, Tensor]:
        """``(keep, tail)``: the identity prefix's length and the other sources (cached).

        Decided on the CPU map, so that ``apply`` reads no device data to the host (no
        sync; "meta" tensors work); ``tail`` moves to the device through the call's
        :class:`~torch_embed.embedding._Moved`.
        """
        if "index" not in self._cache:
            keep = _identity_prefix(self.source)
            self._cache["index"] = (keep, self.source[keep:].clamp(min=0))
        return self._cache["index"]  # type: ignore[no-any-return]

    def _factor(self, what: str, dtype: torch.dtype) -> Tensor | None:
        """:meth:`scale` in ``dtype`` when exact (CPU, cached); ``None``: all 1."""
        key = ("factor", what, dtype)
        if key not in self._cache:
            s = self.scale(what)
            self._cache[key] = None if bool((s == 1).all()) else _in_dtype(s, dtype, _CPU)
        return self._cache[key]  # type: ignore[no-any-return]

    def _grouped(self, what: str, dtype: torch.dtype, share: int) -> tuple[Tensor, Tensor]:
        """A grouped in-axis's ``(g, wide share)`` in-segment sources and its factors.

        ``share`` is the narrow tensor's in-axis size (CPU, cached).
        """
        key = ("grouped", what, dtype, share)
        if key not in self._cache:
            g = self.groups
            src = self.source.view(g, -1)
            local = torch.where(src < 0, 0, src - torch.arange(g).view(g, 1) * share)
            scale = _in_dtype(self.scale(what), dtype, _CPU)  # rounded once, as below
            self._cache[key] = (local, scale)
        return self._cache[key]  # type: ignore[no-any-return]

    def _null(self) -> Tensor:
        """The null entries' positions (CPU, cached)."""
        if "null" not in self._cache:
            self._cache["null"] = (self.source < 0).nonzero().flatten()
        return self._cache["null"]  # type: ignore[no-any-return]

    def _extras(self, what: str, noise: float) -> bool:
        """Whether ``apply`` writes more than the scaled gather on this axis."""
        return what == "apply" and (
            self.mean
            or bool(noise and self.role == "split")
            or self.null_fill is not None
            or bool(self.null_init)
        )

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
        seed: The seed of that noise and of random null entries (``AxisMap.null_init``).
        preserves_output: ``False`` when the embedding changes the function
            (:class:`~torch_embed.RandomPad`): ``kind`` is then ``none``.
        null_values: ``{reader weight FQN: float64 (wide_in,)}``: the constant value
            ``σ(β)`` each null unit feeds that reader (0 elsewhere), measured by
            ``widen``. Its fan-out column (every tap of an unpadded conv reader's) then
            has the gradient ``σ(β)·∂R/∂b`` of the reader's bias ``b`` (as for MLPs):
            :meth:`map_gradients` writes it when the bias is among the mapped tensors.
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
    preserves_output: bool = True
    null_values: Mapping[str, Tensor] = field(default_factory=dict)

    @property
    def kind(self) -> EmbeddingKind:
        """Critical when gradients map linearly; ``none`` when the output changes."""
        if not self.preserves_output:
            return EmbeddingKind.NONE
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
        moved = _Moved()
        by_tensor: dict[str, list[AxisMap]] = {}
        for a in self.axes:
            by_tensor.setdefault(a.tensor, []).append(a)
        for name, axes in by_tensor.items():
            if name not in tensors:
                continue
            t = tensors[name]
            # plain axes first: a grouped in-axis reads the (new) output segments
            todo = sorted(axes, key=lambda a: a.groups > 1)
            while todo:
                # plain axes up to one with more to write are gathered in one pass into
                # one allocation: the same bits as one gather per axis (gathers copy;
                # each axis's factor is then applied in turn, rounded as before)
                run = [todo.pop(0)]
                while (
                    run[-1].groups == 1
                    and not run[-1]._extras(what, self.noise)
                    and todo
                    and todo[0].groups == 1
                    and not todo[0].mean
                ):
                    run.append(todo.pop(0))
                a = run[-1]
                narrow = t
                t = _gather(t, run, what, moved)
                if what == "apply" and a.mean:
                    null = moved(a._null(), t.device)
                    fill = narrow.mean(a.axis, keepdim=True).expand_as(t.index_select(a.axis, null))
                    t = t.index_copy(a.axis, null, fill.contiguous())
                if what == "apply" and self.noise and a.role == "split":
                    t = _add_noise(t, a, self.noise, self.seed, moved)
                if what == "apply" and (a.null_fill is not None or a.null_init):
                    t = _fill_null(t, a, self.seed, moved)
            out[name] = t
        if what != "apply":
            for name, value in self.null_values.items():
                if name in out and (bias := f"{name.rpartition('.')[0]}.bias") in out:
                    out[name] = _null_columns(out[name], out[bias], value, what, moved)
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


def _add_noise(t: Tensor, a: AxisMap, noise: float, seed: int, moved: _Moved) -> Tensor:
    """Add ``±noise · column · ε`` to pairs of consumer columns that read copies.

    The pairs and ``ε`` (one draw per pair, in pair order, from a CPU generator: the
    same numbers on every device) are made on the host; the columns are updated in
    one batch on ``t``'s device (the pairs are disjoint, so the bits are those of one
    update per pair).
    """
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
    first = torch.tensor([j for j, _ in pairs])
    second = torch.tensor([k for _, k in pairs])
    if a.groups == 1:
        view = t.movedim(a.axis, 0)  # column j is view[j]
        at_j: tuple[Tensor | slice, ...] = (moved(first, t.device),)
        at_k: tuple[Tensor | slice, ...] = (moved(second, t.device),)
    else:  # a grouped conv's in-axis: column j is w[j // share, :, j % share]
        share = a.source.numel() // a.groups
        view = t.view(a.groups, t.shape[0] // a.groups, share, *t.shape[2:])
        full = slice(None)
        at_j = (moved(first // share, t.device), full, moved(first % share, t.device))
        at_k = (moved(second // share, t.device), full, moved(second % share, t.device))
    cols = view[at_j]  # (pairs, *column shape)
    eps = torch.stack(
        [torch.randn(cols.shape[1:], generator=gen, dtype=torch.float64) for _ in pairs]
    )
    offset = (noise * cols.to(torch.float64) * eps.to(t.device)).to(t.dtype)
    view[at_j] = cols + offset
    view[at_k] = view[at_k] - offset
    return t


def _null_columns(w: Tensor, bias: Tensor, value: Tensor, what: str, moved: _Moved) -> Tensor:
    """A reader's null columns: ``σ(β)`` times its bias gradient.

    ``σ(β)²`` times its second moment, as :meth:`torch_embed.Embedding.map_gradients`
    maps them for MLPs. A conv reader (``(out, in/g, *kernel)``, ``g`` groups, read off
    ``value``'s wide size) gets it at every tap (unpadded: every tap reads the constant
    at every output position), in the rows of the null channel's group only.
    """
    cols = value.nonzero().flatten()
    v = value[cols] if what == "grad" else value[cols] * value[cols]
    g = value.numel() // w.shape[1]
    b = bias.to(torch.float64).view(g, -1)  # the biases of each group's output channels
    q, c = moved(cols // w.shape[1], w.device), moved(cols % w.shape[1], w.device)
    fill = b[q] * moved(v, w.device)[:, None]  # (null columns, out/g), then every tap
    fill = fill.view(*fill.shape, *[1] * (w.dim() - 2)).to(w.dtype)
    w = w.clone(memory_format=torch.contiguous_format)
    view = w.view(g, -1, *w.shape[1:])
    view[q, :, c] = fill.expand(*fill.shape[:2], *w.shape[2:])
    return w


def _fill_null(t: Tensor, a: AxisMap, seed: int, moved: _Moved) -> Tensor:
    """Write ``a.null_fill`` or random ``a.null_init`` values at the null entries."""
    null = a._null()
    if not null.numel():
        return t
    idx = moved(null, t.device)
    if a.null_fill is not None and a.groups == 1:
        fill = moved(a.null_fill[null], t.device).to(t.dtype)
        shape = [1] * t.dim()
        shape[a.axis] = -1
        size = list(t.shape)
        size[a.axis] = null.numel()
        t.index_copy_(a.axis, idx, fill.view(shape).expand(size).contiguous())
    if a.null_init and (t.dim() >= 2 or a.null_init == "uniform"):  # 1-d: RandomPad's bias
        gen = torch.Generator().manual_seed(
            (seed ^ zlib.crc32(f"{a.tensor}:{a.axis}:init".encode())) % 2**63
        )
        size = list(t.shape)
        size[a.axis] = null.numel()
        if a.groups > 1:  # wide channel j: column j % share of group j // share's rows
            size = [null.numel(), t.shape[0] // a.groups, *t.shape[2:]]
        if a.null_init == "normal":
            values = a.init_scale * torch.randn(size, generator=gen, dtype=torch.float64)
        else:
            bound = a.init_scale / math.sqrt(max(t.numel() // max(t.shape[0], 1), 1))
            values = (2 * torch.rand(size, generator=gen, dtype=torch.float64) - 1) * bound
        values = values.to(device=t.device, dtype=t.dtype)  # one use
        if a.groups > 1:
            q, c = moved(null // t.shape[1], t.device), moved(null % t.shape[1], t.device)
            t.view(a.groups, -1, *t.shape[1:])[q, :, c] = values
        else:
            t.index_copy_(a.axis, idx, values)
    return t


def _scale_axis(out: Tensor, axis: int, factor: Tensor) -> None:
    """``out *= factor`` along ``axis``, with the MLP path's arithmetic.

    ``factor`` comes from :meth:`AxisMap._factor`: float64 unless exact in ``out``'s
    dtype, and each product is rounded once (:func:`torch_embed.embedding._put`), so a
    traced model gets the same bits as :meth:`torch_embed.Embedding.apply` (for float32
    and α = 1/3 too). ``out`` is viewed as ``(outer, size·inner)`` with the factor
    repeated over ``inner``; it is contiguous (fresh from the gather).
    """
    inner = math.prod(out.shape[axis + 1 :])
    if inner > 1:
        factor = factor.repeat_interleave(inner)
    view = out.view(math.prod(out.shape[:axis]), -1)
    _put(view, view, factor)


def _gather_into(dst: Tensor, src: Tensor, index: list[tuple[int, int, Tensor]]) -> None:
    """``dst = src`` gathered along every ``(axis, keep, tail)`` of ``index`` (by axis).

    The first ``keep`` entries of ``axis`` stay in place (sliced, not gathered), the
    others read ``tail``; every entry of ``dst`` is written once. Gathers that cannot
    write into ``dst`` directly go through temporaries of at most :data:`_TEMP`
    elements, so that no large block is allocated (and paged in) besides ``dst``.
    """
    if not index:
        dst.copy_(src)
        return
    (axis, keep, tail), rest = index[0], index[1:]
    if keep:
        _gather_into(dst.narrow(axis, 0, keep), src.narrow(axis, 0, keep), rest)
    n = tail.numel()
    if not n:
        return
    part = dst.narrow(axis, keep, n)
    if not rest and part.is_contiguous():
        torch.index_select(src, axis, tail, out=part)
        return
    # (index_select into a strided block is several times slower than a copy)
    if axis == 0:  # blocks of gathered rows; the later axes gather within each
        step = max(1, _TEMP // max(part[0].numel(), 1))
        for i in range(0, n, step):
            m = min(step, n - i)
            _gather_into(part.narrow(0, i, m), src.index_select(0, tail[i : i + m]), rest)
        return
    step = max(1, _TEMP // max(part[0].numel(), 1))  # blocks of axis 0 (never gathered)
    for i in range(0, part.shape[0], step):
        m = min(step, part.shape[0] - i)
        block = src.narrow(0, i, m).index_select(axis, tail)
        _gather_into(part.narrow(0, i, m), block, rest)


def _gather(t: Tensor, run: list[AxisMap], what: str, moved: _Moved) -> Tensor:
    """``t`` gathered along every axis of ``run`` and scaled for ``what``.

    ``run`` is plain axes (one allocation, one write per entry) or one grouped in-axis.
    """
    dev = t.device
    a = run[0]
    if a.groups == 1:
        index = []
        for b in sorted(run, key=lambda b: b.axis):
            keep, tail = b._index()
            index.append((b.axis, keep, moved(tail, dev)))
        shape = list(t.shape)
        for b in run:
            shape[b.axis] = b.source.numel()
        out = torch.empty(shape, dtype=t.dtype, device=dev)
        _gather_into(out, t, index)
        if out.is_floating_point():
            for b in run:
                factor = b._factor(what, t.dtype)
                if factor is not None:
                    _scale_axis(out, b.axis, moved(factor, dev))  # ``out`` is fresh: scale in place
        return out
    # the in-axis of a grouped conv weight (out, in/g, *kernel): rows in g segments
    g = a.groups
    rows, share = t.shape[0], t.shape[1]
    local, scale = (moved(x, dev) for x in a._grouped(what, t.dtype, share))
    wide_share = local.shape[1]
    w = t.reshape(g, rows // g, share, *t.shape[2:])
    idx = local.view(g, 1, wide_share, *([1] * (t.dim() - 2)))
    idx = idx.expand(g, rows // g, wide_share, *t.shape[2:])
    out = torch.gather(w, 2, idx).mul_(scale.view(g, 1, wide_share, *([1] * (t.dim() - 2))))
    return out.reshape(rows, wide_share, *t.shape[2:])
