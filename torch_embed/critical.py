"""Polish a model in place to a critical point of its loss, in float64.

Zero eigenvalue counts are only meaningful near an exact critical point (THEORY.md §9):
a residual gradient of size ε smears the structural zeros to ``±O(ε)``. This module
drives ``|∇R|`` (Euclidean norm over all trainable parameters) down to ``gtol`` in two
phases:

1. L-BFGS with a strong-Wolfe line search (:class:`torch.optim.LBFGS`) to get close
   (skipped when the point is already nearly critical, so that a saddle stays a saddle).
2. Newton steps on the gradient system ``∇R(θ) = 0`` with a pseudo-inverse of the dense
   Hessian: ``s = -Σ_i λ_i/(λ_i² + μ) (q_iᵀ g) q_i`` from ``H = Σ λ_i q_i q_iᵀ``
   (``μ = 0`` is the ``rcond``-truncated pseudo-inverse step; ``μ > 0`` is the
   Levenberg-Marquardt step for ``min |∇R|²``). A step is accepted when it decreases
   ``|∇R|`` (backtracking over the step length, then increasing ``μ``). The iteration
   may converge to a saddle: any critical point is the goal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from torch_embed.hessian import check_model, dense_hessian, flat_loss

__all__ = ["CriticalPointResult", "critical_point"]


@dataclass(frozen=True)
class CriticalPointResult:
    """What :func:`critical_point` reached.

    Attributes:
        grad_norm: Final ``|∇R|`` (Euclidean, all trainable parameters).
        loss: Final loss.
        converged: ``grad_norm <= gtol``.
        iterations: L-BFGS iterations plus Newton iterations.
        lbfgs_iterations: Iterations of the L-BFGS phase.
        newton_iterations: Accepted Newton/Levenberg-Marquardt steps.
        initial_grad_norm: ``|∇R|`` before polishing.
        method: Phases used, e.g. ``"lbfgs+newton"``.
        message: Why it stopped.
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


def _loss_and_grad(
    model: nn.Module, loss_fn: Any, inputs: Tensor, targets: Any
) -> tuple[float, Tensor]:
    fl = flat_loss(model, loss_fn, inputs, targets)
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


def _get_flat(params: list[nn.Parameter]) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


def _newton_(
    model: nn.Module,
    params: list[nn.Parameter],
    loss_fn: Any,
    x: Tensor,
    y: Any,
    gnorm: float,
    loss: float,
    max_newton_iter: int,
    rcond: float,
    gtol: float,
) -> tuple[int, float, float, str]:
    """Pseudo-inverse Newton / Levenberg-Marquardt on ``∇R = 0``; writes the result back."""
    fl = flat_loss(model, loss_fn, x, y)
    theta = fl.theta.clone()
    grad_and_value = torch.func.grad_and_value(fl.fn)
    g = grad_and_value(theta)[0].detach()
    mu = 0.0
    newton = 0
    message = f"max_newton_iter={max_newton_iter} reached"
    for _ in range(max_newton_iter):
        lam, q = torch.linalg.eigh(dense_hessian(fl, theta))
        scale = float(lam.abs().max())
        if scale == 0.0:
            message = "the Hessian is zero; no Newton step"
            break
        gq = q.T @ g
        keep = lam.abs() > rcond * scale
        accepted = None
        for mu_try in [mu, *(scale**2 * 10.0**k for k in range(-12, 1, 2))]:
            denom = torch.where(keep, lam**2 + mu_try, 1.0)
            step = -(q @ (torch.where(keep, lam / denom, 0.0) * gq))
            for t in (1.0, 0.5, 0.25, 0.1):
                trial = theta + t * step
                g_new, value = grad_and_value(trial)
                norm = float(g_new.norm())
                if math.isfinite(norm) and norm < gnorm:
                    accepted = (trial, g_new.detach(), norm, float(value))
                    break
            if accepted is not None:
                mu = mu_try / 100 if mu_try > 0 else 0.0
                break
        if accepted is None:
            message = "no Newton/Levenberg-Marquardt step decreased |grad R| (rounding floor)"
            break
        theta, g, gnorm, loss = accepted
        newton += 1
        if gnorm <= gtol:
            message = "converged"
            break
    _set_flat_(params, theta)
    return newton, gnorm, loss, message


def critical_point(
    model: nn.Module,
    loss_fn: Any,
    inputs: Tensor,
    targets: Any,
    *,
    gtol: float = 1e-12,
    max_iter: int = 2000,
    max_newton_iter: int = 50,
    rcond: float = 1e-13,
    newton_below: float = 1e-6,
) -> CriticalPointResult:
    """Polish ``model`` IN PLACE to a critical point ``|∇R| <= gtol`` (float64).

    Args:
        model: A float64 model (call ``model.double()`` first), in eval mode if it has
            BatchNorm or Dropout. Its trainable parameters are updated in place.
        loss_fn: Any callable ``loss_fn(output, target) -> scalar``.
        inputs: The full batch (full-batch optimisation; floating inputs are cast to
            float64).
        targets: The targets.
        gtol: Target Euclidean gradient norm.
        max_iter: Maximum L-BFGS iterations.
        max_newton_iter: Maximum Newton/Levenberg-Marquardt iterations.
        rcond: Eigenvalues ``|λ| <= rcond·max|λ|`` are dropped in the pseudo-inverse.
        newton_below: Skip L-BFGS when ``|∇R|`` starts at or below this: a point that
            is already nearly critical (e.g. a freshly embedded critical point, often a
            saddle) is polished by Newton steps only, since L-BFGS, a minimiser, would
            walk away from a saddle.

    Returns:
        A :class:`CriticalPointResult`; ``converged`` is ``False`` (no exception, no
        warning) when ``gtol`` was not reached.

    Raises:
        ValueError: The model is not float64 or has BatchNorm/Dropout in train mode.

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
    x = inputs.double() if inputs.is_floating_point() else inputs
    y = targets.double() if isinstance(targets, Tensor) and targets.is_floating_point() else targets

    loss0, g0 = _loss_and_grad(model, loss_fn, x, y)
    initial = float(g0.norm())
    gnorm, loss = initial, loss0
    phases: list[str] = []
    lbfgs_iters = 0
    if gnorm > max(gtol, newton_below) and max_iter > 0:
        phases.append("lbfgs")
        start = _get_flat(params)
        opt = torch.optim.LBFGS(
            params,
            lr=1.0,
            max_iter=max_iter,
            tolerance_grad=gtol / 10,
            tolerance_change=0.0,
            history_size=50,
            line_search_fn="strong_wolfe",
        )

        def closure() -> Tensor:
            opt.zero_grad()
            value = loss_fn(model(x), y)
            value.backward()
            return value  # type: ignore[no-any-return]

        opt.step(closure)
        lbfgs_iters = int(opt.state[params[0]].get("n_iter", 0)) if params else 0
        for p in params:
            p.grad = None
        loss, g = _loss_and_grad(model, loss_fn, x, y)
        gnorm = float(g.norm())
        if not math.isfinite(gnorm) or gnorm > initial:
            # L-BFGS ended at a worse gradient norm (it minimises R, not |∇R|): undo.
            _set_flat_(params, start)
            loss, gnorm = loss0, initial

    newton = 0
    message = "converged" if gnorm <= gtol else ""
    if gnorm > gtol and max_newton_iter > 0:
        phases.append("newton")
        newton, gnorm, loss, message = _newton_(
            model, params, loss_fn, x, y, gnorm, loss, max_newton_iter, rcond, gtol
        )
    elif not message:
        message = "max_iter reached, Newton phase disabled"
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
    )
