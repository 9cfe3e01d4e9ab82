"""The ``torch-embed`` command line: help texts, argument errors, exit codes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

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


def test_no_command_prints_usage_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    """A bare ``torch-embed`` did nothing and exited 0, as if it had worked."""
    with pytest.raises(SystemExit) as exc:
        cli.main([])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: torch-embed")
    assert "error: a command is required: demo or reproduce" in err


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
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, ok: bool, status: int
) -> None:
    from torch_embed.experiments import demo

    seen = {}

    def fake_run_demo(**kwargs: object) -> SimpleNamespace:
        seen.update(kwargs)
        return SimpleNamespace(ok=ok)

    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    out = str(tmp_path / "x")
    argv = ["demo", "--quick", "--out", out, "--seed", "3", "--threads", "0"]
    assert cli.main(argv) == status
    assert seen == {"out": out, "seed": 3, "device": "cpu", "quick": True, "threads": None}


@pytest.mark.parametrize(
    "check, agrees, status", [(False, False, 0), (True, False, 1), (True, True, 0)]
)
def test_reproduce_check_flag(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, check: bool, agrees: bool, status: int
) -> None:
    import torch_embed.experiments as experiments

    calls = []

    def fake_run_figure(name: str, **kwargs: object) -> SimpleNamespace:
        calls.append((name, kwargs))
        return SimpleNamespace(agrees=agrees, figure=None, json=None)

    monkeypatch.setattr(experiments, "run_figure", fake_run_figure)
    argv = ["reproduce", "all", "--quick", "--out", str(tmp_path)] + (["--check"] if check else [])
    assert cli.main(argv) == status
    assert [name for name, _ in calls] == list(FIGURES)
    assert all(kw["quick"] is True for _, kw in calls)


# ---------------------------------------------------------------------------- up front
_OK = SimpleNamespace(ok=True)


def _no_work(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Replace the demo and the figures by recorders: the checks must come first."""
    import torch_embed.experiments as experiments
    from torch_embed.experiments import demo

    calls: list[str] = []
    monkeypatch.setattr(demo, "run_demo", lambda **kw: calls.append("demo") or _OK)
    monkeypatch.setattr(experiments, "run_figure", lambda name, **kw: calls.append(name))
    return calls


