"""Fig. 1 of the NeurIPS 2021 paper: loss plateaus of a wide network are narrow critical points.

A wide tanh network (paper: width 500) is trained on 50 points of the 1D staircase by
full-batch gradient descent (paper: lr 0.005, 300 000 steps) from the small
initialisation ``N(0, 1/m³)``. The loss falls in stages, with plateaus between them. At
each plateau (found with :func:`~torch_embed.experiments.training.find_plateaus`) the
network is taken where the plateau is flattest and compared with narrow networks:

* **condensation**: :func:`torch_embed.landscape.condense.effective_widths` with an
  absolute tolerance of ``1e-2`` times the largest neuron's ``[w; b]`` norm, and the
  number of direction groups of the neurons that matter (``|[w; b]|·|a|`` above 1% of
  the largest; cosine ``>= 0.99`` up to sign, since ``tanh`` is odd);
* **the nearest narrow critical function**: critical points of widths 1, 2 and 3 are
  collected as in Fig. 4 (several initialisations, GD and Adam, Newton-polished to
  ``|∇R| < 1e-10``); for each width the distance (RMS over the data) between the wide
  output and the closest narrow critical output is reported. The paper's claim is that
  at a plateau the wide output equals a narrow network's critical function.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from torch_embed.experiments import FIGURES, FigureResult, Headline

__all__ = ["direction_groups", "run"]

COS = 0.99
CONTRIBUTION = 1e-2
REL_ATOL = 1e-2
PAPER_PLATEAUS = 3  # the staircase of widths 1, 2, 3
MATCH = 0.1  # a narrow critical function "matches" within 10% of the residual RMS
FIT_STEPS = 2000


def direction_groups(net: nn.Sequential, *, cos: float = COS) -> int:
    """Direction groups of a 1-m-1 tanh net's neurons that matter (sign-symmetric).

    Neurons whose ``|[w; b]|·|a|`` is below 1% of the largest are left out; the others
    are grouped greedily by ``|cos| >= cos`` of ``[w; b]`` (``tanh`` is odd, so a
    neuron and its negation are the same direction).

    Example:
        >>> net = nn.Sequential(nn.Linear(1, 3), nn.Tanh(), nn.Linear(3, 1))
        >>> with torch.no_grad():
        ...     _ = net[0].weight.copy_(torch.tensor([[1.0], [-2.0], [0.0]]))
        ...     _ = net[0].bias.copy_(torch.tensor([1.0, -2.0, 1.0]))
        ...     _ = net[2].weight.fill_(1.0)
        >>> direction_groups(net)
        2
    """
    first, last = net[0], net[2]
    assert isinstance(first, nn.Linear) and isinstance(last, nn.Linear)  # built by mlp()
    u = torch.cat([first.weight, first.bias[:, None]], 1).detach().double().cpu()
    a = last.weight.detach().double().cpu().norm(dim=0)
    weight = u.norm(dim=1) * a
    keep = weight > CONTRIBUTION * weight.max()
    v = u[keep] / u[keep].norm(dim=1, keepdim=True)
    sim = (v @ v.T).abs()
    reps: list[int] = []
    for j in range(v.shape[0]):
        if not any(float(sim[j, r]) >= cos for r in reps):
            reps.append(j)
    return len(reps)


def _merge(plateaus: list[tuple[int, int]], losses: list[float]) -> list[tuple[int, int]]:
    """Join plateaus that touch (at most 2 records apart) and differ by under 10% in loss."""
    merged: list[tuple[int, int]] = []
    for i, j in plateaus:
        if merged:
            a, b = merged[-1]
            if i - b <= 2 and losses[b] <= 1.1 * losses[i] and losses[i] <= 1.1 * losses[b]:
                merged[-1] = (a, j)
                continue
        merged.append((i, j))
    return merged


def _fit_widths(
    x: Tensor, target: Tensor, seed: int
) -> tuple[dict[int, float], dict[int, nn.Sequential]]:
    """Best RMS with which tanh nets of widths 1, 2, 3 fit ``target`` (4 inits each).

    Returns:
        The best RMS per width and the net that reaches it.
    """
    from torch_embed.experiments.fig4 import WIDTHS, _batch
    from torch_embed.experiments.training import batched_mse, train

    per = 4
    gen = torch.Generator().manual_seed(10_000 + seed)
    nets = _batch(per, [1.0] * per, gen, x.device)
    train(nets, batched_mse, x, target, steps=FIT_STEPS, lr=0.02, label="fig1: fitting")
    with torch.no_grad():
        rms = ((nets(x) - target) ** 2).mean(dim=(1, 2)).sqrt().cpu()
    single = nets.unbatch()
    fits: dict[int, float] = {}
    best: dict[int, nn.Sequential] = {}
    for k, w in enumerate(WIDTHS):
        j = k * per + int(rms[k * per : (k + 1) * per].argmin())
        fits[w] = float(rms[j])
        best[w] = _narrow(single[j], w)
    return fits, best


def _narrow(net: nn.Sequential, width: int) -> nn.Sequential:
    """The first ``width`` neurons of a 1-3-1 net from :func:`fig4._batch` (the rest are null)."""
    from torch_embed.experiments.training import mlp

    state = net.state_dict()
    out = mlp([1, width, 1], "tanh", dtype=state["0.weight"].dtype, device=state["0.weight"].device)
    out.load_state_dict(
        {
            "0.weight": state["0.weight"][:width],
            "0.bias": state["0.bias"][:width],
            "2.weight": state["2.weight"][:, :width],
            "2.bias": state["2.bias"],
        }
    )
    return out


def _seeded_critical_points(
    x: Tensor, y: Tensor, fitted: dict[int, nn.Sequential], plateau: int
) -> list[Any]:
    """Polish each narrow fit of a plateau's output into a critical point of the data loss.

    The narrow critical point a plateau sits near is found by starting where the wide
    output is: the best width-``w`` fit of that output (:func:`_fit_widths`) is polished
    on the training data, Newton steps only (the nearest critical point), then with
    L-BFGS first if Newton alone does not reach ``|∇R| < 1e-10``. Only polished points
    below that gradient norm are returned; how far their outputs are from the wide
    output is measured afterwards, so a polish that slides away does not match.
    """
    from torch_embed.critical import critical_point
    from torch_embed.experiments.fig4 import GTOL, CriticalPoint
    from torch_embed.landscape.condense import effective_widths

    loss_fn = nn.MSELoss()
    found = []
    for w, fit in sorted(fitted.items()):
        net = copy.deepcopy(fit)
        res = critical_point(net, loss_fn, x, y, max_iter=0, max_newton_iter=40)
        if res.grad_norm >= GTOL:
            net = copy.deepcopy(fit)
            res = critical_point(net, loss_fn, x, y, max_iter=500, max_newton_iter=40)
        if res.grad_norm >= GTOL:
            continue
        with torch.no_grad():
            output = net(x).flatten().cpu()
        eff = effective_widths(net, atol=1e-6)[0]
        found.append(
            CriticalPoint(w, "fit", plateau, 0.0, res.loss, res.grad_norm, eff, output, net)
        )
    return found


def _flattest(steps: list[int], losses: list[float], i: int, j: int) -> int:
    """The record in ``i..j`` where the loss curve is flattest on log-log axes."""

    def local_slope(k: int) -> float:
        a, b = max(k - 1, i), min(k + 1, j)
        if b == a or steps[a] <= 0:
            return math.inf
        return abs(math.log(losses[b] / losses[a]) / math.log(steps[b] / steps[a]))

    return min(range(i, j + 1), key=local_slope)


def _plot(
    numbers: dict[str, Any],
    outputs: list[Tensor],
    nearest: list[Tensor],
    x: Tensor,
    y: Tensor,
    path: Path,
) -> Path | None:
    from torch_embed.experiments.plotting import COLORS, new_figure, save_figure

    made = new_figure(1, 2, size=(13.0, 5.0))
    if made is None:
        return None
    fig, (ax_l, ax_f) = made
    steps = [max(s, 1) for s in numbers["steps"]]
    ax_l.plot(
        steps,
        numbers["losses"],
        color="black",
        linewidth=1.5,
        label=f"width-{numbers['width']} net",
    )
    for k, p in enumerate(numbers["plateaus"]):
        color = COLORS[k % len(COLORS)]
        match = f"width-{p['nearest_width']} critical point" if p["matches"] else "no narrow match"
        ax_l.axvspan(
            max(p["start"], 1),
            p["end"],
            color=color,
            alpha=0.18,
            label=f"P{k + 1}: loss {p['loss']:.3g}, {match}; {p['groups']} direction group(s)",
        )
        ax_l.text(
            math.sqrt(max(p["start"], 1) * p["end"]),
            0.97,
            f"P{k + 1}",
            transform=ax_l.get_xaxis_transform(),
            ha="center",
            va="top",
            fontsize=9,
            color=color,
        )
    ax_l.legend(fontsize=7, loc="lower left")
    ax_l.set_xscale("log")
    ax_l.set_yscale("log")
    ax_l.set_xlabel("gradient-descent step")
    ax_l.set_ylabel("MSE loss")
    ax_l.set_title(f"width {numbers['width']}: loss plateaus (shaded)")
    ax_f.scatter(x.flatten().cpu(), y.flatten().cpu(), s=14, color="0.6", label="data")
    for k, (out, near) in enumerate(zip(outputs, nearest)):
        p = numbers["plateaus"][k]
        color = COLORS[k % len(COLORS)]
        ax_f.plot(x.flatten().cpu(), out, color=color, linewidth=2.0, label=f"P{k + 1}: wide net")
        if not p["matches"]:
            continue
        ax_f.plot(
            x.flatten().cpu(),
            near,
            color=color,
            linestyle="--",
            linewidth=1.2,
            label=f"P{k + 1}: critical point of width {p['nearest_width']} "
            f"(RMS distance {p['nearest_distance']:.1e})",
        )
    ax_f.set_xlabel("x")
    ax_f.set_ylabel("output")
    ax_f.set_title("output at each plateau vs the nearest narrow critical point")
    ax_f.legend(fontsize=7, loc="upper left")
    return save_figure(fig, path)


def _analyse_plateaus(
    x: Tensor,
    y: Tensor,
    found: list[tuple[int, int]],
    hist: Any,
    snapshots: dict[int, dict[str, Tensor]],
    *,
    narrow_runs: int,
    fallback: bool,
    seed: int,
) -> tuple[list[dict[str, Any]], list[Tensor], list[Tensor], list[Any]]:
    """Compare the wide net at each plateau with narrow critical points (Fig. 1's analysis).

    Args:
        x: Training inputs ``(n, 1)``.
        y: Training targets ``(n, 1)``.
        found: The plateaus, as ``(i, j)`` index pairs into ``hist.steps``.
        hist: The wide net's :class:`~torch_embed.experiments.training.History`.
        snapshots: The wide 1-m-1 tanh net's ``state_dict`` at every recorded step.
        narrow_runs: Random starts per narrow width (as in Fig. 4).
        fallback: Let the polish of those starts fall back to L-BFGS.
        seed: Seed of the narrow starts and fits.

    Returns:
        One record per plateau (the entries of ``numbers["plateaus"]``), the wide output
        at each, the nearest narrow critical output at each, and every narrow critical
        point found (random starts, then each plateau's polished fits).
    """
    from torch_embed.experiments.fig4 import critical_points
    from torch_embed.experiments.training import mlp
    from torch_embed.hessian import gradient
    from torch_embed.landscape.condense import effective_widths

    dev = x.device
    loss_fn = nn.MSELoss()
    width = int(snapshots[hist.steps[0]]["0.weight"].shape[0])
    narrow, _ = critical_points(
        x, y, x, runs=narrow_runs, newton=20, fallback=fallback, seed=seed, label="fig1"
    )
    plateaus: list[dict[str, Any]] = []
    outputs: list[Tensor] = []
    nearest: list[Tensor] = []
    for i, j in found:
        mid = hist.steps[_flattest(hist.steps, hist.losses, i, j)]
        wide = mlp([1, width, 1], "tanh", device=dev)
        wide.load_state_dict(snapshots[mid])
        with torch.no_grad():
            f = wide(x).flatten().cpu()
            loss = float(loss_fn(wide(x), y))
        first = wide[0]
        assert isinstance(first, nn.Linear)  # built by mlp()
        u = torch.cat([first.weight, first.bias[:, None]], 1).detach()
        atol = REL_ATOL * float(u.norm(dim=1).max())
        eff = effective_widths(wide, atol=atol)[0]
        best: dict[int, tuple[float, int]] = {}
        for k, cp in enumerate(narrow):
            d = float(((cp.output - f) ** 2).mean().sqrt())
            if cp.width not in best or d < best[cp.width][0]:
                best[cp.width] = (d, k)
        residual = math.sqrt(loss)
        fits, fitted = _fit_widths(x, f.to(x).view(-1, 1), seed)
        seeded = _seeded_critical_points(x, y, fitted, len(plateaus))
        narrow.extend(seeded)
        for cp in seeded:
            d = float(((cp.output - f) ** 2).mean().sqrt())
            k = len(narrow) - len(seeded) + seeded.index(cp)
            if cp.width not in best or d < best[cp.width][0]:
                best[cp.width] = (d, k)
        represented = [w for w in sorted(fits) if fits[w] <= MATCH * residual]
        matches = [w for w in sorted(best) if best[w][0] <= MATCH * residual]
        # the narrowest width among the closest: a width-1 critical function embedded
        # at width 2 is the same function, at a distance equal up to rounding
        closest = min((best[w][0] for w in best), default=math.inf)
        overall = min((w for w in best if best[w][0] <= closest * (1 + 1e-9)), default=0)
        near_w = matches[0] if matches else overall
        plateaus.append(
            {
                "start": hist.steps[i],
                "end": hist.steps[j],
                "snapshot": mid,
                "loss": loss,
                "effective_width": eff,
                "condense_atol": atol,
                "groups": direction_groups(wide),
                "fit_rms_by_width": fits,
                "fit_width": represented[0] if represented else None,
                "grad_norm": float(gradient(wide, loss_fn, x, y).norm()),
                "distance_by_width": {w: best[w][0] for w in sorted(best)},
                "nearest_width": near_w,
                "nearest_distance": best[near_w][0] if best else math.inf,
                "nearest_loss": narrow[best[near_w][1]].loss if best else math.nan,
                "matches": bool(matches),
            }
        )
        outputs.append(f)
        nearest.append(narrow[best[near_w][1]].output if best else torch.full_like(f, math.nan))
    return plateaus, outputs, nearest, narrow


def run(*, quick: bool, out: Path, seed: int = 0, device: str = "cpu") -> FigureResult:
    """Train the wide net, find its plateaus, compare each with narrow critical points.

    Args:
        quick: Width 50, lr 0.05, 4000 steps, 4 narrow runs per width instead of the
            paper's width 500, lr 0.005, 300 000 steps (and 20 narrow runs per width).
        out: Output folder for ``fig1.png``.
        seed: Seed of the initialisation.
        device: Torch device.

    Returns:
        The :class:`~torch_embed.experiments.FigureResult`; ``numbers["plateaus"]`` has
        one entry per plateau.
    """
    from torch_embed.experiments.data import STAIRCASE_FORMULA, staircase
    from torch_embed.experiments.training import (
        find_plateaus,
        log_grid,
        mlp,
        small_init_,
        train,
    )

    dev = torch.device(device)
    x, y = staircase(50, device=dev)
    width = 50 if quick else 500
    lr = 0.05 if quick else 0.005
    steps = 4000 if quick else 300_000
    narrow_runs = 4 if quick else 20
    loss_fn = nn.MSELoss()
    net = mlp([1, width, 1], "tanh", device=dev)
    small_init_(net, exponent=3, generator=torch.Generator().manual_seed(seed))
    snapshots: dict[int, dict[str, Tensor]] = {}

    def snapshot(step: int, _loss: float) -> None:
        snapshots[step] = {k: v.detach().clone() for k, v in net.state_dict().items()}

    hist = train(
        net,
        loss_fn,
        x,
        y,
        steps=steps,
        lr=lr,
        method="gd",
        record_at=log_grid(steps, 400),
        label=f"fig1: GD, width {width}",
        callback=snapshot,
    )
    # the first 0.1% of the steps is the start-up of the tiny network (loss ~ mean y²)
    found = _merge(find_plateaus(hist.steps, hist.losses, start=max(1, steps // 1000)), hist.losses)
    plateaus, outputs, nearest, narrow = _analyse_plateaus(
        x, y, found, hist, snapshots, narrow_runs=narrow_runs, fallback=not quick, seed=seed
    )

    numbers: dict[str, Any] = {
        "width": width,
        "steps": hist.steps,
        "losses": hist.losses,
        "plateaus": plateaus,
        "narrow_critical_points": [
            {"width": cp.width, "loss": cp.loss, "grad_norm": cp.grad_norm} for cp in narrow
        ],
    }
    matched = [p for p in plateaus if p["matches"]]
    near_list = [p["nearest_width"] for p in matched]
    fit_list = [p["fit_width"] for p in plateaus]
    headline = [
        Headline(
            "loss plateaus",
            "several (a staircase on a log-step axis)",
            f"{len(plateaus)} at steps " + ", ".join(f"{p['start']}-{p['end']}" for p in plateaus),
            len(plateaus) >= PAPER_PLATEAUS,
            criterion=f"at least {PAPER_PLATEAUS} plateaus",
        ),
        Headline(
            "plateau by plateau: nearest narrow critical function (width, RMS distance)",
            "a narrow critical function at each plateau",
            "; ".join(
                f"P{k + 1} (loss {p['loss']:.3g}): width {p['nearest_width']} at "
                f"{p['nearest_distance']:.1e} vs residual {math.sqrt(p['loss']):.1e}"
                + ("" if p["matches"] else " (no match)")
                for k, p in enumerate(plateaus)
            ),
            bool(plateaus) and len(matched) == len(plateaus),
            criterion=f"every plateau matches: RMS distance to a polished narrow critical "
            f"output (|grad R| < 1e-10) <= {MATCH:g} x the plateau's residual RMS",
        ),
        Headline(
            "widths of the matched narrow critical functions, in plateau order",
            "1, 2, 3 (a staircase of widths)",
            ", ".join(map(str, near_list)) if near_list else "none",
            len(set(near_list)) >= PAPER_PLATEAUS and near_list == sorted(near_list),
            criterion=f"at least {PAPER_PLATEAUS} different widths, non-decreasing from "
            "plateau to plateau",
        ),
        Headline(
            "narrowest width that fits each plateau's output",
            "small (the wide net computes a narrow net's function)",
            ", ".join("> 3" if w is None else str(w) for w in fit_list),
            bool(plateaus) and all(w is not None for w in fit_list),
            criterion=f"at every plateau a tanh net of width <= 3 fits the wide output to "
            f"RMS <= {MATCH:g} x the residual RMS",
        ),
    ]
    notes = [
        f"data: 50-point staircase {STAIRCASE_FORMULA} (the paper's 1D data is not given)",
        f"width {width}, full-batch GD lr {lr}, {steps} steps, init N(0, 1/m^3)"
        + (" (--quick; the paper: width 500, lr 0.005, 300k steps)" if quick else ""),
        "direction groups / effective width (effective_widths, atol = "
        f"{REL_ATOL:g} x largest |[w; b]|) per plateau: "
        + ", ".join(
            f"P{k + 1} {p['groups']} / {p['effective_width']}" for k, p in enumerate(plateaus)
        )
        + "; the effective width merges only neurons with equal [w; b] within atol, and "
        "tanh neurons of one direction group keep different norms, so it is at or above "
        "the group count",
        f"narrow critical points: {len(narrow)} polished to |grad R| < 1e-10 (random "
        f"starts of widths 1-3 as in fig4, and at each plateau the best width-1, 2, 3 fits "
        f"of its output polished on the data); nearest: the narrowest width within "
        f"{MATCH:g} x the residual RMS, else the closest overall",
    ]
    for k, p in enumerate(plateaus):
        if not p["matches"]:
            notes.append(
                f"P{k + 1} (steps {p['start']}-{p['end']}, loss {p['loss']:.3g}, |grad R| = "
                f"{p['grad_norm']:.1e}) is not near any polished narrow critical point"
            )
    result = FigureResult(
        name="fig1",
        title=FIGURES["fig1"],
        quick=quick,
        settings={
            "data": f"staircase, 50 points: {STAIRCASE_FORMULA}",
            "network": f"1-{width}-1 tanh, float64",
            "loss": "MSE",
            "init": "every weight and bias ~ N(0, 1/m^3)",
            "training": f"full-batch GD lr {lr}, {steps} steps, seed {seed}",
            "plateaus": "find_plateaus (log-log slope <= 0.2 over >= 0.25 decades, from "
            "0.1% of the steps on), touching ones merged; snapshot where flattest",
            "device": str(dev),
        },
        headline=headline,
        numbers=numbers,
        notes=notes,
    )
    result.figure = _plot(numbers, outputs, nearest, x, y, out / "fig1.png")
    return result
