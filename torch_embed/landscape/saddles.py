"""Strict-saddle certificates of one-step embeddings, escape by widening, truly-bad test.

A one-step embedding (split one neuron, or add one null neuron) changes the Hessian
only by the complement block ``D`` (docs/theory.md, "The exact inertia change of an
embedding"; computed in ``torch_embed._blocks``):
``inertia(H_wide) = inertia(H_narrow) + inertia(D)``. A negative eigenvalue of ``D`` is
a direction of negative curvature of the widened loss that the embedding *creates*,
with zero first-order effect on the output: a certificate that the embedded point is
a strict saddle, and an explicit way down.

**The curvature measure.** ``D`` is written in coordinates ``(v, c)`` whose parameter
directions have different lengths (for a split, ``‖d‖² = (α² + (1-α)²)‖v‖² + 2‖c‖²``;
for a null neuron ``‖d‖² = ‖v‖² + (1 + σ(β)²)‖c‖²``).
:func:`~torch_embed.landscape.saddle_certificates` reports the **Rayleigh quotient of
the wide Hessian along a unit-norm direction in the wide parameter space**,
``κ = min_d dᵀ H_wide d / dᵀd`` over the complement directions, i.e. the smallest
generalized eigenvalue of ``D x = κ M x`` with ``M = diag(q·I, 2·I)``,
``q = α² + (1-α)²`` (split) or ``M = diag(I, (1+σ(β)²)·I)`` (null). It does not
depend on how the coordinates are scaled, so candidates in different layers, of
different kinds and with different ``α`` compare directly. For a split,
``κ(α) = λ_min([[t·S, G/√(2q)], [Gᵀ/√(2q), 0]])`` with ``t = α(1-α)/q ∈ [-½, ½]``;
``α`` is searched in ``[1 - B, B]`` (``B = alpha_bound``: each copy's share of the
fan-out has magnitude at most ``B``; ``κ(α) = κ(1-α)``, the reported ``α ≥ ½``). For a
null neuron ``κ = -|σ'(β)|·σ_max(Σ h̃ δᵀ)/√(1 + σ(β)²)`` (``σ(β)²`` only when the next
bias compensates), minimized over the candidate biases.

**Three situations** (JML §6.3; docs/theory.md, "Strict saddles and escape") show up as
:class:`~torch_embed.landscape.Certificate`'s ``situation``: ``"coupling"`` (``G ≠ 0``:
any ``α`` gives a negative eigenvalue; always so away from a critical point, and at a
critical point with several outputs), ``"negative_s"`` (``S`` has a negative
eigenvalue: ``α(1-α) > 0``, best ``α = ½``), ``"signed"`` (``S`` has a positive
eigenvalue only: ``α(1-α) < 0``, ``α > 1``), and ``"null"`` (``σ'(β)·G' ≠ 0``,
GradMax's quantity).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vjp, vmap

from torch_embed._blocks import (
    LayerSignals,
    data_signals,
    null_coupling,
    null_direction,
    split_coupling,
    split_direction,
    splitting_matrix,
)
from torch_embed._data import BatchSource, batch_source
from torch_embed._order import ranked, tie_tolerance
from torch_embed._sequential import Layout, read_sequential
from torch_embed.embedding import Embedding
from torch_embed.hessian import flat_loss, hessian
from torch_embed.schemes import Null, Split, plan
from torch_embed.widen import embed_

__all__ = [
    "Certificate",
    "EscapeResult",
    "EscapeStep",
    "TrulyBadCondition",
    "escape",
    "saddle_certificates",
    "truly_bad_condition",
]

LossFn = Callable[[Any, Any], Tensor]
Situation = Literal["coupling", "negative_s", "signed", "null", "none"]

_DEFAULT_NULL_BIASES: tuple[float, ...] = tuple(round(-2.0 + 0.1 * k, 10) for k in range(41))
_GRID = 49  # α grid points on [1/2, B] before the golden-section refinement
_GOLDEN_ITERS = 60


@dataclass(frozen=True, eq=False)
class Certificate:
    """The most negative curvature one one-step embedding can create, and how.

    Attributes:
        layer: Hidden layer (0-based, as in ``widen``'s ``new_widths``).
        neuron: The neuron split, or ``None`` for a null neuron.
        kind: ``"split"`` or ``"null"``.
        situation: ``"coupling"``, ``"negative_s"``, ``"signed"`` or ``"null"`` (see
            the module docstring): which term of ``D`` creates the curvature;
            ``"none"`` when the curvature is not negative.
        alpha: The new copy's share of the fan-out (``None`` for a null neuron).
        null_bias: The null neuron's bias ``β`` (``None`` for a split).
        curvature: ``κ = dᵀ H_wide d`` for the unit-norm ``direction``: the most
            negative Rayleigh quotient of the widened Hessian over the embedding's
            complement directions (negative: the embedded point is a strict saddle).
        direction: The escape direction ``d`` (unit norm over all entries), keyed like
            the wide network's parameters (``"0.weight"``, ...; every trainable
            Linear parameter, zeros where untouched), in float64.
        embedding: The one-step :class:`~torch_embed.Embedding` (new neuron appended
            at the end of its layer); apply it with :func:`torch_embed.embed_`.
        s_eigenvalues: ``(λ_min, λ_max)`` of the splitting matrix ``S`` (``None`` for a
            null neuron).
        coupling_norm: Frobenius norm of ``G`` (split) or ``G'`` at the chosen bias.
    """

    layer: int
    neuron: int | None
    kind: Literal["split", "null"]
    situation: Situation
    alpha: float | None
    null_bias: float | None
    curvature: float
    direction: dict[str, Tensor]
    embedding: Embedding
    s_eigenvalues: tuple[float, float] | None
    coupling_norm: float

    @property
    def scheme(self) -> Split | Null:
        """The widening scheme that realizes this embedding with ``torch_embed.widen``."""
        if self.kind == "null":
            assert self.null_bias is not None
            return Null(bias=self.null_bias)
        assert self.alpha is not None and self.neuron is not None
        return Split(alpha=self.alpha, select={self.layer: [self.neuron]})

    def __repr__(self) -> str:
        what = (
            f"split neuron {self.neuron} with α={self.alpha:.6g}"
            if self.kind == "split"
            else f"null neuron with β={self.null_bias:.6g}"
        )
        return (
            f"Certificate(hidden layer {self.layer}: {what}, curvature={self.curvature:.6g}, "
            f"situation={self.situation!r})"
        )


# ---------------------------------------------------------------------------- helpers
def _activation_value_slope(
    model: nn.Module, layout: Layout, layer: int, points: Tensor
) -> tuple[Tensor, Tensor]:
    """``σ(β)`` and ``σ'(β)`` of the hidden layer's activation chain, in float64."""
    x = points.detach().to(torch.float64).clone().requires_grad_(True)
    a = x
    with torch.enable_grad():
        for name in layout.hidden[layer].activations:
            act = model.get_submodule(name)
            if isinstance(act, nn.Dropout):
                continue
            params = {k: v.detach().to(torch.float64) for k, v in act.named_parameters()}
            a = functional_call(act, params, (a,))
        if a is x:
            return x.detach(), torch.ones_like(x.detach())
        (slope,) = torch.autograd.grad(a.sum(), x, allow_unused=True)
    if slope is None:
        slope = torch.zeros_like(x)
    return a.detach(), slope.detach()


def _model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's floating parameters: the precision its symmetries hold to."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float64)


def _full_direction(
    layout: Layout, touched: Mapping[str, Tensor], dtype: torch.dtype
) -> dict[str, Tensor]:
    """Every Linear parameter of ``layout`` (zeros where untouched), sign fixed.

    An eigenvector's (or singular vector's) sign is arbitrary and LAPACK's choice
    depends on the kernels, so the sign is fixed here: the first entry (in parameter
    order) whose magnitude is above ``tie_tolerance`` of the entries (``dtype``: the
    model's) is positive.
    """
    ref = next(iter(touched.values()))
    out: dict[str, Tensor] = {}
    for lin in layout.linears:
        for key, shape in (
            (f"{lin.name}.weight", (lin.out_features, lin.in_features)),
            (f"{lin.name}.bias", (lin.out_features,)),
        ):
            if key.endswith("bias") and not lin.has_bias:
                continue
            t = touched.get(key)
            out[key] = (
                t.to(torch.float64)
                if t is not None
                else torch.zeros(shape, dtype=torch.float64, device=ref.device)
            )
    flat = torch.cat([t.reshape(-1) for t in out.values()])
    if flat.numel():
        magnitude = flat.abs()
        cut = tie_tolerance([float(magnitude.max())], dtype)
        first = flat[magnitude > cut]
        if first.numel() and float(first[0]) < 0:
            out = {k: -t for k, t in out.items()}
    return out


def _normalized_split(s: Tensor, g: Tensor, alpha: float) -> Tensor:
    q = alpha**2 + (1 - alpha) ** 2
    t = alpha * (1 - alpha) / q
    nv, nc = g.shape
    out = torch.zeros(nv + nc, nv + nc, dtype=s.dtype, device=s.device)
    out[:nv, :nv] = t * s
    out[:nv, nv:] = g / math.sqrt(2 * q)
    out[nv:, :nv] = out[:nv, nv:].T
    return out


def _min_eig(mat: Tensor) -> tuple[float, Tensor]:
    evals, evecs = torch.linalg.eigh(mat)
    return float(evals[0]), evecs[:, 0]


def _best_alpha(s: Tensor, g: Tensor, bound: float) -> tuple[float, float, Tensor]:
    """Minimize ``κ(α)`` over ``α ∈ [1/2, bound]``: grid, then golden section."""

    def f(a: float) -> float:
        return _min_eig(_normalized_split(s, g, a))[0]

    grid = [0.5 + (bound - 0.5) * k / (_GRID - 1) for k in range(_GRID)] if bound > 0.5 else [0.5]
    values = [f(a) for a in grid]
    i = ranked(values, tol=tie_tolerance(values))[0]  # a flat κ(α): the smallest α
    best_a, best_v = grid[i], values[i]
    if len(grid) > 1:
        lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
        r = (math.sqrt(5) - 1) / 2
        x1, x2 = hi - r * (hi - lo), lo + r * (hi - lo)
        f1, f2 = f(x1), f(x2)
        for _ in range(_GOLDEN_ITERS):
            if f1 <= f2:
                hi, x2, f2 = x2, x1, f1
                x1 = hi - r * (hi - lo)
                f1 = f(x1)
            else:
                lo, x1, f1 = x1, x2, f2
                x2 = lo + r * (hi - lo)
                f2 = f(x2)
        a_gold, v_gold = (x1, f1) if f1 <= f2 else (x2, f2)
        if v_gold < best_v - 1e-13 * max(abs(best_v), 1e-300):
            best_a, best_v = a_gold, v_gold
    value, vec = _min_eig(_normalized_split(s, g, best_a))
    return best_a, value, vec


def _s_only_best(s_min: float, s_max: float, bound: float) -> float:
    """``min_α κ(α)`` with ``G = 0``: ``½λ_min(S)`` at α = ½, ``t(B)·λ_max(S)`` at α = B."""
    q = bound**2 + (1 - bound) ** 2
    t_b = bound * (1 - bound) / q
    return min(0.0, 0.5 * s_min, 0.5 * s_max, t_b * s_max, t_b * s_min)


def _split_certificate(
    model: nn.Module,
    layout: Layout,
    signals: LayerSignals,
    layer: int,
    neuron: int,
    bound: float,
) -> Certificate:
    s = splitting_matrix(signals, neuron)
    g = split_coupling(signals, neuron)
    alpha, value, vec = _best_alpha(s, g, bound)
    nv = g.shape[0]
    q = alpha**2 + (1 - alpha) ** 2
    v = vec[:nv] / math.sqrt(q)
    c = vec[nv:] / math.sqrt(2.0)
    m = layout.hidden_widths[layer]
    emb = plan(model, {layer: m + 1}, Split(alpha=alpha, select={layer: [neuron]}))
    wide = emb.wide_layout
    direction = _full_direction(
        wide, split_direction(wide, layer, neuron, m, alpha, v, c), _model_dtype(model)
    )
    s_eval = torch.linalg.eigvalsh(s)
    s_min, s_max = float(s_eval[0]), float(s_eval[-1])
    s_only = _s_only_best(s_min, s_max, bound)
    if not value < 0:
        situation: Situation = "none"
    elif value < s_only - 1e-6 * abs(value):
        situation = "coupling"
    elif 0.0 <= alpha <= 1.0:
        situation = "negative_s"
    else:
        situation = "signed"
    return Certificate(
        layer=layer,
        neuron=neuron,
        kind="split",
        situation=situation,
        alpha=alpha,
        null_bias=None,
        curvature=value,
        direction=direction,
        embedding=emb,
        s_eigenvalues=(s_min, s_max),
        coupling_norm=float(torch.linalg.matrix_norm(g)),
    )


def _null_certificate(
    model: nn.Module,
    layout: Layout,
    signals: LayerSignals,
    layer: int,
    biases: Sequence[float],
) -> Certificate | None:
    if not layout.linears[layer].has_bias:
        biases = [0.0]  # the null neuron's bias is its Linear's bias: none here
    beta = torch.tensor([float(b) for b in biases], dtype=torch.float64)
    value, slope = _activation_value_slope(model, layout, layer, beta)
    next_bias = layout.linears[layer + 1].has_bias
    ok = (value == 0) | torch.tensor(next_bias)
    if not bool(ok.any()):
        return None
    scale = slope.abs() / torch.sqrt(1 + torch.where(value == 0, 0.0, value**2))
    scale = torch.where(ok, scale, -1.0)
    # the first candidate among the best (a symmetric activation ties β and -β)
    k = ranked(scale.tolist(), tol=tie_tolerance(scale[ok].tolist()), descending=True)[0]
    g0 = null_coupling(signals, 1.0)
    u, sv, vh = torch.linalg.svd(g0, full_matrices=False)
    sigma_v, slope_k, k_scale = float(value[k]), float(slope[k]), float(scale[k])
    curvature = -k_scale * float(sv[0]) if sv.numel() else 0.0
    sign = 1.0 if slope_k >= 0 else -1.0
    v = u[:, 0] / math.sqrt(2.0)
    c = -sign * vh[0] / math.sqrt(2.0) / math.sqrt(1.0 + (sigma_v**2 if sigma_v != 0 else 0.0))
    m = layout.hidden_widths[layer]
    emb = plan(model, {layer: m + 1}, Null(bias=float(beta[k])))
    wide = emb.wide_layout
    direction = _full_direction(
        wide, null_direction(wide, layer, m, sigma_v, v, c), _model_dtype(model)
    )
    return Certificate(
        layer=layer,
        neuron=None,
        kind="null",
        situation="null" if curvature < 0 else "none",
        alpha=None,
        null_bias=float(beta[k]),
        curvature=curvature,
        direction=direction,
        embedding=emb,
        s_eigenvalues=None,
        coupling_norm=abs(slope_k) * float(torch.linalg.matrix_norm(g0)),
    )


# ---------------------------------------------------------------------------- public
def saddle_certificates(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor | None = None,
    targets: Any = None,
    *,
    data: Iterable[Any] | None = None,
    reduction: str | None = None,
    process_group: Any = None,
    alpha_bound: float = 2.0,
    null_biases: Sequence[float] | None = _DEFAULT_NULL_BIASES,
    layers: Sequence[int] | None = None,
    kinds: Sequence[str] = ("split", "null"),
) -> list[Certificate]:
    """Rank every one-step embedding by the negative curvature it creates.

    For every neuron of every hidden layer (one split certificate each) and every
    hidden layer (one null-neuron certificate), compute the complement block ``D`` in
    closed form (float64, one forward and backward pass per layer), reduce it to the
    most negative unit-norm Rayleigh quotient ``κ`` of the widened Hessian over the
    complement directions (see the module docstring), and return the certificates
    sorted by ``κ``, most negative first. Works at any point, critical or not: the
    complement directions have zero first-order effect everywhere.

    Curvatures within ``sqrt(eps)·max|κ|`` of each other (``eps`` of the model's
    dtype) are a tie, ordered by layer, then neuron, then the layer's null neuron: two
    mirror-image neurons differ only by rounding, and rounding depends on the CPU's
    kernels (``torch_embed._order`` states the rule). The same rule picks α on its
    grid, the null bias among equally good candidates and, in :func:`escape`, ``+t``
    over ``-t``; each direction's sign is fixed (its first non-negligible entry is
    positive), so results do not depend on the CPU.

    Args:
        model: An ``nn.Sequential`` MLP of Linear layers and twice-differentiable
            element-wise activations (no BatchNorm; Dropout in eval mode).
        loss_fn: ``loss_fn(output, targets) -> scalar`` (e.g. ``nn.MSELoss()``).
        inputs: The batch of inputs (omit with ``data``).
        targets: The batch of targets (omit with ``data``).
        data: An iterable of ``(inputs, targets)`` batches (e.g. a ``DataLoader``)
            instead of ``inputs, targets``: the certificates of the whole data set's
            loss (see :mod:`torch_embed._data`; the closed forms hold the layer's
            per-sample signals of all samples, not the network's activations).
        reduction: How ``loss_fn`` reduces over a batch (``"mean"``, ``"sum"``,
            ``"batchmean"``); needed with ``data``/``process_group`` for a plain
            function, read from a ``torch.nn`` loss otherwise.
        process_group: A :mod:`torch.distributed` process group: each rank passes its
            shard of the data; each rank sums the closed forms over its own samples
            and the partial sums are all-reduced, so every rank gets the same
            certificates.
        alpha_bound: ``B ≥ ½``: splits use ``α ∈ [1 - B, B]``, so each copy's share of
            the fan-out has magnitude at most ``B``. ``B = 1`` excludes signed splits.
        null_biases: Candidate null biases ``β`` (the best one is reported; only those
            with ``σ(β) = 0`` when the next Linear has no bias); ``None`` or empty
            skips null neurons. Default: ``-2.0, -1.9, ..., 2.0``.
        layers: Hidden layers to examine (default all).
        kinds: Which one-step embeddings to examine: ``"split"``, ``"null"`` or both.

    Returns:
        The certificates, most negative curvature first (ties by layer and neuron).

    Raises:
        ValueError: ``alpha_bound`` below ``½`` or infinite, a non-finite null bias, a
            layer index out of range, a hidden layer with BatchNorm1d, a module in train
            mode, or an activation with no second derivative.
        TypeError: ``layers`` or ``null_biases`` is not a sequence (e.g. a bare int).

    Example:
        A width-1 tanh network fitted to data it cannot represent: splitting its
        neuron creates a direction of negative curvature.

        >>> import torch
        >>> from torch import nn
        >>> from torch_embed.landscape.saddles import saddle_certificates
        >>> g = torch.Generator().manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(1, 1), nn.Tanh(), nn.Linear(1, 1)).double()
        >>> x = torch.linspace(-2, 2, 20, dtype=torch.float64)[:, None]
        >>> y = torch.sin(3 * x)
        >>> best = saddle_certificates(net, nn.MSELoss(), x, y)[0]
        >>> best.curvature < 0, sorted(best.direction)
        (True, ['0.bias', '0.weight', '2.bias', '2.weight'])
    """
    source = batch_source(
        "saddle_certificates",
        loss_fn,
        inputs,
        targets,
        data,
        reduction=reduction,
        process_group=process_group,
    )
    return _certificates(model, loss_fn, source, alpha_bound, null_biases, layers, kinds)


def _certificates(
    model: nn.Module,
    loss_fn: LossFn,
    source: BatchSource,
    alpha_bound: float,
    null_biases: Sequence[float] | None,
    layers: Sequence[int] | None,
    kinds: Sequence[str],
) -> list[Certificate]:
    """:func:`saddle_certificates` over a :class:`~torch_embed._data.BatchSource`."""
    if not (alpha_bound >= 0.5 and math.isfinite(alpha_bound)):
        raise ValueError(
            f"alpha_bound must be a finite number >= 0.5 (α ∈ [1 - B, B]), got {alpha_bound!r}"
        )
    if null_biases is not None:
        if isinstance(null_biases, (str, bytes, int, float)) or not hasattr(
            null_biases, "__iter__"
        ):
            raise TypeError(
                f"null_biases must be a sequence of floats (e.g. [0.0, 0.5]) or None, got "
                f"{type(null_biases).__name__}"
            )
        null_biases = [float(b) for b in null_biases]  # also a tensor or an array
        bad = [b for b in null_biases if not math.isfinite(b)]
        if bad:
            raise ValueError(f"null_biases must be finite numbers, got {bad}")
    layout = read_sequential(model)
    n = len(layout.hidden)
    if layers is not None and (
        isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence)
    ):
        raise TypeError(
            f"layers must be a sequence of hidden-layer indices (e.g. [0]) or None, got "
            f"{type(layers).__name__}"
        )
    chosen = range(n) if layers is None else list(layers)
    for l in chosen:
        if isinstance(l, bool) or not isinstance(l, int) or not 0 <= l < n:
            raise ValueError(f"layers: {l!r} is not a hidden-layer index (0..{n - 1})")
    unknown = set(kinds) - {"split", "null"}
    if unknown or isinstance(kinds, str):
        raise ValueError(f"kinds must be a sequence of 'split' and/or 'null', got {kinds!r}")
    certs: list[Certificate] = []
    for l in chosen:
        signals = data_signals(model, loss_fn, source, l)
        if "split" in kinds:
            for s in range(layout.hidden_widths[l]):
                certs.append(_split_certificate(model, layout, signals, l, s, float(alpha_bound)))
        if null_biases and "null" in kinds:
            cert = _null_certificate(model, layout, signals, l, null_biases)
            if cert is not None:
                certs.append(cert)
    return _rank(certs, _model_dtype(model))


def _rank(certs: Sequence[Certificate], dtype: torch.dtype) -> list[Certificate]:
    """Most negative curvature first; ties (``torch_embed._order``) by (layer, neuron).

    Within a tie, splits come in neuron order, then the layer's null neuron. Two
    mirror-image neurons have equal certificates up to rounding; without the tie rule
    the CPU's kernels chose which one :func:`escape` splits.
    """
    values = [c.curvature for c in certs]

    def key(i: int) -> tuple[int, bool, int]:
        c = certs[i]
        return (c.layer, c.kind == "null", c.neuron if c.neuron is not None else 0)

    return [certs[i] for i in ranked(values, key, tol=tie_tolerance(values, dtype))]


@dataclass(frozen=True)
class EscapeStep:
    """One widening step of :func:`escape`.

    Attributes:
        certificate: The certificate that was applied.
        step: The signed step length ``t``: the parameters moved by ``t·d``.
        loss_before: The loss before this step (narrow network).
        loss_after: The loss after widening and moving.
    """

    certificate: Certificate
    step: float
    loss_before: float
    loss_after: float


@dataclass(frozen=True)
class EscapeResult:
    """What :func:`escape` did.

    Attributes:
        steps: The widening steps taken (empty if no certificate gave a decrease).
        loss_before: The loss before :func:`escape`.
        loss_after: The loss after (equal to ``loss_before`` when nothing was done).
        best_curvature: The best certificate's curvature at the start (``nan`` if
            there was no certificate).
    """

    steps: tuple[EscapeStep, ...]
    loss_before: float
    loss_after: float
    best_curvature: float

    @property
    def escaped(self) -> bool:
        """Whether the model was widened and the loss strictly decreased."""
        return bool(self.steps)

    @property
    def neurons(self) -> tuple[tuple[int, int | None], ...]:
        """``(hidden layer, neuron split or None for a null neuron)`` per step."""
        return tuple((s.certificate.layer, s.certificate.neuron) for s in self.steps)

    @property
    def schemes(self) -> tuple[Split | Null, ...]:
        """The scheme of each step (``Split`` with explicit select and α, or ``Null``)."""
        return tuple(s.certificate.scheme for s in self.steps)

    @property
    def alphas(self) -> tuple[float | None, ...]:
        """``α`` of each split step (``None`` for null steps)."""
        return tuple(s.certificate.alpha for s in self.steps)

    @property
    def embeddings(self) -> tuple[Embedding, ...]:
        """The one-step embedding of each step, in order."""
        return tuple(s.certificate.embedding for s in self.steps)


def _evaluate(
    model: nn.Module, loss_fn: LossFn, source: BatchSource, state: Mapping[str, Tensor]
) -> float:
    """The data set's loss at ``state``: the weighted batches, summed over the group."""
    total = 0.0
    with torch.no_grad():
        for b in source.batches:
            out = b.loss(loss_fn)(functional_call(model, dict(state), (b.inputs,)), b.targets)
            if source.single:
                return float(out)
            total += float(out)
    return source.sum(total)