def _one_error_line(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and len(err.splitlines()) <= 3, err  # usage (2 lines) + error
    return errors[0]


@pytest.mark.parametrize("command", [["demo"], ["reproduce", "all"]])
def test_out_under_a_file_is_refused_before_the_work(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    command: list[str],
) -> None:
    """The folder was created only after the run: a traceback, nothing written. A path
    under a FILE cannot be created even by root (who may write read-only folders)."""
    calls = _no_work(monkeypatch)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    line = _one_error_line(capsys, [*command, "--out", str(blocker / "out")])
    assert line.startswith(f"torch-embed {command[0]}: error: argument --out: cannot create")
    assert "Not a directory" in line or "exists" in line
    line = _one_error_line(capsys, [*command, "--out", str(blocker)])
    assert "it exists and is not a folder" in line
    assert calls == []


def test_unwritable_out_is_refused_before_the_work(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A folder that exists but refuses files: the probe write fails (simulated here,
    because the suite may run as root; the real chmod case is the next test)."""
    calls = _no_work(monkeypatch)

    def refuse(*args: object, **kwargs: object) -> tuple[int, str]:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(cli.tempfile, "mkstemp", refuse)
    line = _one_error_line(capsys, ["reproduce", "fig3a", "--out", str(tmp_path)])
    assert line.endswith(f"the folder {str(tmp_path)!r}: Permission denied")
    assert calls == []


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0,
    reason="root writes into read-only folders (the simulated test above covers it)",
)
def test_read_only_out_folder_is_refused(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    calls = _no_work(monkeypatch)
    tmp_path.chmod(0o500)
    try:
        line = _one_error_line(capsys, ["demo", "--out", str(tmp_path / "sub")])
    finally:
        tmp_path.chmod(0o700)
    assert "Permission denied" in line and calls == []


def test_out_folder_is_created_and_left_clean(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls = _no_work(monkeypatch)
    out = tmp_path / "new" / "deeper"
    assert cli.main(["demo", "--out", str(out)]) == 0
    assert calls == ["demo"] and out.is_dir() and list(out.iterdir()) == []  # probe removed


@pytest.mark.parametrize(
    ("device", "patch"),
    [("mps", ("backends.mps", "is_available")), ("cuda:99", None)],
)
def test_unavailable_device_is_one_line(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    device: str,
    patch: tuple[str, str] | None,
) -> None:
    """``--device mps`` on Linux printed torch's 57-line dispatcher listing."""
    if patch is not None:  # also on a Mac with MPS: pretend it is missing
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    calls = _no_work(monkeypatch)
    line = _one_error_line(capsys, ["demo", "--device", device])
    assert line.startswith(f"torch-embed demo: error: argument --device: device {device!r} is")
    assert len(line) < 300 and calls == []


def test_device_error_from_the_backend_keeps_its_first_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A backend that says it is available but cannot allocate (the generic path)."""
    long = "Could not run 'aten::empty.memory_format' with the 'XPU' backend.\n" + "x\n" * 55

    def empty(*args: object, **kwargs: object) -> None:
        raise NotImplementedError(long)

    monkeypatch.setattr(torch, "xpu", SimpleNamespace(is_available=lambda: True), raising=False)
    monkeypatch.setattr(torch, "empty", empty)
    line = _one_error_line(capsys, ["demo", "--device", "xpu"])
    assert line.endswith("Could not run 'aten::empty.memory_format' with the 'XPU' backend.")


# ---------------------------------------------------------------------------- Ctrl-C
def _main_catching_interrupt(argv: list[str]) -> int:
    """``cli.main``; an escaping KeyboardInterrupt fails the test (it would end pytest)."""
    try:
        return cli.main(argv)
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped cli.main (a raw traceback for the user)")


def test_interrupt_keeps_finished_figures_and_exits_130(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """``reproduce all``, Ctrl-C during the third figure: one line, status 130, the two
    finished figures kept, the interrupted one's half-written PNG removed, older files
    of later figures untouched."""
    import torch_embed.experiments as experiments

    names = list(FIGURES)
    old = tmp_path / f"{names[3]}.json"
    old.write_text("{}")  # from an earlier run: not this run's to remove
    unrelated = tmp_path / "notes.txt"
    unrelated.write_text("mine")

    def fake_run_figure(name: str, *, out: str, **kwargs: object) -> SimpleNamespace:
        png, js = Path(out) / f"{name}.png", Path(out) / f"{name}.json"
        png.write_bytes(b"\x89PNG half")
        if name == names[2]:
            raise KeyboardInterrupt
        js.write_text("{}")
        return SimpleNamespace(agrees=True, figure=png, json=js)

    monkeypatch.setattr(experiments, "run_figure", fake_run_figure)
    status = _main_catching_interrupt(["reproduce", "all", "--out", str(tmp_path)])
    assert status == cli.INTERRUPTED == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"torch-embed: interrupted during reproduce {names[2]}; kept ")
    for name in names[:2]:
        assert f"{name}.png, {name}.json" in err
        assert (tmp_path / f"{name}.png").exists() and (tmp_path / f"{name}.json").exists()
    assert f"removed the unfinished {names[2]}.png" in err
    assert not (tmp_path / f"{names[2]}.png").exists()
    assert old.read_text() == "{}" and unrelated.read_text() == "mine"


def test_interrupted_demo_exits_130_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from torch_embed.experiments import demo

    def interrupted(**kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "run_demo", interrupted)
    assert _main_catching_interrupt(["demo", "--out", str(tmp_path)]) == 130
    err = capsys.readouterr().err
    assert err == "torch-embed: interrupted during demo; no output was finished\n"


def test_interrupt_before_the_work_exits_130(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(*args: object) -> None:
        raise KeyboardInterrupt  # e.g. Ctrl-C while torch is being imported

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert _main_catching_interrupt(["demo"]) == 130
    assert capsys.readouterr().err == "torch-embed: interrupted\n"
