"""The README's Usage example runs, and prints what its comment says it prints."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", text, flags=re.DOTALL | re.MULTILINE)


def test_usage_example_runs_and_prints_its_comment() -> None:
    blocks = _python_blocks(README.read_text())
    assert blocks, "README.md has no ```python block"
    for block in blocks:
        # every `print(...)  # expected` line: the comment is the expected output
        expected = [
            line.split("#", 1)[1].strip()
            for line in block.splitlines()
            if line.startswith("print(") and "#" in line
        ]
        out = io.StringIO()
        torch.manual_seed(0)
        with contextlib.redirect_stdout(out):
            exec(compile(block, str(README), "exec"), {"__name__": "__readme__"})
        assert out.getvalue().splitlines() == expected
