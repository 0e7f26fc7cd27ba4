"""Progress reports: a bar on a terminal, a plain line now and then in a log.

A tqdm bar redraws itself with carriage returns, which a log (CI, ``| tee``,
a file) keeps as thousands of frames. Every progress report of the library
and the command line goes through :class:`Progress`, which draws a bar only
when its stream is a terminal and otherwise prints one plain line per
report, at most one every ``interval`` seconds (the last report always).
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

LOG_INTERVAL = 30.0
"""Seconds between two plain lines of one report in a log."""


def is_terminal(stream: TextIO) -> bool:
    """Whether ``stream`` is a terminal (a bar) or a log (plain lines)."""
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class Progress:
    """Reports ``done`` of ``total`` units of work, with a message.

    Args:
        name: what is progressing (the bar's label, each line's prefix).
        unit: what is counted (``"epoch"``, ``"unit"``).
        enabled: ``False`` reports nothing.
        stream: where reports go; default ``sys.stderr``.
        interval: in a log, the least number of seconds between two lines
            (``0`` prints every report).
        leave: on a terminal, keep the finished bar on screen.
    """

    def __init__(self, name: str, *, unit: str = "unit", enabled: bool = True,
                 stream: TextIO | None = None,
                 interval: float = LOG_INTERVAL, leave: bool = True):
        self.name = name
        self.unit = unit
        self.enabled = enabled
        self.stream = sys.stderr if stream is None else stream
        self.interval = interval
        self.leave = leave
        self.terminal = is_terminal(self.stream)
        self.start = time.perf_counter()
        self._last_line: float | None = None
        self._bar = None

    def __call__(self, message: str, done: int, total: int) -> None:
        """Report that ``done`` of ``total`` units are finished."""
        if not self.enabled:
            return
        if self.terminal:
            if self._bar is None:
                from tqdm.auto import tqdm
                self._bar = tqdm(total=total, desc=self.name, unit=self.unit,
                                 leave=self.leave, dynamic_ncols=True,
                                 file=self.stream)
            self._bar.total = total
            self._bar.set_postfix_str(message, refresh=False)
            self._bar.update(done - self._bar.n)
            return
        now = time.perf_counter()
        if (done < total and self._last_line is not None
                and now - self._last_line < self.interval):
            return
        self._last_line = now
        print(f"{self.name}: [{done}/{total}] {message} "
              f"({now - self.start:.1f} s)", file=self.stream, flush=True)

    def close(self) -> None:
        """Finish the bar (a log needs nothing)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
