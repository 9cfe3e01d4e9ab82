"""The ``torch-embed`` command line: help texts, argument errors, exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from torch_embed import cli
from torch_embed.experiments import FIGURES

REPO = Path(__file__).resolve().parents[1]


def _help(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 0
    return capsys.readouterr().out


def test_top_level_help_lists_both_commands(capsys: pytest.CaptureFixture[str]) -> None:
    out = _help(capsys, ["--help"])
    assert "usage: torch-embed" in out
    assert "demo" in out and "reproduce" in out


def test_demo_help_explains_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    out = _help(capsys, ["demo", "--help"])
    for option in ("--out", "--seed", "--device", "--quick", "--threads"):
        assert option in out
    assert "torch-embed-demo" in out  # the default output folder is stated
    assert "float64" in out


def test_reproduce_help_lists_every_figure(capsys: pytest.CaptureFixture[str]) -> None:
    out = _help(capsys, ["reproduce", "--help"])
    for fig in FIGURES:
        assert fig in out
    for option in ("--out", "--seed", "--device", "--quick", "--threads", "--check"):
        assert option in out
    assert "digits" in out  # says that digits replaces MNIST


def test_no_command_prints_help_and_succeeds(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 0
    assert "usage: torch-embed" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [
        ["reproduce", "fig2"],
        ["reproduce"],
        ["demo", "--threads", "-1"],
        ["demo", "--seed", "one"],
        ["frobnicate"],
        # these raised tracebacks from inside the run (torch.device / CUDA init / .item())
        ["demo", "--device", "nonsense"],
        ["demo", "--device", "meta"],
        ["reproduce", "fig3a", "--device", "cuda:99"],
    ],
)
def test_bad_arguments_exit_with_status_2(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


def test_argument_errors_name_the_subcommand_and_option(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        cli.main(["demo", "--threads", "-1"])
    assert "torch-embed demo: error: argument --threads: must be >= 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["demo", "--device", "nonsense"])
    assert "error: argument --device: not a torch device: 'nonsense'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "usage"),
    [
        # ``python -m torch_embed`` said "'torch_embed' is a package and cannot be directly
        # executed" before torch_embed/__main__.py existed
        (["torch_embed", "demo", "--help"], "usage: torch-embed demo"),
        (["torch_embed.cli", "--help"], "usage: torch-embed"),
    ],
)
def test_runs_with_python_m(argv: list[str], usage: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert usage in proc.stdout


def test_parser_defaults() -> None:
    args = cli.build_parser().parse_args(["demo"])
    assert (args.out, args.seed, args.device, args.quick, args.threads) == (
        "torch-embed-demo",
        0,
        "cpu",
        False,
        1,
    )


@pytest.mark.parametrize("ok, status", [(True, 0), (False, 1)])
def test_demo_exit_status_follows_the_result(
    monkeypatch: pytest.MonkeyPatch, ok: bool, status: int
) -> None:
    from torch_embed.experiments import demo

    seen = {}

    def fake_run_demo(**kwargs: object) -> SimpleNamespace:
        seen.update(kwargs)
        return SimpleNamespace(ok=ok)

    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    argv = ["demo", "--quick", "--out", "x", "--seed", "3", "--threads", "0"]
    assert cli.main(argv) == status
    assert seen == {"out": "x", "seed": 3, "device": "cpu", "quick": True, "threads": None}


@pytest.mark.parametrize(
    "check, agrees, status", [(False, False, 0), (True, False, 1), (True, True, 0)]
)
def test_reproduce_check_flag(
    monkeypatch: pytest.MonkeyPatch, check: bool, agrees: bool, status: int
) -> None:
    import torch_embed.experiments as experiments

    calls = []

    def fake_run_figure(name: str, **kwargs: object) -> SimpleNamespace:
        calls.append((name, kwargs))
        return SimpleNamespace(agrees=agrees)

    monkeypatch.setattr(experiments, "run_figure", fake_run_figure)
    argv = ["reproduce", "all", "--quick"] + (["--check"] if check else [])
    assert cli.main(argv) == status
    assert [name for name, _ in calls] == list(FIGURES)
    assert all(kw["quick"] is True for _, kw in calls)
