"""Assertions for testing widening code, in the style of ``torch.testing.assert_close``.

Each helper raises :class:`AssertionError` with a message that says what was compared,
how many elements are off, the worst one (index, actual and expected values, the error
allowed there) and which parameter it belongs to. Tolerances are keyword-only; ``rtol``
and ``atol`` must be given together or not at all; ``msg`` replaces the generated
message (a string) or edits it (a callable that receives the generated message). Every
helper sets ``__tracebackhide__`` so pytest points at the calling test, not here.

* :func:`assert_function_preserved`: ``widened(x)`` equals ``reference(x)`` (by
  default to a rigorous floating-point error bound);
* :func:`assert_gradients_mapped`: ``∇R_wide = B ∇R_narrow``, parameter by parameter;
* :func:`assert_critical`: ``‖∇R‖₂ <= gtol``;
* :func:`assert_inertia_nondecreasing`: no Hessian inertia count went down;
* :func:`assert_embedding_nondecreasing`: computes both inertias, then the above.

A pytest plugin with fixtures for such tests (a seeded generator, an MLP factory, a
``float64`` default dtype, small regression sets) ships as
:mod:`torch_embed.pytest_plugin`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal, NoReturn, TypeAlias

import torch
from torch import Tensor, nn

if TYPE_CHECKING:  # pragma: no cover - imported lazily at run time
    from torch_embed.embedding import Embedding
    from torch_embed.inertia import Inertia

__all__ = [
    "assert_critical",
    "assert_embedding_nondecreasing",
    "assert_function_preserved",
    "assert_gradients_mapped",
    "assert_inertia_nondecreasing",
    "default_dtype",
    "default_tolerances",
]

Message: TypeAlias = "str | Callable[[str], str] | None"
LossFn: TypeAlias = Callable[[Any, Any], Tensor]
Count: TypeAlias = Literal["negative", "zero", "positive"]

# torch.testing.assert_close's defaults for floating dtypes: (rtol, atol).
_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-5),
    torch.float32: (1.3e-6, 1e-5),
    torch.float64: (1e-7, 1e-7),
}
# Default gradient-norm thresholds for assert_critical, per parameter dtype.
_GTOL: dict[torch.dtype, float] = {
    torch.float16: 1e-2,
    torch.bfloat16: 1e-1,
    torch.float32: 1e-4,
    torch.float64: 1e-8,
}
_DIGITS: dict[torch.dtype, int] = {
    torch.float16: 5,
    torch.bfloat16: 4,
    torch.float32: 9,
    torch.float64: 17,
}


# ---------------------------------------------------------------------------- small tools
def default_tolerances(*dtypes: torch.dtype) -> tuple[float, float]:
    """``(rtol, atol)`` used when none are given: ``torch.testing``'s, least precise wins.

    Args:
        *dtypes: The dtypes being compared (non-float dtypes count as ``float32``).

    Example:
        >>> default_tolerances(torch.float64)
        (1e-07, 1e-07)
        >>> default_tolerances(torch.float64, torch.float32)
        (1.3e-06, 1e-05)
    """
    pairs = [_TOLERANCES.get(d, _TOLERANCES[torch.float32]) for d in dtypes] or [
        _TOLERANCES[torch.float32]
    ]
    return max(p[0] for p in pairs), max(p[1] for p in pairs)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[torch.dtype]:
    """Set ``torch``'s default dtype inside a ``with`` block and restore it afterwards.

    The ``float64`` fixture of :mod:`torch_embed.pytest_plugin` is this context.

    Example:
        >>> with default_dtype(torch.float64):
        ...     torch.zeros(1).dtype
        torch.float64
        >>> torch.zeros(1).dtype
        torch.float32
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"default_dtype needs a floating torch.dtype, got {dtype!r}")
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield dtype
    finally:
        torch.set_default_dtype(old)


