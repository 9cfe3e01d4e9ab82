"""Widening schemes: frozen configs, and the planner that turns one into an Embedding.

A scheme says *how* to add neurons; :func:`plan` reads the network, checks the new
widths and returns the :class:`~torch_embed.Embedding` without touching the module.
Dispatch is a registry keyed on the config type (as ``torchao.quantize_`` does), so a
scheme is an object you can print, compare and pass around, or its name as a string.

============  ===================================================  ====================
scheme        what a new neuron is                                 kind
============  ===================================================  ====================
``Split``     a copy of a selected neuron; fan-out split α / 1-α    critical
``Null``      zero fan-in, bias β, zero fan-out                     critical [#]_
``Net2Net``   equal split over all copies of a neuron               critical
  noise > 0   ... plus ±N on paired fan-out copies                  output-preserving
``General``   any compatible embedding (index maps, coefficients)   as validated
``RandomPad`` random fan-in and fan-out (a baseline)                none
============  ===================================================  ====================

.. [#] when the next Linear has a bias or ``σ(β) = 0``; otherwise output-preserving.

The default, :data:`DEFAULT_SCHEME` (``Net2Net(noise=4.0)``), is for training on: the
copies' fan-out columns get exact symmetric noise, so the function is preserved to
rounding but the copies receive different gradients and become different units under
any optimizer. The symmetric critical split (``"split"``, ``Split(alpha=0.5)``) is for
landscape work: its copies keep equal gradients forever (they never separate).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

import torch
from torch import Tensor, nn

from torch_embed._order import ranked, tie_tolerance
from torch_embed._sequential import Layout, _read, check_wide_size
from torch_embed.embedding import Embedding, LayerMap

if TYPE_CHECKING:
    from torch_embed.graph.groups import WidthGroups

__all__ = [
    "DEFAULT_SCHEME",
    "General",
    "Net2Net",
    "Null",
    "RandomPad",
    "Scheme",
    "Split",
    "UnitRules",
    "plan",
    "plan_units",
    "resolve_widths",
]

Select: TypeAlias = (
    Literal["random", "cyclic", "norm"]
    | Sequence[int]
    | Sequence[Sequence[int]]
    | Mapping[int, Sequence[int]]
    | Mapping[str, Sequence[int]]
)
_SELECT_NAMES = ("random", "cyclic", "norm")


@dataclass(frozen=True)
class Split:
    """The paper's splitting embedding: new neurons are copies of selected neurons.

    Each new neuron is a one-step split ``T^α``: the selected neuron's fan-in row and
    bias are copied, its fan-out column ``w`` becomes ``(1-α)·w`` and the copy gets
    ``α·w``. Splitting the same neuron again splits its current share.

    Args:
        alpha: Any real number (``α`` outside ``[0, 1]`` is the *signed* split), a
            sequence ``(a_1, ..., a_k)`` summing to 1 for a k-way split (each selected
            neuron gets ``k - 1`` copies; the original keeps ``a_1``), or ``"random"``
            (one ``α ~ U(0, 1)`` per split, drawn from the generator).
        select: Which neurons to split: ``"random"`` (uniform without replacement while
            possible, with the generator), ``"cyclic"`` (0, 1, 2, ...: the Net2Net
            habit), ``"norm"`` (largest fan-out column norm first; norms equal within
            ``sqrt(eps)`` of the largest, as copies' are, in index order), or explicit indices:
            a sequence (when one hidden layer is widened), one sequence per hidden
            layer, or a ``{hidden_layer: indices}`` mapping (traced models: a sequence
            when one group grows, or ``{group name or alias: indices}``).

    Example:
        >>> Split(alpha=0.5, select="norm")
        Split(alpha=0.5, select='norm')
    """

    alpha: float | Sequence[float] | Literal["random"] = 0.5
    select: Select = "random"


@dataclass(frozen=True)
class Null:
    """The null embedding: new neurons with zero fan-in, bias ``β`` and zero fan-out.

    Args:
        bias: The new neurons' bias ``β``; they output the constant ``σ(β)``.
        fan_in_std: Standard deviation of a random fan-in (drawn from the generator).
            ``0`` (default) keeps the embedding critical; ``> 0`` gives trainable units
            that still preserve the function but are only output-preserving. Under ReLU
            a zero fan-in with ``β ≤ 0`` gives a unit that never learns: widen warns.
    """

    bias: float = 0.0
    fan_in_std: float = 0.0


@dataclass(frozen=True)
class Net2Net:
    """Net2WiderNet: replicate selected neurons and divide the fan-out by the copy count.

    Args:
        noise: Relative size of symmetric noise on the fan-out copies. ``0`` is an
            equal split (critical): the copies get equal gradients forever and never
            become different units. ``> 0`` adds ``+N`` and ``-N`` to pairs of copies of
            the same neuron, ``N = noise · w/c · ε`` with ``ε ~ N(0, 1)`` elementwise
            (``w`` the neuron's fan-out column, ``c`` its number of copies), so the
            function is still preserved (output-preserving, not critical: the rounding
            error grows with the noise) while the copies' symmetry is broken. A neuron
            with an odd number of copies keeps one copy noise-free. ``noise=4.0`` is
            :data:`DEFAULT_SCHEME`; larger noise separated the copies faster but made
            the loss jump after widening under SGD (``bench/RESULTS.md``).
        select: As in :class:`Split`; Net2Net's own choice is ``"random"``.

    Example:
        >>> Net2Net(noise=4.0)
        Net2Net(noise=4.0, select='random')
    """

    noise: float = 0.0
    select: Select = "random"


@dataclass(frozen=True)
class General:
    """A user-supplied general compatible embedding (JML 2022 §5), validated.

    Args:
        sources: One entry per hidden layer: ``None`` (unchanged) or a sequence giving,
            for each wide neuron, the narrow neuron it copies or ``-1`` for null. For a
            traced model: ``{group name or alias: sequence}`` (the group's rules apply).
        coefficients: ``None`` (equal split over each neuron's copies) or, per hidden
            layer, ``None``, a sequence/1-D tensor with one fan-out coefficient per wide
            neuron, or a ``(wide_next, wide)`` tensor (one per wide connection). For a
            traced model: ``{group name or alias: one coefficient per wide unit}``, or a
            ``(wide rows, wide)`` matrix for a group whose only reader is one Linear
            (rows: that Linear's wide output rows).
        null_bias: The null neurons' bias: one float for all, or one per hidden layer
            (traced model: ``{group name or alias: float}``).
    """

    sources: Sequence[Sequence[int] | None] | Mapping[str, Sequence[int]]
    coefficients: (
        Sequence[Sequence[float] | Tensor | None] | Mapping[str, Sequence[float] | Tensor] | None
    ) = None
    null_bias: float | Sequence[float] | Mapping[str, float] = 0.0


@dataclass(frozen=True)
class RandomPad:
    """A baseline, not an embedding: new neurons get a random fan-in and fan-out.

    Initialised like ``nn.Linear``'s default (uniform with bound ``1/sqrt(fan_in)``)
    times ``scale``. The function changes (kind ``none``); use it to compare against.
    """

    scale: float = 1.0


Scheme: TypeAlias = Split | Null | Net2Net | General | RandomPad

DEFAULT_SCHEME: Net2Net = Net2Net(noise=4.0)
"""The scheme :func:`~torch_embed.widen` and :func:`plan` use when none is given.

Exact symmetric fan-out noise on equal-split copies (output-preserving): the widened
network computes the same function up to rounding, and its copies separate under SGD
and under Adam with the mapped state, so the new width is used. Chosen by
``bench/warmstart.py``: with the optimizer state mapped, it reached the narrow network's
final loss in fewer steps than the wide network trained from scratch in the main
setting (0.87x with Adam, 0.56x with SGD; it tied with Adam's ``beta2=0.9``), where the
symmetric split took 1.37x (``bench/RESULTS.md``). For landscape work pass ``"split"``
(``Split(alpha=0.5)``, critical) instead.
"""
_BY_NAME: dict[str, Callable[[], Scheme]] = {
    "split": Split,
    "null": Null,
    "net2net": Net2Net,
    "random_pad": RandomPad,
}


def _as_scheme(scheme: Scheme | str) -> Scheme:
    if isinstance(scheme, str):
        try:
            return _BY_NAME[scheme.lower().replace("-", "_")]()
        except KeyError:
            raise ValueError(
                f"unknown scheme {scheme!r}; use one of {sorted(_BY_NAME)} or a config "
                f"object (Split, Null, Net2Net, General, RandomPad)"
            ) from None
    if type(scheme) not in _PLANNERS:
        raise TypeError(
            f"scheme must be a name or one of Split, Null, Net2Net, General, RandomPad; "
            f"got {type(scheme).__name__}"
        )
    return scheme


def _real(value: object, what: str, *, nonnegative: bool = False) -> float:
    """``value`` as a float, refusing what is not a finite real number (bools, strings)."""
    bound = " >= 0" if nonnegative else ""
    if isinstance(value, Tensor) and value.dim() == 0 and value.is_floating_point():
        value = float(value)
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(
            f"{what} must be a real number (an int or float){bound}, got "
            f"{type(value).__name__} {value!r}"
        )
    if not math.isfinite(value) or (nonnegative and value < 0):
        raise ValueError(f"{what} must be a finite number{bound}, got {value!r}")
    return float(value)


def _is_int(value: object) -> bool:
    """An integer (Python or numpy), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def resolve_widths(
    layout: Layout, new_widths: Sequence[int] | Mapping[int, int] | None
) -> tuple[int, ...]:
    """Check ``new_widths`` against the network and return one width per hidden layer.

    Raises:
        ValueError: Wrong count, a non-integer, an unknown hidden-layer index, or a
            width below the current one; the message says which.
    """
    current = layout.hidden_widths
    n = len(current)
    if new_widths is None:
        return current
    array: Any = new_widths
    if hasattr(array, "tolist") and hasattr(array, "ndim"):  # a tensor or numpy array
        if array.ndim != 1:
            raise ValueError(
                f"new_widths given as a {type(array).__name__} must be 1-D (one width per "
                f"hidden layer), got shape {tuple(array.shape)}"
            )
        new_widths = array.tolist()  # Python ints; float widths are refused below
    if isinstance(new_widths, Mapping):
        out = list(current)
        for key, value in new_widths.items():
            if not _is_int(key) or not 0 <= key < n:
                raise ValueError(
                    f"new_widths key {key!r} is not a hidden-layer index; the network has "
                    f"{n} hidden layers (indices 0..{n - 1})"
                )
            out[int(key)] = value
        items = list(enumerate(out))
    elif isinstance(new_widths, (str, bytes)) or not isinstance(new_widths, Sequence):
        raise ValueError(
            f"new_widths must be a sequence of {n} ints (one per hidden layer) or a "
            f"{{hidden_layer_index: width}} mapping, got {type(new_widths).__name__}"
        )
    else:
        if len(new_widths) != n:
            raise ValueError(
                f"new_widths has {len(new_widths)} entries but the network has {n} hidden "
                f"layers (widths {list(current)})"
            )
        items = list(enumerate(new_widths))
    result = []
    for l, w in items:
        if not _is_int(w):
            raise ValueError(
                f"new width of hidden layer {l} must be an int, got {type(w).__name__} {w!r}"
            )
        w = int(w)  # a numpy integer becomes a Python int
        if w < current[l]:
            raise ValueError(
                f"new width {w} of hidden layer {l} (fed by layer "
                f"{layout.hidden[l].linear}) is below its current width {current[l]}; "
                f"widen only adds neurons (see torch_embed.condense to remove them)"
            )
        result.append(w)
    return tuple(result)


def plan(
    module: nn.Module,
    new_widths: Sequence[int] | Mapping[int, int] | None,
    scheme: Scheme | str = DEFAULT_SCHEME,
    *,
    generator: torch.Generator | None = None,
) -> Embedding:
    """Plan an embedding of ``module`` into ``new_widths`` without changing the module.

    Args:
        module: An ``nn.Sequential`` MLP (see :func:`torch_embed.widen`).
        new_widths: One int per hidden layer, or ``{hidden_layer_index: width}``.
            ``None`` is allowed with a :class:`General` scheme (widths from its sources).
        scheme: A config object or its name (``"split"``, ``"null"``, ``"net2net"``,
            ``"random_pad"``: each name means the config's defaults). The default is
            :data:`DEFAULT_SCHEME`, ``Net2Net(noise=4.0)`` (output-preserving, for
            training on); ``"split"`` is the symmetric critical split.
        generator: The ``torch.Generator`` for random choices (CPU generator); ``None``
            uses the global RNG.

    Returns:
        The :class:`~torch_embed.Embedding`.

    Raises:
        TypeError: ``module`` cannot be widened (see :func:`torch_embed.widen`), or
            ``scheme`` or ``generator`` has the wrong type.
        ValueError: Bad ``new_widths`` or scheme arguments (non-finite numbers, indices
            out of range, ...).
    """
    layout, groups = _read(module)
    config = _as_scheme(scheme)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator or None, got {type(generator).__name__} "
            f"{generator!r} (for a seed, pass torch.Generator().manual_seed(seed))"
        )
    if new_widths is None and not isinstance(config, General):
        raise ValueError("new_widths may only be None with a General scheme")
    widths = resolve_widths(layout, new_widths)
    check_wide_size(module, layout, widths)
    planner = _PLANNERS[type(config)]
    return planner(config, module, layout, groups, widths, generator)


# ---------------------------------------------------------------------------- helpers
def _linear(module: nn.Module, name: str) -> nn.Linear:
    lin = module.get_submodule(name)
    assert isinstance(lin, nn.Linear)  # guaranteed by read_sequential
    return lin


def _null_value(module: nn.Module, layout: Layout, layer: int, bias: Tensor) -> Tensor:
    """σ(β) for each entry of ``bias``: run the hidden layer's activation chain."""
    if bias.numel() == 0:
        return torch.zeros(0, dtype=torch.float64)
    ref = _linear(module, layout.hidden[layer].linear).weight
    # element-wise activations hold no data: a module on "meta" is evaluated on the CPU
    device = torch.device("cpu") if ref.is_meta else ref.device
    x = bias.to(device=device, dtype=ref.dtype)[None, :]
    with torch.no_grad():
        for name in layout.hidden[layer].activations:
            act = module.get_submodule(name)
            if isinstance(act, nn.Dropout):
                continue  # constant units: dropout is the identity in expectation/eval
            x = act(x)
    value: Tensor = x[0].detach().to(device="cpu", dtype=torch.float64)
    return value


def _rand(n: int, generator: torch.Generator | None) -> Tensor:
    return torch.rand(n, generator=generator, dtype=torch.float64)


def _index_list(value: Any, where: str) -> list[int]:
    """Neuron indices from a sequence, numpy array or tensor; anything else is refused."""
    if hasattr(value, "tolist"):  # numpy arrays and tensors
        value = value.tolist()
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"select{where} must be a list of neuron indices, got {value!r}")
    for i in value:
        if not _is_int(i):
            raise ValueError(
                f"select{where} must hold neuron indices (ints), got {type(i).__name__} {i!r}"
            )
    return [int(i) for i in value]


def _explicit(select: Select, widened: list[int], n_hidden: int) -> dict[int, list[int]] | None:
    if isinstance(select, str):
        if select not in _SELECT_NAMES:
            raise ValueError(f"select={select!r} is not one of {_SELECT_NAMES} or explicit indices")
        return None
    if isinstance(select, Mapping):
        out = {}
        for k, v in select.items():
            if not _is_int(k) or not 0 <= int(k) < n_hidden:
                raise ValueError(
                    f"select key {k!r} is not a hidden-layer index (0..{n_hidden - 1})"
                )
            out[int(k)] = _index_list(v, f"[{k}]")
        return out
    items: list[Any] = select.tolist() if hasattr(select, "tolist") else list(select)
    if items and all(_is_int(i) for i in items):
        if len(widened) != 1:
            raise ValueError(
                f"select is a flat list of indices but {len(widened)} hidden layers are "
                f"widened ({widened}); give one list per hidden layer or a mapping"
            )
        return {widened[0]: [int(i) for i in items]}
    if any(_is_int(i) for i in items) or not all(
        v is None or hasattr(v, "tolist") or isinstance(v, Sequence) for v in items
    ):
        raise ValueError(
            f"select must be 'random', 'cyclic', 'norm', a list of neuron indices (ints), "
            f"one such list (or None) per hidden layer, or a {{hidden_layer: indices}} "
            f"mapping; got {select!r}"
        )
    if len(items) != n_hidden:
        raise ValueError(
            f"select needs one index list per hidden layer ({n_hidden}), got {len(items)}"
        )
    return {l: _index_list(v, f"[{l}]") for l, v in enumerate(items) if v is not None}


# ------------------------------------------------------------------- one unit planner
@dataclass(frozen=True)
class UnitRules:
    """What the readers of one hidden layer or width group allow (GROWTH.md §2).

    Read off a width group's constraints by :func:`torch_embed.graph.plan.group_rules`
    (an MLP's hidden groups have none: the default).

    Attributes:
        where: How messages name the layer (``"hidden layer 0"``, ``"width group 'c1'"``).
        unit: What messages call one of its units (``"neuron"``, ``"unit"``).
        uniform: Why every unit must be copied the same number of times (``"LayerNorm
            at `ln`"``); empty when nothing requires it.
        fill: The null units that keep ``uniform``'s norm exact at any width under the
            ``Null`` scheme (``"zero-fill"`` under RMSNorm, ``"mean-fill"`` under
            LayerNorm); empty when there are none (GroupNorm).
        segments: Copies stay in their source's segment (``segments`` contiguous equal
            parts), every segment grows by the same amount (GroupNorm, grouped conv).
        segmented: Why (``"grouped conv at `c` (groups=4)"``).
        no_copies: Why copies are refused (a sum over the units); empty: allowed.
        no_null: Why null units are refused (a max over the units); empty: allowed.
    """

    where: str
    unit: str = "neuron"
    uniform: str = ""
    segments: int = 1
    segmented: str = ""
    no_copies: str = ""
    no_null: str = ""
    fill: str = ""

    @property
    def uniform_rule(self) -> str:
        """What ``uniform`` allows: ``"uniform copies"``, ``"... or zero-fill"``, ..."""
        return "uniform copies" + (f" or {self.fill}" if self.fill else "")


def _kway(alpha: object) -> list[float] | None:
    """Check ``Split.alpha``; the k-way coefficients, or ``None`` for a two-way split."""
    if isinstance(alpha, str):
        if alpha != "random":
            raise ValueError(f"alpha={alpha!r}: use a number, a sequence or 'random'")
        return None
    if isinstance(alpha, Sequence):
        kway = [float(a) for a in alpha]
        if not all(math.isfinite(a) for a in kway):
            raise ValueError(f"a k-way alpha needs finite coefficients, got {kway}")
        if len(kway) < 2 or abs(sum(kway) - 1.0) > 1e-12:
            raise ValueError(
                f"a k-way alpha needs at least 2 coefficients summing to 1, got {kway}"
            )
        return kway
    if not isinstance(alpha, numbers.Real) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise ValueError(
            f"alpha must be a finite real number, a sequence or 'random'; got {alpha!r}"
        )
    return None


def _copies_per_unit(cfg: Scheme) -> int:
    """New units per selected unit: ``k - 1`` for a k-way split, else 1."""
    kway = _kway(cfg.alpha) if isinstance(cfg, Split) else None
    return len(kway) - 1 if kway is not None else 1


def plan_units(
    cfg: Scheme,
    m: int,
    w: int,
    rules: UnitRules,
    *,
    select: Sequence[int] | None = None,
    norms: Callable[[], tuple[Tensor, torch.dtype]] | None = None,
    sources: Tensor | None = None,
    coefficients: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """The units of one hidden layer or width group: who copies whom, with which share.

    The one planner of both paths: :func:`torch_embed.graph.plan.plan_maps` calls it
    per width group, for :func:`plan` (an MLP's hidden layers, every one) and
    :func:`torch_embed.graph.plan.plan_groups` (the grown groups of a traced model).
    What a scheme adds beyond the map of units is tensor-level: random fan-ins and
    random biases stay with each path; Net2Net's fan-out noise is one seed per
    embedding, drawn after the units, and added when the embedding is applied by the
    engine both paths share (:func:`torch_embed.graph.gather.map_tensors`).

    Args:
        cfg: The scheme.
        m: The narrow width.
        w: The new width (``>= m``).
        rules: What the readers allow; refusals name ``rules.where`` and the rule.
        select: Explicit indices of the units to copy (one per selected unit, so one per
            ``k - 1`` copies of a k-way split), overriding ``cfg.select``.
        norms: For ``select="norm"``: returns the fan-out norm of every narrow unit and
            the dtype of the weights they come from (for the tie tolerance).
        sources: :class:`General`: the narrow unit of every wide unit (``-1``: null).
        coefficients: :class:`General`: per-unit (or ``(wide_next, wide)``)
            coefficients; ``None`` gives each copy an equal share.
        generator: For the random choices (units, then ``α``).

    Returns:
        ``(source, coef)``: ``int64`` ``(w,)`` and ``float64`` ``(w,)`` (or the given
        matrix). Wide units are ordered segment by segment: its own units, then the new
        ones; null units have coefficient 0.

    Raises:
        ValueError: A width, selection or scheme the rules or the scheme forbid.

    Example:
        >>> src, coef = plan_units(Split(alpha=0.25, select="cyclic"), 3, 5,
        ...                        UnitRules("hidden layer 0"))
        >>> src.tolist(), coef.tolist()
        ([0, 1, 2, 0, 1], [0.75, 0.75, 1.0, 0.25, 0.25])
    """
    if isinstance(cfg, General):
        assert sources is not None  # the callers parse General.sources
        return _general_units(sources, coefficients, m, rules)
    extra = w - m
    null = isinstance(cfg, (Null, RandomPad))
    copies = 1 if null else _copies_per_unit(cfg)
    seg_count = rules.segments
    if extra and not null and rules.no_copies:
        raise ValueError(f"{rules.no_copies}; use Null")
    if extra and null and rules.no_null:
        raise ValueError(f"{rules.no_null}; use Split")
    if extra and null and rules.uniform:
        raise ValueError(
            f"{rules.uniform}: {rules.uniform_rule} (every unit copied the same number "
            f"of times); null units change its statistics ({rules.where})"
        )
    if rules.uniform and w % m:
        raise ValueError(
            f"{rules.uniform}: {rules.uniform_rule} (every unit copied the same number "
            f"of times): {rules.where} of {m} units cannot become {w}, which is not a "
            f"multiple of {m}"
        )
    if seg_count > 1 and (m % seg_count or extra % seg_count):
        raise ValueError(
            f"{rules.segmented}: every group must grow by the same amount, copies staying in "
            f"their source's group: {rules.where} of {m} units in {seg_count} groups cannot "
            f"gain {extra} (use a multiple of {seg_count})"
        )
    if extra % copies:
        raise ValueError(
            f"{rules.where} gains {extra} {rules.unit}s, not a multiple of {copies} (a "
            f"{copies + 1}-way split adds {copies} copies per {rules.unit})"
        )
    seg = m // seg_count
    count = extra // seg_count // copies  # selected units per segment
    if null:
        chosen: list[list[int]] = []
    elif rules.uniform:
        k = w // m
        if (k - 1) % copies:
            raise ValueError(
                f"{rules.uniform}: uniform copies: a {copies + 1}-way split cannot copy every "
                f"unit of {rules.where} {k} times"
            )
        if select is not None:
            raise ValueError(
                f"{rules.uniform}: {rules.uniform_rule} (every unit copied the same "
                f"number of times): explicit select indices cannot be used for {rules.where}"
            )
        chosen = [
            [u for _ in range((k - 1) // copies) for u in range(q * seg, (q + 1) * seg)]
            for q in range(seg_count)
        ]
    else:
        picker = cfg.select if isinstance(cfg, (Split, Net2Net)) else "random"
        chosen = _choose(picker, select, m, count, rules, norms, generator)
    # the source of each new unit, segment by segment; k - 1 in a row per k-way split
    picked = [s for units in chosen for s in units]
    if null:
        new_src = torch.full((extra,), -1, dtype=torch.int64)
    else:
        new_src = torch.tensor(picked, dtype=torch.int64).repeat_interleave(copies)
    own = torch.ones(m, dtype=torch.float64)
    new_coef = torch.zeros(extra, dtype=torch.float64)  # null units: 0
    if isinstance(cfg, Split):
        kway = _kway(cfg.alpha)
        coef = [1.0] * m  # Python floats: the same float64 arithmetic, without per-op overhead
        extra_coef = [0.0] * extra
        if kway is None:
            alphas = (
                _rand(len(picked), generator).tolist()
                if isinstance(cfg.alpha, str)
                else [float(cfg.alpha)] * len(picked)  # type: ignore[arg-type]
            )
        for t, s in enumerate(picked):
            share = coef[s]  # a unit chosen again splits its current share
            if kway is not None:
                coef[s] = share * kway[0]
                for r in range(copies):
                    extra_coef[t * copies + r] = kway[r + 1] * share
            else:
                a = alphas[t]
                coef[s] = (1 - a) * share
                extra_coef[t] = a * share
        own = torch.tensor(coef, dtype=torch.float64)
        new_coef = torch.tensor(extra_coef, dtype=torch.float64)
    elif isinstance(cfg, Net2Net):  # every copy 1/count
        counts = torch.bincount(new_src, minlength=m).to(torch.float64) + 1
        own, new_coef = 1.0 / counts, 1.0 / counts[new_src]
    if seg_count == 1:  # own units, then the new ones
        return torch.cat([torch.arange(m), new_src]), torch.cat([own, new_coef])
    per = extra // seg_count  # segment by segment: its own units, then its new ones
    src_parts, coef_parts = [], []
    for q in range(seg_count):
        src_parts += [torch.arange(q * seg, (q + 1) * seg), new_src[q * per : (q + 1) * per]]
        coef_parts += [own[q * seg : (q + 1) * seg], new_coef[q * per : (q + 1) * per]]
    return torch.cat(src_parts), torch.cat(coef_parts)


def _choose(
    picker: Select,
    select: Sequence[int] | None,
    m: int,
    count: int,
    rules: UnitRules,
    norms: Callable[[], tuple[Tensor, torch.dtype]] | None,
    generator: torch.Generator | None,
) -> list[list[int]]:
    """Per segment, the ``count`` narrow units to copy."""
    seg_count = rules.segments
    seg = m // seg_count
    if select is not None:
        wanted = count * seg_count
        if len(select) != wanted:
            raise ValueError(
                f"select gives {len(select)} {rules.unit}s for {rules.where}, but it gains "
                f"{wanted} new {rules.unit}s (with a k-way alpha, one index per group of k-1)"
            )
        for i in select:
            if not 0 <= i < m:
                raise ValueError(f"select index {i} is out of range for {rules.where} (width {m})")
        by_seg = [[int(i) for i in select if i // seg == q] for q in range(seg_count)]
        if any(len(units) != count for units in by_seg):
            raise ValueError(
                f"{rules.segmented}: every group must grow by the same amount, copies staying "
                f"in their source's group: select must give {count} indices in each group of "
                f"{seg} units of {rules.where}, got {[len(u) for u in by_seg]}"
            )
        return by_seg
    if picker == "norm":  # equal norms (copies, mirror images) up to rounding: lower index
        if norms is None:
            raise ValueError(f"select='norm' needs the fan-out norms of {rules.where}")
        values, dtype = norms()
        out = []
        for q in range(seg_count):
            part = values[q * seg : (q + 1) * seg].tolist()
            order = ranked(part, tol=tie_tolerance(part, dtype), descending=True)
            out.append([q * seg + order[i % seg] for i in range(count)])
        return out
    if picker not in ("cyclic", "random"):
        raise ValueError(f"select={picker!r} is not one of {_SELECT_NAMES} or explicit indices")
    return [
        [q * seg + i for i in _pick_units(seg, count, picker, generator)] for q in range(seg_count)
    ]


def _general_units(
    src: Tensor, coefficients: Tensor | None, m: int, rules: UnitRules
) -> tuple[Tensor, Tensor]:
    """Check a :class:`General` map against ``rules``; default coefficients: equal shares."""
    w = src.numel()
    valid = src >= 0
    counts = torch.bincount(src[valid], minlength=m)
    if rules.no_copies and bool((counts > 1).any()):
        raise ValueError(f"{rules.no_copies}; General.sources may only add null units (-1)")
    if rules.no_null and bool((~valid).any()):
        raise ValueError(f"{rules.no_null}; General.sources may only add copies")
    if rules.uniform and w > m:
        if bool((~valid).any()) or bool((counts != counts[0]).any()):
            raise ValueError(
                f"{rules.uniform}: {rules.uniform_rule} (every unit copied the same "
                f"number of times): General.sources for {rules.where} copies its units "
                f"{sorted(set(counts.tolist()))} times"
                + (" and adds null units" if bool((~valid).any()) else "")
            )
    if rules.segments > 1:
        seg, wide_seg = m // rules.segments, w // rules.segments
        pos = torch.arange(w) // max(wide_seg, 1)
        if w % rules.segments or bool((valid & (src // seg != pos)).any()):
            raise ValueError(
                f"{rules.segmented}: every group must grow by the same amount, copies staying "
                f"in their source's group: General.sources for {rules.where} must list "
                f"{rules.segments} equal parts of {wide_seg} units, each of copies of its "
                f"own group's {seg} units (or null units)"
            )
    if coefficients is not None:
        return src, coefficients
    c = counts.to(torch.float64)
    coef = torch.zeros(w, dtype=torch.float64)
    coef[valid] = 1.0 / c.clamp(min=1)[src[valid]]
    return src, coef


def _pick_units(
    m: int, count: int, select: Literal["cyclic", "random"], generator: torch.Generator | None
) -> list[int]:
    """``count`` indices into ``m`` units to copy, by ``select="cyclic"`` or ``"random"``.

    Cyclic: ``0, 1, ..., m-1, 0, ...``. Random: every unit once per full round, then
    ``count mod m`` units uniformly without replacement (one ``randperm`` from the
    generator). Shared by the MLP planner and the traced planner, so the same seed picks
    the same units on both paths.

    Example:
        >>> _pick_units(3, 5, "cyclic", None)
        [0, 1, 2, 0, 1]
        >>> r = _pick_units(3, 5, "random", torch.Generator().manual_seed(0))
        >>> len(r), sorted(set(r)), r[:3]
        (5, [0, 1, 2], [0, 1, 2])
    """
    if select == "cyclic":
        return [i % m for i in range(count)]
    full, rest = divmod(count, m)
    picks = [i for _ in range(full) for i in range(m)]
    perm = torch.randperm(m, generator=generator)[:rest]
    return picks + [int(i) for i in perm]


def _finish(
    module: nn.Module,
    layout: Layout,
    maps: Sequence[LayerMap],
    fan_in: Sequence[Tensor | None] | None = None,
    offsets: Sequence[Tensor | None] | None = None,
    null_bias: Sequence[Tensor] | None = None,
) -> Embedding:
    """The :class:`~torch_embed.Embedding` of the planned maps, with the MLP's tensors.

    A null neuron's constant output ``σ(β)`` comes from running the hidden layer's
    activations on ``β``; ``fan_in``, ``offsets`` and ``null_bias`` (RandomPad's random
    biases) are the schemes' tensor-level draws, made after the maps.
    """
    layers = []
    for l, lm in enumerate(maps):
        nb = lm.null_bias if null_bias is None else null_bias[l]
        nv = torch.zeros_like(nb)
        null = lm.source < 0
        if bool(null.any()):
            nv[null] = _null_value(module, layout, l, nb[null])
        layers.append(
            LayerMap(
                lm.source,
                lm.coef,
                nb,
                nv,
                fan_in[l] if fan_in else None,
                offsets[l] if offsets else None,
            )
        )
    return Embedding(layout, tuple(layers))


def _can_store_bias(module: nn.Module, layout: Layout, layer: int) -> bool:
    """Whether hidden layer ``layer`` has a place for a null neuron's bias β."""
    hidden = layout.hidden[layer]
    if hidden.batchnorm is not None:
        return module.get_submodule(hidden.batchnorm).bias is not None
    return layout.linears[layer].has_bias


# ---------------------------------------------------------------------------- planners
def _units(
    cfg: Scheme,
    module: nn.Module,
    layout: Layout,
    groups: WidthGroups,
    widths: tuple[int, ...],
    generator: torch.Generator | None,
    general: Mapping[str, tuple[Tensor, Tensor | None, float]] | None = None,
) -> list[LayerMap]:
    """The map of every hidden layer, planned on its width group by the traced planner.

    Hidden layer ``l`` is the width group named after its Linear; every hidden layer is
    planned, widened or not, so the random choices are drawn layer by layer as they
    always were on this path. Messages name ``"hidden layer l"``.
    """
    from torch_embed.graph.plan import plan_maps

    names = [h.linear for h in layout.hidden]
    explicit: dict[str, list[int]] | None = None
    if isinstance(cfg, (Split, Net2Net)):
        current = layout.hidden_widths
        widened = [l for l, (a, b) in enumerate(zip(current, widths)) if b > a]
        by_layer = _explicit(cfg.select, widened, len(current))
        if by_layer is not None:
            explicit = {names[l]: by_layer.get(l, []) for l in range(len(names))}
    maps, _ = plan_maps(
        groups,
        dict(zip(names, widths)),
        cfg,
        explicit=explicit,
        general=general,
        generator=generator,
        tensors={**dict(module.named_parameters()), **dict(module.named_buffers())},
        labels={n: f"hidden layer {l}" for l, n in enumerate(names)},
    )
    return [maps[n] for n in names]


def _plan_split(
    cfg: Split,
    module: nn.Module,
    layout: Layout,
    groups: WidthGroups,
    widths: tuple[int, ...],
    generator: torch.Generator | None,
) -> Embedding:
    _kway(cfg.alpha)
    maps = _units(cfg, module, layout, groups, widths, generator)
    return _finish(module, layout, maps)


def _plan_null(
    cfg: Null,
    module: nn.Module,
    layout: Layout,
    groups: WidthGroups,
    widths: tuple[int, ...],
    generator: torch.Generator | None,
) -> Embedding:
    _real(cfg.fan_in_std, "Null.fan_in_std", nonnegative=True)
    _real(cfg.bias, "Null.bias")
    current = layout.hidden_widths
    wide = layout.widths[:1] + widths
    maps = _units(cfg, module, layout, groups, widths, generator)
    fan_in: list[Tensor | None] = []
    for l, (m, w) in enumerate(zip(current, widths)):
        if cfg.fan_in_std > 0 and w > m:
            f = torch.zeros(w, wide[l], dtype=torch.float64)
            f[m:] = cfg.fan_in_std * torch.randn(
                w - m, wide[l], generator=generator, dtype=torch.float64
            )
            fan_in.append(f)
        else:
            fan_in.append(None)
    return _finish(module, layout, maps, fan_in)


def _plan_net2net(
    cfg: Net2Net,
    module: nn.Module,
    layout: Layout,
    groups: WidthGroups,
    widths: tuple[int, ...],
    generator: torch.Generator | None,
) -> Embedding:
    _real(cfg.noise, "Net2Net.noise", nonnegative=True)
    maps = _units(cfg, module, layout, groups, widths, generator)
    emb = _finish(module, layout, maps)
    if cfg.noise == 0:
        return emb
    # the noise itself is drawn when the embedding is applied, from this seed, by the
    # gather engine both paths share (torch_embed.graph.gather.map_tensors); no pair
    # of copies (nothing added, or single copies): no noise, so the embedding stays
    # critical and decomposes into steps like an equal split
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return replace(emb, noise=float(cfg.noise), seed=seed) if emb._noisy() else emb


def _plan_general(
    cfg: General,
    module: nn.Module,
    layout: Layout,
    groups: WidthGroups,
    widths: tuple[int, ...],
    generator: torch.Generator | None,
) -> Embedding:
    """Parse the per-hidden-layer form of :class:`General` and plan it on the groups."""
    current = layout.hidden_widths
    n = len(current)
    if any(isinstance(v, Mapping) for v in (cfg.sources, cfg.coefficients, cfg.null_bias)):
        raise ValueError(
            "General given by group name (a mapping) is for traced models: widen with "
            "widths by group name and example_inputs, or give an nn.Sequential MLP one "
            f"entry per hidden layer ({n})"
        )
    if len(cfg.sources) != n:
        raise ValueError(
            f"General.sources needs one entry per hidden layer ({n}), got {len(cfg.sources)}"
        )
    sources = []
    for l, (m, s) in enumerate(zip(current, cfg.sources)):
        values: Any = s
        if hasattr(values, "tolist"):  # numpy arrays, tensors
            values = values.tolist()
        if values is not None and (
            isinstance(values, (str, bytes))
            or not isinstance(values, Sequence)
            or not all(_is_int(i) for i in values)
        ):
            raise ValueError(
                f"General.sources[{l}] must be None or a list of ints (for each wide neuron, "
                f"the narrow neuron it copies or -1 for a null neuron), got {s!r}"
            )
        sources.append(
            torch.arange(m) if values is None else torch.tensor(values, dtype=torch.int64)
        )
    for l, (src, w) in enumerate(zip(sources, widths)):
        if w != current[l] and w != src.numel():
            raise ValueError(
                f"hidden layer {l}: new_widths says {w} but General.sources gives "
                f"{src.numel()} neurons"
            )
    coef_in: Any = cfg.coefficients if cfg.coefficients is not None else [None] * n
    if len(coef_in) != n:
        raise ValueError(f"General.coefficients needs one entry per hidden layer ({n})")
    nb_in: Any = cfg.null_bias
    per_layer = list(nb_in) if isinstance(nb_in, Sequence) else [nb_in] * n
    if len(per_layer) != n or not all(math.isfinite(float(b)) for b in per_layer):
        raise ValueError(
            f"General.null_bias must be one finite number, or one per hidden layer ({n}); "
            f"got {nb_in!r}"
        )
    general = {}
    for l, (h, src, c) in enumerate(zip(layout.hidden, sources, coef_in)):
        given = (
            None if c is None else torch.as_tensor(c, dtype=torch.float64).detach().clone().cpu()
        )
        general[h.linear] = (src, given, float(per_layer[l]))
    wide = tuple(src.numel() for src in sources)
    maps = _units(cfg, module, layout, groups, wide, generator, general)
    return _finish(module, layout, maps)


def _plan_random_pad(
    cfg: RandomPad,
    module: nn.Module,
    layout: Layout,
    groups: WidthGroups,
    widths: tuple[int, ...],
    generator: torch.Generator | None,
) -> Embedding:
    _real(cfg.scale, "RandomPad.scale")
    current = layout.hidden_widths
    wide = layout.widths[:1] + widths + layout.widths[-1:]
    maps = _units(cfg, module, layout, groups, widths, generator)
    nbs = []
    fan_in: list[Tensor | None] = []
    offsets: list[Tensor | None] = []
    for l, (m, w) in enumerate(zip(current, widths)):
        bound_in = cfg.scale / math.sqrt(wide[l])
        f = torch.zeros(w, wide[l], dtype=torch.float64)
        f[m:] = (
            2 * torch.rand(w - m, wide[l], generator=generator, dtype=torch.float64) - 1
        ) * bound_in
        fan_in.append(f)
        nb = torch.zeros(w, dtype=torch.float64)
        nb[m:] = (2 * _rand(w - m, generator) - 1) * bound_in
        if not _can_store_bias(module, layout, l):
            nb.zero_()  # a bias-free layer has no place for it
        nbs.append(nb)
        bound_out = cfg.scale / math.sqrt(w)
        off = torch.zeros(wide[l + 2], w, dtype=torch.float64)
        off[:, m:] = (
            2 * torch.rand(wide[l + 2], w - m, generator=generator, dtype=torch.float64) - 1
        ) * bound_out
        offsets.append(off)
    return _finish(module, layout, maps, fan_in, offsets, nbs)


_PLANNERS: dict[type, Callable[..., Embedding]] = {
    Split: _plan_split,
    Null: _plan_null,
    Net2Net: _plan_net2net,
    General: _plan_general,
    RandomPad: _plan_random_pad,
}