def _line_search(
    model: nn.Module,
    loss_fn: LossFn,
    source: BatchSource,
    wide: dict[str, Tensor],
    direction: Mapping[str, Tensor],
    curvature: float,
    reference: float,
    step: float | None,
    max_halvings: int,
) -> tuple[float, float] | None:
    """Backtracking along ``±d`` from the embedded point; ``(t, loss)`` or ``None``."""
    d = {
        k: direction[k].to(device=v.device, dtype=v.dtype)
        for k, v in wide.items()
        if k in direction
    }
    norm = math.sqrt(sum(float(v.to(torch.float64).pow(2).sum()) for v in wide.values()))
    dtype = next((v.dtype for v in wide.values() if v.is_floating_point()), torch.float64)

    def loss_at(t: float) -> float:
        moved = {k: (v + t * d[k] if k in d else v) for k, v in wide.items()}
        return _evaluate(model, loss_fn, source, moved)

    if step is None:
        t = math.sqrt(2 * max(reference, 1e-30) / max(-curvature, 1e-300))
        t = min(t, max(norm, 1.0))
    else:
        t = float(step)
    accepted: tuple[float, float] | None = None
    for _ in range(max_halvings):
        plus, minus = loss_at(t), loss_at(-t)
        # +t on a tie: a symmetric direction (an equal split's copies) has equal losses
        pick = ranked([plus, minus], tol=tie_tolerance([plus, minus], dtype))[0]
        best_t, best = (t, plus) if pick == 0 else (-t, minus)
        model_decrease = 0.5 * -curvature * t * t
        if best < reference and reference - best >= 0.25 * model_decrease:
            accepted = (best_t, best)
            break
        t /= 2
    if accepted is None:
        # accept any strict decrease found at the smallest steps (curvature tiny)
        return None
    # greedy expansion while the loss keeps decreasing
    t_acc, f_acc = accepted
    for _ in range(20):
        trial = loss_at(2 * t_acc)
        if not trial < f_acc:
            break
        t_acc, f_acc = 2 * t_acc, trial
    return t_acc, f_acc