def _check_pair(rtol: float | None, atol: float | None) -> None:
    if (rtol is None) != (atol is None):
        given, missing = ("rtol", "atol") if atol is None else ("atol", "rtol")
        raise ValueError(
            f"{given} was given without {missing}: pass both rtol and atol, or neither "
            f"(then the default tolerance is used)"
        )
    for name, value in (("rtol", rtol), ("atol", atol)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
        if not value >= 0 or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _check_msg(msg: Message) -> None:
    if msg is not None and not isinstance(msg, str) and not callable(msg):
        raise TypeError(
            f"msg must be a str, a callable taking the generated message, or None; "
            f"got {type(msg).__name__}"
        )


def _fail(generated: str, msg: Message) -> NoReturn:
    __tracebackhide__ = True
    if msg is None:
        raise AssertionError(generated)
    if isinstance(msg, str):
        raise AssertionError(msg)
    raise AssertionError(msg(generated))


def _fmt(value: float, dtype: torch.dtype) -> str:
    return f"{value:.{_DIGITS.get(dtype, 9)}g}"


def _index(flat: int, shape: Sequence[int]) -> tuple[int, ...]:
    out = []
    for size in reversed(shape):
        out.append(flat % size)
        flat //= size
    return tuple(reversed(out))


def _mismatch(
    actual: Tensor, expected: Tensor, allowed: Tensor, what: str = "tensor"
) -> str | None:
    """Describe where ``|actual - expected| > allowed``; ``None`` if nowhere.

    All three are compared in ``float64`` on the CPU; equal infinities match, a NaN
    never does.
    """
    if tuple(actual.shape) != tuple(expected.shape):
        return (
            f"{what}: shapes differ: actual {tuple(actual.shape)}, expected {tuple(expected.shape)}"
        )
    dtype = actual.dtype if actual.is_floating_point() else torch.float64
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    tol = allowed.detach().to("cpu", torch.float64).expand_as(a)
    diff = torch.where(a == e, 0.0, (a - e).abs())
    diff = torch.where(diff.isnan(), math.inf, diff)
    # where expected is ±inf (or NaN) the allowed error atol + rtol·|expected| is inf (or
    # NaN) and `diff > tol` can never hold: unequal infinities and NaNs are flagged here
    nonfinite = ~(torch.isfinite(a) & torch.isfinite(e))
    bad = (diff > tol) | (nonfinite & (a != e))
    n_bad = int(bad.sum())
    if n_bad == 0:
        return None
    excess = torch.where(bad, diff - tol, -math.inf)
    excess = torch.where(excess.isnan(), math.inf, excess)  # inf - inf
    flat = int(excess.flatten().argmax())
    idx = _index(flat, a.shape)
    n = a.numel()
    av, ev, dv, tv = (float(t.flatten()[flat]) for t in (a, e, diff, tol))
    return (
        f"{what}: mismatched elements: {n_bad} / {n} ({100.0 * n_bad / n:.1f}%)\n"
        f"  worst at index {idx}: actual {_fmt(av, dtype)}, expected {_fmt(ev, dtype)}, "
        f"|difference| {dv:.3g} > allowed {tv:.3g}"
    )


def _dtype_of(module: nn.Module, fallback: torch.dtype) -> torch.dtype:
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return fallback


def _as_tensor(value: Any, what: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{what} returned {type(value).__name__}; a Tensor is needed")
    return value


# ---------------------------------------------------------------------------- outputs
def assert_function_preserved(
    reference: nn.Module,
    widened: nn.Module,
    inputs: Tensor,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    msg: Message = None,
) -> None:
    """Assert that ``widened`` computes the same function as ``reference`` on ``inputs``.

    The default tolerance is not a guess: when ``rtol`` and ``atol`` are not given and
    both modules are MLPs that :func:`torch_embed.forward_error_bound` understands, an
    output element may differ by at most
    ``forward_error_bound(reference, x) + forward_error_bound(widened, x)``, the rigorous
    bound on each network's rounding error against the same real-arithmetic function.
    A correct widening cannot fail it in any dtype (splitting a fan-out column is exact
    in real arithmetic, not in floating point); a wrong one typically misses it by
    many orders of magnitude. For other modules the default is ``torch.testing``'s
    dtype-based ``(rtol, atol)`` (see :func:`default_tolerances`); the failure message
    says which tolerance was used. With ``rtol`` and ``atol``, an element may differ by
    ``atol + rtol * |expected|``.

    Args:
        reference: The network before widening (keep a ``copy.deepcopy`` of it, since
            :func:`torch_embed.widen` works in place).
        widened: The network after widening.
        inputs: A batch of inputs for both.
        rtol: Relative tolerance; give it together with ``atol``.
        atol: Absolute tolerance; give it together with ``rtol``.
        msg: Replacement message (``str``) or a callable editing the generated one.

    Raises:
        AssertionError: The outputs differ by more than allowed.
        ValueError: Only one of ``rtol``/``atol`` was given, a tolerance is negative, or
            a module is in train mode with BatchNorm/Dropout (call ``.eval()`` or pass
            tolerances).

    Example:
        >>> import copy, torch
        >>> from torch import nn
        >>> import torch_embed
        >>> g = torch.Generator().manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> narrow = copy.deepcopy(net)
        >>> _ = torch_embed.widen(net, [9], "split", generator=g)
        >>> x = torch.randn(8, 3, generator=g)
        >>> assert_function_preserved(narrow, net, x)  # passes silently
        >>> with torch.no_grad():
        ...     net[2].weight[:, 8] += 0.1  # break the fan-out split of the last copy
        >>> assert_function_preserved(narrow, net, x)
        Traceback (most recent call last):
        ...
        AssertionError: widened output differs from the reference output
        output: mismatched elements: ... / 16 (...%)
          worst at index (...): actual ..., expected ..., |difference| ... > allowed ...
        allowed error: forward_error_bound(reference, x) + forward_error_bound(widened, x)
    """
    __tracebackhide__ = True
    _check_pair(rtol, atol)
    _check_msg(msg)
    with torch.no_grad():
        expected = _as_tensor(reference(inputs), "reference(inputs)")
        actual = _as_tensor(widened(inputs), "widened(inputs)")
    if rtol is not None and atol is not None:
        allowed = atol + rtol * expected.detach().to("cpu", torch.float64).abs()
        how = f"atol + rtol·|expected| with rtol={rtol:g}, atol={atol:g}"
    else:
        allowed, how = _default_output_tolerance(reference, widened, inputs, expected, actual)
    problem = _mismatch(actual, expected, allowed, "output")
    if problem is not None:
        _fail(
            f"widened output differs from the reference output\n{problem}\nallowed error: {how}",
            msg,
        )


def _default_output_tolerance(
    reference: nn.Module, widened: nn.Module, inputs: Tensor, expected: Tensor, actual: Tensor
) -> tuple[Tensor, str]:
    from torch_embed.exactness import forward_error_bound

    try:
        bound = forward_error_bound(reference, inputs) + forward_error_bound(widened, inputs)
    except TypeError as err:  # not an MLP the bound understands: torch.testing defaults
        rtol, atol = default_tolerances(expected.dtype, actual.dtype)
        allowed = atol + rtol * expected.detach().to("cpu", torch.float64).abs()
        return allowed, (
            f"torch.testing defaults rtol={rtol:g}, atol={atol:g} (no rigorous bound: {err})"
        )
    except ValueError as err:
        raise ValueError(
            f"cannot compute the default (rigorous) tolerance: {err}. Call .eval() on both "
            f"modules or pass rtol= and atol="
        ) from err
    return bound.cpu(), "forward_error_bound(reference, x) + forward_error_bound(widened, x)"


# ---------------------------------------------------------------------------- gradients
def _gradients(model: nn.Module, loss_fn: LossFn, inputs: Any, targets: Any) -> dict[str, Tensor]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError(f"{type(model).__name__} has no parameters that require grad")
    with torch.enable_grad():
        loss = _as_tensor(loss_fn(model(inputs), targets), "loss_fn")
        if loss.numel() != 1:
            raise ValueError(
                f"loss_fn must return a scalar, got shape {tuple(loss.shape)} (use a "
                f"reduction such as 'mean')"
            )
        grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    return {
        n: (g if g is not None else torch.zeros_like(p)).detach() for (n, p), g in zip(named, grads)
    }


def assert_gradients_mapped(
    reference: nn.Module,
    widened: nn.Module,
    embedding: Embedding,
    loss_fn: LossFn,
    inputs: Any,
    targets: Any,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    msg: Message = None,
) -> None:
    """Assert ``∇R_wide = B ∇R_narrow``: the widened model's gradients are the mapped ones.

    Both gradients come from autograd on ``loss_fn(model(inputs), targets)`` (the
    models' ``.grad`` fields are not touched); the reference's are mapped by
    ``embedding.map_gradients`` and compared with the widened model's parameter by
    parameter. This holds at every point, critical or not, exactly when the embedding
    is critical (docs/theory.md, "One-step splitting": fan-in rows of a split get
    ``(1-α)·g`` and ``α·g``, fan-out columns are copied). An output-preserving embedding
    (Net2Net with noise, null neurons with a fan-in) fails it, and the message says so.

    Default tolerances are ``torch.testing``'s for the less precise of the two dtypes
    (``float64``: ``rtol = atol = 1e-7``; ``float32``: ``rtol=1.3e-6, atol=1e-5``);
    an element may differ by ``atol + rtol * |expected|``.

    Args:
        reference: The network before widening.
        widened: The network after widening.
        embedding: The :class:`~torch_embed.Embedding` that was applied.
        loss_fn: ``loss_fn(output, targets)`` returning a scalar, e.g. ``nn.MSELoss()``.
        inputs: Inputs for both models.
        targets: Targets for ``loss_fn``.
        rtol: Relative tolerance; give it together with ``atol``.
        atol: Absolute tolerance; give it together with ``rtol``.
        msg: Replacement message (``str``) or a callable editing the generated one.

    Raises:
        AssertionError: A parameter's gradient is not the mapped one (the message names
            every such parameter and its worst element).
        ValueError: Bad tolerances, or the loss is not a scalar.

    Example:
        >>> import copy, torch
        >>> from torch import nn
        >>> import torch_embed
        >>> g = torch.Generator().manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)).double()
        >>> narrow = copy.deepcopy(net)
        >>> emb = torch_embed.widen(net, [5], torch_embed.Split(alpha=0.3), generator=g)
        >>> x = torch.randn(10, 2, generator=g, dtype=torch.float64)
        >>> y = torch.randn(10, 1, generator=g, dtype=torch.float64)
        >>> assert_gradients_mapped(narrow, net, emb, nn.MSELoss(), x, y)
    """
    __tracebackhide__ = True
    _check_pair(rtol, atol)
    _check_msg(msg)
    narrow_grads = _gradients(reference, loss_fn, inputs, targets)
    wide_grads = _gradients(widened, loss_fn, inputs, targets)
    expected = embedding.map_gradients(narrow_grads)
    if rtol is None or atol is None:
        rtol, atol = default_tolerances(
            _dtype_of(reference, torch.float32), _dtype_of(widened, torch.float32)
        )
    problems = []
    for name, actual in wide_grads.items():
        if name not in expected:
            problems.append(
                f"parameter '{name}' of the widened model has no counterpart in the "
                f"reference's parameters {sorted(narrow_grads)}"
            )
            continue
        exp = expected[name]
        allowed = atol + rtol * exp.detach().to("cpu", torch.float64).abs()
        problem = _mismatch(actual, exp, allowed, f"parameter '{name}'")
        if problem is not None:
            problems.append(problem)
    missing = sorted(set(expected) & set(narrow_grads) - set(wide_grads))
    problems += [
        f"parameter '{n}' of the reference is missing in the widened model" for n in missing
    ]
    if problems:
        kind = embedding.kind.value
        note = ""
        if kind != "critical":
            note = (
                f"\nnote: the embedding is {kind}, not critical, so its gradients are not "
                f"expected to map: " + "; ".join(embedding.reasons)
            )
        _fail(
            f"gradients of the widened model are not the mapped gradients of the reference "
            f"(embedding kind: {kind}; allowed error atol + rtol·|expected| with "
            f"rtol={rtol:g}, atol={atol:g})\n" + "\n".join(problems) + note,
            msg,
        )


def assert_critical(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Any,
    targets: Any,
    *,
    gtol: float | None = None,
    msg: Message = None,
) -> None:
    """Assert that ``model`` sits at a critical point: ``‖∇R‖₂ <= gtol``.

    ``R = loss_fn(model(inputs), targets)``; the norm is over all parameters that
    require grad, in ``float64``. Default ``gtol`` by the parameters' dtype:
    ``1e-8`` (``float64``), ``1e-4`` (``float32``), ``1e-2`` (``float16``), ``1e-1``
    (``bfloat16``). Points from :func:`torch_embed.critical.critical_point` are
    polished to about ``1e-12`` in ``float64``.

    Args:
        model: The network.
        loss_fn: ``loss_fn(output, targets)`` returning a scalar.
        inputs: The inputs.
        targets: The targets.
        gtol: The largest gradient norm accepted.
        msg: Replacement message (``str``) or a callable editing the generated one.

    Raises:
        AssertionError: The gradient norm exceeds ``gtol`` (the message gives the norm,
            each parameter's norm and the largest gradient entry with its index).
        ValueError: ``gtol`` is not a positive finite number.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)).double()
        >>> for p in net.parameters():
        ...     _ = nn.init.zeros_(p)  # the zero network: critical for centred targets
        >>> x = torch.linspace(-1, 1, 8, dtype=torch.float64).reshape(4, 2)
        >>> y = torch.tensor([[1.0], [-1.0], [2.0], [-2.0]], dtype=torch.float64)
        >>> assert_critical(net, nn.MSELoss(), x, y)
        >>> assert_critical(net, nn.MSELoss(), x, y + 1)
        Traceback (most recent call last):
        ...
        AssertionError: not a critical point: ‖∇R‖₂ = 2 > gtol = 1e-08
        ...
    """
    __tracebackhide__ = True
    _check_msg(msg)
    if gtol is None:
        gtol = _GTOL.get(_dtype_of(model, torch.float32), _GTOL[torch.float32])
    if isinstance(gtol, bool) or not isinstance(gtol, (int, float)):
        raise TypeError(f"gtol must be a real number, got {type(gtol).__name__}")
    if not gtol > 0 or not math.isfinite(gtol):
        raise ValueError(f"gtol must be a finite number > 0, got {gtol!r}")
    grads = _gradients(model, loss_fn, inputs, targets)
    norms = {n: float(g.to(torch.float64).norm()) for n, g in grads.items()}
    total = math.sqrt(sum(v * v for v in norms.values()))
    if total <= gtol:
        return
    name, g = max(grads.items(), key=lambda kv: float(kv[1].abs().max()))
    flat = int(g.abs().flatten().argmax())
    idx = _index(flat, g.shape)
    per = ", ".join(f"'{n}' {v:.3g}" for n, v in norms.items())
    _fail(
        f"not a critical point: ‖∇R‖₂ = {total:.3g} > gtol = {gtol:g}\n"
        f"  largest entry: parameter '{name}' at index {idx}: "
        f"{_fmt(float(g.flatten()[flat]), g.dtype)}\n"
        f"  per-parameter norms: {per}",
        msg,
    )


# ---------------------------------------------------------------------------- inertia
_COUNTS: tuple[Count, ...] = ("negative", "zero", "positive")


def assert_inertia_nondecreasing(
    before: Inertia,
    after: Inertia,
    *,
    counts: Sequence[Count] = _COUNTS,
    msg: Message = None,
) -> None:
    """Assert that no Hessian inertia count went down from ``before`` to ``after``.

    For a critical embedding ``θ ↦ Aθ + c`` the Hessians are congruent on the image,
    ``Aᵀ H_wide A = H_narrow``, and ``H_wide A = B H_narrow``; so the negative, zero and
    positive counts can only grow (JML 2022 Thm 6.2). A decrease means the widening is
    not critical, the point moved, or a count was decided inside the numerical noise:
    the message flags counts whose :class:`~torch_embed.inertia.Inertia` is ambiguous
    (its eigenvalue gap around the tolerance is small).

    Args:
        before: Inertia of the narrow network's Hessian.
        after: Inertia of the widened network's Hessian.
        counts: Which counts to check (default all three; use
            ``("negative", "positive")`` away from critical points, where the zero count
            is not robust).
        msg: Replacement message (``str``) or a callable editing the generated one.

    Raises:
        AssertionError: A checked count decreased.
        TypeError: ``before`` or ``after`` is not an ``Inertia``.

    Example:
        >>> from torch_embed.inertia import Inertia
        >>> a = Inertia(negative=1, zero=0, positive=8, tol=1e-12, gap=1e9)
        >>> b = Inertia(negative=2, zero=1, positive=9, tol=1e-12, gap=1e9)
        >>> assert_inertia_nondecreasing(a, b)
        >>> assert_inertia_nondecreasing(b, a)
        Traceback (most recent call last):
        ...
        AssertionError: Hessian inertia decreased: negative 2 -> 1 (-1), zero 1 -> 0 (-1), ...
    """
    __tracebackhide__ = True
    from torch_embed.inertia import Inertia

    _check_msg(msg)
    for what, value in (("before", before), ("after", after)):
        if not isinstance(value, Inertia):
            raise TypeError(
                f"{what} must be a torch_embed.inertia.Inertia (from hessian_inertia), got "
                f"{type(value).__name__}"
            )
    bad = [c for c in counts if c not in _COUNTS]
    if bad or isinstance(counts, str):
        raise ValueError(f"counts must be a sequence of {_COUNTS}, got {counts!r}")
    drops = []
    for c in counts:
        b, a = int(getattr(before, c)), int(getattr(after, c))
        if a < b:
            drops.append(f"{c} {b} -> {a} ({a - b:+d})")
    if not drops:
        return
    flags = [
        f"{what}: gap ratio {float(inert.gap):.3g} at tol {float(inert.tol):.3g} (counts "
        f"may be off)"
        for what, inert in (("before", before), ("after", after))
        if bool(inert.ambiguous)
    ]
    note = "\nambiguous counts: " + "; ".join(flags) if flags else ""
    _fail(
        f"Hessian inertia decreased: {', '.join(drops)}\n"
        f"  before: {_describe(before)}\n  after:  {_describe(after)}{note}",
        msg,
    )


def _describe(inert: Inertia) -> str:
    return (
        f"negative={int(inert.negative)}, zero={int(inert.zero)}, "
        f"positive={int(inert.positive)} (tol {float(inert.tol):.3g}, gap "
        f"{float(inert.gap):.3g}{', AMBIGUOUS' if bool(inert.ambiguous) else ''})"
    )


def assert_embedding_nondecreasing(
    narrow: nn.Module,
    widened: nn.Module,
    loss_fn: LossFn,
    inputs: Any,
    targets: Any,
    *,
    tol: float | None = None,
    method: str = "auto",
    counts: Sequence[Count] = _COUNTS,
    msg: Message = None,
) -> tuple[Inertia, Inertia]:
    """Compute the Hessian inertia of both networks and assert that none decreased.

    Uses :func:`torch_embed.inertia.hessian_inertia` (dense ``float64`` Hessians, so keep
    the networks small) with the same ``tol`` and ``method`` for both, then
    :func:`assert_inertia_nondecreasing`.

    Args:
        narrow: The network before widening (a ``copy.deepcopy``).
        widened: The network after widening.
        loss_fn: ``loss_fn(output, targets)`` returning a scalar.
        inputs: The inputs.
        targets: The targets.
        tol: Eigenvalue threshold passed to ``hessian_inertia`` (``None``: its default,
            the rounding level, moved up only into a clear gap away from a critical
            point; each count picks its own).
        method: ``method`` passed to ``hessian_inertia``.
        counts: Which counts to check.
        msg: Replacement message (``str``) or a callable editing the generated one.

    Returns:
        ``(inertia_before, inertia_after)``, for printing or further checks.

    Raises:
        AssertionError: A checked count decreased.

    Example:
        >>> import copy, torch
        >>> from torch import nn
        >>> import torch_embed
        >>> g = torch.Generator().manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(1, 2), nn.Tanh(), nn.Linear(2, 1)).double()
        >>> x = torch.linspace(-1, 1, 6, dtype=torch.float64)[:, None]
        >>> narrow = copy.deepcopy(net)
        >>> _ = torch_embed.widen(net, [3], "split", generator=g)
        >>> # not a critical point: the zero counts may be undetermined; count at a tol
        >>> before, after = assert_embedding_nondecreasing(
        ...     narrow, net, nn.MSELoss(), x, x**2, tol=1e-9
        ... )
        >>> after.negative >= before.negative, after.total - before.total
        (True, 3)
    """
    __tracebackhide__ = True
    from torch_embed.inertia import hessian_inertia

    _check_msg(msg)
    before = hessian_inertia(narrow, loss_fn, inputs, targets, tol=tol, method=method)
    after = hessian_inertia(widened, loss_fn, inputs, targets, tol=tol, method=method)
    assert_inertia_nondecreasing(before, after, counts=counts, msg=msg)
    return before, after
