"""Probes behind the settings of the reproductions (docs/reproduction.md), not benchmarks.

Each probe is a short, seeded run that was used to choose (or to rule out) a setting the
papers leave open; the numbers docs/reproduction.md quotes from them come from these
commands. Nothing is written to RESULTS.md: the output is printed.

``fig1-targets``: 1D targets for Fig. 1, each a sum of ``tanh`` steps
``h·tanh((x - c)/s)`` on 50 points of ``[-15, 15]``. All targets are trained at once as a
:class:`~torch_embed.experiments.training.BatchedMLP` (each run gets exactly its own
gradient) from the papers' small initialisation ``N(0, 1/m³)`` with full-batch gradient
descent; the plateaus of each loss curve are found as ``fig1`` finds them. A target is
worth a full ``fig1`` run only if it shows at least three plateaus.

``fig3b-width``: Fig. 3(b) at another width: trains the 4-W-3 sigmoid net on Iris as
``fig3b`` does (Adam lr 0.02, init ``N(0, 1/m⁶)``), Newton-polishes snapshots of its
plateaus and counts the Hessian's eigenvalues with the figure's pinned tolerance.

``fig5-synthetic``: two synthetic stand-ins for Fig. 5's data (1000 samples, 10
one-hot classes, 16 inputs): ``mixture``, Gaussian classes whose means lie on
orthogonal axes with lengths falling geometrically (3, 1.5, 0.75, ...; noise 0.5), so
that classes could be learned one after another; ``xor``, five pairs of classes told
apart by a mean shift of 3 along their own axis and, within a pair, by the XOR of the
signs of the first two inputs. A 16-400-10 ReLU net from ``N(0, 1/m⁶)`` is trained with
Adam as ``fig5`` does; the loss (over the class-frequency loss) and the direction
groups are printed at every record, and the plateaus found with ``fig5``'s criterion.

``fig1-candidate``: Fig. 1's whole analysis (plateaus, narrow critical points, the three
judged criteria) at the paper's size on a candidate target; ``range10``, the staircase
with the inputs spread over ``[-150, 150]`` (the net sees ``10·x``); ``tall``, three
wide steps (scale 8) ten times as high. ``fig1-balance``: how balanced and how spread
out the first direction group of ``fig1``'s wide net is after a given number of steps.

``fig5-digits``: ``fig5``'s run on the digits with softmax cross-entropy instead of MSE
(``--loss ce``), or on 16-pixel digits (each 2x2 block averaged, ``--pixels 16``).

Usage::

    python bench/figure_probes.py fig1-targets --set A --lr 0.05 --steps 30000 --width 500
    python bench/figure_probes.py fig1-targets --set B --lr 0.02 --steps 75000 --width 200
    python bench/figure_probes.py fig3b-width --width 3 --steps 20000
    python bench/figure_probes.py fig5-synthetic --kind xor --lr 3e-4 --steps 1500
    python bench/figure_probes.py fig1-candidate --name range10
    python bench/figure_probes.py fig5-digits --loss ce --steps 20000
"""

from __future__ import annotations

import argparse
import copy

TARGETS: dict[str, list[list[tuple[float, float, float]]]] = {
    # (height, centre, scale) of each tanh step
    "A": [
        [(1.0, -7.5, 1), (0.5, 0, 1), (0.25, 7.5, 1)],  # the staircase of fig3a/fig4
        [(1.0, -7.5, 1), (0.25, 0, 1), (0.06, 7.5, 1)],
        [(1.0, -5, 1), (0.3, 5, 1), (0.1, 0, 1), (0.03, 10, 1)],
        [(1.0, 0, 3), (0.3, -8, 1), (0.1, 8, 1)],
        [(1.0, -7.5, 2), (0.3, 0, 1), (0.1, 7.5, 0.5)],
        [(1.0, 0, 1), (0.3, -7.5, 1), (0.1, 7.5, 1), (0.03, -12, 1)],
    ],
    "B": [
        [(1.0, -10, 1), (0.5, -5, 1), (0.25, 0, 1), (0.125, 5, 1), (0.0625, 10, 1)],
        [(1.0, -7.5, 1), (0.2, 0, 1), (0.04, 7.5, 1)],
        [(1.0, -5, 3), (0.3, 5, 1.5), (0.1, 0, 0.7), (0.03, 10, 0.5)],
        [(1.0, 0, 5), (0.5, -8, 1), (0.25, 8, 1), (0.12, -12, 0.5)],
        [(1.0, 0, 2), (0.3, -10, 0.5), (0.1, 10, 0.5), (0.03, -5, 0.5)],
        [(1.0, -7.5, 2), (0.5, 0, 2), (0.25, 7.5, 2), (0.125, 12, 2)],
    ],
}


