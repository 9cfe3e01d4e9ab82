"""The demo and the reproductions of the papers' figures, run as any user would.

Everything here uses torch_embed's public API only. ``torch-embed demo`` runs
:func:`torch_embed.experiments.demo.run_demo`; ``torch-embed reproduce FIG`` runs
:func:`run_figure`, which calls ``torch_embed.experiments.<FIG>.run``. Each
reproduction returns a :class:`FigureResult`: the settings used, a headline table of
what the paper reports next to what was measured, all numbers (also written as JSON
next to the PNG), and notes on where and why the numbers differ.

The figure modules are imported lazily, so importing this package is cheap.
"""

from __future__ import annotations

import importlib
import json
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

__all__ = [
    "FIGURES",
    "FigureResult",
    "Headline",
    "format_counts",
    "format_headline",
    "run_figure",
    "to_jsonable",
]

FIGURES: Mapping[str, str] = {
    "fig1": "loss plateaus of a wide tanh net; effective width and nearest narrow net",
    "fig3a": "negative/zero Hessian eigenvalue counts along equal splits, width 2->3->4",
    "fig3b": "negative eigenvalue counts along splits of a sigmoid net on Iris",
    "fig4": "critical points of widths 1, 2, 3 clustered by loss and output function",
    "fig5": "condensation of a wide ReLU net on digits into direction groups",
}
"""The reproducible figures and what each shows (docs/reproduction.md)."""


@dataclass(frozen=True)
class Headline:
    """One row of a reproduction's headline: the paper's number and ours.

    Attributes:
        quantity: What is compared.
        paper: What the paper reports (as text).
        measured: What this run measured (as text).
        agrees: Whether this run agrees with the paper on this row, decided by
            ``criterion``.
        exact: The row compares exact numbers that depend on details the paper does
            not give (width, data, seed); a difference is reported ("differs"), not
            counted as a failure to reproduce the qualitative result.
        criterion: The stated rule that decides ``agrees`` (printed under the table and
            written to the JSON), e.g. ``"at least 3 plateaus"``.
    """

    quantity: str
    paper: str
    measured: str
    agrees: bool
    exact: bool = False
    criterion: str = ""

    @property
    def verdict(self) -> str:
        """``"yes"``, ``"NO"`` or, for an exact-number row that differs, ``"differs"``."""
        if self.agrees:
            return "yes"
        return "differs" if self.exact else "NO"