def escape(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor | None = None,
    targets: Any = None,
    *,
    data: Iterable[Any] | None = None,
    reduction: str | None = None,
    process_group: Any = None,
    optimizer: torch.optim.Optimizer | None = None,
    max_new: int = 1,
    step: float | None = None,
    alpha_bound: float = 2.0,
    null_biases: Sequence[float] | None = _DEFAULT_NULL_BIASES,
    layers: Sequence[int] | None = None,
    kinds: Sequence[str] = ("split", "null"),
    max_halvings: int = 60,
) -> EscapeResult:
    """Widen ``model`` in place along the best certificate(s) and step down.

    For each of up to ``max_new`` new neurons: compute :func:`saddle_certificates` at
    the current network, take the most negative one, and search (before touching the
    model) for a step ``t`` along ``±d`` from the embedded point with a strict
    decrease of the loss: backtracking from ``t₀`` (``step``, or
    ``√(2R/|κ|)``, where the second-order model ``R + ½κt²`` reaches zero, capped at
    the parameter norm) by halving until the decrease is at least a quarter of the
    model's ``½|κ|t²``, then doubling while the loss keeps decreasing. Only if such a
    step exists is the model widened (:func:`torch_embed.embed_`, with the optimizer's
    state mapped) and moved by ``t·d``. The directions have zero first-order effect,
    so this works at critical points, where gradient descent is stuck, and elsewhere.

    Args:
        model: An ``nn.Sequential`` MLP (see :func:`saddle_certificates`).
        loss_fn: ``loss_fn(output, targets) -> scalar``.
        inputs: The batch of inputs (omit with ``data``).
        targets: The batch of targets (omit with ``data``).
        data: As in :func:`saddle_certificates`; the line search evaluates the whole
            data set's loss (one forward pass per batch per trial step).
        reduction: As in :func:`saddle_certificates`.
        process_group: As in :func:`saddle_certificates`: every rank takes the same
            steps and widens its model identically (losses are all-reduced).
        optimizer: Passed to :func:`torch_embed.embed_` so its state is mapped.
        max_new: Maximum number of neurons to add (one per step).
        step: Initial step length ``t₀`` of the line search (default automatic).
        alpha_bound: See :func:`saddle_certificates`.
        null_biases: See :func:`saddle_certificates`.
        layers: See :func:`saddle_certificates`.
        kinds: See :func:`saddle_certificates`.
        max_halvings: Backtracking halvings before a certificate is given up.

    Returns:
        An :class:`EscapeResult`; ``escaped`` is ``False`` (and the model unchanged)
        when no certificate has negative curvature or no step decreased the loss —
        the point may then be truly bad (see :func:`truly_bad_condition`).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from torch_embed.landscape.saddles import escape
        >>> net = nn.Sequential(nn.Linear(1, 1), nn.Tanh(), nn.Linear(1, 1)).double()
        >>> x = torch.linspace(-2, 2, 20, dtype=torch.float64)[:, None]
        >>> result = escape(net, nn.MSELoss(), x, torch.sin(3 * x))
        >>> result.escaped, net[0].out_features, result.loss_after < result.loss_before
        (True, 2, True)
    """
    if isinstance(max_new, bool) or not isinstance(max_new, int) or max_new < 0:
        raise ValueError(f"max_new must be a non-negative int, got {max_new!r}")
    if step is not None and not (math.isfinite(step) and step > 0):
        raise ValueError(f"step must be a positive finite number, got {step!r}")
    if isinstance(max_halvings, bool) or not isinstance(max_halvings, int) or max_halvings < 0:
        raise ValueError(f"max_halvings must be a non-negative int, got {max_halvings!r}")
    source = batch_source(
        "escape",
        loss_fn,
        inputs,
        targets,
        data,
        reduction=reduction,
        process_group=process_group,
    )
    first_loss = _evaluate(model, loss_fn, source, model.state_dict())
    current = first_loss
    steps: list[EscapeStep] = []
    best_curvature = math.nan
    for _ in range(max_new):
        certs = _certificates(model, loss_fn, source, alpha_bound, null_biases, layers, kinds)
        if not steps:
            best_curvature = certs[0].curvature if certs else math.nan
        done = False
        for cert in certs:
            if not cert.curvature < 0:
                break
            state = {k: v.detach() for k, v in model.state_dict().items()}
            wide = cert.embedding.apply(state)
            reference = min(current, _evaluate(model, loss_fn, source, wide))
            found = _line_search(
                model,
                loss_fn,
                source,
                wide,
                cert.direction,
                cert.curvature,
                reference,
                step,
                max_halvings,
            )
            if found is None:
                continue
            t, _ = found
            embed_(model, cert.embedding, optimizer=optimizer)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if name in cert.direction:
                        p.add_(cert.direction[name].to(device=p.device, dtype=p.dtype), alpha=t)
            after = _evaluate(model, loss_fn, source, model.state_dict())
            steps.append(EscapeStep(cert, t, current, after))
            current = after
            done = True
            break
        if not done:
            break
    return EscapeResult(tuple(steps), first_loss, current, best_curvature)


