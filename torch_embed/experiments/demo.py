"""``torch-embed demo``: widen a trained narrow network with every critical scheme.

Steps (each with a progress line if it takes more than a few seconds):

1. Train a width-2 tanh network on the built-in 1D staircase (float64, Adam), then
   polish it to a critical point (:func:`torch_embed.critical.critical_point`,
   ``|∇R| ~ 1e-15``).
2. For each critical scheme (split with ``α = 1/2``, the signed split ``α = 3/2``, a
   3-way split, a null neuron, Net2Net, a general compatible embedding), widen a copy
   and measure with :func:`torch_embed.report.check_embedding`: the output difference,
   ``|∇R|`` before/after, the Hessian inertia before/after computed twice (full wide
   Hessian, and ``before + inertia_change(...)`` from the embedding's structure, each
   timed), and whether the counts never decreased (irreversibility, JML 2022 Thm 6.2).
3. Print one table per scheme and draw the outputs and the sorted ``|λ|`` spectra
   (log scale, zero tolerance dashed; in the style of Fig. 3(a) of the NeurIPS paper).

:func:`run_demo` returns a :class:`DemoResult` with every number.
"""

from __future__ import annotations

import copy
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import Tensor, nn

from torch_embed.experiments import format_counts

__all__ = ["DemoResult", "SchemeResult", "demo_schemes", "run_demo"]


@dataclass(frozen=True)
class SchemeResult:
    """The measurements for one scheme.

    Attributes:
        name: Human-readable scheme description.
        scheme: ``repr`` of the scheme config.
        kind: ``Embedding.kind`` value (``"critical"`` for all demo schemes).
        narrow_widths: Hidden widths before.
        wide_widths: Hidden widths after.
        output_diff: ``max |f_wide(x) - f_narrow(x)|`` over the data and a fine grid.
        grad_before: ``|∇R|`` of the narrow network.
        grad_after: ``|∇R|`` of the widened network.
        before: Inertia ``(negative, zero, positive)`` of the narrow Hessian.
        after_full: Inertia of the full wide Hessian.
        after_change: ``before + inertia_change`` (the wide Hessian never built).
        change: The change ``inertia_change`` alone.
        seconds_full: Time of the full route (wide Hessian and its inertia).
        seconds_change: Time of ``inertia_change``.
        tol_full: Zero tolerance of the full count.
        gap_full: Gap ratio of the full count.
        ambiguous: Whether either count is flagged ambiguous.
        eigenvalues_after: The wide Hessian's eigenvalues (ascending).
        nondecreasing: ``after >= before`` for each of the three counts (full route).
        routes_agree: ``after_full == after_change``.
    """

    name: str
    scheme: str
    kind: str
    narrow_widths: tuple[int, ...]
    wide_widths: tuple[int, ...]
    output_diff: float
    grad_before: float
    grad_after: float
    before: tuple[int, int, int]
    after_full: tuple[int, int, int]
    after_change: tuple[int, int, int]
    change: tuple[int, int, int]
    seconds_full: float
    seconds_change: float
    tol_full: float
    gap_full: float
    ambiguous: bool
    eigenvalues_after: list[float]

    @property
    def nondecreasing(self) -> bool:
        """Irreversibility: no count of the full wide Hessian fell below the narrow one."""
        return all(a >= b for a, b in zip(self.after_full, self.before))

    @property
    def routes_agree(self) -> bool:
        """The full recount equals ``before + inertia_change``."""
        return self.after_full == self.after_change


@dataclass
class DemoResult:
    """Everything the demo measured and wrote.

    Attributes:
        settings: Data, widths, optimiser, seed and device used.
        loss: Loss of the polished narrow network.
        grad_norm: Its ``|∇R|``.
        before: Inertia of its Hessian.
        eigenvalues_before: Its Hessian's eigenvalues.
        tol_before: Zero tolerance of the narrow count.
        schemes: One :class:`SchemeResult` per scheme.
        figure: The PNG written (``None`` without matplotlib).
        seconds: Total wall-clock time.
        narrow_state: The polished narrow network's ``state_dict`` (to rebuild it with
            ``mlp([1, 2, 1])`` and check the numbers independently).
    """

    settings: dict[str, Any]
    loss: float
    grad_norm: float
    before: tuple[int, int, int]
    eigenvalues_before: list[float]
    tol_before: float
    schemes: list[SchemeResult] = field(default_factory=list)
    figure: Path | None = None
    seconds: float = 0.0
    narrow_state: dict[str, Tensor] = field(default_factory=dict, repr=False)

    @property
    def ok(self) -> bool:
        """All schemes preserved the function, never lowered a count, and both routes agree."""
        return all(s.nondecreasing and s.routes_agree for s in self.schemes)


