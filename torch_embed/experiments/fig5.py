"""Fig. 5 of the NeurIPS 2021 paper: condensation of a wide ReLU network at a plateau.

A width-400 ReLU network (64 inputs, 10 one-hot outputs, MSE) is trained with
full-batch Adam (lr ``3e-5``) from the small initialisation ``N(0, 1/m⁶)`` on 1000
images. MNIST cannot be downloaded here: scikit-learn's bundled 8x8 digits replace it
(64 pixels instead of 784). During training the loss stalls on plateaus; at the longest
one, the neurons' input vectors ``[w; b]`` point in only a few directions. ReLU is
positively homogeneous, so neurons with parallel input vectors can be merged
exactly: :func:`torch_embed.landscape.condense.condense` with ``cos`` merges them (and
drops neurons that never grew), giving a narrow network with (nearly) the same output.
The paper finds 58 direction groups and a 58-wide reduced network that stalls at the
same loss; we report what we find on digits, and train the wide and the reduced
networks on from the plateau side by side.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from torch_embed.experiments import FIGURES, FigureResult, Headline

__all__ = ["direction_groups", "reduced_adam_state", "run"]

PAPER_GROUPS = 58
COS = 0.99
REL_ATOL = 1e-3
WIDTH = 400
NONTRIVIAL = 0.9  # a learned plateau's loss is at most this times the constant-output loss
STALL = 0.01  # relative loss change of a net that stays on the plateau


def _fan_in(net: nn.Sequential) -> tuple[Tensor, Tensor]:
    first, last = net[0], net[2]
    assert isinstance(first, nn.Linear) and isinstance(last, nn.Linear)  # built by mlp()
    u = torch.cat([first.weight, first.bias[:, None]], 1).detach().to(torch.float64).cpu()
    a = last.weight.detach().to(torch.float64).cpu()
    return u, a


def _atol(net: nn.Sequential) -> float:
    u, a = _fan_in(net)
    return REL_ATOL * max(float(u.norm(dim=1).max()), float(a.norm(dim=0).max()))


def direction_groups(
    net: nn.Sequential, *, cos: float = COS, atol: float | None = None
) -> tuple[list[int], int]:
    """Group the hidden neurons of a 1-hidden-layer net by the direction of ``[w; b]``.

    Neurons whose fan-in or fan-out norm is at most ``atol`` (default ``1e-3`` of the
    largest) are left out (they never grew); the others are grouped greedily, in order,
    with the rule :func:`~torch_embed.landscape.condense.condense` uses for ``cos``:
    cosine ``>= cos`` with the group's first neuron.

    Returns:
        A group label per neuron (``-1`` for left-out neurons) and the number of groups.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> with torch.no_grad():
        ...     _ = net[0].weight.copy_(torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]]))
        ...     _ = net[0].bias.zero_()
        ...     _ = net[2].weight.fill_(1.0)  # a random fan-out could fall below atol
        >>> direction_groups(net)
        ([0, 0, 1], 2)
    """
    u, a = _fan_in(net)
    tol = _atol(net) if atol is None else atol
    active = (u.norm(dim=1) > tol) & (a.norm(dim=0) > tol)
    v = u / u.norm(dim=1, keepdim=True).clamp(min=1e-300)
    sim = v @ v.T
    labels = [-1] * u.shape[0]
    reps: list[int] = []
    for j in range(u.shape[0]):
        if not bool(active[j]):
            continue
        for g, r in enumerate(reps):
            if float(sim[j, r]) >= cos:
                labels[j] = g
                break
        else:
            labels[j] = len(reps)
            reps.append(j)
    return labels, len(reps)


def _plot(numbers: dict[str, Any], sim: Tensor, path: Path) -> Path | None:
    from torch_embed.experiments.plotting import COLORS, new_figure, save_figure

    made = new_figure(1, 2, size=(13.0, 5.0))
    if made is None:
        return None
    fig, (ax_l, ax_h) = made
    steps = [max(s, 1) for s in numbers["steps"]]
    ax_l.plot(steps, numbers["losses"], color=COLORS[0], label=f"width {WIDTH}")
    i, j = numbers["plateau_index"]
    ax_l.axvspan(steps[i], steps[j], color="0.85", label="plateau")
    s0 = numbers["snapshot_step"]
    cont = [s0 + s for s in numbers["continue_steps"]]
    ax_l.plot(
        cont,
        numbers["continue_wide"],
        color=COLORS[1],
        linestyle="--",
        label=f"width {WIDTH} from the snapshot (its Adam state carried on)",
    )
    ax_l.plot(
        cont,
        numbers["continue_reduced"],
        color=COLORS[2],
        linestyle=":",
        linewidth=2.2,
        label=f"reduced width {numbers['reduced_width']} from the snapshot (Adam state "
        "carried through condensation)",
    )
    ax_l.axhline(
        numbers["baseline"], color="0.5", linestyle="-.", linewidth=0.8, label="constant output"
    )
    ax_l.axvline(max(s0, 1), color="0.3", linewidth=0.8)
    ax_l.set_xscale("log")
    ax_l.set_yscale("log")
    ax_l.set_xlabel("Adam step")
    ax_l.set_ylabel("MSE loss")
    ax_l.set_title("loss; the plateau shaded, snapshot at the vertical line")
    twin = ax_l.twinx()
    twin.plot(steps, numbers["groups"], color=COLORS[3], linewidth=1.0, alpha=0.8)
    twin.set_ylabel(f"direction groups (cos >= {COS})", color=COLORS[3])
    twin.set_yscale("symlog", linthresh=10)
    ax_l.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    image = ax_h.imshow(sim.numpy(), cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
    ax_h.set_title(
        f"cosine similarity of active neurons' [w; b] at step {s0}\n"
        f"({numbers['active']} active neurons, ordered by group: "
        f"{numbers['groups_at_snapshot']} groups)"
    )
    ax_h.set_xlabel("neuron")
    ax_h.set_ylabel("neuron")
    fig.colorbar(image, ax=ax_h, shrink=0.8)
    return save_figure(fig, path)


def reduced_adam_state(
    wide_state: dict[str, Any], source: Tensor, names: list[str]
) -> dict[str, Any]:
    """The wide net's Adam state carried to the condensed net (kept neurons keep theirs).

    Condensation keeps one neuron per group (the group's first, whose ``[w; b]`` the
    reduced neuron has); here that neuron's Adam moments are kept too, for its fan-in
    row, bias and fan-out column, and the output bias keeps its own. The reduced net then
    goes on with the same optimizer-state treatment as the wide one: moments carried,
    not reset.

    Args:
        wide_state: ``torch.optim.Adam.state_dict()`` of the wide net's optimizer, whose
            parameters are ``names`` in order (``0.weight, 0.bias, 2.weight, 2.bias``).
        source: ``CondenseResult.embedding.layers[0].source``: the reduced neuron of each
            wide neuron (``-1`` for a dropped one).
        names: The parameter names in the optimizer's order.

    Returns:
        A state dict for an ``Adam`` over the reduced net's parameters (same order).

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> opt = torch.optim.Adam(net.parameters(), lr=0.1)
        >>> net(torch.ones(4, 2)).sum().backward()
        >>> opt.step()
        >>> names = [n for n, _ in net.named_parameters()]
        >>> state = reduced_adam_state(opt.state_dict(), torch.tensor([0, 0, 1]), names)
        >>> state["state"][2]["exp_avg"].shape  # the fan-out columns of neurons 0 and 2
        torch.Size([1, 2])
    """
    keep: list[int] = []
    for k in range(int(source.max()) + 1):
        keep.append(int((source == k).nonzero()[0]))
    index = torch.tensor(keep)
    rows = {"0.weight", "0.bias"}
    state: dict[int, dict[str, Any]] = {}
    for pid, name in enumerate(names):
        old = wide_state["state"][pid]
        new: dict[str, Any] = {"step": old["step"].clone()}
        for key in ("exp_avg", "exp_avg_sq"):
            t = old[key]
            if name in rows:
                new[key] = t[index.to(t.device)].clone()
            elif name == "2.weight":
                new[key] = t[:, index.to(t.device)].clone()
            else:
                new[key] = t.clone()
        state[pid] = new
    return {"state": state, "param_groups": copy.deepcopy(wide_state["param_groups"])}


def run(*, quick: bool, out: Path, seed: int = 0, device: str = "cpu") -> FigureResult:
    """Train the wide ReLU net, condense it at a learned plateau, train both on.

    Args:
        quick: 700 steps instead of the paper's 100 000; the same lr, width, data size
            and initialisation.
        out: Output folder for ``fig5.png``.
        seed: Seed of the initialisation.
        device: Torch device.

    Returns:
        The :class:`~torch_embed.experiments.FigureResult`.
    """
    from torch_embed.experiments.data import digits
    from torch_embed.experiments.training import find_plateaus, log_grid, mlp, small_init_, train
    from torch_embed.landscape.condense import condense

    dev = torch.device(device)
    dtype = torch.float32
    x, y = digits(1000, dtype=dtype, device=dev)
    steps = 700 if quick else 100_000
    lr = 3e-5
    loss_fn = nn.MSELoss()
    # the loss of the best constant output: predicting the class frequencies
    baseline = float(((y - y.mean(0)) ** 2).mean())
    net = mlp([64, WIDTH, 10], "relu", dtype=dtype, device=dev)
    small_init_(net, exponent=6, generator=torch.Generator().manual_seed(seed))
    names = [n for n, _ in net.named_parameters()]
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    snapshots: dict[int, tuple[dict[str, Tensor], dict[str, Any]]] = {}
    groups: list[int] = []

    def record(step: int, _loss: float) -> None:
        params = {k: v.detach().clone() for k, v in net.state_dict().items()}
        snapshots[step] = (params, copy.deepcopy(opt.state_dict()))
        groups.append(direction_groups(net)[1])

    hist = train(
        net,
        loss_fn,
        x,
        y,
        steps=steps,
        lr=lr,
        record_at=log_grid(steps, 200),
        label="fig5: Adam, width 400",
        callback=record,
        optimizer=opt,
    )
    # the whole curve moves by ~10%: a plateau is a stretch flat to 1% over >= 0.15 decades
    plateaus = find_plateaus(hist.steps, hist.losses, slope=0.0, noise=0.01, decades=0.15)
    # non-trivial: clearly below the best constant output (the first plateau sits there)
    learned = [p for p in plateaus if max(hist.losses[p[0] : p[1] + 1]) <= NONTRIVIAL * baseline]
    # else: a plateau below the initial loss (the start-up at the zero function is none)
    moved = [p for p in plateaus if hist.losses[p[1]] < 0.99 * hist.losses[0]]
    if learned or moved:
        i, j = max(learned or moved, key=lambda p: hist.steps[p[1]] / hist.steps[p[0]])
    else:  # no plateau: take the second half, and say so
        i, j = len(hist.steps) // 2, len(hist.steps) - 1
    mid = (hist.steps[i] * hist.steps[j]) ** 0.5
    k_snap = min(range(i, j + 1), key=lambda k: abs(hist.steps[k] - mid))
    snap_step = hist.steps[k_snap]
    # train on long enough for the wide net to pass the plateau's end twice over
    more = max(300 if quick else 10_000, 2 * (hist.steps[j] - snap_step))
    params, opt_state = snapshots[snap_step]
    wide = mlp([64, WIDTH, 10], "relu", dtype=dtype, device=dev)
    wide.load_state_dict(params)
    labels, n_groups = direction_groups(wide)
    reduced = copy.deepcopy(wide).double()
    atol = _atol(wide)
    condensed = condense(reduced, atol=atol, cos=COS)
    reduced = reduced.to(dtype)
    with torch.no_grad():
        wide_loss = float(loss_fn(wide(x), y))
        reduced_loss = float(loss_fn(reduced(x), y))
        out_diff = float((wide(x) - reduced(x)).abs().max())
    active = [k for k, g in enumerate(labels) if g >= 0]
    order = sorted(active, key=lambda k: (labels[k], k))
    u, _ = _fan_in(wide)
    v = u[order] / u[order].norm(dim=1, keepdim=True)
    sim = v @ v.T
    # The same optimizer-state treatment for both: the Adam state at the snapshot goes
    # on (the wide net's own; the reduced net's carried through condensation).
    opt_wide = torch.optim.Adam(wide.parameters(), lr=lr)
    opt_wide.load_state_dict(opt_state)
    opt_reduced = torch.optim.Adam(reduced.parameters(), lr=lr)
    source = condensed.embedding.layers[0].source
    opt_reduced.load_state_dict(reduced_adam_state(opt_state, source, names))
    cont_wide = train(
        wide, loss_fn, x, y, steps=more, lr=lr, label="fig5: wide, on", optimizer=opt_wide
    )
    cont_reduced = train(
        reduced, loss_fn, x, y, steps=more, lr=lr, label="fig5: reduced, on", optimizer=opt_reduced
    )
    width_reduced = condensed.widths[0]
    stall = abs(cont_reduced.final - reduced_loss) / reduced_loss
    wide_drop = (wide_loss - cont_wide.final) / wide_loss
    nontrivial = wide_loss <= NONTRIVIAL * baseline
    numbers: dict[str, Any] = {
        "steps": hist.steps,
        "losses": hist.losses,
        "groups": groups,
        "baseline": baseline,
        "plateaus": [(hist.steps[a], hist.steps[b]) for a, b in plateaus],
        "plateau_index": [i, j],
        "plateau_steps": [hist.steps[i], hist.steps[j]],
        "snapshot_step": snap_step,
        "groups_at_snapshot": n_groups,
        "active": len(active),
        "group_sizes": [labels.count(g) for g in range(n_groups)],
        "reduced_width": width_reduced,
        "condense": {
            "atol": atol,
            "cos": COS,
            "merged": condensed.merged,
            "dropped": condensed.dropped,
        },
        "loss_wide_at_snapshot": wide_loss,
        "loss_reduced_at_snapshot": reduced_loss,
        "max_output_difference": out_diff,
        "continue_steps": cont_wide.steps,
        "continue_wide": cont_wide.losses,
        "continue_reduced": cont_reduced.losses,
        "reduced_relative_change": stall,
        "wide_relative_drop": wide_drop,
    }
    headline = [
        Headline(
            "the plateau analysed is below the constant-output loss",
            "yes (a plateau of learning)",
            f"loss {wide_loss:.5g} at step {snap_step} vs class-frequency loss {baseline:.5g}",
            nontrivial,
            criterion=f"plateau loss <= {NONTRIVIAL:g} x the loss of predicting the class "
            "frequencies",
        ),
        Headline(
            "direction groups of the neurons at the plateau",
            f"{PAPER_GROUPS} (MNIST, step ~1e5)",
            f"{n_groups} (digits, step {snap_step}; {len(active)} active neurons; "
            f"largest group {max(numbers['group_sizes'], default=0)})",
            2 <= n_groups <= WIDTH // 4,
            criterion=f"several groups: between 2 and {WIDTH // 4} (a quarter of the width)",
        ),
        Headline(
            "groups vs. exact count",
            f"{PAPER_GROUPS}",
            f"{n_groups}",
            n_groups == PAPER_GROUPS,
            exact=True,
            criterion=f"exactly {PAPER_GROUPS} (depends on data and length)",
        ),
        Headline(
            "reduced net's loss at the plateau (same as wide?)",
            "same",
            f"width {width_reduced}: {reduced_loss:.6g} vs wide {wide_loss:.6g}",
            abs(reduced_loss - wide_loss) <= 1e-3 * wide_loss,
            criterion="relative difference <= 1e-3",
        ),
        Headline(
            f"{more} more steps, both with their Adam state carried on",
            "the reduced net stalls at the plateau loss (the wide one leaves it)",
            f"reduced: {reduced_loss:.6g} -> {cont_reduced.final:.6g} (change {stall:.1e}); "
            f"wide: {wide_loss:.6g} -> {cont_wide.final:.6g} (drop {wide_drop:.1e})",
            stall <= STALL and wide_drop >= 5 * STALL,
            criterion=f"the reduced loss changes by <= {STALL:g} (relative) while the wide "
            f"one drops by >= {5 * STALL:g}",
        ),
    ]
    notes = [
        "MNIST cannot be downloaded here: scikit-learn's bundled 8x8 digits (first 1000 "
        "of 1797, pixels scaled to [0, 1]) replace it, so the input has 64 pixels, not 784",
        f"Adam lr {lr}, {steps} steps"
        + (" (--quick; the paper trains 100k)" if quick else "")
        + f", float32; plateaus found at steps {numbers['plateaus']}; snapshot in the "
        f"(geometric) middle of the longest (in decades) whose loss is <= {NONTRIVIAL:g} x "
        f"the class-frequency loss {baseline:.5g}",
        f"groups: cosine >= {COS} of [w; b] among neurons whose fan-in and fan-out exceed "
        f"{REL_ATOL:g} of the largest; condense(atol={atol:.1e}, cos={COS}) merged "
        f"{condensed.merged} and dropped {condensed.dropped} neurons; max |output "
        f"difference| wide vs reduced {out_diff:.1e} (condense's absolute atol also merges "
        f"small neurons that are equal within it, so its width can be below the group count)",
        "from the snapshot both nets go on with the Adam state of the snapshot: the wide "
        "net's own (so its curve is the original run's), the reduced net's carried "
        "through condensation (each kept neuron keeps its moments); "
        f"{more} steps (at least twice the rest of the plateau)",
    ]
    if not learned:
        notes.append(
            "no plateau below the class-frequency loss was found; the one analysed is the "
            "trivial one, at the loss of predicting the class frequencies (or, with no "
            "plateau at all, the second half of the run)"
        )
    if n_groups != PAPER_GROUPS:
        notes.append(
            f"{n_groups} groups instead of the paper's {PAPER_GROUPS}: a different data set "
            f"(digits, 64 pixels instead of 784)"
            + (" and a run 140 times shorter" if quick else "")
        )
    result = FigureResult(
        name="fig5",
        title=FIGURES["fig5"],
        quick=quick,
        settings={
            "data": "scikit-learn digits (MNIST substitute), 1000 samples, one-hot targets",
            "network": f"64-{WIDTH}-10 ReLU, float32",
            "loss": "MSE",
            "init": "every weight and bias ~ N(0, 1/m^6), m = 400",
            "training": f"Adam lr {lr}, {steps} full-batch steps, then {more} more from "
            f"the plateau snapshot for the wide and the reduced net (Adam state carried); "
            f"seed {seed}",
            "condense": f"cos {COS}, atol {REL_ATOL:g} x largest neuron norm",
            "device": str(dev),
        },
        headline=headline,
        numbers=numbers,
        notes=notes,
    )
    result.figure = _plot(numbers, sim, out / "fig5.png")
    return result
