"""``DepthEmbedding``: what :func:`torch_embed.deepen` inserted, its maps and inertia change.

A "null" insertion is a critical embedding ``θ ↦ (θ, 0)`` (the new block's affine
parameters zero, its norms copied from the template). Complement directions ``C``
(every new parameter; a new writer bias paired with minus the template's last writer
bias, since both add the same constant to the stream) have no first-order effect on
the output anywhere on the embedded set, so ``AᵀH C = 0`` and, by Sylvester's law,

    inertia(H_deep) = inertia(H) + inertia(D),   D = Cᵀ H_deep C

(docs/guide/deepen.md derives the structure of ``D``: every branch output is a product
with at least two zero factors, so ``D`` has only reader-writer cross blocks
``[[0, G], [Gᵀ, 0]]``, whose inertia is ``(r, n - 2r, r)``, ``r = rank G``).
:meth:`DepthEmbedding.inertia_change` forms ``D`` from Hessian-vector products along
orthonormalised ``C``, so it needs no closed form per block type.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad

from torch_embed.hessian import HessianOperator, LossFn
from torch_embed.inertia import (
    DEFAULT_MIN_GAP,
    Inertia,
    _tolerance_and_gap,
    default_tolerance,
    eigenvalues,
)

__all__ = ["DepthEmbedding", "Inserted"]


@dataclass(frozen=True)
class Inserted:
    """One inserted module.

    Attributes:
        name: Its FQN in the deepened model.
        template: FQN, in the ORIGINAL model, of the module it was copied from (for
            ``"identity"``: the activation it follows).
        zeroed: Parameter names (relative to the module) set to zero.
        writer_biases: ``"null"``: names of its branches' writer biases (relative).
        last_writer_bias: ``"null"``: the template's last branch's writer bias
            (relative to the template), the complement partner of ``writer_biases``.
        constant: ``"identity"``: the new layer's fixed state (``I`` and ``0``).
    """

    name: str
    template: str
    zeroed: tuple[str, ...]
    writer_biases: tuple[str, ...] = ()
    last_writer_bias: str | None = None
    constant: Mapping[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class DepthEmbedding:
    """The result of :func:`torch_embed.deepen`.

    Attributes:
        kind: ``"null"`` (critical), ``"zero_out"`` (output-preserving, trains at once)
            or ``"identity"`` (``Linear(I)`` after an idempotent activation).
        blocks: One :class:`Inserted` per new module, in container order.
        renames: Old FQN → new FQN of every pre-existing child of the containers.
        containers: FQNs of the containers that grew.
    """

    kind: str
    blocks: tuple[Inserted, ...]
    renames: Mapping[str, str]
    containers: tuple[str, ...]

    @property
    def inserted(self) -> tuple[str, ...]:
        """FQNs of the inserted modules in the deepened model."""
        return tuple(b.name for b in self.blocks)

    def _rename(self, key: str, table: Mapping[str, str]) -> str:
        for c in self.containers:
            prefix = f"{c}." if c else ""
            if key.startswith(prefix):
                head, _, rest = key[len(prefix) :].partition(".")
                old = f"{prefix}{head}"
                if old in table:
                    return f"{table[old]}.{rest}" if rest else table[old]
        return key

    def apply(self, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Map a state dict of the original model to the deepened model's.

        Shifted blocks are renamed; each inserted module gets its template's entries
        (zeroed where :attr:`Inserted.zeroed` says) or its constant state.

        Example:
            See docs/guide/deepen.md.
        """
        out = {self._rename(k, self.renames): v for k, v in state.items()}
        for b in self.blocks:
            prefix = f"{b.template}."
            for k, v in state.items():
                if k.startswith(prefix):
                    rel = k[len(prefix) :]
                    out[f"{b.name}.{rel}"] = torch.zeros_like(v) if rel in b.zeroed else v.clone()
            for rel, v in b.constant.items():
                out[f"{b.name}.{rel}"] = v.clone()
        return out

    def restrict(self, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Map a state dict of the deepened model back (drop inserted, undo renames)."""
        inverse = {v: k for k, v in self.renames.items()}
        dropped = tuple(f"{n}." for n in self.inserted)
        return {self._rename(k, inverse): v for k, v in state.items() if not k.startswith(dropped)}

    def complement(self, model: nn.Module) -> Tensor:
        """Orthonormal complement directions ``C`` (``(P, k)``, float64) in ``model``.

        ``P`` counts the trainable parameters of the deepened ``model`` in
        ``named_parameters()`` order (as :func:`torch_embed.hessian.flat_loss`).

        Raises:
            ValueError: Not a ``"null"`` embedding, or a new block's writer biases
                without a template bias to pair them with.
        """
        if self.kind != "null":
            raise ValueError(
                f"DepthEmbedding.complement: a {self.kind!r} insertion is not a critical "
                f"embedding; only 'null' blocks have complement directions"
            )
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        offset: dict[str, tuple[int, int]] = {}
        pos = 0
        for n, p in named:
            offset[n] = (pos, p.numel())
            pos += p.numel()
        cols: list[Tensor] = []
        for b in self.blocks:
            partner = None
            if b.writer_biases:
                if b.last_writer_bias is None:
                    raise ValueError(
                        f"DepthEmbedding.complement: block `{b.name}` has writer biases "
                        f"{list(b.writer_biases)} but its template's last branch has no "
                        f"writer bias to pair them with"
                    )
                partner = offset[f"{self.renames[b.template]}.{b.last_writer_bias}"]
            for n, _ in model.get_submodule(b.name).named_parameters():
                full = f"{b.name}.{n}"
                if full not in offset:
                    continue
                start, size = offset[full]
                block = torch.zeros(pos, size, dtype=torch.float64)
                block[start : start + size] = torch.eye(size, dtype=torch.float64)
                if n in b.writer_biases and partner is not None:
                    if partner[1] != size:
                        raise ValueError(
                            f"DepthEmbedding.complement: writer bias `{full}` and its "
                            f"partner differ in size"
                        )
                    block[partner[0] : partner[0] + size] -= torch.eye(size, dtype=torch.float64)
                cols.append(block)
        if not cols:
            return torch.zeros(pos, 0, dtype=torch.float64)
        q: Tensor = torch.linalg.qr(torch.cat(cols, dim=1)).Q
        return q

    def inertia_change(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        inputs: Any,
        targets: Any,
        *,
        tol: float | None = None,
        min_gap: float = DEFAULT_MIN_GAP,
    ) -> Inertia:
        """``inertia(H_deep) - inertia(H)`` for ``"null"`` blocks, from ``D = CᵀHC``.

        Costs one Hessian-vector product per new parameter (:meth:`complement`).

        Args:
            model: The DEEPENED model, at the embedded point.
            loss_fn: ``loss_fn(output, targets) -> scalar``.
            inputs: The batch of inputs.
            targets: The batch of targets.
            tol: Zero threshold; pass the "before" count's ``tol`` so that ``before +
                change`` equals a full recount at that ``tol``. Default: the rule of
                :func:`~torch_embed.inertia.inertia` with the rounding level of the
                deep Hessian (``P·eps·‖H‖``, ``‖H‖`` by power iteration) and ``|∇R|``.
            min_gap: Gap ratio under which the result is ``ambiguous``.

        Returns:
            An :class:`~torch_embed.inertia.Inertia` (negative, zero, positive added).

        Raises:
            ValueError: As :meth:`complement`.
        """
        c = self.complement(model)
        op = HessianOperator(model, loss_fn, inputs, targets)
        if c.shape[1]:
            hc = op.matmat(c.T.to(op.dtype))
            d = hc @ c
            lam = eigenvalues(0.5 * (d + d.T))
        else:
            lam = torch.zeros(0, dtype=torch.float64)
        mags = lam.abs().sort().values
        gnorm: float | None = None
        scale = float(mags[-1]) if mags.numel() else 0.0
        if tol is None:
            theta = op.flat.theta
            gnorm = float(grad(op.flat.fn)(theta).norm())
            v = torch.ones_like(theta) / theta.numel() ** 0.5
            for _ in range(20):
                hv = op.matvec(v)
                norm = float(hv.norm())
                if norm == 0.0:
                    break
                v = hv / norm
                scale = max(scale, norm)
        rounding = default_tolerance(scale, op.shape[0], torch.float64)
        tol, gap = _tolerance_and_gap(mags, rounding, tol, gnorm, min_gap)
        neg = int((lam < -tol).sum())
        pos = int((lam > tol).sum())
        return Inertia(
            neg, int(lam.numel()) - neg - pos, pos, float(tol), gap, gap < min_gap, "hvp"
        )
