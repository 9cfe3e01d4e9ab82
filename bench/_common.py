"""Helpers shared by the benchmark scripts (standard library only).

The scripts run as ``python bench/<name>.py`` from the repository root, so Python puts
``bench/`` on ``sys.path`` and they import this module as ``from _common import ...``.
Nothing here imports torch: ``bench/widen.py``'s parent process does not load it.
"""

from __future__ import annotations

import fcntl
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
"""The committed results file every benchmark writes its section of."""


def write_results(text: str, title: str, section: str) -> None:
    """Put ``text`` under ``### title`` in the section ``section`` of RESULTS.md.

    The section (a ``## ...`` heading, e.g. ``"## bench/growth.py"``) holds one block per
    command line: a block with the same title is replaced, a new one appended; other
    sections (other benchmarks) are kept as they are. The file is re-read under a lock,
    so several runs may finish at once.
    """
    with open(Path(tempfile.gettempdir()) / "torch_embed_results.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
        head = f"### {title}\n"
        block = head + "\n" + text.strip("\n") + "\n"
        start = old.find(section + "\n")
        if start < 0:
            RESULTS.write_text(old.rstrip("\n") + "\n\n" + section + "\n\n" + block)
            return
        end = old.find("\n## ", start + len(section))
        end = len(old) if end < 0 else end + 1
        body, rest = old[start:end], old[end:]
        at = body.find(head)
        if at >= 0:
            stop = body.find("\n### ", at + len(head))
            stop = len(body) if stop < 0 else stop + 1
            body = body[:at] + block + ("\n" if stop < len(body) else "") + body[stop:]
        else:
            body = body.rstrip("\n") + "\n\n" + block
        RESULTS.write_text(old[:start] + body.rstrip("\n") + "\n" + ("\n" + rest if rest else ""))


def cpu_model() -> str | None:
    """The CPU's model name from ``/proc/cpuinfo``, or ``None`` where there is none."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def proc_status_kib(key: str) -> int:
    """A memory figure of this process from ``/proc/self/status`` in KiB (``"VmHWM"``...)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")
