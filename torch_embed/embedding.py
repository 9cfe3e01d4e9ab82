"""The embedding: an immutable description of how a narrow MLP sits inside a wide one.

Everything in torch_embed is phrased in terms of :class:`Embedding`. For each hidden
layer it stores, per wide neuron, the narrow neuron it copies (or ``-1`` for a null
neuron) and the coefficient its fan-out column gets (docs/theory.md, "Embeddings";
JML 2022 §5). From that it can

* map a narrow parameter set to the wide one (:meth:`Embedding.apply`, the affine map
  ``θ ↦ Aθ + c``),
* map gradients and squared gradients (:meth:`Embedding.map_gradients`,
  :meth:`Embedding.map_second_moments`, the linear map ``B`` with
  ``∇R_wide(Aθ + c) = B ∇R_narrow(θ)`` for a critical embedding),
* list itself as one-step splits and null embeddings (:meth:`Embedding.steps`),
* compose with another embedding (:meth:`Embedding.then`), and
* say what it preserves (:attr:`Embedding.kind`).

Parameter sets are dictionaries keyed like ``Sequential.state_dict()`` (``"0.weight"``,
``"1.running_mean"``, ...); keys the embedding does not touch pass through unchanged.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from torch_embed._sequential import Layout, LinearLayer
from torch_embed.graph.gather import AxisMap, map_tensors

if TYPE_CHECKING:
    from collections.abc import Callable

    from torch import nn

    from torch_embed.inertia import Inertia

__all__ = ["Embedding", "EmbeddingKind", "LayerMap", "check_shares", "check_sources"]

_COEF_RTOL = 1e-9
# Largest sum of |coefficients| over the copies of one narrow neuron. Coefficients that
# sum to 1 with a larger sum of magnitudes amplify every rounding error that many times
# (Split(alpha=1e30) gives infinities, (1e20, 1 - 1e20) sums to 0 in float64 and
# would pass a relative check): float64 can no longer confirm the sum is 1 to 1e-9.
# embed_ applies a stricter, dtype-aware limit (torch_embed.widen._check_coefficients).
_MAX_AMPLIFICATION = 1e8
_U64 = 2.0**-53


def _coef_tol(scale: Tensor) -> Tensor:
    """How far a sum of float64 coefficients may be from 1: 1e-9 plus its own rounding.

    ``scale`` is the sum of the magnitudes; summing ``k`` float64 numbers (and the
    rounding of each coefficient, e.g. ``1 - α``) errs by at most about ``k·u·scale``;
    ``16`` covers ``k`` up to the copies of one neuron in practice.
    """
    return _COEF_RTOL + 16 * _U64 * scale


def _check_amplification(where: str, scale: Tensor) -> None:
    """Refuse coefficients whose magnitudes sum (per narrow neuron) above the limit.

    ``where`` names the layer in the message (``"hidden layer 0"``, ``"width group 'c1'"``).
    """
    bad = scale > _MAX_AMPLIFICATION
    if bool(bad.any()):
        first = bad.nonzero()[0].tolist()
        s = first[-1]
        raise ValueError(
            f"{where}: the fan-out coefficients of the copies of narrow neuron "
            f"{s} have magnitudes summing to {float(scale[tuple(first)]):.3g} (for a split, "
            f"|1 - α| + |α|); above {_MAX_AMPLIFICATION:.0e} they amplify rounding errors that "
            f"many times and float64 cannot confirm that they sum to 1 (1e20 + (1 - 1e20) is "
            f"0). Use coefficients of moderate size (|α| of order 1)"
        )


def _warn_missing_bias(name: str, cols: LayerMap | None) -> None:
    """Warn when null fan-out columns need a bias gradient that is not being mapped.

    A null neuron's constant output ``σ(β)`` gives its fan-out column the gradient
    ``σ(β)·∂R/∂b`` of the next layer's bias ``b``; without that bias's entry (no bias, a
    frozen one, or one without optimizer state) the column is set to 0, which is exact
    only when ``σ(β) = 0``.
    """
    if cols is None or not bool(cols.null_mask.any()):
        return
    if not bool((cols.null_value[cols.null_mask] != 0).any()):
        return
    warnings.warn(
        f"layer {name!r} (Linear): the gradients (or first moments) and second moments "
        f"of its fan-out columns from null neurons "
        f"with σ(β) != 0 are σ(β) times those of its bias, but its bias is not among the "
        f"mapped tensors (absent, frozen, or without optimizer state); they are set to 0, "
        f"which is not the exact map. Give that layer a trainable bias, or use a null bias "
        f"β with σ(β) = 0 (e.g. Null(bias=0.0) with tanh or ReLU).",
        UserWarning,
        stacklevel=5,
    )


_Mode = Literal["param", "grad", "sq"]


def check_sources(src: Tensor, m: int, where: str) -> None:
    """Refuse a source map that is not an embedding of ``m`` units.

    One check for the MLP's hidden layers and the traced model's width groups.

    Raises:
        ValueError: ``src`` is not 1-D ``int64``, shrinks, holds an index outside
            ``[-1, m)``, or leaves a narrow unit without a copy (totality).
    """
    if src.dtype != torch.int64 or src.dim() != 1:
        raise ValueError(f"{where}: source must be a 1-D int64 tensor")
    if src.numel() < m:
        raise ValueError(
            f"{where}: the wide layer has {src.numel()} neurons, fewer than "
            f"the narrow layer's {m}; an embedding can only widen"
        )
    bad = (src < -1) | (src >= m)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(
            f"{where}: wide neuron {i} has source {int(src[i])}, but sources "
            f"must lie in [0, {m}) or be -1 for a null neuron"
        )
    counts = torch.bincount(src[src >= 0], minlength=m)
    if bool((counts == 0).any()):
        missing = (counts == 0).nonzero().flatten().tolist()
        raise ValueError(
            f"{where}: narrow neurons {missing} have no copy in the wide "
            f"layer; every narrow neuron needs at least one (totality)"
        )


def check_shares(src: Tensor, coef: Tensor, m: int, where: str) -> None:
    """Refuse per-unit coefficients that do not sum to 1 over each unit's copies.

    Also refused: magnitudes that amplify rounding beyond the limit
    (:func:`_check_amplification`), a null unit with a coefficient other than 0.

    Raises:
        ValueError: The message names ``where``, the unit and the sum.
    """
    if tuple(coef.shape) != (src.numel(),):
        raise ValueError(f"{where}: coef must have shape ({src.numel()},)")
    if not bool(torch.isfinite(coef).all()):
        raise ValueError(
            f"{where}: coef has non-finite entries (nan or inf); they would be written "
            f"into the weights (a NaN never cancels out)"
        )
    sums = torch.zeros(m, dtype=torch.float64).index_add_(
        0, src.clamp(min=0), torch.where(src >= 0, coef, 0.0)
    )
    scale = torch.zeros(m, dtype=torch.float64).index_add_(
        0, src.clamp(min=0), torch.where(src >= 0, coef.abs(), 0.0)
    )
    _check_amplification(where, scale)
    if bool(((sums - 1).abs() > _coef_tol(scale)).any()):
        s = int(((sums - 1).abs() > _coef_tol(scale)).nonzero()[0])
        raise ValueError(
            f"{where}: the fan-out coefficients of the copies of narrow "
            f"neuron {s} sum to {float(sums[s])!r}; they must sum to 1"
        )
    if bool((coef[src < 0] != 0).any()):
        raise ValueError(
            f"{where}: null neurons must have coefficient 0 (their "
            f"fan-out column is zero; use fan_out_offset for anything else)"
        )


def check_matrix_shares(src: Tensor, coef: Tensor, m: int, rows: int, where: str) -> None:
    """Refuse a ``(rows, wide)`` matrix of coefficients that is no general embedding.

    One check for an MLP's hidden layer and a traced model's width group read by one
    Linear (``rows``: that reader's wide output rows): in every row, the coefficients of
    each narrow unit's copies sum to 1; magnitudes within the amplification limit
    (:func:`_check_amplification`); null units' columns are 0.

    Raises:
        ValueError: The message names ``where``, the row, the unit and the sum.
    """
    if tuple(coef.shape) != (rows, src.numel()):
        raise ValueError(
            f"{where}: a matrix of coefficients must have shape (wide_next, wide) = "
            f"({rows}, {src.numel()}), got {tuple(coef.shape)}"
        )
    if not bool(torch.isfinite(coef).all()):
        raise ValueError(
            f"{where}: coef has non-finite entries (nan or inf); they would be written "
            f"into the weights (a NaN never cancels out)"
        )
    sums = torch.zeros(rows, m, dtype=torch.float64).index_add_(
        1, src.clamp(min=0), torch.where(src >= 0, coef, 0.0)
    )
    scale = torch.zeros(rows, m, dtype=torch.float64).index_add_(
        1, src.clamp(min=0), torch.where(src >= 0, coef.abs(), 0.0)
    )
    _check_amplification(where, scale)
    if bool(((sums - 1).abs() > _coef_tol(scale)).any()):
        i, s = ((sums - 1).abs() > _coef_tol(scale)).nonzero()[0].tolist()
        raise ValueError(
            f"{where}: in row {i} of the next layer, the coefficients of the copies of "
            f"narrow neuron {s} sum to {float(sums[i, s])!r}; they must sum to 1"
        )
    if bool((coef[:, src < 0] != 0).any()):
        raise ValueError(f"{where}: null neurons must have coefficient 0")


def matrix_row_scales(
    coef: Tensor, src_next: Tensor, beta_next: Tensor, m_next: int
) -> Tensor | None:
    """The error scalings ``β`` of a layer with a ``(wide_next, wide)`` coefficient matrix.

    Wide unit ``j``'s back-propagated error is ``β_j`` times its source's when
    ``Σ_{i: src_next(i) = h} coef[i, j]·β_next[i]`` is the same for every narrow unit
    ``h`` of the next layer (``src_next``: the sources of the next layer's wide units,
    ``-1`` null; ``beta_next``: their error scalings; ``m_next``: its narrow width). One
    rule for an MLP's hidden layer and a traced width group read by one Linear.

    Returns:
        ``β`` (``(wide,)`` float64), or ``None`` when the sums differ (no linear gradient
        map: the backward condition fails).
    """
    weighted = coef * beta_next[:, None]  # (wide_next, wide)
    per_row = torch.zeros(m_next, coef.shape[1], dtype=torch.float64).index_add_(
        0, src_next.clamp(min=0), torch.where(src_next[:, None] >= 0, weighted, 0.0)
    )
    beta = per_row[0]
    if not torch.allclose(per_row, beta.expand_as(per_row), rtol=1e-9, atol=1e-12):
        return None
    return beta


class EmbeddingKind(str, Enum):
    """What an embedding preserves.

    * ``CRITICAL``: output preserved for every input, and gradients map linearly
      (``∇R_wide = B ∇R_narrow`` at every embedded point), so critical points stay
      critical and Hessian inertia can only grow.
    * ``OUTPUT_PRESERVING``: the function is preserved exactly but gradients do not map
      (e.g. Net2Net with symmetric noise, null neurons with a non-zero fan-in).
    * ``NONE``: not even the function is preserved (e.g. random padding).
    """

    CRITICAL = "critical"
    OUTPUT_PRESERVING = "output-preserving"
    NONE = "none"


def _f64(x: Tensor | Sequence[float] | float) -> Tensor:
    return torch.as_tensor(x, dtype=torch.float64).detach().clone().cpu()


@dataclass(frozen=True, eq=False)
class LayerMap:
    """How one hidden layer of the narrow network maps to the wide one.

    Attributes:
        source: ``int64`` tensor of shape ``(wide,)``: the narrow neuron each wide neuron
            copies, or ``-1`` for a null neuron.
        coef: ``float64`` fan-out coefficients: shape ``(wide,)`` (one coefficient per
            wide neuron, the splitting form) or ``(wide_next, wide)`` (one per wide
            connection, the general compatible form). Over the copies of each narrow
            neuron they sum to 1 (per row of the next layer); null neurons have 0.
        null_bias: ``float64`` ``(wide,)``: the bias ``β`` of each null neuron (ignored
            elsewhere).
        null_value: ``float64`` ``(wide,)``: the constant activation ``σ(β)`` each null
            neuron outputs (0 elsewhere). Set by the planner, which knows the activation.
        null_fan_in: optional ``float64`` ``(wide, wide_prev)``: fan-in rows for null
            neurons (rows of copies must be zero). ``None`` means zero.
        fan_out_offset: optional ``float64`` ``(wide_next, wide)`` added to the next
            layer's weights; summing to zero over the copies of each narrow neuron keeps
            the function. ``None`` means zero.
    """

    source: Tensor
    coef: Tensor
    null_bias: Tensor
    null_value: Tensor
    null_fan_in: Tensor | None = None
    fan_out_offset: Tensor | None = None

    @property
    def wide(self) -> int:
        """Number of neurons in the wide layer."""
        return int(self.source.numel())

    @property
    def null_mask(self) -> Tensor:
        """Boolean mask of the null neurons."""
        return self.source < 0

    @property
    def is_vector(self) -> bool:
        """Whether the coefficients are per neuron (splitting form)."""
        return self.coef.dim() == 1

    @classmethod
    def identity(cls, width: int) -> LayerMap:
        """The map that leaves a layer of ``width`` neurons unchanged."""
        return cls(
            source=torch.arange(width),
            coef=torch.ones(width, dtype=torch.float64),
            null_bias=torch.zeros(width, dtype=torch.float64),
            null_value=torch.zeros(width, dtype=torch.float64),
        )


@dataclass(frozen=True, eq=False)
class Embedding:
    """A critical (or output-preserving) embedding of a narrow MLP into a wider one.

    Build one with :func:`torch_embed.widen` (which plans it from a scheme and applies
    it in place) or :func:`torch_embed.plan`; construct it directly only for a general
    compatible embedding. Construction validates index ranges, totality (every narrow
    neuron keeps at least one copy) and the coefficient sums, raising ``ValueError``.

    Attributes:
        layout: The narrow network's structure.
        layers: One :class:`LayerMap` per hidden layer.
        noise: Net2Net's symmetric noise on the fan-out of copies (``apply`` only; ``0``:
            none): the copies of one narrow neuron are paired in index order, and in the
            next Linear's weight the pair's columns get ``+N`` and ``-N``,
            ``N = noise · (w/c) · ε`` (``w/c`` the copy's column), ``ε ~ N(0, 1)`` per
            entry drawn from ``seed`` and the weight's name, so ``apply`` is repeatable;
            an odd copy stays noise-free. The noise is drawn on the narrow rows of that
            weight, before they are copied (a copy of a next-layer neuron keeps its
            original's fan-in). The copies carry equal values, so the output
            is kept (to rounding); gradients map as without noise (the map of the
            embedding's critical part). The same noise as a traced model's
            (:class:`~torch_embed.graph.embedding.GroupEmbedding`), from the same code.
        seed: The seed of that noise.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import torch_embed
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> net = nn.Sequential(nn.Linear(1, 2), nn.Tanh(), nn.Linear(2, 1)).double()
        >>> emb = torch_embed.plan(net, [3], torch_embed.Split(alpha=0.25, select=[1]))
        >>> emb.layers[0].source.tolist(), emb.layers[0].coef.tolist()
        ([0, 1, 1], [1.0, 0.75, 0.25])
        >>> emb.kind
        <EmbeddingKind.CRITICAL: 'critical'>
        >>> wide = emb.apply(net.state_dict())
        >>> wide["2.weight"][0, 1:].sum().item() == net[2].weight[0, 1].item()
        True
    """

    layout: Layout
    layers: tuple[LayerMap, ...]
    _notes: tuple[str, ...] = field(default=(), repr=False)
    noise: float = 0.0
    seed: int = 0
    _cache: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._validate()

    # ------------------------------------------------------------------ properties
    @property
    def narrow_widths(self) -> tuple[int, ...]:
        """``(m_0, ..., m_L)`` of the narrow network."""
        return self.layout.widths

    @property
    def wide_widths(self) -> tuple[int, ...]:
        """``(m_0, m'_1, ..., m'_{L-1}, m_L)`` of the wide network."""
        w = self.layout.widths
        return (w[0], *(lm.wide for lm in self.layers), w[-1])

    @property
    def wide_layout(self) -> Layout:
        """The structure of the wide network."""
        widths = self.wide_widths
        linears = tuple(
            LinearLayer(lin.name, widths[k], widths[k + 1], lin.has_bias)
            for k, lin in enumerate(self.layout.linears)
        )
        return Layout(linears, self.layout.hidden)

    @property
    def num_new_neurons(self) -> int:
        """Total number of neurons added over all hidden layers."""
        return sum(self.wide_widths[1:-1]) - sum(self.narrow_widths[1:-1])

    @property
    def kind(self) -> EmbeddingKind:
        """Whether the embedding is critical, output-preserving only, or neither."""
        return self._classify()[0]

    @property
    def reasons(self) -> tuple[str, ...]:
        """Why the embedding is not critical (empty when it is)."""
        return self._classify()[1] + self._notes

    @property
    def is_critical(self) -> bool:
        """Shorthand for ``kind is EmbeddingKind.CRITICAL``."""
        return self.kind is EmbeddingKind.CRITICAL

    def __repr__(self) -> str:
        widths = "→".join(
            f"{a}" if a == b else f"{a}→{b}"
            for a, b in zip(self.narrow_widths[1:-1], self.wide_widths[1:-1])
        )
        return f"Embedding(hidden widths {widths}, kind={self.kind.value})"

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        if not math.isfinite(self.noise) or self.noise < 0:
            raise ValueError(f"noise must be a finite number >= 0, got {self.noise!r}")
        narrow = self.layout.hidden_widths
        if len(self.layers) != len(narrow):
            raise ValueError(
                f"an embedding needs one LayerMap per hidden layer: the network has "
                f"{len(narrow)} hidden layers, got {len(self.layers)}"
            )
        wide = self.wide_widths
        for l, (lm, m) in enumerate(zip(self.layers, narrow)):
            for attr in ("coef", "null_bias", "null_value", "null_fan_in", "fan_out_offset"):
                value = getattr(lm, attr)
                if value is not None and not bool(torch.isfinite(value).all()):
                    raise ValueError(
                        f"hidden layer {l}: {attr} has non-finite entries (nan or inf); they "
                        f"would be written into the weights (a NaN never cancels out)"
                    )
            check_sources(lm.source, m, f"hidden layer {l}")
            src = lm.source
            n_next = wide[l + 2]
            for attr in ("null_bias", "null_value"):
                if tuple(getattr(lm, attr).shape) != (lm.wide,):
                    raise ValueError(f"hidden layer {l}: {attr} must have shape ({lm.wide},)")
            if lm.coef.dim() == 1:
                if tuple(lm.coef.shape) != (lm.wide,):
                    raise ValueError(f"hidden layer {l}: coef must have shape ({lm.wide},)")
                check_shares(src, lm.coef, m, f"hidden layer {l}")
            else:
                check_matrix_shares(src, lm.coef, m, n_next, f"hidden layer {l}")
            if lm.null_fan_in is not None:
                if tuple(lm.null_fan_in.shape) != (lm.wide, wide[l]):
                    raise ValueError(
                        f"hidden layer {l}: null_fan_in must have shape ({lm.wide}, {wide[l]})"
                    )
                if bool((lm.null_fan_in[src >= 0] != 0).any()):
                    raise ValueError(
                        f"hidden layer {l}: null_fan_in must be zero on rows of copied neurons"
                    )
            if lm.fan_out_offset is not None:
                if tuple(lm.fan_out_offset.shape) != (n_next, lm.wide):
                    raise ValueError(
                        f"hidden layer {l}: fan_out_offset must have shape ({n_next}, {lm.wide})"
                    )

    # ------------------------------------------------------------------ kind
    def _classify(self) -> tuple[EmbeddingKind, tuple[str, ...]]:
        preserving: list[str] = []  # reasons it is output-preserving but not critical
        broken: list[str] = []  # reasons it does not preserve the output
        for l, lm in enumerate(self.layers):
            null = lm.null_mask
            if lm.fan_out_offset is not None and bool((lm.fan_out_offset != 0).any()):
                off = lm.fan_out_offset
                sums = torch.zeros(off.shape[0], int(lm.source.max()) + 1, dtype=off.dtype)
                sums.index_add_(1, lm.source.clamp(min=0), torch.where(null, 0.0, off))
                tol = 1e-12 * off.abs().max()
                if bool((off[:, null] != 0).any()) or bool((sums.abs() > tol).any()):
                    broken.append(
                        f"hidden layer {l}: the fan-out offsets do not cancel over the copies "
                        f"(or a null neuron has a non-zero fan-out), so the function changes"
                    )
                else:
                    preserving.append(
                        f"hidden layer {l}: fan-out offsets (symmetric noise) break the "
                        f"gradient map"
                    )
            if lm.null_fan_in is not None and bool((lm.null_fan_in != 0).any()):
                preserving.append(
                    f"hidden layer {l}: null neurons with a non-zero fan-in are not constant, "
                    f"so their fan-out gradient is not mapped"
                )
            no_bias = not self.layout.linears[l + 1].has_bias
            if no_bias and bool((lm.null_value[null] != 0).any()):
                preserving.append(
                    f"hidden layer {l}: null neurons output σ(β) ≠ 0 and the next Linear "
                    f"(layer {self.layout.linears[l + 1].name}) has no bias to absorb "
                    f"their gradient"
                )
        for l in self._noisy_layers() if self.noise else ():
            preserving.append(
                f"hidden layer {l}: fan-out offsets (symmetric noise, Net2Net noise "
                f"{self.noise:g}) break the gradient map"
            )
        if not preserving and not broken and self._row_scales() is None:
            preserving.append(
                "the matrix coefficients violate the backward condition (no error scalings β "
                "make gradients map)"
            )
        if broken:
            return EmbeddingKind.NONE, tuple(broken + preserving)
        if preserving:
            return EmbeddingKind.OUTPUT_PRESERVING, tuple(preserving)
        return EmbeddingKind.CRITICAL, ()

    def _noisy_layers(self) -> list[int]:
        """The hidden layers where a narrow neuron has a pair of copies for ``noise``."""
        return [
            l
            for l, lm in enumerate(self.layers)
            if bool((torch.bincount(lm.source[lm.source >= 0]) > 1).any())
        ]

    def _noisy(self) -> bool:
        """Whether some narrow neuron has a pair of copies (for ``noise`` to perturb)."""
        return bool(self._noisy_layers())

    def _row_scales(self) -> list[Tensor] | None:
        """Error scalings β per hidden layer (wide,), or None if they do not exist (cached).

        For a copy ``j`` of a neuron, the back-propagated error is ``β_j`` times the
        narrow one; this is what scales the fan-in gradients.
        """
        if "betas" not in self._cache:
            self._cache["betas"] = self._compute_row_scales()
        return self._cache["betas"]  # type: ignore[no-any-return]

    def _compute_row_scales(self) -> list[Tensor] | None:
        scales: list[Tensor] = []
        beta_next: Tensor | None = None  # None = output layer, β = 1
        for l in range(len(self.layers) - 1, -1, -1):
            lm = self.layers[l]
            if lm.is_vector:
                scale = 1.0
                if beta_next is not None:
                    nxt = self.layers[l + 1]
                    m_next = self.layout.hidden_widths[l + 1]
                    s = torch.zeros(m_next, dtype=torch.float64).index_add_(
                        0, nxt.source.clamp(min=0), torch.where(nxt.null_mask, 0.0, beta_next)
                    )
                    if not torch.allclose(s, s[0].expand_as(s), rtol=1e-9, atol=1e-12):
                        return None
                    scale = float(s[0])
                beta = lm.coef * scale
            else:
                b_next = (
                    torch.ones(lm.coef.shape[0], dtype=torch.float64)
                    if beta_next is None
                    else beta_next
                )
                src_next = (
                    torch.arange(lm.coef.shape[0])
                    if beta_next is None
                    else self.layers[l + 1].source
                )
                matrix_beta = matrix_row_scales(lm.coef, src_next, b_next, int(src_next.max()) + 1)
                if matrix_beta is None:
                    return None
                beta = matrix_beta
            scales.append(beta)
            beta_next = beta
        scales.reverse()
        return scales

    # ------------------------------------------------------------------ mapping
    def apply(self, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Map a narrow parameter set to the wide one (pure; the input is not modified).

        Args:
            state: Tensors keyed like the narrow ``Sequential``'s ``state_dict()``.
                Parameters and BatchNorm buffers of the network are mapped; other keys
                pass through.

        Returns:
            A new dictionary with the wide tensors, in the input's dtype and device.
        """
        return self._map(state, "param")

    def map_gradients(self, grads: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Map gradients (or first moments, momenta) of the narrow parameters by ``B``.

        Fan-in rows of a copy are scaled by its error scaling (its coefficient in the
        splitting form), fan-out columns are copied, a null neuron's fan-in gets 0 and
        its fan-out column ``σ(β)`` times the next layer's bias gradient. For a critical
        embedding this is exactly the wide gradient at the embedded point.

        Raises:
            ValueError: If the embedding's coefficients admit no gradient map.
        """
        return self._map(grads, "grad")

    def map_second_moments(self, moments: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Map squared-gradient statistics (Adam's ``exp_avg_sq``, Adagrad's ``sum``).

        Same as :meth:`map_gradients` with every scale squared.
        """
        return self._map(moments, "sq")

    def _map(self, state: Mapping[str, Tensor], mode: _Mode) -> dict[str, Tensor]:
        what = {"param": "apply", "grad": "grad", "sq": "second"}[mode]
        if mode != "param":
            if self._row_scales() is None:
                raise ValueError(
                    "this embedding's coefficients admit no linear gradient map (the backward "
                    "condition fails), so gradients and optimizer state cannot be mapped"
                )
            for k, lin in enumerate(self.layout.linears):
                if k and f"{lin.name}.weight" in state and f"{lin.name}.bias" not in state:
                    _warn_missing_bias(lin.name, self.layers[k - 1])
        axes, null_values = self._axes()
        return map_tensors(
            axes, state, what, noise=self.noise, seed=self.seed, null_values=null_values
        )

    def _axes(self) -> tuple[tuple[AxisMap, ...], dict[str, Tensor]]:
        """Every changing tensor axis as an AxisMap, and the null units' values (cached).

        The null units' constant values ``σ(β)`` are keyed by the weight they feed.

        Hidden layer ``k``'s map copies the rows of Linear ``k`` (weight axis 0 with the
        null units' fan-in rows, bias with fill ``β``, or 0 before a BatchNorm), the
        entries of its BatchNorm1d (weight, bias, running mean and variance; null fills
        1, ``β``, 0, 1) and splits the columns of Linear ``k + 1`` (coefficients, fan-out
        offsets); gradients scale the copies by the error scalings
        (:meth:`_row_scales`). The MLP is mapped by the engine of traced models
        (:func:`~torch_embed.graph.gather.map_tensors`).
        """
        if "axes" in self._cache:
            return self._cache["axes"]  # type: ignore[no-any-return]
        betas = self._row_scales()
        axes: list[AxisMap] = []
        null_values: dict[str, Tensor] = {}
        for k, lin in enumerate(self.layout.linears):
            w = f"{lin.name}.weight"
            if k:
                # the columns first, as the traced planner orders a Linear's axes: Net2Net's
                # noise is drawn on the narrow rows and copied with them, so a copy of a
                # neuron of the next layer keeps its original's fan-in
                cols = self.layers[k - 1]
                axes.append(
                    AxisMap(w, 1, "split", cols.source, cols.coef, offset=cols.fan_out_offset)
                )
                value = torch.where(cols.null_mask, cols.null_value, 0.0)
                if bool((value != 0).any()):
                    null_values[w] = value
            if k < len(self.layers):
                lm = self.layers[k]
                copy = {
                    "source": lm.source,
                    "coef": lm.coef if lm.is_vector else (~lm.null_mask).to(torch.float64),
                    "beta": betas[k] if betas is not None else None,
                }
                rows = lm.null_fan_in
                axes.append(AxisMap(w, 0, "copy", **copy, null_rows=rows))  # type: ignore[arg-type]
                bn = self.layout.hidden[k].batchnorm
                bias = lm.null_bias if bn is None else None
                axes.append(AxisMap(f"{lin.name}.bias", 0, "copy", **copy, null_fill=bias))  # type: ignore[arg-type]
                if bn is not None:
                    one = torch.ones(lm.wide, dtype=torch.float64)
                    fills = {"weight": one, "bias": lm.null_bias, "running_var": one}
                    for suffix in ("weight", "bias", "running_mean", "running_var"):
                        axes.append(
                            AxisMap(
                                f"{bn}.{suffix}",
                                0,
                                "copy",
                                **copy,  # type: ignore[arg-type]
                                null_fill=fills.get(suffix),
                                buffer=suffix.startswith("running"),
                            )
                        )
        self._cache["axes"] = (tuple(axes), null_values)
        return self._cache["axes"]  # type: ignore[no-any-return]

    def restrict(self, wide_state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Pull a wide parameter set back to the narrow one it embeds (``Bᵀ``).

        Fan-in rows, biases and BatchNorm entries are read from the first copy of each
        narrow neuron; fan-out columns are summed over the copies. Null neurons are
        dropped. For ``wide_state = self.apply(narrow)`` this returns ``narrow`` (up to
        rounding of the summed shares), for every kind of embedding: the coefficients
        and the fan-out offsets sum to 1 and 0 over the copies.

        Example:
            >>> import torch
            >>> from torch import nn
            >>> import torch_embed
            >>> net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)).double()
            >>> emb = torch_embed.plan(net, [6], "net2net")
            >>> back = emb.restrict(emb.apply(net.state_dict()))
            >>> all(torch.allclose(back[k], v) for k, v in net.state_dict().items())
            True
        """
        out = dict(wide_state)
        L = len(self.layout.linears)
        for k, lin in enumerate(self.layout.linears):
            rows = self.layers[k] if k < L - 1 else None
            cols = self.layers[k - 1] if k > 0 else None
            rep = _first_copies(rows) if rows is not None else None
            wkey = f"{lin.name}.weight"
            if wkey in wide_state:
                w = wide_state[wkey]
                if rep is not None:
                    w = w.index_select(0, rep.to(w.device))
                if cols is not None:
                    keep = (~cols.null_mask).to(w.device)
                    narrow = torch.zeros(
                        w.shape[0], self.narrow_widths[k], dtype=torch.float64, device=w.device
                    )
                    narrow.index_add_(
                        1, cols.source.to(w.device)[keep], w[:, keep].to(torch.float64)
                    )
                    w = narrow.to(w.dtype)
                out[wkey] = w
            if rep is None:
                continue
            names = [f"{lin.name}.bias"]
            bn = self.layout.hidden[k].batchnorm
            if bn is not None:
                names += [f"{bn}.{s}" for s in ("weight", "bias", "running_mean", "running_var")]
            for key in names:
                if key in wide_state:
                    out[key] = wide_state[key].index_select(0, rep.to(wide_state[key].device))
        return out

    # ------------------------------------------------------------------ curvature
    def inertia_change(
        self,
        model: nn.Module,
        loss_fn: Callable[[Any, Any], Tensor],
        inputs: Tensor | None = None,
        targets: Any = None,
        *,
        data: Iterable[Any] | None = None,
        reduction: str | None = None,
        process_group: Any = None,
        tol: float | None = None,
        method: Literal["auto", "closed-form", "hvp"] = "auto",
    ) -> Inertia:
        """The exact change of Hessian inertia this embedding causes, at ``model``.

        ``model`` is the WIDENED network at the embedded point; the result satisfies
        ``inertia(H_wide) = inertia(H_narrow) + change`` without building ``H_wide``.
        See :func:`torch_embed.inertia_change.inertia_change` for the method, the
        tolerance, the numerical limits and ``data``/``reduction``/``process_group``
        (the whole data set's loss, over the ranks of a process group).

        Raises:
            ValueError: The embedding is not critical, or the model is not its image.

        Example:
            >>> import torch
            >>> from torch import nn
            >>> import torch_embed
            >>> net = nn.Sequential(nn.Linear(1, 2), nn.Tanh(), nn.Linear(2, 1)).double()
            >>> emb = torch_embed.widen(net, [3], torch_embed.Null())
            >>> x = torch.linspace(-1, 1, 8, dtype=torch.float64)[:, None]
            >>> emb.inertia_change(net, nn.MSELoss(), x, x**2).total
            3
        """
        from torch_embed.inertia_change import inertia_change

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
        )

    # ------------------------------------------------------------------ composition
    def then(self, other: Embedding) -> Embedding:
        """Compose: first ``self`` (narrow → mid), then ``other`` (mid → wide).

        Raises:
            ValueError: If ``other`` does not start from ``self``'s wide widths, or either
                carries Net2Net's noise (a perturbation proportional to the weights it is
                applied to, drawn per pair of copies: no gather of the composition; plan
                with ``Net2Net(noise=0.0)`` to compose).
        """
        for emb in (self, other):
            if emb.noise and emb._noisy():
                raise ValueError(
                    f"cannot compose an embedding with Net2Net noise ({emb.noise:g}): the "
                    f"noise is a random perturbation of the next layer's columns, not a "
                    f"gather; plan with Net2Net(noise=0.0) to compose"
                )
        if other.narrow_widths != self.wide_widths:
            raise ValueError(
                f"cannot compose: the second embedding starts from widths "
                f"{other.narrow_widths}, the first ends at {self.wide_widths}"
            )
        layers = []
        n = len(self.layers)
        for l in range(n):
            a, b = self.layers[l], other.layers[l]
            sb = b.source
            from_b_null = sb < 0
            sa = torch.where(from_b_null, -1, a.source[sb.clamp(min=0)])
            null = sa < 0
            nb = torch.where(from_b_null, b.null_bias, a.null_bias[sb.clamp(min=0)])
            nv = torch.where(from_b_null, b.null_value, a.null_value[sb.clamp(min=0)])
            nb = torch.where(null, nb, 0.0)
            nv = torch.where(null, nv, 0.0)
            next_b = other.layers[l + 1] if l + 1 < n else None
            if a.is_vector and b.is_vector:
                coef = torch.where(null, 0.0, a.coef[sb.clamp(min=0)] * b.coef)
            else:
                coef = _compose_matrix(
                    _as_matrix(a, self.wide_widths[l + 2]),
                    _as_matrix(b, other.wide_widths[l + 2]),
                    next_b,
                    sb,
                )
                coef = torch.where(null[None, :], 0.0, coef)
            # fan-in of null neurons coming from `self`: map their mid rows into wide coords
            fan_in = b.null_fan_in.clone() if b.null_fan_in is not None else None
            if a.null_fan_in is not None and bool((a.null_fan_in != 0).any()):
                prev = other.layers[l - 1] if l > 0 else None
                mid_rows = a.null_fan_in[sb.clamp(min=0)]  # (wide, mid_prev)
                if prev is not None:
                    mid_rows = mid_rows[:, prev.source.clamp(min=0)] * prev.coef
                    mid_rows[:, prev.null_mask] = 0
                mid_rows[~(null & ~from_b_null)] = 0
                fan_in = mid_rows if fan_in is None else fan_in + mid_rows
            # an offset on a row that is null in its own embedding is never applied (null
            # rows are written from their fan-in alone): drop it before composing, or the
            # fix-up below would move it into the composed fan-in
            offset = None
            if b.fan_out_offset is not None:
                offset = _live_rows(b.fan_out_offset, next_b)
            if a.fan_out_offset is not None:
                off = _live_rows(a.fan_out_offset, self.layers[l + 1] if l + 1 < n else None)
                if next_b is not None:
                    off = off[next_b.source.clamp(min=0)]
                    off[next_b.null_mask] = 0
                # W_wide[i, j] = W_mid[r(i), sb(j)] * b.coef[i, j]: the offset scales too
                off = off[:, sb.clamp(min=0)] * b.coef
                off[:, from_b_null] = 0
                offset = off if offset is None else offset + off
            layers.append(LayerMap(sa, coef, nb, nv, fan_in, offset))
        # `other`'s offsets on rows that are null in the composition (copies of `self`'s
        # null neurons) would be dropped: apply writes null rows from null_fan_in alone
        for l in range(n - 1):
            shift, nxt = layers[l].fan_out_offset, layers[l + 1]
            rows = nxt.null_mask
            if shift is None or not bool((shift[rows] != 0).any()):
                continue
            moved = nxt.null_fan_in.clone() if nxt.null_fan_in is not None else shift * 0
            moved[rows] += shift[rows]
            shift = shift.clone()
            shift[rows] = 0
            layers[l] = replace(layers[l], fan_out_offset=shift)
            layers[l + 1] = replace(nxt, null_fan_in=moved)
        return Embedding(self.layout, tuple(layers), self._notes + other._notes)

    # ------------------------------------------------------------------ one-step pieces
    def steps(self) -> list[Embedding]:
        """Decompose into one-step splits and null embeddings, then one permutation.

        Each returned embedding adds exactly one neuron (or, the last, only reorders the
        neurons), and ``steps[0].then(steps[1]).then(...)`` equals ``self``. For a
        neuron with copies of coefficients ``a_1..a_k``, one copy stays in place and the
        others split off one at a time with ``α = a_j / (current coefficient)``, in an
        order that keeps every current coefficient non-zero.

        Raises:
            ValueError: If the embedding uses matrix coefficients, fan-out offsets,
                non-zero null fan-ins or Net2Net noise: those are not compositions of
                one-step pieces.
        """
        if self.noise and self._noisy():
            raise ValueError(
                f"Net2Net noise ({self.noise:g}) is not a chain of one-step embeddings; "
                f"plan with Net2Net(noise=0.0) to decompose"
            )
        for l, lm in enumerate(self.layers):
            if (
                not lm.is_vector
                or lm.fan_out_offset is not None
                or (lm.null_fan_in is not None and bool((lm.null_fan_in != 0).any()))
            ):
                raise ValueError(
                    f"hidden layer {l}: only splitting-form embeddings (per-neuron "
                    f"coefficients, no fan-out offsets, zero null fan-in) decompose into "
                    f"one-step embeddings"
                )
        steps: list[Embedding] = []
        current = self.layout
        # final order of each layer after the steps: originals, then appended neurons
        order: list[list[int]] = []
        for l, lm in enumerate(self.layers):
            m = self.layout.hidden_widths[l]
            src = lm.source.tolist()
            coef = lm.coef.tolist()
            at_index: list[int] = [-1] * m  # which wide neuron ends at narrow index s
            appended: list[int] = []
            groups: dict[int, list[int]] = {}
            for j, s_j in enumerate(src):
                groups.setdefault(s_j, []).append(j)
            for s in range(m):
                copies = groups[s]
                primary, rest = _split_order([coef[j] for j in copies])
                at_index[s] = copies[primary]
                current_coef = 1.0
                for idx in rest:
                    a = coef[copies[idx]]
                    alpha = a / current_coef
                    step = _one_step_split(current, l, s, alpha)
                    steps.append(step)
                    current = step.wide_layout
                    current_coef -= a
                    appended.append(copies[idx])
            for j in groups.get(-1, []):
                step = _one_step_null(current, l, float(lm.null_bias[j]), float(lm.null_value[j]))
                steps.append(step)
                current = step.wide_layout
                appended.append(j)
            order.append(at_index + appended)
        # permutation: wide neuron j sits at position pos[j] after the steps
        perm_layers = []
        for l, lm in enumerate(self.layers):
            pos = torch.empty(lm.wide, dtype=torch.int64)
            pos[torch.tensor(order[l])] = torch.arange(lm.wide)
            perm_layers.append(
                LayerMap(
                    pos,
                    torch.ones(lm.wide, dtype=torch.float64),
                    torch.zeros(lm.wide, dtype=torch.float64),
                    torch.zeros(lm.wide, dtype=torch.float64),
                )
            )
        perm = Embedding(current, tuple(perm_layers))
        if any(not torch.equal(p.source, torch.arange(p.wide)) for p in perm_layers):
            steps.append(perm)
        return steps


def _split_order(coefs: list[float]) -> tuple[int, list[int]]:
    """Pick the copy that stays in place and the order the others split off.

    The running coefficient of the staying copy starts at 1 and loses each split-off
    coefficient; it must be non-zero before every split (α = a / current).
    """
    k = len(coefs)
    candidates = sorted(range(k), key=lambda i: -abs(coefs[i]))
    for primary in candidates:
        rest = [i for i in range(k) if i != primary]
        current, order, ok = 1.0, [], True
        remaining = rest[:]
        while remaining:
            pick = next(
                (i for i in remaining if len(remaining) == 1 or abs(current - coefs[i]) > 1e-12),
                None,
            )
            if pick is None or abs(current) <= 1e-12:
                ok = False
                break
            order.append(pick)
            remaining.remove(pick)
            current -= coefs[pick]
        if ok:
            return primary, order
    raise ValueError(f"coefficients {coefs} cannot be reached by one-step splits")


def _layout_with_width(layout: Layout, layer: int, width: int) -> Layout:
    widths = list(layout.widths)
    widths[layer + 1] = width
    linears = tuple(
        LinearLayer(lin.name, widths[k], widths[k + 1], lin.has_bias)
        for k, lin in enumerate(layout.linears)
    )
    return Layout(linears, layout.hidden)


def _identity_layers(layout: Layout) -> list[LayerMap]:
    return [LayerMap.identity(m) for m in layout.hidden_widths]


def _one_step_split(layout: Layout, layer: int, neuron: int, alpha: float) -> Embedding:
    layers = _identity_layers(layout)
    m = layout.hidden_widths[layer]
    coef = torch.ones(m + 1, dtype=torch.float64)
    coef[neuron] = 1.0 - alpha
    coef[m] = alpha
    layers[layer] = LayerMap(
        torch.cat([torch.arange(m), torch.tensor([neuron])]),
        coef,
        torch.zeros(m + 1, dtype=torch.float64),
        torch.zeros(m + 1, dtype=torch.float64),
    )
    return Embedding(layout, tuple(layers))


def _one_step_null(layout: Layout, layer: int, bias: float, value: float) -> Embedding:
    layers = _identity_layers(layout)
    m = layout.hidden_widths[layer]
    coef = torch.ones(m + 1, dtype=torch.float64)
    coef[m] = 0.0
    nb = torch.zeros(m + 1, dtype=torch.float64)
    nv = torch.zeros(m + 1, dtype=torch.float64)
    nb[m], nv[m] = bias, value
    layers[layer] = LayerMap(torch.cat([torch.arange(m), torch.tensor([-1])]), coef, nb, nv)
    return Embedding(layout, tuple(layers))


def _live_rows(offset: Tensor, rows: LayerMap | None) -> Tensor:
    """``offset`` (a copy) with the rows of ``rows``' null neurons set to 0."""
    offset = offset.clone()
    if rows is not None:
        offset[rows.null_mask] = 0
    return offset


def _as_matrix(lm: LayerMap, n_next: int) -> Tensor:
    return lm.coef if not lm.is_vector else lm.coef.expand(n_next, lm.wide).clone()


def _compose_matrix(a: Tensor, b: Tensor, next_b: LayerMap | None, sb: Tensor) -> Tensor:
    rows = next_b.source.clamp(min=0) if next_b is not None else torch.arange(a.shape[0])
    return a[rows][:, sb.clamp(min=0)] * b


def _first_copies(lm: LayerMap) -> Tensor:
    """For each narrow neuron, the index of its first copy in the wide layer."""
    src = lm.source
    m = int(src.max()) + 1
    first = torch.full((m,), src.numel(), dtype=torch.int64)
    idx = torch.arange(src.numel())
    valid = src >= 0
    first.scatter_reduce_(0, src[valid], idx[valid], reduce="amin")
    return first
