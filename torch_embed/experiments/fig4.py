"""Fig. 4 of the NeurIPS 2021 paper: critical points of widths 1, 2, 3 cluster into classes.

Many tanh networks of widths 1, 2 and 3 are trained on the 1D staircase with
full-batch gradient descent from initialisations of many scales (small ones stall on
the plateaus of narrower networks), then polished with Newton steps to the nearest
critical point (kept if ``|∇R| < 1e-10``, the paper's criterion). The critical points
are clustered by loss and output function; each class is labelled with the narrowest
width it embeds from: the narrowest width at which it was found, or the effective
width of a member (:func:`torch_embed.landscape.condense.effective_widths`), whichever
is smaller. The paper's claim: wider networks' critical points include the classes of
narrower ones (the Embedding Principle), so classes found at width 3 carry labels 1
and 2 too.

All runs of one width are trained together as one batched module
(:class:`torch_embed.experiments.training.BatchedMLP`), which is exact: each run's
gradient and update are its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from torch_embed.experiments import FIGURES, FigureResult, Headline
from torch_embed.experiments.training import BatchedMLP

__all__ = ["CriticalPoint", "critical_points", "run"]

WIDTHS = (1, 2, 3)
GTOL = 1e-10
LOSS_RTOL = 1e-6
OUTPUT_ATOL = 1e-3
CONDENSE_ATOL = 1e-6


METHODS: tuple[Literal["gd", "adam"], ...] = ("gd", "adam")
LR = 0.02
STEPS = 1500


def _batch(per: int, stds: list[float], gen: torch.Generator, dev: torch.device) -> BatchedMLP:
    """``per`` runs of each width as one batch of width-3 networks.

    A width-``w`` run is a width-3 run with ``3 - w`` null neurons (zero fan-in, bias
    and fan-out). With tanh (``σ(0) = 0``) their gradients are exactly zero, so under
    gradient descent and Adam they stay null and the run is exactly a width-``w``
    network (the null embedding of docs/theory.md, "One-step null embedding", at work).
    """
    top = max(WIDTHS)
    n = per * len(WIDTHS)
    nets = BatchedMLP(n, (1, top, 1), "tanh", generator=gen, std=1.0, device=dev)
    with torch.no_grad():
        scale = torch.tensor(stds * len(WIDTHS), dtype=torch.float64, device=dev)
        mask = torch.ones(n, top, dtype=torch.float64, device=dev)
        for i, w in enumerate(WIDTHS):
            mask[i * per : (i + 1) * per, w:] = 0.0
        nets.w1.mul_(scale[:, None, None] * mask[:, :, None])
        nets.b1.mul_(scale[:, None] * mask)
        nets.w2.mul_(scale[:, None, None] * mask[:, None, :])
        nets.b2.mul_(scale[:, None])
    return nets


@dataclass
class CriticalPoint:
    """One polished critical point of a 1-m-1 tanh network on the staircase.

    Attributes:
        width: Hidden width ``m``.
        method: ``"gd"`` or ``"adam"`` (how it was trained before polishing).
        run: Index of the run among those of its width and method.
        init_std: Standard deviation of its initialisation.
        loss: Loss at the critical point.
        grad_norm: ``|∇R|`` after polishing.
        effective_width: Width left by :func:`~torch_embed.landscape.condense.condense`
            with ``atol = 1e-6``.
        output: The network's output at the evaluation points.
        net: The polished network.
    """

    width: int
    method: str
    run: int
    init_std: float
    loss: float
    grad_norm: float
    effective_width: int
    output: Tensor
    net: nn.Sequential


def critical_points(
    x: Tensor,
    y: Tensor,
    points: Tensor,
    *,
    runs: int,
    newton: int,
    fallback: bool,
    seed: int,
    label: str = "fig4",
) -> tuple[list[CriticalPoint], dict[int, int]]:
    """Train ``runs`` tanh nets of each width 1, 2, 3 and polish them to critical points.

    Half the runs of each width use full-batch gradient descent (which stalls on the
    plateaus of narrower networks), half Adam (which reaches minima), both with lr
    0.02 for 1500 steps, from ``N(0, s²)`` with ``s`` log-spaced in ``[1e-3, 1]``. Each
    is polished with Newton steps (``critical_point(max_iter=0)``), and with ``fallback``
    also with L-BFGS when Newton alone does not converge; runs above
    ``|∇R| = 1e-10`` are left out.

    Args:
        x: Training inputs.
        y: Training targets.
        points: Where to evaluate each critical point's output.
        runs: Runs per width (split evenly between GD and Adam).
        newton: Maximum Newton iterations.
        fallback: Retry with L-BFGS first when Newton alone does not converge.
        seed: Seed of the initialisations.
        label: Prefix of the progress lines.

    Returns:
        The converged critical points and the number of runs tried per width.
    """
    from torch_embed.critical import critical_point
    from torch_embed.experiments.progress import Progress
    from torch_embed.experiments.training import batched_mse, mlp, train
    from torch_embed.landscape.condense import effective_widths

    dev = x.device
    loss_fn = nn.MSELoss()
    per = max(1, runs // len(METHODS))
    stds = torch.logspace(-3, 0, per, dtype=torch.float64).tolist()
    trained: list[tuple[int, str, int, nn.Sequential]] = []
    for m, method in enumerate(METHODS):
        gen = torch.Generator().manual_seed(seed * 100 + m)
        nets = _batch(per, stds, gen, dev)
        train(
            nets, batched_mse, x, y, steps=STEPS, lr=LR, method=method, label=f"{label}: {method}"
        )
        for j, wide in enumerate(nets.unbatch()):
            w = WIDTHS[j // per]
            state = wide.state_dict()
            net = mlp([1, w, 1], "tanh", device=dev)
            net.load_state_dict(
                {
                    "0.weight": state["0.weight"][:w],
                    "0.bias": state["0.bias"][:w],
                    "2.weight": state["2.weight"][:, :w],
                    "2.bias": state["2.bias"],
                }
            )
            trained.append((w, method, j % per, net))
    found: list[CriticalPoint] = []
    tried = {w: sum(t[0] == w for t in trained) for w in WIDTHS}
    with Progress(f"{label}: polishing", len(trained)) as bar:
        for i, (w, how, k, net) in enumerate(trained):
            # Newton: the nearest critical point (e.g. the saddle a plateau sits on);
            # runs caught mid-descent do not converge and are left out, as in the paper.
            res = critical_point(net, loss_fn, x, y, max_iter=0, max_newton_iter=newton)
            if res.grad_norm >= GTOL and fallback:
                res = critical_point(net, loss_fn, x, y, max_iter=500, max_newton_iter=newton)
            bar.update(i + 1)
            if res.grad_norm >= GTOL:
                continue
            with torch.no_grad():
                output = net(points).flatten().cpu()
            eff = effective_widths(net, atol=CONDENSE_ATOL)[0]
            found.append(
                CriticalPoint(w, how, k, stds[k], res.loss, res.grad_norm, eff, output, net)
            )
    return found, tried


def _cluster(points: list[CriticalPoint]) -> list[list[CriticalPoint]]:
    """Greedy clustering in order of loss: same loss (relative) and same output function."""
    classes: list[list[CriticalPoint]] = []
    for p in sorted(points, key=lambda p: (p.loss, p.width)):
        for members in classes:
            q = members[0]
            same_loss = abs(q.loss - p.loss) <= LOSS_RTOL * max(q.loss, 1e-8)
            if same_loss and float((q.output - p.output).abs().max()) <= OUTPUT_ATOL:
                members.append(p)
                break
        else:
            classes.append([p])
    return classes


def _plot(
    classes: list[dict[str, Any]], grid: Tensor, x: Tensor, y: Tensor, path: Path
) -> Path | None:
    from torch_embed.experiments.plotting import COLORS, new_figure, save_figure

    made = new_figure(1, 2, size=(13.0, 5.0))
    if made is None:
        return None
    fig, (ax_l, ax_f) = made
    markers = {1: "o", 2: "s", 3: "D"}  # by label, so colour and shape say the same
    by_label = {w: COLORS[k] for k, w in enumerate(WIDTHS)}
    n = max(len(classes), 1)
    floor = 1e-8  # a loss below (the global minimum, ~1e-25) is drawn here (log axis)
    counted = len(classes) <= 6  # more "×k" labels would overlap: the counts are in the JSON
    for c, cls in enumerate(classes):
        label = int(cls["label"])
        for w in WIDTHS:
            losses = [p["loss"] for p in cls["members"] if p["width"] == w]
            if not losses:
                continue
            xpos = w + 0.6 * (c - (n - 1) / 2) / n
            ypos = max(losses[0], floor)
            ax_l.scatter([xpos], [ypos], marker=markers[label], s=50, color=by_label[label])
            if not counted:
                continue
            ax_l.annotate(
                f"×{len(losses)}",
                (xpos, ypos),
                textcoords="offset points",
                xytext=(6, -3),
                fontsize=7,
                color=by_label[label],
            )
    for w in WIDTHS:
        ax_l.scatter(
            [], [], color=by_label[w], marker=markers[w], label=f"class labelled width {w}"
        )
    ax_l.set_yscale("log")
    ax_l.set_xticks(list(WIDTHS))
    ax_l.set_xlim(0.5, max(WIDTHS) + 0.5)
    ax_l.set_xlabel(
        "width of the runs"
        + ("  (×k: k runs of that width reached the class)" if counted else "")
        + f"\na loss below {floor:.0e} (the global minimum) is drawn at {floor:.0e}"
    )
    ax_l.set_ylabel("loss at the critical point (|∇R| < 1e-10), log scale")
    ax_l.set_title(f"{len(classes)} classes of critical points by the width they were found at")
    ax_l.legend(fontsize=8, loc="lower left")
    ax_f.scatter(x.flatten().cpu(), y.flatten().cpu(), s=12, color="0.6", label="data", zorder=0)
    styles = {1: "-", 2: "--", 3: ":"}
    for cls in classes:
        w = int(cls["label"])
        ax_f.plot(
            grid.flatten().cpu(),
            cls["output"],
            color=by_label[w],
            linestyle=styles[w],
            linewidth=1.3,
            alpha=0.85,
        )
    for w in WIDTHS:
        k = sum(int(c["label"]) == w for c in classes)
        ax_f.plot(
            [], [], color=by_label[w], linestyle=styles[w], label=f"{k} class(es) from width {w}"
        )
    ax_f.set_xlabel("x")
    ax_f.set_ylabel("output")
    ax_f.set_title("output function of every class")
    ax_f.legend(fontsize=8, loc="upper left")
    return save_figure(fig, path)


def run(*, quick: bool, out: Path, seed: int = 0, device: str = "cpu") -> FigureResult:
    """Train many runs per width, polish, cluster, label each class.

    Args:
        quick: 8 runs per width and Newton only (runs that do not converge are left
            out) instead of 200 runs and an L-BFGS fallback.
        out: Output folder for ``fig4.png``.
        seed: Seed of the initialisations.
        device: Torch device.

    Returns:
        The :class:`~torch_embed.experiments.FigureResult`; ``numbers["classes"]`` lists
        the classes with their losses, widths found at and labels.
    """
    from torch_embed.experiments.data import STAIRCASE_FORMULA, staircase

    dev = torch.device(device)
    x, y = staircase(50, device=dev)
    grid = torch.linspace(-15.0, 15.0, 121, dtype=torch.float64, device=dev)[:, None]
    runs = 8 if quick else 200
    steps = STEPS
    # critical_point counts its cheap chord steps (a reused eigendecomposition) in
    # max_newton_iter: 40 keeps 4 of the 8 quick width-3 runs, 20 only 2
    newton = 40
    points, tried = critical_points(
        x, y, grid, runs=runs, newton=newton, fallback=not quick, seed=seed
    )

    classes: list[dict[str, Any]] = []
    for members in _cluster(points):
        widths_found = sorted({p.width for p in members})
        label = min(widths_found + [p.effective_width for p in members])
        classes.append(
            {
                "loss": members[0].loss,
                "widths": widths_found,
                "count_by_width": {w: sum(p.width == w for p in members) for w in WIDTHS},
                "effective_widths": sorted({p.effective_width for p in members}),
                "label": label,
                "output": members[0].output.tolist(),
                "members": [
                    {
                        "width": p.width,
                        "optimizer": p.method,
                        "run": p.run,
                        "init_std": p.init_std,
                        "loss": p.loss,
                        "grad_norm": p.grad_norm,
                        "effective_width": p.effective_width,
                    }
                    for p in members
                ],
            }
        )
    converged = {w: sum(p.width == w for p in points) for w in WIDTHS}
    embedded = [c for c in classes if max(c["widths"]) > int(c["label"])]
    wide_from_narrow = [c for c in classes if 3 in c["widths"] and int(c["label"]) < 3]
    numbers: dict[str, Any] = {
        "classes": [{k: v for k, v in c.items() if k != "output"} for c in classes],
        "converged": converged,
        "tried": tried,
        "grid": grid.flatten().tolist(),
    }
    headline = [
        Headline(
            "classes of critical points",
            "several, each embedded in wider nets",
            f"{len(classes)} classes from {len(points)} critical points",
            len(classes) >= 2,
            exact=True,
            criterion="at least 2 classes",
        ),
        Headline(
            "classes found at a larger width than their label",
            ">= 1 (narrow critical points reappear in wide nets)",
            f"{len(embedded)}: "
            + "; ".join(
                f"loss {c['loss']:.3g} from width {c['label']} at {c['widths']}" for c in embedded
            ),
            len(embedded) >= 1,
            criterion="at least 1 class found at a width larger than its label",
        ),
        Headline(
            "width-3 critical points embedded from width 1 or 2",
            "yes",
            f"{len(wide_from_narrow)} class(es)",
            len(wide_from_narrow) >= 1,
            criterion="at least 1 class found at width 3 is labelled 1 or 2",
        ),
    ]
    notes = [
        f"data: 50-point staircase {STAIRCASE_FORMULA}",
        f"{runs} runs per width"
        + (" (--quick; the paper uses 200)" if quick else "")
        + f", half full-batch GD, half Adam (lr {LR}, {steps} steps; GD stalls on plateaus, "
        f"Adam reaches minima), init N(0, s²) with s log-spaced in [1e-3, 1]; Newton "
        f"polish kept {converged} of {tried} runs at |grad R| < {GTOL:g}",
        f"clusters: equal loss (relative {LOSS_RTOL:g}) and output within {OUTPUT_ATOL:g} "
        f"on 121 grid points",
        "label = narrowest of: widths a class was found at, effective widths of its "
        f"members (condense, atol {CONDENSE_ATOL:g}; tanh copies with opposite signs are "
        f"not merged by condense, so the first is often the smaller)",
    ]
    result = FigureResult(
        name="fig4",
        title=FIGURES["fig4"],
        quick=quick,
        settings={
            "data": f"staircase, 50 points: {STAIRCASE_FORMULA}",
            "networks": "1-m-1 tanh, m = 1, 2, 3, float64",
            "loss": "MSE",
            "runs_per_width": runs,
            "training": f"half the runs full-batch GD, half Adam, lr {LR}, {steps} steps; "
            f"batched (a width-w run is a width-3 run with 3-w null neurons, which stay null)",
            "init": "every weight and bias ~ N(0, s^2), s log-spaced in [1e-3, 1] over runs",
            "polish": f"critical_point(max_iter=0, max_newton_iter={newton})"
            + ("" if quick else ", then with L-BFGS (max_iter=500) if not converged")
            + f"; keep |grad| < {GTOL:g}",
            "seed": seed,
            "device": str(dev),
        },
        headline=headline,
        numbers=numbers,
        notes=notes,
    )
    result.figure = _plot(classes, grid, x, y, out / "fig4.png")
    for c in classes:  # drop the long output lists from the console-facing numbers
        c.pop("output", None)
    if not math.isfinite(sum(p.loss for p in points) if points else 0.0):
        result.notes.append("some losses are not finite")
    return result
