"""The ``torch-embed`` command: ``torch-embed demo`` and ``torch-embed reproduce FIG``.

A thin argparse front end; the work is done in :mod:`torch_embed.experiments`.
Everything that can be checked before the work is (exit status 2, one error line): the
arguments, that ``--device`` exists on this machine, and that the ``--out`` folder can be
created and written. Ctrl-C ends the run with one line and exit status 130; outputs
already finished (``reproduce all``: the figures before the interrupted one) are kept,
and the interrupted step's half-written files are removed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["build_parser", "main"]

#: The exit status after Ctrl-C (128 + SIGINT, the shell's convention).
INTERRUPTED = 130

_DESCRIPTION = """\
Widen trained PyTorch MLPs by critical embeddings and measure Hessian inertia
(the Embedding Principle, Zhang et al., NeurIPS 2021 / J. Mach. Learn. 2022).

  torch-embed demo              train a width-2 tanh net, widen it with every critical
                                scheme, print inertia before/after, draw a figure
  torch-embed reproduce fig3a   reproduce a figure of the papers (fig1, fig3a, fig3b,
                                fig4, fig5 or all); add --quick for the small CI size
"""

_FIG_HELP = """\
which figure to reproduce (docs/reproduction.md):
  fig1   loss plateaus of a width-500 tanh net on the
         1D staircase; at each plateau the effective
         width and the distance to the best narrow net
  fig3a  width-2 tanh at a critical point split to
         widths 3 and 4 (equal split): negative
         eigenvalues 0 -> 1 -> 2, one more zero per step
  fig3b  sigmoid net on Iris (Adam), split twice:
         negative counts (paper: 3 -> 5 -> 7)
  fig4   many runs at widths 1, 2, 3 polished to
         |grad| < 1e-10, clustered by loss and output;
         each class labelled with its narrowest width
  fig5   width-400 ReLU net on 1000 scikit-learn digits
         (MNIST substitute): neurons condense into
         direction groups; the reduced net stalls too
  all    every figure above, one after the other
"""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the line breaks of help texts that have them; wraps the others."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        if "\n" in text:
            return text.splitlines()
        return super()._split_lines(text, width)


def _nonnegative_int(text: str) -> int:
    """``--threads``: an int >= 0 (argparse reports the error against the subcommand)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _first_line(err: BaseException) -> str:
    """An exception's message cut to its first line (and 200 characters).

    torch's dispatcher errors run to dozens of lines listing registered kernels.
    """
    text = str(err).strip()
    line = text.splitlines()[0] if text else type(err).__name__
    return line if len(line) <= 200 else line[:197] + "..."


def _unavailable(dev: torch.device) -> str | None:
    """Why the torch device ``dev`` cannot be used on this machine, or ``None``."""
    import torch

    if dev.type == "cpu":
        return None
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            return "torch.backends.mps.is_available() is False (MPS needs Apple silicon)"
    else:
        backend = getattr(torch, dev.type, None)
        is_available = getattr(backend, "is_available", None)
        if callable(is_available) and not is_available():
            return f"torch.{dev.type}.is_available() is False"
        device_count = getattr(backend, "device_count", None)
        if dev.index is not None and callable(device_count) and dev.index >= device_count():
            n = device_count()
            return f"this machine has {n} {dev.type} device{'s' if n != 1 else ''}"
    try:
        torch.empty(1, device=dev)
    except Exception as err:  # e.g. NotImplementedError: a backend this build lacks
        return _first_line(err)
    return None


def _device(text: str) -> str:
    """``--device``: a torch device this machine has (an argparse error otherwise)."""
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError) as err:
        raise argparse.ArgumentTypeError(
            f"not a torch device: {text!r} ({_first_line(err)})"
        ) from None
    if dev.type == "meta":
        raise argparse.ArgumentTypeError("'meta' tensors hold no values; use cpu or cuda")
    problem = _unavailable(dev)
    if problem is not None:
        raise argparse.ArgumentTypeError(f"device {text!r} is not available here: {problem}")
    return text


def _writable_folder(out: str) -> str | None:
    """Create the folder ``out`` and write (then remove) a probe file in it.

    Returns why that failed (the system's reason), or ``None``. An actual write, not
    ``os.access``: that answers for the real user ID and ignores some ACLs and
    mounts; the write is what the run will do.
    """
    path = Path(out)
    if path.exists() and not path.is_dir():
        return "it exists and is not a folder"
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".torch-embed-write-check-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        return err.strerror or _first_line(err)
    return None


def _snapshot(paths: Sequence[Path]) -> dict[Path, tuple[int, int] | None]:
    """``(mtime_ns, size)`` of each path, ``None`` where there is no file."""
    out: dict[Path, tuple[int, int] | None] = {}
    for p in paths:
        try:
            st = p.stat()
        except OSError:
            out[p] = None
        else:
            out[p] = (st.st_mtime_ns, st.st_size)
    return out


def _remove_unfinished(before: dict[Path, tuple[int, int] | None]) -> list[str]:
    """Remove the files the interrupted step wrote (changed since ``before``)."""
    removed = []
    for p, old in before.items():
        new = _snapshot([p])[p]
        if new is not None and new != old:
            try:
                p.unlink()
            except OSError:
                continue
            removed.append(p.name)
    return removed