@dataclass
class FigureResult:
    """What a reproduction measured and wrote.

    Attributes:
        name: ``"fig1"``, ``"fig3a"``, ...
        title: One line on what the figure shows.
        quick: Whether the ``--quick`` (CI) size was used.
        settings: The hyper-parameters used (data, widths, optimiser, steps, seeds).
        headline: Paper-versus-measured rows.
        numbers: Every measured number (JSON-able).
        notes: Where and why this run differs from the paper.
        figure: Path of the PNG (``None`` without matplotlib).
        json: Path of the JSON file.
        seconds: Wall-clock time of the run.
    """

    name: str
    title: str
    quick: bool
    settings: dict[str, Any]
    headline: list[Headline]
    numbers: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    figure: Path | None = None
    json: Path | None = None
    seconds: float = 0.0

    @property
    def agrees(self) -> bool:
        """Whether every qualitative headline row agrees (exact-number rows may differ)."""
        return all(h.agrees for h in self.headline if not h.exact)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dictionary of everything (what is written to the JSON file)."""
        return {
            "name": self.name,
            "title": self.title,
            "quick": self.quick,
            "settings": to_jsonable(self.settings),
            "headline": [
                {
                    "quantity": h.quantity,
                    "paper": h.paper,
                    "measured": h.measured,
                    "agrees": h.agrees,
                    "exact": h.exact,
                    "criterion": h.criterion,
                    "verdict": h.verdict,
                }
                for h in self.headline
            ],
            "numbers": to_jsonable(self.numbers),
            "notes": list(self.notes),
            "figure": self.figure.name if self.figure is not None else None,
            "seconds": round(self.seconds, 2),
        }


def to_jsonable(value: Any) -> Any:
    """Convert tensors, tuples, paths and non-finite floats to plain JSON values.

    Example:
        >>> import torch
        >>> to_jsonable({"a": torch.tensor([1.0, 2.0]), "b": (1, float("inf"))})
        {'a': [1.0, 2.0], 'b': [1, 'inf']}
    """
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    if isinstance(value, Path):
        return str(value)
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        return to_jsonable(tolist())
    return str(value)


def format_counts(counts: Sequence[int]) -> str:
    """Negative / zero / positive eigenvalue counts as ``"n / z / p"``.

    Example:
        >>> format_counts((1, 2, 13))
        '1 / 2 / 13'
    """
    negative, zero, positive = counts
    return f"{negative} / {zero} / {positive}"


def format_headline(result: FigureResult) -> str:
    """The headline as an aligned text table, the criteria and the notes below it.

    Example:
        >>> row = Headline("n", "1", "1", True, criterion="measured n equals 1")
        >>> r = FigureResult("figX", "a test", True, {}, [row], {})
        >>> print(format_headline(r))  # doctest: +NORMALIZE_WHITESPACE
        figX (quick): a test
          quantity | paper | measured | agrees
          ---------+-------+----------+-------
          n        | 1     | 1        | yes
          agrees if (n): measured n equals 1
    """
    rows = [("quantity", "paper", "measured", "agrees")] + [
        (h.quantity, h.paper, h.measured, h.verdict) for h in result.headline
    ]
    widths = [max(len(r[k]) for r in rows) for k in range(4)]
    lines = [f"{result.name}{' (quick)' if result.quick else ''}: {result.title}"]
    for i, row in enumerate(rows):
        lines.append("  " + " | ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if i == 0:
            lines.append("  " + "-+-".join("-" * w for w in widths))
    lines.extend(
        f"  agrees if ({h.quantity}): {h.criterion}" for h in result.headline if h.criterion
    )
    lines.extend(f"  note: {n}" for n in result.notes)
    return "\n".join(lines)


def write_result(result: FigureResult, out: Path) -> Path:
    """Write ``<out>/<name>.json`` and return its path."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{result.name}.json"
    path.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    result.json = path
    return path


def run_figure(
    name: str,
    *,
    quick: bool = False,
    out: str | Path = ".",
    seed: int = 0,
    device: str = "cpu",
    threads: int | None = 1,
    stream: TextIO | None = None,
) -> FigureResult:
    """Run one reproduction, write ``<out>/<name>.png`` and ``.json``, print the headline.

    Args:
        name: One of :data:`FIGURES`.
        quick: Use the small CI size instead of the paper's hyper-parameters.
        out: Output folder (created).
        seed: Base random seed.
        device: Torch device for training (Hessians are float64 on it).
        threads: ``torch.set_num_threads`` during the run (restored after); the networks
            are tiny and one thread is fastest. ``None`` keeps the current setting.
        stream: Where to print (default ``sys.stdout``); ``None`` output goes there.

    Returns:
        The :class:`FigureResult`.
    """
    if name not in FIGURES:
        raise ValueError(f"unknown figure {name!r}; choose one of {', '.join(FIGURES)}")
    module = importlib.import_module(f"torch_embed.experiments.{name}")
    runner: Callable[..., FigureResult] = module.run
    stream = sys.stdout if stream is None else stream
    out_dir = Path(out)
    from torch_embed.experiments.training import threads as num_threads

    start = time.perf_counter()
    with num_threads(threads):
        result = runner(quick=quick, out=out_dir, seed=seed, device=device)
    result.seconds = time.perf_counter() - start
    write_result(result, out_dir)
    print(format_headline(result), file=stream)
    if result.figure is not None:
        print(f"  wrote {result.figure} and {result.json} ({result.seconds:.1f} s)", file=stream)
    else:
        from torch_embed.experiments.plotting import PLOT_HINT

        print(f"  {PLOT_HINT}; wrote {result.json} ({result.seconds:.1f} s)", file=stream)
    stream.flush()
    return result
