"""A tiny progress line on stderr for steps that take more than a few seconds.

No dependency (no tqdm): :class:`Progress` prints nothing for the first ``delay``
seconds, so quick steps stay silent, then rewrites one line (carriage return) on a terminal or
prints a line every ``interval`` seconds when stderr is a file or a pipe.
"""

from __future__ import annotations

import math
import sys
import time
from types import TracebackType
from typing import TextIO

__all__ = ["Progress"]


class Progress:
    """A progress line for a loop of known length, shown only if it takes a while.

    Args:
        label: What is running, e.g. ``"training width 2"``.
        total: The number of units of work (``update`` takes the number done so far).
        delay: Seconds to wait before the first line appears.
        stream: Where to write (default: ``sys.stderr`` at construction time).
        enabled: ``False`` silences it completely.

    Example:
        >>> import io
        >>> out = io.StringIO()
        >>> with Progress("counting", total=3, delay=0.0, stream=out) as bar:
        ...     for i in range(3):
        ...         bar.update(i + 1)
        >>> "counting" in out.getvalue() and "3/3" in out.getvalue()
        True
    """

    def __init__(
        self,
        label: str,
        total: int,
        *,
        delay: float = 3.0,
        stream: TextIO | None = None,
        enabled: bool = True,
    ) -> None:
        self.label = label
        self.total = max(int(total), 1)
        self.delay = delay
        self.stream = sys.stderr if stream is None else stream
        self.enabled = enabled
        self._start = time.perf_counter()
        self._last = -math.inf
        self._shown = False
        isatty = getattr(self.stream, "isatty", None)
        self._tty = bool(isatty()) if callable(isatty) else False
        self._interval = 0.2 if self._tty else 10.0
        self._done = 0
        self._written = -1
        self._extra = ""

    def __enter__(self) -> Progress:
        self._start = time.perf_counter()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def elapsed(self) -> float:
        """Seconds since the loop started."""
        return time.perf_counter() - self._start

    def update(self, done: int, extra: str = "") -> None:
        """Report that ``done`` units are finished; ``extra`` is shown after the count."""
        self._done = done
        self._extra = extra
        if not self.enabled:
            return
        now = self.elapsed
        if now < self.delay or now - self._last < self._interval:
            return
        self._last = now
        self._write()

    def close(self) -> None:
        """Finish the line (only if anything was shown)."""
        if self._shown:
            if self._written != self._done:
                self._write()
            if self._tty:
                self.stream.write("\n")
            self.stream.flush()
            self._shown = False

    def _write(self) -> None:
        pct = 100.0 * self._done / self.total
        elapsed = self.elapsed
        eta = ""
        if 0 < self._done < self.total:
            eta = f", ~{elapsed * (self.total - self._done) / self._done:.0f} s left"
        extra = f" {self._extra}" if self._extra else ""
        line = (
            f"  {self.label}: {pct:3.0f}% ({self._done}/{self.total}) {elapsed:.1f} s{eta}{extra}"
        )
        if self._tty:
            self.stream.write("\r" + line.ljust(79))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        self._shown = True
        self._written = self._done
