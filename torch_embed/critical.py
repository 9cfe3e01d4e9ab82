"""Polish a model in place to a critical point of its loss, in float64.

Zero eigenvalue counts are only meaningful near an exact critical point (docs/theory.md,
"Counting eigenvalues"): a residual gradient of size ε smears the structural zeros to
``±O(ε)``. This module drives ``|∇R|`` (Euclidean norm over all trainable parameters)
down to ``gtol`` in three stages:

1. L-BFGS with a strong-Wolfe line search (:class:`torch.optim.LBFGS`), in chunks of
   25 iterations, until ``|∇R| <= newton_at`` or until it stalls: ``|∇R|`` not halved
   over the last chunks that together cost about two Newton steps — cheap per
   iteration, slow on the ill-conditioned, degenerate landscapes of small smooth MLPs.
   The cost is counted in gradient evaluations, not measured in seconds (see
   ``_newton_cost`` in the source), so where L-BFGS stops does not depend on the
   machine or its load, and every rank of a process group stops at the same chunk.
   Skipped when the point is already nearly critical (``newton_below``), so that a
   saddle stays a saddle.
2. Trust-region Newton minimisation of ``R`` with the exact dense Hessian: from its
   eigendecomposition ``H = Q Λ Qᵀ`` the step ``s = -Σ (q_iᵀg)/(λ_i + μ) q_i`` with
   ``μ >= max(0, -λ_min)`` chosen so that ``|s|`` fits the radius, which follows the
   ratio of actual to predicted decrease of ``R``. Negative curvature is handled, the
   rejected trials reuse the decomposition, and near a non-degenerate minimum the
   convergence is quadratic. Runs until ``|∇R| <= polish_below`` or until ``R`` stops
   decreasing above rounding.
3. Root polishing of ``∇R(θ) = 0`` (any critical point, saddles included). First the
   Levenberg-Marquardt search of the previous version: ``s = -Σ λ_i/(λ_i² + μ) (q_iᵀg)
   q_i`` over ``|λ_i| > rcond·max|λ|``, with ``μ`` carried over from the last accepted
   step (0 at first) and then raised, each backtracked; the first step that decreases
   ``|∇R|`` wins. When none does, a wider family from the same decomposition: the
   pseudo-inverse step truncated at relative cut-offs ``c ∈ {1e-2, ..., 1e-10}``
   (shorter too) and more damped steps, the smallest ``|∇R|`` wins. At a degenerate
   critical point (a critical manifold, Hessian zeros along it, e.g. after a split) the
   gradient's components along the near-null directions are second order, and
   truncating them is what gets past the stall of the plain search. The decomposition
   is reused (chord steps) while each step divides ``|∇R|`` by 4.

Each Newton step costs one dense float64 Hessian
(:func:`torch_embed.hessian.dense_hessian`, block-wise) and one ``eigh``: practical for
P up to a few thousand.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from torch_embed._data import Batch, BatchSource, _count, batch_source
from torch_embed.hessian import FlatLoss, _cast_floating, _flat_loss, check_model, dense_hessian

__all__ = ["CriticalPointResult", "critical_point"]

#: Relative eigenvalue cut-offs tried for the truncated pseudo-inverse step.
_CUTS = (1e-2, 1e-4, 1e-6, 1e-8, 1e-10)
#: Levenberg-Marquardt damping ``μ / max|λ|²`` tried for the damped step.
_DAMPING = (1e-1, 1e-3, 1e-5, 1e-7, 1e-9, 1e-11)
#: L-BFGS iterations between two checks of ``|∇R|``.
_CHUNK = 25
#: A chord step (old decomposition) must divide ``|∇R|`` by at least 1/_CHORD.
_CHORD = 0.25
#: Flops of one ``eigh`` with eigenvectors, per ``P³``: LAPACK's divide and conquer
#: (``syevd``) reduces to tridiagonal form (``4/3·P³``) and transforms the eigenvectors
#: back (``2·P³``), the tridiagonal solve adding ``O(P²)`` to ``O(P³)`` by deflation.
_EIGH_FLOPS = 4.0
#: Flops of one gradient, per parameter and sample: a multiply-add per weight forward
#: (2), twice that backward (input and weight gradients, 4). Exact for dense layers; a
#: convolution's weights act at many positions, so this undercounts it (conservative:
#: the window then comes out longer, L-BFGS runs longer before Newton).
_GRAD_FLOPS = 6.0
#: The fixed cost of one gradient, in flops: PyTorch's per-operation dispatch and the
#: autograd bookkeeping (about 150 µs for a small MLP on a CPU core at about 2e10
#: flop/s), which dominates below ``P·N`` of about ``5e5``.
_GRAD_OVERHEAD = 3e6


def _newton_cost(n_params: int, n_samples: int) -> float:
    """The cost of one Newton step in gradient evaluations, from counts alone.

    A dense Hessian is ``P`` Hessian-vector products, counted as ``P`` gradients; its
    ``eigh`` costs ``_EIGH_FLOPS·P³`` flops, a gradient ``_GRAD_FLOPS·P·N +
    _GRAD_OVERHEAD``. Both run as dense kernels at similar rates on a CPU (about 2e10
    flop/s on one core of the machine the constants were checked on: ``eigh`` of
    ``P = 1000`` in 0.18 s, the gradient of a 2701-parameter MLP on 1000 samples in
    1.2 ms), so the ratio of flops is the ratio of times, up to a small factor that
    only scales the stall window. ``n_samples`` is the largest shard of a process
    group: the ranks compute their gradients side by side, each its own ``eigh``.

    Example:
        >>> round(_newton_cost(1000, 1000), 1)  # P gradients + eigh ≈ 444 gradients
        1444.4
    """
    grad = _GRAD_FLOPS * n_params * n_samples + _GRAD_OVERHEAD
    return n_params + _EIGH_FLOPS * n_params**3 / grad


@dataclass(frozen=True)
class CriticalPointResult:
    """What :func:`critical_point` reached.

    Attributes:
        grad_norm: Final ``|∇R|`` (Euclidean, all trainable parameters).
        loss: Final loss.
        converged: ``grad_norm <= gtol``.
        iterations: L-BFGS iterations plus Newton iterations.
        lbfgs_iterations: Iterations of the L-BFGS phase.
        newton_iterations: Accepted Newton steps (trust-region, pseudo-inverse or
            Levenberg-Marquardt).
        initial_grad_norm: ``|∇R|`` before polishing.
        method: Phases used, e.g. ``"lbfgs+newton"``.
        message: Why it stopped.
        hessian_evaluations: Dense Hessians computed and eigendecomposed (the cost:
            each is ``O(N·P²)`` to build and ``O(P³)`` to decompose).
    """

    grad_norm: float
    loss: float
    converged: bool
    iterations: int
    lbfgs_iterations: int
    newton_iterations: int
    initial_grad_norm: float
    method: str
    message: str
    hessian_evaluations: int = 0


def _loss_and_grad(model: nn.Module, loss_fn: Any, source: BatchSource) -> tuple[float, Tensor]:
    fl = _flat_loss(model, loss_fn, source)
    if fl.terms is not None:
        value, g = fl.value_and_grad()
        return float(value), g
    theta = fl.theta.clone().requires_grad_(True)
    value = fl.fn(theta)
    (g,) = torch.autograd.grad(value, theta)
    return float(value.detach()), g.detach()


def _set_flat_(params: list[nn.Parameter], vec: Tensor) -> None:
    with torch.no_grad():
        offset = 0
        for p in params:
            n = p.numel()
            p.copy_(vec[offset : offset + n].view_as(p))
            offset += n


def _time_up(deadline: float, source: BatchSource) -> bool:
    """Whether ``deadline`` has passed; over a process group, on any rank (so all agree)."""
    if math.isinf(deadline):
        return False
    return source.max(1.0 if time.monotonic() >= deadline else 0.0) > 0.0


def _set_grads_(params: list[nn.Parameter], vec: Tensor) -> None:
    """Set every ``.grad`` to its slice of the flat ``vec`` (a copy)."""
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = vec[offset : offset + n].view_as(p).clone()
        offset += n


def _get_flat(params: list[nn.Parameter]) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


def _lbfgs_(
    model: nn.Module,
    params: list[nn.Parameter],
    loss_fn: Any,
    source: BatchSource,
    max_iter: int,
    newton_at: float,
    deadline: float,
) -> int:
    """L-BFGS until ``|∇R| <= newton_at``, a stall, ``max_iter`` or the deadline."""
    opt = torch.optim.LBFGS(
        params,
        lr=1.0,
        max_iter=_CHUNK,
        tolerance_grad=0.0,
        tolerance_change=0.0,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        opt.zero_grad()
        if source.single:
            b = source.batches[0]
            value = loss_fn(model(b.inputs), b.targets)
            value.backward()
            return value  # type: ignore[no-any-return]
        # the data set's loss: every batch's weighted share, summed over the group
        total = torch.zeros((), dtype=torch.float64, device=params[0].device)
        for b in source.batches:
            part = b.loss(loss_fn)(model(b.inputs), b.targets)
            part.backward()
            total += part.detach()
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        flat = source.all_reduce_(torch.cat([total.reshape(1)] + [g.reshape(-1) for g in grads]))
        _set_grads_(params, flat[1:])
        return flat[0]

    n_params = sum(p.numel() for p in params)
    # the largest shard sets the pace of a group's gradients; the same on every rank
    n_samples = int(source.max(float(sum(_count(b.inputs, b.targets) for b in source.batches))))
    newton_cost = _newton_cost(n_params, max(n_samples, 1))
    done = evals = 0
    history: list[float] = []
    while done < max_iter and not _time_up(deadline, source):
        opt.param_groups[0]["max_iter"] = min(_CHUNK, max_iter - done)
        opt.step(closure)
        state = opt.state[params[0]]
        done = int(state.get("n_iter", 0))
        # this chunk's loss-and-gradient evaluations (line search included), plus the
        # gradient that measures |∇R| below
        chunk = int(state.get("func_evals", 0)) - evals + 1
        evals += chunk - 1
        for p in params:
            p.grad = None
        norm = float(_loss_and_grad(model, loss_fn, source)[1].norm())
        history.append(norm)
        if not math.isfinite(norm) or norm <= newton_at:
            break
        # Stalled when |∇R| was not halved over a window of chunks that costs about two
        # Newton steps. Counted in gradient evaluations (L-BFGS's own count, the same
        # on every rank since they evaluate the same all-reduced losses), never timed:
        # where L-BFGS stops, and so the result, must not depend on the machine's load.
        window = max(2, math.ceil(2 * newton_cost / chunk))
        if len(history) > window and min(history[-window:]) > 0.5 * min(history[:-window]):
            break
    return done


def _tr_step(lam: Tensor, gq: Tensor, radius: float) -> tuple[Tensor, float]:
    """Trust-region step in eigen-coordinates, ``s = -gq/(λ + μ)`` with ``|s| <= radius``.

    Returns the step's coordinates and the decrease the quadratic model predicts.
    """

    def predicted(s: Tensor) -> float:
        return float(-(gq @ s) - 0.5 * (lam * s * s).sum())

    lam_min = float(lam.min())
    if lam_min > 0.0:
        s = -gq / lam
        if float(s.norm()) <= radius:
            return s, predicted(s)
    # |s(μ)| decreases on μ > max(0, -λ_min): bisect (geometrically) for |s(μ)| = radius
    lo = max(0.0, -lam_min)
    hi = lo + float(gq.norm()) / radius + float(lam.abs().max())
    lo = lo * (1 + 1e-12) + 1e-300
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        if float((gq / (lam + mid)).norm()) > radius:
            lo = mid
        else:
            hi = mid
        if hi <= lo * (1 + 1e-10):
            break
    s = -gq / (lam + hi)
    return s, predicted(s)


class _Newton:
    """Gradient evaluations and Hessian eigendecompositions of one flat loss."""

    def __init__(self, fl: FlatLoss, rcond: float) -> None:
        self.fl = fl
        self.rcond = rcond
        self.grad_and_value = torch.func.grad_and_value(fl.fn)
        self.hessians = 0
        self.mu = 0.0

    def evaluate(self, theta: Tensor) -> tuple[Tensor, float, float]:
        if self.fl.terms is not None:  # several batches or processes
            value, g = self.fl.value_and_grad(theta)
        else:
            g, value = self.grad_and_value(theta)
        g = g.detach()
        return g, float(g.norm()), float(value)

    def decompose(self, theta: Tensor) -> tuple[Tensor, Tensor] | None:
        self.hessians += 1
        lam, q = torch.linalg.eigh(dense_hessian(self.fl, theta))
        if self.fl.source is not None:  # every rank steps from the same decomposition
            lam, q = self.fl.source.broadcast_(lam), self.fl.source.broadcast_(q.contiguous())
        if not bool(torch.isfinite(lam).all()) or float(lam.abs().max()) == 0.0:
            return None
        return lam, q

    def minimise_step(
        self,
        theta: Tensor,
        g: Tensor,
        loss: float,
        lam: Tensor,
        q: Tensor,
        radius: float,
        *,
        stale: bool,
    ) -> tuple[tuple[Tensor, Tensor, float, float] | None, float]:
        """One trust-region step on ``R`` (trials reuse ``Q Λ``); returns it and the radius.

        ``None`` when the model predicts no decrease above rounding or no trial is
        accepted. A ``stale`` decomposition (from an earlier point) gets one trial, kept
        only if it does at least half as well as predicted; the radius is then unchanged.
        """
        gq = q.T @ g
        if stale:
            s, pred = _tr_step(lam, gq, radius)
            if pred <= 1e-15 * max(abs(loss), 1e-300):
                return None, radius
            trial = theta + q @ s
            g_new, norm, value = self.evaluate(trial)
            ok = math.isfinite(norm) and (loss - value) > 0.5 * pred
            return ((trial, g_new, norm, value) if ok else None), radius
        for _ in range(30):
            s, pred = _tr_step(lam, gq, radius)
            if pred <= 1e-15 * max(abs(loss), 1e-300):
                return None, radius
            trial = theta + q @ s
            g_new, norm, value = self.evaluate(trial)
            rho = (loss - value) / pred if math.isfinite(value) and math.isfinite(norm) else -1.0
            snorm = float(s.norm())
            if rho < 0.25:
                radius = 0.25 * snorm
            elif rho > 0.75 and snorm >= 0.99 * radius:
                radius = 2.0 * radius
            if rho > 0.1:
                return (trial, g_new, norm, value), radius
        return None, radius

    def root_step(
        self, theta: Tensor, g: Tensor, gnorm: float, lam: Tensor, q: Tensor
    ) -> tuple[Tensor, Tensor, float, float] | None:
        """A step that lowers ``|∇R|`` below ``gnorm``, or ``None``.

        The first one the Levenberg-Marquardt search finds; failing that, the candidate
        (truncated, damped or shortened pseudo-inverse step) with the smallest ``|∇R|``.
        """
        scale = float(lam.abs().max())
        gq = q.T @ g
        coefs: list[Tensor] = []
        seen: set[int] = set()
        for cut in (*_CUTS, self.rcond):
            keep = lam.abs() > max(cut, self.rcond) * scale
            count = int(keep.sum())
            if count and count not in seen:
                seen.add(count)
                coefs.append(torch.where(keep, 1.0 / torch.where(keep, lam, 1.0), 0.0))
        n_cuts = len(coefs)
        # First the Levenberg-Marquardt search of the previous version: μ carried over
        # from the last accepted step (0: the rcond pseudo-inverse step), then larger,
        # each backtracked, the first step that decreases |∇R| wins. Greedy best-of-all
        # choices crawl where these steps converge (fig3b's Newton-only polish).
        plain = coefs[n_cuts - 1] if n_cuts else None
        if plain is not None:
            keep = plain != 0
            for mu in [self.mu, *(scale**2 * 10.0**k for k in range(-12, 1, 2))]:
                coef = torch.where(keep, lam / torch.where(keep, lam**2 + mu, 1.0), 0.0)
                full = q @ (coef * gq)
                for f in (1.0, 0.5, 0.25, 0.1):
                    trial = theta - f * full
                    g_new, norm, value = self.evaluate(trial)
                    if math.isfinite(norm) and norm < gnorm:
                        self.mu = mu / 100 if mu > 0 else 0.0
                        return trial, g_new, norm, value
        coefs.extend(lam / (lam**2 + d * scale**2) for d in _DAMPING)
        # damped Newton: shorter pseudo-inverse steps (a full one may overshoot |∇R|)
        steps = [q @ (coef * gq) for coef in coefs]
        steps.extend(f * s for f in (0.5, 0.25, 0.1) for s in steps[:n_cuts])
        best: tuple[Tensor, Tensor, float, float] | None = None
        for step in steps:
            trial = theta - step
            g_new, norm, value = self.evaluate(trial)
            if math.isfinite(norm) and norm < (gnorm if best is None else best[2]):
                best = (trial, g_new, norm, value)
        return best


def _newton_(
    model: nn.Module,
    params: list[nn.Parameter],
    loss_fn: Any,
    source: BatchSource,
    max_steps: int,
    rcond: float,
    gtol: float,
    minimise_above: float,
    deadline: float,
) -> tuple[int, int, float, float, str]:
    """Newton stages 2 and 3 from the model's current point; writes the result back.

    Returns:
        (accepted steps, Hessians computed, |∇R|, loss, message).
    """
    fl = _flat_loss(model, loss_fn, source)
    solver = _Newton(fl, rcond)
    theta = fl.theta.clone()
    g, gnorm, loss = solver.evaluate(theta)
    loss0 = loss
    steps = 0
    message = "converged"
    eig: tuple[Tensor, Tensor] | None = None
    fresh = False
    radius = max(float(theta.norm()), 1.0)
    while gnorm > gtol:
        if steps >= max_steps:
            message = f"max_newton_iter reached ({steps} Newton steps)"
            break
        if _time_up(deadline, source):
            message = "max_time reached"
            break
        if eig is None:
            eig = solver.decompose(theta)
            fresh = True
            if eig is None:
                message = "the Hessian is zero or not finite; no Newton step"
                break
        if gnorm > minimise_above:
            found, radius = solver.minimise_step(theta, g, loss, *eig, radius, stale=not fresh)
            if found is None:
                if fresh:
                    minimise_above = gnorm  # R no longer decreases measurably: polish
                eig = None
                continue
            fresh = False
        else:
            found = solver.root_step(theta, g, gnorm, *eig)
            if found is None or (not fresh and found[2] > _CHORD * gnorm):
                if fresh:
                    message = (
                        "no Newton/Levenberg-Marquardt step decreased |grad R| (a rounding "
                        "floor, or a stationary point of |grad R| that is not critical)"
                    )
                    break
                eig = None  # the old decomposition no longer helps: recompute
                continue
            fresh = False
        theta, g, gnorm, loss = found
        steps += 1
    if gnorm > gtol and gnorm > minimise_above:
        message += (
            f" while still minimising: R fell from {loss0:.6g} to {loss:.6g} and |θ| went "
            f"from {float(fl.theta.norm()):.4g} to {float(theta.norm()):.4g} (the iterates "
            f"follow a descending valley, possibly to infinity; no critical point near)"
        )
    _set_flat_(params, theta)
    return steps, solver.hessians, gnorm, loss, message


def critical_point(
    model: nn.Module,
    loss_fn: Any,
    inputs: Tensor | None = None,
    targets: Any = None,
    *,
    data: Iterable[Any] | None = None,
    reduction: str | None = None,
    process_group: Any = None,
    gtol: float = 1e-12,
    max_iter: int = 2000,
    max_newton_iter: int = 200,
    rcond: float = 1e-13,
    newton_below: float = 1e-6,
    newton_at: float = 1e-4,
    polish_below: float = 1e-9,
    max_time: float | None = None,
) -> CriticalPointResult:
    """Polish ``model`` IN PLACE to a critical point ``|∇R| <= gtol`` (float64).

    L-BFGS gets close, trust-region Newton on the exact Hessian minimises ``R`` further,
    and truncated pseudo-inverse / Levenberg-Marquardt steps on ``∇R = 0`` finish (see
    the module docstring). Cost: one dense float64 Hessian and one ``eigh`` per Newton
    step, so P up to a few thousand (in the table of ``python bench/critical.py`` in
    bench/RESULTS.md, the largest case, P = 1801 and N = 1000, computed and
    eigendecomposed 5 dense Hessians within 22.55 s in all, 899 L-BFGS iterations
    included, on 2 cores).

    Not every start has a critical point within reach: from many random starts of small
    smooth MLPs the loss keeps falling along a long curved valley (``|θ|`` growing,
    near-flat and negative curvature), where no local method converges in bounded time;
    the result then says so in ``message`` (``converged=False``).

    Args:
        model: A float64 model (call ``model.double()`` first), in eval mode if it has
            BatchNorm or Dropout. Its trainable parameters are updated in place.
        loss_fn: Any callable ``loss_fn(output, target) -> scalar``.
        inputs: The full batch (full-batch optimisation; floating inputs are cast to
            float64). Omit with ``data``.
        targets: The targets (omit with ``data``).
        data: An iterable of ``(inputs, targets)`` batches (e.g. a ``DataLoader``)
            instead of ``inputs, targets``: the loss is the whole data set's (see
            :mod:`torch_embed._data`; still full-batch: every L-BFGS evaluation and
            every Newton step runs over all batches, one at a time).
        reduction: How ``loss_fn`` reduces over a batch (``"mean"``, ``"sum"``,
            ``"batchmean"``); needed with ``data``/``process_group`` for a plain
            function, read from a ``torch.nn`` loss otherwise.
        process_group: A :mod:`torch.distributed` process group: each rank passes its
            shard of the data; losses, gradients and Hessians are all-reduced, so every
            rank takes the same steps and ends at the same point.
        gtol: Target Euclidean gradient norm.
        max_iter: Maximum L-BFGS iterations (0: Newton only).
        max_newton_iter: Maximum accepted Newton steps (0: L-BFGS only).
        rcond: Smallest relative eigenvalue cut-off ``|λ| > rcond·max|λ|`` of the
            pseudo-inverse steps.
        newton_below: Skip L-BFGS and the trust-region stage when ``|∇R|`` starts at or
            below this: a point that is already nearly critical (e.g. a freshly
            embedded critical point, often a saddle) is polished by root steps on
            ``∇R = 0`` only, since a minimiser would walk away from a saddle.
        newton_at: L-BFGS hands over to Newton once ``|∇R| <= newton_at`` (or earlier,
            when it stalls).
        polish_below: The trust-region minimisation hands over to the root steps once
            ``|∇R| <= polish_below`` (or earlier, when ``R`` stops decreasing above
            rounding).
        max_time: Wall-clock budget in seconds (checked between L-BFGS chunks of 25
            iterations and between Newton steps, so it can be overrun by one of them;
            ``None``: no limit). The first L-BFGS run in a process also pays PyTorch's
            one-time import of ``torch._dynamo`` (seconds) inside the budget.

    Returns:
        A :class:`CriticalPointResult`; ``converged`` is ``False`` (no exception, no
        warning) when ``gtol`` was not reached, and ``message`` says why. The model then
        holds the last point accepted. The parameters' ``.grad`` are cleared (``None``)
        when L-BFGS ran.

    If an exception escapes (``KeyboardInterrupt`` included, e.g. in the middle of an
    L-BFGS line search), the model's parameters and ``.grad`` are restored to what they
    were before the call, then the exception propagates; use ``max_time`` for a bounded
    run that keeps its progress.

    Raises:
        ValueError: The model is not float64 or has BatchNorm/Dropout in train mode, or
            ``gtol`` / ``max_time`` is not positive.

    Example:
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(1, 2), nn.Tanh(), nn.Linear(2, 1)).double()
        >>> x = torch.linspace(-2, 2, 20).unsqueeze(1)
        >>> y = torch.tanh(3 * (x - 1)) + torch.tanh(3 * (x + 1)) + 0.5 * torch.tanh(3 * x)
        >>> res = critical_point(net, nn.MSELoss(), x, y)
        >>> res.converged, res.grad_norm <= 1e-12
        (True, True)
    """
    check_model(model)
    params = [p for p in model.parameters() if p.requires_grad]
    for name, p in model.named_parameters():
        if p.requires_grad and p.dtype != torch.float64:
            raise ValueError(
                f"critical_point works in float64 but parameter '{name}' is {p.dtype}; "
                f"call model.double() first (and pass float64 inputs)"
            )
    if gtol <= 0 or not math.isfinite(gtol):
        raise ValueError(f"gtol must be a positive finite number, got {gtol}")
    if max_time is not None and not max_time > 0:
        raise ValueError(f"max_time must be a positive number of seconds or None, got {max_time}")
    deadline = math.inf if max_time is None else time.monotonic() + max_time
    source = batch_source(
        "critical_point",
        loss_fn,
        inputs,
        targets,
        data,
        reduction=reduction,
        process_group=process_group,
    )
    source = dataclasses.replace(  # float64 data, once
        source,
        batches=tuple(
            Batch(
                _cast_floating(b.inputs, torch.float64),
                _cast_floating(b.targets, torch.float64),
                b.weight,
            )
            for b in source.batches
        ),
    )
    start = _get_flat(params).clone()
    grads = [p.grad for p in params]
    try:
        return _critical_point(
            model,
            params,
            loss_fn,
            source,
            gtol,
            max_iter,
            max_newton_iter,
            rcond,
            newton_below,
            newton_at,
            polish_below,
            deadline,
        )
    except BaseException:
        # KeyboardInterrupt or an error mid-way (e.g. inside an L-BFGS line search, at a
        # trial point): put the model back where it was, so it is never half-updated
        _set_flat_(params, start)
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        raise


def _critical_point(
    model: nn.Module,
    params: list[nn.Parameter],
    loss_fn: Any,
    source: BatchSource,
    gtol: float,
    max_iter: int,
    max_newton_iter: int,
    rcond: float,
    newton_below: float,
    newton_at: float,
    polish_below: float,
    deadline: float,
) -> CriticalPointResult:
    """The three stages of :func:`critical_point` (arguments checked, float64 data)."""
    loss0, g0 = _loss_and_grad(model, loss_fn, source)
    initial = float(g0.norm())
    gnorm, loss = initial, loss0
    phases: list[str] = []
    lbfgs_iters = newton = hessians = 0
    use_lbfgs = gnorm > max(gtol, newton_below) and max_iter > 0
    message = "converged"
    if gnorm > gtol and use_lbfgs:
        phases.append("lbfgs")
        start = _get_flat(params)
        lbfgs_iters = _lbfgs_(model, params, loss_fn, source, max_iter, newton_at, deadline)
        loss_l, g_l = _loss_and_grad(model, loss_fn, source)
        norm_l = float(g_l.norm())
        if not math.isfinite(norm_l) or norm_l > initial:
            # L-BFGS ended at a worse gradient norm (it minimises R, not |∇R|): undo.
            _set_flat_(params, start)
        else:
            gnorm, loss = norm_l, loss_l
        if gnorm > gtol:
            message = (
                "max_time reached during L-BFGS"
                if _time_up(deadline, source)
                else f"L-BFGS stopped after {lbfgs_iters} iterations and the Newton phase "
                f"is disabled (max_newton_iter=0)"
            )
    if gnorm > gtol and max_newton_iter > 0 and not _time_up(deadline, source):
        phases.append("newton")
        newton, hessians, gnorm, loss, message = _newton_(
            model,
            params,
            loss_fn,
            source,
            max_newton_iter,
            rcond,
            gtol,
            polish_below if use_lbfgs else math.inf,
            deadline,
        )
    elif gnorm > gtol and not use_lbfgs:
        message = "Newton phase disabled (max_newton_iter=0) and L-BFGS not run"
    converged = gnorm <= gtol
    return CriticalPointResult(
        grad_norm=gnorm,
        loss=loss,
        converged=converged,
        iterations=lbfgs_iters + newton,
        lbfgs_iterations=lbfgs_iters,
        newton_iterations=newton,
        initial_grad_norm=initial,
        method="+".join(phases) or "none",
        message=message,
        hessian_evaluations=hessians,
    )