def fig1_targets(name: str, lr: float, steps: int, width: int, xmax: float = 15.0) -> None:
    """Train every target of set ``name``; print its plateaus and loss curve.

    ``xmax`` rescales the input interval to ``[-xmax, xmax]`` (centres and scales with
    it), so the same shapes are seen by a net whose input weights start at the same size.
    """
    import torch

    from torch_embed.experiments.fig1 import _merge
    from torch_embed.experiments.training import BatchedMLP, find_plateaus, log_grid, train

    torch.set_num_threads(1)
    targets = TARGETS[name]
    x = torch.linspace(-xmax, xmax, 50, dtype=torch.float64)[:, None]
    ys = []
    for steps_k in targets:
        y = torch.zeros_like(x)
        for h, c, s in steps_k:
            y += h * torch.tanh((x - c * xmax / 15) / (s * xmax / 15))
        ys.append(y)
    y_all = torch.stack(ys)
    nets = BatchedMLP(
        len(targets),
        (1, width, 1),
        "tanh",
        generator=torch.Generator().manual_seed(0),
        std=width**-1.5,
    )
    losses: list[list[float]] = []

    def record(_step: int, _loss: float) -> None:
        with torch.no_grad():
            losses.append(((nets(x) - y_all) ** 2).mean(dim=(1, 2)).tolist())

    def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ((out - target) ** 2).mean(dim=(1, 2)).sum()

    hist = train(
        nets,
        loss_fn,
        x,
        y_all,
        steps=steps,
        lr=lr,
        method="gd",
        record_at=log_grid(steps, 400),
        callback=record,
    )
    print(
        f"set {name} on [-{xmax:g}, {xmax:g}]: width {width}, GD lr {lr}, {steps} steps, "
        "init N(0, 1/m^3), seed 0"
    )
    for k, target in enumerate(targets):
        curve = [row[k] for row in losses]
        found = _merge(find_plateaus(hist.steps, curve, start=max(1, steps // 1000)), curve)
        plateaus = ", ".join(f"{hist.steps[i]}-{hist.steps[j]} at {curve[i]:.3g}" for i, j in found)
        print(f"{k}: {target}")
        print(f"   {len(found)} plateau(s): {plateaus or '-'}; final loss {curve[-1]:.3g}")


def fig3b_width(width: int, steps: int, seed: int = 0) -> None:
    """Train 4-``width``-3 on Iris as fig3b does; polish and count plateau snapshots."""
    import torch
    from torch import nn

    from torch_embed.critical import critical_point
    from torch_embed.experiments.counts import count
    from torch_embed.experiments.data import iris
    from torch_embed.experiments.fig3b import FLAT
    from torch_embed.experiments.training import find_plateaus, log_grid, mlp, small_init_, train
    from torch_embed.hessian import gradient, hessian

    torch.set_num_threads(1)
    x, y = iris()
    loss_fn = nn.MSELoss()
    net = mlp([4, width, 3], "sigmoid")
    small_init_(net, exponent=6, generator=torch.Generator().manual_seed(seed))
    snapshots: dict[int, dict[str, torch.Tensor]] = {}

    def snapshot(step: int, _loss: float) -> None:
        snapshots[step] = copy.deepcopy(net.state_dict())

    hist = train(
        net, loss_fn, x, y, steps=steps, lr=0.02, record_at=log_grid(steps, 120), callback=snapshot
    )
    found = find_plateaus(hist.steps, hist.losses, start=10)
    print(f"4-{width}-3 sigmoid on Iris, Adam lr 0.02, {steps} steps, seed {seed}")
    print("plateaus:", ", ".join(f"{hist.steps[i]}-{hist.steps[j]}" for i, j in found))
    picked = [hist.steps[k] for i, j in found for k in range(i, j + 1) if hist.steps[k] >= 40]
    for step in picked[::4]:
        probe = mlp([4, width, 3], "sigmoid")
        probe.load_state_dict(snapshots[step])
        res = critical_point(probe, loss_fn, x, y, max_iter=0, max_newton_iter=200)
        g = float(gradient(probe, loss_fn, x, y).norm())
        c = count(hessian(probe, loss_fn, x, y), g, floor=FLAT)
        print(
            f"step {step}: polished loss {res.loss:.6f}, |grad R| {g:.1e}, -/0/+ "
            f"{c.as_tuple()}, gap {c.gap:.1e}{' (ambiguous)' if c.ambiguous else ''}"
        )


def fig5_synthetic(kind: str, lr: float, steps: int) -> None:
    """Train the Fig. 5 network on a synthetic set; print loss, groups and plateaus."""
    import torch
    from torch import nn

    from torch_embed.experiments.data import one_hot
    from torch_embed.experiments.fig5 import direction_groups
    from torch_embed.experiments.training import find_plateaus, log_grid, mlp, small_init_, train

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(1)
    n, d = 1000, 16
    labels = torch.arange(n) % 10
    if kind == "mixture":
        means = torch.zeros(10, d)
        means[torch.arange(10), torch.arange(10)] = 3.0 * 2.0 ** -torch.arange(10.0)
        x = means[labels] + 0.5 * torch.randn(n, d, generator=gen)
    else:
        x = torch.randn(n, d, generator=gen)
        means = torch.zeros(5, d)
        means[torch.arange(5), 2 + torch.arange(5)] = 3.0
        x += means[labels // 2]
        sign = torch.where(labels % 2 == 1, 1.0, -1.0)
        x[:, 1] = x[:, 1].abs() * torch.sign(x[:, 0]) * sign
    x = x.float()
    y = one_hot(labels, 10).float()
    baseline = float(((y - y.mean(0)) ** 2).mean())
    net = mlp([d, 400, 10], "relu", dtype=torch.float32)
    small_init_(net, exponent=6, generator=torch.Generator().manual_seed(0))
    print(f"{kind}: 16-400-10 ReLU, Adam lr {lr}, {steps} steps; step, loss / baseline, groups")

    def record(step: int, loss: float) -> None:
        print(f"{step} {loss / baseline:.4f} {direction_groups(net)[1]}", flush=True)

    hist = train(
        net, nn.MSELoss(), x, y, steps=steps, lr=lr, record_at=log_grid(steps, 100), callback=record
    )
    found = find_plateaus(hist.steps, hist.losses, slope=0.0, noise=0.01, decades=0.15)
    print(
        "plateaus (fig5's criterion):",
        ", ".join(
            f"{hist.steps[i]}-{hist.steps[j]} at {hist.losses[i] / baseline:.3f} x baseline"
            for i, j in found
        )
        or "-",
    )


def fig5_digits(loss: str, pixels: int, steps: int, lr: float = 3e-5) -> None:
    """Fig. 5's run on the digits with another loss or fewer pixels; print its plateaus.

    ``loss``: ``mse`` (as ``fig5``) or ``ce`` (softmax cross-entropy on the same one-hot
    targets); ``pixels``: 64 (as ``fig5``) or 16 (each 2x2 block of the 8x8 image
    averaged: a coarser, harder to separate image). The rest is ``fig5``'s setting: the
    first 1000 digits, a 64-400-10 (or 16-400-10) ReLU net from ``N(0, 1/m⁶)``, full-batch
    Adam at lr ``3e-5``. The loss over the class-frequency loss (the best constant
    output's: the mean squared deviation from the class frequencies for ``mse``, their
    entropy for ``ce``) and the direction groups are printed at every record, then the
    plateaus found with ``fig5``'s criterion and whether each is a plateau of learning
    (loss at most ``fig5.NONTRIVIAL`` times the class-frequency loss).
    """
    import torch
    from torch import nn

    from torch_embed.experiments.data import digits
    from torch_embed.experiments.fig5 import NONTRIVIAL, WIDTH, direction_groups
    from torch_embed.experiments.training import find_plateaus, log_grid, mlp, small_init_, train

    torch.set_num_threads(1)
    x, y = digits(1000, dtype=torch.float32)
    if pixels == 16:
        x = torch.nn.functional.avg_pool2d(x.view(-1, 1, 8, 8), 2).flatten(1)
    freq = y.mean(0)
    if loss == "ce":
        loss_fn: nn.Module = nn.CrossEntropyLoss()
        baseline = float(-(freq * freq.log()).sum())
    else:
        loss_fn = nn.MSELoss()
        baseline = float(((y - freq) ** 2).mean())
    net = mlp([pixels, WIDTH, 10], "relu", dtype=torch.float32)
    small_init_(net, exponent=6, generator=torch.Generator().manual_seed(0))
    print(
        f"digits, {pixels} pixels, {loss}: {pixels}-{WIDTH}-10 ReLU, Adam lr {lr}, {steps} "
        f"steps, seed 0; class-frequency loss {baseline:.5g}; step, loss / that, groups"
    )

    def record(step: int, value: float) -> None:
        print(f"{step} {value / baseline:.4f} {direction_groups(net)[1]}", flush=True)

    hist = train(
        net, loss_fn, x, y, steps=steps, lr=lr, record_at=log_grid(steps, 120), callback=record
    )
    found = find_plateaus(hist.steps, hist.losses, slope=0.0, noise=0.01, decades=0.15)
    print(
        "plateaus (fig5's criterion):",
        ", ".join(
            f"{hist.steps[i]}-{hist.steps[j]} at {hist.losses[i] / baseline:.3f} x baseline"
            + (" (learned)" if max(hist.losses[i : j + 1]) <= NONTRIVIAL * baseline else "")
            for i, j in found
        )
        or "-",
    )


CANDIDATES: dict[str, tuple[float, list[tuple[float, float, float]]]] = {
    # name: (input scale K, steps (height, centre, scale) on [-15, 15]); the net sees K·x
    "range10": (10.0, [(1.0, -7.5, 1), (0.5, 0, 1), (0.25, 7.5, 1)]),
    "tall": (1.0, [(10.0, -7.5, 8), (5.0, 0, 8), (2.5, 7.5, 8)]),
}


def fig1_candidate(name: str, width: int, lr: float, steps: int, runs: int) -> None:
    """Fig. 1's full analysis (``fig1._analyse_plateaus``) on a candidate target.

    The candidate's target is a sum of ``tanh`` steps on the 50 points of ``[-15, 15]``;
    the wide net is trained by full-batch gradient descent from ``N(0, 1/m³)`` on the
    inputs multiplied by the candidate's ``K`` (a wider input range; ``K = 1`` is
    ``fig1``'s), then every snapshot is mapped back to the unscaled inputs (its input
    weights times ``K``: the same function), where the plateaus are compared with
    narrow critical points exactly as ``fig1`` does. Prints each plateau and the three
    judged criteria of ``fig1``.
    """
    import math

    import torch
    from torch import nn

    from torch_embed.experiments.fig1 import MATCH, PAPER_PLATEAUS, _analyse_plateaus, _merge
    from torch_embed.experiments.training import find_plateaus, log_grid, mlp, small_init_, train

    torch.set_num_threads(1)
    scale, spec = CANDIDATES[name]
    x = torch.linspace(-15, 15, 50, dtype=torch.float64)[:, None]
    y = torch.zeros_like(x)
    for h, c, s in spec:
        y += h * torch.tanh((x - c) / s)
    net = mlp([1, width, 1], "tanh")
    small_init_(net, exponent=3, generator=torch.Generator().manual_seed(0))
    snapshots: dict[int, dict[str, torch.Tensor]] = {}

    def snapshot(step: int, _loss: float) -> None:
        state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        state["0.weight"] *= scale
        snapshots[step] = state

    hist = train(
        net,
        nn.MSELoss(),
        x * scale,
        y,
        steps=steps,
        lr=lr,
        method="gd",
        record_at=log_grid(steps, 400),
        label=f"candidate {name}",
        callback=snapshot,
    )
    print(f"candidate {name}: K = {scale:g}, target {spec}; width {width}, GD lr {lr}, {steps}")
    print(
        "loss curve:",
        ", ".join(f"{s} {v:.3g}" for s, v in list(zip(hist.steps, hist.losses))[::20]),
    )
    found = _merge(find_plateaus(hist.steps, hist.losses, start=max(1, steps // 1000)), hist.losses)
    plateaus, _, _, narrow = _analyse_plateaus(
        x, y, found, hist, snapshots, narrow_runs=runs, fallback=True, seed=0
    )
    print("narrow critical losses:", sorted({round(cp.loss, 5) for cp in narrow}))
    for k, p in enumerate(plateaus):
        print(
            f"P{k + 1} steps {p['start']}-{p['end']} loss {p['loss']:.4g}: nearest width "
            f"{p['nearest_width']} at RMS {p['nearest_distance']:.2g} vs residual "
            f"{math.sqrt(p['loss']):.2g} ({'match' if p['matches'] else 'no match'}); fit "
            f"width {p['fit_width']}; |grad R| {p['grad_norm']:.1e}; groups {p['groups']}"
        )
    near = [p["nearest_width"] for p in plateaus if p["matches"]]
    print(
        f"criteria: >= {PAPER_PLATEAUS} plateaus: {len(plateaus) >= PAPER_PLATEAUS}; every "
        f"plateau matches (<= {MATCH:g} x residual): "
        f"{bool(plateaus) and len(near) == len(plateaus)}; >= {PAPER_PLATEAUS} widths, "
        f"non-decreasing: {len(set(near)) >= PAPER_PLATEAUS and near == sorted(near)}"
    )


def fig1_balance(steps: int) -> None:
    """The wide net of ``fig1`` (paper's size) after ``steps`` steps: is its group balanced?

    Trains the 1-500-1 tanh net on the staircase exactly as ``fig1`` does (GD lr 0.005,
    ``N(0, 1/m³)``, seed 0) and prints, for the neurons that matter (``|a|·|[w; b]|``
    above 1% of the largest, as ``fig1.direction_groups`` keeps them): their number, the
    direction groups, the median and range of ``|a_j| / |[w_j; b_j]|``, the participation
    ratio ``(Σ c_j)² / Σ c_j²`` of the contributions ``c_j = |a_j|·|[w_j; b_j]|`` and the
    loss next to the best affine fit's.
    """
    import torch
    from torch import nn

    from torch_embed.experiments.data import staircase
    from torch_embed.experiments.fig1 import CONTRIBUTION, direction_groups
    from torch_embed.experiments.training import mlp, small_init_, train

    torch.set_num_threads(1)
    x, y = staircase(50)
    net = mlp([1, 500, 1], "tanh")
    small_init_(net, exponent=3, generator=torch.Generator().manual_seed(0))
    hist = train(net, nn.MSELoss(), x, y, steps=steps, lr=0.005, method="gd")
    u = torch.cat([net[0].weight, net[0].bias[:, None]], 1).detach().norm(dim=1)
    a = net[2].weight.detach().abs().flatten()
    c = a * u
    keep = c > CONTRIBUTION * c.max()
    ratio = (a / u)[keep]
    design = torch.cat([x, torch.ones_like(x)], 1)
    affine = design @ torch.linalg.lstsq(design, y).solution
    print(
        f"staircase, width 500, GD lr 0.005, {steps} steps, seed 0: loss {hist.final:.4g} "
        f"(best affine fit {float(((affine - y) ** 2).mean()):.4g}); {int(keep.sum())} "
        f"neurons matter, {direction_groups(net)} direction group(s); |a|/|[w; b]| median "
        f"{float(ratio.median()):.3g} (range {float(ratio.min()):.3g}-{float(ratio.max()):.3g});"
        f" participation ratio of the contributions {float(c.sum() ** 2 / (c**2).sum()):.0f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="probe", required=True)
    p1 = sub.add_parser("fig1-targets", help="1D targets for Fig. 1: plateaus of each")
    p1.add_argument("--set", choices=sorted(TARGETS), default="A")
    p1.add_argument("--lr", type=float, default=0.05)
    p1.add_argument("--steps", type=int, default=30_000)
    p1.add_argument("--width", type=int, default=500)
    p1.add_argument("--xmax", type=float, default=15.0)
    p3 = sub.add_parser("fig3b-width", help="Fig. 3(b) at another width")
    p3.add_argument("--width", type=int, default=3)
    p3.add_argument("--steps", type=int, default=20_000)
    p3.add_argument("--seed", type=int, default=0)
    p5 = sub.add_parser("fig5-synthetic", help="Fig. 5 on a synthetic data set")
    p5.add_argument("--kind", choices=["mixture", "xor"], default="xor")
    p5.add_argument("--lr", type=float, default=3e-4)
    p5.add_argument("--steps", type=int, default=1500)
    p6 = sub.add_parser("fig5-digits", help="Fig. 5 on digits with another loss or pixels")
    p6.add_argument("--loss", choices=["mse", "ce"], default="mse")
    p6.add_argument("--pixels", type=int, choices=[64, 16], default=64)
    p6.add_argument("--steps", type=int, default=20_000)
    p7 = sub.add_parser("fig1-candidate", help="Fig. 1's full analysis on a candidate")
    p7.add_argument("--name", choices=sorted(CANDIDATES), default="range10")
    p7.add_argument("--width", type=int, default=500)
    p7.add_argument("--lr", type=float, default=0.005)
    p7.add_argument("--steps", type=int, default=300_000)
    p7.add_argument("--runs", type=int, default=20)
    p8 = sub.add_parser("fig1-balance", help="Fig. 1's wide net: a balanced group?")
    p8.add_argument("--steps", type=int, default=2000)
    args = parser.parse_args()
    if args.probe == "fig1-targets":
        fig1_targets(args.set, args.lr, args.steps, args.width, args.xmax)
    elif args.probe == "fig3b-width":
        fig3b_width(args.width, args.steps, args.seed)
    elif args.probe == "fig1-candidate":
        fig1_candidate(args.name, args.width, args.lr, args.steps, args.runs)
    elif args.probe == "fig1-balance":
        fig1_balance(args.steps)
    elif args.probe == "fig5-digits":
        fig5_digits(args.loss, args.pixels, args.steps)
    else:
        fig5_synthetic(args.kind, args.lr, args.steps)


if __name__ == "__main__":
    main()
