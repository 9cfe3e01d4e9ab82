"""Axis atoms: a union-find over feature axes that can be refined into products and sums.

Every axis of every traced tensor is an *atom* (an integer id with a size). Ops couple
atoms by :meth:`Atoms.union` (a residual add makes two channel axes one), and refine an
atom into parts: a **product** when axes are merged by a reshape (``flatten`` of
``(C, H, W)`` is ``prod(C, H, W)``: channel ``c`` owns ``H·W`` consecutive entries) or a
**sum** when an axis is concatenated or split (``cat`` of ``(A, B)`` is ``sum(A, B)``).
A refinement is stored on the class root, so every atom unified with it is refined the
same way. The width groups are the unrefined roots (the *leaves*); every atom resolves
to a tree of them (:meth:`Atoms.layout`, an :class:`~torch_embed.graph.layout.AxisLayout`),
which gives each leaf's offset and stride within that axis.

Facts about atoms (rigid, constrained, a parameter axis's role) are recorded on the atom
they were seen on and resolved to leaves only at the end, so a refinement made later
still carries them to its parts.
"""

from __future__ import annotations

import math

from torch_embed.graph.layout import AxisLayout

__all__ = ["Atoms"]


class Atoms:
    """The union-find of axis atoms (see the module docstring)."""

    def __init__(self) -> None:
        self._parent: list[int] = []
        self._size: list[int] = []
        # root -> ("prod" | "sum", parts): the class is refined into these atoms
        self._refined: dict[int, tuple[str, tuple[int, ...]]] = {}
        self.conflicts: list[tuple[int, str]] = []

    def new(self, size: int) -> int:
        """A fresh atom of ``size`` entries."""
        self._parent.append(len(self._parent))
        self._size.append(int(size))
        return len(self._parent) - 1

    def size(self, atom: int) -> int:
        """The number of entries of ``atom``'s axis."""
        return self._size[atom]

    def find(self, atom: int) -> int:
        """The class root of ``atom``."""
        root = atom
        while self._parent[root] != root:
            root = self._parent[root]
        while self._parent[atom] != root:
            self._parent[atom], atom = root, self._parent[atom]
        return root

    def refinement(self, atom: int) -> tuple[str, tuple[int, ...]] | None:
        """``("prod" | "sum", parts)`` if ``atom``'s class is refined, else ``None``."""
        return self._refined.get(self.find(atom))

    def union(self, a: int, b: int, where: str) -> None:
        """Declare two axes the same features; a mismatch is recorded in ``conflicts``."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self._size[ra] != self._size[rb]:
            self._conflict(
                ra, rb, f"{where} couples axes of sizes {self._size[ra]} and {self._size[rb]}"
            )
            return
        ea, eb = self._refined.pop(ra, None), self._refined.pop(rb, None)
        self._parent[rb] = ra
        if ea is None or eb is None:
            if ea or eb:
                self._refined[ra] = ea or eb  # type: ignore[assignment]
            return
        self._refined[ra] = ea
        if ea[0] == "sum" and eb[0] == "sum":
            if [self._size[p] for p in ea[1]] == [self._size[p] for p in eb[1]]:
                for pa, pb in zip(ea[1], eb[1]):
                    self.union(pa, pb, where)
            else:
                self._conflict(ra, ra, f"{where} couples an axis split in two different ways")
        elif ea[0] == "prod" and eb[0] == "prod":
            self.align(self.factors(ea[1]), self.factors(eb[1]), where)
        else:
            self._conflict(ra, ra, f"{where} couples a concatenated axis with a reshaped one")

    def _conflict(self, a: int, b: int, why: str) -> None:
        self.conflicts.append((a, why))
        if b != a:
            self.conflicts.append((b, why))

    def factors(self, atoms: tuple[int, ...] | list[int]) -> list[int]:
        """``atoms`` with every product-refined atom replaced by its factors, recursively."""
        out: list[int] = []
        for a in atoms:
            r = self.refinement(a)
            if r is not None and r[0] == "prod":
                out.extend(self.factors(r[1]))
            elif self._size[a] != 1:
                out.append(a)
        return out

    def refine(self, atom: int, kind: str, sizes: list[int]) -> tuple[int, ...]:
        """Refine ``atom``'s class into fresh parts of ``sizes`` (or reuse equal ones)."""
        root = self.find(atom)
        old = self._refined.get(root)
        if old is not None and old[0] == kind and [self._size[p] for p in old[1]] == sizes:
            return old[1]
        parts = tuple(self.new(s) for s in sizes)
        if old is None:
            self._refined[root] = (kind, parts)
            return parts
        # already refined differently: unify the two refinements through a fresh atom
        fresh = self.new(self._size[root])
        self._refined[fresh] = (kind, parts)
        self.union(root, fresh, "a reshape")
        return parts

    def align(self, left: list[int], right: list[int], where: str) -> None:
        """Unify two factor lists of equal total size, splitting coarser factors."""
        i = j = 0
        left, right = list(left), list(right)
        while i < len(left) and j < len(right):
            a, b = left[i], right[j]
            sa, sb = self._size[a], self._size[b]
            if sa == sb:
                self.union(a, b, where)
                i, j = i + 1, j + 1
            elif sa > sb and sa % sb == 0:
                head, tail = self.refine(a, "prod", [sb, sa // sb])
                self.union(head, b, where)
                left[i] = tail
                j += 1
            elif sb > sa and sb % sa == 0:
                head, tail = self.refine(b, "prod", [sa, sb // sa])
                self.union(a, head, where)
                right[j] = tail
                i += 1
            else:
                self._conflict(a, b, f"{where} factors an axis in two incompatible ways")
                return

    def product(self, atoms: list[int]) -> int:
        """One atom for the merged axes ``atoms`` (itself if there is one factor)."""
        kept = [a for a in atoms if self._size[a] != 1] or atoms[:1]
        if len(kept) == 1:
            return kept[0]
        merged = self.new(math.prod(self._size[a] for a in kept))
        self._refined[merged] = ("prod", tuple(kept))
        return merged

    def concat(self, atoms: list[int]) -> int:
        """One atom for the concatenation of ``atoms`` along an axis."""
        if len(atoms) == 1:
            return atoms[0]
        merged = self.new(sum(self._size[a] for a in atoms))
        self._refined[merged] = ("sum", tuple(atoms))
        return merged

    def leaves(self, atom: int) -> list[int]:
        """The leaf roots ``atom`` resolves to, in axis order."""
        return [int(name[1:]) for name in self.layout(atom).groups()]

    def layout(self, atom: int) -> AxisLayout:
        """``atom``'s tree, each leaf a ``"group"`` named ``"#<leaf root>"``."""
        return self._layout(atom, 0)

    def _layout(self, atom: int, depth: int) -> AxisLayout:
        root = self.find(atom)
        ref = self._refined.get(root)
        if ref is None or depth > 64:
            return AxisLayout("group", self._size[root], f"#{root}")
        parts = tuple(self._layout(p, depth + 1) for p in ref[1])
        return AxisLayout(ref[0], self._size[root], parts=parts)