def _add_common(p: argparse.ArgumentParser, default_out: str, writes: str) -> None:
    p.add_argument(
        "--out",
        metavar="DIR",
        default=default_out,
        help=f"folder for {writes} (created; default: {default_out})",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="random seed of initialisations and of the schemes' random choices (default: 0)",
    )
    p.add_argument(
        "--device",
        type=_device,
        default="cpu",
        help="torch device for training, e.g. cpu, cuda, cuda:1; Hessians are computed "
        "in float64 on it (default: cpu)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="the small size used by the tests and CI (same steps, fewer iterations/runs)",
    )
    p.add_argument(
        "--threads",
        type=_nonnegative_int,
        default=1,
        metavar="N",
        help="torch.set_num_threads during the run; the networks are tiny, so one thread "
        "is fastest (default: 1; 0 keeps torch's setting)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``torch-embed`` (subcommands ``demo`` and ``reproduce``).

    Example:
        >>> args = build_parser().parse_args(["reproduce", "fig3a", "--quick"])
        >>> args.command, args.figure, args.quick, args.out
        ('reproduce', 'fig3a', True, 'torch-embed-figures')
    """
    parser = argparse.ArgumentParser(
        prog="torch-embed",
        description=_DESCRIPTION,
        formatter_class=_Formatter,
    )
    from torch_embed import __version__

    parser.add_argument("--version", action="version", version=f"torch-embed {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="widen a trained narrow net with every critical scheme and compare inertia",
        formatter_class=_Formatter,
        description=textwrap.fill(
            "Train a width-2 tanh network on a built-in 1D staircase (float64), polish it "
            "to a critical point, widen a copy with each critical scheme (split α=1/2, "
            "signed split α=3/2, 3-way split, null neuron, Net2Net, a general embedding) "
            "and print one table per scheme: output difference, |grad| before/after, "
            "Hessian inertia before/after (full recount and before + inertia_change, "
            "each timed), and whether no count decreased. Writes DIR/demo.png. Runs in "
            "well under a minute on 2 CPU cores; no download."
        ),
    )
    _add_common(demo, "torch-embed-demo", "demo.png")
    rep = sub.add_parser(
        "reproduce",
        help="reproduce a figure of the papers and compare with the paper's numbers",
        description=textwrap.fill(
            "Run one of the papers' experiments with the paper's hyper-parameters (or "
            "--quick for the small CI size), write DIR/FIG.png and DIR/FIG.json and print "
            "the paper's headline numbers next to the measured ones. Full-size runs can "
            "take from minutes to hours; --quick runs take seconds."
        ),
        formatter_class=_Formatter,
    )
    rep.add_argument("figure", metavar="FIG", choices=[*_figures(), "all"], help=_FIG_HELP)
    _add_common(rep, "torch-embed-figures", "FIG.png and FIG.json (the numbers), per figure")
    rep.add_argument(
        "--check",
        action="store_true",
        help="exit with status 1 if a headline claim of the paper is not reproduced",
    )
    return parser


def _figures() -> list[str]:
    from torch_embed.experiments import FIGURES

    return list(FIGURES)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``torch-embed`` with ``argv`` (default ``sys.argv[1:]``); return the exit status.

    0: done (``reproduce --check``: and every headline claim reproduced), 1: the demo's
    check or ``--check`` failed, 2: bad arguments, no command, a device this machine
    lacks or an ``--out`` folder that cannot be written (argparse's ``SystemExit(2)``,
    before any work), 130: interrupted by Ctrl-C (one line on stderr; finished outputs
    are kept).

    Example:
        >>> main(["--version"])  # doctest: +SKIP
        torch-embed 0.1.0
    """
    try:
        return _main(argv)
    except KeyboardInterrupt:  # before the work started (e.g. while importing torch)
        print("torch-embed: interrupted", file=sys.stderr)
        return INTERRUPTED


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.error("a command is required: demo or reproduce (see torch-embed --help)")
    problem = _writable_folder(args.out)
    if problem is not None:
        parser.exit(
            2,
            f"{parser.prog} {args.command}: error: argument --out: cannot create or write "
            f"the folder {args.out!r}: {problem}\n",
        )
    threads = args.threads or None
    out = Path(args.out)
    if args.command == "demo":
        from torch_embed.experiments.demo import run_demo

        before = _snapshot([out / "demo.png"])
        try:
            demo = run_demo(
                out=args.out, seed=args.seed, device=args.device, quick=args.quick, threads=threads
            )
        except KeyboardInterrupt:
            return _interrupted("demo", out, [], _remove_unfinished(before))
        return 0 if demo.ok else 1
    from torch_embed.experiments import run_figure

    names = _figures() if args.figure == "all" else [args.figure]
    ok = True
    finished: list[str] = []
    for name in names:
        before = _snapshot([out / f"{name}.png", out / f"{name}.json"])
        try:
            result = run_figure(
                name,
                quick=args.quick,
                out=args.out,
                seed=args.seed,
                device=args.device,
                threads=threads,
            )
        except KeyboardInterrupt:
            return _interrupted(f"reproduce {name}", out, finished, _remove_unfinished(before))
        finished.extend(p.name for p in (result.figure, result.json) if p is not None)
        ok = ok and result.agrees
        if len(names) > 1:
            print()
    return 1 if (args.check and not ok) else 0


def _interrupted(what: str, out: Path, kept: list[str], removed: list[str]) -> int:
    """Say in one line what was kept and removed; return :data:`INTERRUPTED`."""
    line = f"torch-embed: interrupted during {what}"
    line += f"; kept {', '.join(kept)} in {out}" if kept else "; no output was finished"
    if removed:
        line += f"; removed the unfinished {', '.join(removed)}"
    print(line, file=sys.stderr, flush=True)
    return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