def demo_schemes() -> list[tuple[str, Any, list[int]]]:
    """The schemes the demo applies to its width-2 network: ``(name, config, new widths)``.

    Example:
        >>> [name for name, _, _ in demo_schemes()][:2]
        ['Split α=1/2', 'Split α=3/2 (signed)']
    """
    from torch_embed.schemes import General, Net2Net, Null, Split

    return [
        ("Split α=1/2", Split(alpha=0.5, select=[0]), [3]),
        ("Split α=3/2 (signed)", Split(alpha=1.5, select=[0]), [3]),
        ("Split 3-way (1/3 each)", Split(alpha=(1 / 3, 1 / 3, 1 / 3), select=[1]), [4]),
        ("Null β=0.5", Null(bias=0.5), [3]),
        ("Net2Net (copy each neuron)", Net2Net(select="cyclic"), [4]),
        (
            "General (index map + coefficients)",
            General(
                sources=[[0, 1, 0, 1, -1]],
                coefficients=[[0.25, 1.5, 0.75, -0.5, 0.0]],
                null_bias=-0.3,
            ),
            [5],
        ),
    ]


def _measure(
    name: str,
    config: Any,
    widths: list[int],
    narrow: nn.Module,
    x: Tensor,
    y: Tensor,
    grid: Tensor,
    generator: torch.Generator,
) -> tuple[SchemeResult, nn.Module]:
    from torch_embed.hessian import hessian
    from torch_embed.inertia import eigenvalues
    from torch_embed.report import check_embedding
    from torch_embed.widen import widen

    loss_fn = nn.MSELoss()
    wide = copy.deepcopy(narrow)
    emb = widen(wide, widths, config, generator=generator)
    with torch.no_grad():
        diff = max(float((wide(t) - narrow(t)).abs().max()) for t in (x, grid))
    report = check_embedding(narrow, wide, emb, loss_fn, x, y)
    after, predicted = report.after, report.predicted
    assert after is not None and report.time_after is not None  # full=True
    result = SchemeResult(
        name=name,
        scheme=repr(config),
        kind=emb.kind.value,
        narrow_widths=tuple(emb.narrow_widths[1:-1]),
        wide_widths=tuple(emb.wide_widths[1:-1]),
        output_diff=max(diff, report.output_max_abs_diff),
        grad_before=report.grad_norm_before,
        grad_after=report.grad_norm_after,
        before=report.before.as_tuple(),
        after_full=after.as_tuple(),
        after_change=predicted.as_tuple(),
        change=report.change.as_tuple(),
        seconds_full=report.time_after,
        seconds_change=report.time_change,
        tol_full=float(after.tol),
        gap_full=float(after.gap),
        ambiguous=bool(after.ambiguous or predicted.ambiguous),
        eigenvalues_after=eigenvalues(hessian(wide, loss_fn, x, y)).tolist(),
    )
    return result, wide


