"""Hypothesis strategies for the generated property tests (tests/test_properties.py).

Built on the case tables of :mod:`cases` (architectures, activations, seeded nets and
random General maps); this module adds what the property tests draw on top of them:

* :func:`widenings`: a scheme *config* (``Split``, ``Null``, ``Net2Net``, ``General``,
  ``RandomPad``) with its new widths, drawn so that hypothesis prints the exact call
  to reproduce, and the kind and the dead-unit warning the library must report,
  predicted from the architecture alone (not from the library's output).
* :data:`OPTIMIZERS` and :func:`optimizer_kwargs`: the optimizer table. One row per
  optimizer class and hyperparameter family; a row whose class is not (yet) in
  :data:`torch_embed.SUPPORTED_OPTIMIZERS` is left out until it is, so supporting a
  new optimizer in the library turns its property test on, and adding a variant is
  one line.
* :data:`LOSSES`: losses of the network's outputs used for gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from cases import ACTIVATIONS, Arch, random_coefficients, random_sources
from hypothesis import strategies as st
from torch import Tensor, nn

from torch_embed import SUPPORTED_OPTIMIZERS
from torch_embed.embedding import EmbeddingKind
from torch_embed.schemes import General, Net2Net, Null, RandomPad, Scheme, Split

CRIT = EmbeddingKind.CRITICAL
OUT = EmbeddingKind.OUTPUT_PRESERVING
NONE = EmbeddingKind.NONE

FAMILIES = ("split", "split_kway", "null", "net2net", "general", "random_pad")
"""Every scheme family :func:`widenings` draws."""

DEAD_UNIT = r"never learn"
"""The message of widen's warning about null ReLU units with zero fan-in and β <= 0."""


# ----------------------------------------------------------------------------- schemes
@dataclass(frozen=True)
class Widening:
    """A drawn widening: what to pass to ``widen`` and what the library must report.

    Attributes:
        family: One of :data:`FAMILIES`.
        scheme: The scheme config, passed as is.
        new_widths: What to pass as ``new_widths``: a list or tuple of one width per
            hidden layer, a ``{hidden_layer: width}`` mapping of the widened layers, or
            ``None`` (only for ``General``).
        kind: The kind the embedding must have, or ``None`` where it depends on
            numbers not predicted here (matrix coefficients of ``General``).
        dead_unit_warning: Whether widen must warn that null ReLU units never learn.
    """

    family: str
    scheme: Scheme
    new_widths: Sequence[int] | Mapping[int, int] | None
    kind: EmbeddingKind | None
    dead_unit_warning: bool


def sigma(activation: str, beta: float) -> float:
    """The constant output ``σ(β)`` of a null neuron (activation evaluated in float64)."""
    with torch.no_grad():
        act = ACTIVATIONS[activation].make().to(torch.float64)
        return float(act(torch.tensor([beta], dtype=torch.float64))[0])


def _null_kind(arch: Arch, null_layers: Mapping[int, float]) -> EmbeddingKind:
    """Critical iff every layer with null neurons feeds a biased Linear or has σ(β) = 0.

    A null neuron outputs the constant ``σ(β)``; its fan-out column's gradient is
    ``σ(β)`` times the next layer's bias gradient, which only exists with a bias.
    """
    for l, beta in null_layers.items():
        if not arch.bias[l + 1] and sigma(arch.activation[l], beta) != 0.0:
            return OUT
    return CRIT


def _dead_units(arch: Arch, null_layers: Mapping[int, float]) -> bool:
    return any(
        arch.activation[l] in ("ReLU", "ReLU6") and beta <= 0 for l, beta in null_layers.items()
    )


def _extras(draw: st.DrawFn, n: int, max_extra: int, *, grow: bool) -> list[int]:
    """New neurons per hidden layer; with ``grow``, at least one layer grows."""
    extra = [draw(st.integers(0, max_extra)) for _ in range(n)]
    if grow and sum(extra) == 0:
        extra[draw(st.integers(0, n - 1))] = draw(st.integers(1, max_extra))
    return extra


