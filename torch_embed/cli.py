"""The ``torch-embed`` command: ``torch-embed demo`` and ``torch-embed reproduce FIG``.

A thin argparse front end; the work is done in :mod:`torch_embed.experiments`.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Sequence

__all__ = ["build_parser", "main"]

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


def _device(text: str) -> str:
    """``--device``: a torch device this machine has (an argparse error otherwise)."""
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError) as err:
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r} ({err})") from None
    if dev.type == "meta":
        raise argparse.ArgumentTypeError("'meta' tensors hold no values; use cpu or cuda")
    try:
        torch.empty(1, device=dev)
    except (RuntimeError, AssertionError) as err:  # "Torch not compiled with CUDA enabled"
        raise argparse.ArgumentTypeError(f"device {text!r} is not available here: {err}") from None
    return text


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

    Example:
        >>> main(["--version"])  # doctest: +SKIP
        torch-embed 0.1.0
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    threads = args.threads or None
    if args.command == "demo":
        from torch_embed.experiments.demo import run_demo

        demo = run_demo(
            out=args.out, seed=args.seed, device=args.device, quick=args.quick, threads=threads
        )
        return 0 if demo.ok else 1
    from torch_embed.experiments import run_figure

    names = _figures() if args.figure == "all" else [args.figure]
    ok = True
    for name in names:
        result = run_figure(
            name,
            quick=args.quick,
            out=args.out,
            seed=args.seed,
            device=args.device,
            threads=threads,
        )
        ok = ok and result.agrees
        if len(names) > 1:
            print()
    return 1 if (args.check and not ok) else 0


if __name__ == "__main__":
    sys.exit(main())