def format_scheme(s: SchemeResult) -> str:
    """One scheme's measurements as a small table."""
    w0 = ",".join(map(str, s.narrow_widths))
    w1 = ",".join(map(str, s.wide_widths))
    yes = {True: "yes", False: "NO"}
    flags = ", ".join(
        f"{k} {'>=' if a >= b else '<'}"
        for k, a, b in zip(("negative", "zero", "positive"), s.after_full, s.before)
    )
    rows = [
        ("", "narrow (before)", "wide (after)", "time"),
        ("max |f_wide - f_narrow|", "", f"{s.output_diff:.1e}", ""),
        ("|grad R|", f"{s.grad_before:.1e}", f"{s.grad_after:.1e}", ""),
        (
            "inertia -/0/+, full Hessian",
            format_counts(s.before),
            format_counts(s.after_full),
            f"{s.seconds_full * 1e3:.1f} ms",
        ),
        (
            "inertia -/0/+, before+change",
            "",
            format_counts(s.after_change),
            f"{s.seconds_change * 1e3:.1f} ms",
        ),
    ]
    widths = [max(len(r[k]) for r in rows) for k in range(4)]
    head = f"{s.name}: hidden width {w0} -> {w1}, kind {s.kind}"
    lines = [head, "-" * len(head)]
    lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.append(
        f"  inertia_change -/0/+ {format_counts(s.change)}; zero tol {s.tol_full:.1e}, gap "
        f"{s.gap_full:.1e}{' (AMBIGUOUS)' if s.ambiguous else ''}"
    )
    lines.append(
        f"  irreversibility held: {yes[s.nondecreasing]} ({flags}); "
        f"full == before + change: {yes[s.routes_agree]}"
    )
    return "\n".join(lines)


def _plot(
    result: DemoResult, curves: dict[str, Tensor], x: Tensor, y: Tensor, path: Path
) -> Path | None:
    from torch_embed.experiments.plotting import (
        COLORS,
        finish_spectra,
        new_figure,
        plot_spectrum,
        save_figure,
    )

    # One spectrum panel per scheme (the narrow spectrum in black, the widened one in
    # one colour) instead of seven colours in one panel, which are hard to tell apart.
    made = new_figure(2, 4, size=(17.0, 7.5))
    if made is None:
        return None
    fig, axes = made
    ax_f = axes[0]
    grid = curves.pop("grid")
    ax_f.scatter(x.flatten().cpu(), y.flatten().cpu(), s=12, color="0.6", label="data", zorder=1)
    narrow = curves.pop("narrow")
    ax_f.plot(grid, narrow, color="black", linewidth=3.0, label="narrow (width 2)", zorder=2)
    diff = max(s.output_diff for s in result.schemes)
    for k, curve in enumerate(curves.values()):
        ax_f.plot(
            grid,
            curve,
            color=COLORS[1],
            linestyle="--",
            linewidth=1.2,
            label=f"the {len(curves)} widenings (max |Δ| {diff:.0e})" if k == 0 else None,
            zorder=3,
        )
    ax_f.set_xlabel("x")
    ax_f.set_ylabel("output")
    ax_f.set_title("output: narrow and widened coincide", fontsize=10)
    ax_f.legend(fontsize=7, loc="upper left")

    tol = max([result.tol_before] + [s.tol_full for s in result.schemes])
    floor = tol / 1e3
    for k, s in enumerate(result.schemes):
        ax_s = axes[k + 1]
        plot_spectrum(
            ax_s,
            result.eigenvalues_before,
            tol=result.tol_before,
            label=f"width 2, before ({format_counts(result.before)})",
            color="black",
            marker="s",
            floor=floor,
        )
        plot_spectrum(
            ax_s,
            s.eigenvalues_after,
            tol=s.tol_full,
            label=f"widened ({format_counts(s.after_full)})",
            color=COLORS[0],
            offset=0.3,
            floor=floor,
        )
        finish_spectra(ax_s, tol, title=s.name, fontsize=7)
        ax_s.title.set_fontsize(10)
        ax_s.xaxis.label.set_fontsize(8)
        ax_s.yaxis.label.set_fontsize(8)
    for ax in axes[len(result.schemes) + 1 :]:
        ax.axis("off")
        ax.text(
            0.0,
            0.5,
            "Hessian spectra, sorted |λ| on a log axis:\n"
            "  open marker: positive eigenvalue\n"
            "  filled marker: negative eigenvalue\n"
            "  x: zero (|λ| at most the dashed tolerance)\n"
            "  legend: -/0/+ counts",
            transform=ax.transAxes,
            va="center",
            fontsize=9,
        )
    return save_figure(fig, path)