def _select(draw: st.DrawFn, hidden: Sequence[int], picks: Sequence[int]) -> Any:
    """A ``select`` argument for ``picks[l]`` neurons in hidden layer ``l``, any form."""
    form = draw(st.sampled_from(("random", "cyclic", "norm", "per_layer", "mapping", "flat")))
    if form in ("random", "cyclic", "norm"):
        return form
    chosen = [
        draw(st.lists(st.integers(0, m - 1), min_size=c, max_size=c)) for m, c in zip(hidden, picks)
    ]
    widened = [l for l, c in enumerate(picks) if c]
    if form == "flat" and len(widened) == 1:
        return chosen[widened[0]]
    if form == "mapping":
        return {l: chosen[l] for l in widened}
    return [c if c else draw(st.sampled_from(([], None))) for c in chosen]


def critical_matrix(
    src: Sequence[int], src_next: Sequence[int], beta_next: Tensor, g: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Matrix coefficients ``C = 1 vᵀ + u wᵀ`` of a critical General layer, and ``v``.

    ``C`` is ``(len(src_next), len(src))``: one row per wide neuron of the next layer.
    ``v`` are vector coefficients (summing to 1 over the copies of each narrow neuron),
    ``w`` sums to 0 over those copies (every row still sums to 1: the output is kept),
    and ``u`` satisfies ``Σ_{i ∈ copies(s)} β_i u_i = 0`` for each narrow neuron ``s`` of
    the next layer with error scalings ``β = beta_next``: the backward condition, with
    error scalings ``v`` for this layer (JML 2022 §5; cases.critical_matrix_general is
    one fixed instance). Rows differ whenever a next-layer neuron has two copies.
    """
    f64 = torch.float64
    s, sn = torch.tensor(list(src)), torch.tensor(list(src_next))
    v = torch.tensor(random_coefficients(src, g), dtype=f64)
    w = torch.randn(len(src), generator=g, dtype=f64)
    w[s < 0] = 0.0
    for j in set(src) - {-1}:
        w[s == j] -= w[s == j].mean()
    u = torch.randn(len(src_next), generator=g, dtype=f64)
    u[sn < 0] = 0.0
    for i in set(src_next) - {-1}:
        b, ui = beta_next[sn == i], u[sn == i]
        norm = float((b * b).sum())
        u[sn == i] = ui - b * float((b * ui).sum()) / norm if norm > 0 else 0.0
    return v[None, :] + u[:, None] * w[None, :], v


def _as_arg(draw: st.DrawFn, hidden: Sequence[int], widths: Sequence[int]) -> Any:
    """``new_widths`` in one of the accepted forms: list, tuple or a mapping of changes."""
    form = draw(st.sampled_from(("list", "tuple", "mapping")))
    if form == "mapping":
        return {l: w for l, (m, w) in enumerate(zip(hidden, widths)) if w != m}
    return list(widths) if form == "list" else tuple(widths)


_BETA = st.one_of(st.just(0.0), st.floats(0.05, 1.5), st.floats(-1.5, -0.05))
"""Null biases: 0, or bounded away from 0 (a β of 1e-300 would give σ(β) = 0 in one
dtype and not in another, and the kind is then a property of rounding)."""


@st.composite
def widenings(
    draw: st.DrawFn,
    arch: Arch,
    *,
    families: Sequence[str] = FAMILIES,
    critical_only: bool = False,
    max_extra: int = 4,
) -> Widening:
    """Hypothesis strategy: a :class:`Widening` of networks of ``arch``.

    Args:
        arch: The narrow architecture.
        families: Scheme families to draw from.
        critical_only: Leave out the options that are output-preserving by design
            (fan-in noise, Net2Net noise, matrix coefficients). Null neurons with
            ``σ(β) != 0`` before a bias-free Linear can still make the kind
            output-preserving: :attr:`Widening.kind` says so.
        max_extra: The most neurons added to one hidden layer (k-way: groups of k-1).
    """
    family = draw(st.sampled_from(list(families)))
    hidden = list(arch.hidden)
    n = len(hidden)
    storable = all(arch.can_store_bias(l) for l in range(n))

    if family == "split":
        extra = _extras(draw, n, max_extra, grow=False)
        alpha = draw(st.one_of(st.floats(-2.5, 3.5), st.sampled_from((0.0, 0.5, 1.0, "random"))))
        scheme: Scheme = Split(alpha, _select(draw, hidden, extra))
        widths = [m + e for m, e in zip(hidden, extra)]
        return Widening(family, scheme, _as_arg(draw, hidden, widths), CRIT, False)

    if family == "split_kway":
        k = draw(st.integers(3, 4)) if draw(st.booleans()) else 2
        rest = [draw(st.floats(-1.0, 2.0)) for _ in range(k - 1)]
        alphas = (1.0 - sum(rest), *rest)
        groups = _extras(draw, n, max(1, max_extra // (k - 1)), grow=False)
        widths = [m + g * (k - 1) for m, g in zip(hidden, groups)]
        scheme = Split(alphas, _select(draw, hidden, groups))
        return Widening(family, scheme, _as_arg(draw, hidden, widths), CRIT, False)

    if family == "null":
        extra = _extras(draw, n, max_extra, grow=True)
        beta = draw(_BETA) if all(arch.can_store_bias(l) for l, e in enumerate(extra) if e) else 0.0
        fan_in_std = 0.0 if critical_only else draw(st.sampled_from((0.0, 0.0, 0.3, 1.0)))
        nulls = {l: beta for l, e in enumerate(extra) if e}
        kind = OUT if fan_in_std > 0 else _null_kind(arch, nulls)
        dead = fan_in_std == 0 and _dead_units(arch, nulls)
        scheme = Null(bias=beta, fan_in_std=fan_in_std)
        widths = [m + e for m, e in zip(hidden, extra)]
        return Widening(family, scheme, _as_arg(draw, hidden, widths), kind, dead)

    if family == "net2net":
        extra = _extras(draw, n, max_extra, grow=False)
        noise = 0.0 if critical_only else draw(st.sampled_from((0.0, 0.1, 0.5, 2.0)))
        # every new neuron is a copy of a neuron that then has >= 2 copies: a ±N pair
        kind = OUT if noise > 0 and sum(extra) > 0 else CRIT
        scheme = Net2Net(noise, _select(draw, hidden, extra))
        widths = [m + e for m, e in zip(hidden, extra)]
        return Widening(family, scheme, _as_arg(draw, hidden, widths), kind, False)

    if family == "general":
        g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
        sources: list[list[int] | None] = []
        forms: list[str | None] = []
        widths: list[int] = []
        for m in hidden:
            e = draw(st.one_of(st.none(), st.integers(0, 3)))
            src = None if e is None else random_sources(m, m + e, g, null=True)
            sources.append(src)
            widths.append(m if src is None else len(src))
            choice = ("equal", "vector", "vector", "matrix_critical", "matrix")
            form = None if src is None else draw(st.sampled_from(choice))
            forms.append("matrix_critical" if form == "matrix" and critical_only else form)
        # coefficients from the last hidden layer back: a critical matrix needs the error
        # scalings of the next layer, which are that layer's (vector part of) coefficients
        coefs: list[Any] = [None] * n
        beta_next = torch.ones(arch.out_features, dtype=torch.float64)
        src_next = list(range(arch.out_features))
        for l in reversed(range(n)):
            src, form = sources[l], forms[l]
            if src is None:
                beta_next = torch.ones(hidden[l], dtype=torch.float64)
                src_next = list(range(hidden[l]))
                continue
            if form == "equal":
                counts = torch.bincount(
                    torch.tensor([i for i in src if i >= 0]), minlength=hidden[l]
                )
                beta = torch.tensor([1 / float(counts[i]) if i >= 0 else 0.0 for i in src])
            elif form == "vector":
                coefs[l] = random_coefficients(src, g)
                beta = torch.tensor(coefs[l], dtype=torch.float64)
            elif form == "matrix_critical":
                coefs[l], beta = critical_matrix(src, src_next, beta_next, g)
            else:
                coefs[l] = torch.tensor(
                    [random_coefficients(src, g) for _ in src_next], dtype=torch.float64
                )
                beta = torch.ones(len(src), dtype=torch.float64)  # kind not predicted
            beta_next, src_next = beta.to(torch.float64), src
        matrix = "matrix" in forms
        per_layer = draw(st.booleans())
        betas = (
            [draw(_BETA) if arch.can_store_bias(l) else 0.0 for l in range(n)]
            if per_layer
            else [draw(_BETA) if storable else 0.0] * n
        )
        null_bias: float | list[float] = betas if per_layer else betas[0]
        nulls = {l: betas[l] for l, s in enumerate(sources) if s is not None and -1 in s}
        kind = None if matrix else _null_kind(arch, nulls)
        scheme = General(sources, coefs if any(c is not None for c in coefs) else None, null_bias)
        pass_widths = None if draw(st.booleans()) else _as_arg(draw, hidden, widths)
        return Widening(family, scheme, pass_widths, kind, _dead_units(arch, nulls))

    if family == "random_pad":
        extra = _extras(draw, n, max_extra, grow=True)
        scale = draw(st.sampled_from((0.25, 1.0, 2.0)))
        widths = [m + e for m, e in zip(hidden, extra)]
        return Widening(family, RandomPad(scale), _as_arg(draw, hidden, widths), NONE, False)

    raise AssertionError(family)


# ----------------------------------------------------------------------------- optimizers
@dataclass(frozen=True)
class OptimizerRow:
    """One optimizer variant: its class and a hypothesis strategy per keyword argument.

    Attributes:
        name: Labels the row in test ids.
        cls: The optimizer class.
        kwargs: Keyword arguments; a plain value stands for itself.
        same_in_groups: Arguments of :data:`PER_GROUP` that enter this optimizer's
            state, so that both groups get the same value (Rprop's ``lr`` is its initial
            ``step_size``).
        approximate: A regex of the :class:`torch_embed.ApproximateStateWarning` that
            ``widen`` may raise for this row: the map is exact only in a limit the row's
            arguments approach (Adamax's ``exp_inf`` and Adadelta's ``acc_delta`` for
            ``eps -> 0``); the test
            then checks the state against the replay all the same.
    """

    name: str
    cls: type[torch.optim.Optimizer]
    kwargs: Mapping[str, Any]
    same_in_groups: frozenset[str] = frozenset()
    approximate: str | None = None

    def strategy(self) -> st.SearchStrategy[dict[str, Any]]:
        """A strategy of keyword arguments (``params`` aside) for this row."""
        return st.fixed_dictionaries(
            {
                k: v if isinstance(v, st.SearchStrategy) else st.just(v)
                for k, v in self.kwargs.items()
            }
        )


def _row(
    name: str,
    cls: type[torch.optim.Optimizer],
    same_in_groups: tuple[str, ...] = (),
    approximate: str | None = None,
    **kwargs: Any,
) -> OptimizerRow:
    return OptimizerRow(name, cls, kwargs, frozenset(same_in_groups), approximate)


PER_GROUP = ("lr", "lr_decay", "weight_decay")
"""Arguments that may differ between param groups in the generated cases: they do not
enter the state (learning rates; weight decay, which is decoupled in the rows that set
it), except where a row lists them in ``same_in_groups`` (Rprop's ``lr``). Those that do
(betas, momentum, ...) are the same in every group: where they differ, a null neuron's
fan-out state cannot be derived from the next layer's bias state and widen refuses
(tests/test_properties.py has that case on its own)."""

_B = st.tuples(st.sampled_from((0.0, 0.5, 0.9)), st.sampled_from((0.9, 0.999)))
_BOOL = st.booleans()
_MOMENTUM = st.sampled_from((0.5, 0.9))
_DAMPENING = st.sampled_from((0.0, 0.3))
_ALPHA = st.sampled_from((0.9, 0.99))
_DECAY = st.sampled_from((0.0, 0.01))
_INIT = st.sampled_from((0.0, 0.3))
_O = torch.optim

# One line per optimizer variant. Coupled weight_decay is left out on purpose: widen
# warns that its state does not map like a gradient (THEORY §8), so it is not exact.
OPTIMIZERS: tuple[OptimizerRow, ...] = (
    _row("sgd_momentum", _O.SGD, lr=0.1, momentum=_MOMENTUM, dampening=_DAMPENING),
    _row("sgd_nesterov", _O.SGD, lr=0.1, momentum=_MOMENTUM, nesterov=True),
    _row("adam", _O.Adam, lr=0.01, betas=_B, amsgrad=_BOOL),
    _row("adamw", _O.AdamW, lr=0.01, betas=_B, weight_decay=0.1, amsgrad=_BOOL),
    _row("rmsprop", _O.RMSprop, lr=0.01, alpha=_ALPHA, centered=_BOOL),
    _row("adagrad", _O.Adagrad, lr=0.1, lr_decay=_DECAY, initial_accumulator_value=_INIT),
    # not in SUPPORTED_OPTIMIZERS when this was written (issue 11 §4): tested once they are
    _row("nadam", _O.NAdam, lr=0.01, betas=_B),
    _row("radam", _O.RAdam, lr=0.01, betas=_B),
    # exp_inf maps exactly for eps=0 only, where a zero gradient (a dead or null unit)
    # makes Adamax divide 0 by 0: a tiny eps puts the bound |1-|s||·eps far below
    # rounding, and the warning is expected (the eps = 1e-3 bound: test_optim_state.py)
    _row("adamax", _O.Adamax, approximate="exp_inf", lr=0.01, betas=_B, eps=1e-30),
    # acc_delta maps exactly in the limit eps << s²·square_avg only: a tiny eps, and the
    # warning (its eps = 1e-6 case: test_optim_state.py) is expected
    _row("adadelta", _O.Adadelta, approximate="acc_delta", lr=1.0, rho=_ALPHA, eps=1e-30),
    _row("rprop", _O.Rprop, same_in_groups=("lr",), lr=0.01),
    _row("asgd", _O.ASGD, lr=0.01, t0=st.sampled_from((0.0, 1.0, 1e6))),
)
"""Every optimizer variant the state-mapping property test knows how to build."""


def supported_rows() -> tuple[OptimizerRow, ...]:
    """The rows of :data:`OPTIMIZERS` whose class the library says it supports."""
    return tuple(r for r in OPTIMIZERS if r.cls in SUPPORTED_OPTIMIZERS)


@st.composite
def optimizer_kwargs(draw: st.DrawFn, row: OptimizerRow) -> tuple[dict[str, Any], dict[str, Any]]:
    """Keyword arguments of two param groups of ``row``; they differ in :data:`PER_GROUP` only."""
    first = {**draw(row.strategy()), "foreach": draw(_BOOL)}
    second = dict(first)
    for key in PER_GROUP:
        if key in first and key not in row.same_in_groups:
            second[key] = draw(st.sampled_from((0.0, 0.5, 2.0))) * first[key]
    return first, second


# ----------------------------------------------------------------------------- losses
def _mse(out: Tensor, y: Tensor) -> Tensor:
    return nn.functional.mse_loss(out, y)


def _sse(out: Tensor, y: Tensor) -> Tensor:
    return 0.5 * ((out - y) ** 2).sum()


def _cross_entropy(out: Tensor, y: Tensor) -> Tensor:
    # soft targets from y: every class has a non-zero probability
    if out.shape[1] == 1:
        return nn.functional.binary_cross_entropy_with_logits(out, torch.sigmoid(y))
    return nn.functional.cross_entropy(out, y.softmax(dim=1))


LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "mse": _mse,
    "sse": _sse,
    "cross_entropy": _cross_entropy,
}
"""Losses of the outputs: the gradient map holds for any loss of the network's output."""