# ---------------------------------------------------------------------------- truly bad
@dataclass(frozen=True)
class TrulyBadCondition:
    """The necessary condition ``H⁽²⁾ = 0`` for a truly-bad critical point (JML Thm 6.3).

    Attributes:
        holds: Whether ``‖H⁽²⁾‖_F ≤ rtol·‖H‖_F``.
        norm: ``‖H⁽²⁾‖_F``, the Frobenius norm of the residual-weighted output-Hessian
            part of the loss Hessian (full Hessian minus the Gauss-Newton part).
        relative: ``‖H⁽²⁾‖_F / ‖H‖_F``.
        hessian_norm: ``‖H‖_F``.
        rtol: The tolerance used.
    """

    holds: bool
    norm: float
    relative: float
    hessian_norm: float
    rtol: float


def truly_bad_condition(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Any,
    *,
    rtol: float = 1e-6,
    dtype: torch.dtype = torch.float64,
) -> TrulyBadCondition:
    """Evaluate the paper's necessary condition for a truly-bad critical point.

    A critical point is *truly bad* when it is not a strict saddle and no critical
    embedding makes it one. JML 2022 Thm 6.3: then
    ``H⁽²⁾ = Σ_i E_S[∂_iℓ ∇²_θ f_i] = 0``, the part of the loss Hessian that the
    residuals weight. It is computed as ``H - Jᵀ H_f J`` (``J``: Jacobian of all the
    outputs with respect to the parameters, ``H_f``: Hessian of the loss with respect
    to the outputs; the Gauss-Newton part is one GEMM), in ``dtype`` (float64).

    ``holds`` is ``‖H⁽²⁾‖_F ≤ rtol·‖H‖_F``. The default ``rtol = 1e-6`` leaves room
    for a point polished to a gradient of ~1e-10 in float64 (the residuals of a
    zero-loss fit are then of that order); ``holds = False`` means some critical
    embedding (e.g. a split, see :func:`saddle_certificates`) turns the point into a
    strict saddle. Cost: the dense Hessian (``P²`` memory), ``J`` (``N·m_out·P``) and
    the output Hessian (``(N·m_out)²``).

    Example:
        A network that interpolates its data has zero residuals, so ``H⁽²⁾ = 0``:

        >>> import torch
        >>> from torch import nn
        >>> from torch_embed.landscape.saddles import truly_bad_condition
        >>> net = nn.Sequential(nn.Linear(1, 2), nn.Tanh(), nn.Linear(2, 1)).double()
        >>> x = torch.linspace(-1, 1, 5, dtype=torch.float64)[:, None]
        >>> truly_bad_condition(net, nn.MSELoss(), x, net(x).detach()).holds
        True
        >>> truly_bad_condition(net, nn.MSELoss(), x, torch.sin(4 * x)).holds
        False
    """
    if not rtol >= 0:
        raise ValueError(f"rtol must be a non-negative number, got {rtol!r}")
    full = hessian(model, loss_fn, inputs, targets, dtype=dtype)
    fl = flat_loss(model, loss_fn, inputs, targets, dtype=dtype)
    frozen = {
        n: (b.detach().to(dtype) if b.is_floating_point() else b.detach())
        for n, b in [*model.named_buffers(), *model.named_parameters()]
        if n not in fl.names
    }
    x = inputs.to(dtype) if inputs.is_floating_point() else inputs
    y = (
        targets.to(dtype)
        if isinstance(targets, Tensor) and targets.is_floating_point()
        else targets
    )

    def outputs(theta: Tensor) -> Tensor:
        state = {**frozen, **fl.unflatten(theta)}
        out: Tensor = functional_call(model, state, (x,))
        return out

    f0 = outputs(fl.theta).detach()
    shape = f0.shape

    def flat_outputs(theta: Tensor) -> Tensor:
        return outputs(theta).reshape(-1)

    jac = jacrev(flat_outputs)(fl.theta).detach()  # (N·m, P)

    def loss_of_outputs(f: Tensor) -> Tensor:
        out: Tensor = loss_fn(f.reshape(shape), y)
        return out.reshape(())

    def grad_f(f: Tensor) -> Tensor:
        g: Tensor = torch.func.grad(loss_of_outputs)(f)
        return g

    pullback = vjp(grad_f, f0.reshape(-1))[1]
    hj = vmap(lambda col: pullback(col)[0])(jac.T.contiguous())  # (P, N·m) = Jᵀ H_f
    ggn = hj @ jac
    ggn = (ggn + ggn.T) / 2
    h2 = full - ggn
    h_norm = float(torch.linalg.matrix_norm(full))
    norm = float(torch.linalg.matrix_norm(h2))
    relative = norm / h_norm if h_norm > 0 else (0.0 if norm == 0 else math.inf)
    return TrulyBadCondition(
        holds=relative <= rtol, norm=norm, relative=relative, hessian_norm=h_norm, rtol=rtol
    )
