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

The tensors are mapped by :func:`torch_embed.graph.gather.map_tensors`, the engine
that applies an MLP's :class:`~torch_embed.Embedding` too.

The in-axis of a grouped convolution (``groups = g > 1``) holds one group's share; its
unit ``i'`` of output group ``q`` reads wide channel ``q·C'/g + i'``. The planner keeps
every copy in its source's segment, so that channel's source is in segment ``q`` too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from torch_embed.embedding import EmbeddingKind, LayerMap
from torch_embed.graph.gather import AxisMap, map_tensors
from torch_embed.graph.layout import AxisLayout

if TYPE_CHECKING:
    from torch_embed.inertia import Inertia

__all__ = ["AxisMap", "GroupEmbedding", "axis_map"]


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
        unmapped_gradients: Why gradients do not map linearly at all (``""``: they do):
            :class:`~torch_embed.General` matrix coefficients that violate the backward
            condition (no error scalings ``β`` exist, as for MLPs). :meth:`map_gradients`
            and :meth:`map_second_moments` then raise; the reason is among ``reasons``.
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
    unmapped_gradients: str = ""

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
        if what != "apply" and self.unmapped_gradients and tensors:
            raise ValueError(
                f"this embedding's coefficients admit no linear gradient map "
                f"({self.unmapped_gradients}), so gradients and optimizer state cannot be "
                f"mapped; clear them (zero_grad, a fresh optimizer) or use coefficients "
                f"that satisfy the backward condition"
            )
        return map_tensors(
            self.axes,
            tensors,
            what,
            noise=self.noise,
            seed=self.seed,
            null_values=self.null_values,
        )

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