def run_demo(
    *,
    out: str | Path = "torch-embed-demo",
    seed: int = 0,
    device: str = "cpu",
    quick: bool = False,
    threads: int | None = 1,
    stream: TextIO | None = None,
) -> DemoResult:
    """Run the demo: train, polish, widen with each critical scheme, compare inertia.

    Args:
        out: Folder for ``demo.png`` (created).
        seed: Seed of the initialisation and of the schemes' random choices.
        device: Torch device; Hessians are computed in float64 on it.
        quick: A smaller training run (for tests); the same schemes and tables.
        threads: ``torch.set_num_threads`` during the run (restored after); ``None``
            keeps the current setting.
        stream: Where to print the tables (default ``sys.stdout``).

    Returns:
        A :class:`DemoResult`.
    """
    from torch_embed.experiments.training import threads as num_threads

    with num_threads(threads):
        return _run(out=Path(out), seed=seed, device=device, quick=quick, stream=stream)


def _run(*, out: Path, seed: int, device: str, quick: bool, stream: TextIO | None) -> DemoResult:
    from torch_embed.experiments.data import STAIRCASE_FORMULA, staircase
    from torch_embed.experiments.plotting import PLOT_HINT
    from torch_embed.experiments.training import narrow_critical_net
    from torch_embed.hessian import hessian
    from torch_embed.inertia import eigenvalues, inertia

    stream = sys.stdout if stream is None else stream
    start = time.perf_counter()
    dev = torch.device(device)
    x, y = staircase(50, device=dev)
    grid = torch.linspace(-16.0, 16.0, 401, dtype=torch.float64, device=dev)[:, None]
    gen = torch.Generator().manual_seed(seed)
    steps = 1500 if quick else 4000
    settings: dict[str, Any] = {
        "data": f"staircase, 50 points: {STAIRCASE_FORMULA}",
        "network": "Linear(1, 2) - Tanh - Linear(2, 1), float64",
        "loss": "MSE",
        "training": f"Adam lr 0.02, {steps} full-batch steps, then critical_point",
        "seed": seed,
        "device": str(dev),
        "quick": quick,
    }
    print(f"torch-embed demo: {settings['network']} on the staircase", file=stream)
    print(f"  {STAIRCASE_FORMULA}", file=stream)

    narrow, hist, polish = narrow_critical_net(
        x, y, seed=seed, steps=steps, label="training the width-2 net"
    )
    loss_fn = nn.MSELoss()
    h = hessian(narrow, loss_fn, x, y)
    before = inertia(h, grad_norm=polish.grad_norm, method="eigh")
    result = DemoResult(
        settings=settings,
        loss=polish.loss,
        grad_norm=polish.grad_norm,
        before=before.as_tuple(),
        eigenvalues_before=eigenvalues(h).tolist(),
        tol_before=float(before.tol),
        narrow_state={k: v.detach().clone() for k, v in narrow.state_dict().items()},
    )
    print(
        f"  trained {steps} steps to loss {hist.final:.4e}; polished ({polish.method}) to "
        f"loss {polish.loss:.6e}, |grad R| {polish.grad_norm:.1e}; Hessian inertia "
        f"{format_counts(result.before)} (P = {sum(result.before)})\n",
        file=stream,
    )
    with torch.no_grad():
        curves: dict[str, Tensor] = {
            "grid": grid.flatten().cpu(),
            "narrow": narrow(grid).flatten().cpu(),
        }
    for name, config, widths in demo_schemes():
        scheme_result, wide = _measure(name, config, widths, narrow, x, y, grid, gen)
        result.schemes.append(scheme_result)
        with torch.no_grad():
            curves[name] = wide(grid).flatten().cpu()
        print(format_scheme(scheme_result) + "\n", file=stream)

    result.figure = _plot(result, curves, x, y, out / "demo.png")
    result.seconds = time.perf_counter() - start
    verdict = "held for every scheme" if result.ok else "FAILED for some scheme (see above)"
    print(f"irreversibility and before + change == full: {verdict}", file=stream)
    print(
        "(with at most 16 parameters both routes take milliseconds; inertia_change never "
        "builds the wide Hessian, so it wins as P grows: see bench/inertia.py)",
        file=stream,
    )
    if result.figure is not None:
        print(f"wrote {result.figure} ({result.seconds:.1f} s)", file=stream)
    else:
        print(f"{PLOT_HINT} ({result.seconds:.1f} s)", file=stream)
    stream.flush()
    return result
