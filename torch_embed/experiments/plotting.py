"""Figure helpers; matplotlib is imported only when a figure is drawn.

Figures are built on :class:`matplotlib.figure.Figure` directly (no ``pyplot``), so
drawing never changes the caller's matplotlib backend or global state and works
without a display. Without matplotlib (the optional ``plot`` extra) :func:`new_figure`
returns ``None`` and the experiments print their tables and a hint instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch_embed.experiments import format_counts

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "PLOT_HINT",
    "SPECTRA_TITLE",
    "finish_spectra",
    "have_matplotlib",
    "new_figure",
    "plot_spectrum",
    "plot_width_spectra",
    "save_figure",
]

PLOT_HINT = "matplotlib is not installed, no figure written; pip install 'torch-embed[plot]'"
"""What the experiments print when they cannot draw."""

SPECTRA_TITLE = "Hessian spectra: open positive, filled negative, x zero"
"""Title of a panel of :func:`plot_spectrum` spectra."""

#: Colour cycle (colour-blind safe, Okabe-Ito) shared by all figures.
COLORS = (
    "#0072B2",
    "#D55E00",
    "#009E73",
    "#CC79A7",
    "#E69F00",
    "#56B4E9",
    "#000000",
    "#F0E442",
)


def have_matplotlib() -> bool:
    """Whether matplotlib can be imported.

    Example:
        >>> isinstance(have_matplotlib(), bool)
        True
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def new_figure(
    nrows: int = 1, ncols: int = 1, *, size: tuple[float, float] = (10.0, 4.0)
) -> tuple[Figure, list[Axes]] | None:
    """A figure with a grid of axes (flattened into a list), or ``None`` without matplotlib.

    Example:
        >>> made = new_figure(1, 2)
        >>> made is None or len(made[1]) == 2
        True
    """
    if not have_matplotlib():
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def save_figure(fig: Figure, path: str | Path, *, dpi: int = 120) -> Path:
    """Write ``fig`` as a PNG (creating the folder) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def plot_spectrum(
    ax: Axes,
    eigenvalues: Sequence[float],
    *,
    tol: float,
    label: str,
    color: str,
    marker: str = "o",
    offset: float = 0.0,
    floor: float | None = None,
) -> None:
    """Sorted ``|λ|`` (largest first) on a log scale, marked by sign.

    Eigenvalues above ``tol`` are open markers, those below ``-tol`` filled markers
    (so the negative count can be read off), and the zeros (``|λ| <= tol``) crosses.
    Exact zeros are drawn at ``floor`` (default ``tol / 1000``).

    Args:
        ax: The axes (set to a log y-scale).
        eigenvalues: The eigenvalues.
        tol: The zero tolerance used for the counts.
        label: Legend text (the negative/zero/positive counts are best put here).
        color: Marker colour.
        marker: Marker shape of the non-zero eigenvalues.
        offset: Horizontal shift of the marks (to keep several spectra apart).
        floor: Where to draw exact zeros.
    """
    values = sorted((float(v) for v in eigenvalues), key=abs, reverse=True)
    low = floor if floor is not None else (tol / 1000 if tol > 0 else 1e-300)
    pts = [(i + 1 + offset, max(abs(v), low), v) for i, v in enumerate(values)]
    groups = {
        "pos": [(x, y) for x, y, v in pts if v > tol],
        "neg": [(x, y) for x, y, v in pts if v < -tol],
        "zero": [(x, y) for x, y, v in pts if abs(v) <= tol],
    }
    styles: dict[str, dict[str, Any]] = {
        "pos": {"marker": marker, "facecolors": "none", "edgecolors": color},
        "neg": {"marker": marker, "color": color},
        "zero": {"marker": "x", "color": color},
    }
    first = True
    for key, points in groups.items():
        if not points:
            continue
        xs = [p[0] for p in points]
        ys = [p[1] for p in points]
        ax.scatter(xs, ys, s=28, label=label if first else None, **styles[key])
        first = False
    ax.set_yscale("log")


def draw_tolerance(ax: Axes, tol: float, *, label: str | None = None) -> None:
    """A dashed horizontal line at the zero tolerance ``tol``."""
    if tol > 0 and math.isfinite(tol):
        ax.axhline(tol, color="0.4", linestyle="--", linewidth=1.0, label=label)


def annotate(ax: Axes, text: str, **kwargs: Any) -> None:
    """Small text in the top-left corner of ``ax``."""
    ax.text(0.02, 0.97, text, transform=ax.transAxes, va="top", ha="left", fontsize=8, **kwargs)


def finish_spectra(ax: Axes, tol: float, *, title: str = SPECTRA_TITLE, **legend: Any) -> None:
    """Complete a panel of :func:`plot_spectrum` spectra.

    Draws the zero tolerance ``tol`` (:func:`draw_tolerance`), labels the axes, sets
    ``title`` and draws the legend (``legend`` overrides its default font size 8 in
    the lower left corner).
    """
    draw_tolerance(ax, tol, label=f"zero tolerance ({tol:.0e})")
    ax.set_xlabel("eigenvalue index (sorted by |λ|, largest first)")
    ax.set_ylabel("|λ| of the loss Hessian")
    ax.set_title(title)
    ax.legend(**{"fontsize": 8, "loc": "lower left", **legend})


def plot_width_spectra(
    ax: Axes,
    widths: Sequence[int],
    eigenvalues: Sequence[Sequence[float]],
    tols: Sequence[float],
    counts: Sequence[Sequence[int]],
    *,
    spacing: float,
) -> None:
    """The Hessian spectra of one network at several widths, side by side.

    Width ``k`` gets colour and marker ``k`` and a legend entry with its counts; the
    spectra are shifted by ``spacing`` apart, and the panel is completed by
    :func:`finish_spectra` at the largest tolerance.

    Args:
        ax: The axes.
        widths: The hidden width of each spectrum (at most three).
        eigenvalues: Each width's eigenvalues.
        tols: Each width's zero tolerance.
        counts: Each width's ``(negative, zero, positive)`` counts.
        spacing: Horizontal shift between consecutive widths.
    """
    tol = max(tols)
    for k, w in enumerate(widths):
        plot_spectrum(
            ax,
            eigenvalues[k],
            tol=tols[k],
            label=f"width {w}: -/0/+ = {format_counts(counts[k])}",
            color=COLORS[k],
            marker="osD"[k],
            offset=spacing * k,
            floor=tol / 1e3,
        )
    finish_spectra(ax, tol)
