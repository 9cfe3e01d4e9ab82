"""How one tensor axis is made of width groups, and where each group's units sit in it.

A Linear after ``flatten`` of ``(C, H, W)`` reads an axis that is the *product* of the
channel group and two spatial factors; a conv after ``cat`` reads the *sum* (the
concatenation) of several groups. :class:`AxisLayout` is that tree, with group names at
its leaves. :meth:`AxisLayout.placements` gives every group's offset, stride and
repeats in the axis, and :meth:`AxisLayout.resized` the same tree with groups at new
widths, so the indices after widening come from the same code as those before.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["AxisLayout", "Slot"]


@dataclass(frozen=True)
class Slot:
    """Where the units of one group sit in an axis.

    Unit ``i`` occupies the indices ``offset + i * stride + Σ r_k * step_k`` for every
    ``0 <= r_k < count_k`` of ``repeats = ((count_k, step_k), ...)``.
    """

    group: str
    offset: int = 0
    stride: int = 1
    repeats: tuple[tuple[int, int], ...] = ()

    def indices(self, unit: int) -> list[int]:
        """The indices of ``unit`` along the axis, in increasing order."""
        out = [self.offset + unit * self.stride]
        for count, step in self.repeats:
            out = [i + r * step for i in out for r in range(count)]
        return sorted(out)


@dataclass(frozen=True)
class AxisLayout:
    """A tensor axis as a tree of width groups.

    Attributes:
        kind: ``"group"`` (one width group, ``group`` names it), ``"fixed"`` (a factor
            that is no width group: a spatial position, a kernel tap), ``"prod"`` (the
            row-major product of ``parts``: ``flatten``) or ``"sum"`` (their
            concatenation: ``cat``).
        size: The number of entries.
        group: The group's name for ``kind == "group"``.
        parts: The factors or the concatenated parts, outermost or first first.
    """

    kind: str
    size: int
    group: str = ""
    parts: tuple[AxisLayout, ...] = ()

    def __str__(self) -> str:
        if self.kind == "group":
            return self.group
        if self.kind == "fixed":
            return f"<{self.size}>"
        sep = " × " if self.kind == "prod" else " + "
        return "(" + sep.join(str(p) for p in self.parts) + ")"

    def groups(self) -> list[str]:
        """The group names in the tree, in order (a name may repeat)."""
        if self.kind == "group":
            return [self.group]
        return [g for p in self.parts for g in p.groups()]

    def resized(self, widths: Mapping[str, int]) -> AxisLayout:
        """The same tree with the groups named in ``widths`` at those sizes."""
        if self.kind == "group":
            return AxisLayout("group", int(widths.get(self.group, self.size)), self.group)
        if self.kind == "fixed":
            return self
        parts = tuple(p.resized(widths) for p in self.parts)
        sizes = [p.size for p in parts]
        size = math.prod(sizes) if self.kind == "prod" else sum(sizes)
        return AxisLayout(self.kind, size, parts=parts)

    def placements(self) -> list[Slot]:
        """Every occurrence of a group in the axis, with its offset, stride and repeats."""
        out: list[Slot] = []
        _walk(self, 0, 1, (), out)
        return out

    def rename(self, names: Mapping[str, str], fixed: frozenset[str] = frozenset()) -> AxisLayout:
        """Groups renamed by ``names``; those in ``fixed`` become ``"fixed"`` factors."""
        if self.kind == "group":
            if self.group in fixed:
                return AxisLayout("fixed", self.size)
            return AxisLayout("group", self.size, names.get(self.group, self.group))
        if self.kind == "fixed":
            return self
        return AxisLayout(
            self.kind, self.size, parts=tuple(p.rename(names, fixed) for p in self.parts)
        )


def _walk(
    node: AxisLayout,
    offset: int,
    stride: int,
    repeats: tuple[tuple[int, int], ...],
    out: list[Slot],
) -> None:
    if node.kind == "group":
        out.append(Slot(node.group, offset, stride, _merge(repeats)))
    elif node.kind == "sum":
        start = 0
        for part in node.parts:
            _walk(part, offset + start * stride, stride, repeats, out)
            start += part.size
    elif node.kind == "prod":
        sizes = [p.size for p in node.parts]
        inner = [math.prod(sizes[k + 1 :]) for k in range(len(sizes))]
        for k, part in enumerate(node.parts):
            others = tuple(
                (sizes[m], stride * inner[m]) for m in range(len(sizes)) if m != k and sizes[m] != 1
            )
            _walk(part, offset, stride * inner[k], repeats + others, out)


def _merge(repeats: tuple[tuple[int, int], ...]) -> tuple[tuple[int, int], ...]:
    """Sort ``(count, step)`` pairs by step, merge contiguous ones: ``(H,W),(W,1)`` → ``(HW,1)``."""
    items = sorted((step, count) for count, step in repeats if count != 1)
    merged: list[tuple[int, int]] = []
    for step, count in items:
        if merged and merged[-1][0] * merged[-1][1] == step:
            merged[-1] = (merged[-1][0], merged[-1][1] * count)
        else:
            merged.append((step, count))
    return tuple((count, step) for step, count in merged)
